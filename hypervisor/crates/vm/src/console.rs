//! A VM's console output on its way to the shared serial log: complete lines, made safe to print
//! and prefixed with the VM's name, queued until the serial line has room for them.
//!
//! The serial port is slow (about 87 us a byte at 115200 baud), so printing a console write at
//! once would let a guest hold the only CPU for as long as its output takes (4 KiB: 0.36 s).
//! Instead the hypervisor queues the lines here and answers the hypercall at once; the kernel
//! moves queued lines into its output ring as the UART drains it, without waiting for the UART.
//! While more than [`PENDING_LIMIT`] bytes wait, the VM is not scheduled
//! ([`ConsoleOutput::must_drain`]), like a process blocked on a slow device: the queue stays
//! bounded, nothing is dropped, and a VM that prints faster than the line carries runs less,
//! never longer.
//!
//! A guest must not be able to forge a hypervisor log line: every line starts with `NAME | `,
//! and [`sanitize`] turns every control character (line breaks included) into `.`, so guest
//! bytes can never start a new line of the log.

use alloc::collections::VecDeque;
use alloc::string::String;

/// Queued bytes above which the VM only prints until the queue is below it again.
pub const PENDING_LIMIT: usize = 4096;

/// A guest's console bytes as they may appear in the log: control characters (C0, DEL, C1,
/// which include CR, LF, ESC and the 8-bit CSI) shown as `.`, invalid UTF-8 as U+FFFD, and the
/// Unicode line and paragraph separators as `.` too.
pub fn sanitize(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .chars()
        .map(|c| {
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                '.'
            } else {
                c
            }
        })
        .collect()
}

/// Lines a VM printed that are not on the serial log yet: their bytes in one ring, with the
/// length of each line. No allocation per line: the heap allocator walks a free list, and a
/// 4 KiB console write is some 40 lines queued within one VM exit.
#[derive(Debug, Default)]
pub struct ConsoleOutput {
    bytes: VecDeque<u8>,
    lines: VecDeque<usize>,
}

impl ConsoleOutput {
    /// Queues one line (without its newline) of VM `name`, formatted as `NAME | text\n`.
    pub fn push(&mut self, name: &str, line: &[u8]) {
        let start = self.bytes.len();
        self.bytes.extend(name.as_bytes());
        self.bytes.extend(b" | ");
        if line.iter().all(|&b| (0x20..0x7f).contains(&b)) {
            self.bytes.extend(line);
        } else {
            self.bytes.extend(sanitize(line).as_bytes());
        }
        self.bytes.push_back(b'\n');
        self.lines.push_back(self.bytes.len() - start);
    }

    /// The oldest queued line, without taking it.
    pub fn front(&mut self) -> Option<&str> {
        let len = *self.lines.front()?;
        let bytes = &self.bytes.make_contiguous()[..len];
        // Built from `&str` pieces and sanitized text: always UTF-8.
        Some(core::str::from_utf8(bytes).unwrap_or("?\n"))
    }

    /// Drops the oldest queued line (after it was sent).
    pub fn discard_front(&mut self) {
        if let Some(len) = self.lines.pop_front() {
            self.bytes.drain(..len);
        }
    }

    /// The oldest queued line, taken out.
    pub fn pop(&mut self) -> Option<String> {
        let line = String::from(self.front()?);
        self.discard_front();
        Some(line)
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Bytes queued.
    pub fn pending(&self) -> usize {
        self.bytes.len()
    }

    /// The VM has queued so much that it may not run until some of it is printed.
    pub fn must_drain(&self) -> bool {
        self.bytes.len() > PENDING_LIMIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_cannot_start_a_log_line() {
        let forged =
            b"x\r[INFO] hv: all VMs stopped\n[PANIC] \x1b[2K\x1b[1G\xc2\x9b2K\xe2\x80\xa8ok";
        let clean = sanitize(forged);
        assert!(!clean.contains('\n') && !clean.contains('\r') && !clean.contains('\x1b'));
        assert_eq!(clean, "x.[INFO] hv: all VMs stopped.[PANIC] .[2K.[1G.2K.ok");
        assert_eq!(sanitize(b"caf\xc3\xa9 \xff"), "caf\u{e9} \u{fffd}");
    }

    #[test]
    fn lines_queue_in_order_with_the_vm_prefix() {
        let mut out = ConsoleOutput::default();
        out.push("vm-a", b"hello");
        out.push("vm-a", b"[ERROR] hv: fake");
        assert_eq!(out.pending(), 13 + 24);
        assert_eq!(out.front(), Some("vm-a | hello\n"));
        assert_eq!(out.pop().as_deref(), Some("vm-a | hello\n"));
        assert_eq!(out.pop().as_deref(), Some("vm-a | [ERROR] hv: fake\n"));
        assert_eq!(out.pop(), None);
        assert!(out.is_empty() && out.pending() == 0);
    }

    #[test]
    fn lines_survive_the_ring_wrapping_and_are_sanitized() {
        let mut out = ConsoleOutput::default();
        for round in 0..500u32 {
            let text = alloc::format!("line {round} {}", "y".repeat((round % 97) as usize));
            out.push("w", text.as_bytes());
            if round % 3 == 0 {
                out.push("w", b"bad\x1b[2J\xff");
            }
            // Keep a few lines queued so that the ring's start moves around.
            while out.pending() > 300 {
                let line = out.pop().unwrap();
                assert!(line.starts_with("w | ") && line.ends_with('\n'), "{line:?}");
            }
        }
        let mut last = None;
        while let Some(line) = out.pop() {
            last = Some(line);
        }
        // Round 499: 499 % 97 = 14 letters, and 499 % 3 != 0 adds no bad line after it.
        assert_eq!(last.as_deref(), Some("w | line 499 yyyyyyyyyyyyyy\n"));
        let mut out = ConsoleOutput::default();
        out.push("w", b"bad\x1b[2J\xff");
        assert_eq!(out.front(), Some("w | bad.[2J\u{fffd}\n"));
    }

    #[test]
    fn a_flood_must_drain_before_the_vm_runs_again() {
        let mut out = ConsoleOutput::default();
        let line = [b'x'; 190];
        while !out.must_drain() {
            out.push("flood", &line);
        }
        assert!(out.pending() > PENDING_LIMIT);
        while out.must_drain() {
            out.pop();
        }
        assert!(out.pending() <= PENDING_LIMIT && !out.is_empty());
    }
}

/// Longest input line taken from the host console; longer lines are cut there.
pub const INPUT_LINE_MAX: usize = 256;

/// What one line typed on the host's serial console asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum InputLine<'a> {
    /// `NAME: text`: `text` for the COM1 of the VM called `name`.
    ForVm { name: &'a str, text: &'a [u8] },
    /// A line without the `NAME: ` prefix.
    Unaddressed,
}

/// Collects bytes typed on the host's serial console into lines (ended by CR or LF) and says
/// which VM each is for: `NAME: text` sends `text` and an Enter (CR, as a terminal sends it) to
/// VM NAME's COM1. Lines longer than [`INPUT_LINE_MAX`] are cut; empty lines are ignored.
#[derive(Debug)]
pub struct InputRouter {
    buf: [u8; INPUT_LINE_MAX],
    len: usize,
}

impl Default for InputRouter {
    fn default() -> Self {
        Self {
            buf: [0; INPUT_LINE_MAX],
            len: 0,
        }
    }
}

impl InputRouter {
    /// Takes one byte; at the end of a non-empty line calls `line` with what it asks for.
    pub fn push(&mut self, byte: u8, mut line: impl FnMut(InputLine)) {
        if byte != b'\r' && byte != b'\n' {
            if self.len < INPUT_LINE_MAX {
                self.buf[self.len] = byte;
                self.len += 1;
            }
            return;
        }
        let text = &self.buf[..self.len];
        if !text.is_empty() {
            line(Self::parse(text));
        }
        self.len = 0;
    }

    fn parse(text: &[u8]) -> InputLine<'_> {
        let Some(colon) = text.iter().position(|&b| b == b':') else {
            return InputLine::Unaddressed;
        };
        let (name, rest) = (&text[..colon], &text[colon + 1..]);
        let rest = rest.strip_prefix(b" ").unwrap_or(rest);
        match core::str::from_utf8(name) {
            Ok(name) if !name.is_empty() && !name.contains(' ') => {
                InputLine::ForVm { name, text: rest }
            }
            _ => InputLine::Unaddressed,
        }
    }
}

#[cfg(test)]
mod input_tests {
    use super::*;
    use alloc::string::String;
    use alloc::vec::Vec;

    fn feed(r: &mut InputRouter, bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        for &b in bytes {
            r.push(b, |l| match l {
                InputLine::ForVm { name, text } => out.push((String::from(name), text.to_vec())),
                InputLine::Unaddressed => out.push((String::new(), Vec::new())),
            });
        }
        out
    }

    #[test]
    fn lines_are_routed_by_their_name_prefix() {
        let mut r = InputRouter::default();
        let got = feed(
            &mut r,
            b"echo-1: hello world\r\n\nlisten:x\rno prefix here\n: x\r",
        );
        assert_eq!(
            got,
            [
                (String::from("echo-1"), b"hello world".to_vec()),
                (String::from("listen"), b"x".to_vec()),
                (String::new(), Vec::new()),
                (String::new(), Vec::new()),
            ]
        );
        // A line split over several reads, and one far too long, cut.
        assert!(feed(&mut r, b"a: 12").is_empty());
        assert_eq!(feed(&mut r, b"3\n"), [(String::from("a"), b"123".to_vec())]);
        let mut long = b"b: ".to_vec();
        long.extend(core::iter::repeat_n(b'x', 1000));
        long.push(b'\n');
        let got = feed(&mut r, &long);
        assert_eq!(got[0].1.len(), INPUT_LINE_MAX - 3);
    }
}
