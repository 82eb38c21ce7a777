//! Interrupt-driven reception on the 16550A at COM1 (National Semiconductor PC16550D
//! datasheet), for guests that read what the host types.
//!
//! Owns: the UART's interrupt set-up ([`enable_rx_interrupts`]: 8N1, FIFOs, IER bit 0, MCR OUT2,
//! which gates the UART's interrupt onto IRQ 4 on a PC), the receive path of an interrupt handler
//! ([`receive`]: read RBR while LSR.DR), a single-producer single-consumer [`Ring`] between
//! handler and main code, and [`LineBuf`], which assembles lines ended by CR or LF. Output stays
//! in [`crate::console::Uart`].

use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use crate::cpu;

pub const COM1: u16 = 0x3F8;
/// Register offsets (DLAB = 0).
pub const RBR: u16 = 0;
pub const IER: u16 = 1;
pub const IIR: u16 = 2;
pub const FCR: u16 = 2;
pub const LCR: u16 = 3;
pub const MCR: u16 = 4;
pub const LSR: u16 = 5;
pub const MSR: u16 = 6;
/// IER bit 0: received data available interrupt; bit 1: THR empty interrupt.
pub const IER_RX: u8 = 1 << 0;
pub const IER_THRE: u8 = 1 << 1;
/// MCR: DTR, RTS, OUT2 (the PC's interrupt gate).
pub const MCR_DTR_RTS_OUT2: u8 = 0b1011;
/// LSR bit 0: data ready.
pub const LSR_DR: u8 = 1 << 0;
/// IIR bit 0: clear when an interrupt is pending.
pub const IIR_NONE: u8 = 1 << 0;

fn inb(offset: u16) -> u8 {
    // SAFETY: COM1's registers; reading RBR/IIR/LSR/MSR has the documented side effects only.
    unsafe { cpu::inb(COM1 + offset) }
}

fn outb(offset: u16, value: u8) {
    // SAFETY: COM1's registers.
    unsafe { cpu::outb(COM1 + offset, value) }
}

/// 8N1, FIFOs on and cleared with a trigger level of one byte (FCR 0x07), receive interrupt on,
/// OUT2 set; then reads LSR, RBR, IIR and MSR once to clear anything stale.
pub fn enable_rx_interrupts() {
    outb(LCR, 0x03);
    outb(FCR, 0x07);
    outb(IER, IER_RX);
    outb(MCR, MCR_DTR_RTS_OUT2);
    let _ = (inb(LSR), inb(RBR), inb(IIR), inb(MSR));
}

/// A received byte, if one is waiting (polled: no interrupt needed).
pub fn poll_byte() -> Option<u8> {
    (inb(LSR) & LSR_DR != 0).then(|| inb(RBR))
}

/// Turns the UART's interrupts off (IER 0, OUT2 clear).
pub fn disable_interrupts() {
    outb(IER, 0);
    outb(MCR, 0b0011);
}

/// Moves every received byte into `ring` (for an interrupt handler); returns how many. Bytes that
/// do not fit are counted by the ring as dropped.
pub fn receive<const N: usize>(ring: &Ring<N>) -> usize {
    let mut n = 0;
    // Bounded: a broken device that always says "data ready" must not hang the handler.
    while n < 4096 && inb(LSR) & LSR_DR != 0 {
        ring.push(inb(RBR));
        n += 1;
    }
    n
}

/// A ring of bytes: one producer (the interrupt handler), one consumer (the main code).
pub struct Ring<const N: usize> {
    bytes: [AtomicU8; N],
    head: AtomicUsize,
    tail: AtomicUsize,
    dropped: AtomicUsize,
}

impl<const N: usize> Ring<N> {
    pub const fn new() -> Self {
        Self {
            bytes: [const { AtomicU8::new(0) }; N],
            head: AtomicUsize::new(0),
            tail: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
        }
    }

    /// Appends `byte`, or counts it as dropped when full.
    pub fn push(&self, byte: u8) {
        let head = self.head.load(Ordering::SeqCst);
        if head - self.tail.load(Ordering::SeqCst) == N {
            self.dropped.fetch_add(1, Ordering::SeqCst);
            return;
        }
        self.bytes[head % N].store(byte, Ordering::SeqCst);
        self.head.store(head + 1, Ordering::SeqCst);
    }

    /// Takes the oldest byte.
    pub fn pop(&self) -> Option<u8> {
        let tail = self.tail.load(Ordering::SeqCst);
        if tail == self.head.load(Ordering::SeqCst) {
            return None;
        }
        let byte = self.bytes[tail % N].load(Ordering::SeqCst);
        self.tail.store(tail + 1, Ordering::SeqCst);
        Some(byte)
    }

    pub fn is_empty(&self) -> bool {
        self.tail.load(Ordering::SeqCst) == self.head.load(Ordering::SeqCst)
    }

    /// Bytes pushed so far (dropped ones not included).
    pub fn pushed(&self) -> usize {
        self.head.load(Ordering::SeqCst)
    }

    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }
}

impl<const N: usize> Default for Ring<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// Assembles lines from bytes: CR or LF ends a line (a terminal's Enter sends CR; CR LF gives
/// one line and an empty one, which callers skip). Longer lines are cut at the buffer's size.
pub struct LineBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> LineBuf<N> {
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
        }
    }

    /// Adds `byte`; returns the finished line (without its terminator) at CR or LF or when full.
    pub fn push(&mut self, byte: u8) -> Option<&[u8]> {
        if byte == b'\r' || byte == b'\n' {
            let len = core::mem::take(&mut self.len);
            return Some(&self.buf[..len]);
        }
        self.buf[self.len] = byte;
        self.len += 1;
        if self.len == N {
            self.len = 0;
            return Some(&self.buf[..N]);
        }
        None
    }
}

impl<const N: usize> Default for LineBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_is_fifo_and_counts_drops() {
        let ring: Ring<4> = Ring::new();
        assert_eq!(ring.pop(), None);
        for b in 1..=5 {
            ring.push(b);
        }
        assert_eq!(ring.dropped(), 1);
        assert_eq!(ring.pushed(), 4);
        assert_eq!(ring.pop(), Some(1));
        ring.push(6);
        let rest: Vec<u8> = core::iter::from_fn(|| ring.pop()).collect();
        assert_eq!(rest, [2, 3, 4, 6]);
        assert!(ring.is_empty());
    }

    #[test]
    fn lines_end_at_cr_or_lf() {
        let mut lines: LineBuf<8> = LineBuf::new();
        let mut got = Vec::new();
        for &b in b"hello\rquit\r\nabcdefghij" {
            if let Some(line) = lines.push(b) {
                got.push(line.to_vec());
            }
        }
        assert_eq!(
            got,
            [
                b"hello".to_vec(),
                b"quit".to_vec(),
                b"".to_vec(),
                b"abcdefgh".to_vec()
            ]
        );
    }
}
