#!/usr/bin/env bash
# The op tests against the C++ extension built with AddressSanitizer + UndefinedBehaviorSanitizer
# (setup.py's EENET_SANITIZE=1), built in place in a copy of the tree (build/asan/src; its
# objects are kept between runs) so that the checkout's own extension is untouched. The
# sanitizer runtime is preloaded into the (uninstrumented) python; leak detection is off
# (python does not free everything at exit by design). Any sanitizer report fails the run:
# every finding aborts the process, and the output is also searched for reports. pytest
# captures only Python-level output (--capture=sys), so that a report written to fd 2 by a
# process that then dies is shown rather than lost with pytest's captured output.
#
#   PYTHON=.venv/bin/python scripts/test_asan.sh [pytest args]    (make test-asan)
set -euo pipefail
PYTHON=${PYTHON:-python3}
# a relative path (.venv/bin/python) made absolute, without resolving the venv's symlink
[[ $PYTHON == */* ]] && PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")
root=$(cd "$(dirname "$0")/.." && pwd)
src=$root/build/asan/src
start=$(date +%s)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/eenet-asan.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

"$root/scripts/sync_tree.sh" "$src"
cd "$src"
echo "test-asan: building the sanitized extension in $src"
EENET_SANITIZE=1 "$PYTHON" setup.py -q build_ext --inplace >"$tmp/build.log" 2>&1 || {
  cat "$tmp/build.log" >&2
  exit 1
}
so=$(ls eenet_kernels/_C*.so)
libs=$(ldd "$so")  # whole, then grep -q (a pipe into grep -q can end ldd with SIGPIPE)
grep -q libasan <<<"$libs" || { echo "test-asan: $so is not linked against libasan" >&2; exit 1; }

libasan=$(gcc -print-file-name=libasan.so)
[ -e "$libasan" ] || { echo "test-asan: gcc has no libasan.so" >&2; exit 1; }
# libstdc++ too: python does not link it, and ASan's __cxa_throw interceptor resolves the real
# function when it starts (without it, the first C++ exception aborts in the interceptor)
libstdcxx=$(gcc -print-file-name=libstdc++.so.6)
export LD_PRELOAD="$libasan $libstdcxx"
export ASAN_OPTIONS=detect_leaks=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH=$src:$src/python
unset EENET_BACKEND EENET_SKIP_EXT TRITON_INTERPRET

# the copy's packages and its sanitized extension are the ones imported, not the checkout's
"$PYTHON" -c "
import os, sys, eenet_kernels as ek
src = os.path.realpath(sys.argv[1])
for f in (ek.__file__, sys.modules['eenet_kernels._C'].__file__):
    assert os.path.realpath(f).startswith(src + os.sep), f
assert ek.HAVE_EXTENSION
" "$src"

tests=(tests/test_compact.py tests/test_exit_score.py tests/test_bad_inputs.py)
[ -e tests/test_fuzz_ops.py ] && tests+=(tests/test_fuzz_ops.py)
[ $# -gt 0 ] && tests=("$@")
set +e
"$PYTHON" -m pytest -q --capture=sys -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$tmp/out"
status=${PIPESTATUS[0]}
set -e
if grep -qE "ERROR: (Address|Undefined)Sanitizer|runtime error:|SUMMARY: [A-Za-z]+Sanitizer" \
    "$tmp/out"; then
  echo "test-asan: sanitizer report above" >&2
  status=1
fi
echo "test-asan: $([ "$status" -eq 0 ] && echo passed || echo FAILED) in $(($(date +%s) - start)) s"
exit "$status"
