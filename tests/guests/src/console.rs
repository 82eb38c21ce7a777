//! Guest output: the console hypercall and the emulated 16550 UART.
//!
//! Both reach the hypervisor's log as `NAME | text` lines. [`Console`] buffers a line and issues
//! one `console_write` hypercall per line (or per full buffer), so that a line costs one VM exit
//! and arrives whole. [`Uart`] writes byte by byte to COM1 (0x3F8), polling the line status
//! register for "transmitter holding register empty" as a driver for real hardware would; every
//! byte is a VM exit, which is what the scenarios want to exercise.

use core::fmt::{self, Write};

use guest_abi::guest;

use crate::cpu;

/// Bytes buffered before a [`Console`] writes without waiting for the end of the line.
const CONSOLE_BUFFER: usize = 256;

/// `fmt::Write` over the console hypercall, flushed at every `\n`, when full, and when dropped.
pub struct Console {
    buf: [u8; CONSOLE_BUFFER],
    len: usize,
}

impl Console {
    /// An empty writer.
    pub const fn new() -> Self {
        Self {
            buf: [0; CONSOLE_BUFFER],
            len: 0,
        }
    }

    /// Sends what is buffered.
    pub fn flush(&mut self) {
        if self.len > 0 {
            // Nothing sensible to do if the console refuses a buffer of our own memory: there is
            // no other channel to complain through (the UART would do, but would interleave).
            let _ = guest::console_write(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

impl Default for Console {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &byte in s.as_bytes() {
            self.buf[self.len] = byte;
            self.len += 1;
            if byte == b'\n' || self.len == CONSOLE_BUFFER {
                self.flush();
            }
        }
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}

/// `fmt::Write` over the emulated 16550 UART at COM1.
pub struct Uart {
    base: u16,
}

impl Uart {
    /// Base port of COM1.
    pub const COM1: u16 = 0x3F8;
    /// Line status register, relative to the base.
    const LSR: u16 = 5;
    /// LSR bit 5: the transmitter holding register is empty.
    const LSR_THR_EMPTY: u8 = 1 << 5;
    /// How many LSR polls to wait for room before writing anyway. Our emulated UART is always
    /// ready (LSR reads 0x60); the bound only keeps a broken device model from hanging the guest.
    const POLL_LIMIT: u32 = 100_000;

    /// The UART at COM1.
    pub const fn com1() -> Self {
        Self { base: Self::COM1 }
    }

    /// Writes one byte once the transmitter has room.
    pub fn write_byte(&mut self, byte: u8) {
        for _ in 0..Self::POLL_LIMIT {
            // SAFETY: COM1's line status register; reading it has no side effect on a 16550.
            if unsafe { cpu::inb(self.base + Self::LSR) } & Self::LSR_THR_EMPTY != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        // SAFETY: COM1's transmitter holding register; writing sends one byte.
        unsafe { cpu::outb(self.base, byte) };
    }
}

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // The hypervisor ends log lines at `\n` itself; no `\r` (it would end up in the log).
        for &byte in s.as_bytes() {
            self.write_byte(byte);
        }
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments<'_>) {
    let mut console = Console::new();
    // Console never fails; a `Display` impl that fails only truncates the line.
    let _ = console.write_fmt(args);
}

#[doc(hidden)]
pub fn _serial_print(args: fmt::Arguments<'_>) {
    let _ = Uart::com1().write_fmt(args);
}

/// Prints through the console hypercall (one hypercall per line).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(::core::format_args!($($arg)*)) };
}

/// Prints a line through the console hypercall (one hypercall per line).
#[macro_export]
macro_rules! println {
    () => { $crate::console::_print(::core::format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::console::_print(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}

/// Prints through the emulated UART at COM1 (one port write per byte).
#[macro_export]
macro_rules! serial_print {
    ($($arg:tt)*) => { $crate::console::_serial_print(::core::format_args!($($arg)*)) };
}

/// Prints a line through the emulated UART at COM1 (one port write per byte).
#[macro_export]
macro_rules! serial_println {
    () => { $crate::console::_serial_print(::core::format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::console::_serial_print(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}
