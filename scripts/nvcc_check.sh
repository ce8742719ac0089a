#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (csrc/cuda) for sm_80 and sm_90: no GPU needed.
#
# The kernels (csrc/cuda/*.cu) are compiled by nvcc with the flags of setup.py's CUDA build
# (torch's nvcc flags from the torch that $PYTHON imports) at C++17, the older of the
# standards torch builds pass (2.11's torch.utils.cpp_extension passes -std=c++17, 2.13's
# -std=c++20), but without torch's include paths, so a torch header in a kernel's
# translation unit fails here (why: csrc/cuda/compact_launch.h), and with ptxas' resource
# usage (-Xptxas -v). The script fails on any compile error and on any kernel that spills
# registers (spill stores or spill loads > 0: every kernel here is on the hot path of a
# stage), and prints each kernel's registers, spills, shared memory and stack per
# architecture. Host-only code called from __host__
# __device__ helpers is an error (cross-execution-space-call), and so is a symbol that two
# kernel objects define. The torch launchers (csrc/cuda/*.cpp) and the CUDA build's Python
# module (csrc/python_module.cpp with EENET_WITH_CUDA) are checked by the host compiler
# (-fsyntax-only) against torch's, Python's and the CUDA runtime's headers. Without nvcc it
# prints why and exits 0 (a CPU-only machine).
#
# Time: one nvcc per kernel source builds every architecture; all sources compile in
# parallel. Host code is compiled at -O0 (nvcc's -O is the host optimisation; device code
# goes through cicc and ptxas at -O3 either way, so the registers and spills reported are
# the build's): about 20 s on 2 cores.
#
# Environment: PYTHON (default .venv/bin/python, else python3), NVCC (default: nvcc on
# PATH, else $CUDA_HOME/bin/nvcc, else /usr/local/cuda/bin/nvcc), CXX (the host compiler,
# default c++), NVCC_CHECK_ARCHS (default "80 90"), NVCC_CHECK_JOBS (parallel compiles,
# default: the number of CPUs), NVCC_CHECK_HOST_OPT (default -O0), NVCC_CHECK_FLAGS (extra
# nvcc flags).
set -euo pipefail

cd "$(dirname "$0")/.."
source scripts/cuda_build_env.sh

nvcc="$(eenet_nvcc)"
if [[ -z "$nvcc" ]]; then
  echo "nvcc-check: skipped: nvcc not found (set NVCC or CUDA_HOME, or put it on PATH)"
  exit 0
fi
python="$(eenet_python)"
if ! torch_info="$("$python" - <<'PY'
import sysconfig
import torch
from torch.utils.cpp_extension import include_paths, COMMON_NVCC_FLAGS
print(" ".join(include_paths()))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(" ".join(COMMON_NVCC_FLAGS))
print(sysconfig.get_paths()["include"])
PY
)"; then
  echo "nvcc-check: FAILED: $python cannot import torch (its headers are needed)" >&2
  exit 1
fi
mapfile -t info <<<"$torch_info"
read -r -a torch_includes <<<"${info[0]}"
cxx11_abi="${info[1]}"
read -r -a common_flags <<<"${info[2]}"
python_include="${info[3]}"

archs="${NVCC_CHECK_ARCHS:-80 90}"
jobs="${NVCC_CHECK_JOBS:-$(nproc 2>/dev/null || echo 2)}"
sources=(csrc/cuda/*.cu)
launchers=(csrc/cuda/*.cpp)
if [[ ! -e "${sources[0]}" || ! -e "${launchers[0]}" ]]; then
  echo "nvcc-check: FAILED: no csrc/cuda/*.cu or no csrc/cuda/*.cpp" >&2
  exit 1
fi
cxx="${CXX:-c++}"
if ! command -v "$cxx" >/dev/null; then
  echo "nvcc-check: FAILED: no host compiler $cxx (set CXX)" >&2
  exit 1
fi
cuda_include="$(eenet_cuda_include "$nvcc")"
if [[ -z "$cuda_include" ]]; then
  echo "nvcc-check: FAILED: no cuda_runtime_api.h near $nvcc" >&2
  exit 1
fi

defines=(-DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
         "-D_GLIBCXX_USE_CXX11_ABI=$cxx11_abi")
flags=(-c -std=c++17 "${NVCC_CHECK_HOST_OPT:--O0}" -Icsrc "${common_flags[@]}" -Xcompiler -fPIC
       "${defines[@]}" -Xptxas -v -Werror cross-execution-space-call)
read -r -a extra_flags <<<"${NVCC_CHECK_FLAGS:-}"
flags+=("${extra_flags[@]}")
host_flags=(-std=c++20 -fsyntax-only -fPIC -Icsrc "-I$cuda_include" "${defines[@]}")
for inc in "${torch_includes[@]}"; do host_flags+=("-I$inc"); done
# a CPU build of torch ships c10/cuda without the header its CMake generates (it only
# defines the Windows export macro)
macros_found=0
for inc in "${torch_includes[@]}"; do
  [[ -f "$inc/c10/cuda/impl/cuda_cmake_macros.h" ]] && macros_found=1
done
[[ "$macros_found" == 1 ]] || host_flags+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "nvcc-check: $("$nvcc" --version | tail -n 2 | head -n 1)"
echo "nvcc-check: ${#sources[@]} kernel source(s) x sm_${archs// /, sm_} and" \
     "${#launchers[@]} launcher(s) ($cxx), $jobs parallel job(s)"
start=$(date +%s)

# one nvcc per kernel source, every architecture in it (cudafe++ and the host compile run
# once per source); one host compile per launcher
gencode=()
for arch in $archs; do gencode+=(-gencode "arch=compute_$arch,code=sm_$arch"); done
logs=()
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  logs+=("$work/$name.log")
  run_job "$work/$name.log" "$nvcc" "${flags[@]}" "${gencode[@]}" "$src" -o "$work/$name.o"
done
for src in "${launchers[@]}"; do
  run_job "$work/$(basename "$src").host.log" "$cxx" "${host_flags[@]}" "$src"
done
# the Python module as setup.py's CUDA build compiles it (with the CUDA graph binding)
run_job "$work/python_module.cpp.host.log" "$cxx" "${host_flags[@]}" -DEENET_WITH_CUDA \
  "-I$python_include" csrc/python_module.cpp
wait

status=0
for log in "$work"/*.log; do
  rc="$(cat "$log.rc" 2>/dev/null || echo 1)"
  if [[ "$rc" != 0 ]]; then
    what="$(basename "$log" .log)"
    echo "nvcc-check: FAILED: ${what%.host} does not compile (exit $rc):" >&2
    grep -v '^ptxas info' "$log" | head -n 60 >&2
    status=1
  fi
done
[[ $status == 0 ]] || exit 1
# the kernel objects link into one library (a kernel defined in two .cu files fails here;
# the CUDA runtime's symbols stay undefined, as in any shared object before its link)
if ! "$cxx" -shared -o "$work/kernels.so" "$work"/*.o >"$work/link.log" 2>&1; then
  echo "nvcc-check: FAILED: the kernel objects do not link together:" >&2
  head -n 40 "$work/link.log" >&2
  exit 1
fi

"$python" - "$archs" "${logs[@]}" <<'PY'
import re
import shutil
import subprocess
import sys

entry = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
props = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
used = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
rows = []
for path in sys.argv[2:]:
    source = path.rsplit("/", 1)[-1].removesuffix(".log") + ".cu"
    name = arch = None
    stack = st = ld = "0"
    for line in open(path, encoding="utf-8", errors="replace"):
        if m := entry.search(line):
            name, arch = m.group(1), m.group(2)
            stack = st = ld = "0"
        elif (m := props.search(line)) and name:
            stack, st, ld = m.groups()
        elif (m := used.search(line)) and name:
            rows.append([source, arch, int(m.group(1)), int(st), int(ld), int(m.group(2) or 0),
                         int(stack), name])
            name = None
archs = sys.argv[1].split()
for path in sys.argv[2:]:
    source = path.rsplit("/", 1)[-1].removesuffix(".log") + ".cu"
    for arch in archs:
        if not any(r[0] == source and r[1] == f"sm_{arch}" for r in rows):
            sys.exit(f"nvcc-check: FAILED: no kernel of {source} compiled for sm_{arch}")
if shutil.which("c++filt"):
    out = subprocess.run(["c++filt"], input="\n".join(r[-1] for r in rows), text=True,
                         capture_output=True, check=True).stdout.splitlines()
    for row, name in zip(rows, out, strict=True):
        # without the argument list (and the anonymous namespace, whose "(" is not one)
        row[-1] = name.replace("(anonymous namespace)::", "").split("(")[0]
rows.sort(key=lambda r: (r[0], r[-1], r[1]))
print(f"{'source':<15} {'arch':<6} {'regs':>4} {'spill st/ld':>11} {'smem':>6} {'stack':>5}  kernel")
spilling = 0
for source, arch, regs, st, ld, smem, stack, name in rows:
    spills = st > 0 or ld > 0
    spilling += spills
    mark = "  <-- SPILLS" if spills else ""
    print(f"{source:<15} {arch:<6} {regs:>4} {f'{st}/{ld}':>11} {smem:>6} {stack:>5}  "
          f"{name[:100]}{mark}")
if spilling:
    sys.exit(f"nvcc-check: FAILED: {spilling} kernel(s) spill registers")
PY
echo "nvcc-check: ok in $(( $(date +%s) - start )) s (no compile error, no spill)"
