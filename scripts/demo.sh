#!/usr/bin/env bash
# The main job on local files: builds diskchain, creates small demo chains with qemu-img under
# ./demo (once), renders the example specs from specs/ to point there, then runs `diskchain
# plan`, `diskchain apply` and `diskchain status` on them, takes a backup of the disk whose spec
# has a backup policy, lists the repository and verifies it. Nothing outside ./demo is touched.
# Run it again: the chains already match, so the plan is empty and apply does nothing, and the
# backup is an incremental holding only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q -p diskchain
bin=target/release/diskchain
demo="${DISKCHAIN_DEMO_DIR:-$PWD/demo}"
img="$demo/images"

if [ ! -e "$img/web01.qcow2" ]; then
  mkdir -p "$img" "$demo/fast"
  q() { qemu-io -f qcow2 "$@" >/dev/null; }
  # A golden base shared by two disks.
  qemu-img create -q -f qcow2 "$img/golden.qcow2" 1G
  q -c "write -P 0x11 0 48M" "$img/golden.qcow2"
  # web01: golden <- web01-base <- web01-before-upgrade <- web01-weekly <- web01 (active)
  prev="$img/golden.qcow2"
  for layer in web01-base web01-before-upgrade web01-weekly web01; do
    qemu-img create -q -f qcow2 -b "$prev" -F qcow2 "$img/$layer.qcow2"
    prev="$img/$layer.qcow2"
  done
  q -c "write -P 0x21 0 24M" "$img/web01-base.qcow2"
  q -c "write -P 0x22 8M 4M" -c "write -z 40M 8M" "$img/web01-before-upgrade.qcow2"
  q -c "write -P 0x23 0 2M" "$img/web01-weekly.qcow2"
  q -c "write -P 0x24 100M 1M" "$img/web01.qcow2"
  # db01: golden <- db01-monday <- db01 (active), to be moved to ./demo/fast
  qemu-img create -q -f qcow2 -b "$img/golden.qcow2" -F qcow2 "$img/db01-monday.qcow2"
  q -c "write -P 0x31 0 16M" "$img/db01-monday.qcow2"
  qemu-img create -q -f qcow2 -b "$img/db01-monday.qcow2" -F qcow2 "$img/db01.qcow2"
  q -c "write -P 0x32 4M 1M" "$img/db01.qcow2"
fi

# The example specs name /var/lib/diskchain/...; point them at ./demo. (specs/live/ needs a
# libvirt domain and is left out.)
rm -rf "$demo/specs"
mkdir -p "$demo/specs"
(cd specs && find . -path ./live -prune -o -name '*.yaml' -print0 | while IFS= read -r -d '' f; do
  mkdir -p "$demo/specs/$(dirname "$f")"
  sed "s#/var/lib/diskchain/images#$img#g; s#/var/lib/diskchain/backups#$demo/backups#g; s#/srv/fast#$demo/fast#g" "$f" > "$demo/specs/$f"
done)

dc() { "$bin" --allowed-root "$demo" --state-dir "$demo/state" "$@"; }
echo "+ diskchain plan -f demo/specs --allowed-root demo --state-dir demo/state"
dc plan -f "$demo/specs"
echo
echo "+ diskchain apply -f demo/specs --allowed-root demo --state-dir demo/state"
dc apply -f "$demo/specs"
echo
echo "+ diskchain status --state-dir demo/state"
dc status
echo
echo "+ diskchain backup -f demo/specs --allowed-root demo --state-dir demo/state"
dc backup -f "$demo/specs"
echo
echo "+ diskchain backups -f demo/specs --allowed-root demo --state-dir demo/state"
dc backups -f "$demo/specs"
echo
echo "+ diskchain verify --deep -f demo/specs --allowed-root demo --state-dir demo/state"
dc verify --deep -f "$demo/specs"
