#!/bin/busybox sh
# /init of the `linux-crash` scenario (image `initramfs-crash`): crashes the kernel on purpose
# (sysrq `c`), as a guest's bug would; with `panic=-1` the kernel then resets the machine.
/bin/busybox mount -t proc proc /proc
echo "crash: crashing the kernel now"
echo c > /proc/sysrq-trigger
echo "crash: still alive (the crash did not happen)"
