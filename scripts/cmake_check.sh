#!/usr/bin/env bash
# Builds the C++ library with CMake, as a C++ serving stack does, and checks it without Python:
#   1. configure + build CMakeLists.txt (eenet_ops and the example ops_check) in build/cmake
#      against $PYTHON's libtorch (torch.utils.cmake_prefix_path), with ninja when there is one;
#   2. libeenet_ops.so must not depend on libpython;
#   3. run ops_check from the build tree (the ops through the dispatcher against plain
#      libtorch, examples/cpp/ops_check.cpp);
#   4. install into a temporary prefix, build examples/cpp on its own against the installed
#      CMake package (find_package(eenet)) and run that ops_check, which must load the
#      installed library;
#   5. an exported model from C++: examples/cpp/make_package.py ($PYTHON) compiles a small
#      multi-exit CNN with eenet.runtime.package_engine (AOTInductor) into <build>/aoti/
#      loop.pt2 and writes the Python engine's outputs on two batches beside it; aoti_run
#      (the build tree's, no Python in the process) loads the package with
#      AOTIModelPackageLoader, runs it and compares. The package is compiled in the
#      background while steps 1-4 run.
#
#   PYTHON=.venv/bin/python scripts/cmake_check.sh       (make cmake-check)
#   EENET_CUDA=1 PYTHON=python3 scripts/cmake_check.sh   (on a GPU host, a CUDA libtorch)
#
# EENET_CUDA=1 configures with -DEENET_CUDA=ON and then requires the CUDA kernels: ops_check
# runs with --require-cuda (its checks on CUDA tensors too), and the installed tree must hold
# include/eenet/cuda/graph_if.h with the library exporting the function it declares.
# JOBS (default 2) parallel compile jobs. BUILD_DIR (default build/cmake) is kept between
# runs (only what changed is rebuilt; the package is made anew every run); the installed
# copy and its example build are temporary.
set -euo pipefail
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-2}
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build/cmake}
start=$(date +%s)
cuda_flags=()
ops_check_args=()
if [[ ${EENET_CUDA:-0} == 1 ]]; then
  cuda_flags=(-DEENET_CUDA=ON)
  ops_check_args=(--require-cuda)
fi
step() { echo "cmake-check: $* ($(($(date +%s) - start)) s)"; }

command -v cmake >/dev/null || { echo "cmake-check: cmake not found" >&2; exit 1; }
prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi
# a build directory configured with another generator cannot be reused
if [[ -f $build/CMakeCache.txt ]]; then
  cached=$(sed -n 's/^CMAKE_GENERATOR:INTERNAL=//p' "$build/CMakeCache.txt")
  want=${generator[1]:-Unix Makefiles}
  [[ $cached == "$want" ]] || rm -rf "$build"
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/eenet-cmake-check.XXXXXX")
package_pid=
cleanup() {
  if [[ -n $package_pid ]]; then
    kill "$package_pid" 2>/dev/null || true
    wait "$package_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# 5 (started now): the exported model, compiled by AOTInductor while CMake builds
aoti=$build/aoti
rm -rf "$aoti"
mkdir -p "$aoti"
"$PYTHON" "$root/examples/cpp/make_package.py" "$aoti" >"$tmp/make_package.log" 2>&1 &
package_pid=$!

# 1. configure and build (Torch_DIR given explicitly: a cached one from another torch would win)
step "configuring against $prefix"
cmake -S "$root" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix" -DTorch_DIR="$prefix/Torch" -DEENET_EXAMPLES=ON "${cuda_flags[@]}" \
  >"$tmp/configure.log" 2>&1 \
  || { cat "$tmp/configure.log"; exit 1; }
step "building (-j$JOBS)"
cmake --build "$build" -j "$JOBS"

# 2. no Python in the library
lib=$build/libeenet_ops.so
if readelf -d "$lib" | grep -i 'NEEDED.*python'; then
  echo "cmake-check: $lib depends on libpython" >&2
  exit 1
fi

# 3. the example from the build tree
step "running ops_check (build tree)"
"$build/examples/cpp/ops_check" "${ops_check_args[@]}"

# 4. install, and the example as a separate project against the installed package
step "installing into a temporary prefix"
cmake --install "$build" --prefix "$tmp/install" >/dev/null
cmake -S "$root/examples/cpp" -B "$tmp/example" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix;$tmp/install" >"$tmp/configure-example.log" 2>&1 \
  || { cat "$tmp/configure-example.log"; exit 1; }
# (ops_check only: aoti_run links the same targets, and is built and run from the build tree)
cmake --build "$tmp/example" -j "$JOBS" --target ops_check >/dev/null
loaded=$(ldd "$tmp/example/ops_check" | awk '/libeenet_ops/ {print $3}')
if [[ $loaded != "$tmp/install/"* ]]; then
  echo "cmake-check: the installed example loads libeenet_ops from '$loaded'" >&2
  exit 1
fi
step "running ops_check (installed)"
"$tmp/example/ops_check" "${ops_check_args[@]}" | tail -1
if [[ ${EENET_CUDA:-0} == 1 ]]; then
  header=$tmp/install/include/eenet/cuda/graph_if.h
  [[ -f $header ]] || { echo "cmake-check: $header was not installed" >&2; exit 1; }
  # nm's whole output first: grep -q stops reading at the match, and under pipefail the
  # SIGPIPE that ends nm would fail the test
  symbols=$(nm -DC --defined-only "$lib")
  if ! grep -q 'eenet::cuda::capture_if_node' <<<"$symbols"; then
    echo "cmake-check: $lib does not export eenet::cuda::capture_if_node" >&2
    exit 1
  fi
  step "installed include/eenet/cuda/graph_if.h; the library exports capture_if_node"
fi

# 5. the exported model run from C++
step "waiting for the package (examples/cpp/make_package.py)"
if ! wait "$package_pid"; then
  package_pid=
  cat "$tmp/make_package.log" >&2
  echo "cmake-check: examples/cpp/make_package.py failed" >&2
  exit 1
fi
package_pid=
grep '^make_package:' "$tmp/make_package.log"
step "running aoti_run (build tree)"
"$build/examples/cpp/aoti_run" "$aoti/loop.pt2" "$aoti/cases.pt"
step "OK"
