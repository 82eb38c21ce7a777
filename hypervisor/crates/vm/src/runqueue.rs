//! The scheduler's two queues, so that a scheduling decision costs about the same beside a
//! hundred sleeping VMs as beside one: [`RunQueue`], the VMs ready to run in round-robin order,
//! and [`Sleepers`], the halted VMs by the time their next timer wants them looked at.
//!
//! Both hold VM indices only; what a VM's state is (halted, runnable, boosted) stays with the
//! VM and the kernel's run loop, which pushes and pops as that state changes. Entries a queue
//! holds for a VM whose state changed meanwhile are dropped when met (the run queue asks
//! whether the VM is still ready; the sleepers' heap keeps a generation per VM).

use alloc::collections::{BinaryHeap, VecDeque};
use alloc::vec;
use alloc::vec::Vec;
use core::cmp::Reverse;

/// How much a ready VM should go before the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rank {
    /// Round robin.
    Normal,
    /// Woke from HLT for its timer after giving back most of its last quantum: it answers its
    /// timer before the VMs that compute (`Accounting::deserves_boost`).
    Boosted,
    /// Woke for input: its answer is what a user waits for.
    Urgent,
    /// Waited longer than round robin alone would have made it wait (boosted VMs kept it off
    /// the CPU): it goes first, so that no stream of sleepers can starve it.
    Starving,
}

/// The VMs ready to run, each at most once, in the order they became ready.
#[derive(Clone, Debug, Default)]
pub struct RunQueue {
    queue: VecDeque<usize>,
    queued: Vec<bool>,
}

impl RunQueue {
    /// A queue for VMs `0..n`, empty.
    pub fn new(n: usize) -> Self {
        Self {
            queue: VecDeque::with_capacity(n),
            queued: vec![false; n],
        }
    }

    /// Puts `vm` at the end, unless it is queued already.
    pub fn push(&mut self, vm: usize) {
        if !core::mem::replace(&mut self.queued[vm], true) {
            self.queue.push_back(vm);
        }
    }

    /// VMs queued (some may no longer be ready: they are dropped when met).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Takes out the next VM to run: of the queued VMs still `ready`, the first in queue order
    /// of the highest [`Rank`]. Queued VMs no longer ready are dropped on the way (to be pushed
    /// again when they are). Costs the length of the queue, which holds only ready VMs.
    pub fn pop(
        &mut self,
        ready: impl Fn(usize) -> bool,
        rank: impl Fn(usize) -> Rank,
    ) -> Option<usize> {
        // One pass: the VMs no longer ready are dropped (the others close up behind them) and
        // the rest ranked, until a starving one ends the ranking. After a hundred dormant VMs
        // woke at one instant the queue is long, and this runs at every pick.
        let queue = self.queue.make_contiguous();
        let mut best: Option<(usize, Rank)> = None;
        let mut kept = 0;
        for pos in 0..queue.len() {
            let vm = queue[pos];
            if !ready(vm) {
                self.queued[vm] = false;
                continue;
            }
            queue[kept] = vm;
            if best.is_none_or(|(_, b)| b != Rank::Starving) {
                let r = rank(vm);
                if best.is_none_or(|(_, b)| r > b) {
                    best = Some((kept, r));
                }
            }
            kept += 1;
        }
        self.queue.truncate(kept);
        let vm = self.queue.remove(best?.0)?;
        self.queued[vm] = false;
        Some(vm)
    }
}

/// Halted VMs by when to look at them again (host TSC): a binary heap with one live entry per
/// VM; setting a VM's time again leaves its old entry behind, skipped when it comes up.
#[derive(Clone, Debug, Default)]
pub struct Sleepers {
    heap: BinaryHeap<Reverse<(u64, usize, u64)>>,
    /// Per VM: its wake time (`u64::MAX`: not asleep) and the generation of its live entry.
    at: Vec<u64>,
    generation: Vec<u64>,
}

impl Sleepers {
    /// VMs `0..n`, none asleep.
    pub fn new(n: usize) -> Self {
        Self {
            heap: BinaryHeap::with_capacity(n),
            at: vec![u64::MAX; n],
            generation: vec![0; n],
        }
    }

    /// `vm` is to be looked at from `at` on (`u64::MAX`: it is not asleep, or no timer will
    /// ever wake it: only input, which sets it again).
    pub fn set(&mut self, vm: usize, at: u64) {
        if self.at[vm] == at {
            return;
        }
        self.at[vm] = at;
        self.generation[vm] += 1;
        if at != u64::MAX {
            self.heap.push(Reverse((at, vm, self.generation[vm])));
        }
    }

    /// When `vm` is to be looked at.
    pub fn at(&self, vm: usize) -> u64 {
        self.at[vm]
    }

    fn live(&self, entry: &Reverse<(u64, usize, u64)>) -> bool {
        let (_, vm, generation) = entry.0;
        self.generation[vm] == generation
    }

    /// Takes out every VM due by `now` into `due` (their times become `u64::MAX`).
    pub fn take_due(&mut self, now: u64, due: &mut Vec<usize>) {
        while let Some(&top) = self.heap.peek() {
            let Reverse((at, vm, _)) = top;
            if at > now && self.live(&top) {
                break;
            }
            self.heap.pop();
            if self.live(&top) {
                self.at[vm] = u64::MAX;
                self.generation[vm] += 1;
                due.push(vm);
            }
        }
    }

    /// The earliest time any VM is to be looked at, `u64::MAX` when none is.
    pub fn first(&mut self) -> u64 {
        while let Some(top) = self.heap.peek() {
            if self.live(top) {
                return top.0 .0;
            }
            self.heap.pop();
        }
        u64::MAX
    }

    /// Heap entries, stale ones included (for tests and statistics).
    pub fn entries(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Rank::*;

    #[test]
    fn round_robin_with_ranks_and_stale_entries_dropped() {
        let mut q = RunQueue::new(5);
        for vm in [3, 1, 4, 1] {
            q.push(vm);
        }
        assert_eq!(q.len(), 3, "each VM once");
        let all = |_| true;
        let normal = |_| Normal;
        assert_eq!(q.pop(all, normal), Some(3));
        q.push(3); // it ran and is still ready: last
        assert_eq!(q.pop(all, normal), Some(1));
        assert_eq!(q.pop(all, normal), Some(4));
        assert_eq!(q.pop(all, normal), Some(3));
        assert_eq!(q.pop(all, normal), None);
        // Ranks: starving > urgent > boosted > normal, first in queue order among equals.
        for vm in 0..5 {
            q.push(vm);
        }
        let ranks = [Normal, Boosted, Urgent, Boosted, Urgent];
        assert_eq!(q.pop(all, |v| ranks[v]), Some(2));
        assert_eq!(q.pop(all, |v| ranks[v]), Some(4));
        assert_eq!(q.pop(all, |v| ranks[v]), Some(1));
        q.push(2);
        assert_eq!(
            q.pop(all, |v| if v == 2 { Starving } else { ranks[v] }),
            Some(2)
        );
        // A VM no longer ready is dropped, and can be queued again later.
        assert_eq!(q.pop(|v| v != 0, normal), Some(3));
        assert_eq!(q.len(), 0, "0 was dropped, 3 taken");
        q.push(0);
        assert_eq!(q.pop(all, normal), Some(0));
    }

    #[test]
    fn sleepers_come_out_in_time_order_and_resetting_leaves_no_ghost() {
        let mut s = Sleepers::new(4);
        assert_eq!(s.first(), u64::MAX);
        s.set(0, 300);
        s.set(1, 100);
        s.set(2, 200);
        s.set(3, u64::MAX);
        assert_eq!(s.first(), 100);
        s.set(1, 250); // re-armed later: its 100 entry is stale
        assert_eq!(s.first(), 200);
        let mut due = Vec::new();
        s.take_due(199, &mut due);
        assert!(due.is_empty());
        s.take_due(260, &mut due);
        assert_eq!(due, [2, 1]);
        assert_eq!((s.at(1), s.at(2)), (u64::MAX, u64::MAX));
        assert_eq!(s.first(), 300);
        // Input: look at once, whatever its timer.
        s.set(0, 0);
        due.clear();
        s.take_due(10, &mut due);
        assert_eq!(due, [0]);
        assert_eq!(s.first(), u64::MAX, "the stale 300 entry is gone too");
        assert_eq!(s.entries(), 0);
        // Set, cleared, set to the same time again: one live entry.
        s.set(3, 50);
        s.set(3, u64::MAX);
        s.set(3, 50);
        due.clear();
        s.take_due(100, &mut due);
        assert_eq!(due, [3]);
    }

    /// Against a plain array of wake times: after any sequence of sets and takes, the heap
    /// gives the same VMs due and the same earliest time.
    #[test]
    fn sleepers_match_a_linear_scan() {
        let n = 7;
        let mut s = Sleepers::new(n);
        let mut plain = vec![u64::MAX; n];
        let mut x: u64 = 0x9e37_79b9;
        let mut now = 0;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let vm = (x % n as u64) as usize;
            match x >> 60 {
                0..=9 => {
                    let at = if x >> 59 & 1 == 0 {
                        now + (x >> 20) % 1000
                    } else {
                        u64::MAX
                    };
                    s.set(vm, at);
                    plain[vm] = at;
                }
                _ => {
                    now += (x >> 30) % 300;
                    let mut due = Vec::new();
                    s.take_due(now, &mut due);
                    due.sort_unstable();
                    let want: Vec<usize> = (0..n).filter(|&v| plain[v] <= now).collect();
                    assert_eq!(due, want);
                    for v in want {
                        plain[v] = u64::MAX;
                    }
                }
            }
            assert_eq!(s.first(), plain.iter().copied().min().unwrap());
        }
    }

    /// Against the plainest queue (drop the VMs no longer ready, then take the first of the
    /// highest rank): after any sequence of pushes, readiness and rank changes, and pops, both
    /// give the same VM.
    #[test]
    fn the_run_queue_matches_a_plain_list() {
        let n = 9;
        let mut q = RunQueue::new(n);
        let mut plain: Vec<usize> = Vec::new();
        let mut ready = vec![true; n];
        let mut ranks = vec![Normal; n];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let vm = (x % n as u64) as usize;
            match (x >> 56) % 8 {
                0..=2 => {
                    q.push(vm);
                    if !plain.contains(&vm) {
                        plain.push(vm);
                    }
                }
                3 => ready[vm] = !ready[vm],
                4 => ranks[vm] = [Normal, Boosted, Urgent, Starving][(x >> 40) as usize % 4],
                _ => {
                    plain.retain(|&v| ready[v]);
                    let best =
                        plain
                            .iter()
                            .enumerate()
                            .fold(None::<(usize, Rank)>, |best, (pos, &v)| match best {
                                Some((_, b)) if ranks[v] <= b => best,
                                _ => Some((pos, ranks[v])),
                            });
                    let want = best.map(|(pos, _)| plain.remove(pos));
                    assert_eq!(q.pop(|v| ready[v], |v| ranks[v]), want);
                    assert_eq!(q.len(), plain.len());
                }
            }
        }
    }
}
