#!/usr/bin/env bash
# arm64 (edge) SuperNodes on an amd64 host: QEMU user emulation and a local arm64
# base image, for the edge pilot's image (docker/Dockerfile.edge) and its test.
#
#   docker/edge-emulation.sh enable   # as root: qemu-user-static + binfmt_misc (F flag)
#   docker/edge-emulation.sh base     # as root: the arm64 base image (about 30 min once)
#   docker/edge-emulation.sh start    # both, idempotent; then the Docker engine's exports
#   docker/edge-emulation.sh status   # exit 0 when emulation runs and the base image exists
#
# Why a local base image: PyPI's torch wheels for aarch64 are CUDA builds that import
# only with several GB of nvidia-* packages, and pip under emulation takes minutes per
# large wheel. Debian trixie's arm64 `python3-torch` (2.6, a CPU build, Python 3.13)
# is the CPU torch that installs here, from the same Debian mirror the host's apt
# uses. So the base image is a Debian trixie arm64 root file system made with
# debootstrap, with python3, python3-torch and python3-numpy from Debian, imported as
# `localhost/bastion-edge-base:trixie` (platform linux/arm64). The edge Dockerfile
# installs Flower and Bastion into a venv over it (`--system-site-packages`).
#
# Why the F ("fix binary") flag: the kernel opens the interpreter when the format is
# registered, so qemu-aarch64-static runs inside containers and chroots that do not
# contain it. Without F, every arm64 RUN step and container fails with "exec format
# error" or "no such file".
#
# The Docker engine is the one docker/dev-engine.sh starts (or the host's own when
# DOCKER_HOST points at one). BASTION_EDGE_BASE_IMAGE names the image (default
# localhost/bastion-edge-base:trixie).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${BASTION_DOCKER_ROOT:-/var/lib/bastion-docker}
EDGE_BASE_IMAGE=${BASTION_EDGE_BASE_IMAGE:-localhost/bastion-edge-base:trixie}
BINFMT=/proc/sys/fs/binfmt_misc
QEMU=/usr/bin/qemu-aarch64-static
SUITE=trixie
PACKAGES=python3,python3-venv,python3-pip,python3-torch,python3-numpy,ca-certificates

log() { echo "edge-emulation: $*" >&2; }
die() { log "$*"; exit 1; }
# shellcheck source=docker/host-tools.sh
. "$HERE/host-tools.sh"

need_root() {
  [ "$(id -u)" -eq 0 ] || die "needs root (it installs qemu-user-static and registers binfmt_misc)"
}

emulation_runs() {
  # registered, enabled, with the F flag (so it works inside containers)
  [ -f "$BINFMT/qemu-aarch64" ] && grep -q '^enabled' "$BINFMT/qemu-aarch64" \
    && grep -q '^flags:.*F' "$BINFMT/qemu-aarch64"
}

enable_emulation() {
  if [ "$(uname -m)" = aarch64 ]; then
    log "this host is arm64: no emulation needed"
    return
  fi
  if emulation_runs; then
    log "aarch64 emulation is already registered with the F flag"
    return
  fi
  need_root
  [ -x "$QEMU" ] || { log "installing Debian's qemu-user-static"; apt_install qemu-user-static; }
  [ -f "$BINFMT/register" ] || mount -t binfmt_misc binfmt_misc "$BINFMT" \
    || die "cannot mount binfmt_misc at $BINFMT (a container without privileges?)"
  if [ -f "$BINFMT/qemu-aarch64" ]; then
    # registered by someone else without the F flag: replace it
    echo -1 >"$BINFMT/qemu-aarch64"
  fi
  local conf=/usr/lib/binfmt.d/qemu-aarch64.conf line magic mask
  [ -f "$conf" ] || die "$conf is missing; qemu-user-static did not install its binfmt entry"
  # the conf line is :name:type:offset:magic:mask:interpreter:flags
  line=$(grep -v '^#' "$conf" | head -n 1)
  magic=$(echo "$line" | cut -d: -f5)
  mask=$(echo "$line" | cut -d: -f6)
  echo ":qemu-aarch64:M::$magic:$mask:$QEMU:F" >"$BINFMT/register"
  emulation_runs || die "registering qemu-aarch64 in $BINFMT failed"
  log "aarch64 emulation registered (interpreter $QEMU, flags F)"
}

engine_env() {
  if [ -z "${DOCKER_HOST:-}" ] || ! docker info >/dev/null 2>&1; then
    eval "$("$HERE/dev-engine.sh" start)"
  fi
}

make_base_image() {
  local arch
  arch=$(docker image inspect --format '{{.Architecture}}' "$EDGE_BASE_IMAGE" 2>/dev/null || true)
  if [ "$arch" = arm64 ]; then
    log "$EDGE_BASE_IMAGE exists"
    return
  elif [ -n "$arch" ]; then
    log "$EDGE_BASE_IMAGE is an $arch image, not arm64: building it again"
    docker image rm "$EDGE_BASE_IMAGE" >/dev/null
  fi
  need_root
  command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
  [ -f "/usr/share/debootstrap/scripts/$SUITE" ] \
    || die "this debootstrap does not know Debian $SUITE (install debootstrap >= 1.0.128)"
  local mirror rootfs=$ROOT/edge-rootfs start
  mirror=$(debian_mirror)
  mirror=${mirror:-http://deb.debian.org/debian}
  start=$(date +%s)
  log "building $EDGE_BASE_IMAGE: debootstrap --arch=arm64 $SUITE from $mirror (emulated: about 30 min)"
  rm -rf "$rootfs"
  mkdir -p "$ROOT"
  debootstrap --arch=arm64 --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" >&2 \
    || { tail -n 30 "$rootfs/debootstrap/debootstrap.log" >&2 2>/dev/null; die "debootstrap failed"; }
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror $SUITE main
EOF
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$rootfs/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >&2
  fi
  # byte-compile torch once here: the first `import torch` under emulation otherwise
  # spends a minute and a half compiling (measured), in every fresh container
  chroot "$rootfs" python3 -c 'import compileall, sys; compileall.compile_dir("/usr/lib/python3/dist-packages", quiet=1, workers=1)' >&2 || true
  chroot "$rootfs" apt-get clean
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  : >"$rootfs/etc/resolv.conf"
  rm -rf "$ROOT/edge-image" && mkdir -p "$ROOT/edge-image/layer"
  tar -C "$rootfs" -cf "$ROOT/edge-image/layer/layer.tar" .
  rm -rf "$rootfs"
  load_arm64_image "$ROOT/edge-image" "$EDGE_BASE_IMAGE"
  log "$EDGE_BASE_IMAGE built in $(( $(date +%s) - start )) s"
}

load_arm64_image() {
  # DIR/layer/layer.tar (a root file system) -> the image TAG, architecture arm64.
  # Not `docker import --platform linux/arm64`: Docker's classic image store ignores
  # that flag and records the host's architecture (amd64), after which every
  # `FROM`/`run --platform linux/arm64` looks for another image. So this writes the
  # image archive `docker load` reads (manifest.json, the image config with
  # "architecture": "arm64", the layer) by hand.
  local dir=$1 tag=$2 diff cfg now
  diff=$(sha256sum "$dir/layer/layer.tar" | cut -d' ' -f1)
  now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  cat >"$dir/config.json" <<EOF
{"architecture":"arm64","os":"linux","created":"$now",
 "config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","LANG=C.UTF-8"],"Cmd":["python3"]},
 "rootfs":{"type":"layers","diff_ids":["sha256:$diff"]},
 "history":[{"created":"$now","created_by":"docker/edge-emulation.sh: debootstrap --arch=arm64 $SUITE with $PACKAGES"}]}
EOF
  cfg=$(sha256sum "$dir/config.json" | cut -d' ' -f1)
  mv "$dir/config.json" "$dir/$cfg.json"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["layer/layer.tar"]}]\n' \
    "$cfg" "$tag" >"$dir/manifest.json"
  tar -C "$dir" -c manifest.json "$cfg.json" layer | docker load >&2
  rm -rf "$dir"
  [ "$(docker image inspect --format '{{.Architecture}}' "$tag")" = arm64 ] \
    || die "$tag was loaded, but not as an arm64 image"
}

case "${1:-}" in
  enable)
    enable_emulation
    ;;
  base)
    enable_emulation
    engine_env
    make_base_image
    ;;
  start)
    enable_emulation
    engine_env
    make_base_image
    echo "export DOCKER_HOST=$DOCKER_HOST DOCKER_CONFIG=$DOCKER_CONFIG"
    ;;
  status)
    [ "$(uname -m)" = aarch64 ] || emulation_runs || { log "aarch64 emulation is not registered (run: $0 enable)"; exit 1; }
    eval "$("$HERE/dev-engine.sh" status)" || { log "the Docker engine is not ready (run: $0 start)"; exit 1; }
    [ "$(docker image inspect --format '{{.Architecture}}' "$EDGE_BASE_IMAGE" 2>/dev/null)" = arm64 ] \
      || { log "no arm64 $EDGE_BASE_IMAGE (run: $0 base)"; exit 1; }
    echo "export DOCKER_HOST=$DOCKER_HOST DOCKER_CONFIG=$DOCKER_CONFIG"
    ;;
  *)
    echo "usage: $0 enable|base|start|status" >&2
    exit 2
    ;;
esac
