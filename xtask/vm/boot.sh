#!/bin/bash
# Boots KERNEL with INITRD (build-initramfs.sh) in QEMU, runs one command inside, in the
# host's root filesystem (shared read-only over 9p, writable through a RAM overlay, so
# nothing the guest does reaches the host), streams its output and exits with its code.
# Usage: boot.sh KERNEL INITRD RUNDIR cmd [args...]   (cwd inside = the caller's cwd)
# RUNDIR (empty or new) is shared with the guest: cmd.sh, rc, uname, dmesg.txt,
# console.log end up there.  Exit code: the command's; 124 on timeout; 125 if the VM
# died before the command finished.
# Knobs: VM_CPUS (2) VM_MEM (MiB, 2048) VM_ACCEL (tcg) VM_CPU (max) VM_TIMEOUT (s, 3600)
#        VM_VERBOSE=1 (whole console, not just the command's output)
set -u
[ $# -ge 4 ] || { echo "usage: $0 KERNEL INITRD RUNDIR cmd [args...]" >&2; exit 2; }
kernel=$1 initrd=$2 run=$3; shift 3
mkdir -p "$run"; rm -f "$run"/{rc,uname,dmesg.txt,console.log}
{ printf 'cd %q 2>/dev/null || cd /\nexec' "$PWD"; printf ' %q' "$@"; printf '\n'; } > "$run/cmd.sh"
accel=${VM_ACCEL:-tcg} timeout=${VM_TIMEOUT:-3600}
# mawk block-buffers a pipe unless told otherwise: without this the output would not stream.
awkopt=; awk -W version 2>&1 | grep -qi mawk && awkopt="-W interactive"
echo "[vm] accel=$accel smp=${VM_CPUS:-2} mem=${VM_MEM:-2048}M timeout=${timeout}s run=$run" >&2
# The console goes to console.log; awk prints the command's output (between the markers)
# to stdout and the init's VMINIT: notes to stderr.
timeout -k 10 "$timeout" qemu-system-x86_64 -machine "q35,accel=$accel" -cpu "${VM_CPU:-max}" \
  -smp "${VM_CPUS:-2}" -m "${VM_MEM:-2048}" -kernel "$kernel" -initrd "$initrd" \
  -append "console=ttyS0 quiet panic=-1" -nographic -no-reboot -nic none \
  -virtfs local,path=/,mount_tag=root,security_model=none,readonly=on,multidevs=remap \
  -virtfs "local,path=$run,mount_tag=run,security_model=none" \
  </dev/null 2>&1 | tee "$run/console.log" | awk $awkopt -v v="${VM_VERBOSE:-0}" '
    { sub(/\r$/, "") }
    /^=====BEGIN OUTPUT=====$/ { on = 1; if (!v) next }
    /^=====END OUTPUT=====$/   { on = 0; if (!v) next }
    { if (on || v) { print; fflush() }
      else if (/VMINIT:/) { sub(/^.*VMINIT:/, "[vm]"); print > "/dev/stderr"; fflush("/dev/stderr") } }'
qrc=${PIPESTATUS[0]}
if [ -s "$run/rc" ]; then exit "$(cat "$run/rc")"; fi
if [ "$qrc" -eq 124 ] || [ "$qrc" -eq 137 ]; then echo "[vm] timeout after ${timeout}s" >&2; exit 124; fi
echo "[vm] the VM stopped before the command finished (qemu: $qrc); see $run/console.log" >&2
exit 125
