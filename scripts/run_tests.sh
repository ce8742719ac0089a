#!/usr/bin/env bash
# `make test` after lint: the test suite and the four build checks at the same time.
#
#   - pytest (TRITON_INTERPRET=1, arguments passed on), its output on the terminal;
#   - in the background, one after another and at a lower CPU priority (nice), the build
#     checks: scripts/nvcc_check.sh (the CUDA kernels compiled for sm_80 / sm_90),
#     scripts/torch_abi_check.sh (the CUDA build against the GPU hosts' torch),
#     scripts/check_wheel.sh (the wheel as a user installs it) and scripts/cmake_check.sh
#     (the CMake library and the C++ examples).
#
# Why together: the suite keeps about one core busy on average (most tests are single-
# threaded Python), the checks are compilers; on 2 cores the checks fit into the suite's
# idle core and `make test` takes about as long as pytest alone. nice keeps the suite's
# timing-sensitive tests from competing with the compilers for their core.
#
# The checks' output goes to a log that is printed, check by check, when pytest has
# finished; the exit status is non-zero when pytest or any check failed.
#
#   PYTHON=.venv/bin/python scripts/run_tests.sh [pytest arguments]
set -uo pipefail
PYTHON=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/eenet-tests.XXXXXX")
checks=(nvcc_check torch_abi_check check_wheel cmake_check)
checks_pid=
pytest_pid=
cleanup() {
  if [[ -n $pytest_pid ]] && kill -0 "$pytest_pid" 2>/dev/null; then
    kill "$pytest_pid" 2>/dev/null || true
    wait "$pytest_pid" 2>/dev/null || true
  fi
  if [[ -n $checks_pid ]] && kill -0 "$checks_pid" 2>/dev/null; then
    kill -- -"$checks_pid" 2>/dev/null || kill "$checks_pid" 2>/dev/null || true
    wait "$checks_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# the checks in a process group of their own (set -m), so that an interrupt stops all of them
set -m
(
  for check in "${checks[@]}"; do
    start=$(date +%s)
    PYTHON=$PYTHON nice -n 10 bash "scripts/$check.sh" >"$tmp/$check.log" 2>&1
    echo "$? $(($(date +%s) - start))" >"$tmp/$check.rc"
  done
) &
checks_pid=$!
set +m

# pytest as a waited-for child rather than a foreground command: bash runs a trap (an
# interrupt, a TERM from CI) only once a foreground command is done, but at once in `wait`
start=$(date +%s)
TRITON_INTERPRET=1 "$PYTHON" -m pytest -q "$@" 0<&0 &  # stdin kept (--pdb)
pytest_pid=$!
wait "$pytest_pid"
pytest_rc=$?
pytest_pid=
pytest_s=$(($(date +%s) - start))

wait "$checks_pid"
checks_pid=
status=$pytest_rc
summary="pytest: $([[ $pytest_rc == 0 ]] && echo ok || echo "FAILED (exit $pytest_rc)") in ${pytest_s} s"
for check in "${checks[@]}"; do
  echo
  echo "=== scripts/$check.sh"
  cat "$tmp/$check.log"
  read -r rc secs <"$tmp/$check.rc" || { rc=1; secs=?; }
  [[ $rc == 0 ]] || status=1
  summary+="; $check: $([[ $rc == 0 ]] && echo ok || echo "FAILED (exit $rc)") in ${secs} s"
done
echo
echo "make test: $summary (wall $(($(date +%s) - start)) s)"
exit "$status"
