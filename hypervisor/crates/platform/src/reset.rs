//! The two ways a PC's software resets the machine, as operating systems use them to reboot:
//! the 8042 keyboard controller's pulse-reset command, and the chipset's reset control register.
//!
//! - **8042** (ports 0x60 data, 0x64 status/command): only what a reboot needs. The status
//!   register reads 0x04 (the system flag, set after POST; the input and output buffers empty),
//!   the data port 0x00; command 0xFE (pulse the reset line) asks for a reset; every other
//!   command and data byte is taken and ignored. There is no keyboard and no mouse behind it, so
//!   a guest's i8042 driver finds a controller that never answers its commands and gives up.
//! - **Reset control register** (port 0xCF9, PIIX3/ICH "RCR"): a byte write with bit 2
//!   (RST_CPU) set asks for a reset; bits 1 (SYS_RST) and 3 (FULL_RST) are kept and read back.
//!   Only byte accesses reach it: the port is byte 1 of the PCI configuration-address register
//!   at 0xCF8, and a 32-bit write there is a configuration address, never a reset.
//!
//! The device only records the request ([`ResetPorts::take_request`]); what a reset does to the
//! VM (stop it, with a state that says why) is the VM's policy.

use crate::bus::{Ctx, PioDevice};

pub const KBC_DATA: u16 = 0x60;
pub const KBC_STATUS: u16 = 0x64;
pub const RESET_CONTROL: u16 = 0xcf9;

/// The 8042 command that pulses the CPU reset line.
const KBC_PULSE_RESET: u8 = 0xfe;
/// 8042 status: system flag (bit 2) set, buffers empty.
const KBC_STATUS_VALUE: u8 = 0x04;
/// Reset control register bits: SYS_RST (1), RST_CPU (2), FULL_RST (3).
const RCR_RST_CPU: u8 = 1 << 2;
const RCR_KEPT: u8 = (1 << 1) | (1 << 3);

/// Which port asked for the reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetCause {
    KeyboardController,
    ResetControl,
}

impl ResetCause {
    pub const fn name(self) -> &'static str {
        match self {
            Self::KeyboardController => {
                "the keyboard controller's reset command (0xfe to port 0x64)"
            }
            Self::ResetControl => "the reset control register (port 0xcf9)",
        }
    }
}

/// The reset ports' state: the reset control register's kept bits and a pending request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResetPorts {
    rcr: u8,
    request: Option<ResetCause>,
}

impl ResetPorts {
    /// A byte write of `value` to the reset control register (0xCF9).
    pub fn write_reset_control(&mut self, value: u8) {
        self.rcr = value & RCR_KEPT;
        if value & RCR_RST_CPU != 0 {
            self.request.get_or_insert(ResetCause::ResetControl);
        }
    }

    /// A byte read of the reset control register.
    pub fn read_reset_control(&self) -> u8 {
        self.rcr
    }

    /// The reset asked for since the last call, if any.
    pub fn take_request(&mut self) -> Option<ResetCause> {
        self.request.take()
    }

    /// Whether a reset waits to be taken.
    pub fn requested(&self) -> bool {
        self.request.is_some()
    }
}

/// The 8042's two ports, as offsets 0 (0x60) and 4 (0x64) of one range; the platform maps
/// only those two ports (0x61 is the PIT's).
impl PioDevice for ResetPorts {
    fn pio_read(&mut self, offset: u16, data: &mut [u8], _ctx: &mut Ctx) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = if offset + i as u16 == KBC_STATUS - KBC_DATA {
                KBC_STATUS_VALUE
            } else {
                0
            };
        }
    }

    fn pio_write(&mut self, offset: u16, data: &[u8], _ctx: &mut Ctx) {
        for (i, &b) in data.iter().enumerate() {
            if offset + i as u16 == KBC_STATUS - KBC_DATA && b == KBC_PULSE_RESET {
                self.request.get_or_insert(ResetCause::KeyboardController);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqLines;

    #[test]
    fn the_8042_reset_command_and_the_reset_control_register_ask_for_a_reset() {
        let mut lines = IrqLines::default();
        let mut ctx = Ctx {
            now: 0,
            irq: &mut lines,
        };
        let mut r = ResetPorts::default();
        let mut b = [0u8];
        r.pio_read(4, &mut b, &mut ctx);
        assert_eq!(b, [0x04], "buffers empty, system flag");
        r.pio_write(4, &[0x20], &mut ctx); // read the command byte: no answer, no reset
        r.pio_write(0, &[0xfe], &mut ctx); // 0xfe as data is no command
        assert_eq!(r.take_request(), None);
        r.pio_write(4, &[0xfe], &mut ctx);
        assert!(r.requested());
        assert_eq!(r.take_request(), Some(ResetCause::KeyboardController));
        assert_eq!(r.take_request(), None);

        r.write_reset_control(0x02);
        assert_eq!((r.read_reset_control(), r.take_request()), (0x02, None));
        r.write_reset_control(0x06);
        assert_eq!(r.take_request(), Some(ResetCause::ResetControl));
        assert_eq!(r.read_reset_control(), 0x02, "RST_CPU is not kept");
    }
}
