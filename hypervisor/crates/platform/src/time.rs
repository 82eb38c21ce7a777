//! The VM's clock as the device models see it.
//!
//! Every model keeps its state in guest TSC ticks: the caller passes "now" on every access and
//! asks each model for its next deadline. Conversions between ticks and a device's own clock
//! (the PIT's 1.193182 MHz, the RTC's 32.768 kHz, the APIC bus) go through [`Timebase`] in
//! 128-bit integer arithmetic from an absolute origin, never by adding rounded increments, so
//! rounding does not accumulate.

/// A time on the VM's clock, in guest TSC ticks.
pub type Tsc = u64;

/// The guest TSC's frequency and conversions to and from other clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timebase {
    tsc_hz: u64,
}

impl Timebase {
    /// A timebase for a guest TSC of `tsc_hz` (at least 1 MHz).
    pub fn new(tsc_hz: u64) -> Self {
        assert!(
            tsc_hz >= 1_000_000,
            "guest TSC frequency {tsc_hz} Hz is implausible"
        );
        Self { tsc_hz }
    }

    pub fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }

    /// How many whole periods of a `hz` clock fit in `ticks` TSC ticks (rounded down).
    ///
    /// The product is taken in 64 bits when it fits (one hardware division) and in 128 bits
    /// otherwise (a software division, some hundred instructions): the result is the same, and
    /// these conversions run on every device access and timer step.
    #[inline]
    pub fn cycles_in(&self, ticks: u64, hz: u64) -> u64 {
        match ticks.checked_mul(hz) {
            Some(p) => p / self.tsc_hz,
            None => ((u128::from(ticks) * u128::from(hz)) / u128::from(self.tsc_hz)) as u64,
        }
    }

    /// TSC ticks from the origin of a `hz` clock to its `cycles`-th edge (rounded up, so that
    /// the edge has happened at the returned time). Saturates at `u64::MAX`.
    #[inline]
    pub fn ticks_for(&self, cycles: u64, hz: u64) -> u64 {
        if let Some(p) = cycles.checked_mul(self.tsc_hz) {
            return p.div_ceil(hz);
        }
        let t = (u128::from(cycles) * u128::from(self.tsc_hz)).div_ceil(u128::from(hz));
        u64::try_from(t).unwrap_or(u64::MAX)
    }

    /// Nanoseconds in `ticks` (rounded down).
    pub fn ticks_to_ns(&self, ticks: u64) -> u64 {
        self.cycles_in(ticks, 1_000_000_000)
    }

    /// TSC ticks in `ns` nanoseconds (rounded up).
    pub fn ns_to_ticks(&self, ns: u64) -> u64 {
        self.ticks_for(ns, 1_000_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_are_exact_from_the_origin() {
        let tb = Timebase::new(2_400_000_000);
        // The PIT's 1.193182 MHz does not divide the TSC: edges round up, counts round down.
        let hz = 1_193_182;
        for n in [0u64, 1, 2, 11_931, 1_193_182, 10_000_000_000] {
            let t = tb.ticks_for(n, hz);
            assert_eq!(tb.cycles_in(t, hz), n, "edge {n} is reached at its tick");
            if t > 0 {
                assert_eq!(tb.cycles_in(t - 1, hz), n - 1, "and not one tick before");
            }
        }
        assert_eq!(tb.ns_to_ticks(1_000), 2_400);
        assert_eq!(tb.ticks_to_ns(2_399), 999);
        assert_eq!(tb.ticks_for(u64::MAX, 1), u64::MAX);
        // Both sides of the 64-bit fast path agree with the 128-bit arithmetic.
        for (ticks, hz) in [
            (u64::MAX / 1_193_182, 1_193_182),
            (u64::MAX / 1_193_182 + 1, 1_193_182),
            (u64::MAX, 1_000_000_000),
            (12_345_678_901, 32_768),
        ] {
            let want = (u128::from(ticks) * u128::from(hz) / 2_400_000_000) as u64;
            assert_eq!(tb.cycles_in(ticks, hz), want, "{ticks} at {hz} Hz");
            let want = u64::try_from((u128::from(ticks) * 2_400_000_000).div_ceil(u128::from(hz)))
                .unwrap_or(u64::MAX);
            assert_eq!(tb.ticks_for(ticks, hz), want, "{ticks} cycles of {hz} Hz");
        }
    }
}
