//! The CMOS real-time clock at ports 0x70/0x71 on IRQ 8 (Motorola MC146818A datasheet; the
//! same registers in every PC chipset).
//!
//! Owns: indexed access ([`read`], [`write`]; bit 7 of the index port is the PC's NMI mask and is
//! kept clear), the periodic interrupt ([`periodic_hz`], [`start_periodic`], [`stop`]) and its
//! acknowledgement ([`ack`]: reading register C clears the flags and lowers IRQ 8).

use crate::cpu;

pub const INDEX: u16 = 0x70;
pub const DATA: u16 = 0x71;
pub const REG_A: u8 = 0x0A;
pub const REG_B: u8 = 0x0B;
pub const REG_C: u8 = 0x0C;
pub const REG_D: u8 = 0x0D;
/// Register A bits 6:4: 010 selects the 32.768 kHz time base (divider running).
pub const A_DV_32K: u8 = 0b010 << 4;
/// Register A bit 7: update in progress.
pub const A_UIP: u8 = 1 << 7;
/// Register B: periodic, alarm and update-ended interrupt enables; 24-hour mode.
pub const B_PIE: u8 = 1 << 6;
pub const B_AIE: u8 = 1 << 5;
pub const B_UIE: u8 = 1 << 4;
pub const B_24H: u8 = 1 << 1;
/// Register C: IRQF (any enabled flag), PF (periodic), AF, UF.
pub const C_IRQF: u8 = 1 << 7;
pub const C_PF: u8 = 1 << 6;

/// The periodic interrupt rate of rate select `rs` with the 32.768 kHz time base (datasheet
/// Table 3): none for 0, 256 and 128 Hz for 1 and 2 (which repeat rates 8 and 9), else
/// `32768 >> (rs - 1)`.
pub const fn periodic_hz(rs: u8) -> Option<u32> {
    match rs {
        0 => None,
        1 => Some(256),
        2 => Some(128),
        3..=15 => Some(32768 >> (rs - 1)),
        _ => None,
    }
}

/// The rate select for `hz` (one of 8192, 4096, ..., 2), if there is one.
pub fn rate_select_for(hz: u32) -> Option<u8> {
    (3..=15).find(|&rs| periodic_hz(rs) == Some(hz))
}

/// Reads CMOS register `index` (0..128).
pub fn read(index: u8) -> u8 {
    // SAFETY: the RTC's index and data ports; reading register C acknowledges interrupts, which
    // callers of this module want.
    unsafe {
        cpu::outb(INDEX, index & 0x7F);
        cpu::inb(DATA)
    }
}

/// Writes CMOS register `index`.
pub fn write(index: u8, value: u8) {
    // SAFETY: the RTC's ports; CMOS RAM and clock registers of this VM only.
    unsafe {
        cpu::outb(INDEX, index & 0x7F);
        cpu::outb(DATA, value);
    }
}

/// Reads register C: the interrupt flags, cleared by the read (which also lowers IRQ 8).
pub fn ack() -> u8 {
    read(REG_C)
}

/// Starts the periodic interrupt at rate select `rs` (3..=15): time base on, rate set, PIE set.
pub fn start_periodic(rs: u8) {
    write(REG_A, A_DV_32K | (rs & 0x0F));
    let b = read(REG_B);
    write(REG_B, b | B_PIE);
    ack();
}

/// Stops the periodic, alarm and update interrupts and acknowledges what is pending.
pub fn stop() {
    let b = read(REG_B);
    write(REG_B, b & !(B_PIE | B_AIE | B_UIE));
    ack();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(periodic_hz(6), Some(1024));
        assert_eq!(periodic_hz(3), Some(8192));
        assert_eq!(periodic_hz(15), Some(2));
        assert_eq!(periodic_hz(1), Some(256));
        assert_eq!(periodic_hz(0), None);
        assert_eq!(rate_select_for(1024), Some(6));
        assert_eq!(rate_select_for(256), Some(8));
        assert_eq!(rate_select_for(1000), None);
    }
}
