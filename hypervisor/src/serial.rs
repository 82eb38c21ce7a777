//! The host's serial console (COM1) and the `log` backend that writes to it.
//!
//! Every line of the hypervisor's output goes through here, so that VM console lines and log
//! records never interleave inside a line. Format: `[LEVEL] CONTEXT: message` (see
//! docs/architecture.md); a record's target is its context (`hv`, `vm NAME`, `manifest`, ...).

use core::fmt::{self, Write};
use log::{LevelFilter, Log, Metadata, Record};
use spin::Mutex;
use uart_16550::SerialPort;

const COM1: u16 = 0x3f8;

static PORT: Mutex<Option<SerialPort>> = Mutex::new(None);

/// Initializes COM1 (115200 8N1) and installs the logger at `Info`.
pub fn init() {
    // SAFETY: 0x3F8 is COM1 on every PC-compatible machine; nothing else in the hypervisor
    // drives it (the VMs' COM1 is emulated and never reaches the hardware port).
    let mut port = unsafe { SerialPort::new(COM1) };
    port.init();
    *PORT.lock() = Some(port);
    // Can fail only if a logger was already set, which `init` runs before.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(LevelFilter::Info);
}

/// Writes formatted text to the console, under the console lock.
pub fn print(args: fmt::Arguments) {
    if let Some(port) = PORT.lock().as_mut() {
        let _ = port.write_fmt(args);
    }
}

/// Writes to the port even when the lock is held: for panics and fatal exceptions, when the
/// holder may never release it.
pub fn emergency_print(args: fmt::Arguments) {
    // SAFETY: same port as `init`; used only on the way to a halt, when no other writer runs.
    let mut port = unsafe { SerialPort::new(COM1) };
    let _ = port.write_fmt(args);
}

/// Waits until the UART has sent every byte (LSR bit 6, transmitter empty), so that nothing
/// is lost when the machine stops right after; bounded, in case there is no UART at all.
pub fn drain() {
    for _ in 0..1_000_000 {
        // SAFETY: reading COM1's line status register has no side effects.
        if unsafe { crate::platform::inb(COM1 + 5) } & 0x40 != 0 {
            return;
        }
    }
}

struct Logger;

static LOGGER: Logger = Logger;

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            print(format_args!(
                "[{}] {}: {}\n",
                record.level(),
                record.target(),
                record.args()
            ));
        }
    }

    fn flush(&self) {}
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::serial::print(format_args!("{}\n", format_args!($($arg)*))) };
}
