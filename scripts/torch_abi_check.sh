#!/usr/bin/env bash
# The CUDA build of the extension against another torch than the one installed: its
# headers, its C++ standard and its libraries, with no GPU and without installing it.
#
# Why: the GPU hosts run an older torch (2.11, CUDA 13.0) than CI's CPU torch, so a C++
# source that compiles here can fail there, where every minute is scarce: torch 2.11's
# torch.utils.cpp_extension passes -std=c++17 (2.13's passes -std=c++20), and its headers
# and libraries differ. This script fetches that torch's wheel (pip download, no deps, from
# the configured indexes), unpacks only its headers, its cpp_extension.py and the libraries
# the extension links (kept under build/torch-abi/ for the next run), then:
#   - compiles every translation unit that includes a torch header (csrc/ops.cpp,
#     csrc/cpu/*.cpp, csrc/cuda/*.cpp, csrc/python_module.cpp with EENET_WITH_CUDA) with
#     that torch's standard and the defines of its extension build;
#   - compiles the kernels (csrc/cuda/*.cu) for one architecture (they include no torch
#     header; scripts/nvcc_check.sh checks them in full);
#   - links them into an extension module with --no-undefined against that torch's
#     libc10 / libc10_cuda / libtorch / libtorch_cpu / libtorch_cuda / libtorch_python, the
#     CUDA runtime and libpython: a symbol that torch does not export fails here.
# Without nvcc, or when the wheel cannot be fetched (no index), it says why and exits 0.
#
# Environment: TORCH_ABI_SPEC (default torch==2.11.0, the GPU hosts' torch), PYTHON
# (default .venv/bin/python, else python3; its pip fetches, its headers are Python's), NVCC,
# CXX (default c++), TORCH_ABI_ARCH (default 90), TORCH_ABI_JOBS (default: the CPUs).
# Time: about 25 s on 2 cores, plus about 15 s the first time (fetch and unpack 0.5 GB).
set -euo pipefail

cd "$(dirname "$0")/.."
source scripts/cuda_build_env.sh
spec="${TORCH_ABI_SPEC:-torch==2.11.0}"
python="$(eenet_python)"
nvcc="$(eenet_nvcc)"
if [[ -z "$nvcc" ]]; then
  echo "torch-abi-check: skipped: nvcc not found (set NVCC or CUDA_HOME)"
  exit 0
fi
# the CUDA runtime's headers, its libraries next to them
cuda_include="$(eenet_cuda_include "$nvcc")"
if [[ -z "$cuda_include" ]]; then
  echo "torch-abi-check: FAILED: no cuda_runtime_api.h near $nvcc" >&2
  exit 1
fi
cuda_lib="$(dirname "$cuda_include")/lib64"
[[ -d "$cuda_lib" ]] || cuda_lib="$(dirname "$cuda_include")/lib"
cxx="${CXX:-c++}"
arch="${TORCH_ABI_ARCH:-90}"
jobs="${TORCH_ABI_JOBS:-$(nproc 2>/dev/null || echo 2)}"

# the unpacked parts are kept under build/torch-abi/ (about 1 GB), the wheel is not
cache="build/torch-abi/${spec//[^A-Za-z0-9.]/_}"
torch_dir="$cache/torch"
if [[ ! -f "$cache/.done" ]]; then
  rm -rf "$cache"
  mkdir -p "$cache/wheel"
  if ! "$python" -m pip download -q --no-deps --only-binary=:all: -d "$cache/wheel" "$spec" \
      >"$cache/download.log" 2>&1; then
    echo "torch-abi-check: skipped: cannot fetch $spec:"
    tail -n 3 "$cache/download.log"
    exit 0
  fi
  "$python" - "$(compgen -G "$cache/wheel/torch-*.whl" | head -n 1)" "$cache" <<'PY'
import sys
import zipfile

wheel, dest = sys.argv[1:]
libs = ("libc10.so", "libc10_cuda.so", "libtorch.so", "libtorch_cpu.so", "libtorch_cuda.so",
        "libtorch_python.so")
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if (name.startswith("torch/include/") or name == "torch/utils/cpp_extension.py"
                or name == "torch/version.py"
                or any(name == f"torch/lib/{lib}" for lib in libs)):
            z.extract(name, dest)
PY
  rm -rf "$cache/wheel"
  touch "$cache/.done"
fi
for lib in c10 c10_cuda torch torch_cpu torch_cuda torch_python; do
  if [[ ! -f "$torch_dir/lib/lib$lib.so" ]]; then
    echo "torch-abi-check: FAILED: $spec has no lib$lib.so (not a CUDA build of torch?)" >&2
    exit 1
  fi
done
version="$(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$torch_dir/version.py")"
# the standard its extension build passes when the build names none (setup.py names none)
std="$(grep -o "cpp_flag_prefix + 'c++[0-9]*'" "$torch_dir/utils/cpp_extension.py" |
       grep -o 'c++[0-9]*' | head -n 1)"
std="${std:-c++17}"
read -r py_include py_libdir py_ldlib < <("$python" -c '
import sysconfig as s
print(s.get_paths()["include"], s.get_config_var("LIBDIR"), s.get_config_var("LDLIBRARY"))')
# torch's manylinux_2_28 wheels use the C++11 string ABI; were it the other one, the link
# below would fail on every symbol that takes a std::string
cxx11_abi=1

echo "torch-abi-check: torch $version ($spec), -std=$std, _GLIBCXX_USE_CXX11_ABI=$cxx11_abi," \
     "kernels for sm_$arch, $jobs job(s)"
start=$(date +%s)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
defines=(-DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -DEENET_WITH_CUDA
         "-D_GLIBCXX_USE_CXX11_ABI=$cxx11_abi")
includes=(-Icsrc "-I$torch_dir/include" "-I$torch_dir/include/torch/csrc/api/include"
          "-I$cuda_include" "-I$py_include")

objects=()
for src in csrc/ops.cpp csrc/python_module.cpp csrc/cpu/*.cpp csrc/cuda/*.cpp; do
  name="$(echo "$src" | tr / _)"
  objects+=("$work/$name.o")
  run_job "$work/$name.log" "$cxx" "-std=$std" -O0 -fPIC -fopenmp "${defines[@]}" "${includes[@]}" \
    -c "$src" -o "$work/$name.o"
done
for src in csrc/cuda/*.cu; do
  name="$(echo "$src" | tr / _)"
  objects+=("$work/$name.o")
  run_job "$work/$name.log" "$nvcc" "-std=$std" -O0 -c -Icsrc -Xcompiler -fPIC \
    -gencode "arch=compute_$arch,code=sm_$arch" "$src" -o "$work/$name.o"
done
wait
status=0
for log in "$work"/*.log; do
  name="$(basename "$log" .log)"
  if [[ "$(cat "$log.rc" 2>/dev/null || echo 1)" != 0 ]]; then
    echo "torch-abi-check: FAILED: $name does not compile against torch $version:" >&2
    head -n 40 "$log" >&2
    status=1
  fi
done
[[ $status == 0 ]] || exit 1
if ! "$cxx" -shared -o "$work/_C.so" "${objects[@]}" -fopenmp -Wl,--no-undefined \
    "-L$torch_dir/lib" -lc10 -lc10_cuda -ltorch -ltorch_cpu -ltorch_cuda -ltorch_python \
    "-Wl,-rpath-link,$torch_dir/lib" "-L$cuda_lib" -lcudart \
    "-L$py_libdir" "-l:$py_ldlib" >"$work/link.log" 2>&1; then
  echo "torch-abi-check: FAILED: the extension does not link against torch $version:" >&2
  grep -v "warning: .*not found (try using -rpath" "$work/link.log" | head -n 40 >&2
  exit 1
fi
echo "torch-abi-check: ok in $(( $(date +%s) - start )) s (${#objects[@]} objects compiled" \
     "and linked against torch $version with no undefined symbol)"
