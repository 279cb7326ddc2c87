#!/usr/bin/env bash
# Fill docker/wheelhouse/ for image builds (see docker/README.md).
#
#   docker/fill-wheelhouse.sh [--from DIR] [--all]
#
# Copies the torch wheel(s) of DIR (default: the first folder of $PIP_FIND_LINKS,
# else /opt/wheels) into docker/wheelhouse/. With --all it also downloads every
# other wheel the image needs (the project's dependencies and its build backend)
# with this machine's pip, so that `--build-arg OFFLINE=1` builds with no network:
# run it with Python 3.11 on a Linux host of the image's architecture.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
dest=$here/wheelhouse
from=${PIP_FIND_LINKS:-/opt/wheels}
from=${from%% *}
all=0
while [ $# -gt 0 ]; do
  case "$1" in
    --from) from=${2:?--from needs a folder}; shift 2 ;;
    --all) all=1; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "fill-wheelhouse: unknown argument '$1' (allowed: --from DIR, --all)" >&2; exit 2 ;;
  esac
done

mkdir -p "$dest"
shopt -s nullglob
wheels=("$from"/torch-*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "fill-wheelhouse: no torch-*.whl in '$from'; pass --from DIR (a folder with a torch wheel)" >&2
  exit 2
fi
for whl in "${wheels[@]}"; do
  if [ ! -e "$dest/$(basename "$whl")" ]; then
    # a hard link when possible (same file system, no copy), else a copy
    ln "$whl" "$dest/" 2>/dev/null || cp "$whl" "$dest/"
  fi
  echo "fill-wheelhouse: $(basename "$whl")"
done

if [ "$all" = 1 ]; then
  py=${PYTHON:-python3.11}
  "$py" - "$root/pyproject.toml" >"$dest/.requirements.txt" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as fh:
    data = tomllib.load(fh)
print("\n".join(data["project"]["dependencies"] + data["build-system"]["requires"]))
PY
  torch_version=$(basename "${wheels[0]}" | cut -d- -f2)
  echo "torch==$torch_version" >"$dest/.constraints.txt"
  "$py" -m pip download --dest "$dest" --find-links "$dest" --only-binary=:all: \
    -c "$dest/.constraints.txt" -r "$dest/.requirements.txt"
  rm -f "$dest/.requirements.txt" "$dest/.constraints.txt"
  echo "fill-wheelhouse: $(ls "$dest" | grep -c '\.whl$') wheels in $dest"
fi
