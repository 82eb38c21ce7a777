//! The Intel 8254 programmable interval timer (ports 0x40-0x43) and the bits of the PC's
//! system-control port 0x61 that belong to it.
//!
//! Owns: the three counters (control word, counter latch, read-back, lsb/msb flip-flops, modes
//! 0-5, binary and BCD counting), channel 2's gate and the speaker-data bit (port 0x61 bits 0
//! and 1, plus the refresh toggle in bit 4 and channel 2's OUT in bit 5), and the edges channel
//! 0's OUT sends to IRQ 0. It must not touch the interrupt controllers (it only pulses line 0 in
//! the [`Ctx`] it is given), the speaker (bit 1 is stored for the platform to read), nor the
//! other bits of port 0x61's owner on a real chipset (NMI status bits 6-7 read 0).
//!
//! Mapping: [`Pit`] implements [`PioDevice`] for the 4 ports 0x40-0x43 (offset 0-2 = counter
//! 0-2, offset 3 = control word); [`Port61`] (from [`Pit::port61`]) implements it for the single
//! port 0x61 (offset 0). Accesses wider than a byte are split into byte accesses at consecutive
//! offsets, as the ISA bus does for an 8-bit device.
//!
//! Time: the PIT's input clock (1.193182 MHz, [`PIT_HZ`]) runs from guest TSC 0; its edge `k`
//! is at [`Timebase::ticks_for`]`(k, PIT_HZ)`. A counter stores the clock edge at which its
//! count was loaded and derives its value and OUT from the edges since, so nothing drifts and
//! nothing needs to run between accesses. Per the 8254 datasheet ("Mode 0 ... OUT does not go
//! high until N + 1 CLK pulses after the initial count is written"), a count written between
//! edges `c` and `c + 1` is loaded at edge `c + 1` and decremented from edge `c + 2` on.
//!
//! IRQ 0: every rising edge of channel 0's OUT is one [`IrqLines::pulse`] on line 0 (the PC's
//! 8259 input 0 and the IOAPIC pin it is routed to are edge-triggered): one per period in modes
//! 2 and 3, one at terminal count in mode 0 (and after the one-clock strobe in mode 4), and one
//! when a control word sets a low OUT high. [`Pit::next_deadline`] says when the next one is
//! due and [`Pit::advance`] raises the due ones; when several periods passed between two calls
//! (the vCPU did not run), one edge is raised and the others are counted in
//! [`Pit::coalesced`].

use crate::bus::{Ctx, PioDevice};
use crate::irq::IrqLines;
use crate::time::{Timebase, Tsc};

/// The 8254's input clock on a PC, in Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// First port of the PIT.
pub const PIT_BASE: u16 = 0x40;
/// Number of ports the PIT owns from [`PIT_BASE`].
pub const PIT_PORTS: u16 = 4;
/// The system-control port whose bits 0, 1, 4 and 5 the PIT model owns ([`Port61`]).
pub const PORT61: u16 = 0x61;
/// The ISA interrupt channel 0's OUT drives.
pub const PIT_IRQ: u8 = 0;

/// Port 0x61 bits the guest writes and reads back: channel 2 gate, speaker data, and the
/// parity/IO-check enables (bits 2-3, stored only).
const P61_RW: u8 = 0x0f;
const P61_GATE2: u8 = 0x01;
const P61_REFRESH: u8 = 0x10;
const P61_OUT2: u8 = 0x20;
/// The refresh-request toggle (port 0x61 bit 4) flips once per DRAM refresh cycle, which PC
/// firmware clocks from counter 1 with a count of 18 (15.08 us). It is derived from the PIT
/// clock rather than flipped per read, so that delay loops that count toggles (firmware's and
/// some bootloaders' `io_delay`) take real time.
const REFRESH_COUNT: u64 = 18;

/// How a counter is read and written (control word bits 5:4, "RW").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Lsb,
    Msb,
    Word,
}

impl Access {
    fn bits(self) -> u8 {
        match self {
            Access::Lsb => 1,
            Access::Msb => 2,
            Access::Word => 3,
        }
    }
}

/// The counting element (CE) of a counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ce {
    /// Not counting: after a control word (until a count is written, or in modes 1/5 until a
    /// trigger), or in mode 0 between the two bytes of a count. Reads give `value`.
    Idle { value: u64, out: bool },
    /// Loaded with `n` at clock edge `start`; the value and OUT follow from the edges since.
    Running { n: u64, start: u64 },
    /// Gate low in modes 0, 2, 3 and 4: counting is stopped `p` edges after the load.
    Held { n: u64, p: u64 },
}

#[derive(Clone, Debug)]
struct Channel {
    /// Mode as it behaves (0-5; 6 and 7 are 2 and 3).
    mode: u8,
    /// Mode bits as written, which the read-back status returns.
    mode_bits: u8,
    access: Access,
    bcd: bool,
    gate: bool,
    /// The count register (CR) as last written, raw.
    cr: u16,
    /// A complete count has been written since the control word.
    cr_valid: bool,
    write_msb_next: bool,
    lsb: u8,
    read_msb_next: bool,
    latched: Option<u16>,
    status: Option<u8>,
    /// NULL COUNT is set until this edge (`None`: until an event not yet known, a trigger).
    null_until: Option<u64>,
    ce: Ce,
    /// Modes 2 and 3: a count written while counting, and the edge at which it is loaded (the
    /// end of the current period).
    pending: Option<(u64, u64)>,
}

impl Channel {
    /// The power-up state is undefined (8254 datasheet, "Operation"). The model starts as a
    /// firmware leaves a counter before loading it: mode 3, lsb-then-msb, binary, not counting,
    /// OUT high, so that a guest's first control word (usually mode 2 or 3) is not an edge.
    fn new(gate: bool) -> Self {
        Self {
            mode: 3,
            mode_bits: 3,
            access: Access::Word,
            bcd: false,
            gate,
            cr: 0,
            cr_valid: false,
            write_msb_next: false,
            lsb: 0,
            read_msb_next: false,
            latched: None,
            status: None,
            null_until: Some(0),
            ce: Ce::Idle {
                value: 0,
                out: true,
            },
            pending: None,
        }
    }

    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x1_0000
        }
    }

    /// The count a raw CR value stands for: 0 is the largest count (65536, or 10000 in BCD).
    /// Invalid BCD digits (A-F) count as 9. Modes 2 and 3 count at least 2: the datasheet's
    /// minimum, since a count of 1 is illegal there.
    fn count_of(&self, raw: u16) -> u64 {
        let n = if self.bcd {
            (0..4).rev().fold(0u64, |acc, i| {
                acc * 10 + u64::from((raw >> (i * 4)) & 0xf).min(9)
            })
        } else {
            u64::from(raw)
        };
        let n = if n == 0 { self.modulus() } else { n };
        if matches!(self.mode, 2 | 3) {
            n.max(2)
        } else {
            n
        }
    }

    /// Applies a pending count whose time has come.
    fn settle(&mut self, c: u64) {
        if let (Ce::Running { .. }, Some((m, at))) = (self.ce, self.pending) {
            if c >= at {
                self.ce = Ce::Running { n: m, start: at };
                self.pending = None;
            }
        }
    }

    /// `(n, start)` in effect at edge `c` while running.
    fn effective(&self, c: u64) -> Option<(u64, u64)> {
        match (self.ce, self.pending) {
            (Ce::Running { .. }, Some((m, at))) if c >= at => Some((m, at)),
            (Ce::Running { n, start }, _) => Some((n, start)),
            _ => None,
        }
    }

    /// The count `p` edges after loading `n` (8254 datasheet, mode descriptions).
    fn value_in(&self, n: u64, p: u64) -> u64 {
        let n = n.max(1);
        match self.mode {
            // Rate generator: n, n-1, ..., 1, reload.
            2 => n - p % n,
            // Square wave: decrements by two; an odd count spends one more edge high, and is
            // decremented by one after loading in the high half and by three in the low half.
            3 => {
                let odd = n % 2 == 1;
                let q = p % n;
                let high = n.div_ceil(2);
                if q < high {
                    (n + u64::from(odd && q > 0)).saturating_sub(2 * q)
                } else {
                    let q = q - high;
                    n.saturating_sub(2 * q + u64::from(odd && q > 0))
                }
            }
            // One-shot modes count down past zero and wrap (65535 or 9999 after 0).
            _ => {
                let m = self.modulus();
                (n % m + m - p % m) % m
            }
        }
    }

    fn out_in(&self, n: u64, p: u64) -> bool {
        let n = n.max(1);
        match self.mode {
            // High from terminal count until a new count or control word.
            0 | 1 => p >= n,
            // Low for the one edge at which the count is 1.
            2 => p % n != n - 1,
            // High for the first ceil(n/2) edges of each period.
            3 => p % n < n.div_ceil(2),
            // Modes 4 and 5: low for the one edge at terminal count.
            _ => p != n,
        }
    }

    /// The count at edge `c`, as a number.
    fn value(&self, c: u64) -> u64 {
        match self.ce {
            Ce::Idle { value, .. } => value,
            Ce::Held { n, p } => self.value_in(n, p),
            Ce::Running { .. } => match self.effective(c) {
                Some((n, start)) if c >= start => self.value_in(n, c - start),
                Some((n, _)) => n % self.modulus(),
                None => 0,
            },
        }
    }

    fn out(&self, c: u64) -> bool {
        match self.ce {
            Ce::Idle { out, .. } => out,
            // Modes 2 and 3: "If GATE goes low while OUT is low, OUT is set high immediately."
            Ce::Held { .. } if matches!(self.mode, 2 | 3) => true,
            Ce::Held { n, p } => self.out_in(n, p),
            Ce::Running { .. } => match self.effective(c) {
                Some((n, start)) if c >= start => self.out_in(n, c - start),
                // Not loaded yet: OUT as the control word (or mode 0's count write) left it.
                _ => self.mode != 0,
            },
        }
    }

    /// The count register as the guest reads it (BCD digits in BCD mode).
    fn reg(&self, c: u64) -> u16 {
        let v = self.value(c);
        if self.bcd {
            let v = v % 10_000;
            (((v / 1000) << 12) | ((v / 100 % 10) << 8) | ((v / 10 % 10) << 4) | (v % 10)) as u16
        } else {
            (v & 0xffff) as u16
        }
    }

    /// Read-back status byte: OUT, NULL COUNT, RW, mode, BCD (8254 datasheet, "Status Byte").
    fn status_byte(&self, c: u64) -> u8 {
        let null = self.null_until.is_none_or(|t| c < t);
        u8::from(self.out(c)) << 7
            | u8::from(null) << 6
            | self.access.bits() << 4
            | self.mode_bits << 1
            | u8::from(self.bcd)
    }

    /// The number of rising edges of OUT at edges `e` with `a < e <= b`.
    fn rises(&self, a: u64, b: u64) -> u64 {
        let Ce::Running { n, start } = self.ce else {
            return 0;
        };
        if b <= a {
            return 0;
        }
        let once = |e: u64| u64::from(a < e && e <= b);
        match self.mode {
            0 | 1 => once(start.saturating_add(n)),
            4 | 5 => once(start.saturating_add(n).saturating_add(1)),
            _ => {
                // Periodic: OUT rises at start + k*n for k >= 1.
                let f = |x: u64, start: u64, n: u64| x.checked_sub(start).map_or(0, |d| d / n);
                match self.pending {
                    None => f(b, start, n) - f(a, start, n),
                    Some((m, at)) => {
                        f(b.min(at), start, n) - f(a.min(at), start, n) + f(b.max(at), at, m)
                            - f(a.max(at), at, m)
                    }
                }
            }
        }
    }

    /// The first edge after `a` at which OUT rises, if one is scheduled.
    fn next_rise(&self, a: u64) -> Option<u64> {
        let Ce::Running { n, start } = self.ce else {
            return None;
        };
        let e = match self.mode {
            0 | 1 => start.saturating_add(n),
            4 | 5 => start.saturating_add(n).saturating_add(1),
            _ => {
                let next = |start: u64, n: u64| match a.checked_sub(start) {
                    None => start.saturating_add(n),
                    Some(d) => start.saturating_add((d / n + 1).saturating_mul(n)),
                };
                match self.pending {
                    Some((m, at)) if a >= at => next(at, m),
                    _ => next(start, n),
                }
            }
        };
        (e > a).then_some(e)
    }

    /// Control word for this counter (RW != 0): "When a Control Word is written to a Counter,
    /// all Control Logic is immediately reset and OUT goes to a known initial state" (low in
    /// mode 0, high otherwise); NULL COUNT is set.
    fn program(&mut self, v: u8, c: u64) {
        let value = self.value(c);
        self.mode_bits = (v >> 1) & 7;
        self.mode = if self.mode_bits >= 6 {
            self.mode_bits - 4
        } else {
            self.mode_bits
        };
        self.access = match (v >> 4) & 3 {
            1 => Access::Lsb,
            2 => Access::Msb,
            _ => Access::Word,
        };
        self.bcd = v & 1 != 0;
        self.write_msb_next = false;
        self.read_msb_next = false;
        self.latched = None;
        self.status = None;
        self.cr_valid = false;
        self.pending = None;
        self.null_until = None;
        self.ce = Ce::Idle {
            value: value % self.modulus(),
            out: self.mode != 0,
        };
    }

    fn write(&mut self, v: u8, c: u64) {
        match self.access {
            Access::Lsb => self.load(u16::from(v), c),
            Access::Msb => self.load(u16::from(v) << 8, c),
            Access::Word if !self.write_msb_next => {
                self.lsb = v;
                self.write_msb_next = true;
                // Mode 0: "Writing the first byte disables counting. OUT is set low
                // immediately (no clock pulse required)."
                if self.mode == 0 {
                    self.ce = Ce::Idle {
                        value: self.value(c),
                        out: false,
                    };
                }
            }
            Access::Word => {
                self.write_msb_next = false;
                self.load(u16::from(self.lsb) | u16::from(v) << 8, c);
            }
        }
    }

    /// A complete count was written at edge `c`.
    fn load(&mut self, raw: u16, c: u64) {
        self.settle(c);
        self.cr = raw;
        self.cr_valid = true;
        let n = self.count_of(raw);
        let next = c.saturating_add(1);
        match self.mode {
            // Loaded on the next CLK pulse; counting continues from the new count. A low gate
            // only stops counting, not the load.
            0 | 4 => {
                self.ce = if self.gate {
                    Ce::Running { n, start: next }
                } else {
                    Ce::Held { n, p: 0 }
                };
                self.null_until = Some(next);
            }
            // Loaded by the next trigger; the one-shot in progress is not affected.
            1 | 5 => self.null_until = None,
            _ => match self.ce {
                // "If a new count is written during counting, it will be loaded at the end of
                // the current counting cycle." (In mode 3 the datasheet loads it at the end of
                // the current half-cycle; the model waits for the end of the period, so that
                // periods stay whole. Documented deviation.)
                Ce::Running { n: old, start } if c >= start => {
                    let at = start.saturating_add(((c - start) / old + 1).saturating_mul(old));
                    self.pending = Some((n, at));
                    self.null_until = Some(at);
                }
                Ce::Running { start, .. } => self.ce = Ce::Running { n, start },
                Ce::Idle { .. } | Ce::Held { .. } => {
                    self.ce = if self.gate {
                        Ce::Running { n, start: next }
                    } else {
                        Ce::Held { n, p: 0 }
                    };
                    self.null_until = Some(next);
                }
            },
        }
    }

    fn read(&mut self, c: u64) -> u8 {
        // "If both count and status of a counter are latched, the first read operation of that
        // counter will return latched status, regardless of which was latched first."
        if let Some(s) = self.status.take() {
            return s;
        }
        let v = self.latched.unwrap_or_else(|| self.reg(c));
        match self.access {
            Access::Lsb => {
                self.latched = None;
                v as u8
            }
            Access::Msb => {
                self.latched = None;
                (v >> 8) as u8
            }
            Access::Word if !self.read_msb_next => {
                self.read_msb_next = true;
                v as u8
            }
            Access::Word => {
                self.read_msb_next = false;
                self.latched = None;
                (v >> 8) as u8
            }
        }
    }

    /// Counter latch: "If a Counter is latched and then, some time later, latched again before
    /// the count is read, the second Counter Latch Command is ignored."
    fn latch(&mut self, c: u64) {
        if self.latched.is_none() {
            self.latched = Some(self.reg(c));
        }
    }

    fn latch_status(&mut self, c: u64) {
        if self.status.is_none() {
            self.status = Some(self.status_byte(c));
        }
    }

    fn set_gate(&mut self, high: bool, c: u64) {
        self.settle(c);
        if high == self.gate {
            return;
        }
        self.gate = high;
        let next = c.saturating_add(1);
        match (self.mode, high, self.ce) {
            // Modes 0 and 4: the gate enables counting; counting resumes where it stopped.
            (0 | 4, true, Ce::Held { n, p }) => {
                self.ce = Ce::Running {
                    n,
                    start: c.saturating_sub(p),
                }
            }
            (0 | 4 | 2 | 3, false, Ce::Running { n, start }) => {
                self.pending = None;
                self.ce = Ce::Held {
                    n,
                    p: c.saturating_sub(start),
                };
            }
            // Modes 1, 2, 3, 5: a rising gate is a trigger that loads CR on the next clock.
            (1 | 2 | 3 | 5, true, _) if self.cr_valid => {
                self.pending = None;
                self.ce = Ce::Running {
                    n: self.count_of(self.cr),
                    start: next,
                };
                self.null_until = Some(next);
            }
            _ => {}
        }
    }
}

/// The 8254 PIT and its port-0x61 bits.
#[derive(Clone, Debug)]
pub struct Pit {
    tb: Timebase,
    ch: [Channel; 3],
    /// Port 0x61 bits 0-3 as written.
    port61: u8,
    /// PIT clock edge up to which channel 0's rising edges have been raised.
    irq_clk: u64,
    coalesced: u64,
}

impl Pit {
    /// A PIT whose counters are not counting: the 8254's power-up state is undefined, and the
    /// model starts each counter as firmware leaves one before loading it (mode 3, lsb then
    /// msb, binary, OUT high), so there is no IRQ 0 until the guest programs channel 0 and its
    /// first control word is no edge. Channels 0 and 1 have their gates tied high as on a PC;
    /// channel 2's gate is port 0x61 bit 0, initially low.
    pub fn new(tb: Timebase) -> Self {
        Self {
            tb,
            ch: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port61: 0,
            irq_clk: 0,
            coalesced: 0,
        }
    }

    /// Whether a write of `value` at port offset `offset` (0-3) can move the next IRQ 0 edge
    /// ([`Self::next_deadline`]): a count for channel 0 or a control word that programs it can;
    /// counter-latch and read-back commands (8254 datasheet, "Counter Latch Command",
    /// "Read-Back Command") and the other channels' counts cannot. Reads never can. The
    /// platform recomputes its deadline only after accesses that can move one.
    pub fn write_moves_irq0(offset: u16, value: u8) -> bool {
        match offset {
            0 => true,
            3 => {
                let (select, access) = (value >> 6, (value >> 4) & 0b11);
                select == 0 && access != 0
            }
            _ => false,
        }
    }

    /// PIT clock edges up to `now`.
    fn clk(&self, now: Tsc) -> u64 {
        self.tb.cycles_in(now, PIT_HZ)
    }

    /// When channel 0 next raises IRQ 0 (the guest TSC at which [`Self::advance`] must run),
    /// or `None` when no edge is scheduled.
    pub fn next_deadline(&self) -> Option<Tsc> {
        self.ch[0]
            .next_rise(self.irq_clk)
            .map(|e| self.tb.ticks_for(e, PIT_HZ))
    }

    /// Counter 0 runs in a periodic mode (2 or 3): IRQ 0 rises by itself once per period, so
    /// a late edge is a tick lost (coalesced) rather than a tick delayed.
    pub fn periodic(&self) -> bool {
        let ch = &self.ch[0];
        matches!(ch.mode, 2 | 3) && matches!(ch.ce, Ce::Running { .. })
    }

    /// Raises the IRQ 0 edges due by `now`: one pulse however many periods passed, the others
    /// counted in [`Self::coalesced`]. A `now` earlier than a previous one changes nothing.
    pub fn advance(&mut self, now: Tsc, irq: &mut IrqLines) {
        let c = self.clk(now);
        if c > self.irq_clk {
            let r = self.ch[0].rises(self.irq_clk, c);
            if r > 0 {
                irq.pulse(PIT_IRQ);
                self.coalesced = self.coalesced.saturating_add(r - 1);
            }
            self.irq_clk = c;
        }
        let c = self.irq_clk;
        for ch in &mut self.ch {
            ch.settle(c);
        }
    }

    /// IRQ 0 edges that were due but merged into another because the VM did not run.
    pub fn coalesced(&self) -> u64 {
        self.coalesced
    }

    /// Port 0x61 as the PIT owns it: bits 0-3 as written, bit 4 the refresh toggle, bit 5
    /// channel 2's OUT, bits 6-7 (NMI sources) 0.
    pub fn port61_read(&mut self, now: Tsc) -> u8 {
        let c = self.clk(now);
        self.ch[2].settle(c);
        let refresh = if (c / REFRESH_COUNT) % 2 == 1 {
            P61_REFRESH
        } else {
            0
        };
        let out2 = if self.ch[2].out(c) { P61_OUT2 } else { 0 };
        self.port61 | refresh | out2
    }

    /// Writes port 0x61: bit 0 is channel 2's gate, bit 1 the speaker data; bits 2-3 are
    /// stored, bits 4-7 are read-only.
    pub fn port61_write(&mut self, now: Tsc, value: u8) {
        let c = self.clk(now);
        self.port61 = value & P61_RW;
        self.ch[2].set_gate(value & P61_GATE2 != 0, c);
    }

    /// Whether the speaker sounds: channel 2's gate and the speaker-data bit both set (what the
    /// platform would feed to an audio model; none exists).
    pub fn speaker_enabled(&self) -> bool {
        self.port61 & 0x03 == 0x03
    }

    /// Port 0x61 as a device, for the platform's bus (1 port, offset 0).
    pub fn port61(&mut self) -> Port61<'_> {
        Port61(self)
    }

    fn read_port(&mut self, offset: u16, c: u64) -> u8 {
        match offset {
            0..=2 => self.ch[usize::from(offset)].read(c),
            // The control word register is write-only.
            _ => 0xff,
        }
    }

    fn write_port(&mut self, offset: u16, v: u8, c: u64, irq: &mut IrqLines) {
        let before = self.ch[0].out(c);
        match offset {
            0..=2 => self.ch[usize::from(offset)].write(v, c),
            3 => self.control(v, c),
            _ => {}
        }
        // A control word that sets channel 0's OUT high from low is a rising edge at IRQ 0,
        // as on a PC; no scheduled edge is lost or doubled since `advance` ran first.
        if !before && self.ch[0].out(c) {
            irq.pulse(PIT_IRQ);
        }
    }

    fn control(&mut self, v: u8, c: u64) {
        let sc = v >> 6;
        if sc == 3 {
            // Read-back command (8254 only): bit 5 low latches count, bit 4 low latches status,
            // bits 3:1 select counters 2, 1, 0.
            for (i, ch) in self.ch.iter_mut().enumerate() {
                if v & (2 << i) != 0 {
                    if v & 0x20 == 0 {
                        ch.latch(c);
                    }
                    if v & 0x10 == 0 {
                        ch.latch_status(c);
                    }
                }
            }
            return;
        }
        let ch = &mut self.ch[usize::from(sc)];
        if (v >> 4) & 3 == 0 {
            ch.latch(c);
        } else {
            ch.program(v, c);
        }
    }
}

impl PioDevice for Pit {
    fn pio_read(&mut self, offset: u16, data: &mut [u8], ctx: &mut Ctx) {
        self.advance(ctx.now, ctx.irq);
        let c = self.irq_clk;
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_port(offset.wrapping_add(i as u16), c);
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8], ctx: &mut Ctx) {
        self.advance(ctx.now, ctx.irq);
        // Writes apply at the edge up to which IRQ 0 has been raised, so that a `now` earlier
        // than a previous one cannot reschedule an edge that was already raised.
        let c = self.irq_clk;
        for (i, &b) in data.iter().enumerate() {
            self.write_port(offset.wrapping_add(i as u16), b, c, ctx.irq);
        }
    }
}

/// Port 0x61 of a [`Pit`] as a device of one port (offset 0; other offsets read 0xff).
pub struct Port61<'a>(pub &'a mut Pit);

impl PioDevice for Port61<'_> {
    fn pio_read(&mut self, offset: u16, data: &mut [u8], ctx: &mut Ctx) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = if offset.wrapping_add(i as u16) == 0 {
                self.0.port61_read(ctx.now)
            } else {
                0xff
            };
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8], ctx: &mut Ctx) {
        for (i, &b) in data.iter().enumerate() {
            if offset.wrapping_add(i as u16) == 0 {
                self.0.port61_write(ctx.now, b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest TSC frequency the PIT clock does not divide: conversions round every time.
    const TSC_HZ: u64 = 2_100_000_007;

    struct H {
        pit: Pit,
        irq: IrqLines,
        tb: Timebase,
    }

    impl H {
        fn new() -> Self {
            let tb = Timebase::new(TSC_HZ);
            Self {
                pit: Pit::new(tb),
                irq: IrqLines::default(),
                tb,
            }
        }

        /// The guest TSC of PIT clock edge `k`.
        fn at(&self, k: u64) -> Tsc {
            self.tb.ticks_for(k, PIT_HZ)
        }

        fn out(&mut self, now: Tsc, port: u16, v: u8) {
            let mut ctx = Ctx {
                now,
                irq: &mut self.irq,
            };
            self.pit.pio_write(port - PIT_BASE, &[v], &mut ctx);
        }

        fn inb(&mut self, now: Tsc, port: u16) -> u8 {
            let mut d = [0];
            let mut ctx = Ctx {
                now,
                irq: &mut self.irq,
            };
            self.pit.pio_read(port - PIT_BASE, &mut d, &mut ctx);
            d[0]
        }

        fn out61(&mut self, now: Tsc, v: u8) {
            let mut ctx = Ctx {
                now,
                irq: &mut self.irq,
            };
            self.pit.port61().pio_write(0, &[v], &mut ctx);
        }

        fn in61(&mut self, now: Tsc) -> u8 {
            let mut d = [0];
            let mut ctx = Ctx {
                now,
                irq: &mut self.irq,
            };
            self.pit.port61().pio_read(0, &mut d, &mut ctx);
            d[0]
        }

        /// Control word, then a 16-bit count lsb first, at edge `w`.
        fn program(&mut self, w: u64, ch: u16, control: u8, count: u16) {
            let now = self.at(w);
            self.out(now, 0x43, control);
            self.out(now, 0x40 + ch, count as u8);
            self.out(now, 0x40 + ch, (count >> 8) as u8);
        }

        /// Counter latch command and the two reads of a lsb-then-msb counter.
        fn count(&mut self, k: u64, ch: u16) -> u16 {
            let now = self.at(k);
            self.out(now, 0x43, (ch as u8) << 6);
            let lo = self.inb(now, 0x40 + ch);
            let hi = self.inb(now, 0x40 + ch);
            u16::from(lo) | u16::from(hi) << 8
        }

        /// Read-back of the status byte alone.
        fn status(&mut self, k: u64, ch: u16) -> u8 {
            let now = self.at(k);
            self.out(now, 0x43, 0xe0 | 2 << ch);
            self.inb(now, 0x40 + ch)
        }

        fn pulsed(&mut self) -> bool {
            self.irq.take_changes().rose & 1 != 0
        }
    }

    /// Counts and OUT of channel 0 at clock edges after a count written at edge `w` (loaded at
    /// `w + 1`, so the `p` below is `k - (w + 1)`).
    fn check_sequence(control: u8, n: u16, want: &[(u64, u16, bool)]) {
        let mut h = H::new();
        let w = 1000;
        h.program(w, 0, control, n);
        for &(p, count, out) in want {
            let k = w + 1 + p;
            assert_eq!(
                h.count(k, 0),
                count,
                "mode {control:#x} n {n} count at p {p}"
            );
            assert_eq!(
                h.status(k, 0) >> 7 == 1,
                out,
                "mode {control:#x} n {n} OUT at p {p}"
            );
        }
    }

    #[test]
    fn mode0_counts_down_and_out_rises_at_terminal_count() {
        check_sequence(
            0x30,
            100,
            &[
                (0, 100, false),
                (1, 99, false),
                (50, 50, false),
                (99, 1, false),
                (100, 0, true),
                // It keeps counting, wrapping, with OUT high until reprogrammed.
                (101, 0xffff, true),
                (100 + 0x10000, 0, true),
            ],
        );
    }

    #[test]
    fn mode2_rate_generator_reloads_and_pulses_out_low_at_one() {
        let seq: [(u64, u16, bool); 12] = [
            (0, 5, true),
            (1, 4, true),
            (2, 3, true),
            (3, 2, true),
            (4, 1, false),
            (5, 5, true),
            (8, 2, true),
            (9, 1, false),
            (10, 5, true),
            (5 * 1000 + 4, 1, false),
            (5 * 1000 + 5, 5, true),
            (5 * 1000 + 6, 4, true),
        ];
        check_sequence(0x34, 5, &seq);
        // Mode 6 is mode 2.
        check_sequence(0x3c, 5, &seq);
    }

    #[test]
    fn mode3_square_wave_counts_by_two_odd_counts_high_one_longer() {
        // Even: high for n/2 edges, low for n/2, counting n, n-2, ... in each half.
        check_sequence(
            0x36,
            6,
            &[
                (0, 6, true),
                (1, 4, true),
                (2, 2, true),
                (3, 6, false),
                (4, 4, false),
                (5, 2, false),
                (6, 6, true),
                (6 * 77 + 4, 4, false),
            ],
        );
        // Odd (8254 datasheet, mode 3): high for (n+1)/2, low for (n-1)/2; n, n-1, n-3, ...
        // high, n, n-3, ... low.
        check_sequence(
            0x36,
            5,
            &[
                (0, 5, true),
                (1, 4, true),
                (2, 2, true),
                (3, 5, false),
                (4, 2, false),
                (5, 5, true),
                (6, 4, true),
            ],
        );
    }

    #[test]
    fn mode4_strobes_out_low_for_one_clock_and_pulses_irq0_once() {
        let mut h = H::new();
        h.program(10, 0, 0x38, 10);
        h.pulsed();
        // Loaded at 11; terminal count at 11 + 10; OUT rises one clock later.
        assert_eq!(h.pit.next_deadline(), Some(h.at(22)));
        assert_eq!(h.status(20, 0) >> 7, 1);
        assert_eq!(h.status(21, 0) >> 7, 0);
        assert!(!h.pulsed());
        assert_eq!(h.status(22, 0) >> 7, 1);
        assert!(h.pulsed());
        assert_eq!(h.pit.next_deadline(), None, "a strobe happens once");
    }

    #[test]
    fn bcd_counting_reads_decimal_digits_and_wraps_at_10000() {
        check_sequence(
            0x31,
            0x0100,
            &[
                (0, 0x0100, false),
                (1, 0x0099, false),
                (91, 0x0009, false),
                (100, 0x0000, true),
                (101, 0x9999, true),
            ],
        );
        // Count 0 is 10000 in BCD: a mode 2 period of 10000 clocks.
        let mut h = H::new();
        h.program(0, 0, 0x35, 0);
        assert_eq!(h.pit.next_deadline(), Some(h.at(1 + 10_000)));
        assert_eq!(h.count(1 + 1, 0), 0x9999);
    }

    #[test]
    fn irq0_at_100hz_over_10000_periods_does_not_drift() {
        let mut h = H::new();
        let divisor = 11_932u64; // Linux's LATCH for HZ=100
        let now0 = 12_345;
        h.out(now0, 0x43, 0x34);
        h.out(now0, 0x40, divisor as u8);
        h.out(now0, 0x40, (divisor >> 8) as u8);
        h.pulsed();
        let first = h.pit.next_deadline().unwrap();
        let mut prev = now0;
        for k in 1..=10_000u64 {
            let d = h.pit.next_deadline().expect("periodic");
            assert!(d > prev);
            // The k-th edge is the exact rational k periods after the first, within the one
            // tick that rounding up each edge can add: rounded increments would drift by up to
            // a tick per period.
            let exact = first
                + ((u128::from(k - 1) * u128::from(divisor) * u128::from(TSC_HZ))
                    / u128::from(PIT_HZ)) as u64;
            assert!(d.abs_diff(exact) <= 1, "edge {k}: {d} vs {exact}");
            h.pit.advance(d - 1, &mut h.irq);
            assert!(!h.pulsed(), "edge {k} not before its time");
            h.pit.advance(d, &mut h.irq);
            assert!(h.pulsed(), "edge {k} at its time");
            prev = d;
        }
        assert_eq!(h.pit.coalesced(), 0);
        // 10000 periods of 11932 clocks: 100.0015 s of guest time.
        let start = h.tb.cycles_in(now0, PIT_HZ) + 1;
        assert_eq!(prev, h.at(start + 10_000 * divisor));
        let secs_x1000 = h.tb.ticks_to_ns(prev - now0) / 1_000_000;
        assert_eq!(secs_x1000, 100_001);
    }

    #[test]
    fn periods_missed_while_the_vcpu_did_not_run_are_one_edge_and_coalesced() {
        let mut h = H::new();
        h.program(0, 0, 0x34, 1000);
        h.pulsed();
        // Five periods pass unseen (edges at 1001, 2001, ..., 5001), then a guest access.
        h.inb(h.at(5_500), 0x41); // any access catches up
        assert!(h.pulsed());
        assert_eq!(h.pit.coalesced(), 4);
        assert_eq!(h.pit.next_deadline(), Some(h.at(6_001)));
        h.pit.advance(h.at(6_001), &mut h.irq);
        assert!(h.pulsed());
        assert_eq!(h.pit.coalesced(), 4);
    }

    #[test]
    fn only_channel_0_counts_and_control_words_move_irq0() {
        assert!(Pit::write_moves_irq0(0, 0x12));
        assert!(Pit::write_moves_irq0(3, 0x34), "channel 0, lsb/msb, mode 2");
        assert!(
            Pit::write_moves_irq0(3, 0x30),
            "channel 0, mode 0: OUT low, no edge"
        );
        assert!(!Pit::write_moves_irq0(3, 0x00), "channel 0 latch");
        assert!(!Pit::write_moves_irq0(3, 0xe2), "read-back");
        assert!(!Pit::write_moves_irq0(3, 0xb6), "channel 2 control word");
        assert!(!Pit::write_moves_irq0(2, 0x12), "channel 2 count");
        assert!(!Pit::write_moves_irq0(1, 0x12), "channel 1 count");
    }

    #[test]
    fn latch_freezes_the_count_until_read_and_a_second_latch_is_ignored() {
        let mut h = H::new();
        h.program(0, 0, 0x34, 1000);
        h.out(h.at(11), 0x43, 0x00); // p = 10: 990
        h.out(h.at(21), 0x43, 0x00); // ignored: still latched
        let now = h.at(500);
        assert_eq!(h.inb(now, 0x40), (990 & 0xff) as u8);
        assert_eq!(h.inb(now, 0x40), (990 >> 8) as u8);
        // Released: the next latch takes the count of its own time.
        assert_eq!(h.count(531, 0), 470);
        // Unlatched reads follow the counter.
        assert_eq!(h.inb(h.at(601), 0x40), (400 & 0xff) as u8);
        assert_eq!(h.inb(h.at(601), 0x40), (400 >> 8) as u8);
    }

    #[test]
    fn read_back_status_reports_out_null_count_rw_mode_bcd() {
        let mut h = H::new();
        let now = h.at(100);
        // Control word alone: NULL COUNT until a count is loaded.
        h.out(now, 0x43, 0x76); // ch1, lsb/msb, mode 3, binary
        assert_eq!(h.status(100, 1), 0x80 | 0x40 | 0x30 | 0x06);
        h.out(now, 0x41, 0x10);
        h.out(now, 0x41, 0x00);
        assert_eq!(
            h.status(100, 1) & 0x40,
            0x40,
            "not loaded before the next clock"
        );
        assert_eq!(h.status(101, 1), 0x80 | 0x30 | 0x06);
        // Mode 0 starts with OUT low; BCD and lsb-only are reported; mode 7 reads as written.
        h.out(h.at(200), 0x43, 0x11); // ch0, lsb, mode 0, BCD
        assert_eq!(h.status(200, 0), 0x40 | 0x10 | 0x01);
        h.out(h.at(200), 0x43, 0xae); // ch2, msb, mode 7 (= 3), binary
        assert_eq!(h.status(200, 2), 0x80 | 0x40 | 0x20 | 0x0e);
        // Count and status latched together: status first, then the count.
        h.program(300, 0, 0x34, 0x1234);
        let now = h.at(301 + 4);
        h.out(now, 0x43, 0xc2);
        assert_eq!(h.inb(now, 0x40), 0x80 | 0x30 | 0x04);
        assert_eq!(h.inb(h.at(400), 0x40), 0x30);
        assert_eq!(h.inb(h.at(400), 0x40), 0x12);
        // A pending count shows as NULL COUNT until it is loaded at the end of the period.
        let now = h.at(301 + 10);
        h.out(now, 0x40, 0x00);
        h.out(now, 0x40, 0x10);
        assert_eq!(h.status(301 + 0x1233, 0) & 0x40, 0x40);
        assert_eq!(h.status(301 + 0x1234, 0) & 0x40, 0);
    }

    #[test]
    fn lsb_only_msb_only_and_word_access_sequences() {
        let mut h = H::new();
        let now = h.at(0);
        h.out(now, 0x43, 0x10); // ch0, lsb only, mode 0
        h.out(now, 0x40, 0x34);
        assert_eq!(h.inb(h.at(1), 0x40), 0x34, "count 0x0034, lsb only");
        assert_eq!(h.inb(h.at(2), 0x40), 0x33, "every read is the lsb");
        h.out(now, 0x43, 0x20); // msb only
        h.out(h.at(10), 0x40, 0x12);
        assert_eq!(h.inb(h.at(11), 0x40), 0x12, "count 0x1200, msb only");
        assert_eq!(h.inb(h.at(11 + 0x100), 0x40), 0x11);
        // Word: the flip-flop alternates per read and per write, and a control word resets it.
        h.out(h.at(20), 0x43, 0x30);
        h.out(h.at(20), 0x40, 0xcd);
        assert_eq!(
            h.status(20, 0) >> 7,
            0,
            "mode 0: OUT low after the first byte"
        );
        h.out(h.at(20), 0x40, 0xab);
        assert_eq!(h.inb(h.at(21), 0x40), 0xcd);
        assert_eq!(h.inb(h.at(21), 0x40), 0xab);
        h.inb(h.at(21), 0x40); // a lone lsb read
        h.out(h.at(21), 0x43, 0x30); // control word: flip-flops reset
        h.out(h.at(21), 0x40, 0x02);
        h.out(h.at(21), 0x40, 0x01);
        assert_eq!(h.inb(h.at(22), 0x40), 0x02);
        assert_eq!(h.inb(h.at(22), 0x40), 0x01);
    }

    /// Linux's `pit_calibrate_tsc` (and `pit_hpet_ptimer_calibrate_cpu` through it): gate
    /// high, speaker off, channel 2 in mode 0 with a 50 ms count, poll port 0x61 bit 5.
    #[test]
    fn linux_pit_calibrate_tsc_sees_out2_after_the_latch_time() {
        let mut h = H::new();
        let t0 = 3_000_000_017;
        let p61 = h.in61(t0);
        h.out61(t0, (p61 & !0x02) | 0x01);
        let latch = PIT_HZ / (1000 / 50);
        h.out(t0, 0x43, 0xb0);
        h.out(t0, 0x42, latch as u8);
        h.out(t0, 0x42, (latch >> 8) as u8);
        assert_eq!(h.in61(t0) & 0x20, 0);
        let step = 997; // TSC ticks per poll
        let mut t = t0;
        while h.in61(t) & 0x20 == 0 {
            t += step;
            assert!(t < t0 + TSC_HZ, "OUT2 never rose");
        }
        let due = h.at(h.tb.cycles_in(t0, PIT_HZ) + 1 + latch);
        assert!(t >= due && t < due + step, "bit 5 set at {t}, due {due}");
        // The calibration Linux derives: kHz = delta TSC / 50 ms, within 0.01 %.
        let khz = (t - t0) / 50;
        assert!(
            khz.abs_diff(TSC_HZ / 1000) < TSC_HZ / 10_000_000,
            "{khz} kHz"
        );
        // Gate low stops mode 0: the count holds.
        h.out(t, 0x43, 0xb0);
        h.out(t, 0x42, 0x00);
        h.out(t, 0x42, 0x10);
        h.out61(t, 0x00);
        let c = |h: &mut H, t| {
            h.out(t, 0x43, 0x80);
            let lo = h.inb(t, 0x42);
            u16::from(lo) | u16::from(h.inb(t, 0x42)) << 8
        };
        assert_eq!(c(&mut h, t + TSC_HZ), 0x1000);
        assert_eq!(h.in61(t + TSC_HZ) & 0x21, 0);
    }

    /// Linux's `quick_pit_calibrate`: mode 0 from 0xffff, reading lsb then msb without a latch
    /// and watching the msb fall by one every 256 clocks.
    #[test]
    fn linux_quick_pit_calibrate_sees_the_msb_fall() {
        let mut h = H::new();
        let w = 777;
        h.out61(h.at(w), 0x01);
        h.program(w, 2, 0xb0, 0xffff);
        for k in 1..40u64 {
            let now = h.at(w + 1 + 256 * k + 128);
            h.inb(now, 0x42); // lsb, ignored
            assert_eq!(h.inb(now, 0x42), 0xff - k as u8);
        }
    }

    #[test]
    fn channel2_gate_stops_resumes_and_triggers_by_mode() {
        let mut h = H::new();
        // Mode 0 with the gate low: loaded, not counting; counting resumes where it stopped.
        h.program(0, 2, 0xb0, 100);
        assert_eq!(h.count(50, 2), 100);
        h.out61(h.at(50), 0x01);
        assert_eq!(h.count(60, 2), 90);
        h.out61(h.at(60), 0x00);
        assert_eq!(h.count(1000, 2), 90);
        h.out61(h.at(1000), 0x01);
        assert_eq!(h.count(1090, 2), 0);
        assert_eq!(h.in61(h.at(1089)) & 0x20, 0);
        assert_eq!(h.in61(h.at(1090)) & 0x20, 0x20);

        // Mode 2: gate low forces OUT high and stops; a rising gate reloads on the next clock.
        h.program(2000, 2, 0xb4, 10);
        assert_eq!(h.count(2001 + 9, 2), 1);
        assert_eq!(h.in61(h.at(2001 + 9)) & 0x20, 0, "OUT low at count 1");
        h.out61(h.at(2001 + 9), 0x00);
        assert_eq!(
            h.in61(h.at(2001 + 9)) & 0x20,
            0x20,
            "gate low: OUT high at once"
        );
        h.out61(h.at(3000), 0x01);
        assert_eq!(h.count(3001, 2), 10);
        assert_eq!(h.count(3005, 2), 6);

        // Mode 1: a one-shot that waits for a rising gate and restarts on another.
        h.out61(h.at(4000), 0x00);
        h.program(4000, 2, 0xb2, 10);
        assert_eq!(h.in61(h.at(4100)) & 0x20, 0x20, "OUT high until triggered");
        h.out61(h.at(4100), 0x01);
        assert_eq!(h.in61(h.at(4101)) & 0x20, 0);
        assert_eq!(h.count(4105, 2), 6);
        h.out61(h.at(4105), 0x00);
        h.out61(h.at(4105), 0x01); // retrigger
        assert_eq!(
            h.in61(h.at(4106 + 9)) & 0x20,
            0,
            "restarted at the next clock"
        );
        assert_eq!(h.in61(h.at(4106 + 10)) & 0x20, 0x20);

        // Mode 5: triggered strobe, low for one clock at terminal count.
        h.out61(h.at(5000), 0x00);
        h.program(5000, 2, 0xba, 3);
        h.out61(h.at(5010), 0x01);
        let outs: [u8; 5] = core::array::from_fn(|i| h.in61(h.at(5011 + 2 + i as u64)) & 0x20);
        assert_eq!(outs, [0x20, 0, 0x20, 0x20, 0x20]);
    }

    #[test]
    fn mode2_new_count_takes_effect_at_the_end_of_the_period() {
        let mut h = H::new();
        h.program(0, 0, 0x34, 100);
        let now = h.at(1 + 30);
        h.out(now, 0x40, 50);
        h.out(now, 0x40, 0);
        assert_eq!(
            h.count(1 + 40, 0),
            60,
            "the running period is not cut short"
        );
        assert_eq!(h.pit.next_deadline(), Some(h.at(101)));
        h.pit.advance(h.at(101), &mut h.irq);
        assert_eq!(h.pit.next_deadline(), Some(h.at(151)));
        assert_eq!(h.count(101, 0), 50);
        assert_eq!(h.count(150, 0), 1);
    }

    #[test]
    fn a_control_word_that_raises_out0_is_an_irq0_edge() {
        let mut h = H::new();
        h.program(0, 0, 0x30, 0); // mode 0, 65536: OUT low
        assert!(!h.pulsed());
        h.out(h.at(100), 0x43, 0x34); // mode 2: OUT high at once
        assert!(h.pulsed());
        h.out(h.at(100), 0x43, 0x34); // already high: no edge
        assert!(!h.pulsed());
        // Mode 0's terminal count is one edge.
        h.program(200, 0, 0x30, 10);
        assert_eq!(h.pit.next_deadline(), Some(h.at(211)));
        h.pit.advance(h.at(1_000_000), &mut h.irq);
        assert!(h.pulsed());
        assert_eq!(h.pit.coalesced(), 0);
        assert_eq!(h.pit.next_deadline(), None);
    }

    #[test]
    fn port61_stores_its_bits_and_bit4_toggles_with_refresh_time() {
        let mut h = H::new();
        h.out61(0, 0xff);
        assert_eq!(h.in61(h.at(0)) & 0xcf, 0x0f, "bits 0-3 stored, 6-7 read 0");
        assert!(h.pit.speaker_enabled());
        let toggles = (0..18 * 10)
            .map(|k| h.in61(h.at(k)) & 0x10)
            .collect::<alloc::vec::Vec<_>>()
            .windows(2)
            .filter(|w| w[0] != w[1])
            .count();
        assert_eq!(toggles, 9, "once every 18 PIT clocks (15.08 us)");
        // Reading twice at one time does not toggle.
        assert_eq!(h.in61(h.at(18)), h.in61(h.at(18)));
    }

    #[test]
    fn junk_on_every_port_at_every_width_never_panics() {
        let mut h = H::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut now: Tsc = 0;
        for _ in 0..200_000 {
            let r = rnd();
            now = match r % 16 {
                0 => now.saturating_add(rnd() % (TSC_HZ * 10_000)),
                1 => now.saturating_add(rnd() >> (r % 64)),
                _ => now.saturating_add(rnd() % 5000),
            };
            let len = [1, 2, 4][(r >> 8) as usize % 3];
            let offset = (r >> 12) as u16 % 6;
            let bytes = rnd().to_le_bytes();
            let mut ctx = Ctx {
                now,
                irq: &mut h.irq,
            };
            match (r >> 20) % 5 {
                0 => h.pit.pio_read(offset, &mut [0; 4][..len], &mut ctx),
                1 => h
                    .pit
                    .port61()
                    .pio_write(offset % 2, &bytes[..len], &mut ctx),
                2 => {
                    h.pit
                        .port61()
                        .pio_read(offset % 2, &mut [0; 4][..len], &mut ctx);
                }
                _ => h.pit.pio_write(offset, &bytes[..len], &mut ctx),
            }
            h.pit.advance(now, &mut h.irq);
            if let Some(d) = h.pit.next_deadline() {
                assert!(d > now || d == u64::MAX, "deadline {d} not after {now}");
            }
        }
        // Time at the end of the range.
        h.pit.advance(u64::MAX, &mut h.irq);
        h.program(0, 0, 0x34, 2);
        h.pit.advance(u64::MAX, &mut h.irq);
        let _ = h.pit.next_deadline();
    }
}
