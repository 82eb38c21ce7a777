//! The VM's time stamp counter against the host's: time dilation.
//!
//! A VM with a time-dilation factor (TDF) of K perceives one second for every K seconds of
//! host time (Gupta et al., NSDI'06; DieCast, NSDI'08): its TSC, and every device timer that
//! counts in it, runs K times slower. The mapping is the one VMX TSC scaling applies in
//! hardware (SDM Vol. 3C 26.3, "TSC scaling"; 27.6.5):
//!
//! ```text
//! guest_tsc = ((host_tsc * multiplier) >> 48) + offset      (128-bit product, wrapping sum)
//! ```
//!
//! with `multiplier` the 16.48 fixed-point value of 1/K, rounded up. Computing it the same way
//! in software (RDTSC exiting, IA32_TSC reads, the platform's timers) makes both paths agree to
//! the tick: a TSC deadline the guest computes from RDTSC fires at the tick it names, on
//! either path. Every guest time is derived from the absolute host TSC, never by adding
//! increments, so rounding does not accumulate. The multiplier's rounding is the only error: it
//! makes the clock at most K / 2^48 fast (3.6e-12 at K = 1000), so the guest's TSC is exactly
//! floor(host / K) (plus the offset) for the first 2^48 / n host ticks, K = n / d in lowest
//! terms (2^40 ticks and more for K = 1, 3 or 7.5), and at most one tick ahead of it for
//! every 2^48 host ticks after that (about 20 hours at 4 GHz). Rounding up rather than down
//! keeps it from ever reading one tick behind the exact value, where a guest would find its
//! timer interrupt a tick before the deadline it armed.
//!
//! This module owns the arithmetic and nothing else: who programs the VMCS with it (the
//! kernel) and who asks it what time it is (the exit policy, the run loop) live elsewhere.

/// Fixed-point shift of the VMX TSC multiplier: bits 63:48 are the integer part.
pub const MULTIPLIER_SHIFT: u32 = 48;
/// The multiplier of an undilated clock (1.0).
pub const MULTIPLIER_ONE: u64 = 1 << MULTIPLIER_SHIFT;

/// The VMX TSC multiplier for a dilation of `milli` / 1000 (at least 1): the 16.48
/// fixed-point value of 1000 / `milli`, rounded up (so the guest clock is never behind the
/// exact one; see the module's documentation).
pub fn multiplier(milli: u32) -> u64 {
    assert!(milli >= 1000, "a time-dilation factor is at least 1");
    (u128::from(MULTIPLIER_ONE) * 1000).div_ceil(u128::from(milli)) as u64
}

/// One VM's TSC as a function of the host's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestClock {
    /// Dilation in thousandths (1000 = none).
    milli: u32,
    multiplier: u64,
    /// Added (wrapping) to the scaled host TSC: the VMCS TSC offset.
    offset: u64,
    /// The multiplier is 1 and the offset 0 (kept with them: the exit path asks every time).
    identity: bool,
}

impl GuestClock {
    /// The clock of an undilated VM: the host's TSC itself.
    pub const fn host() -> Self {
        Self {
            milli: 1000,
            multiplier: MULTIPLIER_ONE,
            offset: 0,
            identity: true,
        }
    }

    /// A clock dilated by `milli` / 1000 that reads `host_now` at host time `host_now`: a VM
    /// created then starts with the TSC value every other VM sees, and its clock runs slower
    /// from there.
    pub fn dilated(milli: u32, host_now: u64) -> Self {
        let mut clock = Self::host();
        clock.redilate(milli, host_now);
        clock
    }

    /// Changes the dilation at host time `host_now` without a jump: the guest's TSC reads the
    /// same at `host_now` before and after, and runs at the new rate from there (so it stays
    /// monotonic across the change).
    pub fn redilate(&mut self, milli: u32, host_now: u64) {
        let before = self.guest(host_now);
        self.milli = milli;
        self.multiplier = multiplier(milli);
        self.offset = before.wrapping_sub(self.scaled(host_now));
        self.identity = self.multiplier == MULTIPLIER_ONE && self.offset == 0;
    }

    /// The dilation in thousandths.
    pub fn dilation_milli(&self) -> u32 {
        self.milli
    }

    /// Whether the guest's TSC is the host's (no scaling, no offset).
    #[inline]
    pub fn is_host(&self) -> bool {
        self.identity
    }

    /// The VMCS TSC multiplier.
    pub fn multiplier(&self) -> u64 {
        self.multiplier
    }

    /// The VMCS TSC offset.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    #[inline]
    fn scaled(&self, host: u64) -> u64 {
        ((u128::from(host) * u128::from(self.multiplier)) >> MULTIPLIER_SHIFT) as u64
    }

    /// The guest's TSC at host time `host`: what RDTSC returns in the guest then.
    #[inline]
    pub fn guest(&self, host: u64) -> u64 {
        if self.is_host() {
            return host;
        }
        self.scaled(host).wrapping_add(self.offset)
    }

    /// The earliest host time at which the guest's TSC has reached `guest` (`u64::MAX` for a
    /// guest time the host clock never reaches before it wraps, and for `u64::MAX`, which
    /// the platform uses for "never"). Deadlines on the guest's clock become preemption-timer
    /// and wake-up deadlines on the host's with this.
    pub fn host_at(&self, guest: u64) -> u64 {
        if self.is_host() || guest == u64::MAX {
            return guest;
        }
        // The guest clock is the scaled host clock shifted by the offset, a signed amount
        // (negative after a change to a smaller factor): guest times before the shift's origin
        // are already past.
        let scaled = i128::from(guest) - i128::from(self.offset as i64);
        if scaled <= 0 {
            return 0;
        }
        // Smallest h with (h * m) >> 48 >= scaled, i.e. h * m >= scaled << 48.
        let h = ((scaled as u128) << MULTIPLIER_SHIFT).div_ceil(u128::from(self.multiplier));
        u64::try_from(h).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    /// The exact guest time after `ticks` host ticks at `milli` / 1000, rounded down.
    fn exact(ticks: u64, milli: u32) -> u64 {
        (u128::from(ticks) * 1000 / u128::from(milli)) as u64
    }

    #[test]
    fn multipliers_match_hand_computed_values() {
        assert_eq!(multiplier(1000), 0x0001_0000_0000_0000);
        assert_eq!(multiplier(2000), 0x0000_8000_0000_0000);
        assert_eq!(multiplier(4000), 0x0000_4000_0000_0000);
        // 1/3 = 0x0.5555...: rounded up.
        assert_eq!(multiplier(3000), 0x0000_5555_5555_5556);
        // 1/10 = 0x0.1999...
        assert_eq!(multiplier(10_000), 0x0000_1999_9999_999A);
        // 1/2.5 = 0.4 = 0x0.6666...
        assert_eq!(multiplier(2500), 0x0000_6666_6666_6667);
        // 1/7.5 = 0x0.2222...
        assert_eq!(multiplier(7500), 0x0000_2222_2222_2223);
        // 1/1000 = 0x0.004189374BC6A7EF9DB2...
        assert_eq!(multiplier(1_000_000), 0x0000_0041_8937_4BC7);
    }

    #[test]
    fn the_host_clock_is_the_identity() {
        let c = GuestClock::host();
        assert!(c.is_host());
        for t in [0, 1, 1 << 40, u64::MAX - 1, u64::MAX] {
            assert_eq!(c.guest(t), t);
            assert_eq!(c.host_at(t), t);
        }
        // Dilation 1 created later is the identity too.
        let c = GuestClock::dilated(1000, 123_456_789);
        assert!(c.is_host());
    }

    #[test]
    fn exact_over_2_pow_40_host_ticks() {
        // Host ticks spread over 0..=2^40, the multiples of the factor's numerator and their
        // neighbours included (where a floor is most easily off by one).
        let samples = |n: u64| {
            let mut v: Vec<u64> = (0..=64).map(|i| (1u64 << 40) / 64 * i).collect();
            for base in [n, n * 1_000_003, (1u64 << 40) / n * n] {
                v.extend([base - 1, base, base + 1]);
            }
            v.extend((1..=5000).map(|i| i * 219_902_323)); // up to 2^40
            v
        };
        // K = 1, 3, 7.5 (= 15/2): exact at every tick up to 2^40.
        for (milli, numerator) in [(1000, 1), (3000, 3), (7500, 15)] {
            let c = GuestClock::dilated(milli, 0);
            for h in samples(numerator) {
                assert_eq!(c.guest(h), exact(h, milli), "{milli}: host {h}");
            }
        }
        // K = 1000: exact up to 2^48 / 1000 host ticks, then never behind and at most one
        // tick ahead up to 2^40.
        let c = GuestClock::dilated(1_000_000, 0);
        for h in samples(1000) {
            let (got, want) = (c.guest(h), exact(h, 1_000_000));
            if h < (1 << 48) / 1000 {
                assert_eq!(got, want, "host {h}");
            } else {
                assert!(got == want || got == want + 1, "host {h}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn a_clock_created_later_starts_where_the_host_is() {
        let start = 5_000_000_000;
        let c = GuestClock::dilated(10_000, start);
        assert_eq!(c.guest(start), start);
        assert_eq!(c.guest(start + 10_000_000), start + 1_000_000);
        assert!(c.guest(start + 9) == start);
    }

    #[test]
    fn host_at_is_the_first_host_tick_that_reaches_the_guest_time() {
        for milli in [1000, 2500, 3000, 7500, 1_000_000] {
            let c = GuestClock::dilated(milli, 987_654_321);
            for g in [
                987_654_321u64,
                987_654_322,
                1 << 33,
                1 << 40,
                12_345_678_901_234,
            ] {
                let h = c.host_at(g);
                assert!(c.guest(h) >= g, "{milli}: guest({h}) < {g}");
                assert!(
                    h == 0 || c.guest(h - 1) < g,
                    "{milli}: {h} is not the first"
                );
            }
            // Past times are due at once; "never" stays never.
            assert!(c.host_at(0) <= 987_654_321);
            assert_eq!(c.host_at(u64::MAX), u64::MAX);
        }
    }

    #[test]
    fn monotonic_across_dilation_changes() {
        let mut c = GuestClock::dilated(2000, 1_000);
        let mut last = c.guest(1_000);
        let mut host = 1_000u64;
        for (step, milli) in [(7, 3000), (1_000_003, 1000), (99, 1_000_000), (5, 7500)] {
            for _ in 0..1000 {
                host += step;
                let g = c.guest(host);
                assert!(g >= last, "backwards at {host}");
                last = g;
            }
            c.redilate(milli, host);
            assert_eq!(c.guest(host), last, "a change does not jump");
        }
    }
}
