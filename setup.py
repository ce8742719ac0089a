"""Build of eenet-kernels: the ``eenet_kernels`` op package (+ its compiled ``_C``) and the
high-level ``eenet`` package from ``python/``.

Environment:
  EENET_SKIP_EXT=1   build nothing compiled; every op runs through its Python fallback.
  EENET_CUDA=0|1     force the CUDA sources off/on (default: on when nvcc and a CUDA torch
                     are present). The CUDA kernels land with their own issue.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise SystemExit(
        "eenet-kernels builds against an installed PyTorch. Install torch first "
        "(`make setup` installs torch==2.13.0 CPU when none is importable), then run "
        "`pip install -e . --no-build-isolation`."
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))


def extensions() -> list:
    if os.environ.get("EENET_SKIP_EXT", "0") == "1":
        return []
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    return [
        CppExtension(
            name="eenet_kernels._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            # -fno-trapping-math: lets GCC if-convert (and so vectorise) loops with selects; the
            # kernels never read floating-point exception flags
            extra_compile_args={"cxx": ["-O3", "-fopenmp", "-fno-trapping-math"]},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    packages=["eenet_kernels", "eenet_kernels.triton", "eenet"],
    package_dir={"eenet_kernels": "eenet_kernels", "eenet": "python/eenet"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
