//! The memory-pressure policy of overcommitted VMs: whether memory is short, when the VMs paused
//! for want of a host frame resume, and when nothing more can be reclaimed, which of them is
//! stopped so that the others can go on (docs/platform.md, "Memory on demand").
//!
//! It owns only the decisions: the kernel counts the free frames, pauses a VM whose fault found
//! none, runs the memory engine's scan steps, and carries out what [`PressurePolicy::decide`]
//! says. It never touches a VM or a frame itself.

/// Frames that must be free before a VM waiting for memory resumes: enough that it gets
/// somewhere before it needs another (256 KiB).
pub const RESUME_FRAMES: u64 = 64;

/// Scan rounds (the memory engine's full passes) a wait may last, with no VM able to compute,
/// before the policy concludes that nothing more can be reclaimed.
pub const ROUNDS_BEFORE_STOP: u64 = 2;

/// What the kernel must do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing beyond scanning as [`Decision::pressure`] says.
    None,
    /// Every VM waiting for memory resumes (its faulting access is retried).
    ResumeAll,
    /// Stop this waiting VM (the one with the most memory), and free its memory: nothing more
    /// could be reclaimed, and no VM could compute.
    Stop(usize),
}

/// The policy's answer for one scheduling decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Memory is short (free frames below the low watermark, or a VM waits for a frame): the
    /// scanner runs at once and without its CPU budget, and stopped VMs' memory is given back.
    pub pressure: bool,
    pub action: Action,
}

/// The state the policy keeps between decisions.
#[derive(Clone, Copy, Debug, Default)]
pub struct PressurePolicy {
    /// While VMs wait for memory: the engine's round count when the wait began.
    waiting_since_round: Option<u64>,
}

impl PressurePolicy {
    /// Decides, from `free` frames against `low_watermark` frames, the VMs waiting for a frame
    /// (`waiters`, by index; `frames_of` says how many frames one holds, asked only when one
    /// must be stopped), whether any VM can still compute (it may yet free memory by stopping),
    /// and the engine's completed scan `rounds`.
    ///
    /// Waiting VMs resume once [`RESUME_FRAMES`] are free. When none can compute and
    /// [`ROUNDS_BEFORE_STOP`] rounds passed since the wait began with frames still short, the
    /// waiter holding the most frames is stopped (the last of equals).
    pub fn decide(
        &mut self,
        free: u64,
        low_watermark: u64,
        mut waiters: impl Iterator<Item = usize>,
        frames_of: impl Fn(usize) -> u64,
        can_compute: impl FnOnce() -> bool,
        rounds: u64,
    ) -> Decision {
        let low = free < low_watermark;
        let Some(first) = waiters.next() else {
            self.waiting_since_round = None;
            return Decision {
                pressure: low,
                action: Action::None,
            };
        };
        let pressure = |action| Decision {
            pressure: true,
            action,
        };
        if free >= RESUME_FRAMES {
            self.waiting_since_round = None;
            return Decision {
                pressure: low,
                action: Action::ResumeAll,
            };
        }
        let since = *self.waiting_since_round.get_or_insert(rounds);
        if rounds < since.saturating_add(ROUNDS_BEFORE_STOP) || can_compute() {
            return pressure(Action::None);
        }
        self.waiting_since_round = None;
        let victim = core::iter::once(first)
            .chain(waiters)
            .max_by_key(|&j| frames_of(j))
            .unwrap_or(first);
        pressure(Action::Stop(victim))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::{vec, vec::Vec};

    #[test]
    fn calm_low_and_waiting() {
        let mut p = PressurePolicy::default();
        let none = core::iter::empty;
        let frames = |_| 0;
        let calm = p.decide(1000, 256, none(), frames, || true, 0);
        assert_eq!(
            (calm.pressure, calm.action),
            (false, Action::None),
            "plenty free"
        );
        assert!(
            p.decide(100, 256, none(), frames, || true, 0).pressure,
            "below the watermark"
        );
        // A waiter with enough free: everyone resumes.
        let d = p.decide(RESUME_FRAMES, 0, [3].into_iter(), frames, || false, 0);
        assert_eq!(d.action, Action::ResumeAll);
        assert!(!d.pressure, "above the watermark once they resume");
        // Short: wait while someone computes, however many rounds pass.
        for rounds in 0..10 {
            let d = p.decide(
                RESUME_FRAMES - 1,
                0,
                [3].into_iter(),
                frames,
                || true,
                rounds,
            );
            assert_eq!(d.action, Action::None);
        }
    }

    #[test]
    fn the_largest_waiter_is_stopped_after_two_fruitless_rounds_with_nobody_computing() {
        let mut p = PressurePolicy::default();
        let waiters = || [0, 1, 2].into_iter();
        let frames = |j: usize| [500, 900, 300][j];
        assert_eq!(
            p.decide(0, 0, waiters(), frames, || false, 7).action,
            Action::None
        );
        assert_eq!(
            p.decide(0, 0, waiters(), frames, || false, 8).action,
            Action::None
        );
        assert_eq!(
            p.decide(0, 0, waiters(), frames, || false, 9).action,
            Action::Stop(1)
        );
        // The next wait counts its rounds afresh.
        assert_eq!(
            p.decide(0, 0, waiters(), frames, || false, 9).action,
            Action::None
        );
        // A resume in between restarts the count too.
        assert_eq!(
            p.decide(RESUME_FRAMES, 0, waiters(), frames, || false, 10)
                .action,
            Action::ResumeAll
        );
        assert_eq!(
            p.decide(0, 0, waiters(), frames, || false, 11).action,
            Action::None
        );
        assert_eq!(
            p.decide(0, 0, waiters(), frames, || false, 12).action,
            Action::None
        );
        assert!(matches!(
            p.decide(0, 0, waiters(), frames, || false, 13).action,
            Action::Stop(_)
        ));
    }

    /// A VM of the simulation: pages it still has to touch, frames it holds.
    struct SimVm {
        left: u64,
        held: u64,
        waiting: bool,
        /// Times it was paused for a frame.
        waits: u64,
        stopped: bool,
        done: bool,
    }

    /// Overcommitted VMs touch their pages in turns against a fake frame source: a pool that
    /// runs dry, and a "scanner" that takes back a fraction of what the VMs hold each round
    /// until it has nothing more to take (as sharing and compression would, up to a point).
    /// Every VM either finishes or, when the pool is dry and nothing can be reclaimed, the
    /// largest is stopped and its frames go back; no frame is created or lost on the way.
    fn simulate(
        pool: u64,
        low_watermark: u64,
        vm_pages: &[u64],
        reclaimable_per_vm: u64,
    ) -> (Vec<SimVm>, u64) {
        let mut vms: Vec<SimVm> = vm_pages
            .iter()
            .map(|&left| SimVm {
                left,
                held: 0,
                waiting: false,
                waits: 0,
                stopped: false,
                done: false,
            })
            .collect();
        let mut free = pool;
        let mut reclaimed = vec![0u64; vms.len()];
        let mut p = PressurePolicy::default();
        let mut rounds = 0;
        for _step in 0..100_000 {
            let waiters: Vec<usize> = (0..vms.len())
                .filter(|&i| vms[i].waiting && !vms[i].stopped)
                .collect();
            let can_compute = vms.iter().any(|v| !v.waiting && !v.stopped && !v.done);
            let held = |j: usize| vms[j].held;
            let d = p.decide(
                free,
                low_watermark,
                waiters.into_iter(),
                held,
                || can_compute,
                rounds,
            );
            match d.action {
                Action::ResumeAll => vms.iter_mut().for_each(|v| v.waiting = false),
                Action::Stop(i) => {
                    assert!(vms[i].waiting, "only a waiting VM is stopped");
                    vms[i].stopped = true;
                    free += vms[i].held;
                    vms[i].held = 0;
                }
                Action::None => {}
            }
            if d.pressure {
                // A scan round: each VM gives back what can still be reclaimed of it.
                rounds += 1;
                for (i, v) in vms.iter_mut().enumerate() {
                    let take = (v.held / 4).min(reclaimable_per_vm - reclaimed[i]);
                    reclaimed[i] += take;
                    v.held -= take;
                    free += take;
                }
            }
            // Every VM that can run touches up to 8 pages.
            for v in vms
                .iter_mut()
                .filter(|v| !v.waiting && !v.stopped && !v.done)
            {
                for _ in 0..8.min(v.left) {
                    if free == 0 {
                        v.waiting = true;
                        v.waits += 1;
                        break;
                    }
                    free -= 1;
                    v.held += 1;
                    v.left -= 1;
                }
                v.done = v.left == 0;
            }
            if vms.iter().all(|v| v.done || v.stopped) {
                let held: u64 = vms.iter().map(|v| v.held).sum();
                assert_eq!(held + free, pool, "no frame created or lost");
                return (vms, free);
            }
        }
        panic!("the simulation did not end: a VM waits forever");
    }

    #[test]
    fn overcommitted_vms_finish_when_reclaim_keeps_up() {
        // 3 x 350 pages on 600 frames; 200 of each VM's pages can be taken back.
        // Reclaim only when a VM waits (no watermark): VMs pause and resume.
        let (vms, _) = simulate(600, 0, &[350, 350, 350], 200);
        assert!(vms.iter().all(|v| v.done && !v.stopped));
        assert!(
            vms.iter().map(|v| v.waits).sum::<u64>() > 0,
            "the pool ran dry: VMs were paused and resumed"
        );
        // Reclaiming below a watermark keeps frames free ahead of the VMs: nobody waits.
        let (vms, free) = simulate(600, 64, &[300, 300, 300], 200);
        assert!(vms.iter().all(|v| v.done && !v.stopped && v.waits == 0));
        assert!(free > 0);
    }

    #[test]
    fn when_the_source_runs_dry_the_largest_waiter_stops_and_the_others_finish() {
        // 3 x 400 pages on 600 frames, nothing to reclaim: one VM must go.
        let (vms, _) = simulate(600, 16, &[400, 400, 400], 0);
        let stopped = vms.iter().filter(|v| v.stopped).count();
        assert!(stopped >= 1);
        assert!(
            vms.iter().filter(|v| v.done).count() >= 1,
            "the others go on"
        );
        // A little reclaimable memory is not enough for all three either; still no deadlock.
        let (vms, _) = simulate(600, 16, &[400, 400, 400], 20);
        assert!(vms.iter().all(|v| v.done || v.stopped));
        assert!(vms.iter().any(|v| v.stopped));
    }
}
