#!/bin/bash
# Builds the VM's initramfs: static busybox, our init, and the kernel modules needed to
# mount the host's root over 9p under a RAM overlay (with their dependencies, in load
# order, resolved with kmod's modinfo from the kernel package's own .ko files).
# Usage: build-initramfs.sh KERNEL_TREE OUT.gz   (KERNEL_TREE = a `dpkg-deb -x` of a
# linux-image package).  Needs busybox-static, kmod, cpio.
set -euo pipefail
tree=$1 out=$2
here=$(cd "$(dirname "$0")" && pwd)
kver=$(ls "$tree/lib/modules")
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{bin,dev,proc,sys,run,mnt,lib/modules}
cp /bin/busybox "$work/bin/busybox"
cp "$here/init" "$work/init"; chmod 755 "$work/init"
declare -A seen
add() {  # add MODULE after its dependencies; append it to the load list
  local m=$1 f dep
  [ -n "${seen[$m]:-}" ] && return; seen[$m]=1
  f=$(find "$tree/lib/modules/$kver" -name "$m.ko*" | head -1)
  [ -n "$f" ] || { echo "module $m not in $tree" >&2; exit 1; }
  for dep in $(modinfo -F depends "$f" | tr , ' '); do add "$dep"; done
  case $f in *.xz) xz -dc "$f" ;; *.zst) zstd -dcq "$f" ;; *) cat "$f" ;; esac > "$work/lib/modules/$m.ko"
  echo "$m" >> "$work/lib/modules/load"
}
for m in virtio_pci 9pnet_virtio 9p overlay; do add "$m"; done
(cd "$work" && find . | cpio -o -H newc --quiet) | gzip -9 > "$out.tmp"
mv "$out.tmp" "$out"
