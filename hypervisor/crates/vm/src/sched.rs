//! Round-robin scheduling of single-vCPU VMs on one physical CPU, and per-VM statistics.
//!
//! A VM runs until its quantum (from the manifest) is used up or until it yields (HLT, the
//! yield hypercall). Quanta are measured on the host clock (TSC) from the VM's first entry (what the
//! hypervisor does between picking the VM and entering it is not the VM's), exit handling
//! included: the kernel reloads the VMX-preemption timer from the quantum's deadline before
//! every VM entry and ends the quantum once the deadline has passed, so a VM that causes many or
//! costly exits pays for them out of its own quantum. What one exit overruns the deadline by is
//! taken off the VM's next quantum ([`Accounting::next_quantum`]; at most one quantum of debt is
//! carried), so over time every VM gets its share. A runnable VM therefore waits at most the sum of the other VMs' quanta plus one
//! overrun each (the longest single exit: one console line or one memory-engine fault);
//! [`Accounting::max_wait_tsc`] records the longest wait seen.

use guest_abi::{ExitKind, VmStats};

/// Life cycle of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    Runnable,
    /// Called the exit hypercall with this code.
    Exited(u64),
    /// Stopped by the hypervisor (EPT violation, triple fault, bad state...).
    Failed,
    /// Reset itself (a reboot: the 8042's reset command or the reset control register) and was
    /// stopped there: VMs are not restarted.
    Rebooted,
    /// Turned itself off: entered the ACPI S5 sleep state (`poweroff`).
    PoweredOff,
    /// Halted with interrupts disabled where no NMI can ever come (what `halt`, and `poweroff`
    /// without ACPI, leave a Linux guest in): it would never run again.
    Halted,
}

impl VmState {
    pub fn is_runnable(self) -> bool {
        self == Self::Runnable
    }
}

impl Accounting {
    /// Whether a VM that just woke from HLT may go before the VMs waiting for the CPU: only if
    /// its last run gave back at least half of its quantum. A VM that halts for a moment and then
    /// computes through its quanta is not "waiting for an event" and gets no priority, so no VM
    /// can take the CPU from the others by halting briefly.
    pub fn deserves_boost(&self) -> bool {
        self.last_run_tsc.saturating_mul(2) < self.last_quantum_tsc
    }

    /// Whether the VM has been ready to run, off the CPU, for `ticks` or longer at `now`.
    pub fn waited(&self, now: u64, ticks: u64) -> bool {
        self.ready_since
            .is_some_and(|since| now.saturating_sub(since) >= ticks)
    }
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
#[inline]
pub fn preemption_timer_value(ticks: u64, rate: u32) -> u32 {
    (ticks >> rate).clamp(1, u64::from(u32::MAX)) as u32
}

/// Running statistics of a VM.
#[derive(Clone, Copy, Debug, Default)]
pub struct Accounting {
    pub stats: VmStats,
    /// TSC at schedule-in while on the CPU.
    on_cpu_since: Option<u64>,
    /// TSC at which the VM last became ready to run while off the CPU.
    ready_since: Option<u64>,
    /// The longest time the VM was ready to run but off the CPU, in TSC ticks.
    pub max_wait_tsc: u64,
    /// How far the last run went past its deadline, to be taken off the next quantum.
    overrun_tsc: u64,
    /// The longest any run went past its deadline (the longest exit's handling, or the
    /// hypervisor's own work before the first entry of a quantum), in TSC ticks.
    pub max_overrun_tsc: u64,
    /// How long the last run lasted, and the quantum it had, in TSC ticks.
    pub last_run_tsc: u64,
    pub last_quantum_tsc: u64,
    /// When the VM was first ready to run, and when it stopped.
    started: Option<u64>,
    stopped: Option<u64>,
}

impl Accounting {
    #[inline(always)]
    pub fn count_exit(&mut self, kind: ExitKind) {
        self.stats.exits[kind as usize] += 1;
    }

    /// The VM is ready to run from `now` on (at start, before its first run).
    pub fn ready(&mut self, now: u64) {
        self.ready_since.get_or_insert(now);
        self.started.get_or_insert(now);
    }

    /// The VM stopped for good at `now`.
    pub fn stop(&mut self, now: u64) {
        self.stopped.get_or_insert(now);
    }

    /// Its CPU time in thousandths of its life so far (from its first readiness to its stop, or
    /// to `now`): its share of the CPU.
    pub fn cpu_permille(&self, now: u64) -> u64 {
        let Some(start) = self.started else {
            return 0;
        };
        let life = self.stopped.unwrap_or(now).saturating_sub(start).max(1);
        (u128::from(self.stats.cpu_tsc) * 1000 / u128::from(life)).min(1000) as u64
    }

    pub fn schedule_in(&mut self, now: u64) {
        self.stats.runs += 1;
        self.on_cpu_since = Some(now);
        if let Some(since) = self.ready_since.take() {
            self.max_wait_tsc = self.max_wait_tsc.max(now.saturating_sub(since));
        }
    }

    /// The length of the quantum starting now: `quantum` less the last run's overrun, but at
    /// least a quarter of `quantum` so that a VM always makes progress (a longer overrun is
    /// paid off over several quanta).
    pub fn next_quantum(&mut self, quantum: u64) -> u64 {
        let floor = quantum / 4;
        let paid = self.overrun_tsc.min(quantum - floor);
        self.overrun_tsc -= paid;
        quantum - paid
    }

    /// Ends a run at `now` whose quantum ended at `deadline`; `ready` says whether the VM can
    /// run again (it is then waiting from `now`).
    pub fn schedule_out(&mut self, now: u64, deadline: u64, tsc_hz: u64, ready: bool) {
        if let Some(since) = self.on_cpu_since.take() {
            self.stats.cpu_tsc += now.saturating_sub(since);
            self.stats.cpu_us = tsc_to_us(self.stats.cpu_tsc, tsc_hz);
            // At most one quantum of debt is carried: enough to give back what one long exit
            // took, without starving a VM whose every quantum overruns (a quantum shorter than
            // the hypervisor's own work per quantum).
            let quantum = deadline.saturating_sub(since);
            let overrun = now.saturating_sub(deadline);
            self.last_run_tsc = now.saturating_sub(since);
            self.last_quantum_tsc = quantum;
            self.max_overrun_tsc = self.max_overrun_tsc.max(overrun);
            self.overrun_tsc = (self.overrun_tsc + overrun).min(quantum);
        }
        if ready {
            self.ready_since = Some(now);
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
    fn only_a_sleeper_that_gave_back_most_of_its_quantum_deserves_a_boost() {
        let mut a = Accounting::default();
        a.schedule_in(1000);
        a.schedule_out(1400, 2000, 1_000_000, false);
        assert!(a.deserves_boost(), "halted after 40% of its quantum");
        a.schedule_in(3000);
        a.schedule_out(3600, 4000, 1_000_000, false);
        assert!(!a.deserves_boost(), "ran 60% of its quantum");
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
        a.schedule_out(1100, 2000, 1_000_000, true);
        a.schedule_out(5000, 2000, 1_000_000, true); // not on the CPU: nothing charged
        assert_eq!(a.stats.cpu_tsc, 1000);
        assert_eq!(a.stats.cpu_us, 1000);
        assert_eq!(a.stats.runs, 1);
        assert_eq!(a.total_exits(), 1);
    }

    #[test]
    fn waits_are_measured_from_ready_to_schedule_in() {
        let mut a = Accounting::default();
        a.ready(0);
        a.schedule_in(300);
        assert_eq!(a.max_wait_tsc, 300);
        a.schedule_out(400, 1000, 1, true);
        a.schedule_in(450);
        assert_eq!(a.max_wait_tsc, 300);
        // A VM that is not ready (stopped) accrues no wait.
        a.schedule_out(500, 1000, 1, false);
        a.schedule_in(5000);
        assert_eq!(a.max_wait_tsc, 300);
        a.schedule_out(5100, 6000, 1, true);
        a.schedule_in(6100);
        assert_eq!(a.max_wait_tsc, 1000);
    }

    #[test]
    fn cpu_share_is_cpu_time_over_life() {
        let mut a = Accounting::default();
        assert_eq!(a.cpu_permille(100), 0, "never started");
        a.ready(1000);
        a.schedule_in(1000);
        a.schedule_out(1900, 2000, 1, false);
        assert_eq!(a.cpu_permille(2000), 900);
        a.stop(3000);
        assert_eq!(a.cpu_permille(1_000_000), 450, "its life ended at the stop");
    }

    #[test]
    fn overruns_come_off_later_quanta() {
        let mut a = Accounting::default();
        assert_eq!(a.next_quantum(1000), 1000);
        // The run overran its deadline (1000) by 300.
        a.schedule_in(0);
        a.schedule_out(1300, 1000, 1, true);
        assert_eq!(a.next_quantum(1000), 700);
        assert_eq!(a.next_quantum(1000), 1000);
        assert_eq!(a.max_overrun_tsc, 300);
        // An overrun of 2000 is carried as one quantum (1000), paid off at most 750 a quantum
        // (the floor is a quarter).
        a.schedule_in(0);
        a.schedule_out(3000, 1000, 1, true);
        assert_eq!(a.next_quantum(1000), 250);
        assert_eq!(a.next_quantum(1000), 750);
        assert_eq!(a.next_quantum(1000), 1000);
        // CPU time is still charged in full.
        assert_eq!(a.stats.cpu_tsc, 4300);
    }
}
