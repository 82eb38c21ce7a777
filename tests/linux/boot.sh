#!/bin/busybox sh
# /init of the `linux-boot` scenario (image `initramfs-boot`, built by xtask from this file with
# a static busybox): checks what a Linux guest sees of muxvisor's platform, then powers off.
# Every check prints `linux-check: ok: WHAT` or `linux-check: FAILED: WHAT`; the last line before
# power-off is `linux-check: N failed`.
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o size=48m tmpfs /tmp

echo "linux-check: /init started at $(cut -d' ' -f1 /proc/uptime) s of uptime"
failed=0
check() {
    if eval "$2"; then
        echo "linux-check: ok: $1"
    else
        echo "linux-check: FAILED: $1"
        failed=$((failed + 1))
    fi
}

check "/proc/cpuinfo shows the hypervisor flag" 'grep -qw hypervisor /proc/cpuinfo'
echo "linux-check: $(grep -m1 'cpuid level' /proc/cpuinfo); TSC flags:$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(tsc|constant_tsc|nonstop_tsc|tsc_known_freq|tsc_deadline_timer|x2apic)$' | tr '\n' ' ')"
clocksource=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)
echo "linux-check: clocksource $clocksource (available: $(cat /sys/devices/system/clocksource/clocksource0/available_clocksource))"
check "the clocksource is the TSC" '[ "$clocksource" = tsc ]'

# Timer interrupts: IRQ 0 (the PIT through the 8259 or the IOAPIC) and LOC (local APIC timers).
timer_interrupts() {
    awk '$1 == "0:" || $1 == "LOC:" { n += $2 } END { print n + 0 }' /proc/interrupts
}
before=$(timer_interrupts)
sleep 1
after=$(timer_interrupts)
echo "linux-check: timer interrupts $before, 1 s later $after"
check "the timer interrupt count rises" '[ "$after" -gt "$before" ]'

# 16 MiB through tmpfs: 64 copies of 256 KiB of random bytes written by one `cat` (random data,
# and a process per copy, cost the emulated CPU far more than copying), with the MD5 of
# what was written, then of what reads back.
t0=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/urandom of=/tmp/seed bs=64k count=4 2>/dev/null
ts=$(cut -d' ' -f1 /proc/uptime)
set --
for i in $(seq 64); do set -- "$@" /tmp/seed; done
written=$(cat "$@" | tee /tmp/data | md5sum | cut -d" " -f1)
t1=$(cut -d' ' -f1 /proc/uptime)
read_back=$(md5sum < /tmp/data | cut -d" " -f1)
t2=$(cut -d' ' -f1 /proc/uptime)
echo "linux-check: 256 KiB random in $(awk "BEGIN { print $ts - $t0 }") s, 16 MiB written and summed (MD5) in $(awk "BEGIN { print $t1 - $ts }") s, summed again in $(awk "BEGIN { print $t2 - $t1 }") s"
check "16 MiB written to tmpfs read back intact ($written)" '[ "$written" = "$read_back" ] && [ "$(wc -c < /tmp/data)" -eq 16777216 ]'
rm -f /tmp/data /tmp/seed

echo "linux-check: $failed failed"
poweroff -f
