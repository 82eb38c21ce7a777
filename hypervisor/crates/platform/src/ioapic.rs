//! The IOAPIC: an 82093AA-style I/O APIC with 24 input pins (82093AA datasheet, Intel order
//! no. 290566; register behaviour as in the ICH/PCH datasheets' "I/O APIC" chapters).
//!
//! This model owns the redirection table, the pins' levels and the remote IRR handshake that
//! turns line levels into interrupt messages ([`Message`]). It must not touch the local APIC
//! or the CPU: the platform routes each message (matching the destination with
//! [`crate::lapic::Lapic::matches_destination`], accepting it there), and hands back the
//! vectors the local APIC's EOIs report through [`IoApic::eoi`]. Line levels come from the
//! platform ([`crate::irq`]), never from devices directly.
//!
//! # Choices where the datasheet leaves freedom
//!
//! - Version 0x11 with 24 entries (VER = 0x0017_0011), ID 0 after reset (the platform's MADT
//!   must say the same; the guest may change bits 27:24). The arbitration ID reads as the ID.
//! - The EOI register at 0x40 belongs to version 0x20 IOAPICs; it is accepted here too (as
//!   KVM does), so a guest that uses it works, while Linux, seeing version 0x11, clears remote
//!   IRR by switching the entry to edge and back, which is also honoured: switching an entry to
//!   edge clears its remote IRR.
//! - Pin levels are logical (asserted = true), as [`crate::irq::IrqLines`] keeps them; the
//!   polarity bit (13) is stored and not applied.
//! - Delivery is instantaneous: delivery status (bit 12) always reads 0.
//! - Remote IRR is used for level-triggered Fixed and Lowest-priority entries only; SMI, NMI,
//!   INIT and ExtINT entries are delivered as edges whatever their trigger bit (the datasheet
//!   requires edge for them). Reserved delivery modes (0b011, 0b110) deliver nothing.
//! - Deliveries caused by MMIO writes (unmasking a level entry whose line is high, the EOI
//!   register) cannot be returned through [`MmioDevice`]; they wait, one slot per pin, for
//!   [`IoApic::take_message`], which the platform calls after each access.
//! - MMIO: IOREGSEL at 0x00 (bits 7:0), IOWIN at 0x10, EOI at 0x40 (write-only, bits 7:0 the
//!   vector); every other offset reads 0 and ignores writes. Widths follow the crate's `regs`
//!   rule: reads give the bytes of the containing 32-bit register, partial writes merge into
//!   it. Index registers outside ID, VER, ARB and the table read 0 and ignore writes.
//!
//! # Not emulated
//!
//! Bus arbitration, the extended destination ID (bits 55:48, kept reserved), the polarity
//! inversion (above), and the IRQ pin assertion register of some chipsets.

use alloc::vec::Vec;

use crate::bus::{Ctx, MmioDevice};
use crate::regs::{self, Dwords};
use crate::Tsc;

/// Where a PC's IOAPIC sits, and the size of its MMIO window.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Input pins (GSIs 0-23).
pub const PINS: usize = 24;
/// IOAPIC version register: max redirection entry 23, version 0x11.
pub const VERSION: u32 = 0x0017_0011;

// MMIO offsets.
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const EOI: u64 = 0x40;

// Indirect registers (82093AA 3.2).
const REG_ID: u8 = 0x00;
const REG_VER: u8 = 0x01;
const REG_ARB: u8 = 0x02;
const REG_TABLE: u8 = 0x10;
const REG_TABLE_LAST: u8 = REG_TABLE + 2 * PINS as u8 - 1;

// Redirection entry bits (82093AA 3.2.4).
const DEST_LOGICAL: u64 = 1 << 11;
const REMOTE_IRR: u64 = 1 << 14;
const TRIGGER_LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
/// Vector, delivery mode, destination mode, polarity, trigger mode, mask; delivery status
/// (12) and remote IRR (14) are read-only, 55:17 reserved.
const LOW_WRITABLE: u64 = 0x0001_AFFF;
/// Destination, bits 63:56.
const HIGH_WRITABLE: u64 = 0xFF00_0000_0000_0000;
const ENTRY_RESET: u64 = MASKED;

/// How a message is delivered (82093AA 3.2.4, delivery mode bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    ExtInt,
}

/// An interrupt message for the local APICs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub vector: u8,
    pub delivery_mode: DeliveryMode,
    /// Level-triggered: the local APIC sets the vector's TMR bit, and its EOI must come back
    /// through [`IoApic::eoi`].
    pub level_triggered: bool,
    /// Physical destination mode (an APIC ID) rather than logical (an LDR match).
    pub physical: bool,
    pub dest: u8,
}

/// The IOAPIC.
#[derive(Clone, Debug)]
pub struct IoApic {
    ioregsel: u8,
    id: u8,
    redir: [u64; PINS],
    /// Pin levels, bit n = pin n.
    levels: u32,
    /// Deliveries made by MMIO writes, waiting for [`Self::take_message`].
    queued: [Option<Message>; PINS],
    /// Bit n: `queued[n]` holds a message. The platform asks for messages after every access
    /// and interrupt, and almost always there is none: one test answers that.
    queued_pins: u32,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApic {
    /// The IOAPIC after reset: ID 0, IOREGSEL 0, every entry masked (0x0001_0000, the mask bit
    /// being the only one the datasheet defines at reset), every pin low.
    pub fn new() -> Self {
        Self {
            ioregsel: 0,
            id: 0,
            redir: [ENTRY_RESET; PINS],
            levels: 0,
            queued: [None; PINS],
            queued_pins: 0,
        }
    }

    /// The IOAPIC ID (bits 27:24 of the ID register).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Whether an unmasked entry sends NMIs: the only way a device can still raise an NMI once
    /// the CPU waits (a halted CPU sends no IPI to itself).
    pub fn sends_nmi(&self) -> bool {
        self.redir
            .iter()
            .any(|&e| e & MASKED == 0 && (e >> 8) & 7 == 4)
    }

    /// Redirection entry `pin` as the guest reads it.
    pub fn entry(&self, pin: u8) -> Option<u64> {
        self.redir.get(usize::from(pin)).copied()
    }

    /// Sets pin `pin`'s level (asserted = true) and returns the message it sends, if any: an
    /// edge-triggered entry on a rising edge; a level-triggered entry while the pin is high and
    /// its remote IRR is clear (which the delivery then sets, until the EOI). A masked entry
    /// sends nothing: an edge is lost, a level is sent when unmasked if still high. Pins
    /// outside 0-23 are ignored.
    pub fn set_irq(&mut self, pin: u8, level: bool) -> Option<Message> {
        let p = usize::from(pin);
        if p >= PINS {
            return None;
        }
        let bit = 1u32 << p;
        let was = self.levels & bit != 0;
        if level {
            self.levels |= bit;
        } else {
            self.levels &= !bit;
        }
        let e = self.redir[p];
        if e & MASKED != 0 || !level {
            return None;
        }
        if is_level(e) {
            (e & REMOTE_IRR == 0).then(|| self.deliver(p)).flatten()
        } else {
            (!was).then(|| self.deliver(p)).flatten()
        }
    }

    /// The local APIC's EOI for a level-triggered `vector` (or a write to the EOI register):
    /// clears remote IRR of the entries with that vector, and sends again those whose pin is
    /// still high and which are unmasked.
    pub fn eoi(&mut self, vector: u8) -> Vec<Message> {
        let pins = self.clear_remote_irr(vector);
        (0..PINS)
            .filter(|&p| pins & (1 << p) != 0)
            .filter_map(|p| self.resend_level(p))
            .collect()
    }

    /// Clears remote IRR of the entries with `vector`; returns those pins.
    fn clear_remote_irr(&mut self, vector: u8) -> u32 {
        let mut pins = 0;
        for (p, e) in self.redir.iter_mut().enumerate() {
            if *e & REMOTE_IRR != 0 && *e as u8 == vector {
                *e &= !REMOTE_IRR;
                pins |= 1 << p;
            }
        }
        pins
    }

    /// A message sent because of an MMIO write (see the module doc), lowest pin first. The
    /// platform drains these after each access.
    pub fn take_message(&mut self) -> Option<Message> {
        if self.queued_pins == 0 {
            return None;
        }
        // The lowest pin first, as a scan from pin 0 would find it.
        let p = self.queued_pins.trailing_zeros() as usize;
        self.queued_pins &= !(1 << p);
        self.queued[p].take()
    }

    /// Queues `m` for [`Self::take_message`] in pin `p`'s slot.
    fn queue(&mut self, p: usize, m: Message) {
        self.queued[p] = Some(m);
        self.queued_pins |= 1 << p;
    }

    /// Sends a level-triggered entry whose pin is high, unmasked, with remote IRR clear.
    fn resend_level(&mut self, p: usize) -> Option<Message> {
        let e = self.redir[p];
        let high = self.levels & (1 << p) != 0;
        if high && is_level(e) && e & (MASKED | REMOTE_IRR) == 0 {
            self.deliver(p)
        } else {
            None
        }
    }

    /// The message entry `p` sends now; sets remote IRR for level entries.
    fn deliver(&mut self, p: usize) -> Option<Message> {
        let e = self.redir[p];
        let delivery_mode = match (e >> 8) & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            7 => DeliveryMode::ExtInt,
            m => {
                log::debug!("ioapic: pin {p} has reserved delivery mode {m}; nothing sent");
                return None;
            }
        };
        let level_triggered = is_level(e);
        if level_triggered {
            self.redir[p] = e | REMOTE_IRR;
        }
        Some(Message {
            vector: e as u8,
            delivery_mode,
            level_triggered,
            physical: e & DEST_LOGICAL == 0,
            dest: (e >> 56) as u8,
        })
    }

    fn read_register(&self, sel: u8) -> u32 {
        match sel {
            REG_ID | REG_ARB => u32::from(self.id) << 24,
            REG_VER => VERSION,
            REG_TABLE..=REG_TABLE_LAST => {
                let e = self.redir[usize::from((sel - REG_TABLE) / 2)];
                if sel & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, sel: u8, v: u32) {
        match sel {
            REG_ID => self.id = ((v >> 24) & 0xF) as u8,
            REG_TABLE..=REG_TABLE_LAST => {
                let p = usize::from((sel - REG_TABLE) / 2);
                let old = self.redir[p];
                let mut new = if sel & 1 == 0 {
                    (old & !LOW_WRITABLE) | (u64::from(v) & LOW_WRITABLE)
                } else {
                    (old & !HIGH_WRITABLE) | ((u64::from(v) << 32) & HIGH_WRITABLE)
                };
                if new & TRIGGER_LEVEL == 0 {
                    // Remote IRR is undefined for edge entries; clearing it is what lets
                    // Linux's edge-and-back EOI for version 0x11 IOAPICs work.
                    new &= !REMOTE_IRR;
                }
                self.redir[p] = new;
                // A level entry unmasked (or rewritten) while its pin is high sends now.
                if let Some(m) = self.resend_level(p) {
                    self.queue(p, m);
                }
            }
            // VER and ARB are read-only; other indices do not exist.
            _ => {}
        }
    }
}

/// Whether entry `e` uses the remote IRR handshake: level-triggered, and in a mode that has
/// one (fixed or lowest priority).
fn is_level(e: u64) -> bool {
    e & TRIGGER_LEVEL != 0 && (e >> 8) & 7 <= 1
}

impl Dwords for IoApic {
    fn read_dword(&mut self, slot: u64, now: Tsc) -> u32 {
        self.peek_dword(slot, now)
    }

    fn peek_dword(&self, slot: u64, _now: Tsc) -> u32 {
        match slot {
            IOREGSEL => u32::from(self.ioregsel),
            IOWIN => self.read_register(self.ioregsel),
            _ => 0,
        }
    }

    fn write_dword(&mut self, slot: u64, value: u32, _now: Tsc) {
        match slot {
            IOREGSEL => self.ioregsel = value as u8,
            IOWIN => self.write_register(self.ioregsel, value),
            EOI => {
                let pins = self.clear_remote_irr(value as u8);
                for p in (0..PINS).filter(|&p| pins & (1 << p) != 0) {
                    if let Some(m) = self.resend_level(p) {
                        self.queue(p, m);
                    }
                }
            }
            _ => {}
        }
    }
}

impl MmioDevice for IoApic {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8], ctx: &mut Ctx) {
        regs::read(self, offset, data, ctx.now);
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8], ctx: &mut Ctx) {
        regs::write(self, offset, data, ctx.now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqLines;

    fn mmio_write(io: &mut IoApic, offset: u64, value: u32) {
        let mut irq = IrqLines::default();
        io.mmio_write(
            offset,
            &value.to_le_bytes(),
            &mut Ctx {
                now: 0,
                irq: &mut irq,
            },
        );
    }

    fn mmio_read(io: &mut IoApic, offset: u64) -> u32 {
        let mut irq = IrqLines::default();
        let mut data = [0u8; 4];
        io.mmio_read(
            offset,
            &mut data,
            &mut Ctx {
                now: 0,
                irq: &mut irq,
            },
        );
        u32::from_le_bytes(data)
    }

    fn read_reg(io: &mut IoApic, index: u8) -> u32 {
        mmio_write(io, 0x00, u32::from(index));
        mmio_read(io, 0x10)
    }

    fn write_reg(io: &mut IoApic, index: u8, value: u32) {
        mmio_write(io, 0x00, u32::from(index));
        mmio_write(io, 0x10, value);
    }

    /// Programs pin `pin` as Linux does: high half, then low half.
    fn program(io: &mut IoApic, pin: u8, entry: u64) {
        write_reg(io, 0x11 + 2 * pin, (entry >> 32) as u32);
        write_reg(io, 0x10 + 2 * pin, entry as u32);
    }

    fn fixed(vector: u8) -> Message {
        Message {
            vector,
            delivery_mode: DeliveryMode::Fixed,
            level_triggered: false,
            physical: true,
            dest: 0,
        }
    }

    #[test]
    fn reset_state() {
        let mut io = IoApic::new();
        assert_eq!(read_reg(&mut io, 0x00), 0, "ID");
        assert_eq!(read_reg(&mut io, 0x01), 0x0017_0011, "VER");
        assert_eq!(read_reg(&mut io, 0x02), 0, "ARB");
        for pin in 0..24u8 {
            assert_eq!(
                read_reg(&mut io, 0x10 + 2 * pin),
                0x0001_0000,
                "pin {pin} masked"
            );
            assert_eq!(read_reg(&mut io, 0x11 + 2 * pin), 0);
        }
        assert_eq!(read_reg(&mut io, 0x40), 0, "past the table");
        assert_eq!(mmio_read(&mut io, 0x00), 0x40, "IOREGSEL reads back");
        for pin in 0..24 {
            assert_eq!(io.set_irq(pin, true), None, "masked pins send nothing");
        }
    }

    #[test]
    fn register_masks() {
        // (index, written, read back)
        let cases: &[(u8, u32, u32)] = &[
            (0x00, 0xFFFF_FFFF, 0x0F00_0000), // ID: bits 27:24
            (0x01, 0xFFFF_FFFF, 0x0017_0011), // VER: read-only
            (0x02, 0xFFFF_FFFF, 0x0F00_0000), // ARB follows the ID
            (0x10, 0xFFFF_FFFF, 0x0001_AFFF), // delivery status and remote IRR read-only
            (0x11, 0xFFFF_FFFF, 0xFF00_0000), // destination only
            (0x3E, 0x0000_0000, 0x0000_0000), // pin 23
            (0x3F, 0x1234_5678, 0x1200_0000),
            (0x40, 0xFFFF_FFFF, 0), // no such register
            (0xFF, 0xFFFF_FFFF, 0),
        ];
        let mut io = IoApic::new();
        for &(index, value, expect) in cases {
            write_reg(&mut io, index, value);
            assert_eq!(read_reg(&mut io, index), expect, "index {index:#x}");
        }
        assert_eq!(io.id(), 0xF);
        assert_eq!(mmio_read(&mut io, 0x20), 0, "undefined offset");
        mmio_write(&mut io, 0x00, 0xFFFF_FF12);
        assert_eq!(mmio_read(&mut io, 0x00), 0x12, "IOREGSEL is 8 bits");
    }

    #[test]
    fn edge_entries_send_on_rising_edges() {
        let mut io = IoApic::new();
        program(&mut io, 4, 0x34);
        assert_eq!(io.set_irq(4, true), Some(fixed(0x34)));
        assert_eq!(io.set_irq(4, true), None, "no edge while high");
        assert_eq!(io.set_irq(4, false), None);
        assert_eq!(io.set_irq(4, true), Some(fixed(0x34)));
        assert_eq!(
            io.entry(4).unwrap() & REMOTE_IRR,
            0,
            "no remote IRR for edges"
        );
        io.set_irq(4, false);
        // Masked: the edge is lost, also when unmasked while the line is still high.
        program(&mut io, 4, 0x1_0034);
        assert_eq!(io.set_irq(4, true), None);
        program(&mut io, 4, 0x34);
        assert_eq!(io.take_message(), None);
        assert_eq!(io.set_irq(4, true), None);
    }

    #[test]
    fn level_entries_use_remote_irr() {
        let mut io = IoApic::new();
        program(&mut io, 10, 0x0000_A03A); // level, active low (stored only), vector 0x3A
        let m = Message {
            level_triggered: true,
            ..fixed(0x3A)
        };
        assert_eq!(io.set_irq(10, true), Some(m));
        assert_ne!(
            read_reg(&mut io, 0x10 + 20) & (1 << 14),
            0,
            "remote IRR reads 1"
        );
        assert_eq!(io.set_irq(10, true), None, "remote IRR holds it");
        assert_eq!(io.eoi(0x3B), [], "another vector's EOI");
        // EOI while the line is still high: sent again.
        assert_eq!(io.eoi(0x3A), [m]);
        io.set_irq(10, false);
        assert_eq!(io.eoi(0x3A), []);
        assert_eq!(io.entry(10).unwrap() & REMOTE_IRR, 0);
        assert_eq!(io.set_irq(10, true), Some(m));
        // The EOI register does the same; its message waits for take_message.
        mmio_write(&mut io, 0x40, 0x3A);
        assert_eq!(io.take_message(), Some(m));
        assert_eq!(io.take_message(), None);
        // Writing remote IRR has no effect.
        write_reg(&mut io, 0x10 + 20, 0x0000_A03A);
        assert_ne!(io.entry(10).unwrap() & REMOTE_IRR, 0);
    }

    #[test]
    fn masked_level_is_sent_when_unmasked_while_high() {
        let mut io = IoApic::new();
        program(&mut io, 11, 0x0001_8041); // level, masked
        assert_eq!(io.set_irq(11, true), None);
        program(&mut io, 11, 0x0000_8041);
        let m = Message {
            level_triggered: true,
            ..fixed(0x41)
        };
        assert_eq!(io.take_message(), Some(m));
        assert_eq!(io.set_irq(11, true), None, "remote IRR is set");
        // Masked while remote IRR is set: the EOI sends nothing until unmasked.
        program(&mut io, 11, 0x0001_8041);
        assert_eq!(io.eoi(0x41), []);
        program(&mut io, 11, 0x0000_8041);
        assert_eq!(io.take_message(), Some(m));
    }

    #[test]
    fn switching_to_edge_clears_remote_irr() {
        // Linux's EOI for IOAPICs without an EOI register: mask, edge, level, unmask.
        let mut io = IoApic::new();
        program(&mut io, 9, 0x0000_8039);
        assert!(io.set_irq(9, true).is_some());
        program(&mut io, 9, 0x0001_0039);
        assert_eq!(io.entry(9).unwrap() & REMOTE_IRR, 0);
        program(&mut io, 9, 0x0001_8039);
        program(&mut io, 9, 0x0000_8039);
        assert!(io.take_message().is_some(), "still high: sent again");
    }

    #[test]
    fn messages_carry_the_entry() {
        // (entry, message or None)
        let cases: &[(u64, Option<Message>)] = &[
            (0x0000_0030, Some(fixed(0x30))),
            (
                0x0300_0000_0000_0931,
                Some(Message {
                    vector: 0x31,
                    delivery_mode: DeliveryMode::LowestPriority,
                    level_triggered: false,
                    physical: false,
                    dest: 3,
                }),
            ),
            (
                0xFF00_0000_0000_8400,
                Some(Message {
                    vector: 0,
                    delivery_mode: DeliveryMode::Nmi,
                    level_triggered: false, // NMI is always an edge
                    physical: true,
                    dest: 0xFF,
                }),
            ),
            (
                0x0000_0700,
                Some(Message {
                    delivery_mode: DeliveryMode::ExtInt,
                    ..fixed(0)
                }),
            ),
            (
                0x0000_0200,
                Some(Message {
                    delivery_mode: DeliveryMode::Smi,
                    ..fixed(0)
                }),
            ),
            (
                0x0000_0500,
                Some(Message {
                    delivery_mode: DeliveryMode::Init,
                    ..fixed(0)
                }),
            ),
            (0x0000_0330, None), // reserved delivery modes
            (0x0000_0630, None),
        ];
        for &(entry, expect) in cases {
            let mut io = IoApic::new();
            program(&mut io, 5, entry);
            assert_eq!(io.set_irq(5, true), expect, "entry {entry:#x}");
            assert_eq!(io.entry(5).unwrap() & REMOTE_IRR, 0, "entry {entry:#x}");
        }
        assert_eq!(IoApic::new().set_irq(24, true), None, "no pin 24");
    }

    #[test]
    fn narrow_accesses() {
        let mut io = IoApic::new();
        let mut irq = IrqLines::default();
        let mut ctx = Ctx {
            now: 0,
            irq: &mut irq,
        };
        io.mmio_write(0x00, &[0x01], &mut ctx);
        let mut b = [0u8; 2];
        io.mmio_read(0x12, &mut b, &mut ctx);
        assert_eq!(b, [0x17, 0x00], "VER bits 31:16");
        io.mmio_write(0x00, &[0x11], &mut ctx);
        io.mmio_write(0x13, &[0x05], &mut ctx); // destination byte only
        assert_eq!(io.entry(0), Some(0x0500_0000_0001_0000));
        let mut q = [0u8; 8];
        io.mmio_read(0x10, &mut q, &mut ctx);
        assert_eq!(q, [0, 0, 0, 5, 0, 0, 0, 0]);
    }

    #[test]
    fn junk_does_not_panic() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut io = IoApic::new();
        let mut irq = IrqLines::default();
        for i in 0..200_000u32 {
            let mut ctx = Ctx {
                now: next(),
                irq: &mut irq,
            };
            let offset = if i % 2 == 0 { next() % 0x1010 } else { next() };
            let width = [1, 2, 4, 8][(next() % 4) as usize];
            let mut data = [0u8; 8];
            data.iter_mut().for_each(|b| *b = next() as u8);
            match next() % 6 {
                0 | 1 => io.mmio_write(offset, &data[..width], &mut ctx),
                2 => io.mmio_read(offset, &mut data[..width], &mut ctx),
                3 => {
                    let _ = io.set_irq(next() as u8 % 30, next() & 1 != 0);
                }
                4 => {
                    let _ = io.eoi(next() as u8);
                }
                _ => {
                    let _ = io.take_message();
                }
            }
        }
    }
}
