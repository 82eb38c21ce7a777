//! The MC146818A-compatible real-time clock and its CMOS RAM (ports 0x70-0x71).
//!
//! Owns: the index register (port 0x70, bit 7 the NMI-disable bit, stored for the platform),
//! the 128 bytes behind the data port (0x71): the time and calendar registers 0-9 and the
//! century byte 0x32, the status registers A-D, the rest as RAM; the clock itself (boot time
//! plus elapsed guest time), and IRQ 8. It must not touch the interrupt controllers (it only
//! sets the level of line 8 in the [`Ctx`] it is given), nor NMI delivery (the platform reads
//! [`Rtc::nmi_disabled`]), nor decide the RAM's contents: the platform writes memory sizes,
//! equipment bytes and their checksum with [`Rtc::set_cmos`].
//!
//! Mapping: [`Rtc`] implements [`PioDevice`] for the 2 ports 0x70-0x71 (offset 0 = index,
//! offset 1 = data). Wider accesses are split into byte accesses at consecutive offsets.
//!
//! Time: the 32.768 kHz time base runs from the `origin` given to [`Rtc::new`] and is converted
//! with [`Timebase`] from there, so neither the seconds nor the periodic interrupt drift. All
//! events are positions `d` of the divider chain (counted in 32.768 kHz cycles): an update
//! (the seconds advance) at every multiple of 32768, a periodic tick at every multiple of the
//! rate's period, the update-in-progress bit during the 8 cycles (244 us) before an update.
//! While the clock ticks, the time registers are computed from a count of seconds; while SET
//! is 1 or the divider is stopped they are plain bytes (what the guest wrote), parsed back into
//! seconds when the clock ticks again.
//!
//! Not emulated: daylight-saving adjustment (DSE is stored; the MC146818A's 1980s US rules are
//! of no use to a guest), the SQW pin (SQWE is stored; nothing is wired to it on a PC), time
//! bases other than 32.768 kHz (DV other than 010 stops the divider, as reset does), the
//! update's own 1984 us (the transfer is instantaneous at the end of the UIP window), and the
//! raw arithmetic of a real chip on out-of-range time bytes (the model clamps them, below).

use crate::bus::{Ctx, PioDevice};
use crate::irq::IrqLines;
use crate::time::{Timebase, Tsc};

/// First port of the RTC (index); the data port follows.
pub const RTC_BASE: u16 = 0x70;
/// Number of ports the RTC owns from [`RTC_BASE`].
pub const RTC_PORTS: u16 = 2;
/// The ISA interrupt the RTC raises.
pub const RTC_IRQ: u8 = 8;
/// Bytes of CMOS behind the data port (indexes 0-127).
pub const CMOS_SIZE: usize = 128;

const RTC_HZ: u64 = 32_768;
/// UIP is set 244 us (8 cycles of 32.768 kHz) before each update (MC146818A, "Update Cycle").
const UIP_CYCLES: u64 = 8;
/// After the divider leaves reset, "the first update cycle begins one-half second later".
const HALF_SECOND: u64 = RTC_HZ / 2;

const REG_SECONDS: usize = 0x00;
const REG_ALARM_SECONDS: usize = 0x01;
const REG_MINUTES: usize = 0x02;
const REG_ALARM_MINUTES: usize = 0x03;
const REG_HOURS: usize = 0x04;
const REG_ALARM_HOURS: usize = 0x05;
const REG_DAY_OF_WEEK: usize = 0x06;
const REG_DAY: usize = 0x07;
const REG_MONTH: usize = 0x08;
const REG_YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
/// The century byte PC firmware reports in the FADT; part of the clock here, as in QEMU.
const REG_CENTURY: usize = 0x32;

/// The time and calendar registers, in the order [`Rtc::encode`] produces them.
const TIME_REGS: [usize; 8] = [
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_DAY_OF_WEEK,
    REG_DAY,
    REG_MONTH,
    REG_YEAR,
    REG_CENTURY,
];

const A_UIP: u8 = 0x80;
const A_DV: u8 = 0x70;
/// DV = 010: the 32.768 kHz time base, divider running.
const A_DV_NORMAL: u8 = 0x20;
const A_RS: u8 = 0x0f;

const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
/// Data mode: 1 = binary, 0 = BCD.
const B_DM: u8 = 0x04;
/// 1 = 24-hour, 0 = 12-hour with bit 7 of the hours = PM.
const B_24H: u8 = 0x02;

const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
/// The interrupt flags and, in register B, their enables sit at the same bits.
const C_FLAGS: u8 = C_PF | C_AF | C_UF;

/// Valid RAM and time, the only bit of register D.
const D_VRT: u8 = 0x80;

/// An alarm byte with bits 7:6 set matches any value ("don't care", MC146818A).
const ALARM_DONT_CARE: u8 = 0xc0;

const SECS_PER_DAY: i64 = 86_400;

/// A wall-clock time, in binary (not BCD), 24-hour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DateTime {
    pub year: u16,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

impl DateTime {
    /// Whether the fields name a real time in years 0-9999 (the century byte's range).
    pub fn is_valid(&self) -> bool {
        self.year <= 9999
            && (1..=12).contains(&self.month)
            && self.day >= 1
            && self.day <= month_len(i64::from(self.year), self.month)
            && self.hour < 24
            && self.minute < 60
            && self.second < 60
    }

    /// Seconds since 1970-01-01 00:00:00 (proleptic Gregorian; negative before 1970).
    fn to_secs(self) -> i64 {
        days_from_civil(i64::from(self.year), self.month, self.day) * SECS_PER_DAY
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }

    fn from_secs(secs: i64) -> Self {
        let c = Civil::from_secs(secs);
        Self {
            year: c.year.clamp(0, i64::from(u16::MAX)) as u16,
            month: c.month,
            day: c.day,
            hour: c.hour,
            minute: c.minute,
            second: c.second,
        }
    }
}

/// Why the RTC refused a request from the platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RtcError {
    /// The boot time is not a real date and time in years 0-9999.
    InvalidDateTime,
    /// A CMOS index past 127.
    IndexOutOfRange(u8),
    /// A CMOS index that is a clock or status register, not RAM (0x00-0x0d, 0x32).
    NotRam(u8),
}

/// Days in `month` (1-12) of `year`: the Gregorian leap rule (every 4th year, except every
/// 100th, except every 400th).
fn month_len(year: i64, month: u8) -> u8 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(month) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A time broken down, with the year unbounded and the day of the week (0 = Sunday).
struct Civil {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    weekday: u8,
}

impl Civil {
    /// H. Hinnant's `civil_from_days`, plus the time of day.
    fn from_secs(secs: i64) -> Self {
        let days = secs.div_euclid(SECS_PER_DAY);
        let sod = secs.rem_euclid(SECS_PER_DAY);
        let z = days.saturating_add(719_468);
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = (yoe + era * 400).saturating_add(i64::from(month <= 2));
        Self {
            year,
            month,
            day,
            hour: (sod / 3600) as u8,
            minute: (sod / 60 % 60) as u8,
            second: (sod % 60) as u8,
            // 1970-01-01 was a Thursday.
            weekday: (days.rem_euclid(7) as u8 + 4) % 7,
        }
    }
}

/// The MC146818A RTC and CMOS RAM.
#[derive(Clone, Debug)]
pub struct Rtc {
    tb: Timebase,
    /// Guest TSC at which the time base's cycle 0 is (the VM's creation).
    origin: Tsc,
    /// RAM, register A (bits 6:0), register B, the alarm bytes; the time bytes while the
    /// clock does not tick.
    cmos: [u8; CMOS_SIZE],
    /// Port 0x70 as last written (index in bits 6:0, NMI disable in bit 7).
    index: u8,
    /// PF, AF, UF (register C without IRQF, which is computed).
    flags: u8,
    /// DV = 010.
    running: bool,
    /// Divider position at time-base cycle `c` is `c - div_start + div_phase`.
    div_start: u64,
    div_phase: u64,
    /// Divider position up to which events have been processed.
    last_d: u64,
    /// Seconds since 1970 at divider position 0: the time is `offset + d / 32768`.
    offset: i64,
    /// What the guest's day-of-week register adds to the computed weekday (mod 7). The chip
    /// only increments the byte at midnight, so a guest may set any value and see it advance
    /// daily; the model computes the weekday from the date (0 here) until the guest writes
    /// register 6, and keeps the guest's offset when it sets a new date without it (Linux's
    /// `mc146818_set_time` does not write register 6).
    dow_adjust: u8,
    /// Register 6 was written since the clock last stopped ticking (or is being written now).
    dow_written: bool,
    coalesced: u64,
}

impl Rtc {
    /// An RTC that reads `boot` at guest TSC `origin` and runs from there, with registers as PC
    /// firmware leaves them: A = 0x26 (32.768 kHz, periodic rate 1024 Hz), B = 0x02 (24-hour,
    /// BCD, no interrupts), D = VRT. The RAM is zero.
    pub fn new(tb: Timebase, origin: Tsc, boot: DateTime) -> Result<Self, RtcError> {
        if !boot.is_valid() {
            return Err(RtcError::InvalidDateTime);
        }
        let mut cmos = [0; CMOS_SIZE];
        cmos[REG_A] = A_DV_NORMAL | 0x06;
        cmos[REG_B] = B_24H;
        Ok(Self {
            tb,
            origin,
            cmos,
            index: 0,
            flags: 0,
            running: true,
            div_start: 0,
            div_phase: 0,
            last_d: 0,
            offset: boot.to_secs(),
            dow_adjust: 0,
            dow_written: false,
            coalesced: 0,
        })
    }

    /// Sets a byte of CMOS RAM (any index but the clock's: 0x00-0x0d and 0x32).
    pub fn set_cmos(&mut self, index: u8, value: u8) -> Result<(), RtcError> {
        let i = Self::ram_index(index)?;
        self.cmos[i] = value;
        Ok(())
    }

    /// A byte of CMOS RAM, as [`Self::set_cmos`] indexes it.
    pub fn cmos(&self, index: u8) -> Result<u8, RtcError> {
        Self::ram_index(index).map(|i| self.cmos[i])
    }

    fn ram_index(index: u8) -> Result<usize, RtcError> {
        let i = usize::from(index);
        if i >= CMOS_SIZE {
            Err(RtcError::IndexOutOfRange(index))
        } else if i <= REG_D || i == REG_CENTURY {
            Err(RtcError::NotRam(index))
        } else {
            Ok(i)
        }
    }

    /// Whether the guest has disabled NMIs (port 0x70 bit 7).
    pub fn nmi_disabled(&self) -> bool {
        self.index & 0x80 != 0
    }

    /// The wall time the guest would read at `now` (what the clock holds while it ticks, what
    /// its registers parse as while it does not).
    pub fn time(&self, now: Tsc) -> DateTime {
        if self.ticking() {
            DateTime::from_secs(self.secs(self.d(now)))
        } else {
            DateTime::from_secs(self.parse().0)
        }
    }

    /// Periodic ticks that were merged: a tick while the previous one's PF was still unread
    /// with PIE set (the guest did not run or did not acknowledge in time), in the way guests
    /// that count RTC interrupts for time need compensating.
    pub fn coalesced(&self) -> u64 {
        self.coalesced
    }

    /// When IRQ 8 may next need raising: the next periodic tick with PIE set, the next update
    /// with UIE or AIE set (the alarm is compared at updates). `None` while IRQ 8 is already
    /// asserted (nothing can change it before the guest reads C, an access) or the divider is
    /// stopped. Flags of disabled interrupts need no deadline: accesses catch up on them.
    pub fn next_deadline(&self) -> Option<Tsc> {
        if !self.running || self.irqf() {
            return None;
        }
        let b = self.cmos[REG_B];
        let periodic = self
            .period()
            .filter(|_| b & B_PIE != 0)
            .map(|p| (self.last_d / p).saturating_add(1).saturating_mul(p));
        let update = (b & B_SET == 0 && b & (B_UIE | B_AIE) != 0).then(|| {
            (self.last_d / RTC_HZ)
                .saturating_add(1)
                .saturating_mul(RTC_HZ)
        });
        let d = match (periodic, update) {
            (Some(p), Some(u)) => p.min(u),
            (p, u) => p.or(u)?,
        };
        let cycle = d
            .saturating_sub(self.div_phase)
            .saturating_add(self.div_start);
        Some(self.origin.saturating_add(self.tb.ticks_for(cycle, RTC_HZ)))
    }

    /// Sets the flags of the events due by `now` and the level of IRQ 8.
    pub fn advance(&mut self, now: Tsc, irq: &mut IrqLines) {
        let d = self.d(now);
        if self.running && d > self.last_d {
            let last = self.last_d;
            let b = self.cmos[REG_B];
            if let Some(p) = self.period() {
                let n = d / p - last / p;
                if n > 0 {
                    if b & B_PIE != 0 {
                        let missed = n - 1 + u64::from(self.flags & C_PF != 0);
                        self.coalesced = self.coalesced.saturating_add(missed);
                    }
                    // Flags are set whether or not their interrupt is enabled (MC146818A,
                    // "Register C").
                    self.flags |= C_PF;
                }
            }
            if b & B_SET == 0 {
                let first = last / RTC_HZ + 1;
                let end = d / RTC_HZ;
                if end >= first {
                    self.flags |= C_UF;
                    if self.alarm_between(first, end) {
                        self.flags |= C_AF;
                    }
                }
            }
            self.last_d = d;
        }
        self.update_irq(irq);
    }

    /// Whether the alarm matches the time after any update `k` in `first..=end`. A day holds
    /// every time of day, so at most 86400 updates are compared.
    fn alarm_between(&self, first: u64, end: u64) -> bool {
        let last = end.min(first.saturating_add(SECS_PER_DAY as u64 - 1));
        let alarm = [
            self.cmos[REG_ALARM_SECONDS],
            self.cmos[REG_ALARM_MINUTES],
            self.cmos[REG_ALARM_HOURS],
        ];
        (first..=last).any(|k| {
            let t = self.encode(self.offset.saturating_add(k as i64));
            let now = [t[0], t[1], t[2]];
            alarm
                .iter()
                .zip(now)
                .all(|(&a, v)| a & ALARM_DONT_CARE == ALARM_DONT_CARE || a == v)
        })
    }

    fn irqf(&self) -> bool {
        self.flags & self.cmos[REG_B] & C_FLAGS != 0
    }

    /// IRQF = PF·PIE + AF·AIE + UF·UIE, and the IRQ pin follows it (MC146818A, "IRQF").
    fn update_irq(&self, irq: &mut IrqLines) {
        irq.set_level(RTC_IRQ, self.irqf());
    }

    fn ticking(&self) -> bool {
        self.running && self.cmos[REG_B] & B_SET == 0
    }

    /// Periodic-interrupt period in time-base cycles: RS 1 and 2 are 256 and 128 Hz on the
    /// MC146818A (as for RS 8 and 9 at 32.768 kHz), RS 3-15 are 32768 >> (RS - 1) Hz, RS 0 is
    /// off.
    fn period(&self) -> Option<u64> {
        match self.cmos[REG_A] & A_RS {
            0 => None,
            1 => Some(128),
            2 => Some(256),
            rs => Some(1 << (rs - 1)),
        }
    }

    fn cycle(&self, now: Tsc) -> u64 {
        self.tb.cycles_in(now.saturating_sub(self.origin), RTC_HZ)
    }

    fn d(&self, now: Tsc) -> u64 {
        self.cycle(now)
            .saturating_sub(self.div_start)
            .saturating_add(self.div_phase)
    }

    fn secs(&self, d: u64) -> i64 {
        self.offset.saturating_add((d / RTC_HZ) as i64)
    }

    fn enc(&self, v: u8) -> u8 {
        if self.cmos[REG_B] & B_DM != 0 {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn dec(&self, b: u8) -> u8 {
        if self.cmos[REG_B] & B_DM != 0 {
            b
        } else {
            (b >> 4) * 10 + (b & 0x0f)
        }
    }

    /// The time registers' bytes for `secs` in the present data mode and hour format, in the
    /// order of [`TIME_REGS`].
    fn encode(&self, secs: i64) -> [u8; 8] {
        let c = Civil::from_secs(secs);
        let hour = if self.cmos[REG_B] & B_24H != 0 {
            self.enc(c.hour)
        } else {
            let h12 = match c.hour % 12 {
                0 => 12,
                h => h,
            };
            self.enc(h12) | if c.hour >= 12 { 0x80 } else { 0 }
        };
        let weekday = (c.weekday + self.dow_adjust) % 7 + 1;
        [
            self.enc(c.second),
            self.enc(c.minute),
            hour,
            self.enc(weekday),
            self.enc(c.day),
            self.enc(c.month),
            self.enc(c.year.rem_euclid(100) as u8),
            self.enc(c.year.div_euclid(100).rem_euclid(100) as u8),
        ]
    }

    /// The time the time bytes in `cmos` stand for, and the day-of-week adjustment they imply.
    /// Out-of-range fields (a guest's junk, or BCD digits A-F) are clamped into range: the real
    /// chip would count on from them in ways no guest relies on.
    fn parse(&self) -> (i64, u8) {
        let r = |i: usize| self.dec(self.cmos[i]);
        let second = r(REG_SECONDS).min(59);
        let minute = r(REG_MINUTES).min(59);
        let h = self.cmos[REG_HOURS];
        let hour = if self.cmos[REG_B] & B_24H != 0 {
            self.dec(h).min(23)
        } else {
            self.dec(h & 0x7f).clamp(1, 12) % 12 + if h & 0x80 != 0 { 12 } else { 0 }
        };
        let year = i64::from(r(REG_CENTURY).min(99)) * 100 + i64::from(r(REG_YEAR).min(99));
        let month = r(REG_MONTH).clamp(1, 12);
        let day = r(REG_DAY).clamp(1, month_len(year, month));
        let t = DateTime {
            year: year as u16,
            month,
            day,
            hour,
            minute,
            second,
        };
        let secs = t.to_secs();
        let weekday = Civil::from_secs(secs).weekday;
        let dow = r(REG_DAY_OF_WEEK).clamp(1, 7) - 1;
        (secs, (dow + 7 - weekday) % 7)
    }

    /// Freezes the clock into the time bytes (SET set, or the divider stopped).
    fn store_time(&mut self, d: u64) {
        let bytes = self.encode(self.secs(d));
        for (&i, b) in TIME_REGS.iter().zip(bytes) {
            self.cmos[i] = b;
        }
    }

    /// Starts the clock from the time bytes at divider position `d`: the next update is at
    /// the divider's next second, so the sub-second phase is kept.
    fn resume(&mut self, d: u64) {
        let (secs, adjust) = self.parse();
        self.offset = secs.saturating_sub((d / RTC_HZ) as i64);
        if core::mem::take(&mut self.dow_written) {
            self.dow_adjust = adjust;
        }
    }

    fn read_data(&mut self, now: Tsc) -> u8 {
        let i = usize::from(self.index & 0x7f);
        let d = self.d(now);
        match i {
            _ if TIME_REGS.contains(&i) && self.ticking() => {
                let bytes = self.encode(self.secs(d));
                TIME_REGS
                    .iter()
                    .position(|&r| r == i)
                    .map_or(0, |at| bytes[at])
            }
            REG_A => {
                let uip = self.ticking() && d % RTC_HZ >= RTC_HZ - UIP_CYCLES;
                self.cmos[REG_A] | if uip { A_UIP } else { 0 }
            }
            REG_C => {
                // Reading C clears all its flags (and so IRQF and the IRQ pin).
                let v = self.flags | if self.irqf() { C_IRQF } else { 0 };
                self.flags = 0;
                v
            }
            REG_D => D_VRT,
            _ => self.cmos[i],
        }
    }

    fn write_data(&mut self, now: Tsc, v: u8) {
        let i = usize::from(self.index & 0x7f);
        let d = self.d(now);
        match i {
            _ if TIME_REGS.contains(&i) => {
                self.dow_written |= i == REG_DAY_OF_WEEK;
                if self.ticking() {
                    // A write while the clock ticks changes that field and the clock goes on
                    // from the result (MC146818A: updates continue unless SET is 1).
                    self.store_time(d);
                    self.cmos[i] = v;
                    self.resume(d);
                } else {
                    self.cmos[i] = v;
                }
            }
            REG_A => {
                let was_running = self.running;
                if self.ticking() && v & A_DV != A_DV_NORMAL {
                    self.store_time(d);
                }
                // UIP (bit 7) is read-only.
                self.cmos[REG_A] = v & !A_UIP;
                self.running = v & A_DV == A_DV_NORMAL;
                if self.running && !was_running {
                    self.div_start = self.cycle(now);
                    self.div_phase = HALF_SECOND;
                    self.last_d = HALF_SECOND;
                    if self.ticking() {
                        self.resume(HALF_SECOND);
                    }
                }
            }
            REG_B => {
                // "UIE is cleared when SET is written 1" (MC146818A / DS12887, register B).
                let v = if v & B_SET != 0 { v & !B_UIE } else { v };
                let was_ticking = self.ticking();
                if was_ticking && v & B_SET != 0 {
                    // Frozen in the format the bytes had until now.
                    self.store_time(d);
                }
                self.cmos[REG_B] = v;
                if !was_ticking && self.ticking() {
                    self.resume(d);
                }
            }
            REG_C | REG_D => {} // Read-only.
            _ => self.cmos[i] = v,
        }
    }
}

impl PioDevice for Rtc {
    fn pio_read(&mut self, offset: u16, data: &mut [u8], ctx: &mut Ctx) {
        self.advance(ctx.now, ctx.irq);
        for (i, b) in data.iter_mut().enumerate() {
            *b = match offset.wrapping_add(i as u16) {
                // The index register reads back as written (QEMU reads 0xff; a readable index
                // is what newer chipsets give, and harmless).
                0 => self.index,
                1 => self.read_data(ctx.now),
                _ => 0xff,
            };
        }
        self.update_irq(ctx.irq);
    }

    fn pio_write(&mut self, offset: u16, data: &[u8], ctx: &mut Ctx) {
        self.advance(ctx.now, ctx.irq);
        for (i, &b) in data.iter().enumerate() {
            match offset.wrapping_add(i as u16) {
                0 => self.index = b,
                1 => self.write_data(ctx.now, b),
                _ => {}
            }
        }
        self.update_irq(ctx.irq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TSC_HZ: u64 = 2_100_000_007;
    const ORIGIN: Tsc = 5_000_000_003;

    fn dt(year: u16, month: u8, day: u8, hour: u8, minute: u8, second: u8) -> DateTime {
        DateTime {
            year,
            month,
            day,
            hour,
            minute,
            second,
        }
    }

    struct H {
        rtc: Rtc,
        irq: IrqLines,
        tb: Timebase,
    }

    impl H {
        fn new(boot: DateTime) -> Self {
            let tb = Timebase::new(TSC_HZ);
            Self {
                rtc: Rtc::new(tb, ORIGIN, boot).unwrap(),
                irq: IrqLines::default(),
                tb,
            }
        }

        /// The guest TSC of 32.768 kHz cycle `c` from the origin.
        fn at(&self, c: u64) -> Tsc {
            ORIGIN + self.tb.ticks_for(c, RTC_HZ)
        }

        fn write(&mut self, c: u64, index: u8, v: u8) {
            let mut ctx = Ctx {
                now: self.at(c),
                irq: &mut self.irq,
            };
            self.rtc.pio_write(0, &[index], &mut ctx);
            self.rtc.pio_write(1, &[v], &mut ctx);
        }

        fn read(&mut self, c: u64, index: u8) -> u8 {
            let mut d = [0];
            let mut ctx = Ctx {
                now: self.at(c),
                irq: &mut self.irq,
            };
            self.rtc.pio_write(0, &[index], &mut ctx);
            self.rtc.pio_read(1, &mut d, &mut ctx);
            d[0]
        }

        /// Registers 0, 2, 4, 6, 7, 8, 9 and 0x32 at cycle `c`.
        fn clock(&mut self, c: u64) -> [u8; 8] {
            TIME_REGS.map(|i| self.read(c, i as u8))
        }

        fn irq8(&self) -> bool {
            self.irq.level(RTC_IRQ)
        }
    }

    #[test]
    fn calendar_rolls_over_months_leap_days_years_and_centuries() {
        // (time one second before, BCD bytes after the update: sec, min, hour, weekday (1 =
        // Sunday), day, month, year, century)
        let cases: [(DateTime, [u8; 8]); 8] = [
            (
                dt(2024, 2, 28, 23, 59, 59),
                [0, 0, 0, 5, 0x29, 0x02, 0x24, 0x20],
            ),
            (
                dt(2024, 2, 29, 23, 59, 59),
                [0, 0, 0, 6, 0x01, 0x03, 0x24, 0x20],
            ),
            (
                dt(2023, 2, 28, 23, 59, 59),
                [0, 0, 0, 4, 0x01, 0x03, 0x23, 0x20],
            ),
            (
                dt(2000, 2, 28, 23, 59, 59),
                [0, 0, 0, 3, 0x29, 0x02, 0x00, 0x20],
            ),
            (
                dt(2100, 2, 28, 23, 59, 59),
                [0, 0, 0, 2, 0x01, 0x03, 0x00, 0x21],
            ),
            (
                dt(2023, 12, 31, 23, 59, 59),
                [0, 0, 0, 2, 0x01, 0x01, 0x24, 0x20],
            ),
            (
                dt(2099, 12, 31, 23, 59, 59),
                [0, 0, 0, 6, 0x01, 0x01, 0x00, 0x21],
            ),
            (
                dt(2024, 4, 30, 23, 59, 59),
                [0, 0, 0, 4, 0x01, 0x05, 0x24, 0x20],
            ),
        ];
        for (before, after) in cases {
            let mut h = H::new(before);
            assert_eq!(h.clock(RTC_HZ - 1)[0], 0x59, "{before:?}");
            assert_eq!(h.clock(RTC_HZ), after, "{before:?}");
            let next = DateTime::from_secs(before.to_secs() + 1);
            assert_eq!(h.rtc.time(h.at(RTC_HZ)), next);
        }
        // A year of seconds later, exactly.
        let mut h = H::new(dt(2023, 3, 1, 0, 0, 0));
        assert_eq!(
            h.clock(366 * 86_400 * RTC_HZ),
            [0, 0, 0, 6, 0x01, 0x03, 0x24, 0x20]
        );
    }

    #[test]
    fn bcd_binary_and_12_hour_encodings() {
        // (B, time, sec, min, hour, day, month, year)
        let cases: [(u8, DateTime, [u8; 6]); 8] = [
            (
                0x02,
                dt(2024, 7, 4, 13, 5, 9),
                [0x09, 0x05, 0x13, 0x04, 0x07, 0x24],
            ),
            (0x06, dt(2024, 7, 4, 13, 5, 9), [9, 5, 13, 4, 7, 24]),
            (
                0x00,
                dt(2024, 7, 4, 13, 5, 9),
                [0x09, 0x05, 0x81, 0x04, 0x07, 0x24],
            ),
            (0x04, dt(2024, 7, 4, 23, 5, 9), [9, 5, 0x80 | 11, 4, 7, 24]),
            (
                0x00,
                dt(2024, 7, 4, 0, 0, 0),
                [0, 0, 0x12, 0x04, 0x07, 0x24],
            ),
            (
                0x00,
                dt(2024, 7, 4, 12, 0, 0),
                [0, 0, 0x92, 0x04, 0x07, 0x24],
            ),
            (
                0x00,
                dt(2024, 7, 4, 11, 59, 59),
                [0x59, 0x59, 0x11, 0x04, 0x07, 0x24],
            ),
            (0x06, dt(1999, 12, 31, 0, 0, 0), [0, 0, 0, 31, 12, 99]),
        ];
        for (b, t, want) in cases {
            let mut h = H::new(t);
            h.write(0, 0x0b, b);
            let got = [0, 2, 4, 7, 8, 9].map(|i| h.read(1, i));
            assert_eq!(got, want, "B {b:#x} {t:?}");
        }
        // A 12-hour PM time written with SET reads back as 24-hour after switching.
        let mut h = H::new(dt(2024, 7, 4, 1, 0, 0));
        h.write(0, 0x0b, 0x80); // SET, BCD, 12-hour
        h.write(0, 0x04, 0x80 | 0x07); // 7 PM
        h.write(0, 0x0b, 0x00);
        assert_eq!(h.rtc.time(h.at(0)).hour, 19);
        h.write(0, 0x0b, 0x02);
        assert_eq!(h.read(0, 0x04), 0x19);
    }

    #[test]
    fn uip_is_set_for_244us_before_each_update() {
        let mut h = H::new(dt(2024, 1, 1, 0, 0, 0));
        let uip = |h: &mut H, c| h.read(c, 0x0a) & 0x80 != 0;
        assert!(!uip(&mut h, RTC_HZ - 9));
        assert_eq!(h.read(RTC_HZ - 8, 0), 0x00);
        assert!(uip(&mut h, RTC_HZ - 8));
        assert!(uip(&mut h, RTC_HZ - 1));
        assert_eq!(h.read(RTC_HZ - 1, 0), 0x00, "old time during UIP");
        assert!(!uip(&mut h, RTC_HZ));
        assert_eq!(h.read(RTC_HZ, 0), 0x01);
        // 244 us in guest TSC ticks, from the time base: 8 cycles.
        let window = h.at(RTC_HZ) - h.at(RTC_HZ - 8);
        assert_eq!(h.tb.ticks_to_ns(window) / 1000, 244);
        // With SET, no update is coming: UIP stays clear.
        h.write(RTC_HZ, 0x0b, 0x82);
        assert!(!uip(&mut h, 2 * RTC_HZ - 1));
        // UIP is read-only.
        h.write(3 * RTC_HZ, 0x0a, 0xa6);
        assert_eq!(h.read(3 * RTC_HZ, 0x0a), 0x26);
    }

    #[test]
    fn periodic_1024hz_is_exact_over_10s_and_reading_c_lowers_irq8() {
        let mut h = H::new(dt(2024, 1, 1, 0, 0, 0));
        h.write(0, 0x0b, 0x42); // PIE
        let mut ticks = 0u64;
        let end = h.at(10 * RTC_HZ);
        while let Some(d) = h.rtc.next_deadline().filter(|&d| d <= end) {
            ticks += 1;
            // Tick k is at the exact rational time k/1024 s, rounded up to a TSC tick.
            let exact = ORIGIN + (u128::from(ticks) * u128::from(TSC_HZ)).div_ceil(1024) as u64;
            assert_eq!(d, exact, "tick {ticks}");
            h.rtc.advance(d - 1, &mut h.irq);
            assert!(!h.irq8(), "tick {ticks} not early");
            h.rtc.advance(d, &mut h.irq);
            assert!(h.irq8(), "tick {ticks} asserts IRQ 8");
            assert_eq!(h.rtc.next_deadline(), None, "nothing more until C is read");
            let c = h.read(32 * ticks, 0x0c);
            assert_eq!(c & 0xc0, 0xc0, "IRQF and PF");
            assert!(!h.irq8(), "reading C lowers IRQ 8");
            assert_eq!(h.read(32 * ticks, 0x0c) & 0xc0, 0, "and cleared the flags");
        }
        assert_eq!(ticks, 10 * 1024);
        assert_eq!(h.rtc.coalesced(), 0);
    }

    #[test]
    fn periodic_rates_follow_rs() {
        // (RS, Hz): RS 1 and 2 are 256 and 128 Hz on the MC146818A.
        let rates = [(1, 256), (2, 128), (3, 8192), (6, 1024), (10, 64), (15, 2)];
        for (rs, hz) in rates {
            let mut h = H::new(dt(2024, 1, 1, 0, 0, 0));
            h.write(0, 0x0a, 0x20 | rs);
            h.write(0, 0x0b, 0x42);
            assert_eq!(h.rtc.next_deadline(), Some(h.at(RTC_HZ / hz)), "RS {rs}");
        }
        // RS 0: off; DV other than 010: divider stopped, no periodic interrupt.
        let mut h = H::new(dt(2024, 1, 1, 0, 0, 0));
        h.write(0, 0x0b, 0x42);
        h.write(0, 0x0a, 0x20);
        assert_eq!(h.rtc.next_deadline(), None);
        h.write(0, 0x0a, 0x06);
        assert_eq!(h.rtc.next_deadline(), None);
        h.rtc.advance(h.at(RTC_HZ * 5), &mut h.irq);
        assert_eq!(h.read(RTC_HZ * 5, 0x0c), 0);
    }

    #[test]
    fn update_ended_interrupt_once_a_second() {
        let mut h = H::new(dt(2024, 1, 1, 0, 0, 0));
        h.write(0, 0x0a, 0x20); // no periodic, to see UF alone
        h.write(0, 0x0b, 0x12); // UIE
        for s in 1..=120u64 {
            let d = h.rtc.next_deadline().unwrap();
            assert_eq!(d, h.at(s * RTC_HZ));
            h.rtc.advance(d, &mut h.irq);
            assert!(h.irq8());
            assert_eq!(h.read(s * RTC_HZ, 0x0c), 0x90, "IRQF | UF");
            assert_eq!(
                h.read(s * RTC_HZ, 0x00),
                (((s % 60 / 10) << 4) | (s % 10)) as u8
            );
        }
    }

    #[test]
    fn flags_are_set_without_enables_and_enabling_raises_at_once() {
        let mut h = H::new(dt(2024, 1, 1, 0, 0, 0));
        // Default A: 1024 Hz periodic runs with PIE clear; UF without UIE.
        h.rtc.advance(h.at(RTC_HZ), &mut h.irq);
        assert!(!h.irq8());
        assert_eq!(h.rtc.next_deadline(), None, "nothing enabled, no deadline");
        h.write(RTC_HZ, 0x0b, 0x42);
        assert!(h.irq8(), "PF was set: enabling PIE asserts IRQ 8");
        h.write(RTC_HZ, 0x0b, 0x02);
        assert!(!h.irq8(), "IRQF follows the enables");
        assert_eq!(h.read(RTC_HZ, 0x0c), 0x50, "PF and UF, no IRQF");
        assert_eq!(h.read(RTC_HZ, 0x0d), 0x80);
        h.write(RTC_HZ, 0x0c, 0xff);
        h.write(RTC_HZ, 0x0d, 0x00);
        assert_eq!(h.read(RTC_HZ, 0x0c), 0, "C and D are read-only");
        assert_eq!(h.read(RTC_HZ, 0x0d), 0x80);
    }

    #[test]
    fn missed_periodic_ticks_are_coalesced() {
        let mut h = H::new(dt(2024, 1, 1, 0, 0, 0));
        h.write(0, 0x0b, 0x42);
        h.rtc.advance(h.at(32 * 10), &mut h.irq);
        assert!(h.irq8());
        assert_eq!(h.rtc.coalesced(), 9);
        // Not acknowledged: five more ticks are all merged.
        h.rtc.advance(h.at(32 * 15), &mut h.irq);
        assert_eq!(h.rtc.coalesced(), 14);
        h.read(32 * 15, 0x0c);
        h.rtc.advance(h.at(32 * 16), &mut h.irq);
        assert_eq!(h.rtc.coalesced(), 14);
    }

    #[test]
    fn alarm_matches_exact_and_dont_care_values() {
        let mut h = H::new(dt(2024, 1, 1, 10, 0, 0));
        h.write(0, 0x0a, 0x20);
        h.write(0, 0x01, 0x05);
        h.write(0, 0x03, 0x00);
        h.write(0, 0x05, 0x10);
        h.write(0, 0x0b, 0x22); // AIE
        for s in 1..=4 {
            h.rtc.advance(h.at(s * RTC_HZ), &mut h.irq);
            assert!(!h.irq8(), "no alarm at 10:00:0{s}");
        }
        h.rtc.advance(h.at(5 * RTC_HZ), &mut h.irq);
        assert!(h.irq8(), "alarm at 10:00:05");
        assert_eq!(h.read(5 * RTC_HZ, 0x0c), 0xb0, "IRQF | AF | UF");
        // Don't care hours and minutes: every minute at :30.
        h.write(5 * RTC_HZ, 0x01, 0x30);
        h.write(5 * RTC_HZ, 0x03, 0xc0);
        h.write(5 * RTC_HZ, 0x05, 0xff);
        h.rtc.advance(h.at(29 * RTC_HZ), &mut h.irq);
        assert!(!h.irq8());
        h.read(29 * RTC_HZ, 0x0c);
        h.rtc.advance(h.at(30 * RTC_HZ), &mut h.irq);
        assert!(h.irq8());
        h.read(30 * RTC_HZ, 0x0c);
        // Passed while the VM did not run: the alarm second was among those skipped.
        h.rtc.advance(h.at(95 * RTC_HZ), &mut h.irq);
        assert!(h.irq8());
        assert_eq!(h.read(95 * RTC_HZ, 0x0c) & 0x20, 0x20);
        // A 12-hour alarm byte compares with the PM bit.
        let mut h = H::new(dt(2024, 1, 1, 13, 0, 0));
        h.write(0, 0x0b, 0x00); // BCD, 12-hour
        h.write(0, 0x01, 0x01);
        h.write(0, 0x03, 0x00);
        h.write(0, 0x05, 0x81);
        h.rtc.advance(h.at(RTC_HZ), &mut h.irq);
        assert_eq!(h.read(RTC_HZ, 0x0c) & 0x20, 0x20);
    }

    #[test]
    fn set_freezes_the_clock_and_a_new_time_is_kept() {
        let mut h = H::new(dt(2024, 1, 1, 0, 0, 0));
        h.write(0, 0x0b, 0x12); // UIE
        let half = RTC_HZ / 2;
        h.write(half, 0x0b, 0x92); // SET (and UIE, which SET clears)
        assert_eq!(h.read(half, 0x0b), 0x82, "SET clears UIE");
        assert_eq!(h.rtc.next_deadline(), None);
        assert_eq!(h.read(3 * RTC_HZ, 0x00), 0x00, "frozen while SET");
        // Linux's mc146818_set_time: time bytes in BCD with SET, then SET cleared.
        for (i, v) in [
            (0, 0x05),
            (2, 0x04),
            (4, 0x03),
            (7, 0x02),
            (8, 0x01),
            (9, 0x30),
        ] {
            h.write(3 * RTC_HZ, i, v);
        }
        h.write(3 * RTC_HZ, 0x32, 0x20);
        assert_eq!(h.read(3 * RTC_HZ, 0x07), 0x02, "bytes read back as written");
        h.write(3 * RTC_HZ + 100, 0x0b, 0x02);
        assert_eq!(h.rtc.time(h.at(3 * RTC_HZ + 100)), dt(2030, 1, 2, 3, 4, 5));
        // The divider's phase is kept: the next update is at the next whole second.
        assert_eq!(h.read(4 * RTC_HZ - 1, 0x00), 0x05);
        assert_eq!(h.read(4 * RTC_HZ, 0x00), 0x06);
        assert_eq!(h.read(4 * RTC_HZ, 0x06), 0x04, "2030-01-02 is a Wednesday");
        assert_eq!(h.rtc.time(h.at(4 * RTC_HZ + 86_400 * RTC_HZ)).day, 3);
        // A write while the clock ticks changes that field and the clock goes on.
        h.write(5 * RTC_HZ, 0x02, 0x59);
        assert_eq!(h.rtc.time(h.at(5 * RTC_HZ)), dt(2030, 1, 2, 3, 59, 7));
        // The day of the week is the guest's to set; it then advances daily.
        h.write(5 * RTC_HZ, 0x06, 0x01);
        assert_eq!(h.read(5 * RTC_HZ + 86_400 * RTC_HZ, 0x06), 0x02);
    }

    #[test]
    fn divider_reset_stops_the_clock_and_the_first_update_is_half_a_second_after() {
        let mut h = H::new(dt(2024, 1, 1, 0, 0, 0));
        h.write(0, 0x0b, 0x52); // PIE, UIE
        h.write(RTC_HZ / 4, 0x0a, 0x76); // DV = 111: reset
        assert_eq!(h.rtc.next_deadline(), None);
        assert_eq!(h.read(10 * RTC_HZ, 0x00), 0x00);
        assert_eq!(h.read(10 * RTC_HZ - 4, 0x0a) & 0x80, 0);
        h.read(10 * RTC_HZ, 0x0c);
        let t = 10 * RTC_HZ + 1234;
        h.write(t, 0x0a, 0x20); // running, no periodic
        assert_eq!(h.rtc.next_deadline(), Some(h.at(t + RTC_HZ / 2)));
        assert_eq!(h.read(t + RTC_HZ / 2 - 1, 0x00), 0x00);
        assert_eq!(h.read(t + RTC_HZ / 2, 0x00), 0x01);
    }

    #[test]
    fn cmos_ram_index_and_errors() {
        let mut h = H::new(dt(2024, 1, 1, 0, 0, 0));
        assert_eq!(
            Rtc::new(h.tb, 0, dt(2023, 2, 29, 0, 0, 0)).err(),
            Some(RtcError::InvalidDateTime)
        );
        assert_eq!(
            Rtc::new(h.tb, 0, dt(2024, 1, 1, 24, 0, 0)).err(),
            Some(RtcError::InvalidDateTime)
        );
        // Memory sizes as firmware leaves them, read by the guest through the ports.
        h.rtc.set_cmos(0x30, 0x00).unwrap();
        h.rtc.set_cmos(0x31, 0xfc).unwrap();
        h.rtc.set_cmos(0x34, 0x00).unwrap();
        h.rtc.set_cmos(0x35, 0x3f).unwrap();
        assert_eq!(h.read(0, 0x31), 0xfc);
        assert_eq!(
            h.read(0, 0x35 | 0x80),
            0x3f,
            "bit 7 of the index is not the index"
        );
        assert!(h.rtc.nmi_disabled());
        h.read(0, 0x35);
        assert!(!h.rtc.nmi_disabled());
        h.write(0, 0x7f, 0xa5);
        assert_eq!(h.rtc.cmos(0x7f), Ok(0xa5));
        assert_eq!(
            h.rtc.set_cmos(0x80, 0),
            Err(RtcError::IndexOutOfRange(0x80))
        );
        assert_eq!(h.rtc.set_cmos(0x0b, 0), Err(RtcError::NotRam(0x0b)));
        assert_eq!(h.rtc.set_cmos(0x32, 0), Err(RtcError::NotRam(0x32)));
        assert_eq!(h.rtc.cmos(0x00), Err(RtcError::NotRam(0x00)));
    }

    #[test]
    fn junk_on_every_port_at_every_width_never_panics() {
        let mut h = H::new(dt(9999, 12, 31, 23, 59, 50));
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut now: Tsc = ORIGIN;
        for _ in 0..100_000 {
            let r = rnd();
            now = match r % 64 {
                0 => now.saturating_add(rnd() % (TSC_HZ * 200_000)),
                1 => now.saturating_add(rnd() >> (r % 64)),
                2 => now.saturating_sub(rnd() % TSC_HZ),
                _ => now.saturating_add(rnd() % 100_000),
            };
            let len = [1, 2, 4][(r >> 8) as usize % 3];
            let offset = (r >> 12) as u16 % 4;
            let mut bytes = rnd().to_le_bytes();
            // Mostly the registers that matter.
            if (r >> 16) % 2 == 0 && offset == 0 {
                bytes[0] %= 0x0e;
            }
            let mut ctx = Ctx {
                now,
                irq: &mut h.irq,
            };
            if (r >> 20) % 3 == 0 {
                h.rtc.pio_read(offset, &mut [0; 4][..len], &mut ctx);
            } else {
                h.rtc.pio_write(offset, &bytes[..len], &mut ctx);
            }
            h.rtc.advance(now, &mut h.irq);
            let _ = h.rtc.next_deadline();
            let _ = h.rtc.time(now);
        }
        h.rtc.advance(u64::MAX, &mut h.irq);
        let _ = h.rtc.time(u64::MAX);
        let _ = h.rtc.next_deadline();
    }
}
