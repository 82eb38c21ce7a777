//! The aging clock of a VM: when a page of it counts as cold.
//!
//! A page is cold once it has not been accessed for [`Config::cold_after_us`] of its VM's own
//! time *and* [`Config::cold_after_wall_us`] of host time. The engine learns about accesses only
//! when a scan visit reads (and clears) the page's accessed bit, so it stamps the page with its
//! VM's clock at that visit; at a later visit that finds the bit clear, the page has not been
//! used since the stamp.
//!
//! Per-page metadata has one byte for this, so the clock counts in *ticks*, 1/[`TICKS_PER_COLD`]
//! of the thresholds, and a page keeps the low 8 bits of the tick count. A tick needs both
//! clocks to have advanced by their share of their threshold since the previous tick; time one
//! clock has in excess (host time passing while the VM waits for the CPU, say) is not carried
//! beyond one tick, so it cannot pay for later ticks. Hence more than [`TICKS_PER_COLD`] ticks
//! since the stamp ([`COLD_TICKS`]) means at least the whole threshold on both clocks, whatever
//! the rounding; a page that is in use is never cold.
//!
//! The 8-bit stamps wrap: to keep the difference of any stamp and the clock below 256 while it
//! matters, the clock moves at most [`MAX_TICKS_PER_ROUND`] ticks per scan round (a page is
//! visited once per round, so at most twice that between two visits of a page, and a page found
//! cold stays cold until it is accessed). Time beyond that is dropped: when a round takes longer
//! than 7 thresholds, pages go cold later than the threshold, never earlier.
//!
//! [`Config::cold_after_us`]: crate::Config::cold_after_us
//! [`Config::cold_after_wall_us`]: crate::Config::cold_after_wall_us

/// Ticks per threshold.
pub(crate) const TICKS_PER_COLD: u64 = 16;
/// A page is cold when its VM's clock is at least this many ticks past its stamp.
pub(crate) const COLD_TICKS: u8 = TICKS_PER_COLD as u8 + 1;
/// A page that has not been accessed for at least this many ticks (more than a sixteenth of
/// the thresholds) is *quiet*: a visit that finds it unchanged counts as evidence that its
/// content holds still, even if its VM did not run since the previous visit.
pub(crate) const QUIET_TICKS: u8 = 2;
/// Most ticks a clock moves during one scan round.
pub(crate) const MAX_TICKS_PER_ROUND: u64 = 112;

// Two rounds of ticks plus a page not yet cold stay within one byte's range.
const _: () = assert!(2 * MAX_TICKS_PER_ROUND + COLD_TICKS as u64 <= 256);

/// One VM's aging clock. Times are microseconds; accumulators hold microseconds times
/// [`TICKS_PER_COLD`], so that a tick costs exactly the threshold in those units.
#[derive(Clone, Debug)]
pub(crate) struct AgingClock {
    ticks: u64,
    /// `ticks` when the current scan round began (or when the VM was added).
    round_start: u64,
    /// The VM's own time as last reported, and as of the last tick update.
    own: u64,
    own_seen: u64,
    /// Host time as of the last tick update.
    wall_seen: u64,
    own_acc: u64,
    wall_acc: u64,
}

impl AgingClock {
    /// A clock at tick 0 for a VM whose own time is 0 now, at host time `wall`.
    pub(crate) fn new(wall: u64) -> Self {
        AgingClock {
            ticks: 0,
            round_start: 0,
            own: 0,
            own_seen: 0,
            wall_seen: wall,
            own_acc: 0,
            wall_acc: 0,
        }
    }

    /// The tick count.
    pub(crate) fn ticks(&self) -> u64 {
        self.ticks
    }

    /// Records the VM's own time (ignored if it went backwards).
    pub(crate) fn set_own_time(&mut self, us: u64) {
        self.own = self.own.max(us);
    }

    /// Adds `us` to the VM's own time.
    pub(crate) fn advance_own_time(&mut self, us: u64) {
        self.own = self.own.saturating_add(us);
    }

    /// A scan round begins: the per-round limit starts again from here.
    pub(crate) fn start_round(&mut self) {
        self.round_start = self.ticks;
    }

    /// Moves the clock by the ticks that both the VM's own time and host time `wall` (never
    /// less than at the previous update) pay for, against thresholds `own_after` (at least 1)
    /// and `wall_after` (0: host time does not count).
    pub(crate) fn update(&mut self, wall: u64, own_after: u64, wall_after: u64) {
        let own_after = own_after.max(1);
        let d_own = self.own - self.own_seen;
        self.own_seen = self.own;
        let d_wall = wall.saturating_sub(self.wall_seen);
        self.wall_seen = self.wall_seen.max(wall);
        self.own_acc = self
            .own_acc
            .saturating_add(d_own.saturating_mul(TICKS_PER_COLD));
        self.wall_acc = self
            .wall_acc
            .saturating_add(d_wall.saturating_mul(TICKS_PER_COLD));
        let by_own = self.own_acc / own_after;
        let by_wall = self.wall_acc.checked_div(wall_after).unwrap_or(u64::MAX);
        let room = (self.round_start + MAX_TICKS_PER_ROUND).saturating_sub(self.ticks);
        let k = by_own.min(by_wall).min(room);
        self.ticks += k;
        // Spend what the ticks cost, and keep less than one tick of either clock in reserve.
        self.own_acc = (self.own_acc - k * own_after).min(own_after - 1);
        self.wall_acc = match wall_after {
            0 => 0,
            w => (self.wall_acc - k * w).min(w - 1),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1600; // a threshold: 100 us per tick

    #[test]
    fn a_threshold_on_both_clocks_is_sixteen_ticks() {
        let mut c = AgingClock::new(0);
        c.advance_own_time(T);
        c.update(T, T, T);
        assert_eq!(c.ticks(), 16);
        // Remainders carry over within a tick.
        c.advance_own_time(T / 32);
        c.update(T + T / 32, T, T);
        assert_eq!(c.ticks(), 16);
        c.advance_own_time(T / 32);
        c.update(T + T / 16, T, T);
        assert_eq!(c.ticks(), 17);
    }

    #[test]
    fn host_time_alone_does_not_age_a_vm_that_waits() {
        let mut c = AgingClock::new(0);
        for i in 1..=100 {
            c.update(i * T, T, T);
        }
        assert_eq!(c.ticks(), 0);
        // The host time that passed meanwhile left less than a tick in reserve.
        c.advance_own_time(T);
        c.update(101 * T, T, T);
        assert_eq!(c.ticks(), 16);
        c.advance_own_time(T / 16);
        c.update(101 * T, T, T);
        assert_eq!(c.ticks(), 16, "own time alone does not tick either");
        c.advance_own_time(T / 16);
        c.update(101 * T + T / 16, T, T);
        assert_eq!(c.ticks(), 17);
    }

    #[test]
    fn no_wall_threshold_means_own_time_alone() {
        let mut c = AgingClock::new(0);
        c.advance_own_time(T);
        c.update(0, T, 0);
        assert_eq!(c.ticks(), 16);
    }

    #[test]
    fn a_round_moves_the_clock_by_a_bounded_amount() {
        let mut c = AgingClock::new(0);
        c.advance_own_time(100 * T);
        c.update(100 * T, T, T);
        assert_eq!(c.ticks(), MAX_TICKS_PER_ROUND);
        c.start_round();
        c.update(100 * T, T, T);
        assert_eq!(c.ticks(), MAX_TICKS_PER_ROUND, "the excess was dropped");
        c.advance_own_time(T);
        c.update(101 * T, T, T);
        assert_eq!(c.ticks(), MAX_TICKS_PER_ROUND + 16);
    }

    #[test]
    fn time_never_runs_backwards() {
        let mut c = AgingClock::new(5 * T);
        c.set_own_time(T);
        c.update(6 * T, T, T);
        assert_eq!(c.ticks(), 16);
        c.set_own_time(0);
        c.update(0, T, T);
        c.set_own_time(T);
        c.update(6 * T, T, T);
        assert_eq!(c.ticks(), 16);
    }
}
