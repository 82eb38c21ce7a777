//! `idler`: an idle guest, as the idle-VM detector and working-set reclaim see one: some memory
//! filled once, then sleep in HLT between timer ticks, touching a few pages on each, and answer
//! what is typed on the serial port.
//!
//! At start it fills `pages=N` pages (256) from 2 MiB up with [`test_guests::pages`] content for
//! `seed=S` (its VM id + 1): zero, shared, similar, compressible and random pages, as a guest's
//! memory holds: a fifth of each (`mix=guest`, the default), or in the proportions of idle
//! Linux guests (`mix=linux`, see [`test_guests::pages::Mix::Linux`]). Then a local APIC timer ticks at `hz=N` (100) in TSC-deadline mode and the
//! guest executes `STI; HLT` between ticks; each tick reads one word of each of the first
//! `ws=N` (4) pages of the region, as an idle kernel's timer handler touches a few pages: its
//! working set. Lines typed on COM1 (receive interrupts, IOAPIC pin 4):
//! - `ping`: answers `pong NAME` on COM1;
//! - `check`: answers `checking NAME` at once, then reads the whole region back against its
//!   fill: `check NAME ok` or `check NAME CORRUPTED` on COM1;
//! - `stats`: reports the idle fields of the VM-stats hypercall (`idle_state` 0 active, 1 idle,
//!   2 dormant; `idle_changes`, `idle_us`, `dormant_us`);
//! - `quit`: reports `idler_ticks` (ticks handled), `idler_ticks_behind` (deadlines passed whose
//!   interrupt has not come yet) and `idler_max_late_us` (the latest a tick came after its
//!   deadline), and exits, 0 when every `check` passed, 1 otherwise.
//!
//! Without `quit` within `ms=N` (120000) milliseconds of its own time it prints a FAIL line and
//! exits 1. `tsc_khz=N` overrides CPUID leaf 0x4000_0010.
#![cfg_attr(target_os = "none", no_std, no_main)]

use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

use guest_abi::guest;
use test_guests::interrupts::{self, Interrupted};
use test_guests::ioapic::{self, Route};
use test_guests::lapic;
use test_guests::pages::{expected, fill, region_checksum, Mix, PAGE};
use test_guests::rt::{self, Boot, EXIT_USAGE};
use test_guests::uart::{self, LineBuf, Ring};
use test_guests::{println, serial_println, tsc};

test_guests::entry!(guest_main);

const V_TICK: u8 = 0x40;
const V_UART: u8 = 0x44;
const V_SPURIOUS: u8 = 0xFF;
const COM1_IRQ: u8 = 4;
/// First byte of the region: above the image (linked at 1 MiB) and below the stack.
const REGION: u64 = 2 << 20;
/// Room left for the stack under the top of memory.
const STACK_ROOM: u64 = 256 << 10;

static RX: Ring<256> = Ring::new();
static TICKS: AtomicU64 = AtomicU64::new(0);
static NEXT_DEADLINE: AtomicU64 = AtomicU64::new(0);
static PERIOD: AtomicU64 = AtomicU64::new(0);
static WORKING_SET: AtomicU64 = AtomicU64::new(0);
/// The most TSC ticks a tick's interrupt came after its deadline.
static MAX_LATE: AtomicU64 = AtomicU64::new(0);
/// What the working-set reads add up to, so that they cannot be optimized away.
static SINK: AtomicU64 = AtomicU64::new(0);

fn on_tick(_: &Interrupted) {
    let due = NEXT_DEADLINE.load(SeqCst);
    MAX_LATE.fetch_max(test_guests::cpu::rdtsc().saturating_sub(due), SeqCst);
    // From the last deadline, not from now: a tick that comes late is followed at once by the
    // ones it delayed, and none is lost.
    let next = due + PERIOD.load(SeqCst);
    NEXT_DEADLINE.store(next, SeqCst);
    lapic::set_tsc_deadline(next);
    let mut sum = 0u64;
    for k in 0..WORKING_SET.load(SeqCst) {
        // SAFETY: k < ws <= pages, so the word is inside the region, which is this VM's own
        // RAM (checked in guest_main); a volatile read of an initialized u64.
        sum = sum.wrapping_add(unsafe {
            core::ptr::read_volatile((REGION + k * PAGE as u64 + 8 * k) as *const u64)
        });
    }
    SINK.fetch_add(sum, SeqCst);
    TICKS.fetch_add(1, SeqCst);
    lapic::eoi();
}

fn on_uart(_: &Interrupted) {
    uart::receive(&RX);
    lapic::eoi();
}

fn guest_main(boot: &Boot) -> u64 {
    let c = &boot.cmdline;
    let info = match guest::vm_info() {
        Ok(info) => info,
        Err(e) => {
            println!("idler: vm_info failed: {e:?}");
            return 1;
        }
    };
    let name = core::str::from_utf8(&info.name[..info.name_len as usize]).unwrap_or("?");
    let (pages, seed, hz, ws, ms) = match (
        c.u64_or("pages", 256),
        c.u64_or("seed", u64::from(info.vm_id) + 1),
        c.u64_or("hz", 100),
        c.u64_or("ws", 4),
        c.u64_or("ms", 120_000),
    ) {
        (Ok(p), Ok(s), Ok(h), Ok(w), Ok(m)) => (p, s, h, w, m),
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), ..) | (.., Err(e), _) | (.., Err(e)) => {
            return rt::usage_error(e)
        }
    };
    let Some(mix) = Mix::parse(c.get("mix").unwrap_or("guest")) else {
        return rt::usage_error("mix must be guest, random or linux");
    };
    let end = REGION + pages * PAGE as u64;
    if pages == 0 || ws > pages || seed > 9999 || !(1..=1000).contains(&hz) {
        return rt::usage_error("need 1 <= pages, ws <= pages, seed <= 9999, 1 <= hz <= 1000");
    }
    if end + STACK_ROOM > boot.memory_bytes() {
        println!(
            "idler: {pages} pages do not fit in {:#x}",
            boot.memory_bytes()
        );
        return EXIT_USAGE;
    }
    let clock = match tsc::clock(c) {
        Ok(clock) => clock,
        Err(e) => return rt::usage_error(e),
    };
    // SAFETY: REGION..end is this VM's own RAM (checked above against its size), identity-mapped
    // by the boot page tables, and used by nothing else: the image lies below 2 MiB and the
    // stack in the top STACK_ROOM bytes. The tick handler only reads it.
    let region =
        unsafe { core::slice::from_raw_parts_mut(REGION as *mut u8, (pages as usize) * PAGE) };
    for (k, page) in region.chunks_exact_mut(PAGE).enumerate() {
        let page: &mut [u8; PAGE] = page.try_into().unwrap_or_else(|_| unreachable!());
        fill(page, k as u64, seed, false, mix);
    }
    let want = expected(pages, seed, false, mix);

    interrupts::install();
    interrupts::register(V_TICK, Some(on_tick));
    interrupts::register(V_UART, Some(on_uart));
    lapic::enable_x2apic();
    lapic::software_enable(V_SPURIOUS);
    ioapic::route(
        ioapic::isa_pin(COM1_IRQ),
        Route::isa(V_UART, lapic::id() as u8),
    );
    uart::enable_rx_interrupts();
    let period = clock.us_to_ticks(1_000_000 / hz);
    let max_ticks = ms.saturating_mul(hz) / 1000;
    PERIOD.store(period, SeqCst);
    WORKING_SET.store(ws, SeqCst);
    let first_deadline = test_guests::cpu::rdtsc() + period;
    NEXT_DEADLINE.store(first_deadline, SeqCst);
    lapic::tsc_deadline_mode(V_TICK);
    lapic::set_tsc_deadline(NEXT_DEADLINE.load(SeqCst));
    println!("idler: {pages} pages filled (seed {seed}), ticking at {hz} Hz, working set {ws} pages; ready");

    let mut line: LineBuf<64> = LineBuf::new();
    let (mut checks, mut failed) = (0u64, 0u64);
    loop {
        interrupts::disable();
        while let Some(byte) = RX.pop() {
            let Some(text) = line.push(byte) else {
                continue;
            };
            match text {
                b"" => {}
                b"ping" => serial_println!("pong {name}"),
                b"check" => {
                    // Acknowledged at once: the answer delay the hypervisor measures is the
                    // wake-up's, not the time the read-back takes.
                    serial_println!("checking {name}");
                    checks += 1;
                    let ok = region_checksum(core::hint::black_box(&*region)) == want;
                    failed += u64::from(!ok);
                    serial_println!("check {name} {}", if ok { "ok" } else { "CORRUPTED" });
                }
                b"stats" => match guest::vm_stats() {
                    Ok(s) => {
                        rt::report("idle_state", s.idle_state);
                        rt::report("idle_changes", s.idle_changes);
                        rt::report("idle_us", s.idle_us);
                        rt::report("dormant_us", s.dormant_us);
                    }
                    Err(e) => {
                        println!("idler: vm_stats failed: {e:?}");
                        failed += 1;
                    }
                },
                b"quit" => {
                    lapic::stop_timer();
                    uart::disable_interrupts();
                    let ticks = TICKS.load(SeqCst);
                    rt::report("idler_ticks", ticks);
                    // Deadlines passed whose interrupt had not come yet: ticks delayed (a
                    // dormant VM's may be, by the hypervisor's timer slack), never lost.
                    let due =
                        (test_guests::cpu::rdtsc().saturating_sub(first_deadline)) / period + 1;
                    rt::report("idler_ticks_behind", due.saturating_sub(ticks));
                    rt::report(
                        "idler_max_late_us",
                        clock.ticks_to_us(MAX_LATE.load(SeqCst)),
                    );
                    println!("idler: quit after {checks} checks, {failed} failed");
                    return u64::from(failed > 0);
                }
                other => serial_println!(
                    "idler: unknown command {:?}",
                    core::str::from_utf8(other).unwrap_or("(not UTF-8)")
                ),
            }
        }
        if TICKS.load(SeqCst) >= max_ticks {
            lapic::stop_timer();
            uart::disable_interrupts();
            println!("FAIL idler: no quit within {ms} ms");
            return 1;
        }
        interrupts::enable_and_wait();
    }
}
