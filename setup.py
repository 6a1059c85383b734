"""Build step for the optional C kernels of the MPD-converted layers (everything else is in pyproject.toml).

The library is plain C (no Python or torch headers) and optional: where no C compiler is found the
install goes on without it and :mod:`pfgdf_plugin.native` reports it unavailable (the layers then
run on PyTorch operations only).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pfgdf_plugin._blockdiag", sources=["pfgdf_plugin/csrc/blockdiag.c"],
                             extra_compile_args=["-O3"], optional=True)])
