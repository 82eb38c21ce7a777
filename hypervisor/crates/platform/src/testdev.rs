//! The test device: what QEMU's `pc-testdev` offers a guest, for test suites written against
//! it (kvm-unit-tests). It is opt-in per VM (manifest `test_device`); an ordinary PC has none of
//! it, so a VM without it finds these ports floating and this MMIO range unclaimed.
//!
//! What it has (the layout of QEMU's `hw/misc/pc-testdev.c`):
//! - ports 0xE0-0xE3: a 32-bit scratch register, each byte lane at its own port;
//! - ports 0xE4-0xE7: "flush page": a write names a guest page whose host mapping QEMU
//!   re-protects, to make KVM fault on it again. Here guest pages have no host mapping that a
//!   guest could ask to drop, so writes do nothing; reads return 0;
//! - ports 0xE8-0xEB: the scratch register again, byte-wide;
//! - ports 0x2000-0x2017 ([`IRQ_PORT_BASE`]): one port per interrupt line (GSI 0-23). A byte
//!   written sets the line's level (nonzero: high), so a guest can raise the IOAPIC's and the
//!   8259s' inputs at will. As in QEMU, only byte accesses act: a wider write is dropped, and
//!   reads return 0;
//! - 64 KiB at guest-physical 0xFF000000 ([`RAM_BASE`]): memory that is not RAM, so every access
//!   to it exits and goes through the hypervisor's instruction emulator ("ioram").
//!
//! It owns nothing but its own state: the platform maps its ranges on the buses and turns the
//! line levels it sets into interrupts.

use alloc::boxed::Box;
use alloc::vec;

use crate::bus::{Ctx, MmioDevice, PioDevice};
use crate::irq::LINES;

/// The scratch register, flush and byte-wide ports: 0xE0-0xEB.
pub const PORT_BASE: u16 = 0xe0;
pub const PORTS: u16 = 12;
/// The interrupt-line ports: 0x2000 + line.
pub const IRQ_PORT_BASE: u16 = 0x2000;
pub const IRQ_PORTS: u16 = LINES as u16;
/// The MMIO RAM ("ioram" in kvm-unit-tests).
pub const RAM_BASE: u64 = 0xff00_0000;
pub const RAM_SIZE: u64 = 0x1_0000;

/// Offsets in the 0xE0 range.
const FLUSH: u16 = 4;
const SCRATCH_BYTES: u16 = 8;

pub struct TestDevice {
    scratch: u32,
    /// [`RAM_SIZE`] bytes, zero at start as QEMU's.
    ram: Box<[u8]>,
}

impl Default for TestDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl TestDevice {
    pub fn new() -> Self {
        Self {
            scratch: 0,
            ram: vec![0; RAM_SIZE as usize].into_boxed_slice(),
        }
    }

    /// The byte of the scratch register that port offset `offset` (0-3 or 8-11) reaches.
    fn lane(offset: u16) -> u32 {
        u32::from(offset & 3) * 8
    }

    /// A write of `size` bytes to interrupt-line port `line` (0-23) with `value`: sets the
    /// line's level when it is a byte access.
    pub fn irq_write(line: u16, size: u8, value: u32, ctx: &mut Ctx) {
        if size == 1 && line < IRQ_PORTS {
            ctx.irq.set_level(line as u8, value & 0xff != 0);
        }
    }
}

/// Ports 0xE0-0xEB, one byte lane per call (the platform splits wide accesses).
impl PioDevice for TestDevice {
    fn pio_read(&mut self, offset: u16, data: &mut [u8], _ctx: &mut Ctx) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i as u16;
            *byte = match at {
                FLUSH..SCRATCH_BYTES => 0,
                _ => (self.scratch >> Self::lane(at)) as u8,
            };
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8], _ctx: &mut Ctx) {
        for (i, &byte) in data.iter().enumerate() {
            let at = offset + i as u16;
            if (FLUSH..SCRATCH_BYTES).contains(&at) {
                continue;
            }
            let shift = Self::lane(at);
            self.scratch = (self.scratch & !(0xff << shift)) | (u32::from(byte) << shift);
        }
    }
}

/// The MMIO RAM: reads and writes of any width at any offset inside it; bytes past its end
/// (an access that straddles it) float high and are dropped.
impl MmioDevice for TestDevice {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8], _ctx: &mut Ctx) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset + i as u64)
                .ok()
                .and_then(|at| self.ram.get(at).copied())
                .unwrap_or(crate::platform::FLOATING);
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8], _ctx: &mut Ctx) {
        for (i, &byte) in data.iter().enumerate() {
            if let Some(slot) = usize::try_from(offset + i as u64)
                .ok()
                .and_then(|at| self.ram.get_mut(at))
            {
                *slot = byte;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqLines;

    fn ctx(lines: &mut IrqLines) -> Ctx<'_> {
        Ctx { now: 0, irq: lines }
    }

    #[test]
    fn the_scratch_register_keeps_each_byte_lane() {
        let mut lines = IrqLines::default();
        let mut d = TestDevice::new();
        d.pio_write(0, &[0x11, 0x22, 0x33, 0x44], &mut ctx(&mut lines));
        d.pio_write(2, &[0xaa], &mut ctx(&mut lines));
        let mut b = [0; 4];
        d.pio_read(0, &mut b, &mut ctx(&mut lines));
        assert_eq!(b, [0x11, 0x22, 0xaa, 0x44]);
        // The byte-wide window shows the same register.
        d.pio_read(SCRATCH_BYTES, &mut b, &mut ctx(&mut lines));
        assert_eq!(b, [0x11, 0x22, 0xaa, 0x44]);
        d.pio_write(SCRATCH_BYTES + 3, &[0x55], &mut ctx(&mut lines));
        d.pio_read(3, &mut b[..1], &mut ctx(&mut lines));
        assert_eq!(b[0], 0x55);
        // The flush port reads 0 and its writes change nothing.
        d.pio_write(FLUSH, &[0xff, 0xff, 0xff, 0xff], &mut ctx(&mut lines));
        d.pio_read(FLUSH, &mut b, &mut ctx(&mut lines));
        assert_eq!(b, [0; 4]);
        d.pio_read(0, &mut b, &mut ctx(&mut lines));
        assert_eq!(b, [0x11, 0x22, 0xaa, 0x55]);
    }

    #[test]
    fn byte_writes_set_interrupt_lines_and_wider_ones_do_nothing() {
        let mut lines = IrqLines::default();
        TestDevice::irq_write(14, 1, 1, &mut ctx(&mut lines));
        assert!(lines.level(14));
        TestDevice::irq_write(14, 4, 0, &mut ctx(&mut lines));
        assert!(lines.level(14), "a 4-byte write is dropped");
        TestDevice::irq_write(14, 1, 0x100, &mut ctx(&mut lines));
        assert!(!lines.level(14), "only the low byte counts");
        TestDevice::irq_write(24, 1, 1, &mut ctx(&mut lines));
        assert_eq!(lines.take_changes().level, 0);
    }

    #[test]
    fn the_mmio_ram_keeps_what_is_written_and_floats_past_its_end() {
        let mut lines = IrqLines::default();
        let mut d = TestDevice::new();
        d.mmio_write(
            0x10,
            &0x0123_4567_89ab_cdefu64.to_le_bytes(),
            &mut ctx(&mut lines),
        );
        let mut q = [0; 8];
        d.mmio_read(0x10, &mut q, &mut ctx(&mut lines));
        assert_eq!(u64::from_le_bytes(q), 0x0123_4567_89ab_cdef);
        d.mmio_read(0x14, &mut q[..2], &mut ctx(&mut lines));
        assert_eq!(q[..2], [0x67, 0x45], "bytes 4 and 5 of the value");
        d.mmio_write(RAM_SIZE - 2, &[1, 2, 3, 4], &mut ctx(&mut lines));
        d.mmio_read(RAM_SIZE - 2, &mut q[..4], &mut ctx(&mut lines));
        assert_eq!(q[..4], [1, 2, 0xff, 0xff]);
    }
}
