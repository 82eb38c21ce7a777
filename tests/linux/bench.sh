#!/bin/busybox sh
# /init of `cargo xtask bench linux` (image `initramfs-bench`): the harness times the kernel's
# "Run /init" line; this only says so and powers off.
/bin/busybox mount -t proc proc /proc
echo "bench: /init at $(/bin/busybox cut -d' ' -f1 /proc/uptime) s of uptime"
# Let the line leave the serial port before the kernel's own power-off messages.
/bin/busybox sleep 1
/bin/busybox poweroff -f
