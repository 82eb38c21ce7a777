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
#![cfg_attr(target_os = "none", no_std, no_main)]

use test_guests::cpu::rdtsc;
use test_guests::println;
use test_guests::rt::{self, Boot};
use test_guests::work::{busy_work, DEFAULT_WORK};

test_guests::entry!(guest_main);

fn guest_main(boot: &Boot) -> u64 {
    let work = match boot.cmdline.u64_or("work", DEFAULT_WORK) {
        Ok(work) => work,
        Err(e) => return rt::usage_error(e),
    };
    println!("busy: work={work}");
    // black_box on the way in: the iteration count stays a run-time value, so the work is really
    // done here. black_box on the way out: the work must be finished before the second RDTSC
    // (asm statements keep their order, pure arithmetic could otherwise move across them).
    let start_tsc = rdtsc();
    let checksum = core::hint::black_box(busy_work(core::hint::black_box(work)));
    let end_tsc = rdtsc();
    println!("busy: done, checksum={checksum}");
    rt::report("busy_checksum", checksum);
    rt::report("busy_start_tsc", start_tsc);
    rt::report("busy_end_tsc", end_tsc);
    0
}
