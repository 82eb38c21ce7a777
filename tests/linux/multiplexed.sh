#!/bin/busybox sh
# /init of the `linux-multiplexed` scenario (image `initramfs-multiplexed`): writes a working
# set to tmpfs, idles while muxvisor's memory engine shares, patches and compresses the VM's
# pages, then checks every byte and halts (the scenario boots with acpi=off: no power-off).
# Lines: `linux-mux: ok: WHAT`, `linux-mux: FAILED: WHAT`, and last `linux-mux: N failed`.
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o size=48m tmpfs /tmp

wait_s=20
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        mux.wait=*) wait_s="${arg#mux.wait=}" ;;
    esac
done
echo "linux-mux: /init started at $(cut -d' ' -f1 /proc/uptime) s of uptime"
failed=0
check() {
    if eval "$2"; then
        echo "linux-mux: ok: $1"
    else
        echo "linux-mux: FAILED: $1"
        failed=$((failed + 1))
    fi
}

# The working set: 4 MiB of this VM's own random bytes (16 copies of 256 KiB: pages the engine
# can share within the VM) and 4 MiB the two VMs have in common (copies of busybox).
dd if=/dev/urandom of=/tmp/seed bs=64k count=4 2>/dev/null
for i in $(seq 16); do cat /tmp/seed; done > /tmp/own
for i in 1 2; do cat /bin/busybox /bin/busybox; done | head -c 4194304 > /tmp/common
before=$(cat /tmp/own /tmp/common | md5sum | cut -d' ' -f1)
echo "linux-mux: wrote 8 MiB ($before); idling $wait_s s"
sleep "$wait_s"
after=$(cat /tmp/own /tmp/common | md5sum | cut -d' ' -f1)
check "the 8 MiB working set reads back intact after $wait_s s ($after)" '[ "$before" = "$after" ]'
# Touch everything once more, so pages the engine compressed or patched come back on demand.
check "busybox still runs from its (shared) pages" 'busybox true'

echo "linux-mux: $failed failed"
halt -f
