//! `dilation`: how fast the CPU looks from inside a VM, by every clock the guest has.
//!
//! The guest runs a fixed amount of CPU work (`steps` rounds of an LCG, in chunks of `chunk`)
//! and reports how many rounds it completes per guest second, measured with
//! RDTSC, with the local APIC timer (one-shot, divide by 16, its current count read at both
//! ends) and with the PIT (channel 2, gated on through port 0x61, in mode 2 with a divisor of
//! 65536, latched and read after every chunk, so its 16-bit count is followed across its wraps;
//! channel 2 raises no interrupt, so the measurement causes no timer exits that would cost the
//! hypervisor more at a low factor than at a high one); with `rtc`, the RTC's
//! periodic interrupt (1024 Hz through IOAPIC pin 8) is counted over the same stretch too. A
//! time-dilated VM must find all of them in agreement, and its work rate per guest second
//! `time_dilation` times that of an undilated VM with the same share of the CPU.
//!
//! Command line:
//! - `tdf=N` (1): the dilation the manifest gives this VM. The guest cannot see it (that is
//!   the point); it only places the measurement in host time, below.
//! - `start_ms=N` (0): the measurement starts `start_ms` milliseconds of host time after the
//!   guest starts (it sleeps in HLT until then, on a TSC deadline, `start_ms / tdf` of its own
//!   time). Staggered starts let VMs measure one after the other (each with the CPU to itself)
//!   or together.
//! - `steps=N` (10000000): the work; `chunk=N` (1000000): rounds between two PIT readings (the
//!   only exits while measuring: 3 per chunk; a chunk must take less than the PIT's 55 ms of
//!   guest time).
//! - `rtc`: also count the RTC's periodic interrupt.
//! - `tsc_write`: first move the TSC 2^40 ticks ahead with a WRMSR of IA32_TSC, and check
//!   that RDTSC follows (`dilation_tsc_write`); the sleep until `start_ms` then runs on a TSC
//!   deadline armed in the moved TSC's terms (a hypervisor that mixed the two up would never
//!   wake the guest, or wake it at once with no timer left: the run would not end).
//! - `rdtsc_loop=N`: instead of the work, time N back-to-back RDTSCs (after `start_ms`) and report
//!   `rdtsc_ticks_x100`, guest TSC ticks per RDTSC x 100 (`cargo xtask bench dilation`).
//! - `tsc_khz=N` to override CPUID leaf 0x4000_0010.
//!
//! At start it reports what the VM-info hypercall says of its dilation and share
//! (`info_time_dilation_milli`, `info_cpu_share`). Reports (rounds per guest second): `rate_tsc`, `rate_lapic`, `rate_pit`, `rate_rtc` (with
//! `rtc`); how far each other clock's elapsed time is from the TSC's, in parts per million:
//! `lapic_ppm`, `pit_ppm`, `rtc_ppm`; `guest_us` (by the TSC) and `tsc_backsteps`
//! (RDTSC reading lower than the read before it: never on a CPU). Checks: the TSC never goes
//! back, and every clock agrees with the TSC within `tol_ppm` (1000, i.e. 0.1%). Exit 0 only
//! if all hold.
#![cfg_attr(target_os = "none", no_std, no_main)]

use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

use guest_abi::guest;
use test_guests::checks::Checks;
use test_guests::cpu::{self, rdtsc};
use test_guests::interrupts::{self, Interrupted};
use test_guests::ioapic::{self, Route};
use test_guests::lapic::{self, reg, TimerMode};
use test_guests::rt::{self, Boot};
use test_guests::tsc;
use test_guests::{pit, println, rtc};

test_guests::entry!(guest_main);

const V_WAKE: u8 = 0x40;
const V_RTC: u8 = 0x58;
const V_SPURIOUS: u8 = 0xFF;
/// The APIC timer's divider while measuring: 2^32 counts last 68.7 s of guest time.
const APIC_DIVIDE: u64 = 16;
const RTC_HZ: u64 = 1024;
const IA32_TSC: u32 = 0x10;

static RTC_TICKS: AtomicU64 = AtomicU64::new(0);

fn on_wake(_: &Interrupted) {
    lapic::eoi();
}

fn on_rtc(_: &Interrupted) {
    if rtc::ack() & rtc::C_PF != 0 {
        RTC_TICKS.fetch_add(1, SeqCst);
    }
    lapic::eoi();
}

/// `steps` rounds of a 64-bit LCG, kept from being optimized away.
#[inline(never)]
fn work(steps: u64, x: u64) -> u64 {
    let mut x = x;
    for _ in 0..steps {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
    }
    core::hint::black_box(x)
}

/// Times `n` RDTSCs (unrolled by 10) and reports guest ticks per RDTSC x 100.
fn rdtsc_cost(n: u64) -> u64 {
    let rounds = n.div_ceil(10);
    let start = rdtsc();
    let mut sink = 0u64;
    for _ in 0..rounds {
        for _ in 0..10 {
            sink = sink.wrapping_add(rdtsc());
        }
    }
    let ticks = rdtsc() - start;
    core::hint::black_box(sink);
    rt::report("rdtsc_n", rounds * 10);
    rt::report("rdtsc_ticks_x100", ticks * 100 / (rounds * 10));
    0
}

/// Starts PIT channel 2 in mode 2 (rate generator) with a divisor of 65536, its gate on
/// (port 0x61 bit 0) and the speaker off (bit 1).
fn pit2_start() {
    // SAFETY: PIT and port 0x61; channel 2 drives only the speaker line, which stays off.
    unsafe {
        let p61 = cpu::inb(pit::PORT_61);
        cpu::outb(pit::PORT_61, (p61 & !0b10) | 0b01);
        cpu::outb(pit::COMMAND, 0xb4);
        cpu::outb(pit::CHANNEL2, 0);
        cpu::outb(pit::CHANNEL2, 0);
    }
}

/// Latches PIT channel 2 and reads its count (mode 2 counts 65536 down to 1 and reloads).
fn pit_count() -> u16 {
    // SAFETY: PIT ports; the latch command (counter 2, latch) only freezes the output latch.
    unsafe {
        cpu::outb(pit::COMMAND, 0x80);
        let lo = cpu::inb(pit::CHANNEL2);
        let hi = cpu::inb(pit::CHANNEL2);
        u16::from_le_bytes([lo, hi])
    }
}

/// The TSC, the local APIC timer's current count and PIT channel 2's count, read back to back,
/// and the TSC ticks the reads took.
fn read_clocks() -> ((u64, u32, u16), u64) {
    let tsc = rdtsc();
    let apic = lapic::read(reg::TIMER_CURRENT);
    let pit = pit_count();
    ((tsc, apic, pit), rdtsc().wrapping_sub(tsc))
}

/// What [`read_clocks`] normally takes: the shortest of a few tries, with room to spare.
fn clock_read_bound() -> u64 {
    let fastest = (0..4).map(|_| read_clocks().1).min().unwrap_or(0);
    fastest * 4 + 64
}

/// The three clocks read together ([`read_clocks`]). The VM may lose the CPU between two of the
/// reads (a neighbour's whole quantum), which would put one clock's reading far after the
/// others': a reading that took longer than `bound` is taken again. Normally the first one is
/// kept, so the measurement costs what a single reading does.
fn sample(bound: u64) -> (u64, u32, u16) {
    loop {
        let (clocks, took) = read_clocks();
        if took <= bound {
            return clocks;
        }
    }
}

/// Elapsed time by one clock against the TSC's, in ppm (absolute value).
fn ppm(elapsed_ns: u64, tsc_ns: u64) -> u64 {
    if tsc_ns == 0 {
        return u64::MAX;
    }
    let diff = elapsed_ns.abs_diff(tsc_ns);
    ((u128::from(diff) * 1_000_000) / u128::from(tsc_ns)) as u64
}

/// Rounds per second for `rounds` in `ns` nanoseconds.
fn rate(rounds: u64, ns: u64) -> u64 {
    if ns == 0 {
        return 0;
    }
    ((u128::from(rounds) * 1_000_000_000) / u128::from(ns)) as u64
}

fn guest_main(boot: &Boot) -> u64 {
    let c = &boot.cmdline;
    let args = (
        c.u64_or("tdf", 1),
        c.u64_or("start_ms", 0),
        c.u64_or("steps", 10_000_000),
        c.u64_or("chunk", 1_000_000),
        c.u64_or("tol_ppm", 1000),
    );
    let (tdf, start_ms, steps, chunk, tol_ppm) = match args {
        (Ok(a), Ok(b), Ok(c), Ok(d), Ok(e)) => (a, b, c, d, e),
        (Err(e), ..) | (_, Err(e), ..) | (.., Err(e), _, _) | (.., Err(e), _) | (.., Err(e)) => {
            return rt::usage_error(e)
        }
    };
    if !(1..=1000).contains(&tdf) || steps == 0 || chunk == 0 {
        return rt::usage_error("tdf must be 1..=1000, steps and chunk at least 1");
    }
    let clock = match tsc::clock(c) {
        Ok(clock) => clock,
        Err(e) => return rt::usage_error(e),
    };
    let with_rtc = c.has("rtc");
    let mut checks = Checks::new();
    if c.has("tsc_write") {
        const AHEAD: u64 = 1 << 40;
        let before = rdtsc();
        // SAFETY: IA32_TSC exists on every x86-64 CPU; moving this VM's TSC is the test.
        unsafe { cpu::wrmsr(IA32_TSC, before + AHEAD) };
        let after = rdtsc();
        checks.check(
            "dilation_tsc_write",
            after >= before + AHEAD && after - (before + AHEAD) < clock.ms_to_ticks(10),
            format_args!(
                "RDTSC read {before:#x}, wrote {:#x}, then read {after:#x}",
                before + AHEAD
            ),
        );
    }
    let begun = rdtsc();
    match guest::vm_info() {
        Ok(info) => {
            rt::report(
                "info_time_dilation_milli",
                u64::from(info.time_dilation_milli),
            );
            rt::report("info_cpu_share", u64::from(info.cpu_share));
        }
        Err(e) => println!("vm_info refused: {e:?}"),
    }
    let rdtsc_loop = match c.u64("rdtsc_loop") {
        Ok(n) => n.filter(|&n| n > 0),
        Err(e) => return rt::usage_error(e),
    };
    println!(
        "dilation: tdf={tdf} start_ms={start_ms} (host time), {steps} rounds, TSC {} kHz",
        clock.khz
    );

    interrupts::install();
    interrupts::register(V_WAKE, Some(on_wake));
    interrupts::register(V_RTC, Some(on_rtc));
    lapic::enable_x2apic();
    lapic::software_enable(V_SPURIOUS);

    // Sleep until the measurement's start: HLT on a TSC deadline, in guest time.
    let start_at = begun + clock.ms_to_ticks(start_ms) / tdf;
    if start_ms > 0 {
        lapic::tsc_deadline_mode(V_WAKE);
        lapic::set_tsc_deadline(start_at);
        interrupts::wait_until(|| rdtsc() >= start_at);
        lapic::stop_timer();
    }
    if let Some(n) = rdtsc_loop {
        return rdtsc_cost(n);
    }

    if with_rtc {
        ioapic::route(ioapic::isa_pin(8), Route::isa(V_RTC, lapic::id() as u8));
        let rs = rtc::rate_select_for(RTC_HZ as u32).expect("1024 Hz is an RTC rate");
        rtc::start_periodic(rs);
        interrupts::enable();
    }
    pit2_start();
    let divide = lapic::divide_config(APIC_DIVIDE as u32).expect("a power of two");
    lapic::write(
        reg::LVT_TIMER,
        lapic::lvt_timer(V_WAKE, TimerMode::OneShot, true),
    );
    lapic::write(reg::TIMER_DIVIDE, divide);
    lapic::write(reg::TIMER_INITIAL, u32::MAX);

    // The clocks at the start, read back to back.
    let bound = clock_read_bound();
    let rtc0 = RTC_TICKS.load(SeqCst);
    let (tsc0, apic0, mut pit_prev) = sample(bound);
    let mut pit_counts: u64 = 0;
    let mut done: u64 = 0;
    let mut last = tsc0;
    let mut backsteps: u64 = 0;
    let mut x = tsc0;
    while done < steps {
        let n = chunk.min(steps - done);
        x = work(n, x);
        done += n;
        let now = rdtsc();
        if now < last {
            backsteps += 1;
        }
        last = now;
        let count = pit_count();
        pit_counts += u64::from(pit_prev.wrapping_sub(count));
        pit_prev = count;
    }
    // And at the end, in the same order, so that the exits between the readings cancel out.
    let rtc1 = RTC_TICKS.load(SeqCst);
    let (tsc1, apic1, count) = sample(bound);
    if tsc1 < last {
        backsteps += 1;
    }
    pit_counts += u64::from(pit_prev.wrapping_sub(count));
    interrupts::disable();
    if with_rtc {
        rtc::stop();
        ioapic::mask(ioapic::isa_pin(8));
    }
    lapic::stop_timer();

    // Nanoseconds, exactly: ticks * 10^9 / (kHz * 1000).
    let tsc_ns = ((u128::from(tsc1 - tsc0) * 1_000_000) / u128::from(clock.khz)) as u64;
    // The APIC timer's input clock: CPUID leaf 0x4000_0010 EBX.
    let apic_ns =
        u64::from(apic0.wrapping_sub(apic1)) * APIC_DIVIDE * 1_000_000_000 / tsc::apic_bus_hz();
    let pit_ns = ((u128::from(pit_counts) * 1_000_000_000) / u128::from(pit::INPUT_HZ)) as u64;
    let rtc_ns = (rtc1 - rtc0) * 1_000_000_000 / RTC_HZ;

    rt::report("guest_us", tsc_ns / 1000);
    rt::report("tsc_backsteps", backsteps);
    rt::report("rate_tsc", rate(steps, tsc_ns));
    rt::report("rate_lapic", rate(steps, apic_ns));
    rt::report("rate_pit", rate(steps, pit_ns));
    let (lapic_ppm, pit_ppm) = (ppm(apic_ns, tsc_ns), ppm(pit_ns, tsc_ns));
    rt::report("lapic_ppm", lapic_ppm);
    rt::report("pit_ppm", pit_ppm);
    checks.check(
        "dilation_tsc_monotonic",
        backsteps == 0,
        format_args!("{backsteps} RDTSC readings below the one before"),
    );
    checks.check(
        "dilation_lapic_agrees",
        lapic_ppm <= tol_ppm,
        format_args!("local APIC timer {apic_ns} ns vs TSC {tsc_ns} ns: {lapic_ppm} ppm"),
    );
    checks.check(
        "dilation_pit_agrees",
        pit_ppm <= tol_ppm,
        format_args!("PIT {pit_ns} ns vs TSC {tsc_ns} ns: {pit_ppm} ppm"),
    );
    if with_rtc {
        let rtc_ppm = ppm(rtc_ns, tsc_ns);
        rt::report("rate_rtc", rate(steps, rtc_ns));
        rt::report("rtc_ppm", rtc_ppm);
        checks.check(
            "dilation_rtc_agrees",
            rtc_ppm <= tol_ppm,
            format_args!(
                "RTC {} periods ({rtc_ns} ns) vs TSC {tsc_ns} ns: {rtc_ppm} ppm",
                rtc1 - rtc0
            ),
        );
    }
    checks.finish("dilation")
}
