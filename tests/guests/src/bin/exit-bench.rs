//! `exit-bench`: the cost of a VM exit round trip, in TSC ticks, for three kinds of exit, of an
//! MMIO access and of a timer interrupt.
//!
//! `n=N` (default 100000) iterations each of CPUID leaf 0, the `nop` hypercall (VMCALL) and
//! `in al, dx` from the emulated UART's line status register (0x3FD), plus an empty loop as the
//! baseline; each timed with RDTSC around the whole loop. Then `n / 10` iterations of:
//! - `mmio`: a 32-bit read of the local APIC's version register through the xAPIC page (an EPT
//!   violation, the instruction fetched and decoded, the access emulated);
//! - `timer`: one local APIC timer interrupt, from its deadline to the guest's handler, its EOI
//!   and the return: the TSC-deadline timer (x2APIC mode) is armed with a deadline already past
//!   while RFLAGS.IF = 1, so the interrupt is delivered right after the WRMSR, and the handler
//!   writes the x2APIC EOI.
//!
//! Reports `bench_n`, `loop_ticks_x100`, `cpuid_ticks_x100`, `vmcall_ticks_x100`,
//! `io_ticks_x100`, `mmio_ticks_x100` and `timer_ticks_x100` (ticks per iteration times 100, so
//! that integers keep two decimals). Inside Bochs the TSC counts instructions, so the figures are
//! exactly repeatable there; under TSC scaling or dilation they are in the guest's ticks.
#![cfg_attr(target_os = "none", no_std, no_main)]

use guest_abi::guest;
use test_guests::cpu::{self, cpuid, rdtsc};
use test_guests::interrupts::{self, Interrupted};
use test_guests::lapic::{self, reg};
use test_guests::println;
use test_guests::rt::{self, Boot, EXIT_USAGE};

test_guests::entry!(guest_main);

const DEFAULT_N: u64 = 100_000;
/// COM1's line status register: emulated by the hypervisor, so every read is an I/O exit.
const UART_LSR: u16 = 0x3FD;

/// Times `n` runs of `body`; returns ticks per iteration times 100.
#[inline(always)]
fn ticks_x100(n: u64, mut body: impl FnMut()) -> u64 {
    let start = rdtsc();
    for _ in 0..n {
        body();
    }
    let ticks = rdtsc().wrapping_sub(start);
    // u128: ticks * 100 may not fit in 64 bits for a long run with a fast TSC.
    (u128::from(ticks) * 100 / u128::from(n)) as u64
}

fn guest_main(boot: &Boot) -> u64 {
    let n = match boot.cmdline.u64_or("n", DEFAULT_N) {
        Ok(0) => return rt::usage_error("exit-bench: n must be at least 1"),
        Ok(n) => n,
        Err(e) => return rt::usage_error(e),
    };
    if n > u64::MAX / 100 {
        println!("exit-bench: n={n} is too large");
        return EXIT_USAGE;
    }
    println!("exit-bench: n={n}");

    // An empty asm statement is opaque to the optimiser, so the loop itself survives.
    // SAFETY: an empty instruction sequence.
    let loop_x100 = ticks_x100(n, || unsafe {
        core::arch::asm!("", options(nomem, nostack))
    });
    let cpuid_x100 = ticks_x100(n, || {
        core::hint::black_box(cpuid(0, 0));
    });
    let vmcall_x100 = ticks_x100(n, guest::nop);
    let io_x100 = ticks_x100(n, || {
        // SAFETY: reading the UART's line status register has no side effects.
        core::hint::black_box(unsafe { cpu::inb(UART_LSR) });
    });

    let n_slow = (n / 10).max(1);
    let apic_version = lapic::XAPIC_BASE + u64::from(reg::VERSION);
    let mmio_x100 = ticks_x100(n_slow, || {
        // SAFETY: the local APIC's version register, identity-mapped by the boot page tables;
        // reading it has no side effects.
        core::hint::black_box(unsafe { (apic_version as *const u32).read_volatile() });
    });

    interrupts::install();
    interrupts::register(TIMER_VECTOR, Some(timer_eoi));
    lapic::enable_x2apic();
    lapic::tsc_deadline_mode(TIMER_VECTOR);
    interrupts::enable();
    let timer_x100 = ticks_x100(n_slow, || lapic::set_tsc_deadline(1));
    interrupts::disable();
    let timers = interrupts::count(TIMER_VECTOR);
    if timers != n_slow {
        println!("exit-bench: {timers} timer interrupts for {n_slow} deadlines");
        return 1;
    }

    println!(
        "exit-bench: ticks x100 per iteration: loop={loop_x100} cpuid={cpuid_x100} vmcall={vmcall_x100} io={io_x100} mmio={mmio_x100} timer={timer_x100}"
    );
    rt::report("bench_n", n);
    rt::report("loop_ticks_x100", loop_x100);
    rt::report("cpuid_ticks_x100", cpuid_x100);
    rt::report("vmcall_ticks_x100", vmcall_x100);
    rt::report("io_ticks_x100", io_x100);
    rt::report("mmio_ticks_x100", mmio_x100);
    rt::report("timer_ticks_x100", timer_x100);
    0
}

/// The benchmark's timer vector.
const TIMER_VECTOR: u8 = 0x40;

fn timer_eoi(_: &Interrupted) {
    lapic::eoi();
}
