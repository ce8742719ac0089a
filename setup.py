"""Build of eenet-kernels: the compiled extension ``eenet_kernels._C`` of the op package.

Everything declarative (metadata, dependencies, the ``eenet_kernels`` and ``eenet`` packages,
the latter from ``python/``) is in pyproject.toml; this file holds only what must be code.

Environment:
  EENET_SKIP_EXT=1   build nothing compiled; every op runs through its Python fallback.
  EENET_SANITIZE=1   build the extension with AddressSanitizer + UndefinedBehaviorSanitizer
                     (-O1 -g; `make test-asan` builds it in a copy of the tree and runs the op
                     tests with libasan preloaded). Never for a wheel that ships.
  EENET_CUDA=1|0     build (1) or leave out (0) the CUDA kernels csrc/cuda (a CUDAExtension
                     registering the ops' CUDA dispatch key). Unset: built exactly when torch is
                     a CUDA build and a CUDA toolkit is found (CUDA_HOME / nvcc), so a CPU torch
                     builds the CPU-only extension. Architectures: TORCH_CUDA_ARCH_LIST, default
                     "8.0;9.0" (sm_80, sm_90).
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise SystemExit(
        "eenet-kernels builds against an installed PyTorch. Install torch first "
        "(`make setup` installs torch==2.13.0 CPU when none is importable), then run "
        "`pip install -e . --no-build-isolation`."
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))

# -fno-trapping-math: lets GCC if-convert (and so vectorise) loops with selects; the kernels
# never read floating-point exception flags
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
LINK_FLAGS = ["-fopenmp"]
# every UBSan finding aborts (no recovery), as ASan's do
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer", "-g"]


# nvcc: device code at -O3 (host code gets it too); line info for profilers, no cost at run time
NVCC_FLAGS = ["-O3", "-lineinfo"]
CUDA_ARCH_DEFAULT = "8.0;9.0"


def with_cuda() -> bool:
    """Whether to build csrc/cuda (EENET_CUDA, else: a CUDA torch and a CUDA toolkit)."""
    flag = os.environ.get("EENET_CUDA", "")
    if flag not in ("", "0", "1"):
        raise SystemExit(f"EENET_CUDA must be 0 or 1, got {flag!r}")
    from torch.utils.cpp_extension import CUDA_HOME  # None unless torch is a CUDA build

    if flag == "1" and torch.version.cuda is None:
        raise SystemExit("EENET_CUDA=1 needs a CUDA build of torch (this one is CPU-only); "
                         "`make nvcc-check` compiles the CUDA kernels without one")
    if flag == "1" and CUDA_HOME is None:
        raise SystemExit("EENET_CUDA=1: no CUDA toolkit found; set CUDA_HOME")
    if flag:
        return flag == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def extensions() -> list:
    if os.environ.get("EENET_SKIP_EXT", "0") == "1":
        return []
    cxx_flags, link_flags = list(CXX_FLAGS), list(LINK_FLAGS)
    if os.environ.get("EENET_SANITIZE", "0") == "1":
        cxx_flags = ["-O1", *cxx_flags[1:], *SANITIZE_FLAGS]
        link_flags += SANITIZE_FLAGS
    # csrc/python_module.cpp (the module init) only here: the CMake library has no Python
    sources = ["csrc/ops.cpp", "csrc/python_module.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    kwargs = {"name": "eenet_kernels._C", "include_dirs": [os.path.join(ROOT, "csrc")],
              "extra_link_args": link_flags}
    # csrc/cuda: the kernels (*.cu, nvcc, no torch header) and their torch launchers (*.cpp,
    # the host compiler; csrc/cuda/compact_launch.h says why they are apart)
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    if cuda_sources and with_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCH_DEFAULT)
        # EENET_WITH_CUDA: csrc/python_module.cpp binds the CUDA graph helper
        return [CUDAExtension(sources=sources + cuda_sources,
                              extra_compile_args={"cxx": [*cxx_flags, "-DEENET_WITH_CUDA"],
                                                  "nvcc": NVCC_FLAGS},
                              **kwargs)]
    return [CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
