//! A 16550A UART with FIFOs and interrupts (COM1: ports 0x3F8-0x3FF, IRQ 4; the base and the
//! line are the platform's choice).
//!
//! Owns: the registers (RBR/THR, IER, IIR/FCR, LCR, MCR, LSR, MSR, SCR, DLL/DLM), the 16-byte
//! receive FIFO with the host-side queue behind it, the output queue the platform drains, and
//! the level of its interrupt line. It must not touch the interrupt controllers (it only sets
//! the level of its line in the [`Ctx`] it is given) nor the console: bytes leave through
//! [`Uart16550::take_output`] and arrive through [`Uart16550::push_input`]; turning them into
//! log lines is `LineBuffer`'s job in the VM crate.
//!
//! Mapping: [`Uart16550`] implements [`PioDevice`] for 8 ports from its base (offset 0-7).
//! Wider accesses are split into byte accesses at consecutive offsets, as the ISA bus does for
//! an 8-bit device; offsets past 7 read 0xff and ignore writes.
//!
//! Timing: the line is infinitely fast. A THR byte is on the wire at once: THRE and TEMT are
//! always set, the transmit FIFO is always empty, the divisor only reads back. What the
//! datasheet (TI/NS PC16550D) ties to character times happens at the access instead: the THRE
//! interrupt is re-armed by the THR write that empties the register again, and the character
//! timeout interrupt (IIR 0xC: data in the FIFO below the trigger level, no reads for 4
//! character times) is reported as soon as the FIFO holds fewer bytes than the trigger level.
//!
//! Not emulated: parity, framing and break errors (PE, FE, BI and LSR bit 7 read 0; the host
//! sends bytes, not line signals), DMA mode (FCR bit 3 is accepted and ignored), the baud rate
//! (no pacing), modem inputs other than a connected terminal's (DCD, DSR and CTS high, RI low,
//! fixed outside loopback).

use alloc::collections::VecDeque;

use crate::bus::{Ctx, PioDevice};
use crate::irq::IrqLines;

/// First port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's ISA interrupt.
pub const COM1_IRQ: u8 = 4;
/// Number of ports a UART owns from its base.
pub const UART_PORTS: u16 = 8;
/// Bytes of the receive FIFO (PC16550D).
pub const RX_FIFO_LEN: usize = 16;
/// Bytes of host input queued behind the receive FIFO.
pub const RX_QUEUE_LEN: usize = 256;
/// Bytes of output held for the platform. The platform drains after each exit; a guest's 4 KiB
/// string write fits. When it is full further bytes are dropped and counted
/// ([`Uart16550::tx_dropped`]): the transmitter never stalls, since the guest cannot be told.
pub const TX_QUEUE_LEN: usize = 4096;

const RBR_THR: u16 = 0;
const IER: u16 = 1;
const IIR_FCR: u16 = 2;
const LCR: u16 = 3;
const MCR: u16 = 4;
const LSR: u16 = 5;
const MSR: u16 = 6;
const SCR: u16 = 7;

const IER_ERBFI: u8 = 0x01;
const IER_ETBEI: u8 = 0x02;
const IER_ELSI: u8 = 0x04;
const IER_EDSSI: u8 = 0x08;
/// The 16550 has four IER bits; the rest read 0 (Linux's probe checks this).
const IER_MASK: u8 = 0x0f;

const IIR_NONE: u8 = 0x01;
const IIR_LINE_STATUS: u8 = 0x06;
const IIR_RX_DATA: u8 = 0x04;
const IIR_RX_TIMEOUT: u8 = 0x0c;
const IIR_THRE: u8 = 0x02;
const IIR_MODEM_STATUS: u8 = 0x00;
/// IIR bits 7:6 read 11 while the FIFOs are enabled (a 16550A; 8250 drivers probe it).
const IIR_FIFOS: u8 = 0xc0;

const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;

const LCR_DLAB: u8 = 0x80;

const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const MCR_MASK: u8 = 0x1f;

const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

const MSR_DCTS: u8 = 0x01;
const MSR_DDSR: u8 = 0x02;
const MSR_TERI: u8 = 0x04;
const MSR_DDCD: u8 = 0x08;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

/// A 16550A UART.
#[derive(Clone, Debug)]
pub struct Uart16550 {
    base: u16,
    irq: u8,
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fifo_enabled: bool,
    /// Receive trigger level in bytes (FCR bits 7:6).
    trigger: usize,
    overrun: bool,
    /// The THRE interrupt is armed: THR emptied (or ETBEI was enabled with THR empty) and
    /// neither an IIR read reporting it nor a THR write has cleared it since.
    thre_pending: bool,
    /// MSR bits 3:0.
    msr_delta: u8,
    /// The receive FIFO (its first 16 bytes with FIFOs on, its first byte, the receiver
    /// buffer, without) and the host queue behind it.
    rx: VecDeque<u8>,
    last_rx: u8,
    tx: VecDeque<u8>,
    tx_dropped: u64,
}

impl Uart16550 {
    /// A UART at `base` (what the platform maps; the model sees offsets) raising ISA line
    /// `irq`, in its reset state (PC16550D table "UART Reset Configuration": IER, FCR, LCR,
    /// MCR 0; IIR 0x01; LSR 0x60).
    pub fn new(base: u16, irq: u8) -> Self {
        Self {
            base,
            irq,
            ier: 0,
            lcr: 0,
            mcr: 0,
            scr: 0,
            dll: 0,
            dlm: 0,
            fifo_enabled: false,
            trigger: 1,
            overrun: false,
            thre_pending: false,
            msr_delta: 0,
            rx: VecDeque::with_capacity(RX_FIFO_LEN + RX_QUEUE_LEN),
            last_rx: 0,
            tx: VecDeque::with_capacity(TX_QUEUE_LEN),
            tx_dropped: 0,
        }
    }

    /// COM1: base 0x3F8, IRQ 4.
    pub fn com1() -> Self {
        Self::new(COM1_BASE, COM1_IRQ)
    }

    pub fn base(&self) -> u16 {
        self.base
    }

    pub fn irq(&self) -> u8 {
        self.irq
    }

    /// Hands the transmitted bytes to `f` (in at most two slices, oldest first) and empties
    /// the output queue.
    pub fn take_output(&mut self, mut f: impl FnMut(&[u8])) {
        let (a, b) = self.tx.as_slices();
        for s in [a, b] {
            if !s.is_empty() {
                f(s);
            }
        }
        self.tx.clear();
    }

    /// Bytes waiting in the output queue.
    pub fn output_len(&self) -> usize {
        self.tx.len()
    }

    /// Output bytes dropped because the queue was full.
    pub fn tx_dropped(&self) -> u64 {
        self.tx_dropped
    }

    /// How many bytes [`Self::push_input`] would take now.
    pub fn input_room(&self) -> usize {
        if self.loopback() {
            0
        } else {
            self.rx_capacity() - self.rx.len()
        }
    }

    /// Bytes arriving on the line. Returns how many were received (at most
    /// [`Self::input_room`]). The rest were not: they overran the receiver, which sets OE (a
    /// line status interrupt with ELSI), and are lost as on a wire unless the platform keeps
    /// them; a platform that pushes no more than `input_room` never overruns. In loopback mode
    /// the receiver is disconnected from the line and takes nothing.
    pub fn push_input(&mut self, bytes: &[u8], ctx: &mut Ctx) -> usize {
        if self.loopback() {
            return 0;
        }
        let n = bytes.len().min(self.input_room());
        self.rx.extend(&bytes[..n]);
        if n < bytes.len() {
            self.overrun = true;
        }
        self.update_irq(ctx.irq);
        n
    }

    /// Whether the interrupt line is asserted (as last set).
    pub fn irq_level(&self) -> bool {
        self.pending().is_some() && self.irq_gate()
    }

    fn rx_capacity(&self) -> usize {
        RX_FIFO_LEN + RX_QUEUE_LEN
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }

    /// Bytes in the receive FIFO (or the receiver buffer without FIFOs).
    fn fifo_len(&self) -> usize {
        self.rx
            .len()
            .min(if self.fifo_enabled { RX_FIFO_LEN } else { 1 })
    }

    /// A character reached the receiver (from the line or, in loopback, the transmitter).
    fn receive(&mut self, b: u8) {
        if self.rx.len() < self.rx_capacity() {
            self.rx.push_back(b);
        } else {
            // "An overrun error occurs when the FIFO is full and the next character has been
            // completely received": the new character is lost.
            self.overrun = true;
        }
    }

    /// The interrupt to report, by the PC16550D's priorities: receiver line status, then
    /// received data available or character timeout, then THR empty, then modem status.
    fn pending(&self) -> Option<u8> {
        if self.ier & IER_ELSI != 0 && self.overrun {
            Some(IIR_LINE_STATUS)
        } else if self.ier & IER_ERBFI != 0 && !self.rx.is_empty() {
            if self.fifo_enabled && self.fifo_len() < self.trigger {
                Some(IIR_RX_TIMEOUT)
            } else {
                Some(IIR_RX_DATA)
            }
        } else if self.ier & IER_ETBEI != 0 && self.thre_pending {
            Some(IIR_THRE)
        } else if self.ier & IER_EDSSI != 0 && self.msr_delta != 0 {
            Some(IIR_MODEM_STATUS)
        } else {
            None
        }
    }

    /// On a PC the UART's interrupt output reaches the bus through a buffer enabled by the
    /// OUT2 pin, which Linux and other drivers set. In loopback the PC16550D forces the modem
    /// outputs, OUT2 included, to their inactive state, so the line stays low there.
    fn irq_gate(&self) -> bool {
        self.mcr & MCR_OUT2 != 0 && !self.loopback()
    }

    fn update_irq(&self, irq: &mut IrqLines) {
        irq.set_level(self.irq, self.irq_level());
    }

    /// The modem inputs (MSR bits 7:4). In loopback "the four MODEM Control outputs (DTR, RTS,
    /// OUT1, OUT2) are internally connected to the four MODEM Control inputs" (DSR, CTS, RI,
    /// DCD). Outside it, a terminal is connected: DCD, DSR and CTS high, RI low.
    fn modem_inputs(&self) -> u8 {
        if self.loopback() {
            let m = self.mcr;
            let bit = |mask: u8, out: u8| if m & mask != 0 { out } else { 0 };
            bit(MCR_RTS, MSR_CTS)
                | bit(MCR_DTR, MSR_DSR)
                | bit(MCR_OUT1, MSR_RI)
                | bit(MCR_OUT2, MSR_DCD)
        } else {
            MSR_DCD | MSR_DSR | MSR_CTS
        }
    }

    fn write_mcr(&mut self, v: u8) {
        let before = self.modem_inputs();
        let was_loopback = self.loopback();
        self.mcr = v & MCR_MASK;
        let after = self.modem_inputs();
        let changed = before ^ after;
        // Delta bits: CTS, DSR, DCD changed; TERI on RI's trailing (high to low) edge.
        if changed & MSR_CTS != 0 {
            self.msr_delta |= MSR_DCTS;
        }
        if changed & MSR_DSR != 0 {
            self.msr_delta |= MSR_DDSR;
        }
        if before & MSR_RI != 0 && after & MSR_RI == 0 {
            self.msr_delta |= MSR_TERI;
        }
        if changed & MSR_DCD != 0 {
            self.msr_delta |= MSR_DDCD;
        }
        if was_loopback != self.loopback() {
            log::trace!("uart {:#x}: loopback {}", self.base, self.loopback());
        }
    }

    fn write_thr(&mut self, v: u8, irq: &mut IrqLines) {
        // Writing THR clears the THRE interrupt; the byte leaves at once and THR is empty
        // again, which arms it anew. The line is dropped in between, so that an edge-triggered
        // input sees the new interrupt as the real chip's later one.
        self.thre_pending = false;
        self.update_irq(irq);
        if self.loopback() {
            self.receive(v);
        } else if self.tx.len() < TX_QUEUE_LEN {
            self.tx.push_back(v);
        } else {
            self.tx_dropped = self.tx_dropped.saturating_add(1);
        }
        self.thre_pending = true;
    }

    fn write_ier(&mut self, v: u8) {
        let old = self.ier;
        self.ier = v & IER_MASK;
        // Enabling ETBEI while THR is empty (always, here) raises the THRE interrupt: Linux's
        // startup and its UART_BUG_THRE test rely on it re-asserting after IER 0 -> THRI.
        if self.ier & IER_ETBEI != 0 && old & IER_ETBEI == 0 {
            self.thre_pending = true;
        }
    }

    fn write_fcr(&mut self, v: u8) {
        let enable = v & FCR_ENABLE != 0;
        if enable != self.fifo_enabled {
            // "When changing from FIFO Mode to 16450 mode and vice versa, data is
            // automatically cleared from the FIFOs."
            self.clear_rx_fifo();
            self.fifo_enabled = enable;
        }
        // The other bits are only programmed with FCR0 set.
        if enable {
            if v & FCR_CLEAR_RX != 0 {
                self.clear_rx_fifo();
            }
            // (Clear TX, bit 2: the transmit FIFO is always empty.)
            self.trigger = [1, 4, 8, 14][usize::from(v >> 6)];
        }
    }

    /// Empties the receive FIFO; the host queue behind it is the line, not the FIFO, and
    /// refills it.
    fn clear_rx_fifo(&mut self) {
        let n = self.fifo_len();
        self.rx.drain(..n);
    }

    fn read_rbr(&mut self) -> u8 {
        // With nothing received the receiver buffer still holds its last character.
        if let Some(b) = self.rx.pop_front() {
            self.last_rx = b;
        }
        self.last_rx
    }

    fn read_iir(&mut self) -> u8 {
        let p = self.pending();
        // "THRE interrupt ... reset: reading the IIR (if source of interrupt)".
        if p == Some(IIR_THRE) {
            self.thre_pending = false;
        }
        p.unwrap_or(IIR_NONE) | if self.fifo_enabled { IIR_FIFOS } else { 0 }
    }

    fn read_lsr(&mut self) -> u8 {
        let mut v = LSR_THRE | LSR_TEMT;
        if !self.rx.is_empty() {
            v |= LSR_DR;
        }
        if self.overrun {
            v |= LSR_OE;
        }
        // Reading LSR clears the error bits (and so the line status interrupt).
        self.overrun = false;
        v
    }

    fn read_msr(&mut self) -> u8 {
        let v = self.modem_inputs() | self.msr_delta;
        self.msr_delta = 0;
        v
    }

    fn read_reg(&mut self, offset: u16) -> u8 {
        match offset {
            RBR_THR if self.dlab() => self.dll,
            RBR_THR => self.read_rbr(),
            IER if self.dlab() => self.dlm,
            IER => self.ier,
            IIR_FCR => self.read_iir(),
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => self.read_lsr(),
            MSR => self.read_msr(),
            SCR => self.scr,
            _ => 0xff,
        }
    }

    fn write_reg(&mut self, offset: u16, v: u8, irq: &mut IrqLines) {
        match offset {
            RBR_THR if self.dlab() => self.dll = v,
            RBR_THR => self.write_thr(v, irq),
            IER if self.dlab() => self.dlm = v,
            IER => self.write_ier(v),
            IIR_FCR => self.write_fcr(v),
            LCR => self.lcr = v,
            MCR => self.write_mcr(v),
            SCR => self.scr = v,
            // LSR and MSR writes are for factory test on the PC16550D; ignored.
            _ => {}
        }
    }
}

impl PioDevice for Uart16550 {
    fn pio_read(&mut self, offset: u16, data: &mut [u8], ctx: &mut Ctx) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_reg(offset.wrapping_add(i as u16));
        }
        self.update_irq(ctx.irq);
    }

    fn pio_write(&mut self, offset: u16, data: &[u8], ctx: &mut Ctx) {
        for (i, &b) in data.iter().enumerate() {
            self.write_reg(offset.wrapping_add(i as u16), b, ctx.irq);
        }
        self.update_irq(ctx.irq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    struct H {
        u: Uart16550,
        irq: IrqLines,
    }

    impl H {
        fn new() -> Self {
            Self {
                u: Uart16550::com1(),
                irq: IrqLines::default(),
            }
        }

        fn out(&mut self, offset: u16, v: u8) {
            let mut ctx = Ctx {
                now: 0,
                irq: &mut self.irq,
            };
            self.u.pio_write(offset, &[v], &mut ctx);
        }

        fn inb(&mut self, offset: u16) -> u8 {
            let mut d = [0];
            let mut ctx = Ctx {
                now: 0,
                irq: &mut self.irq,
            };
            self.u.pio_read(offset, &mut d, &mut ctx);
            d[0]
        }

        fn push(&mut self, bytes: &[u8]) -> usize {
            let mut ctx = Ctx {
                now: 0,
                irq: &mut self.irq,
            };
            self.u.push_input(bytes, &mut ctx)
        }

        fn line(&self) -> bool {
            self.irq.level(COM1_IRQ)
        }

        fn rose(&mut self) -> bool {
            self.irq.take_changes().rose & 1 << COM1_IRQ != 0
        }

        fn output(&mut self) -> Vec<u8> {
            let mut v = Vec::new();
            self.u.take_output(|s| v.extend_from_slice(s));
            v
        }
    }

    /// Linux's 8250 `autoconfig`: IER probe, loopback check, FIFO detection through IIR bits
    /// 7:6, the EFR probes a 16550A must fail, the IER bit 6 (UUE) check, the scratch register.
    #[test]
    fn linux_8250_autoconfig_finds_a_16550a() {
        let mut h = H::new();
        let scratch = h.inb(IER);
        h.out(IER, 0);
        assert_eq!(h.inb(IER) & 0x0f, 0);
        h.out(IER, 0x0f);
        assert_eq!(h.inb(IER) & 0x0f, 0x0f);
        h.out(IER, scratch);
        // Loopback with RTS and OUT2: MSR shows CTS and DCD only.
        let save_mcr = h.inb(MCR);
        h.out(MCR, 0x1a);
        assert_eq!(h.inb(MSR) & 0xf0, 0x90);
        h.out(MCR, save_mcr);
        // EFR write under LCR 0xbf is an FCR write on a 16550A; then FIFO detection.
        h.out(LCR, 0xbf);
        h.out(2, 0);
        h.out(LCR, 0);
        h.out(IIR_FCR, 0x01);
        assert_eq!(h.inb(IIR_FCR) >> 6, 3, "16550A: FIFOs enabled read 11");
        assert_eq!(h.inb(IIR_FCR) & 0x30, 0, "no 64-byte FIFO (16750)");
        h.out(LCR, 0x80);
        assert_ne!(h.inb(2), 0, "no EFR under DLAB: IIR, not 0");
        h.out(LCR, 0xbf);
        assert_ne!(h.inb(2), 0);
        h.out(LCR, 0);
        let ier = h.inb(IER);
        h.out(IER, ier | 0x40);
        assert_eq!(
            h.inb(IER) & 0x40,
            0,
            "UUE does not stick: not an XScale UART"
        );
        h.out(IER, ier);
        h.out(SCR, 0xa5);
        assert_eq!(h.inb(SCR), 0xa5);
        // Divisor latch behind DLAB, then back to RBR/IER.
        h.out(LCR, 0x83);
        h.out(RBR_THR, 0x01);
        h.out(IER, 0x00);
        assert_eq!((h.inb(RBR_THR), h.inb(IER)), (0x01, 0x00));
        h.out(LCR, 0x03);
        assert_eq!(h.inb(LCR), 0x03);
        assert_eq!(h.inb(IER), ier);
        assert_eq!(h.inb(LSR), 0x60, "THRE and TEMT");
        assert!(h.output().is_empty(), "nothing transmitted by the probe");
    }

    /// Linux's `serial8250_do_startup` UART_BUG_THRE test: THRE must be reasserted when
    /// THRI is enabled again after an IIR read cleared it.
    #[test]
    fn thre_interrupt_after_enabling_ier_thri_and_after_each_thr_write() {
        let mut h = H::new();
        h.out(MCR, MCR_OUT2 | MCR_DTR | MCR_RTS);
        h.out(IER, IER_ETBEI);
        assert!(h.line());
        let iir1 = h.inb(IIR_FCR);
        assert_eq!(iir1, IIR_THRE, "THRE pending");
        assert!(!h.line(), "reading IIR cleared it");
        assert_eq!(h.inb(IIR_FCR), IIR_NONE);
        h.out(IER, 0);
        h.out(IER, IER_ETBEI);
        assert_eq!(h.inb(IIR_FCR), IIR_THRE, "reasserted: no UART_BUG_THRE");
        // Each THR write clears THRE and the byte leaves at once: a new edge on the line.
        h.rose();
        for &b in b"ok\n" {
            h.out(RBR_THR, b);
            assert!(h.rose(), "THR write re-raises THRE");
            assert!(h.line());
            assert_eq!(h.inb(LSR) & 0x60, 0x60);
        }
        assert_eq!(h.output(), b"ok\n");
        // Writing IER with THRI already set does not re-arm a THRE that was read.
        assert_eq!(h.inb(IIR_FCR), IIR_THRE);
        h.out(IER, IER_ETBEI);
        assert_eq!(h.inb(IIR_FCR), IIR_NONE);
    }

    #[test]
    fn rx_data_interrupt_at_the_fifo_trigger_level_timeout_below_it() {
        // (FCR, trigger level)
        for (fcr, level) in [(0x01, 1), (0x41, 4), (0x81, 8), (0xc1, 14)] {
            let mut h = H::new();
            h.out(MCR, MCR_OUT2);
            h.out(IIR_FCR, fcr);
            h.out(IER, IER_ERBFI);
            assert_eq!(h.inb(IIR_FCR), 0xc1);
            let below: Vec<u8> = (0..level - 1).collect();
            assert_eq!(h.push(&below), level as usize - 1);
            if level > 1 {
                assert_eq!(h.inb(IIR_FCR), 0xcc, "timeout below trigger {level}");
                assert!(h.line());
            }
            h.push(&[0xee]);
            assert_eq!(h.inb(IIR_FCR), 0xc4, "data available at trigger {level}");
            assert!(h.line());
            let mut got = Vec::new();
            while h.inb(LSR) & LSR_DR != 0 {
                got.push(h.inb(RBR_THR));
            }
            assert_eq!(got.len(), level as usize);
            assert_eq!(got.last(), Some(&0xee));
            assert_eq!(h.inb(IIR_FCR), 0xc1);
            assert!(!h.line());
        }
        // Without FIFOs: one byte in the receiver buffer is data available.
        let mut h = H::new();
        h.out(MCR, MCR_OUT2);
        h.out(IER, IER_ERBFI);
        h.push(b"ab");
        assert_eq!(h.inb(IIR_FCR), IIR_RX_DATA);
        assert_eq!(h.inb(RBR_THR), b'a');
        assert_eq!(h.inb(IIR_FCR), IIR_RX_DATA, "the next byte moved in");
        assert_eq!(h.inb(RBR_THR), b'b');
        assert_eq!(h.inb(IIR_FCR), IIR_NONE);
        assert_eq!(
            h.inb(RBR_THR),
            b'b',
            "an empty receiver buffer keeps its last byte"
        );
    }

    #[test]
    fn overrun_when_the_queue_is_full_sets_oe_until_lsr_is_read() {
        let mut h = H::new();
        h.out(MCR, MCR_OUT2);
        h.out(IIR_FCR, 0x01);
        let room = h.u.input_room();
        assert_eq!(room, RX_FIFO_LEN + RX_QUEUE_LEN);
        let bytes: Vec<u8> = (0..300u16).map(|i| i as u8).collect();
        assert_eq!(h.push(&bytes), room);
        assert_eq!(h.u.input_room(), 0);
        h.out(IER, IER_ELSI);
        assert_eq!(h.inb(IIR_FCR), 0xc6, "line status");
        assert!(h.line());
        assert_eq!(h.inb(LSR), LSR_DR | LSR_OE | LSR_THRE | LSR_TEMT);
        assert_eq!(
            h.inb(LSR),
            LSR_DR | LSR_THRE | LSR_TEMT,
            "OE clears on read"
        );
        assert!(!h.line());
        // What was accepted arrives in order.
        let got: Vec<u8> = (0..room).map(|_| h.inb(RBR_THR)).collect();
        assert_eq!(got, bytes[..room]);
    }

    #[test]
    fn iir_reports_by_priority_line_status_rx_thre_modem() {
        let mut h = H::new();
        h.out(IIR_FCR, 0x07); // FIFOs on, cleared, trigger 1
        h.push(&[0x55; 300]); // overrun
        h.out(MCR, MCR_LOOP); // modem inputs drop: DCTS, DDSR, DDCD
        h.out(MCR, MCR_OUT2); // and come back
        h.out(IER, 0x0f); // all, THRE armed
        assert!(h.line());
        assert_eq!(h.inb(IIR_FCR), 0xc6);
        h.inb(LSR);
        assert_eq!(h.inb(IIR_FCR), 0xc4);
        while h.inb(LSR) & LSR_DR != 0 {
            h.inb(RBR_THR);
        }
        assert_eq!(h.inb(IIR_FCR), 0xc2, "THRE, cleared by this read");
        assert_eq!(h.inb(IIR_FCR), 0xc0, "modem status");
        assert_eq!(
            h.inb(MSR),
            MSR_DCD | MSR_DSR | MSR_CTS | MSR_DDCD | MSR_DDSR | MSR_DCTS
        );
        assert_eq!(h.inb(IIR_FCR), 0xc1);
        assert!(!h.line());
    }

    #[test]
    fn loopback_returns_thr_to_rbr_and_mirrors_mcr_in_msr() {
        let mut h = H::new();
        h.out(IIR_FCR, 0x01);
        h.out(MCR, MCR_LOOP | MCR_OUT2);
        h.inb(MSR);
        h.out(RBR_THR, b'x');
        h.out(RBR_THR, b'y');
        assert!(h.output().is_empty(), "nothing on the wire");
        assert_eq!(h.inb(LSR) & LSR_DR, LSR_DR);
        assert_eq!((h.inb(RBR_THR), h.inb(RBR_THR)), (b'x', b'y'));
        assert_eq!(h.push(b"lost"), 0, "the line is disconnected in loopback");
        // MSR bits 7:4 = OUT2, OUT1, DTR, RTS; deltas as they change; TERI on RI falling.
        let cases: [(u8, u8); 4] = [
            (0x1f, 0xf0 | MSR_DCTS | MSR_DDSR),
            (0x1b, 0xb0 | MSR_TERI),
            (0x10, MSR_DDCD | MSR_DCTS | MSR_DDSR),
            (0x12, 0x10 | MSR_DCTS),
        ];
        for (mcr, msr) in cases {
            h.out(MCR, mcr);
            assert_eq!(h.inb(MSR), msr, "MCR {mcr:#x}");
            assert_eq!(h.inb(MSR) & 0x0f, 0, "deltas clear on read");
        }
        // Interrupts are reported in IIR, but the OUT2 pin is forced inactive: no IRQ.
        h.out(MCR, MCR_LOOP | MCR_OUT2);
        h.out(IER, IER_ERBFI);
        h.out(RBR_THR, b'z');
        assert_eq!(h.inb(IIR_FCR), 0xc4);
        assert!(!h.line());
        h.out(MCR, MCR_OUT2);
        assert!(
            h.line(),
            "out of loopback the pending interrupt reaches the line"
        );
    }

    #[test]
    fn out2_gates_the_irq_line() {
        let mut h = H::new();
        h.out(IER, IER_ETBEI);
        assert!(!h.line(), "pending, but OUT2 is clear");
        assert_eq!(h.inb(IIR_FCR), IIR_THRE, "reported in IIR all the same");
        h.out(IER, 0);
        h.out(IER, IER_ETBEI);
        assert!(!h.line(), "pending, but OUT2 is clear");
        h.out(MCR, MCR_DTR | MCR_RTS | MCR_OUT1);
        assert!(!h.line());
        h.out(MCR, MCR_OUT2);
        assert!(h.line());
        h.out(MCR, 0);
        assert!(!h.line());
    }

    #[test]
    fn output_queue_drains_in_order_and_drops_past_its_size() {
        let mut h = H::new();
        for i in 0..TX_QUEUE_LEN + 10 {
            h.out(RBR_THR, i as u8);
        }
        assert_eq!(h.u.output_len(), TX_QUEUE_LEN);
        assert_eq!(h.u.tx_dropped(), 10);
        let out = h.output();
        assert!(out.iter().enumerate().all(|(i, &b)| b == i as u8));
        assert_eq!(h.u.output_len(), 0);
        // A 16-bit OUT is two byte writes: THR then IER.
        let mut ctx = Ctx {
            now: 0,
            irq: &mut h.irq,
        };
        h.u.pio_write(RBR_THR, &[b'A', 0x02], &mut ctx);
        assert_eq!(h.output(), b"A");
        assert_eq!(h.inb(IER), 0x02);
    }

    #[test]
    fn fcr_clears_the_fifo_not_the_line_behind_it() {
        let mut h = H::new();
        h.out(IIR_FCR, 0x01);
        let bytes: Vec<u8> = (0..40).collect();
        h.push(&bytes);
        h.out(IIR_FCR, 0x03); // clear RX: the 16 in the FIFO go
        assert_eq!(h.inb(RBR_THR), 16);
        h.out(IIR_FCR, 0x00); // FIFOs off: the FIFO (refilled: 17-32) is cleared again
        assert_eq!(h.inb(IIR_FCR) & 0xc0, 0);
        assert_eq!(h.inb(RBR_THR), 33);
        h.out(IIR_FCR, 0x02); // without FCR0 the other bits are not programmed
        assert_eq!(h.inb(RBR_THR), 34);
    }

    #[test]
    fn junk_on_every_port_at_every_width_never_panics() {
        let mut h = H::new();
        let mut seed = 0x853c_49e6_748f_ea9bu64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200_000 {
            let r = rnd();
            let len = [1, 2, 4][(r >> 8) as usize % 3];
            let offset = (r >> 12) as u16 % 10;
            let bytes = rnd().to_le_bytes();
            let mut ctx = Ctx {
                now: r,
                irq: &mut h.irq,
            };
            match (r >> 20) % 8 {
                0 | 1 => h.u.pio_read(offset, &mut [0; 4][..len], &mut ctx),
                2 => {
                    let input = [bytes[0]; 64];
                    let n = (r >> 32) as usize % 64;
                    assert!(h.u.push_input(&input[..n], &mut ctx) <= n);
                }
                3 if r % 64 == 0 => h.u.take_output(|_| {}),
                _ => h.u.pio_write(offset, &bytes[..len], &mut ctx),
            }
            assert!(h.u.output_len() <= TX_QUEUE_LEN);
            assert_eq!(h.irq.level(COM1_IRQ), h.u.irq_level(), "line follows state");
        }
    }
}
