#!/bin/busybox sh
# /init of the Linux demo (examples/linux.toml, image `initramfs-shell`): a busybox shell on the
# serial console. Type `NAME: command` on muxvisor's console to reach VM NAME's shell;
# `poweroff -f` turns the VM off.
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
hostname "$(sed -n 's/.*muxvisor.name=\([^ ]*\).*/\1/p' /proc/cmdline)"
echo "$(hostname): Linux $(uname -r) is up after $(cut -d' ' -f1 /proc/uptime) s; shell ready (type '$(hostname): poweroff -f' to stop)"
exec setsid cttyhack sh -i
