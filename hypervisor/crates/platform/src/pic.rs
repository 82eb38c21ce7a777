//! The PC's two cascaded 8259A programmable interrupt controllers and the PIIX's edge/level
//! control registers (Intel 8259A datasheet, order no. 231468; PIIX4 datasheet 4.1.2 and
//! 4.1.13 for the ELCR).
//!
//! This model owns the controllers' IRR, ISR and IMR, their initialisation sequence and
//! operation command words, the cascade of the slave on the master's IR2, and the INTA cycle
//! ([`PicPair::acknowledge`]) that yields a vector. It must not touch the CPU or the local
//! APIC: the platform asks [`PicPair::intr`] whether the INTR output is raised and, when the
//! local APIC passes it on (LINT0 in ExtINT mode, or the APIC hardware-disabled), runs the
//! INTA cycle and injects the vector. Line levels come from the platform ([`crate::irq`]).
//!
//! # Ports
//!
//! The pair answers three ranges: the master at 0x20-0x21, the slave at 0xA0-0xA1 and the
//! ELCR at 0x4D0-0x4D1 ([`PORT_RANGES`]). Since one device serves disjoint ranges, its
//! [`PioDevice`] `offset` is the absolute port: the platform maps each range to the pair and
//! passes the range's base plus the offset within it. Each byte of a wider access goes to the
//! next port (a 16-bit IN from 0x20 reads 0x20 and 0x21, as the ISA bus splits it); bytes for
//! ports outside the three ranges read 0xFF and ignore writes.
//!
//! # Choices where the datasheet leaves freedom
//!
//! - Power-on: the 8259A's state is undefined until ICW1; here every IRQ is masked (IMR 0xFF)
//!   and the vector base is 0, so a guest that never initialises the controllers receives
//!   nothing from them. The cascade wiring (ICW3: 0x04 on the master, 2 on the slave) is
//!   preset. Linux and firmware initialise both controllers anyway.
//! - ICW1 clears the IMR, the ISR, the rotation, special mask mode, poll and the ICW4 modes
//!   (datasheet: "Initialization Command Words"; the ISR clear is QEMU's and KVM's choice), and
//!   resets edge sensing: an edge-triggered line that is high must fall and rise again to
//!   request. Level-triggered requests stay. ICW1's LTIM bit is ignored: the ELCR decides, as
//!   on the PIIX. ICW1's ADI, ICW4's µPM (8086 mode is assumed), BUF and M/S bits are ignored.
//! - An edge-triggered request stays latched in the IRR after its line falls (until the INTA
//!   or ICW1), so a pulse is seen; a level-triggered request follows the line. A request that
//!   vanished before the INTA (a level line that fell, an IRR bit masked since) gives the
//!   spurious IRQ 7 of the controller (vector base + 7, ISR untouched); a slave request that
//!   vanished after raising the master's IR2 gives the slave's IRQ 15, and the master's ISR
//!   bit 2 is set (which is why Linux EOIs the master for a spurious IRQ 15).
//! - The slave's INT output drives the master's IR2 as an edge-triggered input (ELCR bit 2 is
//!   fixed 0). The master returns the slave's vector for IR2 only when it is in cascade mode
//!   (ICW1 SNGL clear) and ICW3 bit 2 is set; otherwise IR2 is the master's own IRQ 2. The slave
//!   answers whatever its ICW3 ID. IRQ 2 from the platform is ignored: it is the cascade.
//! - A poll (OCW3 P) read returns 0x80 | level of the highest request and acknowledges it as an
//!   INTA would, or 0 when nothing is requested; polling the slave does not touch the master.
//! - Non-specific EOI in special mask mode skips in-service levels that are masked (datasheet:
//!   "Special Mask Mode").
//!
//! # Not emulated
//!
//! MCS-80/85 mode, buffered mode, and the timing of real INTA cycles (the platform's
//! [`PicPair::acknowledge`] is one atomic INTA).

use crate::bus::{Ctx, PioDevice};

/// The master's command and data ports.
pub const MASTER_PORT: u16 = 0x20;
/// The slave's command and data ports.
pub const SLAVE_PORT: u16 = 0xA0;
/// The ELCR, master byte then slave byte.
pub const ELCR_PORT: u16 = 0x4D0;
/// Every range the pair answers, as (base, length).
/// The vector bases a PC BIOS programs (ICW2): IRQ 0-7 at 0x08, IRQ 8-15 at 0x70, which its
/// real-mode interrupt vector table follows.
pub const BIOS_MASTER_BASE: u8 = 0x08;
pub const BIOS_SLAVE_BASE: u8 = 0x70;
pub const PORT_RANGES: [(u16, u16); 3] = [(MASTER_PORT, 2), (SLAVE_PORT, 2), (ELCR_PORT, 2)];

/// The slave's INT output goes to the master's IR2.
const CASCADE_IRQ: u8 = 2;
/// ELCR bits that can be set: IRQ 0, 1 and 2 are fixed edge on the master, IRQ 8 and 13 on
/// the slave (PIIX4 4.1.13).
const ELCR_MASK_MASTER: u8 = 0xF8;
const ELCR_MASK_SLAVE: u8 = 0xDE;

/// Where a controller is in its initialisation sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Init {
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

/// One 8259A.
#[derive(Clone, Debug)]
struct Pic {
    master: bool,
    irr: u8,
    isr: u8,
    imr: u8,
    /// Present input levels, for edge detection.
    lines: u8,
    elcr: u8,
    elcr_mask: u8,
    /// ICW2 bits 7:3.
    base: u8,
    init: Init,
    icw4_needed: bool,
    single: bool,
    icw3: u8,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_fully_nested: bool,
    /// The IRQ with the highest priority (rotation, OCW2); 0 after initialisation.
    priority_base: u8,
    read_isr: bool,
    poll: bool,
    special_mask: bool,
}

impl Pic {
    fn new(master: bool) -> Self {
        Self {
            master,
            irr: 0,
            isr: 0,
            imr: 0xFF,
            lines: 0,
            elcr: 0,
            elcr_mask: if master {
                ELCR_MASK_MASTER
            } else {
                ELCR_MASK_SLAVE
            },
            base: 0,
            init: Init::Ready,
            icw4_needed: false,
            single: false,
            icw3: if master {
                1 << CASCADE_IRQ
            } else {
                CASCADE_IRQ
            },
            auto_eoi: false,
            rotate_on_auto_eoi: false,
            special_fully_nested: false,
            priority_base: 0,
            read_isr: false,
            poll: false,
            special_mask: false,
        }
    }

    /// An input changes level: an edge input latches a request on a rising edge, a level
    /// input's request follows the line (ELCR).
    fn set_input(&mut self, irq: u8, level: bool) {
        let bit = 1u8 << (irq & 7);
        if self.elcr & bit != 0 {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && self.lines & bit == 0 {
            self.irr |= bit;
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// The priority rank (0 = highest) of the highest-priority IRQ in `mask`, given the
    /// rotation.
    fn rank(&self, mask: u8) -> Option<u8> {
        // IRQ n has rank (n - priority_base) mod 8: rotating the mask by the base puts each
        // IRQ at its rank's bit, and the lowest set bit is the best. (The platform asks this
        // after every interrupt, mostly of an empty mask.)
        (mask != 0).then(|| {
            mask.rotate_right(u32::from(self.priority_base & 7))
                .trailing_zeros() as u8
        })
    }

    fn irq_of_rank(&self, rank: u8) -> u8 {
        (rank + self.priority_base) & 7
    }

    /// The IRQ this controller would signal on INT: the highest-priority unmasked request, if
    /// it has a higher priority than every level in service (fully nested mode). In special
    /// mask mode masked in-service levels do not block; in special fully nested mode the
    /// master's cascade level does not block further slave requests.
    fn pending(&self) -> Option<u8> {
        let request = self.rank(self.irr & !self.imr)?;
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if self.special_fully_nested && self.master {
            in_service &= !(1 << CASCADE_IRQ);
        }
        match self.rank(in_service) {
            Some(current) if current <= request => None,
            _ => Some(self.irq_of_rank(request)),
        }
    }

    /// The INTA for `irq`: into the ISR unless in auto-EOI mode (which may rotate); an edge
    /// request is consumed, a level request stays as long as its line.
    fn intack(&mut self, irq: u8) {
        let bit = 1u8 << (irq & 7);
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_base = (irq + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        if self.elcr & bit == 0 {
            self.irr &= !bit;
        }
    }

    fn vector(&self, irq: u8) -> u8 {
        self.base | (irq & 7)
    }

    /// Whether IR2 is a cascade input (INTA gets the slave's vector).
    fn cascades(&self) -> bool {
        self.master && !self.single && self.icw3 & (1 << CASCADE_IRQ) != 0
    }

    fn write_command(&mut self, v: u8) {
        if v & 0x10 != 0 {
            self.icw1(v);
        } else if v & 0x08 != 0 {
            // OCW3: poll, read register select, special mask mode.
            if v & 0x04 != 0 {
                self.poll = true;
            }
            if v & 0x02 != 0 {
                self.read_isr = v & 1 != 0;
            }
            if v & 0x40 != 0 {
                self.special_mask = v & 0x20 != 0;
            }
        } else {
            self.ocw2(v);
        }
    }

    fn icw1(&mut self, v: u8) {
        // Edge sensing restarts: latched edge requests are dropped, a line already high must
        // rise again. Level requests follow their lines.
        self.irr = self.lines & self.elcr;
        self.isr = 0;
        self.imr = 0;
        self.priority_base = 0;
        self.read_isr = false;
        self.poll = false;
        self.special_mask = false;
        // Without IC4 the ICW4 functions are zero; with it ICW4 sets them.
        self.auto_eoi = false;
        self.rotate_on_auto_eoi = false;
        self.special_fully_nested = false;
        self.icw4_needed = v & 0x01 != 0;
        self.single = v & 0x02 != 0;
        self.init = Init::Icw2;
    }

    /// OCW2: EOIs and rotation (datasheet, "Operation Command Words", Figure 8: R SL EOI).
    fn ocw2(&mut self, v: u8) {
        let level = v & 7;
        match v >> 5 {
            0b000 => self.rotate_on_auto_eoi = false,
            0b100 => self.rotate_on_auto_eoi = true,
            cmd @ (0b001 | 0b101) => {
                // Non-specific EOI: the highest-priority level in service.
                let mut in_service = self.isr;
                if self.special_mask {
                    in_service &= !self.imr;
                }
                if let Some(rank) = self.rank(in_service) {
                    let irq = self.irq_of_rank(rank);
                    self.isr &= !(1 << irq);
                    if cmd == 0b101 {
                        self.priority_base = (irq + 1) & 7;
                    }
                }
            }
            0b011 => self.isr &= !(1 << level),
            0b111 => {
                self.isr &= !(1 << level);
                self.priority_base = (level + 1) & 7;
            }
            // Set priority: `level` becomes the lowest.
            0b110 => self.priority_base = (level + 1) & 7,
            _ => {} // 0b010: no operation
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.init {
            Init::Ready => self.imr = v,
            Init::Icw2 => {
                self.base = v & 0xF8;
                self.init = match (self.single, self.icw4_needed) {
                    (false, _) => Init::Icw3,
                    (true, true) => Init::Icw4,
                    (true, false) => Init::Ready,
                };
            }
            Init::Icw3 => {
                self.icw3 = v;
                self.init = if self.icw4_needed {
                    Init::Icw4
                } else {
                    Init::Ready
                };
            }
            Init::Icw4 => {
                self.auto_eoi = v & 0x02 != 0;
                self.special_fully_nested = v & 0x10 != 0;
                self.init = Init::Ready;
            }
        }
    }

    fn read(&mut self, data_port: bool) -> u8 {
        if self.poll {
            // The read after a poll command is an INTA (datasheet, "The Poll Command").
            self.poll = false;
            return match self.pending() {
                Some(irq) => {
                    self.intack(irq);
                    0x80 | irq
                }
                None => 0,
            };
        }
        match (data_port, self.read_isr) {
            (true, _) => self.imr,
            (false, true) => self.isr,
            (false, false) => self.irr,
        }
    }

    fn write_elcr(&mut self, v: u8) {
        self.elcr = v & self.elcr_mask;
        // Level inputs' requests follow their lines from now on.
        self.irr = (self.irr & !self.elcr) | (self.lines & self.elcr);
    }
}

/// The master and slave 8259A with their ELCRs.
#[derive(Clone, Debug)]
pub struct PicPair {
    master: Pic,
    slave: Pic,
}

impl Default for PicPair {
    fn default() -> Self {
        Self::new()
    }
}

impl PicPair {
    /// Both controllers at power-on (see the module doc): everything masked, all edge.
    pub fn new() -> Self {
        Self {
            master: Pic::new(true),
            slave: Pic::new(false),
        }
    }

    /// ISA IRQ `irq` (0-15) changes level. IRQ 2 (the cascade) and numbers above 15 are
    /// ignored.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            CASCADE_IRQ => {}
            0..=7 => self.master.set_input(irq, level),
            8..=15 => self.slave.set_input(irq - 8, level),
            _ => {}
        }
        self.update_cascade();
    }

    /// The slave's INT output onto the master's IR2.
    fn update_cascade(&mut self) {
        let int = self.slave.pending().is_some();
        self.master.set_input(CASCADE_IRQ, int);
    }

    /// The master's INT output (the CPU's INTR): an unmasked request with a higher priority
    /// than everything in service.
    pub fn intr(&self) -> bool {
        self.master.pending().is_some()
    }

    /// The INTA cycle: the vector of the highest-priority request, moved from IRR to ISR
    /// (unless in auto-EOI mode), through the slave for a cascaded IR2; the controller's
    /// spurious IRQ 7 (vector base + 7) when no request is left.
    pub fn acknowledge(&mut self) -> u8 {
        let vector = match self.master.pending() {
            Some(CASCADE_IRQ) if self.master.cascades() => {
                let vector = match self.slave.pending() {
                    Some(irq) => {
                        self.slave.intack(irq);
                        self.slave.vector(irq)
                    }
                    None => self.slave.vector(7),
                };
                self.master.intack(CASCADE_IRQ);
                vector
            }
            Some(irq) => {
                self.master.intack(irq);
                self.master.vector(irq)
            }
            None => self.master.vector(7),
        };
        self.update_cascade();
        vector
    }

    /// The request, in-service and mask registers and the ELCR, slave in the high byte.
    pub fn irr(&self) -> u16 {
        u16::from_le_bytes([self.master.irr, self.slave.irr])
    }

    pub fn isr(&self) -> u16 {
        u16::from_le_bytes([self.master.isr, self.slave.isr])
    }

    pub fn imr(&self) -> u16 {
        u16::from_le_bytes([self.master.imr, self.slave.imr])
    }

    pub fn elcr(&self) -> u16 {
        u16::from_le_bytes([self.master.elcr, self.slave.elcr])
    }

    /// A guest IN of one byte from `port`.
    pub fn port_read(&mut self, port: u16) -> u8 {
        let v = match port {
            0x20 => self.master.read(false),
            0x21 => self.master.read(true),
            0xA0 => self.slave.read(false),
            0xA1 => self.slave.read(true),
            0x4D0 => self.master.elcr,
            0x4D1 => self.slave.elcr,
            _ => 0xFF,
        };
        self.update_cascade();
        v
    }

    /// A guest OUT of one byte to `port`.
    pub fn port_write(&mut self, port: u16, v: u8) {
        match port {
            0x20 => self.master.write_command(v),
            0x21 => self.master.write_data(v),
            0xA0 => self.slave.write_command(v),
            0xA1 => self.slave.write_data(v),
            0x4D0 => self.master.write_elcr(v),
            0x4D1 => self.slave.write_elcr(v),
            _ => {}
        }
        self.update_cascade();
    }
}

/// `offset` is the absolute port (see the module doc).
impl PioDevice for PicPair {
    fn pio_read(&mut self, offset: u16, data: &mut [u8], _ctx: &mut Ctx) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.port_read(offset.wrapping_add(i as u16));
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8], _ctx: &mut Ctx) {
        for (i, &byte) in data.iter().enumerate() {
            self.port_write(offset.wrapping_add(i as u16), byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's `init_8259A`: mask all, ICW1 0x11, ICW2 base, ICW3 4 / 2, ICW4 (1, or 3 for an
    /// auto-EOI master), then the masks.
    fn linux_init(p: &mut PicPair, master_base: u8, slave_base: u8, auto_eoi: bool) {
        p.port_write(0x21, 0xFF);
        p.port_write(0x20, 0x11);
        p.port_write(0x21, master_base);
        p.port_write(0x21, 0x04);
        p.port_write(0x21, if auto_eoi { 0x03 } else { 0x01 });
        p.port_write(0xA0, 0x11);
        p.port_write(0xA1, slave_base);
        p.port_write(0xA1, 0x02);
        p.port_write(0xA1, 0x01);
        p.port_write(0x21, 0x00);
        p.port_write(0xA1, 0x00);
    }

    fn linux() -> PicPair {
        let mut p = PicPair::new();
        linux_init(&mut p, 0x20, 0x28, false);
        p
    }

    fn read_isr(p: &mut PicPair, cmd: u16) -> u8 {
        p.port_write(cmd, 0x0B);
        p.port_read(cmd)
    }

    fn read_irr(p: &mut PicPair, cmd: u16) -> u8 {
        p.port_write(cmd, 0x0A);
        p.port_read(cmd)
    }

    fn pulse(p: &mut PicPair, irq: u8) {
        p.set_irq(irq, true);
        p.set_irq(irq, false);
    }

    #[test]
    fn power_on_masks_everything() {
        let mut p = PicPair::new();
        assert_eq!(p.imr(), 0xFFFF);
        assert_eq!(p.port_read(0x21), 0xFF);
        assert_eq!(p.port_read(0xA1), 0xFF);
        assert_eq!(p.elcr(), 0);
        for irq in 0..16 {
            p.set_irq(irq, true);
        }
        assert!(!p.intr(), "nothing is delivered before initialisation");
        // Requests latch; IR2 is the slave's INT, which its all-ones IMR keeps low.
        assert_eq!(read_irr(&mut p, 0x20), 0xFB);
        assert_eq!(read_irr(&mut p, 0xA0), 0xFF);
    }

    #[test]
    fn linux_init_and_specific_eoi() {
        for (mb, sb) in [(0x20, 0x28), (0x30, 0x38), (0x08, 0x70)] {
            let mut p = PicPair::new();
            linux_init(&mut p, mb, sb, false);
            assert_eq!(p.imr(), 0);
            assert!(!p.intr());
            pulse(&mut p, 0);
            assert!(p.intr());
            assert_eq!(p.acknowledge(), mb);
            assert!(!p.intr());
            assert_eq!(read_isr(&mut p, 0x20), 0x01);
            assert_eq!(read_irr(&mut p, 0x20), 0x00, "edge request consumed");
            p.port_write(0x20, 0x60); // specific EOI, IRQ 0 (mask_and_ack_8259A)
            assert_eq!(read_isr(&mut p, 0x20), 0);
        }
    }

    #[test]
    fn cascade_through_the_slave() {
        let mut p = linux();
        pulse(&mut p, 10);
        assert!(p.intr());
        assert_eq!(read_irr(&mut p, 0x20), 0x04, "slave INT latched on IR2");
        assert_eq!(p.acknowledge(), 0x2A);
        assert_eq!(p.isr(), 0x0404, "slave IR2 and master IR2 in service");
        // Linux: specific EOI to the slave, then to the master's cascade line.
        p.port_write(0xA0, 0x62);
        p.port_write(0x20, 0x62);
        assert_eq!(p.isr(), 0);
        // Two slave requests: the second follows after the EOIs.
        pulse(&mut p, 9);
        pulse(&mut p, 12);
        assert_eq!(p.acknowledge(), 0x29);
        assert!(!p.intr(), "IRQ 12 waits behind IRQ 9 in service");
        p.port_write(0xA0, 0x20);
        assert!(!p.intr(), "and behind the master's IR2");
        p.port_write(0x20, 0x20);
        assert!(p.intr());
        assert_eq!(p.acknowledge(), 0x2C);
        // IRQ 2 from outside is the cascade: ignored.
        p.port_write(0xA0, 0x20);
        p.port_write(0x20, 0x20);
        pulse(&mut p, 2);
        assert!(!p.intr());
    }

    #[test]
    fn priorities_and_nesting() {
        let mut p = linux();
        pulse(&mut p, 3);
        assert_eq!(p.acknowledge(), 0x23);
        pulse(&mut p, 5);
        assert!(!p.intr(), "lower priority than IRQ 3 in service");
        pulse(&mut p, 1);
        assert!(p.intr(), "higher priority preempts");
        assert_eq!(p.acknowledge(), 0x21);
        assert_eq!(read_isr(&mut p, 0x20), 0x0A);
        // Non-specific EOI clears the highest priority in service: IRQ 1, then 3.
        p.port_write(0x20, 0x20);
        assert_eq!(read_isr(&mut p, 0x20), 0x08);
        assert!(!p.intr());
        p.port_write(0x20, 0x20);
        assert!(p.intr());
        assert_eq!(p.acknowledge(), 0x25);
        // Several requests at once: the lowest IRQ number wins.
        p.port_write(0x20, 0x20);
        for irq in [7, 4, 6] {
            pulse(&mut p, irq);
        }
        assert_eq!(p.acknowledge(), 0x24);
    }

    #[test]
    fn auto_eoi_leaves_nothing_in_service() {
        let mut p = PicPair::new();
        linux_init(&mut p, 0x30, 0x38, true);
        pulse(&mut p, 4);
        assert_eq!(p.acknowledge(), 0x34);
        assert_eq!(read_isr(&mut p, 0x20), 0);
        pulse(&mut p, 6);
        assert!(p.intr(), "nothing blocks the next one");
        assert_eq!(p.acknowledge(), 0x36);
        // The slave still needs its EOI (Linux's slave ICW4 is 1).
        pulse(&mut p, 8);
        assert_eq!(p.acknowledge(), 0x38);
        assert_eq!(p.isr(), 0x0100);
    }

    #[test]
    fn rotation_and_set_priority() {
        let mut p = linux();
        pulse(&mut p, 0);
        assert_eq!(p.acknowledge(), 0x20);
        p.port_write(0x20, 0xA0); // rotate on non-specific EOI: IRQ 0 becomes the lowest
        pulse(&mut p, 0);
        pulse(&mut p, 5);
        assert_eq!(p.acknowledge(), 0x25);
        p.port_write(0x20, 0x65);
        p.port_write(0x20, 0xC3); // set priority: IRQ 3 lowest, so IRQ 4 is the highest
        pulse(&mut p, 3);
        pulse(&mut p, 7);
        assert_eq!(p.acknowledge(), 0x27);
        p.port_write(0x20, 0xE7); // rotate on specific EOI 7: IRQ 0 is the highest again
        assert_eq!(p.acknowledge(), 0x20);
        p.port_write(0x20, 0x60);
        assert_eq!(p.acknowledge(), 0x23);
        // Rotate in auto-EOI mode.
        let mut p = PicPair::new();
        linux_init(&mut p, 0x20, 0x28, true);
        p.port_write(0x20, 0x80);
        pulse(&mut p, 1);
        assert_eq!(p.acknowledge(), 0x21);
        pulse(&mut p, 0);
        pulse(&mut p, 1);
        pulse(&mut p, 3);
        assert_eq!(
            p.acknowledge(),
            0x23,
            "after IRQ 1: IRQ 2 (the cascade) is the highest, then 3"
        );
    }

    #[test]
    fn poll_mode() {
        let mut p = linux();
        p.port_write(0x20, 0x0C);
        assert_eq!(p.port_read(0x20), 0x00, "nothing requested");
        pulse(&mut p, 6);
        p.port_write(0x20, 0x0C);
        assert_eq!(p.port_read(0x21), 0x86, "either port answers the poll");
        assert_eq!(
            read_isr(&mut p, 0x20),
            0x40,
            "the poll read acknowledged it"
        );
        assert_eq!(p.port_read(0x21), 0x00, "the next read is the IMR again");
        p.port_write(0x20, 0x20);
        // Polling the slave.
        pulse(&mut p, 13);
        p.port_write(0xA0, 0x0C);
        assert_eq!(p.port_read(0xA0), 0x85);
        assert_eq!(p.isr() >> 8, 0x20);
    }

    #[test]
    fn spurious_irq7_and_irq15() {
        let mut p = linux();
        // A level request that vanished before the INTA: master IRQ 7, nothing in service.
        p.port_write(0x4D0, 0x20);
        p.set_irq(5, true);
        assert!(p.intr());
        p.set_irq(5, false);
        assert!(!p.intr());
        assert_eq!(p.acknowledge(), 0x27);
        assert_eq!(p.isr(), 0);
        // A masked request is as good as gone.
        pulse(&mut p, 3);
        p.port_write(0x21, 0x08);
        assert_eq!(p.acknowledge(), 0x27);
        assert_eq!(read_irr(&mut p, 0x20), 0x08, "still latched, masked");
        // A slave level request that vanished after raising IR2: slave IRQ 15, with the
        // master's IR2 in service (Linux EOIs the master for it).
        let mut p = linux();
        p.port_write(0x4D1, 0x04);
        p.set_irq(10, true);
        p.set_irq(10, false);
        assert!(p.intr());
        assert_eq!(p.acknowledge(), 0x2F);
        assert_eq!(p.isr(), 0x0004);
    }

    #[test]
    fn edge_and_level_inputs() {
        let mut p = linux();
        p.port_write(0x4D0, 0x08); // IRQ 3 level
        p.set_irq(4, true);
        p.set_irq(3, true);
        assert_eq!(p.acknowledge(), 0x23);
        p.port_write(0x20, 0x20);
        assert!(
            p.intr(),
            "level IRQ 3 still high: requested again, before IRQ 4"
        );
        assert_eq!(p.acknowledge(), 0x23);
        p.set_irq(3, false);
        p.port_write(0x20, 0x20);
        assert_eq!(p.acknowledge(), 0x24);
        p.port_write(0x20, 0x20);
        assert!(!p.intr(), "edge IRQ 4 held high is one request");
        p.set_irq(4, false);
        p.set_irq(4, true);
        assert!(p.intr());
        // A masked edge stays latched and is delivered when unmasked.
        let mut p = linux();
        p.port_write(0x21, 0x40);
        pulse(&mut p, 6);
        assert!(!p.intr());
        p.port_write(0x21, 0x00);
        assert_eq!(p.acknowledge(), 0x26);
    }

    #[test]
    fn elcr_fixed_bits() {
        let mut p = PicPair::new();
        p.port_write(0x4D0, 0xFF);
        p.port_write(0x4D1, 0xFF);
        assert_eq!(p.port_read(0x4D0), 0xF8, "IRQ 0, 1, 2 are edge");
        assert_eq!(p.port_read(0x4D1), 0xDE, "IRQ 8 and 13 are edge");
        assert_eq!(p.elcr(), 0xDEF8);
    }

    #[test]
    fn icw1_restarts_edge_sensing() {
        let mut p = linux();
        p.port_write(0x4D0, 0x20); // IRQ 5 level
        p.set_irq(4, true);
        p.set_irq(5, true);
        linux_init(&mut p, 0x20, 0x28, false);
        assert_eq!(
            read_irr(&mut p, 0x20),
            0x20,
            "the edge request is dropped, the level stays"
        );
        assert_eq!(p.acknowledge(), 0x25);
        p.port_write(0x20, 0x20);
        p.set_irq(5, false);
        p.set_irq(4, true);
        assert!(!p.intr(), "IRQ 4 is still high: no new edge");
        p.set_irq(4, false);
        p.set_irq(4, true);
        assert_eq!(p.acknowledge(), 0x24);
    }

    #[test]
    fn special_mask_mode() {
        let mut p = linux();
        pulse(&mut p, 3);
        assert_eq!(p.acknowledge(), 0x23);
        pulse(&mut p, 5);
        assert!(!p.intr());
        p.port_write(0x21, 0x08); // mask IRQ 3, then special mask mode on
        p.port_write(0x20, 0x68);
        assert!(p.intr(), "lower priority enabled while IRQ 3 is in service");
        assert_eq!(p.acknowledge(), 0x25);
        // A non-specific EOI skips the masked in-service IRQ 3.
        p.port_write(0x20, 0x20);
        assert_eq!(read_isr(&mut p, 0x20), 0x08);
        p.port_write(0x20, 0x48); // special mask mode off
        p.port_write(0x20, 0x20);
        assert_eq!(read_isr(&mut p, 0x20), 0);
    }

    #[test]
    fn special_fully_nested_master() {
        let mut p = PicPair::new();
        p.port_write(0x20, 0x11);
        p.port_write(0x21, 0x20);
        p.port_write(0x21, 0x04);
        p.port_write(0x21, 0x11); // SFNM
        p.port_write(0xA0, 0x11);
        p.port_write(0xA1, 0x28);
        p.port_write(0xA1, 0x02);
        p.port_write(0xA1, 0x01);
        p.port_write(0x21, 0);
        p.port_write(0xA1, 0);
        pulse(&mut p, 12);
        assert_eq!(p.acknowledge(), 0x2C);
        pulse(&mut p, 9);
        assert!(
            p.intr(),
            "a higher slave request passes the master's IR2 in service"
        );
        assert_eq!(p.acknowledge(), 0x29);
    }

    #[test]
    fn single_mode_without_icw3() {
        let mut p = PicPair::new();
        p.port_write(0x20, 0x13); // single, ICW4 needed
        p.port_write(0x21, 0x40);
        p.port_write(0x21, 0x01); // straight to ICW4
        p.port_write(0x21, 0x00); // now the IMR
        assert_eq!(p.imr() & 0xFF, 0);
        pulse(&mut p, 1);
        assert_eq!(p.acknowledge(), 0x41);
        // Without ICW4 needed (ICW1 0x12) the next data write after ICW2 is the IMR.
        p.port_write(0x20, 0x12);
        p.port_write(0x21, 0x50);
        p.port_write(0x21, 0xFE);
        assert_eq!(p.imr() & 0xFF, 0xFE);
    }

    #[test]
    fn wide_and_foreign_port_accesses() {
        let mut p = linux();
        let mut irq = crate::irq::IrqLines::default();
        let mut ctx = Ctx {
            now: 0,
            irq: &mut irq,
        };
        p.pio_write(0x20, &[0x0B, 0x5A], &mut ctx); // OCW3 then IMR
        assert_eq!(p.imr() & 0xFF, 0x5A);
        let mut d = [0u8; 4];
        p.pio_read(0x20, &mut d, &mut ctx);
        assert_eq!(d, [0x00, 0x5A, 0xFF, 0xFF], "0x22, 0x23 are not the PIC's");
        p.pio_read(0x4D0, &mut d[..2], &mut ctx);
        assert_eq!(d[..2], [0, 0]);
        p.pio_write(0xFFFF, &[1, 2], &mut ctx); // wraps to port 0: ignored
    }

    #[test]
    fn junk_does_not_panic() {
        let mut x = 0xDEAD_BEEF_CAFE_F00Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let ports = [0x20u16, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1, 0x22, 0xFFFF];
        let mut p = PicPair::new();
        let mut irq = crate::irq::IrqLines::default();
        for _ in 0..200_000 {
            let mut ctx = Ctx {
                now: 0,
                irq: &mut irq,
            };
            let port = ports[(next() % 8) as usize];
            let width = [1, 2, 4][(next() % 3) as usize];
            let mut data = [0u8; 4];
            data.iter_mut().for_each(|b| *b = next() as u8);
            match next() % 5 {
                0 | 1 => p.pio_write(port, &data[..width], &mut ctx),
                2 => p.pio_read(port, &mut data[..width], &mut ctx),
                3 => p.set_irq(next() as u8 % 20, next() & 1 != 0),
                _ => {
                    let _ = p.intr();
                    let _ = p.acknowledge();
                }
            }
        }
    }
}
