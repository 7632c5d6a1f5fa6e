#!/bin/sh
# fcvm initrd /init (busybox sh, PID 1).
# Loads the virtio/vsock/fuse/overlay modules, mounts the read-only root ext4 under a
# tmpfs overlay and switch_roots to the agent. Never hangs: any fatal failure prints
# one "fcvm-init: ..." line on the console and powers the VM off.
# Kernel command line: fcvm.init=PATH (program to exec in the new root, default
# /usr/sbin/fcvm-agent), fcvm.root=DEV (default /dev/vda), fcvm.rootwait=SECONDS
# (default 10), fcvm.break=1 (shell in the initrd before switch_root),
# fcvm.debug=1 (timings).
PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH

die() {
	echo "fcvm-init: $*" >/dev/console 2>/dev/null || echo "fcvm-init: $*"
	sync
	poweroff -f
	reboot -f
	echo o >/proc/sysrq-trigger
	exit 1
}

mount -t proc -o nosuid,nodev,noexec proc /proc || die "cannot mount /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || die "cannot mount /sys"
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || die "cannot mount /dev"

init=/usr/sbin/fcvm-agent
root=/dev/vda
rootwait=10
brk=
debug=
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	fcvm.init=*) init="${arg#fcvm.init=}" ;;
	fcvm.root=*) root="${arg#fcvm.root=}" ;;
	fcvm.rootwait=*) rootwait="${arg#fcvm.rootwait=}" ;;
	fcvm.break=1) brk=1 ;;
	fcvm.debug=1) debug=1 ;;
	esac
done

log() { [ -n "$debug" ] && echo "fcvm-init: [$(cut -d' ' -f1 /proc/uptime)] $*"; }
log "start"

kver=$(uname -r)
haspci=
set -- /sys/bus/pci/devices/*
[ -e "$1" ] && haspci=1
# fcvm-load-order: "<module name> <path relative to /lib/modules/$kver> [pci]" in load order
if [ -f "/lib/modules/$kver/fcvm-load-order" ]; then
	while read -r name ko tag; do
		[ -n "$ko" ] || continue
		[ "$tag" = pci ] && [ -z "$haspci" ] && continue # no PCI bus (pci=off, microvm)
		[ -d "/sys/module/$name" ] && continue                # loaded or built in
		insmod "/lib/modules/$kver/$ko" 2>/dev/null ||
			echo "fcvm-init: warning: could not load $name"
	done <"/lib/modules/$kver/fcvm-load-order"
else
	echo "fcvm-init: warning: no modules for kernel $kver in the initrd"
fi
log "modules loaded"

n=0
limit=$((rootwait * 100))
while [ ! -b "$root" ]; do
	n=$((n + 1))
	[ "$n" -gt "$limit" ] && die "root device $root did not appear within ${rootwait}s"
	usleep 10000
done
log "$root present"

mkdir -p /lower /upper /newroot
mount -t ext4 -o ro "$root" /lower || die "cannot mount $root (ext4, read-only)"
mount -t tmpfs -o mode=0755 tmpfs /upper || die "cannot mount the tmpfs for the overlay"
mkdir -p /upper/upper /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/upper,workdir=/upper/work overlay /newroot ||
	die "cannot mount the overlay root"
log "overlay root mounted"

[ -x "/newroot$init" ] || [ -L "/newroot$init" ] || die "init $init not found in the root filesystem"

if [ -n "$brk" ]; then
	echo "fcvm-init: fcvm.break=1: initrd shell; exit it to continue"
	sh </dev/console >/dev/console 2>&1
fi

log "switch_root to $init"
mount --move /dev /newroot/dev || die "cannot move /dev"
mount --move /sys /newroot/sys || die "cannot move /sys"
mount --move /proc /newroot/proc || die "cannot move /proc"
exec switch_root /newroot "$init"
die "switch_root to $init failed"
