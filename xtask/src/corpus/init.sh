#!/bin/busybox sh
# /init of the corpus guests (built into the initramfs by `cargo xtask corpus`).
#
# Runs one workload chosen on the kernel command line (corpus_workload=..., corpus_seed=...),
# lets the kernel settle, then prints the marker the host waits for. The host then stops QEMU
# through its monitor, so the file-backed guest RAM holds exactly the state after the marker.
/bin/busybox mkdir -p /proc /sys /dev /tmp /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o size=75% tmpfs /tmp

workload=idle
seed=1
settle=10
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        corpus_workload=*) workload="${arg#corpus_workload=}" ;;
        corpus_seed=*) seed="${arg#corpus_seed=}" ;;
        corpus_settle=*) settle="${arg#corpus_settle=}" ;;
    esac
done
echo "CORPUS-START workload=$workload seed=$seed"

# Generates about $1 KiB of English-like text, deterministic for a seed.
gen_text() {
    awk -v kib="$1" -v seed="$seed" 'BEGIN {
        srand(seed)
        n = split("the of and to in is was for on that with as by at from this which be it are or an " \
                  "memory page guest kernel share patch compress scan frame host virtual machine " \
                  "process thread file system network buffer cache queue timer event interrupt " \
                  "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima", w, " ")
        bytes = 0
        line = 0
        while (bytes < kib * 1024) {
            s = sprintf("%07d", line++)
            k = 6 + int(rand() * 10)
            for (i = 0; i < k; i++) s = s " " w[1 + int(rand() * n)]
            s = s " " int(rand() * 1000000)
            print s
            bytes += length(s) + 1
        }
    }'
}

case "$workload" in
    idle)
        ;;
    churn)
        # File churn in tmpfs: many small files created, some deleted, others rewritten.
        mkdir -p /tmp/churn
        for round in 1 2 3; do
            awk -v seed="$seed" -v round="$round" 'BEGIN {
                srand(seed * 7 + round)
                for (f = 0; f < 1500; f++) {
                    name = sprintf("/tmp/churn/f%04d", f)
                    lines = 1 + int(rand() * 120)
                    for (l = 0; l < lines; l++)
                        printf("round %d file %d line %d value %d\n", round, f, l, int(rand() * 1e9)) >> name
                    close(name)
                }
            }'
            rm -f /tmp/churn/f*$round /tmp/churn/f*$((round + 4))
        done
        ;;
    text)
        # Text processing: sort, grep and awk over generated text; results stay in tmpfs.
        mkdir -p /tmp/text
        gen_text 12288 > /tmp/text/corpus.txt
        sort -k2 /tmp/text/corpus.txt > /tmp/text/sorted.txt
        grep -E 'memory|kernel|page' /tmp/text/corpus.txt > /tmp/text/matches.txt
        awk '{ for (i = 2; i < NF; i++) c[$i]++ } END { for (w in c) print c[w], w }' \
            /tmp/text/corpus.txt | sort -rn > /tmp/text/freq.txt
        ;;
    compress)
        # Compression: gzip of generated text mixed with binary data.
        mkdir -p /tmp/gz
        { gen_text 8192; cat /bin/busybox /bin/busybox; } > /tmp/gz/data
        gzip -c /tmp/gz/data > /tmp/gz/data.gz
        gzip -dc /tmp/gz/data.gz | md5sum > /tmp/gz/data.md5
        ;;
    random)
        # Incompressible, unshareable data.
        dd if=/dev/urandom of=/tmp/random.bin bs=1M count=64 2>/dev/null
        ;;
    *)
        echo "CORPUS-ERROR unknown workload $workload"
        ;;
esac

sync
sleep "$settle"
echo "CORPUS-READY workload=$workload"
# init must never exit; idle until the host stops the VM.
while :; do sleep 3600; done
