//! `flood`: holds on to the CPU in one way for a fixed stretch of host time, so that a scenario
//! can check that the scheduler gives every VM its share however it spends it.
//!
//! `mode=` one of:
//! - `busy`: pure computation, no exits (preempted only by the quantum's timer);
//! - `nop`: the cheapest hypercall in a loop (every exit's handling is the VM's own time);
//! - `report`: the report hypercall in a loop (each one a log line of the hypervisor);
//! - `console`: 4 KiB console writes of numbered lines in a loop (the serial line is far slower
//!   than the guest: the hypervisor queues and throttles, and must lose nothing).
//!
//! `sti`: run with RFLAGS.IF = 1 (the guest has no interrupt handlers; it relies on the
//! hypervisor intercepting every external interrupt).
//!
//! `ms=N`: how long to go on, in milliseconds of the TSC (whose rate the guest takes from
//! CPUID leaf 0x4000_0010, or `tsc_khz=N`; the guest TSC is the host's). Every VM of a scenario
//! starts within one round of the others, so they all compete for the whole stretch. At the end
//! it prints and reports how much it got done (`flood_ops`) and exits 0.
#![cfg_attr(target_os = "none", no_std, no_main)]

use core::fmt::Write;

use guest_abi::guest;
use test_guests::cpu::rdtsc;
use test_guests::println;
use test_guests::rt::{self, Boot};
use test_guests::tsc;

test_guests::entry!(guest_main);

/// Bytes of one console write (the hypercall's maximum).
const WRITE: usize = 4096;

/// Fixed-size text buffer for building a console write.
struct Buf {
    bytes: [u8; WRITE],
    len: usize,
}

impl Write for Buf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        if end > WRITE {
            return Err(core::fmt::Error);
        }
        self.bytes[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

fn guest_main(boot: &Boot) -> u64 {
    let ms = match boot.cmdline.u64_or("ms", 2000) {
        Ok(ms) => ms,
        Err(e) => return rt::usage_error(e),
    };
    let clock = match tsc::clock(&boot.cmdline) {
        Ok(clock) => clock,
        Err(e) => return rt::usage_error(e),
    };
    let mode = boot.cmdline.get("mode").unwrap_or("busy");
    if !matches!(mode, "busy" | "nop" | "report" | "console") {
        return rt::usage_error("mode must be busy, nop, report or console");
    }
    if boot.cmdline.has("sti") {
        // Interrupts on, with no handler for them: under the hypervisor every external interrupt
        // exits (external-interrupt exiting) and none is delivered to the guest, so this only
        // checks that the hypervisor keeps it that way.
        // SAFETY: STI changes RFLAGS.IF only.
        unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
    }
    println!("flood: mode={mode} for {ms} ms");
    let end = rdtsc() + clock.ms_to_ticks(ms);
    let mut ops: u64 = 0;
    let mut line: u64 = 0;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while rdtsc() < end {
        match mode {
            "busy" => {
                for _ in 0..1000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                }
                x = core::hint::black_box(x);
            }
            "nop" => guest::nop(),
            "report" => rt::report("flood.report", ops),
            _ => {
                let mut buf = Buf {
                    bytes: [0; WRITE],
                    len: 0,
                };
                // Lines of about 100 bytes, numbered, until the write is full.
                while buf.len + 110 < WRITE {
                    line += 1;
                    let _ = writeln!(buf, "flood line {line:06} {:.<86}", "");
                }
                if let Err(e) = guest::console_write(&buf.bytes[..buf.len]) {
                    println!("console_write failed: {e:?}");
                    return 1;
                }
            }
        }
        ops += 1;
    }
    println!("flood: mode={mode} done: {ops} operations, {line} console lines");
    rt::report("flood_ops", ops);
    0
}
