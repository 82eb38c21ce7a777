//! Port-I/O and MMIO buses: which device answers which address.
//!
//! As in rust-vmm's `vm-device` and Firecracker's `Bus`, a bus maps address ranges to devices
//! and knows nothing of what they do; the devices implement [`PioDevice`] or [`MmioDevice`] and
//! know nothing of the bus, of other devices or of interrupt delivery (they raise lines in the
//! [`Ctx`] they are given). A bus holds device identifiers of the platform's choice (`D`), not
//! the devices, so the platform keeps typed access to each model.

use alloc::vec::Vec;

use crate::{irq::IrqLines, Tsc};

/// What a device access may use besides its own state: the VM's time and its interrupt lines.
pub struct Ctx<'a> {
    pub now: Tsc,
    pub irq: &'a mut IrqLines,
}

/// A device on the port-I/O bus. `offset` is from the start of the device's range; `data` is
/// 1, 2 or 4 bytes, little-endian, as the guest's IN/OUT moved them.
pub trait PioDevice {
    fn pio_read(&mut self, offset: u16, data: &mut [u8], ctx: &mut Ctx);
    fn pio_write(&mut self, offset: u16, data: &[u8], ctx: &mut Ctx);
}

/// A device on the MMIO bus. `offset` is from the start of the device's range; `data` is 1, 2,
/// 4 or 8 bytes, little-endian, as the guest's instruction accessed them.
pub trait MmioDevice {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8], ctx: &mut Ctx);
    fn mmio_write(&mut self, offset: u64, data: &[u8], ctx: &mut Ctx);
}

/// Why a range could not be added to a bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    BadRange,
    /// The range overlaps one already on the bus.
    Overlap,
}

/// Address ranges (half-open, of type `u64`: ports are widened) mapped to device identifiers.
#[derive(Clone, Debug)]
pub struct Bus<D: Copy> {
    /// Sorted by start, never overlapping.
    ranges: Vec<(u64, u64, D)>,
}

impl<D: Copy> Default for Bus<D> {
    fn default() -> Self {
        Self { ranges: Vec::new() }
    }
}

impl<D: Copy> Bus<D> {
    /// Maps `[base, base + len)` to `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: D) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange)?;
        let at = self.ranges.partition_point(|&(s, _, _)| s < base);
        let clashes_before = at > 0 && self.ranges[at - 1].1 > base;
        let clashes_after = at < self.ranges.len() && self.ranges[at].0 < end;
        if clashes_before || clashes_after {
            return Err(BusError::Overlap);
        }
        self.ranges.insert(at, (base, end, device));
        Ok(())
    }

    /// The device whose range holds `addr`, and `addr`'s offset in that range.
    pub fn find(&self, addr: u64) -> Option<(D, u64)> {
        let at = self.ranges.partition_point(|&(s, _, _)| s <= addr);
        let &(start, end, device) = self.ranges.get(at.checked_sub(1)?)?;
        (addr < end).then_some((device, addr - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_found_and_never_overlap() {
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, 'u').unwrap();
        bus.insert(0x20, 2, 'p').unwrap();
        bus.insert(0x40, 4, 't').unwrap();
        assert_eq!(bus.insert(0x3ff, 1, 'x'), Err(BusError::Overlap));
        assert_eq!(bus.insert(0x3f0, 9, 'x'), Err(BusError::Overlap));
        assert_eq!(bus.insert(0x10, 0, 'x'), Err(BusError::BadRange));
        assert_eq!(bus.insert(u64::MAX, 2, 'x'), Err(BusError::BadRange));
        bus.insert(0x3f0, 8, 'f').unwrap(); // adjacent is fine
        assert_eq!(bus.find(0x3f8), Some(('u', 0)));
        assert_eq!(bus.find(0x3ff), Some(('u', 7)));
        assert_eq!(bus.find(0x3f7), Some(('f', 7)));
        assert_eq!(bus.find(0x21), Some(('p', 1)));
        assert_eq!(bus.find(0x22), None);
        assert_eq!(bus.find(0), None);
        assert_eq!(bus.find(0x400), None);
    }
}
