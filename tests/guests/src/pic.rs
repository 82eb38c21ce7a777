//! The two cascaded 8259A PICs of a PC (Intel 8259A datasheet; the ELCR of the PIIX/ICH).
//!
//! Owns: initialisation as Linux's `init_8259A` does it ([`init_sequence`], [`init`]), the
//! interrupt masks ([`set_masked`]), EOIs ([`eoi`]) and the edge/level control register
//! ([`set_all_edge`]). The PICs reach the CPU through the local APIC's LINT0 in ExtINT mode,
//! which bypasses the APIC's IRR and ISR (SDM Vol. 3A 10.8.4 / 11.8.4): a PIC interrupt needs a
//! PIC EOI and no local APIC EOI.

use core::sync::atomic::{AtomicU16, Ordering};

use crate::cpu;

/// Command and data ports of the master and the slave.
pub const MASTER_CMD: u16 = 0x20;
pub const MASTER_DATA: u16 = 0x21;
pub const SLAVE_CMD: u16 = 0xA0;
pub const SLAVE_DATA: u16 = 0xA1;
/// Edge/level control registers (one bit per IRQ, 1 = level).
pub const ELCR_MASTER: u16 = 0x4D0;
pub const ELCR_SLAVE: u16 = 0x4D1;
/// The master's input the slave is cascaded to.
pub const CASCADE_IRQ: u8 = 2;

/// The 16 IRQ mask bits as last written (the 8259A's IMR, master in the low byte).
static MASK: AtomicU16 = AtomicU16::new(0xFFFF);

/// The port writes of Linux's `init_8259A(auto_eoi = 0)`: mask both, then ICW1 (0x11: edge,
/// cascade, ICW4 needed), ICW2 (vector base, a multiple of 8), ICW3 (master: slave on IR2,
/// 0x04; slave: cascade identity 2), ICW4 (0x01: 8086 mode, normal EOI) to each.
pub const fn init_sequence(master_base: u8, slave_base: u8) -> [(u16, u8); 10] {
    [
        (MASTER_DATA, 0xFF),
        (SLAVE_DATA, 0xFF),
        (MASTER_CMD, 0x11),
        (MASTER_DATA, master_base),
        (MASTER_DATA, 1 << CASCADE_IRQ),
        (MASTER_DATA, 0x01),
        (SLAVE_CMD, 0x11),
        (SLAVE_DATA, slave_base),
        (SLAVE_DATA, CASCADE_IRQ),
        (SLAVE_DATA, 0x01),
    ]
}

/// The specific EOI command (OCW2 0x60 | level, datasheet "Operation Command Words") for each
/// PIC that `irq` went through: the slave's first, then the master's for the cascade input.
pub const fn eoi_commands(irq: u8) -> [(u16, u8); 2] {
    if irq >= 8 {
        [
            (SLAVE_CMD, 0x60 | (irq & 7)),
            (MASTER_CMD, 0x60 | CASCADE_IRQ),
        ]
    } else {
        // The second write repeats the first: a specific EOI for a level not in service is
        // ignored by the 8259A. (Keeps the array's size fixed.)
        [(MASTER_CMD, 0x60 | irq), (MASTER_CMD, 0x60 | irq)]
    }
}

fn out(port: u16, value: u8) {
    // SAFETY: the PIC and ELCR ports of the VM's platform; they only affect interrupt delivery.
    unsafe { cpu::outb(port, value) }
}

/// Initialises both PICs with vector bases `master_base` and `slave_base` and leaves every IRQ
/// masked but the cascade.
pub fn init(master_base: u8, slave_base: u8) {
    for (port, value) in init_sequence(master_base, slave_base) {
        out(port, value);
    }
    MASK.store(0xFFFF, Ordering::SeqCst);
    set_masked(CASCADE_IRQ, false);
}

/// Masks or unmasks `irq` (0..16) with OCW1.
pub fn set_masked(irq: u8, masked: bool) {
    let bit = 1u16 << irq;
    let mask = MASK.load(Ordering::SeqCst);
    let mask = if masked { mask | bit } else { mask & !bit };
    MASK.store(mask, Ordering::SeqCst);
    if irq >= 8 {
        out(SLAVE_DATA, (mask >> 8) as u8);
    } else {
        out(MASTER_DATA, mask as u8);
    }
}

/// Masks every IRQ.
pub fn mask_all() {
    MASK.store(0xFFFF, Ordering::SeqCst);
    out(MASTER_DATA, 0xFF);
    out(SLAVE_DATA, 0xFF);
}

/// Ends the interrupt of `irq` (specific EOI, as Linux's `mask_and_ack_8259A`).
pub fn eoi(irq: u8) {
    for (port, value) in eoi_commands(irq) {
        out(port, value);
    }
}

/// Makes every IRQ edge-triggered in the ELCR (the ISA default).
pub fn set_all_edge() {
    out(ELCR_MASTER, 0);
    out(ELCR_SLAVE, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_like_linux() {
        let seq = init_sequence(0x30, 0x38);
        assert_eq!(seq[2], (0x20, 0x11));
        assert_eq!(seq[3], (0x21, 0x30));
        assert_eq!(seq[4], (0x21, 0x04));
        assert_eq!(seq[7], (0xA1, 0x38));
        assert_eq!(seq[8], (0xA1, 0x02));
        assert_eq!(seq[9], (0xA1, 0x01));
    }

    #[test]
    fn eois() {
        assert_eq!(eoi_commands(0)[0], (0x20, 0x60));
        assert_eq!(eoi_commands(8), [(0xA0, 0x60), (0x20, 0x62)]);
        assert_eq!(eoi_commands(12)[0], (0xA0, 0x64));
    }
}
