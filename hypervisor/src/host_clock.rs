//! The host's wall clock at boot, read from the CMOS RTC (MC146818A registers 0-9, 0x32), so
//! that each VM's RTC starts at the real date and time.

use hv_platform::rtc::DateTime;

use crate::platform::{inb, outb};

fn cmos(index: u8) -> u8 {
    // SAFETY: ports 0x70/0x71 are the CMOS index and data ports; reading a time register has
    // no side effect (register C, which clears flags, is never read here). Index bit 7 (NMI
    // disable) is written clear, as PC firmware leaves it.
    unsafe {
        outb(0x70, index & 0x7f);
        inb(0x71)
    }
}

fn bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0xf)
}

/// The date and time now, or `None` when the RTC reads as nonsense (no RTC, a stopped clock).
pub fn now() -> Option<DateTime> {
    // Wait out an update in progress (register A bit 7, at most 2 ms), bounded: a missing RTC
    // reads 0xFF forever.
    for _ in 0..1_000_000 {
        if cmos(0x0a) & 0x80 == 0 {
            break;
        }
        core::hint::spin_loop();
    }
    let b = cmos(0x0b);
    let raw = [0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32].map(cmos);
    let dec = |v: u8| if b & 0x04 != 0 { v } else { bcd(v) };
    // 12-hour mode: bit 7 of the hour is PM.
    let mut hour = dec(raw[2] & 0x7f);
    if b & 0x02 == 0 {
        hour = hour % 12 + if raw[2] & 0x80 != 0 { 12 } else { 0 };
    }
    let century = match dec(raw[6]) {
        c @ 19..=21 => u16::from(c),
        _ => 20,
    };
    let t = DateTime {
        year: century * 100 + u16::from(dec(raw[5])),
        month: dec(raw[4]),
        day: dec(raw[3]),
        hour,
        minute: dec(raw[1]),
        second: dec(raw[0]),
    };
    t.is_valid().then_some(t)
}
