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

/// The VMs ready to run: a FIFO per [`Rank`] below `Starving`, each VM queued at most once
/// (a VM whose rank rises while it waits is queued again at the higher rank; its older entry is
/// skipped when met). Every operation costs O(1) amortized, whatever the number of VMs.
#[derive(Clone, Debug, Default)]
pub struct RunQueue {
    /// `Normal`, `Boosted`, `Urgent`: (VM, the push that queued it).
    fifo: [VecDeque<(usize, u64)>; 3],
    /// Per VM: whether it is queued, at which rank, by which push (an entry of an earlier
    /// push is stale).
    queued: Vec<Option<(Rank, u64)>>,
    count: usize,
    pushes: u64,
}

impl RunQueue {
    /// A queue for VMs `0..n`, empty.
    pub fn new(n: usize) -> Self {
        Self {
            fifo: Default::default(),
            queued: vec![None; n],
            count: 0,
            pushes: 0,
        }
    }

    /// Queues `vm` at `rank` (`Starving` counts as `Urgent`: starvation is judged at
    /// [`Self::pop`]), unless it is queued at that rank or higher already.
    pub fn push(&mut self, vm: usize, rank: Rank) {
        let rank = rank.min(Rank::Urgent);
        match self.queued[vm] {
            Some((r, _)) if r >= rank => return,
            Some(_) => {}
            None => self.count += 1,
        }
        self.pushes += 1;
        self.queued[vm] = Some((rank, self.pushes));
        self.fifo[rank as usize].push_back((vm, self.pushes));
    }

    /// VMs queued (some may no longer be ready: they are dropped when met).
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The first live entry of `fifo[r]`: entries of VMs taken meanwhile (through another
    /// rank), queued again at a higher rank, or no longer `ready` are dropped.
    fn head(&mut self, r: usize, ready: &impl Fn(usize) -> bool) -> Option<usize> {
        while let Some(&(vm, push)) = self.fifo[r].front() {
            match self.queued[vm] {
                Some((_, p)) if p == push => {
                    if ready(vm) {
                        return Some(vm);
                    }
                    self.queued[vm] = None;
                    self.count -= 1;
                }
                _ => {}
            }
            self.fifo[r].pop_front();
        }
        None
    }

    /// Takes out the next VM to run: the VM at the head of the round-robin (`Normal`) queue if
    /// it is `starving` (it has waited longer than a whole round: no stream of sleepers may
    /// keep it off the CPU); else the first `Urgent` one, else the first `Boosted` one, else
    /// the head of the round robin. VMs no longer `ready` are dropped on the way, to be pushed
    /// again when they are.
    pub fn pop(
        &mut self,
        ready: impl Fn(usize) -> bool,
        starving: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let (normal, urgent, boosted) = (
            Rank::Normal as usize,
            Rank::Urgent as usize,
            Rank::Boosted as usize,
        );
        let head = self.head(normal, &ready);
        let r = match head {
            Some(vm) if starving(vm) => normal,
            _ if self.head(urgent, &ready).is_some() => urgent,
            _ if self.head(boosted, &ready).is_some() => boosted,
            Some(_) => normal,
            None => return None,
        };
        // The VM taken is the head of its FIFO.
        let (vm, _) = self.fifo[r].pop_front()?;
        self.queued[vm] = None;
        self.count -= 1;
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
            q.push(vm, Normal);
        }
        assert_eq!(q.len(), 3, "each VM once");
        let all = |_| true;
        let never = |_| false;
        assert_eq!(q.pop(all, never), Some(3));
        q.push(3, Normal); // it ran and is still ready: last
        assert_eq!(q.pop(all, never), Some(1));
        assert_eq!(q.pop(all, never), Some(4));
        assert_eq!(q.pop(all, never), Some(3));
        assert_eq!(q.pop(all, never), None);
        assert!(q.is_empty());
        // Ranks: urgent > boosted > normal, first queued among equals.
        let ranks = [Normal, Boosted, Urgent, Boosted, Urgent];
        for (vm, &rank) in ranks.iter().enumerate() {
            q.push(vm, rank);
        }
        assert_eq!(q.pop(all, never), Some(2));
        assert_eq!(q.pop(all, never), Some(4));
        assert_eq!(q.pop(all, never), Some(1));
        // The round robin's head goes first when it starves.
        q.push(2, Urgent);
        assert_eq!(q.pop(all, |v| v == 0), Some(0));
        assert_eq!(q.pop(all, never), Some(2));
        assert_eq!(q.pop(all, never), Some(3));
        assert!(q.is_empty());
        // A VM no longer ready is dropped, and can be queued again later.
        q.push(0, Normal);
        q.push(3, Normal);
        assert_eq!(q.pop(|v| v != 0, never), Some(3));
        assert_eq!(q.len(), 0, "0 was dropped, 3 taken");
        q.push(0, Normal);
        assert_eq!(q.pop(all, never), Some(0));
        // Input while it waits: queued again higher, taken once.
        q.push(1, Normal);
        q.push(4, Normal);
        q.push(4, Urgent);
        q.push(4, Boosted); // lower than it is queued at: nothing
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop(all, never), Some(4));
        assert_eq!(q.pop(all, never), Some(1));
        assert_eq!(q.pop(all, never), None, "4's normal entry is stale");
    }

    /// Against a plain list: the same pick for any sequence of pushes at any rank and of
    /// starvation, and each VM at most once.
    #[test]
    fn the_run_queue_matches_its_definition() {
        let n = 6;
        let mut q = RunQueue::new(n);
        // The reference: (vm, rank, order pushed) of the queued VMs.
        let mut plain: Vec<(usize, Rank, u64)> = Vec::new();
        let mut order = 0u64;
        let mut x: u64 = 0x2545_f491;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let vm = (x % n as u64) as usize;
            if x >> 61 < 5 {
                let rank = [Normal, Boosted, Urgent][(x >> 40) as usize % 3];
                q.push(vm, rank);
                match plain.iter_mut().find(|e| e.0 == vm) {
                    Some(e) if e.1 >= rank => {}
                    Some(e) => *e = (vm, rank, order),
                    None => plain.push((vm, rank, order)),
                }
                order += 1;
            } else {
                // (Readiness is dropped lazily, when met: the test above covers it.)
                let starving = (x >> 30) as usize % (n + 3); // >= n: none starves
                let got = q.pop(|_| true, |v| v == starving);
                let normal_head = plain
                    .iter()
                    .filter(|e| e.1 == Normal)
                    .min_by_key(|e| e.2)
                    .map(|e| e.0);
                let want = match normal_head {
                    Some(h) if h == starving => Some(h),
                    _ => [Urgent, Boosted, Normal].iter().find_map(|&r| {
                        plain
                            .iter()
                            .filter(|e| e.1 == r)
                            .min_by_key(|e| e.2)
                            .map(|e| e.0)
                    }),
                };
                assert_eq!(got, want);
                plain.retain(|e| Some(e.0) != got);
            }
            assert_eq!(q.len(), plain.len());
        }
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
}
