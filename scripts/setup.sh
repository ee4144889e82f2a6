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
      cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
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
