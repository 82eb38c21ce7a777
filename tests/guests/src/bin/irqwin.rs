//! `irqwin`: an interrupt that becomes pending while the guest runs with IF = 0 must be taken
//! right after the guest's STI (after the one instruction of the STI shadow, SDM Vol. 2B "STI";
//! a hypervisor needs interrupt-window exiting for it, SDM Vol. 3C 26.7.5), exactly once.
//!
//! Each round, with interrupts off: arm the local APIC timer (round by round: one-shot, TSC
//! deadline, periodic), busy-wait until it has expired and `hold_us` more (for the periodic
//! timer: several periods, which the APIC's IRR folds into one pending interrupt, SDM Vol. 3A
//! 10.8.4), then execute `STI` followed by a landing window of 16 NOPs and `CLI`. The handler
//! records the RIP it interrupted: it must lie inside the window, at least one instruction after
//! the STI (offset 1..=16; 0 would break the shadow), and exactly one interrupt must arrive there
//! and none later (the one-shot timers fire once; the periodic one is stopped right after the
//! window).
//!
//! Command line:
//! - `rounds=N` (60);
//! - `delay_us=N` (100): one-shot and TSC-deadline expiry after arming;
//! - `period_us=N` (2000): the periodic timer's period (long enough that no second expiry falls
//!   into the handler itself, whose exits are slow under Bochs);
//! - `hold_us=N` (1000): how long IF stays 0 after the expiry;
//! - `multiplex`: during every IF = 0 stretch, write one word into every page of the VM's
//!   memory from 2 MiB to 256 KiB below the top, and check the words of the previous pass: with
//!   `[memory] multiplex = true` the engine takes the pages that go cold (the IDT, the handler's
//!   code, the stack between rounds), so delivery itself faults, and must still happen exactly
//!   once in the window;
//! - `no_periodic`: only the one-shot and TSC-deadline rounds;
//! - `tsc_khz=N` to override CPUID leaf 0x4000_0010.
//!
//! Reports `irqwin_rounds`, `irqwin_failures`, `irqwin_max_offset` (in NOPs after the STI) and,
//! with `multiplex`, `irqwin_pages`. Exit 0 only if no round failed.
#![cfg_attr(target_os = "none", no_std, no_main)]

use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

use test_guests::checks::Checks;
use test_guests::cpu::rdtsc;
use test_guests::interrupts::{self, Interrupted};
use test_guests::lapic::{self, TimerMode};
use test_guests::println;
use test_guests::rt::{self, Boot};
use test_guests::tsc::{self, Clock};

test_guests::entry!(guest_main);

const V_TIMER: u8 = 0x50;
const V_SPURIOUS: u8 = 0xFF;
/// NOPs in the landing window.
const WINDOW: u64 = 16;
const PAGE: u64 = 4096;
/// Failing rounds printed in full; the rest are only counted.
const PRINT_FAILURES: u64 = 10;

static RIP: AtomicU64 = AtomicU64::new(0);
/// Interrupts that arrived with IF = 0 in the interrupted context (impossible on a CPU).
static WITH_IF_CLEAR: AtomicU64 = AtomicU64::new(0);

fn on_timer(i: &Interrupted) {
    RIP.store(i.rip, SeqCst);
    if i.rflags & (1 << 9) == 0 {
        WITH_IF_CLEAR.fetch_add(1, SeqCst);
    }
    lapic::eoi();
}

/// `STI`, 16 NOPs, `CLI`; returns the address right after the STI.
#[inline(never)]
fn window() -> u64 {
    let start: u64;
    // SAFETY: enables interrupts for the 16 NOPs only; the handler is installed. Not `nomem`:
    // the handler writes statics the caller reads afterwards.
    unsafe {
        core::arch::asm!(
            "lea {start}, [rip + 2f]",
            "sti",
            "2:",
            ".rept 16",
            "nop",
            ".endr",
            "cli",
            start = out(reg) start,
            options(nostack),
        );
    }
    start
}

/// The pages the `multiplex` option writes: one u64 at the start of each.
struct Toucher {
    start: u64,
    end: u64,
    next: u64,
    pass: u64,
    corrupt: u64,
    touched: u64,
}

impl Toucher {
    fn value(page: u64, pass: u64) -> u64 {
        page.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ pass
    }

    /// Writes the next page's word, checking the previous pass's value first.
    fn step(&mut self) {
        if self.start >= self.end {
            return;
        }
        let ptr = self.next as *mut u64;
        let page = self.next / PAGE;
        if self.pass > 0 {
            // SAFETY: [start, end) lies inside the VM's memory, away from the image (below
            // 2 MiB) and the stack (the top 256 KiB); nothing else uses it.
            let old = unsafe { core::ptr::read_volatile(ptr) };
            if old != Self::value(page, self.pass - 1) {
                self.corrupt += 1;
            }
        }
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(ptr, Self::value(page, self.pass)) };
        self.touched += 1;
        self.next += PAGE;
        if self.next >= self.end {
            self.next = self.start;
            self.pass += 1;
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    OneShot,
    Deadline,
    Periodic,
}

fn guest_main(boot: &Boot) -> u64 {
    let c = &boot.cmdline;
    let (rounds, delay_us, period_us, hold_us) = match (
        c.u64_or("rounds", 60),
        c.u64_or("delay_us", 100),
        c.u64_or("period_us", 2000),
        c.u64_or("hold_us", 1000),
    ) {
        (Ok(a), Ok(b), Ok(c), Ok(d)) => (a, b, c, d),
        (Err(e), ..) | (_, Err(e), ..) | (.., Err(e), _) | (.., Err(e)) => {
            return rt::usage_error(e)
        }
    };
    if delay_us == 0 || period_us == 0 || delay_us > 4_000_000 || period_us > 4_000_000 {
        return rt::usage_error("delay_us and period_us must be 1..=4000000");
    }
    let clock = match tsc::clock(c) {
        Ok(clock) => clock,
        Err(e) => return rt::usage_error(e),
    };
    let multiplex = c.has("multiplex");
    let kinds: &[Kind] = if c.has("no_periodic") {
        &[Kind::OneShot, Kind::Deadline]
    } else {
        &[Kind::OneShot, Kind::Deadline, Kind::Periodic]
    };
    let mut toucher = Toucher {
        start: 2 << 20,
        end: if multiplex {
            boot.memory_bytes().saturating_sub(256 << 10) & !(PAGE - 1)
        } else {
            0
        },
        next: 2 << 20,
        pass: 0,
        corrupt: 0,
        touched: 0,
    };
    println!(
        "irqwin: {rounds} rounds, hold {hold_us} us with IF=0{}",
        if multiplex { ", touching memory" } else { "" }
    );

    interrupts::install();
    interrupts::register(V_TIMER, Some(on_timer));
    lapic::enable_x2apic();
    lapic::software_enable(V_SPURIOUS);

    let mut failures = 0;
    let mut max_offset = 0;
    for round in 0..rounds {
        let kind = kinds[(round % kinds.len() as u64) as usize];
        let result = one_round(clock, kind, delay_us, period_us, hold_us, &mut toucher);
        match result {
            Ok(offset) => max_offset = max_offset.max(offset),
            Err(why) => {
                failures += 1;
                if failures <= PRINT_FAILURES {
                    println!("FAIL round {round} ({kind:?}): {why}");
                }
            }
        }
        // Between rounds, with interrupts on: more memory traffic.
        interrupts::enable();
        for _ in 0..64 {
            toucher.step();
        }
        interrupts::disable();
    }
    lapic::stop_timer();
    rt::report("irqwin_rounds", rounds);
    rt::report("irqwin_failures", failures);
    rt::report("irqwin_max_offset", max_offset);
    if multiplex {
        rt::report("irqwin_pages", toucher.touched);
    }
    let mut checks = Checks::new();
    checks.check(
        "irqwin_taken_after_sti_once",
        failures == 0,
        format_args!("{failures} of {rounds} rounds failed"),
    );
    let if_clear = WITH_IF_CLEAR.load(SeqCst);
    checks.check(
        "irqwin_never_with_if_clear",
        if_clear == 0,
        format_args!("{if_clear} interrupts interrupted code with IF = 0"),
    );
    if multiplex {
        checks.check(
            "irqwin_memory_intact",
            toucher.corrupt == 0 && toucher.pass >= 1,
            format_args!(
                "{} corrupted words, {} passes over the memory",
                toucher.corrupt, toucher.pass
            ),
        );
    }
    checks.finish("irqwin")
}

/// One round; `Ok(offset)` of the interrupted RIP in the window, or why it failed.
fn one_round(
    clock: Clock,
    kind: Kind,
    delay_us: u64,
    period_us: u64,
    hold_us: u64,
    toucher: &mut Toucher,
) -> Result<u64, &'static str> {
    interrupts::disable();
    let before = interrupts::count(V_TIMER);
    // The count-down timers start at the write of the initial count, somewhere inside
    // `start_timer`: the TSC read after it bounds that moment from above. (Read before it, it
    // could lie far earlier: a VM may lose the CPU between any two of its instructions, and
    // under tight memory multiplexing it did, for up to 0.2 s. The hold then ended before the
    // timer had expired.)
    let expiry = match kind {
        Kind::OneShot => {
            lapic::start_timer(
                V_TIMER,
                TimerMode::OneShot,
                tsc::apic_counts_for_us(delay_us),
                1,
            );
            rdtsc() + clock.us_to_ticks(delay_us)
        }
        Kind::Deadline => {
            lapic::tsc_deadline_mode(V_TIMER);
            let deadline = rdtsc() + clock.us_to_ticks(delay_us);
            lapic::set_tsc_deadline(deadline);
            deadline
        }
        Kind::Periodic => {
            lapic::start_timer(
                V_TIMER,
                TimerMode::Periodic,
                tsc::apic_counts_for_us(period_us),
                1,
            );
            // Three expiries while IF = 0: one pending interrupt.
            rdtsc() + 3 * clock.us_to_ticks(period_us)
        }
    };
    let hold_end = expiry + clock.us_to_ticks(hold_us);
    while rdtsc() < hold_end {
        toucher.step();
    }
    if interrupts::count(V_TIMER) != before {
        lapic::stop_timer();
        return Err("delivered while IF = 0");
    }
    if matches!(kind, Kind::Periodic) {
        // Stopped before the window: the expiries already folded into the IRR stay pending
        // (masking the LVT and clearing the count do not clear the IRR, SDM 10.5.1), and the
        // next period cannot expire while this VM waits for the CPU behind its neighbour.
        lapic::stop_timer();
    }
    RIP.store(0, SeqCst);
    let start = window();
    let in_window = interrupts::count(V_TIMER) - before;
    let rip = RIP.load(SeqCst);
    // Anything more must not come: the one-shots are spent, the periodic timer is stopped.
    interrupts::enable();
    clock.spin_us(2 * delay_us.max(100));
    interrupts::disable();
    let total = interrupts::count(V_TIMER) - before;
    if in_window == 0 {
        return Err("not taken in the 16 instructions after STI");
    }
    if in_window > 1 || total > 1 {
        return Err("taken more than once");
    }
    let offset = rip.wrapping_sub(start);
    if offset == 0 {
        return Err("taken inside the STI shadow");
    }
    if offset > WINDOW {
        return Err("interrupted RIP outside the landing window");
    }
    Ok(offset)
}
