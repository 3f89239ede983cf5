#!/usr/bin/env bash
# Idempotent machine setup for ckpt on Debian 12 (run as root).
#
# Installs the build tools, iptables, Open MPI, MPICH, Slurm + munge, and
# builds CRIU >= 4.1 from Debian's trixie source package with our fix for
# inet sockets on kernels >= 6.16 (scripts/criu/*.patch). A second run on a
# ready machine only checks and returns within seconds.
set -euo pipefail

CRIU_WANT=4.1.1
PREFIX=/usr/local
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC_ROOT=/var/cache/ckpt-bootstrap
STAMP=$PREFIX/share/ckpt/criu.stamp

log() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and CRIU)"
[ -r /etc/debian_version ] || die "this script supports Debian 12 only"

APT_PKGS=(
  build-essential pkg-config git curl ca-certificates xz-utils
  # CRIU build dependencies
  libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler
  python3-protobuf libnl-3-dev libnet1-dev libcap-dev libbsd-dev
  libgnutls28-dev uuid-dev libnftables-dev libaio-dev asciidoc-base
  # runtime: network lock for tcp_established, namespaces, tools
  iptables iproute2 util-linux procps psmisc e2fsprogs
  # MPI: Open MPI (default) and MPICH side by side; libclang for rsmpi
  openmpi-bin libopenmpi-dev mpich libmpich-dev libclang-dev clang
  # Slurm on one machine
  munge slurmctld slurmd slurm-client
  # agents started over SSH from a hostfile (ssh2 crate: libssh2 + OpenSSL)
  openssh-server openssh-client libssl-dev
)

need_pkgs=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$p")
done

# deb-src entry for trixie, derived from this machine's own Debian source.
add_trixie_src() {
  local f=/etc/apt/sources.list.d/ckpt-trixie-src.sources uri=""
  [ -f "$f" ] && return 0
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '$1=="deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
  fi
  [ -n "$uri" ] || die "cannot find this machine's Debian mirror in /etc/apt"
  cat >"$f" <<SRC
Types: deb-src
URIs: $uri
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  APT_UPDATED=0
}

APT_UPDATED=1
criu_ok() {
  [ -x $PREFIX/sbin/criu ] && [ -f "$STAMP" ] && \
    [ "$(cat "$STAMP")" = "$(criu_fingerprint)" ]
}
criu_fingerprint() {
  { echo "$CRIU_WANT"; cat "$HERE"/criu/*.patch; } | sha256sum | cut -d' ' -f1
}

if ! criu_ok; then add_trixie_src; APT_UPDATED=0; fi
if [ ${#need_pkgs[@]} -gt 0 ] || [ "$APT_UPDATED" = 0 ]; then
  log "apt-get update"
  apt-get update -qq
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing: ${need_pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

if ! criu_ok; then
  log "building CRIU $CRIU_WANT from Debian's source package"
  mkdir -p "$SRC_ROOT"
  cd "$SRC_ROOT"
  if ! ls criu_"$CRIU_WANT".orig.tar.* >/dev/null 2>&1; then
    apt-get source --download-only "criu/trixie" >/dev/null 2>&1 || true
    ls criu_"$CRIU_WANT".orig.tar.* >/dev/null 2>&1 || \
      die "could not download criu_$CRIU_WANT.orig.tar.* (apt-get source criu/trixie)"
  fi
  rm -rf "criu-$CRIU_WANT"
  tar xf criu_"$CRIU_WANT".orig.tar.*
  cd "criu-$CRIU_WANT"
  for p in "$HERE"/criu/*.patch; do
    log "applying $(basename "$p")"
    patch -p1 --forward <"$p" >/dev/null
  done
  make -j"$(nproc)" criu >build.log 2>&1 || { tail -30 build.log >&2; die "CRIU build failed (log: $PWD/build.log)"; }
  install -D -m 0755 criu/criu $PREFIX/sbin/criu
  mkdir -p "$(dirname "$STAMP")"
  criu_fingerprint >"$STAMP"
fi

# Debian's own criu 3.17 does not work on this kernel; make sure ours wins.
hash -r
CRIU_BIN=$(command -v criu || true)
[ "$CRIU_BIN" = "$PREFIX/sbin/criu" ] || die "criu on PATH is '$CRIU_BIN', expected $PREFIX/sbin/criu"
"$CRIU_BIN" check >/tmp/ckpt-criu-check.log 2>&1 || { cat /tmp/ckpt-criu-check.log >&2; die "criu check failed"; }
grep -q 'Looks good' /tmp/ckpt-criu-check.log || { cat /tmp/ckpt-criu-check.log >&2; die "criu check did not say 'Looks good'"; }
log "criu $("$CRIU_BIN" --version | awk '/Version/ {print $2}'): check OK"

# Rust toolchain is preinstalled on the machine image (rustup); verify.
command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
log "ready"
