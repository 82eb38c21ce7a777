//! Round-robin scheduling of single-vCPU VMs on one physical CPU, and per-VM statistics.
//!
//! A VM runs until its quantum (from the manifest) is used up, measured by the VMX-preemption
//! timer in TSC units, or until it yields (HLT, the yield hypercall). Time is charged from
//! schedule-in to schedule-out, exit handling included, so a VM that causes many exits pays for
//! them.

use guest_abi::{ExitKind, VmStats};

/// Life cycle of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    Runnable,
    /// Called the exit hypercall with this code.
    Exited(u64),
    /// Stopped by the hypervisor (EPT violation, triple fault, bad state...).
    Failed,
}

impl VmState {
    pub fn is_runnable(self) -> bool {
        self == Self::Runnable
    }
}

/// Picks the next runnable VM after `current` in round-robin order, `current` itself last.
pub fn next_runnable(states: &[VmState], current: Option<usize>) -> Option<usize> {
    let n = states.len();
    let start = current.map_or(0, |c| c + 1);
    (0..n)
        .map(|i| (start + i) % n)
        .find(|&i| states[i].is_runnable())
}

/// Converts microseconds to TSC ticks at `tsc_hz`, saturating.
pub fn us_to_tsc(us: u64, tsc_hz: u64) -> u64 {
    (u128::from(us) * u128::from(tsc_hz) / 1_000_000).min(u128::from(u64::MAX)) as u64
}

/// Converts TSC ticks to microseconds at `tsc_hz`.
pub fn tsc_to_us(ticks: u64, tsc_hz: u64) -> u64 {
    (u128::from(ticks) * 1_000_000 / u128::from(tsc_hz.max(1))) as u64
}

/// The preemption-timer value for `ticks` of TSC: the timer counts down once every 2^rate
/// ticks (SDM 26.5.1); at least 1 so that the guest makes progress, at most u32::MAX.
pub fn preemption_timer_value(ticks: u64, rate: u32) -> u32 {
    (ticks >> rate).clamp(1, u64::from(u32::MAX)) as u32
}

/// Running statistics of a VM.
#[derive(Clone, Copy, Debug, Default)]
pub struct Accounting {
    pub stats: VmStats,
    /// TSC at schedule-in while on the CPU.
    on_cpu_since: Option<u64>,
}

impl Accounting {
    #[inline(always)]
    pub fn count_exit(&mut self, kind: ExitKind) {
        self.stats.exits[kind as usize] += 1;
    }

    pub fn schedule_in(&mut self, now: u64) {
        self.stats.runs += 1;
        self.on_cpu_since = Some(now);
    }

    pub fn schedule_out(&mut self, now: u64, tsc_hz: u64) {
        if let Some(since) = self.on_cpu_since.take() {
            self.stats.cpu_tsc += now.saturating_sub(since);
            self.stats.cpu_us = tsc_to_us(self.stats.cpu_tsc, tsc_hz);
        }
    }

    pub fn total_exits(&self) -> u64 {
        self.stats.exits.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_skips_stopped_vms() {
        use VmState::*;
        let s = [Runnable, Exited(0), Runnable, Failed];
        assert_eq!(next_runnable(&s, None), Some(0));
        assert_eq!(next_runnable(&s, Some(0)), Some(2));
        assert_eq!(next_runnable(&s, Some(2)), Some(0));
        assert_eq!(next_runnable(&[Runnable], Some(0)), Some(0));
        assert_eq!(next_runnable(&[Failed, Exited(1)], Some(1)), None);
        assert_eq!(next_runnable(&[], None), None);
    }

    #[test]
    fn time_conversions() {
        assert_eq!(us_to_tsc(10_000, 2_000_000_000), 20_000_000);
        assert_eq!(tsc_to_us(20_000_000, 2_000_000_000), 10_000);
        assert_eq!(us_to_tsc(u64::MAX, u64::MAX), u64::MAX);
        assert_eq!(preemption_timer_value(1000, 5), 31);
        assert_eq!(preemption_timer_value(3, 5), 1);
        assert_eq!(preemption_timer_value(u64::MAX, 0), u32::MAX);
    }

    #[test]
    fn accounting_charges_time_on_cpu() {
        let mut a = Accounting::default();
        a.schedule_in(100);
        a.count_exit(ExitKind::Cpuid);
        a.schedule_out(1100, 1_000_000);
        a.schedule_out(5000, 1_000_000); // not on the CPU: nothing charged
        assert_eq!(a.stats.cpu_tsc, 1000);
        assert_eq!(a.stats.cpu_us, 1000);
        assert_eq!(a.stats.runs, 1);
        assert_eq!(a.total_exits(), 1);
    }
}
