# Sourced by scripts/nvcc_check.sh and scripts/torch_abi_check.sh: finding the tools of a
# CUDA build without a GPU, and a small pool of parallel compile jobs.

# The Python whose torch the build uses: $PYTHON, else .venv/bin/python, else python3.
eenet_python() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"
  elif [[ -x .venv/bin/python ]]; then echo .venv/bin/python
  else echo python3
  fi
}

# nvcc: $NVCC, else nvcc on PATH, else $CUDA_HOME/bin/nvcc, else /usr/local/cuda/bin/nvcc;
# nothing when none is an executable.
eenet_nvcc() {
  local nvcc="${NVCC:-$(command -v nvcc || true)}" candidate
  for candidate in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    [[ -z "$nvcc" && -x "$candidate" ]] && nvcc="$candidate"
  done
  [[ -n "$nvcc" && -x "$nvcc" ]] && echo "$nvcc"
  return 0
}

# The CUDA runtime's headers, where nvcc itself looks for them (its dry run names them; nvcc
# may be a wrapper script away from its toolkit); nothing when none holds
# cuda_runtime_api.h. Argument: the nvcc.
eenet_cuda_include() {
  local dir
  for dir in $("$1" --dryrun -c -x cu /dev/null -o /dev/null 2>&1 |
               sed -n 's/^#\$ INCLUDES=//p' | tr -d '"' | sed 's/-I//g'); do
    if [[ -f "$dir/cuda_runtime_api.h" ]]; then
      echo "$dir"
      return 0
    fi
  done
  return 0
}

# run_job LOG COMMAND...: COMMAND in the background, its output in LOG and its exit status
# in LOG.rc, at most $jobs at a time (the caller sets jobs, then waits for the last ones).
running=0
run_job() {
  local log="$1"
  shift
  ( "$@" >"$log" 2>&1; echo $? >"$log.rc" ) &
  running=$((running + 1))
  if (( running >= jobs )); then
    wait -n 2>/dev/null || true
    running=$((running - 1))
  fi
}
