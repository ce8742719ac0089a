"""The CMake library (CMakeLists.txt), checked without building it (scripts/cmake_check.sh,
`make cmake-check`, builds and runs it): its sources need no Python, and its source globs
cover every C++ kernel file, so that a kernel added to csrc/cpu cannot be left out of it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CMAKE = (ROOT / "CMakeLists.txt").read_text()
PYTHON_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](Python\.h|pybind11/|torch/extension\.h|'
                            r'torch/python\.h|torch/csrc/utils/pybind)', re.M)


def _library_sources() -> set[Path]:
    """The files of eenet_ops: add_library(eenet_ops ...) and target_sources(eenet_ops ...),
    with ${VAR} of a file(GLOB VAR ...) expanded the way CMake expands it."""
    src = r"(?:\$\{(?:CMAKE_CURRENT_SOURCE_DIR|PROJECT_SOURCE_DIR|CMAKE_SOURCE_DIR)\}/)?"
    globs: dict[str, set[Path]] = {}
    for var, args in re.findall(r"file\(\s*GLOB\s+(\w+)([^)]*)\)", CMAKE):
        patterns = [re.sub("^" + src, "", a) for a in args.split() if a != "CONFIGURE_DEPENDS"]
        globs[var] = {p for pattern in patterns for p in ROOT.glob(pattern)}
    files: set[Path] = set()
    calls = re.findall(r"(?:add_library|target_sources)\(\s*eenet_ops\s+([^)]*)\)", CMAKE)
    assert calls, "no add_library(eenet_ops ...) in CMakeLists.txt"
    for args in calls:
        for arg in args.split():
            if (var := re.fullmatch(r"\$\{(\w+)\}", arg)) and var[1] in globs:
                files |= globs[var[1]]
            elif (path := ROOT / re.sub("^" + src, "", arg)).is_file():
                files.add(path)
    return files


def test_library_sources_need_no_python() -> None:
    csrc = ROOT / "csrc"
    sources = [csrc / "ops.cpp", *sorted(csrc.rglob("*.h")), *sorted(csrc.glob("cpu/*.cpp")),
               *sorted(csrc.glob("cuda/*.cu")), *sorted(csrc.glob("cuda/*.cuh")),
               *sorted(csrc.glob("cuda/*.cpp"))]
    offenders = [str(p.relative_to(ROOT)) for p in sources if PYTHON_INCLUDE.search(p.read_text())]
    assert not offenders, f"Python headers in the C++ library sources: {offenders}"
    # the Python module init lives apart, in the extension only
    assert "PyInit__C" in (ROOT / "csrc/python_module.cpp").read_text()
    assert "PyInit_" not in (ROOT / "csrc/ops.cpp").read_text()
    assert not re.search(r"Python3?::|find_package\(\s*Python", CMAKE)


def test_cmake_library_has_every_cpu_kernel() -> None:
    sources = _library_sources()
    kernels = set((ROOT / "csrc/cpu").glob("*.cpp"))
    assert kernels, "no csrc/cpu/*.cpp"
    missing = sorted(str(p.relative_to(ROOT)) for p in kernels - sources)
    assert not missing, f"CMakeLists.txt does not build {missing} into eenet_ops"
    assert ROOT / "csrc/ops.cpp" in sources
    assert ROOT / "csrc/python_module.cpp" not in sources


def test_cmake_library_has_every_cuda_kernel() -> None:
    # built only with EENET_CUDA=ON (and a CUDA libtorch), by the same kind of glob
    cuda = ROOT / "csrc/cuda"
    kernels = set(cuda.glob("*.cu")) | set(cuda.glob("*.cpp"))
    assert kernels, "no csrc/cuda/*.cu"
    missing = sorted(str(p.relative_to(ROOT)) for p in kernels - _library_sources())
    assert not missing, f"CMakeLists.txt does not build {missing} into eenet_ops"
