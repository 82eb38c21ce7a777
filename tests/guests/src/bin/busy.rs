//! `busy`: a fixed amount of pure CPU work (`work=N` iterations of [`busy_work`], default
//! [`DEFAULT_WORK`]) with no exits of its own inside the loop, then a report of the checksum.
//! The hypervisor can only take the CPU back by preemption, so several `busy` VMs measure the
//! scheduler's fairness, and the pinned checksum proves that preemption preserved the registers.
//!
//! Equal work means equal CPU time whatever the scheduler does, so `cpu_us` alone checks the
//! accounting. The TSC at the start and end of the work (`busy_start_tsc`, `busy_end_tsc`) shows
//! the scheduling itself: while the guest TSC is the host's (no per-VM offset), VMs that start
//! together with equal work under a fair round robin all end within about one round of each
//! other, while a scheduler that ran them one after the other would spread their ends over the
//! whole run.
//!
//! With `after_ms=T` it first gives the CPU away (yields) until T ms of its TSC have passed;
//! with `start=line`, until a line typed on its COM1 ends (polled between yields). Either way
//! its work falls in a phase the scenario chooses (after other VMs have booted and gone idle). It reports `busy_cpu_permille`: its CPU time over the work (VM-stats hypercall)
//! against the TSC time the work took, the share of the machine it got meanwhile.
#![cfg_attr(target_os = "none", no_std, no_main)]

use guest_abi::guest;
use test_guests::cpu::rdtsc;
use test_guests::rt::{self, Boot};
use test_guests::work::{busy_work, DEFAULT_WORK};
use test_guests::{println, tsc, uart};

test_guests::entry!(guest_main);

fn guest_main(boot: &Boot) -> u64 {
    let (work, after_ms) = match (
        boot.cmdline.u64_or("work", DEFAULT_WORK),
        boot.cmdline.u64_or("after_ms", 0),
    ) {
        (Ok(w), Ok(a)) => (w, a),
        (Err(e), _) | (_, Err(e)) => return rt::usage_error(e),
    };
    // Without CPUID's TSC rate the share cannot be computed; the work still runs.
    let clock = tsc::clock(&boot.cmdline).ok();
    if let (Some(clock), true) = (clock, after_ms > 0) {
        let until = rdtsc() + clock.ms_to_ticks(after_ms);
        while rdtsc() < until {
            guest::yield_now();
        }
    }
    if boot.cmdline.get("start") == Some("line") {
        println!("busy: waiting for a line on COM1");
        while !matches!(uart::poll_byte(), Some(b'\r' | b'\n')) {
            guest::yield_now();
        }
    }
    println!("busy: work={work}");
    let cpu_before = guest::vm_stats().map_or(0, |s| s.cpu_us);
    // black_box on the way in: the iteration count stays a run-time value, so the work is really
    // done here. black_box on the way out: the work must be finished before the second RDTSC
    // (asm statements keep their order, pure arithmetic could otherwise move across them).
    let start_tsc = rdtsc();
    let checksum = core::hint::black_box(busy_work(core::hint::black_box(work)));
    let end_tsc = rdtsc();
    let cpu_us = guest::vm_stats().map_or(0, |s| s.cpu_us) - cpu_before;
    if let Some(clock) = clock {
        let window_us = clock.ticks_to_us(end_tsc - start_tsc).max(1);
        rt::report("busy_cpu_permille", cpu_us * 1000 / window_us);
    }
    println!("busy: done, checksum={checksum}");
    rt::report("busy_checksum", checksum);
    rt::report("busy_start_tsc", start_tsc);
    rt::report("busy_end_tsc", end_tsc);
    0
}
