"""Build of eenet-kernels: the compiled extension ``eenet_kernels._C`` of the op package.

Everything declarative (metadata, dependencies, the ``eenet_kernels`` and ``eenet`` packages,
the latter from ``python/``) is in pyproject.toml; this file holds only what must be code.

Environment:
  EENET_SKIP_EXT=1   build nothing compiled; every op runs through its Python fallback.
  EENET_SANITIZE=1   build the extension with AddressSanitizer + UndefinedBehaviorSanitizer
                     (-O1 -g; `make test-asan` builds it in a copy of the tree and runs the op
                     tests with libasan preloaded). Never for a wheel that ships.
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

# -fno-trapping-math: lets GCC if-convert (and so vectorise) loops with selects; the kernels
# never read floating-point exception flags
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
LINK_FLAGS = ["-fopenmp"]
# every UBSan finding aborts (no recovery), as ASan's do
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                  "-fno-omit-frame-pointer", "-g"]


def extensions() -> list:
    if os.environ.get("EENET_SKIP_EXT", "0") == "1":
        return []
    cxx_flags, link_flags = list(CXX_FLAGS), list(LINK_FLAGS)
    if os.environ.get("EENET_SANITIZE", "0") == "1":
        cxx_flags = ["-O1", *cxx_flags[1:], *SANITIZE_FLAGS]
        link_flags += SANITIZE_FLAGS
    # csrc/python_module.cpp (the module init) only here: the CMake library has no Python
    sources = ["csrc/ops.cpp", "csrc/python_module.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    return [
        CppExtension(
            name="eenet_kernels._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
