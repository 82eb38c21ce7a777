//! `timers`: every interrupt source of the virtual PC counted against the TSC, as a test on real
//! hardware would: the local APIC timer (periodic, one-shot re-armed in its handler, TSC
//! deadline), the PIT on IRQ 0 through the IOAPIC (pin 2) and through the 8259 and LINT0
//! (ExtINT), the RTC's periodic interrupt on IRQ 8; plus EOI, masking and priorities.
//!
//! Command line:
//! - `ms=N` (200): length of each rate measurement, milliseconds of guest TSC time;
//! - `tol_ppm=N` (5000, i.e. 0.5%): how far a measured rate may be from the programmed one;
//! - `lapic_hz=N` (1000), `pit_hz=N` (100), `rtc_hz=N` (1024, a power of two from 2 to 8192);
//! - `apic=xapic` to measure the rates through the xAPIC page instead of the x2APIC MSRs (the
//!   priority, EOI and masking checks always use the xAPIC page, before the switch);
//! - `tsc_khz=N` to override CPUID leaf 0x4000_0010.
//!
//! A rate is `(n - 2)` intervals between the second and the last of `n` interrupts in the window,
//! over the TSC ticks between them: delivery latency cancels out unless it varies, and the first
//! interrupt, which may have been pending when the window opened, is not a period's start. Each is
//! reported as `<source>_hz_x1000`. One `PASS`/`FAIL` line per check; exit 0 only if all passed.
#![cfg_attr(target_os = "none", no_std, no_main)]

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

use test_guests::checks::Checks;
use test_guests::cpu::rdtsc;
use test_guests::interrupts::{self, Interrupted};
use test_guests::ioapic::{self, Route};
use test_guests::lapic::{self, reg, TimerMode};
use test_guests::rt::{self, Boot};
use test_guests::tsc::{self, Clock};
use test_guests::{pic, pit, println, rtc};

test_guests::entry!(guest_main);

/// Vectors: the class (vector >> 4) is what the TPR and the in-service priority compare.
const V_PERIODIC: u8 = 0x40;
const V_ONESHOT: u8 = 0x41;
const V_DEADLINE: u8 = 0x42;
const V_NOEOI: u8 = 0x46;
const V_LOW: u8 = 0x48;
const V_PIT: u8 = 0x50;
const V_RTC: u8 = 0x58;
/// 8259 bases: IRQ 0 arrives at 0x60.
const PIC_MASTER_BASE: u8 = 0x60;
const PIC_SLAVE_BASE: u8 = 0x68;
const V_HIGH: u8 = 0x88;
const V_SPURIOUS: u8 = 0xFF;

/// The current measurement: first and last TSC, count.
static FIRST: AtomicU64 = AtomicU64::new(0);
static LAST: AtomicU64 = AtomicU64::new(0);
static N: AtomicU64 = AtomicU64::new(0);
/// One-shot and TSC-deadline: the count to re-arm with, the deadline, the period in ticks, how
/// many fired before their time and the latest lateness.
static ONESHOT_COUNT: AtomicU64 = AtomicU64::new(0);
static ARMED_AT: AtomicU64 = AtomicU64::new(0);
static DEADLINE: AtomicU64 = AtomicU64::new(0);
static PERIOD_TICKS: AtomicU64 = AtomicU64::new(0);
static EARLY: AtomicU64 = AtomicU64::new(0);
static LATE_MAX: AtomicU64 = AtomicU64::new(0);
static RTC_NO_PF: AtomicU64 = AtomicU64::new(0);
/// Nesting: set by the high handler while the low one is in service, and the order of events.
static LOW_ACTIVE: AtomicBool = AtomicBool::new(false);
static HIGH_NESTED: AtomicU64 = AtomicU64::new(0);
static LOW_NESTED: AtomicU64 = AtomicU64::new(0);
static HIGH_ACTIVE: AtomicBool = AtomicBool::new(false);

/// Counts an interrupt of the source being measured. The rate is taken from the second
/// interrupt on: the first may be one that was already pending when interrupts were enabled
/// (the RTC's flag set between its start and the measurement), not aligned with a period.
fn record(i: &Interrupted) {
    if N.fetch_add(1, SeqCst) == 1 {
        FIRST.store(i.tsc, SeqCst);
    }
    LAST.store(i.tsc, SeqCst);
}

fn reset_record() {
    N.store(0, SeqCst);
    FIRST.store(0, SeqCst);
    LAST.store(0, SeqCst);
    EARLY.store(0, SeqCst);
    LATE_MAX.store(0, SeqCst);
}

fn on_lapic(i: &Interrupted) {
    record(i);
    lapic::eoi();
}

fn on_oneshot(i: &Interrupted) {
    record(i);
    let due = ARMED_AT.load(SeqCst) + PERIOD_TICKS.load(SeqCst);
    note_lateness(i.tsc, due);
    ARMED_AT.store(rdtsc(), SeqCst);
    lapic::write(reg::TIMER_INITIAL, ONESHOT_COUNT.load(SeqCst) as u32);
    lapic::eoi();
}

fn on_deadline(i: &Interrupted) {
    record(i);
    let due = DEADLINE.load(SeqCst);
    note_lateness(i.tsc, due);
    // Absolute re-arm: the rate does not drift with the handler's latency.
    let next = due + PERIOD_TICKS.load(SeqCst);
    DEADLINE.store(next, SeqCst);
    lapic::set_tsc_deadline(next);
    lapic::eoi();
}

fn note_lateness(now: u64, due: u64) {
    if now < due {
        EARLY.fetch_add(1, SeqCst);
    } else {
        LATE_MAX.fetch_max(now - due, SeqCst);
    }
}

fn on_rtc(i: &Interrupted) {
    // Reading register C acknowledges the RTC and lowers IRQ 8 (MC146818A, "Register C"). An
    // interrupt without PF is not a period: the first one may be, when a period ended between
    // setting PIE and start_periodic's own read of C (which cleared that PF after its edge was
    // sent), as on hardware. It is counted, not measured.
    if rtc::ack() & rtc::C_PF == 0 {
        RTC_NO_PF.fetch_add(1, SeqCst);
    } else {
        record(i);
    }
    lapic::eoi();
}

fn on_pic_irq0(i: &Interrupted) {
    record(i);
    // ExtINT bypasses the local APIC's ISR: only the 8259 needs its EOI.
    pic::eoi(0);
}

/// A spurious interrupt (SDM 10.9) is legitimate on real hardware when the TPR rises between
/// INTR and INTA; it takes no EOI and is not a stray.
fn on_spurious(_: &Interrupted) {}

fn on_no_eoi(i: &Interrupted) {
    record(i);
}

fn on_low(_: &Interrupted) {
    LOW_ACTIVE.store(true, SeqCst);
    if HIGH_ACTIVE.load(SeqCst) {
        LOW_NESTED.fetch_add(1, SeqCst);
    }
    // Let a higher class in while this one is in service, and raise one.
    interrupts::enable();
    lapic::self_ipi(V_HIGH);
    for _ in 0..1000 {
        if interrupts::count(V_HIGH) > 0 {
            break;
        }
        core::hint::spin_loop();
    }
    interrupts::disable();
    LOW_ACTIVE.store(false, SeqCst);
    lapic::eoi();
}

fn on_high(_: &Interrupted) {
    HIGH_ACTIVE.store(true, SeqCst);
    if LOW_ACTIVE.load(SeqCst) {
        HIGH_NESTED.fetch_add(1, SeqCst);
    }
    HIGH_ACTIVE.store(false, SeqCst);
    lapic::eoi();
}

struct Ctx {
    clock: Clock,
    ms: u64,
    tol_ppm: u64,
    checks: Checks,
}

impl Ctx {
    /// Counts interrupts for `ms` with interrupts on (spinning: a broken source must not leave
    /// the guest halted for good), then turns the source off with `stop` and checks the rate.
    fn measure(&mut self, name: &str, expected_millihz: u64, stop: impl FnOnce()) -> u64 {
        let end = rdtsc() + self.clock.ms_to_ticks(self.ms);
        interrupts::enable();
        self.clock.wait_until(end);
        interrupts::disable();
        stop();
        let (n, first, last) = (N.load(SeqCst), FIRST.load(SeqCst), LAST.load(SeqCst));
        let rate = if n >= 3 {
            self.clock.rate_millihz(n - 2, last - first)
        } else {
            0
        };
        println!(
            "{name}: {n} interrupts in {} ms, {}.{:03} Hz (programmed {}.{:03} Hz)",
            self.ms,
            rate / 1000,
            rate % 1000,
            expected_millihz / 1000,
            expected_millihz % 1000
        );
        let mut key = [0u8; 64];
        rt::report(join(&mut key, name, "_hz_x1000"), rate);
        self.checks.check(
            name,
            n >= 3 && tsc::within_ppm(rate, expected_millihz, self.tol_ppm),
            format_args!(
                "{n} interrupts, {rate} mHz, want {expected_millihz} mHz within {} ppm",
                self.tol_ppm
            ),
        );
        // An expiry that was pending in the IRR when the source stopped is still delivered
        // (stopping a timer or masking a pin does not clear the IRR): take it before the
        // "stopped sources are silent" checks.
        self.count_for_any(500);
        reset_record();
        rate
    }

    /// Spins `us` with interrupts on.
    fn count_for_any(&self, us: u64) {
        interrupts::enable();
        self.clock.spin_us(us);
        interrupts::disable();
    }

    /// Spins `us` with interrupts on and returns how many arrived at `vector`.
    fn count_for(&self, vector: u8, us: u64) -> u64 {
        let before = interrupts::count(vector);
        interrupts::enable();
        self.clock.spin_us(us);
        interrupts::disable();
        interrupts::count(vector) - before
    }
}

fn join<'a>(buf: &'a mut [u8; 64], a: &str, b: &str) -> &'a str {
    let n = (a.len() + b.len()).min(64);
    let mut bytes = a.bytes().chain(b.bytes());
    for slot in buf[..n].iter_mut() {
        *slot = bytes.next().unwrap_or(b'_');
    }
    core::str::from_utf8(&buf[..n]).unwrap_or("bad_key")
}

fn guest_main(boot: &Boot) -> u64 {
    let c = &boot.cmdline;
    let args = (
        c.u64_or("ms", 200),
        c.u64_or("tol_ppm", 5000),
        c.u64_or("lapic_hz", 1000),
        c.u64_or("pit_hz", 100),
        c.u64_or("rtc_hz", 1024),
    );
    let (ms, tol_ppm, lapic_hz, pit_hz, rtc_hz) = match args {
        (Ok(a), Ok(b), Ok(c), Ok(d), Ok(e)) => (a, b, c, d, e),
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), ..) | (.., Err(e), _) | (.., Err(e)) => {
            return rt::usage_error(e)
        }
    };
    let xapic_rates = c.get("apic") == Some("xapic");
    let clock = match tsc::clock(c) {
        Ok(clock) => clock,
        Err(e) => return rt::usage_error(e),
    };
    let Some(rtc_rs) = u32::try_from(rtc_hz).ok().and_then(rtc::rate_select_for) else {
        return rt::usage_error("rtc_hz must be a power of two from 2 to 8192");
    };
    if lapic_hz == 0 || pit_hz == 0 || ms == 0 {
        return rt::usage_error("ms, lapic_hz and pit_hz must not be 0");
    }
    println!("timers: TSC {} kHz, {ms} ms per measurement", clock.khz);
    rt::report("tsc_khz", clock.khz);
    let mut ctx = Ctx {
        clock,
        ms,
        tol_ppm,
        checks: Checks::new(),
    };
    interrupts::install();
    for (vector, handler) in [
        (V_PERIODIC, on_lapic as interrupts::Handler),
        (V_ONESHOT, on_oneshot),
        (V_DEADLINE, on_deadline),
        (V_NOEOI, on_no_eoi),
        (V_LOW, on_low),
        (V_HIGH, on_high),
        (V_PIT, on_lapic),
        (V_RTC, on_rtc),
        (PIC_MASTER_BASE, on_pic_irq0),
        (V_SPURIOUS, on_spurious),
    ] {
        interrupts::register(vector, Some(handler));
    }

    // The state PC firmware leaves (SDM 10.4.4, 10.5.1; the platform's promise).
    let base = lapic::apic_base();
    ctx.checks.check(
        "apic_base",
        base == lapic::XAPIC_BASE | lapic::APIC_BASE_EN | lapic::APIC_BASE_BSP,
        format_args!("IA32_APIC_BASE = {base:#x}, want 0xfee00900"),
    );
    let (svr, lint0, lint1) = (
        lapic::read(reg::SVR),
        lapic::read(reg::LVT_LINT0),
        lapic::read(reg::LVT_LINT1),
    );
    ctx.checks.check(
        "apic_reset_state",
        svr & 0x1FF == 0x1FF && lint0 & 0x1_0700 == 0x700 && lint1 & 0x1_0700 == 0x400,
        format_args!("SVR {svr:#x} LINT0 {lint0:#x} LINT1 {lint1:#x}"),
    );
    let cpuid1 = test_guests::cpu::cpuid(1, 0);
    ctx.checks.check(
        "cpuid_apic_bits",
        cpuid1.edx & (1 << 9) != 0 && cpuid1.ecx & (1 << 21) != 0 && cpuid1.ecx & (1 << 24) != 0,
        format_args!("CPUID.1 ECX {:#x} EDX {:#x}", cpuid1.ecx, cpuid1.edx),
    );
    if let Some(bus) = tsc::apic_bus_khz_from_cpuid() {
        // 1 GHz, or the TSC's rate where that is slower: never faster than the TSC.
        let want = u64::from(test_guests::cpu::cpuid(tsc::TIMING_LEAF, 0).eax).min(1_000_000);
        ctx.checks.check(
            "apic_bus_khz",
            bus == want,
            format_args!("CPUID 0x40000010 EBX = {bus}, want {want}"),
        );
    }
    lapic::software_enable(V_SPURIOUS);
    lapic::set_tpr(0);
    let dest = lapic::id() as u8;

    priorities(&mut ctx);

    // Masked LVT timer: the timer counts, nothing is delivered (10.5.1).
    lapic::write(
        reg::LVT_TIMER,
        lapic::lvt_timer(V_PERIODIC, TimerMode::Periodic, true),
    );
    lapic::write(reg::TIMER_DIVIDE, lapic::divide_config(1).unwrap_or(0xB));
    lapic::write(reg::TIMER_INITIAL, 100_000); // 100 us
    let masked = ctx.count_for(V_PERIODIC, 2_000);
    lapic::stop_timer();
    ctx.checks.check(
        "lapic_masked_timer_silent",
        masked == 0,
        format_args!("{masked} interrupts from a masked LVT timer in 2 ms"),
    );

    if !xapic_rates {
        lapic::enable_x2apic();
        let base = lapic::apic_base();
        ctx.checks.check(
            "x2apic_enabled",
            base & lapic::APIC_BASE_EXTD != 0 && lapic::id() == u32::from(dest),
            format_args!("IA32_APIC_BASE = {base:#x}, x2APIC ID {}", lapic::id()),
        );
    }
    println!(
        "timers: rates through the {}",
        if lapic::is_x2apic() {
            "x2APIC MSRs"
        } else {
            "xAPIC page"
        }
    );

    // Local APIC timer, periodic: TMICT counts bus ticks (CPUID 0x4000_0010 EBX) at divide by 1.
    reset_record();
    let count = (tsc::apic_bus_hz() / lapic_hz) as u32;
    lapic::start_timer(V_PERIODIC, TimerMode::Periodic, count, 1);
    ctx.measure("lapic_periodic", lapic_hz * 1000, lapic::stop_timer);
    let after = ctx.count_for(V_PERIODIC, 5_000);
    ctx.checks.check(
        "lapic_periodic_stops",
        after == 0,
        format_args!("{after} interrupts after the timer was stopped"),
    );

    // One-shot, re-armed in the handler: the rate is 1 / (period + handler latency), so the
    // check is that no expiry comes early; the rate is reported.
    reset_record();
    PERIOD_TICKS.store(clock.us_to_ticks(1_000_000 / lapic_hz), SeqCst);
    ONESHOT_COUNT.store(u64::from(count), SeqCst);
    lapic::start_timer(V_ONESHOT, TimerMode::OneShot, 0, 1);
    ARMED_AT.store(rdtsc(), SeqCst);
    lapic::write(reg::TIMER_INITIAL, count);
    let end = rdtsc() + clock.ms_to_ticks(ms);
    interrupts::enable();
    clock.wait_until(end);
    interrupts::disable();
    lapic::stop_timer();
    let (n, first, last) = (N.load(SeqCst), FIRST.load(SeqCst), LAST.load(SeqCst));
    ctx.count_for_any(500);
    let rate = if n >= 3 {
        clock.rate_millihz(n - 2, last - first)
    } else {
        0
    };
    let late_us = clock.ticks_to_us(LATE_MAX.load(SeqCst));
    println!("lapic_oneshot: {n} expiries, {rate} mHz, latest {late_us} us after its time");
    rt::report("lapic_oneshot_hz_x1000", rate);
    rt::report("lapic_oneshot_late_max_us", late_us);
    let early = EARLY.load(SeqCst);
    ctx.checks.check(
        "lapic_oneshot",
        n >= 3 && early == 0 && rate <= lapic_hz * 1000 * (1_000_000 + tol_ppm) / 1_000_000,
        format_args!("{n} expiries, {early} before their time, {rate} mHz"),
    );
    let after = ctx.count_for(V_ONESHOT, 5_000);
    ctx.checks.check(
        "lapic_oneshot_stops",
        after == 0,
        format_args!("{after} interrupts after the timer was stopped"),
    );

    // TSC deadline, re-armed at deadline + period: exact rate, never early.
    reset_record();
    let period = clock.us_to_ticks(1_000_000 / lapic_hz);
    PERIOD_TICKS.store(period, SeqCst);
    lapic::tsc_deadline_mode(V_DEADLINE);
    let first_deadline = rdtsc() + period;
    DEADLINE.store(first_deadline, SeqCst);
    lapic::set_tsc_deadline(first_deadline);
    let expected = clock.rate_millihz(1, period);
    ctx.measure("lapic_tsc_deadline", expected, lapic::stop_timer);
    let early = EARLY.load(SeqCst);
    ctx.checks.check(
        "lapic_tsc_deadline_never_early",
        early == 0,
        format_args!("{early} interrupts before their deadline"),
    );

    // PIT channel 0 through IOAPIC pin 2 (ISA IRQ 0's override).
    let divisor = pit::divisor_for(pit_hz);
    let pin = ioapic::isa_pin(0);
    ioapic::route(pin, Route::isa(V_PIT, dest));
    reset_record();
    pit::start_periodic(divisor);
    ctx.measure("pit_ioapic", pit::rate_millihz(divisor), || {
        ioapic::mask(pin)
    });
    let period_us = 1_000_000 / pit_hz;
    let masked = ctx.count_for(V_PIT, 3 * period_us);
    ctx.checks.check(
        "ioapic_masked_pin_silent",
        masked == 0,
        format_args!("{masked} PIT interrupts through a masked pin in 3 periods"),
    );
    ioapic::unmask(pin);
    let unmasked = ctx.count_for(V_PIT, 3 * period_us);
    ioapic::mask(pin);
    pit::stop();
    ctx.checks.check(
        "ioapic_unmasked_again",
        unmasked >= 2,
        format_args!("{unmasked} PIT interrupts in 3 periods after unmasking"),
    );
    reset_record();

    // RTC periodic interrupt through IOAPIC pin 8.
    ioapic::route(ioapic::isa_pin(8), Route::isa(V_RTC, dest));
    rtc::start_periodic(rtc_rs);
    ctx.measure("rtc_periodic", rtc_hz * 1000, || {
        rtc::stop();
        ioapic::mask(ioapic::isa_pin(8));
    });
    let no_pf = RTC_NO_PF.load(SeqCst);
    ctx.checks.check(
        "rtc_register_c",
        no_pf <= 1,
        format_args!("{no_pf} interrupts without PF in register C"),
    );

    // PIT through the 8259 and LINT0 in ExtINT mode (the PIC as Linux initialises it).
    pic::init(PIC_MASTER_BASE, PIC_SLAVE_BASE);
    pic::set_all_edge();
    lapic::write(reg::LVT_LINT0, 0x700);
    pit::start_periodic(divisor);
    let masked = ctx.count_for(PIC_MASTER_BASE, 3 * period_us);
    ctx.checks.check(
        "pic_masked_irq_silent",
        masked == 0,
        format_args!("{masked} interrupts from a masked 8259 IRQ 0"),
    );
    reset_record();
    pic::set_masked(0, false);
    ctx.measure("pit_pic_extint", pit::rate_millihz(divisor), || {
        pic::set_masked(0, true)
    });
    pit::stop();
    pic::mask_all();

    let stray = interrupts::unhandled();
    ctx.checks.check(
        "no_stray_interrupts",
        stray == 0,
        format_args!("{stray} interrupts at vectors without a handler"),
    );
    rt::report("spurious_interrupts", interrupts::count(V_SPURIOUS));
    ctx.checks.finish("timers")
}

/// TPR, in-service priority, EOI and nesting, with self-IPIs (deterministic sources).
fn priorities(ctx: &mut Ctx) {
    // TPR class 4 holds vector 0x40 (class 4) in the IRR (10.8.3.1: accepted only if the
    // vector's class is above the PPR's).
    reset_record();
    lapic::set_tpr(0x40);
    lapic::self_ipi(V_PERIODIC);
    let held = ctx.count_for(V_PERIODIC, 1_000);
    let in_irr = lapic::bit(reg::IRR, V_PERIODIC);
    lapic::set_tpr(0x30);
    let delivered = ctx.count_for(V_PERIODIC, 1_000);
    ctx.checks.check(
        "tpr_blocks_then_releases",
        held == 0 && in_irr && delivered == 1,
        format_args!("{held} delivered under TPR 0x40, IRR bit {in_irr}, {delivered} after 0x30"),
    );
    lapic::set_tpr(0);

    // Without an EOI the vector stays in service and blocks its class (10.8.4, 10.8.5).
    reset_record();
    lapic::self_ipi(V_NOEOI);
    let first = ctx.count_for(V_NOEOI, 500);
    lapic::self_ipi(V_NOEOI);
    let blocked = ctx.count_for(V_NOEOI, 1_000);
    let in_service = lapic::bit(reg::ISR, V_NOEOI);
    lapic::eoi();
    let released = ctx.count_for(V_NOEOI, 1_000);
    lapic::eoi();
    let still = lapic::bit(reg::ISR, V_NOEOI);
    ctx.checks.check(
        "eoi_gates_the_class",
        first == 1 && blocked == 0 && in_service && released == 1 && !still,
        format_args!(
            "first {first}, while in service {blocked} (ISR {in_service}), after EOI \
             {released}, ISR after the second EOI {still}"
        ),
    );

    // A higher class nests over a handler that re-enabled interrupts; a lower one does not.
    lapic::self_ipi(V_LOW);
    let _ = ctx.count_for(V_LOW, 2_000);
    let (low, high) = (interrupts::count(V_LOW), interrupts::count(V_HIGH));
    let nested = HIGH_NESTED.load(SeqCst);
    ctx.checks.check(
        "higher_class_nests",
        low == 1 && high == 1 && nested == 1,
        format_args!("low {low}, high {high}, high inside low {nested}"),
    );
    // The other way round: raise the low vector while the high one is in service.
    interrupts::register(V_HIGH, Some(on_high_raising_low));
    interrupts::register(V_LOW, Some(on_low_plain));
    lapic::self_ipi(V_HIGH);
    let _ = ctx.count_for(V_HIGH, 2_000);
    let low_nested = LOW_NESTED.load(SeqCst);
    let low_total = interrupts::count(V_LOW);
    ctx.checks.check(
        "lower_class_waits",
        low_nested == 0 && low_total == 2,
        format_args!("low ran inside high {low_nested} times, low total {low_total}"),
    );
}

fn on_high_raising_low(_: &Interrupted) {
    HIGH_ACTIVE.store(true, SeqCst);
    interrupts::enable();
    lapic::self_ipi(V_LOW);
    for _ in 0..1000 {
        core::hint::spin_loop();
    }
    interrupts::disable();
    HIGH_ACTIVE.store(false, SeqCst);
    lapic::eoi();
}

fn on_low_plain(_: &Interrupted) {
    if HIGH_ACTIVE.load(SeqCst) {
        LOW_NESTED.fetch_add(1, SeqCst);
    }
    lapic::eoi();
}
