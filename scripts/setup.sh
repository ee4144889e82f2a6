#!/usr/bin/env bash
# Installs what diskchain and its tests need on Debian 12, idempotently. Without root it only
# checks.
#
#   scripts/setup.sh          build and offline use: QEMU's tools (qemu-img, qemu-io,
#                             qemu-storage-daemon) and libvirt-dev (the libvirt backend links it)
#   scripts/setup.sh --live   also QEMU system emulation and libvirt (the live tests), and starts
#                             virtlogd and libvirtd when they are not running
#
# QEMU and libvirt come from bookworm-backports, so that the base suite's QEMU 7.2 never
# replaces a newer qemu-utils.
set -euo pipefail

# The URI of the apt source that serves the `bookworm` suite (deb822 `.sources` or one-line
# `.list` format), from the apt configuration directory $1 (the machine's own: /etc/apt).
debian_mirror() {
  local etc="${1:-/etc/apt}" f
  for f in "$etc"/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    awk 'BEGIN{RS=""; FS="\n"}
      { uris=""; suites=""; types="";
        for (i=1;i<=NF;i++) {
          if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); uris=$i }
          if ($i ~ /^Suites:/) { sub(/^Suites:[ \t]*/, "", $i); suites=" " $i " " }
          if ($i ~ /^Types:/) { types=$i }
        }
        if (types ~ /deb( |$)/ && suites ~ / bookworm /) { split(uris, u, /[ \t]+/); print u[1]; exit }
      }' "$f"
  done | head -1 | grep . && return
  # One-line sources; only the files that exist (an unmatched glob or a missing sources.list
  # must not fail the pipeline: under `pipefail` that exited the script with no word).
  for f in "$etc"/sources.list "$etc"/sources.list.d/*.list; do
    if [ -r "$f" ]; then cat "$f"; fi
  done \
    | awk '$1=="deb" { n=2; if ($2 ~ /^\[/) { while ($n !~ /\]$/) n++; n++ } if ($(n+1)=="bookworm") { print $n; exit } }'
  return 0
}

no_mirror() {
  echo "setup: no apt source for the bookworm suite found in ${1:-/etc/apt}/sources.list{,.d/}; add bookworm-backports from your mirror and rerun" >&2
  exit 1
}

# `setup.sh --mirror [DIR]`: print the mirror found in DIR (default /etc/apt) and do nothing else.
if [ "${1:-}" = "--mirror" ]; then
  m="$(debian_mirror "${2:-/etc/apt}")"
  [ -n "$m" ] || no_mirror "${2:-/etc/apt}"
  echo "$m"
  exit 0
fi

live=false
[ "${1:-}" = "--live" ] && live=true

need=(qemu-img qemu-io qemu-storage-daemon pkg-config)
$live && need+=(qemu-system-x86_64 virsh libvirtd virtlogd)
missing=()
for t in "${need[@]}"; do command -v "$t" >/dev/null || missing+=("$t"); done
pkg-config --exists libvirt 2>/dev/null || missing+=(libvirt-dev)

if [ "$(id -u)" -ne 0 ]; then
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: missing ${missing[*]}; run as root (or: sudo apt-get install -t bookworm-backports qemu-utils libvirt-dev pkg-config, and for the live tests qemu-system-x86 libvirt-daemon-system libvirt-clients)" >&2
    exit 1
  fi
else
  export DEBIAN_FRONTEND=noninteractive
  if [ -r /etc/os-release ] && . /etc/os-release && [ "${VERSION_CODENAME:-}" = bookworm ]; then
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      # Backports come from the same mirror the machine already uses for bookworm: operators
      # have their own mirrors, and this script names none.
      mirror="$(debian_mirror)"
      [ -n "$mirror" ] || no_mirror
      cat > /etc/apt/sources.list.d/bookworm-backports.sources <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    target=(-t bookworm-backports)
  else
    target=()
  fi
  apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    pkgs=(qemu-utils libvirt-dev pkg-config)
    $live && pkgs+=(qemu-system-x86 libvirt-daemon-system libvirt-clients)
    apt-get install -y -qq "${target[@]}" "${pkgs[@]}"
  fi
  # The tests compare checksums with sha256sum.
  command -v sha256sum >/dev/null || apt-get install -y -qq coreutils
fi

if $live; then
  # The Kubernetes scenarios (tests/kube) run a test API server written in Python with PyYAML.
  if ! python3 -c 'import yaml' 2>/dev/null; then
    python3 -m pip install --quiet pyyaml || { echo "setup: cannot install PyYAML for python3 (pip install pyyaml)" >&2; exit 1; }
  fi
fi

if $live; then
  # No init system is assumed (containers, CI): start the daemons directly when they are not up.
  if [ "$(id -u)" -eq 0 ]; then
    pgrep -x virtlogd >/dev/null || virtlogd -d
    pgrep -x libvirtd >/dev/null || libvirtd -d
  fi
  for _ in $(seq 1 50); do
    virsh -c qemu:///system version >/dev/null 2>&1 && break
    sleep 0.2
  done
  virsh -c qemu:///system version >/dev/null || { echo "setup: libvirtd does not answer on qemu:///system" >&2; exit 1; }
  echo "setup: $(virsh -c qemu:///system version | grep -i 'running hypervisor')"
fi
echo "setup: $(qemu-img --version | head -1)"
