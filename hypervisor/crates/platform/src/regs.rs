//! Byte-granular guest access to a bank of 32-bit registers spaced 16 bytes apart: the layout
//! of the local APIC's page (Intel SDM Vol. 3A 11.4.1, "All 32-bit registers should be accessed
//! using 128-bit aligned 32-bit loads or stores") and of the IOAPIC's index/data window
//! (82093AA datasheet 3.0, IOREGSEL at 0x00, IOWIN at 0x10).
//!
//! Hardware only defines aligned 32-bit accesses; a guest may still issue any width at any
//! offset, so the models share one rule for the rest, built here:
//!
//! - a register occupies bytes 0-3 of its 16-byte slot; bytes 4-15 read 0 and ignore writes;
//! - a read of any width returns the bytes of the containing register(s), the register being
//!   read once per slot touched (so a read's side effects happen once);
//! - a write of any width that covers only part of a register merges the written bytes into
//!   the register's present value (read without side effects) and then writes the register as
//!   a whole, side effects included; a write touching two slots writes each in turn.
//!
//! Nothing here indexes by a guest-controlled value, and addresses wrap instead of
//! overflowing, so no access panics.

use crate::Tsc;

/// A bank of 32-bit registers at 16-byte strides. `slot` is the offset of the register's
/// 16-byte slot (`offset & !0xF`), as the guest addressed it.
pub(crate) trait Dwords {
    /// The register at `slot`, as a guest read sees it (with the read's side effects).
    fn read_dword(&mut self, slot: u64, now: Tsc) -> u32;
    /// The register at `slot` without side effects: the value a partial write merges into.
    fn peek_dword(&self, slot: u64, now: Tsc) -> u32;
    /// A guest write of the whole register at `slot`.
    fn write_dword(&mut self, slot: u64, value: u32, now: Tsc);
}

/// A guest read of `data.len()` bytes at `offset`.
pub(crate) fn read(dev: &mut impl Dwords, offset: u64, data: &mut [u8], now: Tsc) {
    let mut cached: Option<(u64, u32)> = None;
    for (i, byte) in data.iter_mut().enumerate() {
        let addr = offset.wrapping_add(i as u64);
        let (slot, lane) = (addr & !0xF, addr & 0xF);
        if lane >= 4 {
            *byte = 0;
            continue;
        }
        let value = match cached {
            Some((s, v)) if s == slot => v,
            _ => {
                let v = dev.read_dword(slot, now);
                cached = Some((slot, v));
                v
            }
        };
        *byte = (value >> (8 * lane)) as u8;
    }
}

/// A guest write of `data` at `offset`.
pub(crate) fn write(dev: &mut impl Dwords, offset: u64, data: &[u8], now: Tsc) {
    let mut i = 0;
    while i < data.len() {
        let slot = offset.wrapping_add(i as u64) & !0xF;
        let (mut value, mut mask) = (0u32, 0u32);
        // The bytes of this access that fall in this slot (at least one: the first).
        while let Some(&byte) = data.get(i) {
            let addr = offset.wrapping_add(i as u64);
            if addr & !0xF != slot {
                break;
            }
            let lane = addr & 0xF;
            if lane < 4 {
                value |= u32::from(byte) << (8 * lane);
                mask |= 0xFF << (8 * lane);
            }
            i += 1;
        }
        if mask == 0 {
            continue;
        }
        let merged = if mask == u32::MAX {
            value
        } else {
            (dev.peek_dword(slot, now) & !mask) | value
        };
        dev.write_dword(slot, merged, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// Registers whose value is their slot number times 0x0101_0101, and a log of writes.
    #[derive(Default)]
    struct Log {
        reads: Vec<u64>,
        writes: Vec<(u64, u32)>,
    }

    impl Dwords for Log {
        fn read_dword(&mut self, slot: u64, _: Tsc) -> u32 {
            self.reads.push(slot);
            self.peek_dword(slot, 0)
        }
        fn peek_dword(&self, slot: u64, _: Tsc) -> u32 {
            ((slot >> 4) as u32 & 0xFF) * 0x0101_0101
        }
        fn write_dword(&mut self, slot: u64, value: u32, _: Tsc) {
            self.writes.push((slot, value));
        }
    }

    #[test]
    fn widths_and_offsets_map_onto_the_containing_register() {
        let mut d = Log::default();
        let mut buf = [0xEEu8; 8];
        read(&mut d, 0x20, &mut buf[..4], 0);
        assert_eq!(buf[..4], [2, 2, 2, 2]);
        read(&mut d, 0x32, &mut buf[..2], 0);
        assert_eq!(buf[..2], [3, 3]);
        read(&mut d, 0x20, &mut buf, 0); // 8 bytes: the upper half is the slot's reserved bytes
        assert_eq!(buf, [2, 2, 2, 2, 0, 0, 0, 0]);
        read(&mut d, 0x1E, &mut buf[..4], 0); // straddles two slots
        assert_eq!(buf[..4], [0, 0, 2, 2]);
        assert_eq!(d.reads, [0x20, 0x30, 0x20, 0x20]);

        write(&mut d, 0x40, &[1, 2, 3, 4], 0);
        write(&mut d, 0x51, &[0xAA], 0); // merged into 0x05050505
        write(&mut d, 0x64, &[9, 9, 9, 9], 0); // reserved bytes only: nothing
        write(&mut d, 0x7E, &[0xBB, 0xCC, 0xDD, 0xEE], 0); // bytes 0-1 of slot 0x80
        write(&mut d, u64::MAX, &[1, 2], 0); // wraps to slot 0
        assert_eq!(
            d.writes,
            [
                (0x40, 0x0403_0201),
                (0x50, 0x0505_AA05),
                (0x80, 0x0808_EEDD),
                (0, 0x0000_0002)
            ]
        );
    }
}
