#!/usr/bin/env bash
# Builds the wheel of this tree and checks it as a user gets it: installed (no editable
# install, no checkout on sys.path) into a throw-away venv that sees only torch, the
# requirements of torch and the wheel's core dependencies, all reused from $PYTHON's
# environment (nothing is downloaded). Then, from a directory outside the checkout:
#   - eenet and eenet_kernels (and the compiled eenet_kernels._C) come from the venv;
#   - every module of the source tree is in the wheel and imports, except eenet_kernels'
#     Triton kernel modules when triton is not installed (they must then fail on triton and
#     on nothing else); triton is an optional extra, so the venv does not see it unless
#     torch itself requires it (CUDA builds of torch), in which case the CPU part is run
#     again with triton blocked from importing;
#   - the `eenet` console script runs;
#   - a tiny end-to-end batch: exit_score + compact (C++ kernels) against plain torch, and
#     eenet.runtime.Engine(mode="compact") against eenet.runtime.simulate.
#
#   PYTHON=.venv/bin/python scripts/check_wheel.sh       (make test-wheel)
#
# The C++ objects are kept in build/check-wheel/ between runs (ninja recompiles only what
# changed; the wheel's Python files and the link are redone every time).
set -euo pipefail
PYTHON=${PYTHON:-python3}
# a relative path (.venv/bin/python) made absolute, without resolving the venv's symlink
[[ $PYTHON == */* ]] && PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")
root=$(cd "$(dirname "$0")/.." && pwd)
src=$root/build/check-wheel/src
start=$(date +%s)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/eenet-check-wheel.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# 1. the tree as a fresh clone (plus uncommitted edits) would have it
"$root/scripts/sync_tree.sh" "$src"

# 2. the wheel (compiles the C++ extension against $PYTHON's torch)
echo "check-wheel: building the wheel"
"$PYTHON" -m pip wheel "$src" --no-deps --no-build-isolation -q -w "$tmp/dist"
wheel=$(ls "$tmp"/dist/*.whl)
echo "check-wheel: built $(basename "$wheel")"

# 3. the throw-away venv: its own site-packages, plus one directory of symlinks to the
#    distributions it may reuse (a .pth path line adds a directory to sys.path; .pth files
#    inside it, such as the editable install's finder hook, are not processed)
"$PYTHON" -m venv --without-pip "$tmp/venv"
vpy=$tmp/venv/bin/python
site=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$tmp/deps"
"$PYTHON" - "$wheel" "$tmp/deps" >"$tmp/deps.txt" <<'EOF'
"""Symlink torch, its requirements and the wheel's core requirements (markers evaluated,
extras left out), recursively, into argv[2]; print their names."""
import os
import sys
import zipfile
from importlib import metadata

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    requires = [v.strip() for k, _, v in (line.partition(":") for line in
                z.read(meta).decode().splitlines()) if k == "Requires-Dist"]


def core(reqs):
    for r in map(Requirement, reqs or []):
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            yield canonicalize_name(r.name)


if "triton" in {canonicalize_name(Requirement(r).name) for r in requires
                if "extra ==" not in str(Requirement(r).marker or "")}:
    sys.exit("check-wheel: triton is a core requirement of the wheel; it must stay the "
             "optional extra `triton` (CPU installs do not need it)")

todo, seen = ["torch", *core(requires)], set()
while todo:
    name = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        sys.exit(f"check-wheel: {name} (needed by torch or the wheel) is not installed")
    todo.extend(core(dist.requires))
    tops = {p.parts[0] for p in dist.files or [] if p.parts[0] != ".."}
    for top in tops:
        src = os.path.join(str(dist.locate_file("")), top)
        if not top.endswith(".pth") and os.path.exists(src):
            link = os.path.join(dest, top)
            if not os.path.lexists(link):
                os.symlink(src, link)
print(" ".join(sorted(seen)))
EOF
echo "check-wheel: venv reuses $(cat "$tmp/deps.txt")"
echo "$tmp/deps" >"$site/eenet-check-wheel-deps.pth"

# 4. the wheel, nothing else (pip >= 22.3 installs into another interpreter's environment)
"$PYTHON" -m pip --python "$vpy" install -q --no-deps --no-index "$wheel" || {
  echo "check-wheel: installing into the venv failed (needs pip >= 22.3 for --python)" >&2
  exit 1
}

# 5. the checks, run from outside the checkout with a clean environment
mkdir -p "$tmp/run"
cd "$tmp/run"
cat >"$tmp/check.py" <<'EOF'
import importlib
import importlib.util
import os
import pkgutil
import sys

venv, src = os.path.realpath(sys.argv[1]), os.path.realpath(sys.argv[2])
block_triton = len(sys.argv) > 3 and sys.argv[3] == "block-triton"


class BlockTriton:
    """Makes `import triton` fail as it does where triton is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


if block_triton:
    sys.meta_path.insert(0, BlockTriton())
have_triton = not block_triton and importlib.util.find_spec("triton") is not None

import torch  # noqa: E402

import eenet  # noqa: E402
import eenet_kernels as ek  # noqa: E402


def inside_venv(module):
    path = os.path.realpath(module.__file__)
    assert path.startswith(venv + os.sep), f"{module.__name__} imported from {path}, not the venv"


inside_venv(eenet)
inside_venv(ek)
assert ek.HAVE_EXTENSION, "eenet_kernels: the compiled extension did not load"
inside_venv(sys.modules["eenet_kernels._C"])

# every module of the source tree is in the wheel, and imports
expected = set()
for top, base in (("eenet_kernels", src), ("eenet", os.path.join(src, "python"))):
    for dirpath, _, files in os.walk(os.path.join(base, top)):
        pkg = os.path.relpath(dirpath, base).replace(os.sep, ".")
        expected |= {pkg if f == "__init__.py" else f"{pkg}.{f[:-3]}"
                     for f in files if f.endswith(".py")}
# modules that need an optional extra that is not installed: they must fail on it alone
needs_triton = {"eenet_kernels.triton.compact", "eenet_kernels.triton.exit_score"}
skipped = set() if have_triton else needs_triton
found = set()
for pkg in (eenet, ek):
    found.add(pkg.__name__)
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        found.add(info.name)
missing = expected - found
assert not missing, f"modules of the source tree missing from the wheel: {sorted(missing)}"
imported = 0
for name in sorted(found):
    if name.endswith(".__main__"):  # entry points (python -m), not importable modules
        continue
    if name in skipped:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            assert exc.name == "triton", f"{name}: {exc}"
        else:
            raise AssertionError(f"{name} imported without triton")
        continue
    importlib.import_module(name)
    imported += 1

# exit_score + compact (the C++ kernels) against plain torch
torch.manual_seed(0)
feats, weight, bias = torch.randn(64, 32), torch.randn(5, 32), torch.randn(5)
res = ek.exit_score(feats, weight, bias, policy="max_prob", threshold=0.5, backend="cpp")
logits = torch.nn.functional.linear(feats, weight, bias)
score = logits.softmax(1).amax(1)
torch.testing.assert_close(res.logits, logits, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(res.score, score, rtol=1e-5, atol=1e-5)
clear = (score - 0.5).abs() > 1e-4
assert torch.equal(res.exit_mask[clear], (score >= 0.5)[clear])
keep = ~res.exit_mask
h, idx = torch.randn(64, 8), torch.arange(64)
kept, n = ek.compact(keep, [h, idx], backend="cpp")
assert int(n) == int(keep.sum()) and 0 < int(n) < 64
assert torch.equal(kept[0][: int(n)], h[keep]) and torch.equal(kept[1][: int(n)], idx[keep])
assert not kept[0][int(n):].any()

# the runtime on a tiny multi-exit net: compact mode against the oracle
from eenet.nn import ExitHead, MultiExitNetwork  # noqa: E402
from eenet.policies import MaxProb  # noqa: E402
from eenet.runtime import Engine, simulate  # noqa: E402

stages = [torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Tanh()) for _ in range(3)]
net = MultiExitNetwork(stages, [ExitHead.linear(10, 7) for _ in range(3)]).eval()
x = torch.randn(96, 10)
with torch.no_grad():
    scores = MaxProb([0.0] * 3).scores([z.float() for z in net(x)])
policy = MaxProb([float(scores[:, j].median()) for j in range(3)])
oracle = simulate(net, policy, x)
out = Engine(net, policy, mode="compact")(x)
assert torch.equal(out.exit_index, oracle.exit_index)
assert len(set(out.exit_index.tolist())) == 3, "every exit should take some rows"
torch.testing.assert_close(out.logits, oracle.logits, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(out.score, oracle.score, rtol=1e-5, atol=1e-5)

how = "blocked" if block_triton else ("installed" if have_triton else "not installed")
print(f"check-wheel: ok (triton {how}): {imported} modules imported"
      f"{', skipped ' + ', '.join(sorted(skipped)) if skipped else ''}; exit_score, compact and "
      "Engine(compact) match plain torch / simulate")
EOF
run_check() {
  env -u EENET_BACKEND -u EENET_SKIP_EXT -u TRITON_INTERPRET "$vpy" -I "$tmp/check.py" \
    "$tmp/venv" "$src" "$@"
}
run_check
"$tmp/venv/bin/eenet" --help >/dev/null
if "$vpy" -I -c 'import triton' 2>/dev/null; then
  run_check block-triton  # torch itself brings triton here: check the CPU path without it
fi
echo "check-wheel: passed in $(($(date +%s) - start)) s"
