#!/usr/bin/env bash
# Installs what diskchain and its tests need on Debian 12, idempotently: QEMU's tools
# (qemu-img, qemu-io, qemu-storage-daemon) from bookworm-backports, so that the base suite's
# QEMU 7.2 never replaces a newer qemu-utils. Without root it only checks.
set -euo pipefail

need=(qemu-img qemu-io qemu-storage-daemon)
missing=()
for t in "${need[@]}"; do command -v "$t" >/dev/null || missing+=("$t"); done

if [ "$(id -u)" -ne 0 ]; then
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: missing ${missing[*]}; run as root (or: sudo apt-get install -t bookworm-backports qemu-utils qemu-block-extra)" >&2
    exit 1
  fi
  exit 0
fi

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
  apt-get install -y -qq "${target[@]}" qemu-utils
fi
# The tests compare checksums with sha256sum and use git-style directory swaps.
command -v sha256sum >/dev/null || apt-get install -y -qq coreutils
echo "setup: $(qemu-img --version | head -1)"
