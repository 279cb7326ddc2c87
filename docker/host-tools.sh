# Shell functions shared by docker/dev-engine.sh and docker/edge-emulation.sh (sourced,
# not run). The caller defines log() and die().

# apt-get install PACKAGES, updating the package lists once when the first try fails
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "no apt-get here: install $* yourself"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
  fi
}

# the first Debian mirror of this host's apt sources (deb822 or one-line format)
debian_mirror() {
  local files=() f
  for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    if [ -f "$f" ]; then files+=("$f"); fi
  done
  [ ${#files[@]} -gt 0 ] || return 0
  awk '$1 == "URIs:" || $1 == "deb" {
         for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\/.*\/debian\/?$/) { print $i; exit }
       }' "${files[@]}"
}
