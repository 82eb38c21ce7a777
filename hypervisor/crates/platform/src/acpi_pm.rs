//! The ACPI fixed-hardware power-management registers: the PM1a event block (PM1 status and
//! enable), the PM1a control block, with which a guest's OS turns the machine off, and the
//! power-management timer (ACPI 6.5, sections 4.8.3.1-4.8.3.3), at the ports the VM's FADT gives
//! ([`PM1A_EVT`], [`PM1A_CNT`], [`PM_TMR`]). Only VMs given ACPI tables have them
//! (`Platform::attach_acpi_pm`).
//!
//! - PM1 status (2 bytes): write-one-to-clear; nothing here ever sets a bit (no PM timer, no
//!   power or sleep button, no RTC alarm wake), so it reads 0.
//! - PM1 enable (2 bytes): the enable bits of those events, kept and read back (TMR_EN, GBL_EN,
//!   PWRBTN_EN, SLPBTN_EN, RTC_EN); nothing is ever signalled, so no SCI is raised.
//! - PM1 control (2 bytes): SCI_EN reads 1 (the FADT's SMI_CMD is 0: the platform is always in
//!   ACPI mode), BM_RLD and SLP_TYP are kept, GBL_RLS and SLP_EN read 0. Writing SLP_EN with
//!   SLP_TYP = [`S5_SLP_TYP`] (the value of the DSDT's `\_S5` object) asks for soft-off; no
//!   other sleep state is offered (the DSDT has only `\_S5`), so another type is ignored.
//! - PM timer (4 bytes, read-only): a 32-bit counter at 3.579545 MHz (the FADT sets
//!   TMR_VAL_EXT) computed from the VM's clock, so it runs at the same rate as the guest's TSC
//!   (time dilation included) and Linux's clocksource watchdog finds them in agreement. Its
//!   overflow status is never set (TMR_STS), as no SCI is wired.
//! - Ports 0x606-0x607, between the blocks, float high.
//!
//! The device only records the request ([`AcpiPm::take_power_off`]); the VM decides what
//! power-off does.

use crate::bus::{Ctx, PioDevice};
use crate::platform::FLOATING;
use crate::time::Timebase;

/// The PM1a event block: PM1 status at +0, PM1 enable at +2 (QEMU's ICH9 uses the same base).
pub const PM1A_EVT: u16 = 0x600;
pub const PM1_EVT_LEN: u8 = 4;
/// The PM1a control block.
pub const PM1A_CNT: u16 = 0x604;
pub const PM1_CNT_LEN: u8 = 2;
/// The SLP_TYP value of S5 (soft off) in the DSDT's `\_S5` package.
pub const S5_SLP_TYP: u16 = 5;
/// The PM timer.
pub const PM_TMR: u16 = 0x608;
pub const PM_TMR_LEN: u8 = 4;
/// The PM timer's rate (ACPI 6.5, 4.8.3.3).
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// All the device's ports: from [`PM1A_EVT`] to the end of the PM timer.
pub const PORTS: u16 = PM_TMR + PM_TMR_LEN as u16 - PM1A_EVT;

/// PM1 enable bits that exist: TMR_EN (0), GBL_EN (5), PWRBTN_EN (8), SLPBTN_EN (9), RTC_EN (10).
const PM1_EN_BITS: u16 = (1 << 0) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 10);
/// PM1 control: SCI_EN (0), BM_RLD (1), GBL_RLS (2, write-only), SLP_TYP (12:10), SLP_EN (13,
/// write-only).
const SCI_EN: u16 = 1 << 0;
const BM_RLD: u16 = 1 << 1;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 7 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;

/// The registers' state and a pending power-off request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiPm {
    timebase: Timebase,
    enable: u16,
    control: u16,
    power_off: bool,
}

impl AcpiPm {
    pub fn new(timebase: Timebase) -> Self {
        Self {
            timebase,
            enable: 0,
            control: 0,
            power_off: false,
        }
    }

    /// The guest asked for soft-off since the last call.
    pub fn take_power_off(&mut self) -> bool {
        core::mem::take(&mut self.power_off)
    }

    /// The 16-bit register at byte `offset` of the six ports (event block, then control block)
    /// and its current value.
    fn register(&self, offset: u16) -> u16 {
        match offset / 2 {
            0 => 0,
            1 => self.enable,
            2 => self.control | SCI_EN,
            _ => 0xffff,
        }
    }

    /// The PM timer's count at `now` (VM clock).
    fn timer(&self, now: u64) -> u32 {
        self.timebase.cycles_in(now, PM_TIMER_HZ) as u32
    }

    fn write_register(&mut self, offset: u16, value: u16) {
        match offset / 2 {
            0 => {} // status: write-one-to-clear, and nothing is ever set
            1 => self.enable = value & PM1_EN_BITS,
            2 => {
                self.control = value & (BM_RLD | SLP_TYP_MASK);
                if value & SLP_EN != 0 {
                    let slp_typ = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
                    if slp_typ == S5_SLP_TYP {
                        self.power_off = true;
                    } else {
                        log::debug!(target: "platform", "acpi: sleep type {slp_typ} is not offered; ignored");
                    }
                }
            }
            _ => {} // the gap and the read-only PM timer
        }
    }
}

/// Byte-wise access (the bus splits wider ones into byte lanes, as ISA does, all at the same
/// `now`, so a 32-bit read of the PM timer is consistent): `offset` counts from [`PM1A_EVT`];
/// a write to the high byte of PM1 control with SLP_EN acts on the whole
/// register, as the low byte is already in place (ACPICA writes PM1 control as one 16-bit
/// access, which arrives low byte first).
impl PioDevice for AcpiPm {
    fn pio_read(&mut self, offset: u16, data: &mut [u8], ctx: &mut Ctx) {
        let timer = offset.wrapping_sub(PM_TMR - PM1A_EVT);
        if timer < u16::from(PM_TMR_LEN) {
            data[0] = (self.timer(ctx.now) >> (8 * timer)) as u8;
            return;
        }
        if offset >= PM1A_CNT - PM1A_EVT + u16::from(PM1_CNT_LEN) {
            data[0] = FLOATING;
            return;
        }
        let value = self.register(offset);
        data[0] = (value >> (8 * (offset % 2))) as u8;
    }

    fn pio_write(&mut self, offset: u16, data: &[u8], _ctx: &mut Ctx) {
        if offset >= PM1A_CNT - PM1A_EVT + u16::from(PM1_CNT_LEN) {
            return;
        }
        let old = self.register(offset);
        let shift = 8 * (offset % 2);
        let value = (old & !(0xff << shift)) | (u16::from(data[0]) << shift);
        self.write_register(offset, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqLines;

    fn write16(pm: &mut AcpiPm, offset: u16, value: u16) {
        let mut irq = IrqLines::default();
        let mut ctx = Ctx {
            now: 0,
            irq: &mut irq,
        };
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            pm.pio_write(offset + i as u16, &[*b], &mut ctx);
        }
    }

    fn read(pm: &mut AcpiPm, offset: u16, len: u16, now: u64) -> u32 {
        let mut irq = IrqLines::default();
        let mut ctx = Ctx { now, irq: &mut irq };
        (0..len).fold(0, |v, i| {
            let mut b = [0];
            pm.pio_read(offset + i, &mut b, &mut ctx);
            v | u32::from(b[0]) << (8 * i)
        })
    }

    fn read16(pm: &mut AcpiPm, offset: u16) -> u16 {
        read(pm, offset, 2, 0) as u16
    }

    const TSC_HZ: u64 = 2_000_000_000;
    const STS: u16 = 0;
    const EN: u16 = 2;
    const CNT: u16 = PM1A_CNT - PM1A_EVT;

    #[test]
    fn registers_read_as_an_acpi_mode_chipset_with_nothing_pending() {
        let mut pm = AcpiPm::new(Timebase::new(TSC_HZ));
        assert_eq!(read16(&mut pm, STS), 0);
        assert_eq!(read16(&mut pm, CNT), SCI_EN, "always in ACPI mode");
        write16(&mut pm, STS, 0xffff);
        assert_eq!(read16(&mut pm, STS), 0, "write-one-to-clear");
        write16(&mut pm, EN, 0xffff);
        assert_eq!(read16(&mut pm, EN), PM1_EN_BITS, "only the defined enables");
    }

    #[test]
    fn slp_en_with_the_s5_type_asks_for_power_off() {
        let mut pm = AcpiPm::new(Timebase::new(TSC_HZ));
        // ACPICA: SLP_TYP first, then SLP_TYP | SLP_EN.
        write16(&mut pm, CNT, S5_SLP_TYP << SLP_TYP_SHIFT);
        assert!(!pm.take_power_off(), "no SLP_EN yet");
        assert_eq!(read16(&mut pm, CNT), SCI_EN | (S5_SLP_TYP << SLP_TYP_SHIFT));
        write16(&mut pm, CNT, (S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN);
        assert!(pm.take_power_off());
        assert!(!pm.take_power_off(), "taken once");
        assert_eq!(read16(&mut pm, CNT) & SLP_EN, 0, "SLP_EN reads 0");
    }

    #[test]
    fn other_sleep_types_are_not_offered() {
        let mut pm = AcpiPm::new(Timebase::new(TSC_HZ));
        for slp_typ in (0..8).filter(|&t| t != S5_SLP_TYP) {
            write16(&mut pm, CNT, (slp_typ << SLP_TYP_SHIFT) | SLP_EN);
            assert!(!pm.take_power_off(), "type {slp_typ}");
        }
    }

    #[test]
    fn the_pm_timer_counts_at_3_579545_mhz_of_the_vm_clock() {
        let mut pm = AcpiPm::new(Timebase::new(TSC_HZ));
        let tmr = PM_TMR - PM1A_EVT;
        assert_eq!(read(&mut pm, tmr, 4, 0), 0);
        // One second of VM clock, then the 32-bit wrap.
        assert_eq!(read(&mut pm, tmr, 4, TSC_HZ), 3_579_545);
        let wrap = Timebase::new(TSC_HZ).ticks_for(1 << 32, PM_TIMER_HZ);
        assert_eq!(read(&mut pm, tmr, 4, wrap), 0);
        // Read-only; the gap between the blocks floats high.
        write16(&mut pm, tmr, 0x1234);
        assert_eq!(read(&mut pm, tmr, 4, TSC_HZ), 3_579_545);
        assert_eq!(read16(&mut pm, 6), 0xffff);
    }
}
