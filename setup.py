"""The package's one native part: backends/torch/kernels.c, fermi's CPU kernels for
quantized decode. Optional: where it cannot be built (no compiler), the install goes
on and the torch backend runs its pure-torch path (it says which at startup)."""

import sys

from setuptools import Extension, setup

openmp = [] if sys.platform in ("darwin", "win32") else ["-fopenmp"]  # (Apple's clang has no OpenMP)
setup(ext_modules=[Extension(
    "fermi.backends.torch._kernels", ["backends/torch/kernels.c"],
    extra_compile_args=["-O3", "-fno-math-errno", *openmp], extra_link_args=openmp, optional=True,
)])
