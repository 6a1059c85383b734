"""Build step for the optional C kernels of the MPD-converted layers (everything else is in pyproject.toml).

The kernels are plain C (``csrc/blockdiag.c``, no Python or torch headers) behind a small CPython
entry module (``csrc/blockdiag_py.c``). The extension is optional: where it does not build (no C
compiler or no Python headers) the install goes on without it and :mod:`pfgdf_plugin.native`
reports it unavailable (the layers then run on PyTorch operations only).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pfgdf_plugin._blockdiag",
                             sources=["pfgdf_plugin/csrc/blockdiag.c", "pfgdf_plugin/csrc/blockdiag_py.c"],
                             extra_compile_args=["-O3"], optional=True)])
