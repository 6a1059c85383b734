"""Build step for the optional C kernels of the MPD-converted layers (everything else is in pyproject.toml).

The kernels are plain C (``csrc/blockdiag.c``, no Python or torch headers) behind a small CPython
entry module (``csrc/blockdiag_py.c``). The extension is optional: where it does not build (no C
compiler or no Python headers) the install goes on without it and :mod:`pfgdf_plugin.native`
reports it unavailable (the layers then run on PyTorch operations only).

Loops start on 32-byte boundaries where the compiler takes the flag: the batch-1 kernel's inner loop
across a 64-byte boundary took 15.3 us a call instead of 11.0 (eight 128 x 128 blocks), depending
only on where the linker happened to place it.
"""

import os
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_ALIGN = "-falign-loops=32"


class _BuildExt(build_ext):
    def build_extensions(self):
        if self._accepts(_ALIGN):
            for ext in self.extensions:
                ext.extra_compile_args.append(_ALIGN)
        super().build_extensions()

    def _accepts(self, flag: str) -> bool:
        with tempfile.TemporaryDirectory() as folder:
            source = os.path.join(folder, "probe.c")
            with open(source, "w") as f:
                f.write("int pfgdf_probe(void) { return 0; }\n")
            try:
                self.compiler.compile([source], output_dir=folder, extra_postargs=[flag, "-Werror"])
            except Exception:  # CompileError, or a compiler that rejects the flag another way
                return False
        return True


setup(ext_modules=[Extension("pfgdf_plugin._blockdiag",
                             sources=["pfgdf_plugin/csrc/blockdiag.c", "pfgdf_plugin/csrc/blockdiag_py.c"],
                             extra_compile_args=["-O3"], optional=True)],
      cmdclass={"build_ext": _BuildExt})
