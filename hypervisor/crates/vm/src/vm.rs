//! A VM's policy state: its name and configuration, run state and accounting, console, the
//! devices it sees and what the hypercalls answer. Everything of a VM that is not hardware
//! (the kernel's VT-x state, its EPT and host frames) is here, so [`crate::exits`] can be
//! tested against a fake vCPU.

use alloc::{boxed::Box, format, string::String};
use core::cell::Cell;

use guest_abi::{ExitKind, VmInfo, VM_INFO_MAGIC};
use hv_manifest::VmConfig;

use crate::clock::GuestClock;
use crate::console::ConsoleOutput;
use crate::hypercall::Scratch;
use crate::idle::{IdleDetector, IdlePolicy, IdleState};
use crate::lines::LineBuffer;
use crate::runqueue::Rank;
use crate::sched::{self, Accounting, VmState};
use hv_platform::Platform;

/// Answer delays kept per VM for the percentiles of the stats line.
pub const ANSWERS_KEPT: usize = 4096;

pub struct Vm {
    pub name: String,
    /// `vm NAME`, the log target.
    pub target: String,
    pub id: u32,
    pub config: VmConfig,
    pub state: VmState,
    pub acct: Accounting,
    /// The devices the guest sees (docs/platform.md). Their timers count in the guest's TSC
    /// ([`Self::clock`]).
    pub platform: Platform,
    /// The guest's TSC as a function of the host's (time dilation): the platform's time.
    clock: GuestClock,
    /// What the guest's WRMSRs of IA32_TSC moved its TSC by (wrapping): RDTSC and IA32_TSC read
    /// the clock plus this, and the TSC-deadline timer is armed in that space. The platform's
    /// time does not jump with it, as the PIT, RTC and APIC timer of a CPU do not.
    pub tsc_adjust: u64,
    /// IA32_MISC_ENABLE and the machine-check globals, kept in software.
    pub msrs: crate::msr::EmulatedMsrs,
    /// The platform's last deadline (guest TSC) and when it falls on the host's clock: the
    /// conversion divides in 128 bits, and the run loop asks before every entry.
    deadline_cache: Cell<(u64, u64)>,
    /// The vCPU executed HLT and waits for an interrupt: `Some(if)` with its RFLAGS.IF, which
    /// says whether an external interrupt wakes it (an NMI always does).
    pub halted: Option<bool>,
    /// It woke from HLT and may run before the VMs waiting for the CPU ([`Self::wake_rank`]).
    pub boosted: bool,
    /// Whether it is active, idle or dormant, and the `[idle]` settings it is judged by.
    pub idle: IdleDetector,
    pub idle_policy: IdlePolicy,
    /// Input arrived while it waited in HLT: when that wakes it, it runs next.
    input_pending: bool,
    /// The memory engine had no free frame for a page it touched (the guest physical address):
    /// it does not run until frames free up, and then retries that access.
    pub waiting_for_memory: Option<u64>,
    /// Times it had to wait for memory.
    pub memory_waits: u64,
    /// When (host TSC) input arrived that no console line of the VM has answered yet.
    input_at: Option<u64>,
    /// How long after input arrived the VM's next line came, microseconds (the first
    /// [`ANSWERS_KEPT`]; `answers` counts them all).
    answer_us: alloc::vec::Vec<u32>,
    answers: u64,
    pub(crate) console: LineBuffer,
    /// Console lines waiting for room in the serial output.
    pub(crate) console_out: ConsoleOutput,
    /// What the VmInfo hypercall returns; it never changes, so it is built once.
    pub(crate) info: VmInfo,
    /// Where hypercall arguments are copied out of guest memory. Kept per VM and never zeroed
    /// per call: the hypercall layer only hands out the bytes it has just filled, and zeroing
    /// 4 KiB on every VMCALL once cost more than the rest of the exit path together.
    pub(crate) scratch: Box<Scratch>,
}

/// When a halted VM's timer is due and when the scheduler looks at it for it
/// ([`Vm::sleep_until`]), host TSC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sleep {
    /// Its earliest timer.
    pub deadline: u64,
    /// `deadline`, or later for a dormant VM whose timer the idle policy defers.
    pub wake: u64,
}

impl Vm {
    /// A VM `id` of `config`, with `memory_bytes` of guest memory, before its first entry;
    /// `clock` is its TSC, whose time `platform` was created at.
    pub fn new(
        id: u32,
        config: &VmConfig,
        memory_bytes: u64,
        platform: Platform,
        clock: GuestClock,
    ) -> Self {
        let mut info = VmInfo {
            magic: VM_INFO_MAGIC,
            vm_id: id,
            vcpus: config.vcpus,
            memory_bytes,
            quantum_us: config.weighted_quantum_us(),
            time_dilation_milli: config.time_dilation_milli,
            cpu_share: config.cpu_share,
            ..Default::default()
        };
        let n = config.name.len().min(info.name.len());
        info.name[..n].copy_from_slice(&config.name.as_bytes()[..n]);
        info.name_len = n as u32;
        Self {
            name: config.name.clone(),
            target: format!("vm {}", config.name),
            id,
            config: config.clone(),
            state: VmState::Runnable,
            acct: Accounting::default(),
            platform,
            clock,
            deadline_cache: Cell::new((u64::MAX, u64::MAX)),
            tsc_adjust: 0,
            msrs: Default::default(),
            halted: None,
            boosted: false,
            idle: IdleDetector::new(0),
            idle_policy: IdlePolicy::default(),
            input_pending: false,
            waiting_for_memory: None,
            memory_waits: 0,
            input_at: None,
            answer_us: alloc::vec::Vec::new(),
            answers: 0,
            console: LineBuffer::default(),
            console_out: ConsoleOutput::default(),
            info,
            scratch: Box::new([0; guest_abi::CONSOLE_WRITE_MAX as usize]),
        }
    }

    pub fn sharing_domain(&self) -> u32 {
        self.config.sharing_domain
    }

    /// The VM's quantum: the manifest's `quantum_us` times its `cpu_share`.
    pub fn quantum_us(&self) -> u64 {
        self.config.weighted_quantum_us()
    }

    /// The quantum the scheduler gives it now: [`Self::quantum_us`], shrunk while it is idle or
    /// dormant (unless `idle_reclaim = false`).
    pub fn current_quantum_us(&self) -> u64 {
        self.idle.quantum_us(
            self.quantum_us(),
            &self.idle_policy,
            self.config.idle_reclaim,
        )
    }

    /// Starts the idle detector at `now` (the VMs' start) with `policy`.
    pub fn start_idle_detection(&mut self, policy: IdlePolicy, now: u64) {
        self.idle_policy = policy;
        self.idle = IdleDetector::new(now);
    }

    /// Closes the idle detector's intervals up to `now`, logging a change of state. A VM waiting
    /// for memory is not judged: it is not running by its own choice.
    pub fn idle_tick(&mut self, now: u64) {
        if self.waiting_for_memory.is_some() {
            self.idle.hold(now);
            return;
        }
        if let Some(t) = self
            .idle
            .advance(now, &self.idle_policy, self.halted.is_some())
        {
            self.log_idle(t);
        }
    }

    /// Input arrived for it at `now` (host TSC): active at once, and it runs next once the
    /// input wakes it. Its next console line counts as the answer.
    pub fn input_arrived(&mut self, now: u64) {
        self.input_pending = true;
        self.input_at.get_or_insert(now);
        if let Some(t) = self.idle.event(now) {
            self.log_idle(t);
        }
    }

    fn log_idle(&self, t: crate::idle::Transition) {
        log::info!(target: &self.target, "{} -> {}: {} (quantum now {} us)",
            t.from.name(), t.to.name(), t.why, self.current_quantum_us());
    }

    /// A run of `ran` ticks ended at `now`, as `end` says.
    pub fn run_ended(&mut self, ran: u64, end: crate::idle::RunEnd, now: u64) {
        if let Some(t) = self.idle.run_ended(ran, end, now) {
            self.log_idle(t);
        }
    }

    /// Copies the idle detector's view at `now` into the statistics (the VM-stats hypercall
    /// and the closing stats line show them).
    pub fn update_idle_stats(&mut self, now: u64) {
        let us = |state| sched::tsc_to_us(self.idle.time_in(state, now), self.idle_policy.tsc_hz);
        let s = &mut self.acct.stats;
        s.idle_state = self.idle.state() as u64;
        s.idle_changes = self.idle.changes;
        s.active_us = us(IdleState::Active);
        s.idle_us = us(IdleState::Idle);
        s.dormant_us = us(IdleState::Dormant);
    }

    /// Console bytes of the guest (hypercall or UART), collected into lines.
    pub fn console_bytes(&mut self, bytes: &[u8]) {
        let (name, out) = (&self.name, &mut self.console_out);
        self.console.push(bytes, |line| out.push(name, line));
    }

    /// Moves queued console lines to `try_print` while it takes them (it returns false when
    /// the serial output has no room).
    pub fn send_console(&mut self, mut try_print: impl FnMut(&str) -> bool) {
        while let Some(line) = self.console_out.front() {
            if !try_print(line) {
                break;
            }
            self.console_out.discard_front();
        }
    }

    /// Hands every queued console line to `print` (at the end of the run, which waits for
    /// room), the unfinished line too.
    pub fn drain_console(&mut self, mut print: impl FnMut(&str)) {
        let (name, out) = (&self.name, &mut self.console_out);
        self.console.flush(|line| out.push(name, line));
        while let Some(line) = self.console_out.pop() {
            print(&line);
        }
    }

    /// Whether console lines wait to be sent ([`Vm::send_console`]).
    pub fn has_console_output(&self) -> bool {
        !self.console_out.is_empty()
    }

    /// Whether too much console output waits for the serial line to run the VM now.
    pub fn must_drain(&self) -> bool {
        self.console_out.must_drain()
    }

    /// The VM may be entered: it is runnable, not halted, not waiting for memory, and not
    /// waiting for its console output to drain.
    pub fn may_run(&self) -> bool {
        self.state.is_runnable()
            && self.halted.is_none()
            && self.waiting_for_memory.is_none()
            && !self.console_out.must_drain()
    }

    /// No frame was free for its access to `gpa`: it waits (is paused) until frames free up.
    pub fn wait_for_memory(&mut self, gpa: u64) {
        if self.waiting_for_memory.replace(gpa).is_none() {
            self.memory_waits += 1;
            log::warn!(target: &self.target, "paused: out of host frames for its page at {gpa:#x}; it resumes when frames free up");
        }
    }

    /// Frames are free again (`free` of them): it resumes, retrying the access it stopped at.
    pub fn memory_available(&mut self, free: u64) {
        if let Some(gpa) = self.waiting_for_memory.take() {
            log::info!(target: &self.target, "resumed: {free} host frames free (it waited for its page at {gpa:#x})");
        }
    }

    /// Brings a halted VM's platform up to `now` and wakes it if an interrupt it can take (or
    /// an NMI) waits (SDM Vol. 2, HLT). Returns whether it is awake.
    pub fn wake(&mut self, now: u64) -> bool {
        let Some(interruptible) = self.halted else {
            return true;
        };
        self.platform.advance(self.clock.guest(now));
        let p = &self.platform;
        if p.nmi_waiting() || (interruptible && p.interrupt_waiting()) {
            self.halted = None;
            // Input puts it first; its own timer only if it gave its last quantum back.
            self.boosted = self.input_pending || self.acct.deserves_boost();
        }
        self.halted.is_none()
    }

    /// How much it should go before the other ready VMs: input waits for it (it is what a user
    /// waits for), or it woke from HLT for its timer having given back most of its last
    /// quantum (`Accounting::deserves_boost`), or neither.
    pub fn wake_rank(&self) -> Rank {
        if self.input_pending {
            Rank::Urgent
        } else if self.boosted {
            Rank::Boosted
        } else {
            Rank::Normal
        }
    }

    /// It was picked to run: what made it go first is spent.
    pub fn picked(&mut self) {
        self.boosted = false;
        self.input_pending = false;
    }

    /// When (host TSC) a halted VM's platform next needs time to pass (its earliest timer),
    /// if ever.
    pub fn wake_deadline(&self) -> Option<u64> {
        self.halted?;
        let host = self.platform_deadline();
        (host != u64::MAX).then_some(host)
    }

    /// A halted VM's earliest timer and when (host TSC) the scheduler looks at it again for
    /// that timer: at the timer itself ([`Self::wake_deadline`]), or for a dormant VM whose
    /// timers the guest arms itself, that time rounded up to the idle policy's timer slack
    /// (`IdleDetector::timer_wake`). None if no timer is armed.
    pub fn sleep_until(&self) -> Option<Sleep> {
        let deadline = self.wake_deadline()?;
        let wake = self.idle.timer_wake(
            deadline,
            &self.idle_policy,
            self.config.idle_reclaim,
            self.platform.periodic_timer_armed(),
        );
        Some(Sleep { deadline, wake })
    }

    /// When (host TSC) the running VM must leave the guest for its platform's next timer:
    /// `u64::MAX` when none is armed.
    #[inline]
    pub fn platform_deadline(&self) -> u64 {
        let guest = self.platform.deadline();
        if self.clock.is_host() {
            return guest;
        }
        let (cached, host) = self.deadline_cache.get();
        if cached == guest {
            return host;
        }
        let host = self.clock.host_at(guest);
        self.deadline_cache.set((guest, host));
        host
    }

    /// The guest's TSC as a function of the host's.
    pub fn clock(&self) -> &GuestClock {
        &self.clock
    }

    /// Replaces the guest's clock (the platform's deadlines are then on the new one).
    pub fn set_clock(&mut self, clock: GuestClock) {
        self.clock = clock;
        self.deadline_cache.set((u64::MAX, u64::MAX));
    }

    /// The platform's time at host time `host`: the guest's TSC before any write of it.
    #[inline]
    pub fn guest_tsc(&self, host: u64) -> u64 {
        self.clock.guest(host)
    }

    /// What RDTSC returns in the guest at host time `host`.
    #[inline]
    pub fn tsc_value(&self, host: u64) -> u64 {
        self.clock.guest(host).wrapping_add(self.tsc_adjust)
    }

    /// The VMCS TSC offset that makes the CPU's RDTSC return [`Self::tsc_value`] (with the
    /// clock's multiplier).
    pub fn tsc_offset(&self) -> u64 {
        self.clock.offset().wrapping_add(self.tsc_adjust)
    }

    /// Moves what the guest sent on COM1 into its console lines, at host time `now`; a line
    /// that follows input answers it (the answer's delay is in the stats line).
    pub fn collect_uart_output(&mut self, now: u64) {
        let (name, out, console) = (&self.name, &mut self.console_out, &mut self.console);
        let mut lines = 0;
        self.platform.take_uart_output(|bytes| {
            console.push(bytes, |line| {
                lines += 1;
                out.push(name, line)
            })
        });
        if lines > 0 {
            if let Some(at) = self.input_at.take() {
                let us = sched::tsc_to_us(now.saturating_sub(at), self.idle_policy.tsc_hz);
                // One line per answer, for benchmarks that need every delay (`log=debug`).
                log::debug!(target: &self.target, "input answered in {us} us");
                self.answers += 1;
                if self.answer_us.len() < ANSWERS_KEPT {
                    self.answer_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                }
            }
        }
    }

    /// The answer delays' 50th and 99th percentiles and maximum, microseconds (nearest rank).
    pub fn answer_percentiles(&self) -> (u32, u32, u32) {
        let mut v = self.answer_us.clone();
        v.sort_unstable();
        let at = |p: usize| {
            v.len().checked_sub(1).map_or(0, |last| {
                v[(v.len() * p).div_ceil(100).clamp(1, last + 1) - 1]
            })
        };
        (at(50), at(99), v.last().copied().unwrap_or(0))
    }

    /// Queues the VM's unfinished console line: it stopped, so no newline will end it.
    fn end_console(&mut self) {
        let (name, out) = (&self.name, &mut self.console_out);
        self.console.flush(|line| out.push(name, line));
    }

    /// Stops the VM for good, with a report.
    pub fn fail(&mut self, why: core::fmt::Arguments) {
        self.end_console();
        log::error!(target: &self.target, "stopped: {why}");
        self.state = VmState::Failed;
    }

    /// Whether `port` is one of the 4 ports of the VM's test-exit device (manifest
    /// `debug_exit`).
    #[inline(always)]
    pub fn is_test_exit_port(&self, port: u16) -> bool {
        self.config
            .debug_exit_port
            .is_some_and(|first| port.wrapping_sub(first) < 4)
    }

    /// The guest reset the machine (a reboot): the VM stops, with the cause in the log.
    pub fn reboot(&mut self, cause: hv_platform::reset::ResetCause) {
        self.end_console();
        log::info!(target: &self.target, "rebooted through {}: stopped (VMs are not restarted)", cause.name());
        self.state = VmState::Rebooted;
    }

    /// The guest entered ACPI S5 (soft off): the VM stops.
    pub fn power_off(&mut self) {
        self.end_console();
        log::info!(target: &self.target, "powered off (ACPI S5)");
        self.state = VmState::PoweredOff;
    }

    /// The vCPU halted with interrupts disabled and nothing can raise an NMI: it is stopped,
    /// since it would never run again.
    pub fn halt_for_good(&mut self) {
        self.end_console();
        log::info!(target: &self.target, "halted with interrupts disabled and no NMI source: stopped");
        self.state = VmState::Halted;
    }

    pub fn exit_with(&mut self, code: u64) {
        self.end_console();
        log::info!(target: &self.target, "exited with code {code}");
        self.state = VmState::Exited(code);
    }

    /// The closing `[INFO] stats` line's text at `now` (after [`Self::update_idle_stats`]).
    pub fn stats_line(&self, now: u64, tsc_hz: u64) -> String {
        let s = &self.acct.stats;
        let state = match self.state {
            VmState::Exited(c) => format!("exited({c})"),
            VmState::Failed => String::from("failed"),
            VmState::Rebooted => String::from("rebooted"),
            VmState::PoweredOff => String::from("powered-off"),
            VmState::Halted => String::from("halted"),
            // Waiting in HLT for an interrupt (the run was cut short).
            VmState::Runnable if self.halted.is_some() => String::from("waiting"),
            VmState::Runnable => String::from("runnable"),
        };
        let mut line = format!(
            "vm={} state={} tdf={} cpu_share={} cpu_us={} cpu_permille={} runs={} max_wait_us={} \
             max_overrun_us={} exits={}",
            self.name,
            state,
            self.config.time_dilation_text(),
            self.config.cpu_share,
            s.cpu_us,
            self.acct.cpu_permille(now),
            s.runs,
            sched::tsc_to_us(self.acct.max_wait_tsc, tsc_hz),
            sched::tsc_to_us(self.acct.max_overrun_tsc, tsc_hz),
            self.acct.total_exits()
        );
        line.push_str(&format!(
            " idle_state={} idle_changes={} active_us={} idle_us={} dormant_us={}",
            IdleState::ALL[s.idle_state as usize % 3].name(),
            s.idle_changes,
            s.active_us,
            s.idle_us,
            s.dormant_us
        ));
        let p = &self.platform.stats;
        let (p50, p99, max) = self.answer_percentiles();
        line.push_str(&format!(
            " memory_waits={} input_answers={} input_p50_us={} input_p99_us={} input_max_us={} \
             interrupts={} coalesced_ticks={} unclaimed_pio={} unclaimed_mmio={}",
            self.memory_waits,
            self.answers,
            p50,
            p99,
            max,
            p.interrupts,
            self.platform.coalesced_ticks(),
            p.unclaimed_pio,
            p.unclaimed_mmio
        ));
        for kind in ExitKind::ALL {
            line.push_str(&format!(" {}={}", kind.name(), s.exits[kind as usize]));
        }
        line
    }
}
