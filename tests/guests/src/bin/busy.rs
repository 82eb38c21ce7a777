//! `busy`: a fixed amount of pure CPU work (`work=N` iterations of [`busy_work`], default
//! [`DEFAULT_WORK`]) with no exits of its own inside the loop, then a report of the checksum.
//! The hypervisor can only take the CPU back by preemption, so several `busy` VMs measure the
//! scheduler's fairness, and the pinned checksum proves that preemption preserved the registers.
#![cfg_attr(target_os = "none", no_std, no_main)]

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
    // black_box: the iteration count must stay a run-time value even if the compiler could see
    // through the command line, so the work is really done here.
    let checksum = busy_work(core::hint::black_box(work));
    println!("busy: done, checksum={checksum}");
    rt::report("busy_checksum", checksum);
    0
}
