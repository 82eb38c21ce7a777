//! `sleeper`: a periodic tick with HLT in between, measuring how late each tick's handler runs
//! after its deadline, in the guest's own TSC: what an idle guest with a timer tick (a Linux
//! guest at HZ=100) asks of the scheduler when other VMs compute.
//!
//! Command line:
//! - `ticks=N` (100): how many ticks to sleep through;
//! - `hz=N` (100): the tick rate;
//! - `mode=deadline` (default: the local APIC timer in TSC-deadline mode, re-armed at the
//!   previous deadline + one period, so every deadline is an exact TSC value) or
//!   `mode=periodic` (the APIC timer in periodic mode; deadlines are the arming time + k
//!   periods, so the arming's own latency counts too);
//! - `phase_us=N` (0): the first deadline is the next multiple of the period after now, plus N
//!   (VMs sharing the TSC's time base then tick at staggered, repeatable moments);
//! - `tsc_khz=N` to override CPUID leaf 0x4000_0010.
//!
//! Between ticks the guest executes `STI; HLT`. At the end: `wake_p50_us`, `wake_p99_us`,
//! `wake_max_us` and `ticks` are reported. Checks: every tick arrived (one handler run per
//! deadline, none missed or doubled), none before its deadline. Exit 0 only if both hold.
#![cfg_attr(target_os = "none", no_std, no_main)]

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

use test_guests::checks::Checks;
use test_guests::cpu::rdtsc;
use test_guests::interrupts::{self, Interrupted};
use test_guests::lapic::{self, TimerMode};
use test_guests::rt::{self, Boot};
use test_guests::{println, tsc};

test_guests::entry!(guest_main);

const V_TICK: u8 = 0x40;
const V_SPURIOUS: u8 = 0xFF;
const MAX_TICKS: usize = 4096;

/// Latencies in TSC ticks, one per tick; written by the handler only, read after the timer
/// stopped.
struct Latencies(UnsafeCell<[u64; MAX_TICKS]>);
// SAFETY: one vCPU; the handler writes slot `n` before publishing `n + 1` in TICKS, and the
// main code reads only after the timer is stopped and interrupts are off.
unsafe impl Sync for Latencies {}
static LATENCIES: Latencies = Latencies(UnsafeCell::new([0; MAX_TICKS]));

static TICKS: AtomicU64 = AtomicU64::new(0);
static WANTED: AtomicU64 = AtomicU64::new(0);
static NEXT_DEADLINE: AtomicU64 = AtomicU64::new(0);
static PERIOD: AtomicU64 = AtomicU64::new(0);
static EARLY: AtomicU64 = AtomicU64::new(0);
static EXTRA: AtomicU64 = AtomicU64::new(0);
static DEADLINE_MODE: AtomicU64 = AtomicU64::new(1);

fn on_tick(i: &Interrupted) {
    let n = TICKS.load(SeqCst);
    let due = NEXT_DEADLINE.load(SeqCst);
    if n >= WANTED.load(SeqCst) {
        EXTRA.fetch_add(1, SeqCst);
        lapic::eoi();
        return;
    }
    if i.tsc < due {
        EARLY.fetch_add(1, SeqCst);
    }
    // SAFETY: see `Latencies`; n < WANTED <= MAX_TICKS.
    unsafe { (*LATENCIES.0.get())[n as usize] = i.tsc.saturating_sub(due) };
    let next = due + PERIOD.load(SeqCst);
    NEXT_DEADLINE.store(next, SeqCst);
    if DEADLINE_MODE.load(SeqCst) == 1 {
        lapic::set_tsc_deadline(if n + 1 < WANTED.load(SeqCst) { next } else { 0 });
    }
    TICKS.store(n + 1, SeqCst);
    lapic::eoi();
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    // Nearest rank: the smallest value with at least p% of the samples at or below it.
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn guest_main(boot: &Boot) -> u64 {
    let c = &boot.cmdline;
    let (ticks, hz, phase_us) = match (
        c.u64_or("ticks", 100),
        c.u64_or("hz", 100),
        c.u64_or("phase_us", 0),
    ) {
        (Ok(t), Ok(h), Ok(p)) => (t, h, p),
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => return rt::usage_error(e),
    };
    if ticks == 0 || ticks > MAX_TICKS as u64 || hz == 0 || hz > 10_000 {
        return rt::usage_error("ticks must be 1..=4096 and hz 1..=10000");
    }
    let deadline_mode = match c.get("mode").unwrap_or("deadline") {
        "deadline" => true,
        "periodic" => false,
        _ => return rt::usage_error("mode must be deadline or periodic"),
    };
    let clock = match tsc::clock(c) {
        Ok(clock) => clock,
        Err(e) => return rt::usage_error(e),
    };
    let period = clock.us_to_ticks(1_000_000 / hz);
    let mode_name = if deadline_mode {
        "deadline"
    } else {
        "periodic"
    };
    println!(
        "sleeper: {ticks} ticks at {hz} Hz ({mode_name}), TSC {} kHz",
        clock.khz
    );

    interrupts::install();
    interrupts::register(V_TICK, Some(on_tick));
    lapic::enable_x2apic();
    lapic::software_enable(V_SPURIOUS);
    WANTED.store(ticks, SeqCst);
    PERIOD.store(period, SeqCst);
    DEADLINE_MODE.store(u64::from(deadline_mode), SeqCst);

    let start = rdtsc();
    if deadline_mode {
        let first = (start / period + 1) * period + clock.us_to_ticks(phase_us) % period;
        let first = if first <= start {
            first + period
        } else {
            first
        };
        NEXT_DEADLINE.store(first, SeqCst);
        lapic::tsc_deadline_mode(V_TICK);
        lapic::set_tsc_deadline(first);
    } else {
        // The period in APIC bus ticks (CPUID 0x4000_0010 EBX) at divide by 1.
        // The TSC is read before the timer starts, so no expiry can look early.
        let count = (tsc::apic_bus_hz() / hz) as u32;
        NEXT_DEADLINE.store(rdtsc() + period, SeqCst);
        lapic::start_timer(V_TICK, TimerMode::Periodic, count, 1);
    }
    interrupts::wait_until(|| TICKS.load(SeqCst) >= ticks);
    lapic::stop_timer();
    let elapsed = rdtsc() - start;
    // A tick that was already pending when the timer stopped would still be delivered.
    interrupts::enable();
    clock.spin_us(2 * 1_000_000 / hz);
    interrupts::disable();

    // SAFETY: the timer is stopped and interrupts are off: nothing writes the array any more.
    let lat = unsafe { &mut (&mut *LATENCIES.0.get())[..ticks as usize] };
    // The five latest ticks, by number, before sorting: when they happened says why.
    let mut late: [(u64, usize); 5] = [(0, 0); 5];
    for (n, &l) in lat.iter().enumerate() {
        if let Some(slot) = late.iter_mut().min_by_key(|(v, _)| *v) {
            if l > slot.0 {
                *slot = (l, n);
            }
        }
    }
    late.sort_unstable_by(|a, b| b.cmp(a));
    for (l, n) in late {
        println!("sleeper: tick {n} came {} us late", clock.ticks_to_us(l));
    }
    lat.sort_unstable();
    let us = |t: u64| clock.ticks_to_us(t);
    let (p50, p99, max) = (
        us(percentile(lat, 50)),
        us(percentile(lat, 99)),
        us(*lat.last().unwrap_or(&0)),
    );
    println!(
        "sleeper: {ticks} ticks in {} ms; wake latency p50 {p50} us, p99 {p99} us, max {max} us",
        clock.ticks_to_us(elapsed) / 1000
    );
    rt::report("ticks", TICKS.load(SeqCst));
    rt::report("wake_p50_us", p50);
    rt::report("wake_p99_us", p99);
    rt::report("wake_max_us", max);

    let mut checks = Checks::new();
    let (early, extra) = (EARLY.load(SeqCst), EXTRA.load(SeqCst));
    checks.check(
        "sleeper_every_tick_once",
        TICKS.load(SeqCst) == ticks && extra == 0,
        format_args!(
            "{} ticks of {ticks}, {extra} after the last",
            TICKS.load(SeqCst)
        ),
    );
    checks.check(
        "sleeper_never_early",
        early == 0,
        format_args!("{early} ticks before their deadline"),
    );
    checks.finish("sleeper")
}
