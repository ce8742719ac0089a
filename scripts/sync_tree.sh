#!/usr/bin/env bash
# Copies the tree as a fresh clone (plus uncommitted edits) would have it into DEST: the files
# git tracks and the untracked ones it does not ignore, with their mtimes. DEST/build/ is kept
# (the compiled objects, so that ninja rebuilds only what changed) except its lib.* and bdist.*
# folders, so that no file deleted from the tree survives into a build.
#   scripts/sync_tree.sh DEST
set -euo pipefail
dest=${1:?usage: sync_tree.sh DEST}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$dest"
find "$dest" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
rm -rf "$dest"/build/lib.* "$dest"/build/bdist.*
cd "$root"
# (files deleted but not yet committed are left out)
# shellcheck disable=SC2016
git ls-files -z --cached --others --exclude-standard \
  | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
  | tar --null -T - -cf - | tar -x -C "$dest"
