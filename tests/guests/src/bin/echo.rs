//! `echo`: reads COM1 with receive interrupts (IER bit 0, MCR OUT2, IRQ 4 through IOAPIC pin 4),
//! sleeping in HLT until bytes arrive; what the host types reaches the guest this way.
//!
//! `mode=echo` (default): prints `ready` (console), then for every line received (ended by CR
//! or LF; empty lines skipped) writes `echo: <line>` to COM1; after the line `quit` it prints
//! `PASS echo: N lines` and exits 0. If no `quit` comes within `ms=` (60000) it fails (exit 1).
//!
//! `mode=listen`: prints `listening`, then every byte that arrives (`listen: got byte 0x..`) for
//! `ms=` (10000) milliseconds, and reports `rx_bytes`; exits 0. A scenario checks that the
//! bytes typed for another VM never reach it (`rx_bytes=0`).
//!
//! `tsc_khz=N` overrides CPUID leaf 0x4000_0010.
#![cfg_attr(target_os = "none", no_std, no_main)]

use core::sync::atomic::{AtomicBool, Ordering::SeqCst};

use test_guests::cpu::rdtsc;
use test_guests::interrupts::{self, Interrupted};
use test_guests::ioapic::{self, Route};
use test_guests::lapic;
use test_guests::rt::{self, Boot};
use test_guests::uart::{self, LineBuf, Ring};
use test_guests::{println, serial_println, tsc};

test_guests::entry!(guest_main);

const V_UART: u8 = 0x44;
const V_TIMEOUT: u8 = 0x50;
const V_SPURIOUS: u8 = 0xFF;
const COM1_IRQ: u8 = 4;

static RX: Ring<1024> = Ring::new();
static TIMED_OUT: AtomicBool = AtomicBool::new(false);

fn on_uart(_: &Interrupted) {
    uart::receive(&RX);
    lapic::eoi();
}

fn on_timeout(_: &Interrupted) {
    TIMED_OUT.store(true, SeqCst);
    lapic::eoi();
}

fn guest_main(boot: &Boot) -> u64 {
    let c = &boot.cmdline;
    let listen = match c.get("mode").unwrap_or("echo") {
        "echo" => false,
        "listen" => true,
        _ => return rt::usage_error("mode must be echo or listen"),
    };
    let ms = match c.u64_or("ms", if listen { 10_000 } else { 60_000 }) {
        Ok(ms) => ms,
        Err(e) => return rt::usage_error(e),
    };
    let clock = match tsc::clock(c) {
        Ok(clock) => clock,
        Err(e) => return rt::usage_error(e),
    };

    interrupts::install();
    interrupts::register(V_UART, Some(on_uart));
    interrupts::register(V_TIMEOUT, Some(on_timeout));
    lapic::enable_x2apic();
    lapic::software_enable(V_SPURIOUS);
    // The timeout: a TSC deadline that wakes the HLT below.
    lapic::tsc_deadline_mode(V_TIMEOUT);
    lapic::set_tsc_deadline(rdtsc() + clock.ms_to_ticks(ms));
    ioapic::route(
        ioapic::isa_pin(COM1_IRQ),
        Route::isa(V_UART, lapic::id() as u8),
    );
    uart::enable_rx_interrupts();

    if listen {
        println!("listening for {ms} ms");
        let mut got = 0u64;
        loop {
            interrupts::disable();
            while let Some(byte) = RX.pop() {
                got += 1;
                println!("listen: got byte {byte:#04x}");
            }
            if TIMED_OUT.load(SeqCst) {
                break;
            }
            interrupts::enable_and_wait();
        }
        uart::disable_interrupts();
        println!("listen: {got} bytes received");
        rt::report("rx_bytes", got);
        return 0;
    }

    println!("ready");
    let mut line: LineBuf<128> = LineBuf::new();
    let mut lines = 0u64;
    loop {
        interrupts::disable();
        while let Some(byte) = RX.pop() {
            let Some(text) = line.push(byte) else {
                continue;
            };
            if text.is_empty() {
                continue;
            }
            lines += 1;
            let text = core::str::from_utf8(text).unwrap_or("(not UTF-8)");
            serial_println!("echo: {text}");
            if text == "quit" {
                lapic::stop_timer();
                uart::disable_interrupts();
                rt::report("echo_lines", lines);
                println!("PASS echo: {lines} lines");
                return 0;
            }
        }
        if TIMED_OUT.load(SeqCst) {
            uart::disable_interrupts();
            println!("FAIL echo: no quit within {ms} ms ({lines} lines)");
            return 1;
        }
        interrupts::enable_and_wait();
    }
}
