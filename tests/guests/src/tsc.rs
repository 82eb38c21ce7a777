//! Time from the TSC: its rate from the hypervisor's CPUID leaf 0x4000_0010 (EAX = guest TSC
//! frequency in kHz, EBX = local APIC bus frequency in kHz, as VMware and KVM define the leaf),
//! and exact integer conversions between ticks, microseconds and rates.

use crate::cmdline::Cmdline;
use crate::cpu;

/// The hypervisor's timing leaf.
pub const TIMING_LEAF: u32 = 0x4000_0010;

/// The TSC's rate, kHz, from CPUID leaf 0x4000_0010, if the hypervisor offers the leaf
/// (CPUID.1:ECX bit 31, then leaf 0x4000_0000's maximum).
pub fn khz_from_cpuid() -> Option<u64> {
    if cpu::cpuid(1, 0).ecx & (1 << 31) == 0 || cpu::cpuid(0x4000_0000, 0).eax < TIMING_LEAF {
        return None;
    }
    match cpu::cpuid(TIMING_LEAF, 0).eax {
        0 => None,
        khz => Some(u64::from(khz)),
    }
}

/// The local APIC timer's input clock, kHz, from the same leaf (EBX).
pub fn apic_bus_khz_from_cpuid() -> Option<u64> {
    if cpu::cpuid(0x4000_0000, 0).eax < TIMING_LEAF {
        return None;
    }
    match cpu::cpuid(TIMING_LEAF, 0).ebx {
        0 => None,
        khz => Some(u64::from(khz)),
    }
}

/// The local APIC timer's input clock in Hz: CPUID leaf 0x4000_0010 EBX, or 1 GHz (KVM's rate,
/// muxvisor's where the TSC is not slower) without the leaf.
pub fn apic_bus_hz() -> u64 {
    apic_bus_khz_from_cpuid().map_or(1_000_000_000, |khz| khz * 1000)
}

/// `us` microseconds in APIC timer counts at divide by 1 ([`apic_bus_hz`]), saturating.
pub fn apic_counts_for_us(us: u64) -> u32 {
    u32::try_from(u128::from(us) * u128::from(apic_bus_hz()) / 1_000_000).unwrap_or(u32::MAX)
}

/// The guest's clock: `tsc_khz=` from the command line if given, else CPUID leaf 0x4000_0010.
pub fn clock(cmdline: &Cmdline<'_>) -> Result<Clock, &'static str> {
    let khz = match cmdline.u64("tsc_khz") {
        Ok(Some(khz)) => khz,
        Ok(None) => khz_from_cpuid().ok_or("no CPUID leaf 0x40000010 and no tsc_khz=")?,
        Err(_) => return Err("tsc_khz= is not a number"),
    };
    if khz == 0 {
        return Err("tsc_khz= must not be 0");
    }
    Ok(Clock { khz })
}

/// Conversions at a TSC rate of `khz` kHz.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    pub khz: u64,
}

impl Clock {
    pub const fn us_to_ticks(self, us: u64) -> u64 {
        us * self.khz / 1000
    }

    pub const fn ms_to_ticks(self, ms: u64) -> u64 {
        ms * self.khz
    }

    pub const fn ticks_to_us(self, ticks: u64) -> u64 {
        ((ticks as u128 * 1000) / self.khz as u128) as u64
    }

    /// Events per second, in thousandths of a hertz: `events` spread over `ticks`.
    pub const fn rate_millihz(self, events: u64, ticks: u64) -> u64 {
        if ticks == 0 {
            return 0;
        }
        ((events as u128 * self.khz as u128 * 1_000_000) / ticks as u128) as u64
    }

    /// Spins until the TSC reaches `tsc`.
    pub fn wait_until(self, tsc: u64) {
        while cpu::rdtsc() < tsc {
            core::hint::spin_loop();
        }
    }

    /// Spins for `us` microseconds.
    pub fn spin_us(self, us: u64) {
        self.wait_until(cpu::rdtsc() + self.us_to_ticks(us));
    }
}

/// Whether `measured` is within `tolerance_ppm` parts per million of `expected`.
pub const fn within_ppm(measured: u64, expected: u64, tolerance_ppm: u64) -> bool {
    let diff = measured.abs_diff(expected) as u128;
    diff * 1_000_000 <= expected as u128 * tolerance_ppm as u128
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        let c = Clock { khz: 4000 };
        assert_eq!(c.us_to_ticks(10_000), 40_000);
        assert_eq!(c.ms_to_ticks(200), 800_000);
        assert_eq!(c.ticks_to_us(4_000), 1_000);
        // 200 events over 0.2 s: 1 kHz.
        assert_eq!(c.rate_millihz(200, 800_000), 1_000_000);
        assert_eq!(c.rate_millihz(1, 0), 0);
        let fast = Clock { khz: 3_000_000 };
        assert_eq!(fast.ticks_to_us(u64::MAX / 2), 3_074_457_345_618_258);
    }

    #[test]
    fn tolerances() {
        assert!(within_ppm(1_005_000, 1_000_000, 5000));
        assert!(!within_ppm(1_005_001, 1_000_000, 5000));
        assert!(within_ppm(995_000, 1_000_000, 5000));
        assert!(!within_ppm(994_999, 1_000_000, 5000));
    }
}
