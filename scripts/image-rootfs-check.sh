#!/usr/bin/env bash
# Reproduces the runtime stage of the Dockerfile without a container engine: a minimal Debian 12
# root made with debootstrap (from the mirror this machine's apt sources use), scripts/setup.sh
# run in it, the release binary copied in, and a plan applied to a small chain inside it.
# Needs root, debootstrap and the network to the mirror. Not part of the tests.
#
#   sudo scripts/image-rootfs-check.sh [ROOT]      (ROOT defaults to a new directory in /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-$(mktemp -d /tmp/diskchain-rootfs.XXXXXX)}"
mirror="$(scripts/setup.sh --mirror)"
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
[ -x "$root/bin/sh" ] || debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
cargo build --release -q -p diskchain --bin diskchain
cp /etc/resolv.conf "$root/etc/"
install -D scripts/setup.sh "$root/usr/local/lib/diskchain/setup.sh"
install -D target/release/diskchain "$root/usr/local/bin/diskchain"
mount -t proc proc "$root/proc"
trap 'umount "$root/proc"' EXIT
chroot "$root" /usr/local/lib/diskchain/setup.sh
chroot "$root" sh -euc '
  ldd /usr/local/bin/diskchain | grep "not found" && exit 1
  rm -rf /var/lib/img /tmp/st && mkdir -p /var/lib/img && cd /var/lib/img
  qemu-img create -q -f qcow2 base.qcow2 64M
  qemu-io -c "write -P 1 0 4M" base.qcow2 >/dev/null
  qemu-img create -q -f qcow2 -F qcow2 -b base.qcow2 top.qcow2
  qemu-io -c "write -P 2 8M 1M" top.qcow2 >/dev/null
  before=$(qemu-img convert -O raw top.qcow2 /tmp/v && sha256sum </tmp/v)
  printf "apiVersion: diskchain.dev/v1alpha1\nkind: DiskChain\nmetadata:\n  name: vda\nspec:\n  source:\n    file: /var/lib/img/top.qcow2\n  snapshots: []\n" >/tmp/s.yaml
  diskchain --allowed-root /var/lib/img --state-dir /tmp/st apply -f /tmp/s.yaml
  diskchain --allowed-root /var/lib/img --state-dir /tmp/st status
  after=$(qemu-img convert -O raw top.qcow2 /tmp/v && sha256sum </tmp/v)
  [ "$before" = "$after" ] || { echo "the view changed" >&2; exit 1; }
  qemu-img info top.qcow2 | grep -q "backing file" && { echo "not flattened" >&2; exit 1; }
  qemu-img check -q top.qcow2
  diskchain crd >/dev/null
'
echo "image-rootfs-check: the runtime stage works in $root"
