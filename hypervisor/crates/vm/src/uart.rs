//! The 16550 UART each VM sees at COM1 (I/O ports 0x3F8-0x3FF), transmit side, and the line
//! buffer that turns a VM's output into whole console lines.
//!
//! The model is what a polling driver needs: THR writes go to the console, LSR always reports
//! an empty transmitter (0x60), the divisor latch, IER, LCR, MCR and SCR keep what is written,
//! IIR says "no interrupt pending", RBR reads 0 (there is no input yet).

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of ports the model owns.
pub const COM1_PORTS: u16 = 8;

const LCR_DLAB: u8 = 0x80;
/// Transmitter holding register empty + transmitter empty (LSR bits 5 and 6).
const LSR_TX_EMPTY: u8 = 0x60;

#[derive(Debug, Default)]
pub struct Uart16550 {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
}

impl Uart16550 {
    /// Whether `port` belongs to the model.
    pub fn owns(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + COM1_PORTS).contains(&port)
    }

    /// A guest OUT to `port`; returns the byte to transmit, if the write was to THR.
    pub fn write(&mut self, port: u16, value: u8) -> Option<u8> {
        let dlab = self.lcr & LCR_DLAB != 0;
        match port - COM1_BASE {
            0 if dlab => self.dll = value,
            0 => return Some(value),
            1 if dlab => self.dlm = value,
            1 => self.ier = value & 0x0f,
            2 => {} // FCR: FIFOs are not modelled.
            3 => self.lcr = value,
            4 => self.mcr = value & 0x1f,
            7 => self.scr = value,
            _ => {} // LSR and MSR are read-only.
        }
        None
    }

    /// A guest IN from `port`.
    pub fn read(&mut self, port: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match port - COM1_BASE {
            0 if dlab => self.dll,
            0 => 0,
            1 if dlab => self.dlm,
            1 => self.ier,
            2 => 0x01, // IIR: no interrupt pending
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_TX_EMPTY,
            6 => 0xb0, // MSR: DCD, DSR, CTS
            _ => self.scr,
        }
    }
}

/// Longest console line kept before it is flushed without a newline.
pub const LINE_MAX: usize = 200;

/// Collects a VM's console bytes into lines.
#[derive(Debug)]
pub struct LineBuffer {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self {
            buf: [0; LINE_MAX],
            len: 0,
        }
    }
}

impl LineBuffer {
    /// Adds bytes; calls `emit` with each complete line (without its newline). Carriage
    /// returns are dropped; a line longer than [`LINE_MAX`] is emitted in pieces.
    pub fn push(&mut self, bytes: &[u8], mut emit: impl FnMut(&[u8])) {
        // Runs of ordinary bytes are copied a slice at a time: a 4 KiB console write is handled
        // within one VM exit, so its cost per byte matters.
        let mut rest = bytes;
        while !rest.is_empty() {
            let room = LINE_MAX - self.len;
            let run = rest
                .iter()
                .take(room)
                .position(|&b| b == b'\n' || b == b'\r')
                .unwrap_or(rest.len().min(room));
            self.buf[self.len..self.len + run].copy_from_slice(&rest[..run]);
            self.len += run;
            rest = &rest[run..];
            match rest.first() {
                Some(b'\n') => {
                    emit(&self.buf[..self.len]);
                    self.len = 0;
                    rest = &rest[1..];
                }
                Some(b'\r') => rest = &rest[1..],
                Some(_) => {
                    // The line is full: emit it and go on with the same byte.
                    emit(&self.buf[..self.len]);
                    self.len = 0;
                }
                None => {}
            }
        }
    }

    /// Emits what is left (when the VM stops).
    pub fn flush(&mut self, mut emit: impl FnMut(&[u8])) {
        if self.len > 0 {
            emit(&self.buf[..self.len]);
            self.len = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::{string::String, vec::Vec};

    #[test]
    fn polling_driver_sees_an_idle_transmitter_and_thr_writes_come_out() {
        let mut u = Uart16550::default();
        // Typical init: DLAB, divisor 1, 8N1, FIFO, MCR.
        assert_eq!(u.write(0x3fb, 0x80), None);
        assert_eq!(u.write(0x3f8, 0x01), None);
        assert_eq!(u.write(0x3f9, 0x00), None);
        assert_eq!(u.write(0x3fb, 0x03), None);
        assert_eq!(u.read(0x3fb), 0x03);
        assert_eq!(u.read(0x3fd) & 0x20, 0x20);
        assert_eq!(u.write(0x3f8, b'A'), Some(b'A'));
        u.write(0x3ff, 0x5a);
        assert_eq!(u.read(0x3ff), 0x5a);
        assert!(Uart16550::owns(0x3ff) && !Uart16550::owns(0x400) && !Uart16550::owns(0x3f7));
    }

    /// The byte-at-a-time definition of the line buffer, for comparison.
    fn reference(bytes: &[u8]) -> Vec<Vec<u8>> {
        let (mut lines, mut cur) = (Vec::new(), Vec::new());
        for &b in bytes {
            match b {
                b'\n' => lines.push(core::mem::take(&mut cur)),
                b'\r' => {}
                _ => {
                    if cur.len() == LINE_MAX {
                        lines.push(core::mem::take(&mut cur));
                    }
                    cur.push(b);
                }
            }
        }
        lines.push(cur);
        lines
    }

    #[test]
    fn slice_copies_split_lines_like_the_byte_loop() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        for case in 0..200 {
            let len = (case * 37) % 1500;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    match seed % 64 {
                        0 => b'\n',
                        1 => b'\r',
                        n => b'a' + (n % 26) as u8,
                    }
                })
                .collect();
            let mut lb = LineBuffer::default();
            let mut lines: Vec<Vec<u8>> = Vec::new();
            // Fed in uneven pieces, as successive writes would be.
            for piece in bytes.chunks(1 + case % 300) {
                lb.push(piece, |l| lines.push(l.to_vec()));
            }
            lb.flush(|l| lines.push(l.to_vec()));
            let mut want = reference(&bytes);
            if want.last().is_some_and(|l| l.is_empty()) {
                want.pop();
            }
            assert_eq!(lines, want, "case {case}");
        }
    }

    #[test]
    fn lines_are_split_and_long_lines_wrapped() {
        let mut lb = LineBuffer::default();
        let mut lines: Vec<String> = Vec::new();
        lb.push(b"ab\r\ncd", |l| {
            lines.push(String::from_utf8_lossy(l).into())
        });
        assert_eq!(lines, ["ab"]);
        lb.push(&[b'x'; LINE_MAX + 5], |l| {
            lines.push(String::from_utf8_lossy(l).into())
        });
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].len(), LINE_MAX);
        lb.flush(|l| lines.push(String::from_utf8_lossy(l).into()));
        assert_eq!(lines[2], "xxxxxxx");
    }
}
