//! The line buffer that turns a VM's console bytes (hypercall writes, COM1 output) into whole
//! console lines for the serial log.

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
