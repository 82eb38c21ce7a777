//! Hash indexes keyed by (truncated) content hashes.
//!
//! Keys are XXH3 outputs, already uniformly distributed, so both tables pick a bucket straight
//! from the key by multiply-shift (`key * buckets >> 32`, no second hash), which lets a table
//! have any size rather than a power of two: memory follows the entries, not the next power
//! of two. Values are packed references that are never
//! `u32::MAX`, which marks an empty slot. Both tables store 8 bytes per slot: a 32-bit key
//! (or tag) and a 32-bit value. Every hit is only a hint that the caller confirms (byte for
//! byte, or by encoding a patch), so a 32-bit key that two different contents share costs at
//! most a failed comparison or a missed opportunity, never a wrong result.
//!
//! - [`U32Map`]: exact map, open addressing with linear probing and backward-shift deletion,
//!   grows by half at 80% load and shrinks when mostly empty. Used for the identical-content indexes,
//!   where a lost entry would be a lost share.
//! - [`SimTable`]: lossy 4-way set-associative table, 8 bytes per entry, whose capacity the
//!   caller sets (and grows) to the number of pages that can use it. Used for the similarity
//!   index, whose entries are only hints (every hit is re-checked by encoding a patch): a
//!   collision evicts an entry instead of growing the table, so its memory stays bounded.

use alloc::vec;
use alloc::vec::Vec;

const EMPTY: u32 = u32::MAX;

/// Exact map from a 32-bit key to a 32-bit value (never `u32::MAX`), 8 bytes per slot.
pub struct U32Map {
    slots: Vec<(u32, u32)>,
    len: usize,
}

impl Default for U32Map {
    fn default() -> Self {
        Self::new()
    }
}

impl U32Map {
    /// An empty map (allocates on first insert).
    pub fn new() -> Self {
        U32Map {
            slots: Vec::new(),
            len: 0,
        }
    }

    /// The bucket a key probes first.
    #[inline]
    fn home(&self, key: u32) -> usize {
        ((key as u64 * self.slots.len() as u64) >> 32) as usize
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() {
            0
        } else {
            i + 1
        }
    }

    fn find(&self, key: u32) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mut i = self.home(key);
        loop {
            let (k, v) = self.slots[i];
            if v == EMPTY {
                return None;
            }
            if k == key {
                return Some(i);
            }
            i = self.next(i);
        }
    }

    /// The value stored under `key`.
    pub fn get(&self, key: u32) -> Option<u32> {
        self.find(key).map(|i| self.slots[i].1)
    }

    /// The table size the next insert of a new key grows to, if it grows.
    fn grown_len(&self) -> Option<usize> {
        ((self.len + 1) * 5 > self.slots.len() * 4)
            .then(|| (self.slots.len() + self.slots.len() / 2).max(64))
    }

    /// Heap bytes the next insert of a new key allocates: the new table when it grows (the old
    /// one is freed after the rehash), else 0. For callers that keep a heap budget.
    pub fn growth_bytes(&self) -> usize {
        self.grown_len()
            .map_or(0, |n| n * core::mem::size_of::<(u32, u32)>())
    }

    /// Inserts or replaces.
    pub fn insert(&mut self, key: u32, value: u32) {
        debug_assert_ne!(value, EMPTY);
        if let Some(n) = self.grown_len() {
            self.rebuild(n);
        }
        let mut i = self.home(key);
        loop {
            let (k, v) = self.slots[i];
            if v == EMPTY {
                self.slots[i] = (key, value);
                self.len += 1;
                return;
            }
            if k == key {
                self.slots[i].1 = value;
                return;
            }
            i = self.next(i);
        }
    }

    /// Removes `key` if it maps to `value` (so a stale owner never removes a newer entry).
    pub fn remove_if(&mut self, key: u32, value: u32) -> bool {
        match self.find(key) {
            Some(i) if self.slots[i].1 == value => {
                self.remove_at(i);
                true
            }
            _ => false,
        }
    }

    fn remove_at(&mut self, mut hole: usize) {
        self.slots[hole] = (0, EMPTY);
        self.len -= 1;
        // Backward-shift: pull later entries of the probe run into the hole when their home
        // bucket does not lie cyclically in (hole, j].
        let mut j = hole;
        loop {
            j = self.next(j);
            let (k, v) = self.slots[j];
            if v == EMPTY {
                return;
            }
            let home = self.home(k);
            let between = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !between {
                self.slots[hole] = (k, v);
                self.slots[j] = (0, EMPTY);
                hole = j;
            }
        }
    }

    fn rebuild(&mut self, cap: usize) {
        let old = core::mem::replace(&mut self.slots, vec![(0, EMPTY); cap]);
        self.len = 0;
        for (k, v) in old {
            if v != EMPTY {
                self.insert(k, v);
            }
        }
    }

    /// Shrinks the table when it is mostly empty (after many removals), keeping every entry.
    pub fn compact(&mut self) {
        if self.slots.len() > 64 && self.len * 4 < self.slots.len() {
            self.rebuild((self.len * 2).max(64));
        }
    }

    /// Drops every entry and the table's memory.
    pub fn clear(&mut self) {
        self.slots = Vec::new();
        self.len = 0;
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * core::mem::size_of::<(u32, u32)>()
    }
}

const WAYS: usize = 4;

/// Lossy set-associative map from a 64-bit key to a 32-bit reference, 8 bytes per entry: only
/// the key's high 32 bits are kept (the tag), and the tag picks the set by multiply-shift
/// (`tag * sets >> 32`), so the table can have any number of sets and a resize can re-home
/// every entry. A tag match on a different key (a 2^-32 chance per probe) only returns a
/// wrong hint, which callers tolerate.
pub struct SimTable {
    slots: Vec<(u32, u32)>,
}

impl Default for SimTable {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl SimTable {
    /// A table with room for at least `entries` entries (whole sets of 4; none for 0).
    pub fn with_capacity(entries: usize) -> Self {
        let sets = entries.div_ceil(WAYS);
        SimTable {
            slots: vec![(0, EMPTY); sets * WAYS],
        }
    }

    /// Capacity in entries.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn set_of_tag(&self, tag: u32) -> usize {
        let sets = (self.slots.len() / WAYS) as u64;
        ((tag as u64 * sets) >> 32) as usize * WAYS
    }

    fn tag(key: u64) -> u32 {
        (key >> 32) as u32
    }

    /// The value stored under `key`, if it has not been evicted.
    pub fn get(&self, key: u64) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let tag = Self::tag(key);
        let s = self.set_of_tag(tag);
        self.slots[s..s + WAYS]
            .iter()
            .find(|(t, v)| *v != EMPTY && *t == tag)
            .map(|&(_, v)| v)
    }

    /// Inserts or replaces; may evict another key of the same set. `value` must not be
    /// `u32::MAX`. Does nothing while the table has no capacity.
    pub fn insert(&mut self, key: u64, value: u32) {
        debug_assert_ne!(value, EMPTY);
        if self.slots.is_empty() {
            return;
        }
        self.insert_tagged(Self::tag(key), value);
    }

    fn insert_tagged(&mut self, tag: u32, value: u32) {
        let s = self.set_of_tag(tag);
        let set = &mut self.slots[s..s + WAYS];
        if let Some(slot) = set.iter_mut().find(|(t, v)| *v == EMPTY || *t == tag) {
            *slot = (tag, value);
            return;
        }
        // Evict a way chosen by the tag's low bits (the set comes from its high bits).
        set[tag as usize % WAYS] = (tag, value);
    }

    /// Rebuilds with room for `entries`, keeping what fits.
    pub fn resize(&mut self, entries: usize) {
        let old = core::mem::replace(self, SimTable::with_capacity(entries));
        if self.slots.is_empty() {
            return;
        }
        for (tag, v) in old.slots {
            if v != EMPTY {
                self.insert_tagged(tag, v);
            }
        }
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.slots.capacity() * core::mem::size_of::<(u32, u32)>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_growth_bytes_say_what_the_next_insert_allocates() {
        let mut m = U32Map::new();
        for k in 0..1000u32 {
            let (before, said) = (m.heap_bytes(), m.growth_bytes());
            m.insert(k.wrapping_mul(0x9e37_79b9), k);
            let grew = m.heap_bytes() != before;
            assert_eq!(grew, said > 0, "insert {k}");
            if grew {
                assert_eq!(m.heap_bytes(), said);
            }
        }
    }

    #[test]
    fn map_insert_get_remove_with_collisions() {
        let mut m = U32Map::new();
        // Keys sharing their high bits share a home bucket: one long probe run.
        let keys: Vec<u32> = (0..200u32).map(|i| (5 << 24) | i).collect();
        for (i, &k) in keys.iter().enumerate() {
            m.insert(k, i as u32);
        }
        assert_eq!(m.len(), 200);
        for (i, &k) in keys.iter().enumerate() {
            assert_eq!(m.get(k), Some(i as u32));
        }
        assert!(!m.remove_if(keys[3], 999), "wrong value keeps the entry");
        for (i, &k) in keys.iter().enumerate().step_by(2) {
            assert!(m.remove_if(k, i as u32));
        }
        for (i, &k) in keys.iter().enumerate() {
            let want = if i % 2 == 0 { None } else { Some(i as u32) };
            assert_eq!(m.get(k), want, "key {i}");
        }
        m.insert(keys[1], 7);
        assert_eq!(m.get(keys[1]), Some(7));
        assert_eq!(m.len(), 100);
        for (i, &k) in keys.iter().enumerate().skip(1).step_by(2).skip(3) {
            assert!(m.remove_if(k, i as u32));
        }
        let before = m.heap_bytes();
        m.compact();
        assert!(m.heap_bytes() < before);
        assert_eq!(m.len(), 3);
        assert_eq!(m.get(keys[1]), Some(7));
        assert_eq!(m.get(keys[3]), Some(3));
        m.clear();
        assert_eq!((m.len(), m.heap_bytes(), m.get(keys[1])), (0, 0, None));
    }

    #[test]
    fn map_probe_runs_wrap_around_the_end() {
        let mut m = U32Map::new();
        // Homes in the last bucket: the run wraps to the start of the table.
        let keys: Vec<u32> = (0..40u32).map(|i| 0xffff_ff00 | i).collect();
        for &k in &keys {
            m.insert(k, k);
        }
        for &k in keys.iter().step_by(3) {
            assert!(m.remove_if(k, k));
        }
        for (i, &k) in keys.iter().enumerate() {
            let want = (i % 3 != 0).then_some(k);
            assert_eq!(m.get(k), want, "key {k:#x}");
        }
    }

    #[test]
    fn map_matches_model_under_random_ops() {
        let mut m = U32Map::new();
        let mut model = alloc::collections::BTreeMap::new();
        let mut x = 88172645463325252u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // 512 keys, all with one home bucket while the table is small: long probe runs,
            // and (x >> 30) spreads some of them once it grows.
            let key = 0xa000_0000 | (x % 512) as u32 | ((x >> 30) as u32 & 0x0300_0000);
            let val = (x >> 40) as u32;
            if x & 1 == 0 {
                m.insert(key, val);
                model.insert(key, val);
            } else if let Some(&v) = model.get(&key) {
                assert!(m.remove_if(key, v));
                model.remove(&key);
            }
            assert_eq!(m.len(), model.len());
        }
        for (&k, &v) in &model {
            assert_eq!(m.get(k), Some(v));
        }
    }

    #[test]
    fn sim_table_is_bounded_and_keeps_recent() {
        let mut t = SimTable::with_capacity(16);
        assert_eq!(t.capacity(), 16);
        let key = |k: u64| k.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 0xffff_ffff;
        for k in 0..1000u64 {
            t.insert(key(k), k as u32);
        }
        assert_eq!(t.get(key(999)), Some(999));
        let kept = (0..1000u64)
            .filter(|&k| t.get(key(k)) == Some(k as u32))
            .count();
        assert_eq!(kept, 16);
        t.insert(key(999), 5);
        assert_eq!(t.get(key(999)), Some(5));
        t.resize(64);
        assert_eq!(t.capacity(), 64);
        assert_eq!(t.get(key(999)), Some(5));
        // Any number of sets, not only powers of two; an empty table holds nothing.
        t.resize(20);
        assert_eq!(t.capacity(), 20);
        assert_eq!(t.get(key(999)), Some(5));
        let mut e = SimTable::with_capacity(0);
        e.insert(key(1), 1);
        assert_eq!((e.capacity(), e.get(key(1))), (0, None));
        e.resize(8);
        e.insert(key(1), 1);
        assert_eq!(e.get(key(1)), Some(1));
    }
}
