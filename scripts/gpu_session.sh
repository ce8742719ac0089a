#!/usr/bin/env bash
# The GPU checks, in steps that each end well inside 10 minutes.
# Run from the repository root on the GPU host (its python3 holds a CUDA torch and triton):
#
#   bash scripts/gpu_session.sh test    # build, the gpu-marked tests, the whole suite interpreted
#   bash scripts/gpu_session.sh micro   # bench.micro --device cuda (CUDA and Triton providers)
#   bash scripts/gpu_session.sh e2e     # bench.e2e --device cuda (with both graph modes)
#   bash scripts/gpu_session.sh serve   # bench.serve --device cuda (request stream, re-batching)
#   bash scripts/gpu_session.sh tune    # bench.tune (launch-configuration sweep)
#   bash scripts/gpu_session.sh cmake   # the CMake library with CUDA kernels: ops_check on
#                                       # CUDA tensors from C++, the installed IF-node header
#   bash scripts/gpu_session.sh all     # one call: build, then the gpu tests (the CMake CUDA
#                                       # check beside them), bench.micro on CUDA and Triton,
#                                       # bench.e2e on bert with both graph modes, bench.serve,
#                                       # each bounded, within GPU_SESSION_S seconds
#
# `all` is for a session whose device time allows one call: the parts run in order of value,
# each under `timeout` with what is left of GPU_SESSION_S seconds counted from the script's
# start, the build included (default 570: a 10-minute call less time to pack and send the
# results back), and the results tarball is rewritten after every part, so a call cut short
# still brings back what finished. Each benchmark gets --time-limit (its cap less 25 s): it
# starts no new size after that and writes what it measured, and a SIGINT at the cap still
# leaves a report of the sizes done; one that finds no time left is named in the log.
#
# Every step builds the extension with its CUDA kernels first (EENET_CUDA=1; a few minutes on
# a fresh host) and leaves its log,
# and for the benchmarks a tarball of bench/results/<gpu>/, under $OUT.
# Wheels of packages the host lacks (scripts/fetch_gpu_wheels.sh puts them in .whl/) are
# installed first when .whl/ is there; copy .whl and demo_out (the demo's MNIST model, for
# the e2e mnist workload) to the host with the tree.
set -uo pipefail
step=${1:?usage: gpu_session.sh test|micro|e2e|serve|tune|cmake|all}
OUT=${OUT:-/tmp/eenet-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/$step.log"

{
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  EENET_CUDA=1 python3 -m pip install -q -e . --no-build-isolation --no-deps || exit 1
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  python3 -c "import torch, triton, eenet_kernels as ek; from eenet.runtime import graphs as g
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__,
      'extension', ek.HAVE_EXTENSION, 'cuda kernels', ek.ops.HAVE_CUDA_KERNELS)
m = g.conditional_nodes_missing()
print('graph IF nodes:', g.resolve_if_node_source() if m is None else 'none (' + m + ')')"
} 2>&1 | tee "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

# the CMake build (its own directory: setup.py's build/ is the extension's), CUDA required
cmake_check() {
  EENET_CUDA=1 PYTHON=python3 JOBS=${CMAKE_JOBS:-8} BUILD_DIR=/tmp/eenet-cmake \
    bash scripts/cmake_check.sh
}

case "$step" in
  cmake)
    cmake_check 2>&1 | tee -a "$log"
    exit "${PIPESTATUS[0]}"
    ;;
  test)
    python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    # the CPU suite against this host's torch: interpreted Triton, in parallel
    TRITON_INTERPRET=1 python3 -m pytest -q -m "not gpu" -p no:cacheprovider -n 8 tests \
      2>&1 | tee -a "$log"
    exit $((status || PIPESTATUS[0]))
    ;;
  micro | e2e | serve | tune)
    args=(--device cuda)
    [ "$step" = tune ] && args=()  # GPU-only: it takes no --device
    python3 -m "bench.$step" "${args[@]}" 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    if [ "$step" = micro ]; then  # every backend: the default (CUDA C++ kernels in this
      # build), Triton, the reference; results suffixed by backend
      for b in triton reference; do
        python3 -m bench.micro --device cuda --backend "$b" --no-compile 2>&1 | tee -a "$log"
        status=$((status || PIPESTATUS[0]))
      done
    fi
    tar czf "$OUT/results-$step.tgz" --exclude bench/results/cpu bench/results
    exit "$status"
    ;;
  all)
    deadline=${GPU_SESSION_S:-570}  # SECONDS counts from the script's start
    status=0
    part() {  # seconds cap, the kind (bench: it gets --time-limit), then the command
      local cap=$1 kind=$2 left=$((deadline - SECONDS))
      shift 2
      ((left > 30)) || { echo "gpu_session: no time left for: $*" | tee -a "$log"; status=1; return; }
      ((cap < left)) || cap=$left
      # a benchmark starts no new size after its limit and writes what it measured; the
      # SIGINT at the cap (pytest then still prints what failed so far) is the backstop
      [[ $kind == bench ]] && set -- "$@" --time-limit $((cap - 25))
      echo "gpu_session: [$((deadline - SECONDS)) s left] $* (at most $cap s)" | tee -a "$log"
      timeout --signal=INT --kill-after=15 "$cap" "$@" 2>&1 | tee -a "$log"
      local rc=${PIPESTATUS[0]}
      ((rc == 0)) || { echo "gpu_session: exit $rc: $*" | tee -a "$log"; status=1; }
      tar czf "$OUT/results-all.tgz" --exclude bench/results/cpu bench/results
    }
    # the CMake CUDA check compiles on 8 of the host's cores while the gpu tests run (6
    # workers: their Triton and inductor compiles side by side), and is waited for before
    # the benchmarks, whose host timings a compile beside them would distort
    cmake_cap=$((deadline - SECONDS - 60))
    ((cmake_cap < 240)) || cmake_cap=240
    timeout --kill-after=15 "$cmake_cap" bash -c "$(declare -f cmake_check); cmake_check" \
      >"$OUT/cmake.log" 2>&1 &
    cmake_pid=$!
    part 170 test python3 -m pytest -q -rfE --durations=15 -n 6 -m gpu -p no:cacheprovider tests
    wait "$cmake_pid"
    rc=$?
    tail -n 30 "$OUT/cmake.log" | tee -a "$log"
    if ((rc != 0)); then
      echo "gpu_session: exit $rc: the CMake CUDA check ($OUT/cmake.log)" | tee -a "$log"
      status=1
    fi
    # bench.micro's CUDA sizes run D = 768 first; bench.e2e's batch sizes ascend (1, 8 first)
    part 110 bench python3 -m bench.micro --device cuda
    part 75 bench python3 -m bench.micro --device cuda --backend triton --no-compile
    part 170 bench python3 -m bench.e2e --device cuda --workloads bert  # graph, graph_device
    part 90 bench python3 -m bench.serve --device cuda --seconds 2
    exit "$status"
    ;;
  *)
    echo "unknown step $step" >&2
    exit 2
    ;;
esac
