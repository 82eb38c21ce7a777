//! The host's serial console (COM1) and the `log` backend that writes to it.
//!
//! Every line of the hypervisor's output goes through here, so that VM console lines and log
//! records never interleave inside a line. Format: `[LEVEL] CONTEXT: message` (see
//! docs/architecture.md); a record's target is its context (`hv`, `vm NAME`, `manifest`, ...).
//!
//! Output is buffered: [`print`] appends to a ring of [`RING_BYTES`] and [`pump`] moves bytes to
//! the UART only as fast as its transmitter takes them (16 bytes whenever the FIFO is empty),
//! without waiting. A byte takes 87 us on the wire at 115200 baud, so writing synchronously would
//! stop the only CPU (and every VM) for as long as the output takes; the scheduler pumps at every
//! VM exit and scheduling decision instead. Only when the ring is full does [`print`] wait for
//! room, and [`drain`] empties it (at shutdown). VMs' console lines enter the ring only when
//! there is room ([`try_print_line`]); until then they wait in their VM's queue
//! (hv_vm::console), so a VM that prints faster than the line can carry is throttled and no
//! output is lost.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use log::{LevelFilter, Log, Metadata, Record};
use spin::Mutex;
use uart_16550::SerialPort;

use crate::platform::{inb, outb};

const COM1: u16 = 0x3f8;
/// Bytes of output the ring holds.
pub const RING_BYTES: usize = 32 * 1024;
/// The 16550's transmit FIFO.
const FIFO_BYTES: usize = 16;
const LSR_THR_EMPTY: u8 = 1 << 5;
const LSR_TX_IDLE: u8 = 1 << 6;

struct Ring {
    buf: [u8; RING_BYTES],
    head: usize,
    len: usize,
}

impl Ring {
    fn free(&self) -> usize {
        RING_BYTES - self.len
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.buf[(self.head + self.len) % RING_BYTES] = b;
            self.len += 1;
        }
    }

    /// Sends up to one FIFO's worth if the transmitter is empty; returns whether it sent any.
    fn pump_once(&mut self) -> bool {
        // SAFETY: COM1's line status and transmit registers; only this module drives COM1.
        if self.len == 0 || unsafe { inb(COM1 + 5) } & LSR_THR_EMPTY == 0 {
            return false;
        }
        for _ in 0..FIFO_BYTES.min(self.len) {
            // SAFETY: as above; the FIFO was empty, so it takes FIFO_BYTES bytes.
            unsafe { outb(COM1, self.buf[self.head]) };
            self.head = (self.head + 1) % RING_BYTES;
            self.len -= 1;
        }
        PENDING.store(self.len != 0, Ordering::Relaxed);
        true
    }

    /// Sends everything buffered, giving up after a bounded number of polls in a row that find
    /// the transmitter busy (a UART that never drains must not hang a shutdown or a panic
    /// report). The bound is per FIFO, not for the whole ring: a slow line with a full ring
    /// (tens of KiB at 115200 baud, seconds) takes many more polls in all than any one FIFO.
    fn flush(&mut self) {
        let mut busy: u64 = 0;
        while self.len > 0 && busy < 100_000_000 {
            if self.pump_once() {
                busy = 0;
            } else {
                busy += 1;
            }
        }
    }

    /// Waits until at least `n` bytes are free.
    fn make_room(&mut self, n: usize) {
        while self.free() < n.min(RING_BYTES) {
            if !self.pump_once() {
                core::hint::spin_loop();
            }
        }
    }
}

/// `fmt::Write` into the ring, waiting for room as needed.
struct RingWriter<'a>(&'a mut Ring);

impl Write for RingWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for chunk in s.as_bytes().chunks(RING_BYTES / 2) {
            self.0.make_room(chunk.len());
            self.0.push(chunk);
        }
        PENDING.store(true, Ordering::Relaxed);
        Ok(())
    }
}

static RING: Mutex<Ring> = Mutex::new(Ring {
    buf: [0; RING_BYTES],
    head: 0,
    len: 0,
});
/// The ring holds bytes: lets [`pump`] return without the lock when there is nothing to send.
static PENDING: AtomicBool = AtomicBool::new(false);

/// Initializes COM1 at 115200 8N1 with its FIFO on, and installs the logger at `Info`.
pub fn init() {
    // SAFETY: 0x3F8 is COM1 on every PC-compatible machine; nothing else in the hypervisor
    // drives it (the VMs' COM1 is emulated and never reaches the hardware port). The crate's
    // init leaves 38400 baud; the divisor latch (LCR bit 7) is set to 1 for 115200, then 8N1.
    unsafe {
        let mut port = SerialPort::new(COM1);
        port.init();
        outb(COM1 + 3, 0x80);
        outb(COM1, 1);
        outb(COM1 + 1, 0);
        outb(COM1 + 3, 0x03);
        outb(COM1 + 1, 0); // no UART interrupts: the ring is pumped by polling
    }
    // Can fail only if a logger was already set, which `init` runs before.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(LevelFilter::Info);
}

/// Appends formatted text to the output, under the console lock; waits only if the ring is full.
pub fn print(args: fmt::Arguments) {
    let mut ring = RING.lock();
    let _ = RingWriter(&mut ring).write_fmt(args);
    ring.pump_once();
}

/// Appends `line` if the ring has room for all of it now; returns whether it did.
pub fn try_print_line(line: &str) -> bool {
    let mut ring = RING.lock();
    if ring.free() < line.len() {
        return false;
    }
    ring.push(line.as_bytes());
    PENDING.store(true, Ordering::Relaxed);
    true
}

/// Moves buffered output to the UART as far as its transmitter takes it now, without waiting.
#[inline]
pub fn pump() {
    if PENDING.load(Ordering::Relaxed) {
        RING.lock().pump_once();
    }
}

/// Whether output waits in the ring for the UART.
pub fn output_pending() -> bool {
    PENDING.load(Ordering::Relaxed)
}

/// Hands the bytes the UART has received (typed on the console) to `f`, at most one FIFO's
/// worth per call, without waiting. A line with nothing to read (no UART: LSR reads 0xFF) gives
/// nothing either.
pub fn read_input(mut f: impl FnMut(u8)) {
    const LSR_DATA_READY: u8 = 1 << 0;
    for _ in 0..FIFO_BYTES {
        // SAFETY: COM1's line status and receive registers; only this module drives COM1.
        let lsr = unsafe { inb(COM1 + 5) };
        if lsr == 0xff || lsr & LSR_DATA_READY == 0 {
            return;
        }
        // SAFETY: as above; data is ready, so reading RBR takes one received byte.
        f(unsafe { inb(COM1) });
    }
}

/// Writes to the port even when the lock is held: for panics and fatal exceptions, when the
/// holder may never release it. What is still in the ring comes first if the lock is free.
pub fn emergency_print(args: fmt::Arguments) {
    if let Some(mut ring) = RING.try_lock() {
        ring.flush();
    }
    // SAFETY: same port as `init`; used only on the way to a halt, when no other writer runs.
    let mut port = unsafe { SerialPort::new(COM1) };
    let _ = port.write_fmt(args);
}

/// Sends everything buffered and waits until the UART has sent every byte (LSR bit 6,
/// transmitter empty), so that nothing is lost when the machine stops right after; bounded, in
/// case there is no UART at all.
pub fn drain() {
    RING.lock().flush();
    for _ in 0..1_000_000 {
        // SAFETY: reading COM1's line status register has no side effects.
        if unsafe { inb(COM1 + 5) } & LSR_TX_IDLE != 0 {
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
