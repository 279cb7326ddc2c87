#!/usr/bin/env bash
# Build-time installer shared by docker/Dockerfile and docker/Dockerfile.cuda.
#
# `install-python-deps.sh deps` installs, into the active virtual environment:
#   1. torch, from the wheelhouse (/wheelhouse, the build context's docker/wheelhouse/)
#      or from TORCH_INDEX_URL, as TORCH_SOURCE says:
#        auto        a torch wheel of the wheelhouse that fits this platform, else the index
#        wheelhouse  the wheelhouse only (fails when no wheel fits)
#        index       TORCH_INDEX_URL only
#        system      the torch the venv already sees (a distribution's package under
#                    `venv --system-site-packages`, e.g. Debian's arm64 python3-torch
#                    of the edge image); fails when it is missing or outside the range
#   2. the project's dependencies (read from $DEPENDENCIES_FILE, one requirement per
#      line, or else from /app/pyproject.toml; the wheelhouse is a
#      find-links source, and with OFFLINE=1 the only source),
# `install-python-deps.sh list` prints that dependency list of /app/pyproject.toml (the
# Dockerfile's dependency-list stage keeps it as DEPENDENCIES_FILE),
# and `install-python-deps.sh project` then installs the project itself (no dependencies;
# its build backend, setuptools, comes from the same sources).
# torch is installed first and pinned, so step 2 never replaces it with another build.
# With FORBID_NVIDIA=1 (the CPU image) the build fails if any nvidia-* package got in.
set -euo pipefail

: "${TORCH_SOURCE:=auto}" "${TORCH_INDEX_URL:=https://download.pytorch.org/whl/cpu}"
: "${TORCH_REQUIREMENT:=torch>=2.3,<2.14}" "${OFFLINE:=0}" "${FORBID_NVIDIA:=0}"
# which wheelhouse files count as torch wheels (the CUDA image: torch-*+cu*.whl)
: "${TORCH_WHEEL_GLOB:=torch-*.whl}"
WHEELHOUSE=${WHEELHOUSE_DIR:-/wheelhouse}
APP=${APP_DIR:-/app}

log() { echo "install-python-deps: $*" >&2; }

offline=()
case "$OFFLINE" in
  1) offline=(--no-index) ;;
  0) ;;
  *) log "OFFLINE=$OFFLINE is not allowed; allowed: 0 or 1"; exit 2 ;;
esac
links=()
if compgen -G "$WHEELHOUSE/*.whl" >/dev/null; then
  links=(--find-links "$WHEELHOUSE")
  log "wheelhouse: $(ls "$WHEELHOUSE" | grep -c '\.whl$') wheel(s)"
elif [ "$OFFLINE" = 1 ]; then
  log "OFFLINE=1 but the wheelhouse (docker/wheelhouse/) has no wheels; fill it with docker/fill-wheelhouse.sh --all"
  exit 2
fi

torch_from_wheelhouse() {
  # Every torch wheel of the wheelhouse, pinned to its exact version (e.g. 2.13.0+cpu),
  # so that pip cannot take a same-numbered CUDA build from an index instead.
  local whl version
  # shellcheck disable=SC2231  # the glob comes from TORCH_WHEEL_GLOB on purpose
  for whl in "$WHEELHOUSE"/$TORCH_WHEEL_GLOB; do
    [ -e "$whl" ] || continue
    version=$(basename "$whl" | cut -d- -f2)
    log "trying torch==$version from the wheelhouse ($(basename "$whl"))"
    if pip install "${links[@]}" "${offline[@]}" "torch==$version"; then
      return 0
    fi
  done
  return 1
}

torch_from_index() {
  if [ "$OFFLINE" = 1 ]; then
    log "OFFLINE=1 and no torch wheel of the wheelhouse fits this platform ($(uname -m))"
    exit 2
  fi
  log "installing $TORCH_REQUIREMENT from $TORCH_INDEX_URL"
  pip install --index-url "$TORCH_INDEX_URL" "$TORCH_REQUIREMENT"
}

torch_from_system() {
  # no install: the torch of the system's site-packages must satisfy the requirement
  # (pip then keeps it: the constraint below pins its version)
  python - "$TORCH_REQUIREMENT" <<'PY' || exit 2
import importlib.metadata as md, sys
try:
    from packaging.requirements import Requirement
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement
req = Requirement(sys.argv[1])
try:
    version = md.version("torch")
except md.PackageNotFoundError:
    sys.exit("install-python-deps: TORCH_SOURCE=system but no torch is installed "
             "(a venv made with --system-site-packages over a distribution's torch?)")
if not req.specifier.contains(version, prereleases=True):
    sys.exit(f"install-python-deps: TORCH_SOURCE=system: the installed torch {version} "
             f"does not satisfy {req}")
print(f"install-python-deps: torch {version} from the system's site-packages", file=sys.stderr)
PY
}

dependency_list() {
  # the [project] dependencies of pyproject.toml, one requirement per line
  python3 - "$APP/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as fh:
    print("\n".join(tomllib.load(fh)["project"]["dependencies"]))
PY
}

phase=${1:-}
case "$phase" in
  deps) ;;
  list)
    dependency_list
    exit 0 ;;
  project)
    pip install --no-deps "${links[@]}" "${offline[@]}" "$APP"
    exit 0 ;;
  *) log "usage: $0 deps|list|project (got '$phase')"; exit 2 ;;
esac

case "$TORCH_SOURCE" in
  wheelhouse) torch_from_wheelhouse || { log "no torch wheel of $WHEELHOUSE fits this platform ($(uname -m))"; exit 2; } ;;
  index) torch_from_index ;;
  system) torch_from_system ;;
  auto) torch_from_wheelhouse || torch_from_index ;;
  *) log "TORCH_SOURCE=$TORCH_SOURCE is not allowed; allowed: auto, wheelhouse, index, system"; exit 2 ;;
esac

if [ -n "${DEPENDENCIES_FILE:-}" ]; then
  # the list the Dockerfile's dependency-list stage read from pyproject.toml
  cp "$DEPENDENCIES_FILE" /tmp/requirements.txt
else
  dependency_list >/tmp/requirements.txt
fi
# keep the torch installed above (a constraint, so pip fails instead of replacing it)
pip show torch | awk '/^Version:/ {print "torch==" $2}' >/tmp/constraints.txt
log "project dependencies: $(tr '\n' ' ' </tmp/requirements.txt)"
pip install "${links[@]}" "${offline[@]}" -c /tmp/constraints.txt -r /tmp/requirements.txt

if [ "$FORBID_NVIDIA" = 1 ] && pip list 2>/dev/null | grep -i '^nvidia-'; then
  log "nvidia-* packages were installed into the CPU image (see above)"
  exit 1
fi
rm -f /tmp/requirements.txt /tmp/constraints.txt
