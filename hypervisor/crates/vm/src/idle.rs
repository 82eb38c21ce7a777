//! The idle-VM detector: classifies a VM as active, idle or dormant from what the scheduler
//! already sees, after Burtsev et al.'s "pageable VMs": an idle VM keeps giving the CPU back
//! before its quantum ends (it blocks in HLT until its next timer tick) and nothing but its
//! timer wakes it.
//!
//! This module owns the classification and the time spent in each state; it must not touch the
//! run loop or the memory engine. The kernel feeds it each run's end ([`IdleDetector::run_ended`]),
//! each event that is not the VM's own timer ([`IdleDetector::event`]: input on its serial
//! port), and the passing of host time ([`IdleDetector::advance`]); it asks back the state and
//! the quantum the VM should get ([`IdleDetector::quantum`]).
//!
//! Host time is cut into intervals of `[idle] interval_us`. An interval is *busy* when a run of
//! the VM ended because its quantum ran out (it was preempted; it did not block in HLT or
//! yield) or it was on the CPU for more than
//! `busy_cpu_percent` of the interval; it is *quiet* when neither holds and no event came. The
//! states (docs/platform.md, "Idle VMs"):
//! - active -> idle after `idle_after` quiet intervals in a row;
//! - idle -> dormant after `dormant_after` more;
//! - idle or dormant -> active at once on an event or when it runs its (shrunk) quantum to the
//!   end, else at the end of a busy interval.
//!
//! The asymmetry is the hysteresis: it takes several quiet intervals to be called idle and one
//! busy one (or one keystroke) to be active again, so a VM that works in bursts is never
//! starved of its quantum by a misclassification for longer than one interval.
//!
//! Input alone does not erase a VM's history: the quiet intervals before an event are banked,
//! and once `idle_after` quiet intervals follow it (the VM answered and went back to sleep) the
//! streak counts them again, so a dormant VM that answers a ping is dormant again 0.3 s later
//! (at the defaults) instead of after another `idle_after + dormant_after` intervals. Work
//! erases it: a busy interval, or a run to the end of its quantum, empties the bank.

use hv_manifest::IdleConfig;

use crate::sched::us_to_tsc;

/// Where the detector puts a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum IdleState {
    Active = 0,
    Idle = 1,
    Dormant = 2,
}

impl IdleState {
    pub const ALL: [Self; 3] = [Self::Active, Self::Idle, Self::Dormant];

    pub fn name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Idle => "idle",
            Self::Dormant => "dormant",
        }
    }
}

/// How a run of the VM ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// It blocked in HLT, yielded or stopped: it gave the CPU back.
    GaveBack,
    /// It still wanted the CPU when another VM's timer or its console backlog took it. Says
    /// nothing either way: sleepers whose ticks fall together cut each other short.
    CutShort,
    /// It ran until its quantum was over.
    QuantumOver,
}

/// Why the state changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// This many quiet intervals in a row.
    Quiet(u64),
    /// In the last interval it was preempted: it wanted more CPU than it got.
    Preempted,
    /// The last interval had this many thousandths of CPU.
    Cpu(u64),
    /// Input arrived for it.
    Event,
    /// This many quiet intervals since the input that last woke it, and this many before it.
    QuietAgain(u64, u64),
}

impl core::fmt::Display for Why {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Quiet(n) => write!(f, "{n} quiet intervals in a row"),
            Self::Preempted => f.write_str("it was preempted"),
            Self::Cpu(permille) => {
                write!(f, "it used {}.{}% of the CPU", permille / 10, permille % 10)
            }
            Self::Event => f.write_str("input arrived for it"),
            Self::QuietAgain(after, before) => write!(
                f,
                "{after} quiet intervals in a row since its last input, {before} before it"
            ),
        }
    }
}

/// A change of state, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: IdleState,
    pub to: IdleState,
    pub why: Why,
}

/// The `[idle]` settings in TSC ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdlePolicy {
    pub detect: bool,
    /// The host TSC's rate, to report times in microseconds.
    pub tsc_hz: u64,
    pub interval_tsc: u64,
    pub idle_after: u64,
    pub dormant_after: u64,
    pub busy_permille: u64,
    pub quantum_shrink: u64,
    /// How late a dormant VM's self-armed timers may fire, TSC ticks (0: never late).
    pub timer_slack_tsc: u64,
}

/// The smallest quantum shrinking gives (unless the VM's own quantum is smaller): enough for a
/// timer interrupt's handler, so that an idle VM's wake-up is not cut into pieces.
pub const QUANTUM_FLOOR_US: u64 = 500;

impl IdlePolicy {
    pub fn new(config: &IdleConfig, tsc_hz: u64) -> Self {
        Self {
            detect: config.detect,
            tsc_hz,
            interval_tsc: us_to_tsc(config.interval_us, tsc_hz).max(1),
            idle_after: config.idle_after.max(1),
            dormant_after: config.dormant_after.max(1),
            busy_permille: config.busy_cpu_percent * 10,
            quantum_shrink: config.quantum_shrink.max(1),
            timer_slack_tsc: us_to_tsc(config.timer_slack_us, tsc_hz),
        }
    }
}

impl Default for IdlePolicy {
    /// The manifest's defaults at 1 GHz: what a VM has until the kernel starts detection.
    fn default() -> Self {
        Self::new(&IdleConfig::default(), 1_000_000_000)
    }
}

/// What one interval saw.
#[derive(Clone, Copy, Debug, Default)]
struct Interval {
    start: u64,
    cpu_tsc: u64,
    preempted_runs: u64,
    events: u64,
    /// The VM was asleep at the interval's start, or gave the CPU back during it (halted or
    /// yielded): only then can the interval be quiet. An interval without either (the VM
    /// computed, or waited for the CPU, throughout) and not busy is not judged: beside many
    /// VMs a VM that works may run less than `busy_cpu_percent` of an interval, yet it is not
    /// idle; and a VM that is idle does not stop being so by waiting for its turn.
    gave_back: bool,
}

/// The detector of one VM.
#[derive(Clone, Debug)]
pub struct IdleDetector {
    state: IdleState,
    /// When the current state began (host TSC).
    since: u64,
    /// TSC ticks in each state before the current one began, by [`IdleState`] index.
    closed: [u64; 3],
    /// State changes so far.
    pub changes: u64,
    /// Quiet intervals in a row, up to the last one closed.
    quiet: u64,
    /// Quiet intervals before the events since the last busy one (see the module's doc): they
    /// count again once `idle_after` quiet intervals follow the last event.
    banked: u64,
    current: Interval,
}

impl IdleDetector {
    /// A VM starting at `now`: active.
    pub fn new(now: u64) -> Self {
        Self {
            state: IdleState::Active,
            since: now,
            closed: [0; 3],
            changes: 0,
            quiet: 0,
            banked: 0,
            current: Interval {
                start: now,
                ..Interval::default()
            },
        }
    }

    pub fn state(&self) -> IdleState {
        self.state
    }

    /// A run of `ran` ticks ended at `now`, as `end` says. A VM that runs a whole quantum is
    /// not idle: it is active at once, so that its quantum is whole again for its next run.
    pub fn run_ended(&mut self, ran: u64, end: RunEnd, now: u64) -> Option<Transition> {
        self.current.cpu_tsc = self.current.cpu_tsc.saturating_add(ran);
        self.current.gave_back |= end == RunEnd::GaveBack;
        if end != RunEnd::QuantumOver {
            return None;
        }
        self.current.preempted_runs += 1;
        self.quiet = 0;
        self.banked = 0;
        self.enter(IdleState::Active, Why::Preempted, now)
    }

    /// Something other than the VM's timer wants it at `now` (input on its serial port): it is
    /// active at once.
    pub fn event(&mut self, now: u64) -> Option<Transition> {
        self.current.events += 1;
        self.banked = self.banked.saturating_add(core::mem::take(&mut self.quiet));
        self.enter(IdleState::Active, Why::Event, now)
    }

    /// The VM cannot run for a reason of the hypervisor's (it waits for memory): the interval
    /// in progress starts again at `now`, unjudged, so that the wait makes it neither busy nor
    /// quiet.
    pub fn hold(&mut self, now: u64) {
        self.current = Interval {
            start: now,
            ..Interval::default()
        };
    }

    /// Closes every interval that ended by `now`, and returns the state change this causes.
    /// `asleep`: the VM is halted now (the next interval starts with it asleep).
    pub fn advance(&mut self, now: u64, policy: &IdlePolicy, asleep: bool) -> Option<Transition> {
        if !policy.detect {
            return None;
        }
        let elapsed = now.saturating_sub(self.current.start);
        if elapsed < policy.interval_tsc {
            return None;
        }
        let closed = elapsed / policy.interval_tsc;
        let seen = self.current;
        let end = seen.start + policy.interval_tsc;
        self.current = Interval {
            start: seen.start + closed * policy.interval_tsc,
            gave_back: asleep,
            ..Interval::default()
        };
        let cpu_permille = u128::from(seen.cpu_tsc) * 1000 / u128::from(policy.interval_tsc.max(1));
        let cpu_permille = cpu_permille.min(u128::from(u64::MAX)) as u64;
        // The first interval closed held everything recorded; any further ones (the VM slept
        // through them untouched) were quiet.
        let busy = if seen.preempted_runs > 0 {
            Some(Why::Preempted)
        } else if cpu_permille > policy.busy_permille {
            Some(Why::Cpu(cpu_permille))
        } else {
            None
        };
        if let Some(why) = busy {
            let t = self.enter(IdleState::Active, why, end);
            self.quiet = closed - 1;
            self.banked = 0;
            return t.or_else(|| self.settle(now, policy));
        }
        if !seen.gave_back {
            // Not judged (and neither are the later ones: it did not sleep through them).
            return None;
        }
        self.quiet = if seen.events > 0 {
            closed - 1
        } else {
            self.quiet.saturating_add(closed)
        };
        self.settle(now, policy)
    }

    /// The state the quiet streak calls for: the quiet intervals since the last event, and
    /// those banked before it once there are `idle_after` of the former.
    fn settle(&mut self, now: u64, policy: &IdlePolicy) -> Option<Transition> {
        if self.quiet < policy.idle_after {
            return None;
        }
        let streak = self.quiet.saturating_add(self.banked);
        let to = if streak >= policy.idle_after.saturating_add(policy.dormant_after) {
            IdleState::Dormant
        } else {
            IdleState::Idle
        };
        // Only deeper: an idle VM's streak was reset by whatever made it active.
        if to <= self.state {
            return None;
        }
        let why = if self.banked > 0 {
            Why::QuietAgain(self.quiet, self.banked)
        } else {
            Why::Quiet(self.quiet)
        };
        self.enter(to, why, now)
    }

    fn enter(&mut self, to: IdleState, why: Why, at: u64) -> Option<Transition> {
        let from = self.state;
        if from == to {
            return None;
        }
        let at = at.max(self.since);
        self.closed[from as usize] += at - self.since;
        self.since = at;
        self.state = to;
        self.changes += 1;
        Some(Transition { from, to, why })
    }

    /// TSC ticks spent in `state` up to `now`.
    pub fn time_in(&self, state: IdleState, now: u64) -> u64 {
        let open = if state == self.state {
            now.saturating_sub(self.since)
        } else {
            0
        };
        self.closed[state as usize] + open
    }

    /// The quantum the VM gets now, from its manifest quantum: shrunk by `quantum_shrink` when
    /// idle and by its square when dormant, but not below [`QUANTUM_FLOOR_US`] (or the manifest
    /// quantum if that is smaller). `applies` is false for a VM exempt from the idle policy.
    pub fn quantum_us(&self, quantum_us: u64, policy: &IdlePolicy, applies: bool) -> u64 {
        if !applies || !policy.detect {
            return quantum_us;
        }
        let divisor = match self.state {
            IdleState::Active => 1,
            IdleState::Idle => policy.quantum_shrink,
            IdleState::Dormant => policy.quantum_shrink.saturating_mul(policy.quantum_shrink),
        };
        (quantum_us / divisor).max(QUANTUM_FLOOR_US.min(quantum_us))
    }

    /// When (host TSC) a halted VM whose earliest timer is due at `deadline` is woken for it.
    /// A dormant VM (with `applies`, idle reclaim not opted out) whose timers the guest arms
    /// itself (`periodic` false: see `Platform::periodic_timer_armed`) is woken at the next
    /// multiple of the policy's slack instead: every dormant VM due within the same window
    /// wakes at the same instant, so that a working VM is interrupted once for all of them,
    /// and a VM whose ticks come faster than the slack handles several in one run (its handler
    /// finds the next deadline already passed). A periodic timer is never deferred: its
    /// expiries would merge into one interrupt, and the guest would lose ticks. An idle VM
    /// (quiet for 300 ms at the defaults) keeps its timers exact: a guest that halts between
    /// the ticks it depends on is idle too.
    pub fn timer_wake(
        &self,
        deadline: u64,
        policy: &IdlePolicy,
        applies: bool,
        periodic: bool,
    ) -> u64 {
        let slack = policy.timer_slack_tsc;
        if !applies || !policy.detect || periodic || slack == 0 || self.state != IdleState::Dormant
        {
            return deadline;
        }
        deadline.div_ceil(slack).saturating_mul(slack).max(deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use IdleState::*;
    use RunEnd::*;

    /// 1 tick = 1 us; 100-tick intervals; idle after 3 quiet, dormant after 5 more; busy above
    /// 10%; quantum / 4 when idle.
    fn policy() -> IdlePolicy {
        IdlePolicy::new(
            &IdleConfig {
                detect: true,
                interval_us: 100,
                idle_after: 3,
                dormant_after: 5,
                busy_cpu_percent: 10,
                quantum_shrink: 4,
                timer_slack_us: 50,
            },
            1_000_000,
        )
    }

    /// One step of a trace: at `t`, what happened, then the state expected after it.
    enum Step {
        /// A run of this many ticks, and how it ended.
        Run(u64, RunEnd),
        Event,
        /// Intervals close while the VM is asleep.
        Advance,
        /// Intervals close while the VM is ready to run (computing, or waiting for the CPU).
        AdvanceReady,
    }

    /// A VM started at 0 that halts at once (a VM that never halts is never quiet), then
    /// `steps`.
    fn trace(steps: &[(u64, Step, IdleState)]) -> IdleDetector {
        let p = policy();
        let mut d = asleep_at_start();
        for (i, (t, step, want)) in steps.iter().enumerate() {
            match step {
                Step::Run(ran, end) => {
                    d.run_ended(*ran, *end, *t);
                }
                Step::Event => {
                    d.event(*t);
                }
                Step::Advance => {
                    d.advance(*t, &p, true);
                }
                Step::AdvanceReady => {
                    d.advance(*t, &p, false);
                }
            }
            assert_eq!(d.state(), *want, "step {i} at t={t}");
        }
        d
    }

    fn asleep_at_start() -> IdleDetector {
        let mut d = IdleDetector::new(0);
        d.run_ended(0, GaveBack, 0);
        d
    }

    #[test]
    fn an_interval_without_giving_the_cpu_back_is_not_judged() {
        use Step::*;
        // Beside many VMs it gets 1% of each interval and is cut short, never halting: it
        // works, or waits for the CPU. Such intervals change nothing, either way.
        let d = trace(&[
            (300, Advance, Idle), // asleep: idle
            (310, Run(1, CutShort), Idle),
            (399, AdvanceReady, Idle),
            (400, AdvanceReady, Idle), // the interval that began asleep is quiet
            (410, Run(1, CutShort), Idle),
            (700, AdvanceReady, Idle), // three intervals waiting: not judged, still idle
            (710, Run(1, QuantumOver), Active), // it computes: active at once
            (720, Run(1, GaveBack), Active),
            (800, Advance, Active),  // 700-800 was busy (a whole quantum)
            (1099, Advance, Active), // 2 quiet
            (1100, Advance, Idle),   // 3 quiet (800-900, 900-1000, 1000-1100)
        ]);
        assert_eq!(d.changes, 3);
        // A fresh VM has not halted yet: its first intervals are not judged.
        let p = policy();
        let mut fresh = IdleDetector::new(0);
        assert_eq!(fresh.advance(300, &p, false), None);
        assert_eq!(fresh.state(), Active);
        // It halts at 300: three quiet intervals make it idle at 600.
        assert_eq!(fresh.run_ended(1, GaveBack, 300), None);
        assert_eq!(fresh.advance(599, &p, true), None);
        assert_eq!(fresh.advance(600, &p, true).map(|t| t.to), Some(Idle));
    }

    #[test]
    fn quiet_intervals_make_a_vm_idle_then_dormant() {
        use Step::*;
        let d = trace(&[
            (50, Run(5, GaveBack), Active),
            (99, Advance, Active),  // the first interval is not over
            (100, Advance, Active), // 1 quiet (5% of the CPU)
            (150, Run(9, GaveBack), Active),
            (299, Advance, Active), // 2 quiet
            (300, Advance, Idle),   // 3 quiet
        ]);
        assert_eq!(d.changes, 1);
        let d = trace(&[
            (300, Advance, Idle),    // 3 quiet intervals at once: it slept through them
            (799, Advance, Idle),    // 7 quiet
            (800, Advance, Dormant), // 8 quiet = 3 + 5
            (10_000, Advance, Dormant),
        ]);
        assert_eq!(d.changes, 2);
        assert_eq!(d.time_in(Active, 10_000), 300);
        assert_eq!(d.time_in(Idle, 10_000), 500);
        assert_eq!(d.time_in(Dormant, 10_000), 9_200);
    }

    #[test]
    fn preemption_or_much_cpu_makes_it_active_again() {
        use Step::*;
        let d = trace(&[
            (300, Advance, Idle),
            (340, Run(1, CutShort), Idle), // cut short: neither busy nor quiet
            (350, Run(10, QuantumOver), Active), // preempted at its quantum's end: at once
            (400, Advance, Active),
            (699, Advance, Active), // 2 quiet
            (700, Advance, Idle),   // 3 quiet
        ]);
        assert_eq!(d.changes, 3);
        assert_eq!(d.time_in(Active, 700), 300 + 350);
        let d = trace(&[
            (800, Advance, Dormant),
            (850, Run(1, QuantumOver), Active), // a whole quantum: at once
            (900, Advance, Active),
        ]);
        assert_eq!(d.time_in(Dormant, 900), 50);
        let d = trace(&[
            (300, Advance, Idle),
            (320, Run(11, GaveBack), Idle), // 11% of an interval: busy
            (400, Advance, Active),
            (420, Run(10, GaveBack), Active), // 10%: not above the threshold
            (500, Advance, Active),
            (700, Advance, Idle),
        ]);
        assert_eq!(d.changes, 3);
    }

    #[test]
    fn input_makes_it_active_at_once_and_its_quiet_history_counts_again_after_it() {
        use Step::*;
        let p = policy();
        let mut d = asleep_at_start();
        assert!(d.advance(900, &p, true).is_some()); // 9 quiet at once: straight to dormant
        assert_eq!(d.state(), Dormant);
        let t = d.event(950).expect("active at once");
        assert_eq!((t.from, t.to, t.why), (Dormant, Active, Why::Event));
        assert_eq!(d.advance(1000, &p, true), None); // the interval with the event is not quiet
        assert_eq!(d.advance(1299, &p, true), None); // 2 quiet since it

        // Three quiet ones after it, nine before: dormant again, without passing through idle.
        let t = d.advance(1300, &p, true).expect("dormant again");
        assert_eq!(
            (t.from, t.to, t.why),
            (Active, Dormant, Why::QuietAgain(3, 9))
        );
        assert_eq!(
            alloc::string::ToString::to_string(&t.why),
            "3 quiet intervals in a row since its last input, 9 before it"
        );
        assert_eq!(d.changes, 3);
        assert_eq!(d.time_in(Dormant, 1300), 50);
        assert_eq!(d.time_in(Active, 1300), 900 + 350);

        // An idle VM pinged twice keeps its progress towards dormancy: 4 quiet before the first
        // event, 1 between the two, then 3 after the last make 8.
        let d = trace(&[
            (400, Advance, Idle),
            (410, Event, Active),
            (500, Advance, Active),
            (600, Advance, Active), // 1 quiet
            (610, Event, Active),
            (700, Advance, Active),
            (999, Advance, Active),
            (1000, Advance, Dormant),
        ]);
        assert_eq!(d.changes, 3);

        // Work empties the bank: after a busy interval the streak starts from nothing.
        let d = trace(&[
            (900, Advance, Dormant),
            (950, Event, Active),
            (960, Run(20, GaveBack), Active), // it worked: 20% of the interval
            (1000, Advance, Active),
            (1300, Advance, Idle), // three quiet: only idle
            (1799, Advance, Idle),
            (1800, Advance, Dormant), // 8 quiet since the work
        ]);
        assert_eq!(d.changes, 4);
        let d = trace(&[
            (900, Advance, Dormant),
            (950, Event, Active),
            (960, Run(10, QuantumOver), Active),
            (1000, Advance, Active),
            (1300, Advance, Idle),
        ]);
        assert_eq!(d.changes, 3);
        // Waiting for memory is neither busy nor quiet: held intervals are not judged.
        let p = policy();
        let mut d = asleep_at_start();
        for t in (0..1000).step_by(50) {
            d.hold(t);
            assert_eq!(d.advance(t, &p, true), None);
        }
        assert_eq!(d.state(), Active);
        // An event while active changes nothing.
        let mut d = IdleDetector::new(0);
        assert_eq!(d.event(10), None);
        assert_eq!(d.changes, 0);
    }

    #[test]
    fn only_dormant_vms_with_self_armed_timers_wake_late_on_a_shared_grid() {
        let p = policy(); // slack 50 ticks
        let mut d = asleep_at_start();
        // (state reached at, deadline, opted in, periodic timer) -> wake time
        let cases: [(u64, u64, bool, bool, u64); 9] = [
            (0, 1_234, true, false, 1_234),   // active: on time
            (300, 1_234, true, false, 1_234), // idle: on time
            (800, 1_234, true, false, 1_250), // dormant: the next multiple of 50
            (800, 1_250, true, false, 1_250), // already on the grid
            (800, 1_201, true, false, 1_250),
            (800, 1_234, false, false, 1_234), // idle_reclaim = false
            (800, 1_234, true, true, 1_234),   // a periodic timer is never deferred
            (800, u64::MAX - 3, true, false, u64::MAX), // saturates, no overflow
            (800, 0, true, false, 0),
        ];
        for (i, &(at, deadline, applies, periodic, want)) in cases.iter().enumerate() {
            d.advance(at, &p, true);
            assert_eq!(
                d.timer_wake(deadline, &p, applies, periodic),
                want,
                "case {i} in state {:?}",
                d.state()
            );
        }
        // Two dormant VMs due at different times within one window wake together.
        assert_eq!(
            d.timer_wake(1_203, &p, true, false),
            d.timer_wake(1_249, &p, true, false)
        );
        let off = IdlePolicy {
            timer_slack_tsc: 0,
            ..p
        };
        assert_eq!(d.timer_wake(1_234, &off, true, false), 1_234, "slack 0");
    }

    #[test]
    fn shrunk_quanta_have_a_floor_and_an_opt_out() {
        let p = policy();
        let mut d = asleep_at_start();
        assert_eq!(d.quantum_us(10_000, &p, true), 10_000);
        d.advance(300, &p, true);
        assert_eq!(d.state(), Idle);
        assert_eq!(d.quantum_us(10_000, &p, true), 2_500);
        assert_eq!(d.quantum_us(1_000, &p, true), 500, "the floor");
        assert_eq!(d.quantum_us(200, &p, true), 200, "never above the VM's own");
        assert_eq!(
            d.quantum_us(10_000, &p, false),
            10_000,
            "idle_reclaim = false"
        );
        d.advance(800, &p, true);
        assert_eq!(d.state(), Dormant);
        assert_eq!(d.quantum_us(10_000, &p, true), 625);
        let off = IdlePolicy { detect: false, ..p };
        let mut d = IdleDetector::new(0);
        assert_eq!(d.advance(1_000_000, &off, true), None);
        assert_eq!(d.state(), Active);
    }
}
