//! The upper bound on what any page-granular memory engine could save on a set of images,
//! computed independently of `hv-mem` (own hashing, own similarity index, own patch cost).
//!
//! 1. **Zero pages** cost nothing (one shared zero frame for everything).
//! 2. **Identical pages**: exact dedup by content (XXH3-64, confirmed byte for byte); one copy
//!    of each distinct content is kept.
//! 3. **Similar pages**: every distinct page may be stored as a patch against another distinct
//!    page. Candidates come from a similarity index (8 non-uniform 64-byte blocks at fixed
//!    offsets, each a bucket key); the cost of a patch is the smaller of a run-list encoding
//!    (3 bytes per run of differing bytes + the bytes) and LZ4 of the XOR of the two pages. To
//!    stay realisable, patches form a forest: edges are taken greedily by gain and an edge that
//!    would close a cycle is refused (each tree keeps one root that is not a patch).
//! 4. **The rest** is LZ4-compressed where that makes it smaller.
//!
//! Only positive savings count; no metadata, allocator slack or CPU cost is charged. An
//! exhaustive search over all distinct pages for a deterministic sample of pages estimates what
//! the similarity index misses (only references that keep the forest acyclic count), and that
//! estimate, scaled to all distinct pages, is added to the bound (and reported apart).

use std::collections::HashMap;
use std::time::Instant;

use twox_hash::XxHash3_64;

pub const PAGE_SIZE: usize = 4096;
type Page = [u8; PAGE_SIZE];

/// Blocks sampled per page for the similarity index.
const SIM_BLOCKS: usize = 8;
/// Pages kept per similarity bucket (the first ones seen).
const BUCKET_CAP: usize = 24;
/// Candidates scored by differing words per page.
const MAX_CANDIDATES: usize = 64;
/// Candidates whose real patch cost is computed (best by differing words).
const COSTED_CANDIDATES: usize = 3;

/// Savings of one mechanism in the bound.
#[derive(Clone, Copy, Debug, Default)]
pub struct Part {
    /// Pages represented by this mechanism.
    pub pages: u64,
    /// Bytes these pages still occupy (patches, compressed data).
    pub stored_bytes: u64,
    /// Net bytes saved.
    pub saved_bytes: u64,
}

/// What the exhaustive sample found beyond the similarity index.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExhaustiveSample {
    /// Distinct pages searched exhaustively.
    pub sampled: u64,
    /// Of those, pages for which the exhaustive search found a better patch than the solution.
    pub improved: u64,
    /// Mean extra bytes saved per sampled page.
    pub mean_extra_bytes: f64,
    /// `mean_extra_bytes` times the number of distinct pages: the estimate added to the bound.
    pub estimated_extra_bytes: u64,
    /// Standard error of that estimate (sample standard deviation / sqrt(sample) x pages).
    pub estimated_extra_stderr_bytes: u64,
}

/// The bound and its parts.
#[derive(Clone, Debug, Default)]
pub struct UpperBound {
    pub pages: u64,
    pub zero: Part,
    pub identical: Part,
    pub patched: Part,
    pub compressed: Part,
    /// Distinct non-zero contents.
    pub distinct_pages: u64,
    /// Distinct pages kept whole (neither patched nor compressible).
    pub raw_pages: u64,
    /// Savings with the similarity index alone (zero + identical + patched + compressed).
    pub index_saved_bytes: u64,
    pub exhaustive: ExhaustiveSample,
    /// `index_saved_bytes + exhaustive.estimated_extra_bytes`.
    pub saved_bytes: u64,
    /// CPU (wall, single thread) seconds the computation took.
    pub seconds: f64,
}

fn is_zero(p: &Page) -> bool {
    p.chunks_exact(8).all(|w| w == [0u8; 8])
}

/// Scratch space LZ4 needs: lz4_flex's `compress_into` refuses (OutputTooSmall) any output
/// buffer shorter than its worst case, however well the input compresses.
const LZ4_SCRATCH: usize = lz4_flex::block::get_maximum_output_size(PAGE_SIZE);

/// LZ4 block size of `data`, or `None` if it is not smaller than a page.
fn lz4_len(data: &[u8], scratch: &mut [u8]) -> Option<usize> {
    lz4_flex::block::compress_into(data, scratch)
        .ok()
        .filter(|&n| n < PAGE_SIZE)
}

/// Number of differing 8-byte words, stopping early once above `limit`.
fn differing_words(a: &Page, b: &Page, limit: u32) -> u32 {
    let mut d = 0u32;
    for (ca, cb) in a.chunks_exact(256).zip(b.chunks_exact(256)) {
        for (wa, wb) in ca.chunks_exact(8).zip(cb.chunks_exact(8)) {
            d += u32::from(wa != wb);
        }
        if d > limit {
            return d;
        }
    }
    d
}

/// Cost in bytes of the run-list encoding of `target` against `reference`: 1 header byte, then
/// per run of differing bytes 3 bytes (offset, length) plus the bytes. Runs closer than 4 equal
/// bytes merge (a run header costs 3).
fn run_list_cost(target: &Page, reference: &Page) -> usize {
    let mut cost = 1usize;
    let mut run: Option<(usize, usize)> = None;
    for i in 0..PAGE_SIZE {
        if target[i] == reference[i] {
            continue;
        }
        run = match run {
            Some((s, e)) if i <= e + 3 => Some((s, i + 1)),
            Some((s, e)) => {
                cost += 3 + (e - s);
                Some((i, i + 1))
            }
            None => Some((i, i + 1)),
        };
    }
    if let Some((s, e)) = run {
        cost += 3 + (e - s);
    }
    cost
}

/// The cheaper of the run list and LZ4 of the XOR.
fn patch_cost(target: &Page, reference: &Page, scratch: &mut [u8], xor: &mut Page) -> usize {
    let runs = run_list_cost(target, reference);
    for (x, (t, r)) in xor.iter_mut().zip(target.iter().zip(reference.iter())) {
        *x = t ^ r;
    }
    let lz = lz4_len(xor, scratch).map_or(usize::MAX, |n| n + 1);
    runs.min(lz)
}

/// Fixed block positions for the bound's similarity index (its own, not the engine's).
fn positions() -> [usize; SIM_BLOCKS] {
    // Spread over the page, offset so they are not all at the start of a cache line pair.
    [1, 9, 18, 27, 36, 45, 54, 62]
}

fn similarity_keys(p: &Page) -> impl Iterator<Item = u64> + '_ {
    positions().into_iter().filter_map(move |b| {
        let block = &p[b * 64..b * 64 + 64];
        // A block of one repeated byte says nothing about similarity (zeros, 0xff fill).
        if block.iter().all(|&x| x == block[0]) {
            return None;
        }
        Some(XxHash3_64::oneshot_with_seed(b as u64, block))
    })
}

struct UnionFind(Vec<u32>);

impl UnionFind {
    fn new(n: usize) -> Self {
        UnionFind((0..n as u32).collect())
    }
    fn find(&mut self, mut x: u32) -> u32 {
        while self.0[x as usize] != x {
            let parent = self.0[x as usize];
            self.0[x as usize] = self.0[parent as usize];
            x = parent;
        }
        x
    }
    fn union(&mut self, a: u32, b: u32) -> bool {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra == rb {
            return false;
        }
        self.0[ra as usize] = rb;
        true
    }
}

/// Computes the bound over `pages` (every page of every image, one sharing domain).
pub fn compute(pages: &[&Page], exhaustive_sample: usize) -> UpperBound {
    let t0 = Instant::now();
    let mut ub = UpperBound {
        pages: pages.len() as u64,
        ..Default::default()
    };

    // 1 + 2: zero pages and exact dedup.
    let mut by_hash: HashMap<u64, u32> = HashMap::with_capacity(pages.len());
    let mut collided: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut distinct: Vec<&Page> = Vec::new();
    for &p in pages {
        if is_zero(p) {
            ub.zero.pages += 1;
            continue;
        }
        let h = XxHash3_64::oneshot(p);
        match by_hash.get(&h) {
            None => {
                by_hash.insert(h, distinct.len() as u32);
                distinct.push(p);
            }
            Some(&d) if distinct[d as usize] == p => ub.identical.pages += 1,
            Some(_) => {
                // A 64-bit hash collision between different contents: rare, but stay exact.
                let chain = collided.entry(h).or_default();
                if chain.iter().any(|&d| distinct[d as usize] == p) {
                    ub.identical.pages += 1;
                } else {
                    chain.push(distinct.len() as u32);
                    distinct.push(p);
                }
            }
        }
    }
    drop(by_hash);
    ub.zero.saved_bytes = ub.zero.pages * PAGE_SIZE as u64;
    ub.identical.saved_bytes = ub.identical.pages * PAGE_SIZE as u64;
    ub.distinct_pages = distinct.len() as u64;

    // 4 (computed first: patches must beat it): LZ4 size of every distinct page.
    let mut scratch = vec![0u8; LZ4_SCRATCH];
    let mut xor = [0u8; PAGE_SIZE];
    let compressed: Vec<u16> = distinct
        .iter()
        .map(|p| lz4_len(&p[..], &mut scratch).unwrap_or(PAGE_SIZE) as u16)
        .collect();
    let compress_saving = |i: usize| PAGE_SIZE - compressed[i] as usize;

    // 3: similarity index over distinct pages.
    let mut buckets: HashMap<u64, Vec<u32>> = HashMap::new();
    for (i, p) in distinct.iter().enumerate() {
        for k in similarity_keys(p) {
            let b = buckets.entry(k).or_default();
            if b.len() < BUCKET_CAP {
                b.push(i as u32);
            }
        }
    }
    // Best two patch edges per page: (gain over compressing, page, reference, patch cost).
    let mut edges: Vec<(u32, u32, u32, u16)> = Vec::new();
    let mut cands: Vec<u32> = Vec::with_capacity(MAX_CANDIDATES * 2);
    let mut scored: Vec<(u32, u32)> = Vec::with_capacity(MAX_CANDIDATES * 2);
    for (i, p) in distinct.iter().enumerate() {
        cands.clear();
        for k in similarity_keys(p) {
            if let Some(b) = buckets.get(&k) {
                cands.extend(b.iter().copied().filter(|&j| j as usize != i));
            }
        }
        cands.sort_unstable();
        cands.dedup();
        cands.truncate(MAX_CANDIDATES);
        scored.clear();
        scored.extend(
            cands
                .iter()
                .map(|&j| (differing_words(p, distinct[j as usize], 512), j)),
        );
        scored.sort_unstable();
        let mut best: Vec<(u32, u32, u16)> = scored
            .iter()
            .take(COSTED_CANDIDATES)
            .map(|&(_, j)| {
                let c = patch_cost(p, distinct[j as usize], &mut scratch, &mut xor);
                (c as u32, j, c as u16)
            })
            .collect();
        best.sort_unstable();
        for &(cost, j, c) in best.iter().take(2) {
            let patch_saving = PAGE_SIZE.saturating_sub(cost as usize);
            if patch_saving > compress_saving(i) {
                edges.push(((patch_saving - compress_saving(i)) as u32, i as u32, j, c));
            }
        }
    }
    drop(buckets);
    edges.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut uf = UnionFind::new(distinct.len());
    let mut patch_of: Vec<Option<u16>> = vec![None; distinct.len()];
    // The reference of each patched page: the forest, walked to keep the estimate below valid.
    let mut parent: Vec<u32> = vec![u32::MAX; distinct.len()];
    for &(_, i, j, cost) in &edges {
        if patch_of[i as usize].is_none() && uf.union(i, j) {
            patch_of[i as usize] = Some(cost);
            parent[i as usize] = j;
        }
    }
    // Whether `j` lies in the tree below `i` (then patching `i` against `j` would be a cycle).
    let descends_from = |mut j: u32, i: u32| -> bool {
        while j != u32::MAX {
            if j == i {
                return true;
            }
            j = parent[j as usize];
        }
        false
    };
    let mut solution_saving: Vec<u16> = vec![0; distinct.len()];
    for i in 0..distinct.len() {
        match patch_of[i] {
            Some(cost) => {
                ub.patched.pages += 1;
                ub.patched.stored_bytes += u64::from(cost);
                ub.patched.saved_bytes += (PAGE_SIZE - cost as usize) as u64;
                solution_saving[i] = (PAGE_SIZE - cost as usize) as u16;
            }
            None if compress_saving(i) > 0 => {
                ub.compressed.pages += 1;
                ub.compressed.stored_bytes += u64::from(compressed[i]);
                ub.compressed.saved_bytes += compress_saving(i) as u64;
                solution_saving[i] = compress_saving(i) as u16;
            }
            None => ub.raw_pages += 1,
        }
    }
    ub.index_saved_bytes = ub.zero.saved_bytes
        + ub.identical.saved_bytes
        + ub.patched.saved_bytes
        + ub.compressed.saved_bytes;

    // Exhaustive search for a deterministic, evenly spread sample of distinct pages.
    let n = distinct.len();
    let sample = exhaustive_sample.min(n);
    let mut extras: Vec<f64> = Vec::with_capacity(sample);
    for s in 0..sample {
        let i = (s * n) / sample.max(1) + (n / sample.max(1)) / 2;
        let i = i.min(n - 1);
        let p = distinct[i];
        // Keep the COSTED_CANDIDATES pages with the fewest differing words.
        let mut top: Vec<(u32, usize)> = Vec::with_capacity(COSTED_CANDIDATES + 1);
        let mut limit = 512u32;
        for (j, q) in distinct.iter().enumerate() {
            if j == i {
                continue;
            }
            let d = differing_words(p, q, limit);
            if d < limit || top.len() < COSTED_CANDIDATES {
                top.push((d, j));
                top.sort_unstable();
                top.truncate(COSTED_CANDIDATES);
                if top.len() == COSTED_CANDIDATES {
                    limit = top[COSTED_CANDIDATES - 1].0;
                }
            }
        }
        // Only references that keep the forest acyclic if `i` switched to them.
        let best = top
            .iter()
            .filter(|&&(_, j)| !descends_from(j as u32, i as u32))
            .map(|&(_, j)| patch_cost(p, distinct[j], &mut scratch, &mut xor))
            .min()
            .unwrap_or(PAGE_SIZE);
        let exhaustive_saving = PAGE_SIZE.saturating_sub(best).max(compress_saving(i));
        let extra = exhaustive_saving.saturating_sub(solution_saving[i] as usize);
        if extra > 0 {
            ub.exhaustive.improved += 1;
        }
        extras.push(extra as f64);
    }
    ub.exhaustive.sampled = sample as u64;
    if sample > 0 {
        let mean = extras.iter().sum::<f64>() / sample as f64;
        ub.exhaustive.mean_extra_bytes = mean;
        ub.exhaustive.estimated_extra_bytes = (mean * n as f64) as u64;
        if sample > 1 {
            let var = extras.iter().map(|e| (e - mean).powi(2)).sum::<f64>() / (sample - 1) as f64;
            ub.exhaustive.estimated_extra_stderr_bytes =
                (var.sqrt() / (sample as f64).sqrt() * n as f64) as u64;
        }
    }
    ub.saved_bytes = ub.index_saved_bytes + ub.exhaustive.estimated_extra_bytes;
    ub.seconds = t0.elapsed().as_secs_f64();
    ub
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(seed: u64) -> Box<Page> {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        let mut x = seed | 1;
        for b in p.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        p
    }

    #[test]
    fn zero_identical_similar_and_random_pages_are_each_counted() {
        let zero = Box::new([0u8; PAGE_SIZE]);
        let a = noise(1);
        let mut a2 = a.clone();
        a2[100] ^= 0xff;
        a2[2000] ^= 0x01;
        let unrelated = noise(99);
        let mut text = Box::new([0u8; PAGE_SIZE]);
        for (i, b) in text.iter_mut().enumerate() {
            *b = b"hello world "[i % 12];
        }
        let pages: Vec<&Page> = vec![&zero, &zero, &a, &a, &a, &a2, &unrelated, &text];
        let ub = compute(&pages, 4);
        assert_eq!(ub.zero.pages, 2);
        assert_eq!(ub.identical.pages, 2);
        assert_eq!(ub.distinct_pages, 4);
        // a2 is a patch against a (or a against a2), two runs of one byte each.
        assert_eq!(ub.patched.pages, 1);
        assert!(
            ub.patched.stored_bytes <= 1 + 2 * 4,
            "{}",
            ub.patched.stored_bytes
        );
        // The text page compresses; the random pages stay raw (one root of the patch tree).
        assert_eq!(ub.compressed.pages, 1);
        assert_eq!(ub.raw_pages, 2);
        assert_eq!(
            ub.index_saved_bytes,
            ub.zero.saved_bytes
                + ub.identical.saved_bytes
                + ub.patched.saved_bytes
                + ub.compressed.saved_bytes
        );
        assert!(ub.saved_bytes >= ub.index_saved_bytes);
    }

    #[test]
    fn patches_never_form_a_cycle() {
        // Ten pages that each differ from the others in one byte: nine patches, one root.
        let base = noise(7);
        let variants: Vec<Box<Page>> = (0..10)
            .map(|k| {
                let mut p = base.clone();
                p[k * 300] ^= 0x5a;
                p
            })
            .collect();
        let pages: Vec<&Page> = variants.iter().map(|b| &**b).collect();
        let ub = compute(&pages, 0);
        assert_eq!(ub.patched.pages, 9);
        assert_eq!(ub.raw_pages, 1);
    }

    #[test]
    fn patch_cost_picks_the_cheaper_encoding() {
        let a = noise(3);
        let mut b = a.clone();
        b[10..20].fill(0);
        let mut scratch = vec![0u8; LZ4_SCRATCH];
        let mut xor = [0u8; PAGE_SIZE];
        let c = patch_cost(&b, &a, &mut scratch, &mut xor);
        assert_eq!(run_list_cost(&b, &a), 1 + 3 + 10);
        assert!(c <= 14, "{c}");
        assert_eq!(run_list_cost(&a, &a), 1);
        assert_eq!(differing_words(&a, &b, 512), 2);
    }
}
