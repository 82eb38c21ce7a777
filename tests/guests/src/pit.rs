//! The 8254 programmable interval timer at ports 0x40-0x43 (Intel 8254 datasheet) and its PC
//! wiring: channel 0 on IRQ 0, channel 2's gate and output on port 0x61 bits 0 and 5.
//!
//! Owns: the divisor for a rate ([`divisor_for`]) and the exact rate a divisor gives
//! ([`rate_millihz`]), channel 0 as a rate generator ([`start_periodic`]) and silenced
//! ([`stop`]).

use crate::cpu;

/// The PIT's input clock on a PC, Hz.
pub const INPUT_HZ: u64 = 1_193_182;
pub const CHANNEL0: u16 = 0x40;
pub const CHANNEL2: u16 = 0x42;
pub const COMMAND: u16 = 0x43;
/// Port 0x61 (NMI status and control): bit 0 channel 2 gate, bit 5 channel 2 output.
pub const PORT_61: u16 = 0x61;

/// The 16-bit divisor closest to `hz` (0 stands for 65536, the slowest rate).
pub const fn divisor_for(hz: u64) -> u16 {
    let d = (INPUT_HZ + hz / 2) / hz;
    if d >= 65536 {
        0
    } else {
        d as u16
    }
}

/// The rate of channel 0 with `divisor`, in thousandths of a hertz.
pub const fn rate_millihz(divisor: u16) -> u64 {
    let d = if divisor == 0 { 65536 } else { divisor as u64 };
    (INPUT_HZ * 1000 + d / 2) / d
}

fn out(port: u16, value: u8) {
    // SAFETY: the PIT's ports; they only affect the timer's outputs.
    unsafe { cpu::outb(port, value) }
}

/// Channel 0 in mode 2 (rate generator: one IRQ 0 edge per `divisor` input clocks), binary,
/// low byte then high byte (control word 0x34).
pub fn start_periodic(divisor: u16) {
    out(COMMAND, 0x34);
    out(CHANNEL0, divisor as u8);
    out(CHANNEL0, (divisor >> 8) as u8);
}

/// Silences channel 0: a mode 0 control word without a count drives OUT low, and mode 0 does not
/// count until a count is written (datasheet, "Mode 0"), so IRQ 0 sees no further edge.
pub fn stop() {
    out(COMMAND, 0x30);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divisors_and_rates() {
        assert_eq!(divisor_for(100), 11932);
        assert_eq!(rate_millihz(11932), 99_998);
        assert_eq!(divisor_for(1000), 1193);
        // Below 18.2 Hz the divisor does not fit: 0, which counts 65536.
        assert_eq!(divisor_for(18), 0);
        assert_eq!(rate_millihz(0), 18_207);
    }
}
