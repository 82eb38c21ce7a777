//! Content primitives on one page: zero test, content hash, similarity block hashes.
//!
//! These run once per scanned page, so they avoid allocation and work on 64-bit words.

use crate::backend::{Page, PAGE_SIZE};
use twox_hash::XxHash3_64;

/// Size of a similarity block (Difference Engine hashes 64-byte blocks).
pub const BLOCK_SIZE: usize = 64;
/// Number of block positions in a page.
pub const BLOCKS_PER_PAGE: usize = PAGE_SIZE / BLOCK_SIZE;
/// Most similarity blocks a configuration may ask for.
pub const MAX_SIMILARITY_BLOCKS: usize = 8;

/// Whether every byte of `page` is zero. Works on u64 words and exits at the first non-zero
/// word, which for most non-zero pages is the first one.
#[inline]
pub fn is_zero(page: &Page) -> bool {
    // Chunks of 64 bytes: eight independent loads OR-ed together vectorise well, and the early
    // exit every 64 bytes keeps the common non-zero case cheap.
    page.chunks_exact(BLOCK_SIZE).all(is_zero_block)
}

/// Whether a 64-byte block is all zero.
#[inline]
pub fn is_zero_block(block: &[u8]) -> bool {
    let mut acc = 0u64;
    for w in block.chunks_exact(8) {
        acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
    }
    acc == 0
}

/// The content hash of a page (XXH3-64, seed 0).
#[inline]
pub fn hash_page(page: &Page) -> u64 {
    XxHash3_64::oneshot(page)
}

/// The hash of the all-zero page.
pub fn zero_page_hash() -> u64 {
    hash_page(&[0u8; PAGE_SIZE])
}

/// Picks `count` distinct block indices (0..64) from a seeded generator. The same seed always
/// gives the same positions, so every page of every VM is sampled at the same offsets.
pub fn similarity_positions(seed: u64, count: usize) -> [u8; MAX_SIMILARITY_BLOCKS] {
    let count = count.min(MAX_SIMILARITY_BLOCKS);
    let mut out = [0u8; MAX_SIMILARITY_BLOCKS];
    let mut state = seed;
    let mut chosen = 0usize;
    while chosen < count {
        // splitmix64: tiny, well mixed, and needs no dependency.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let candidate = (z % BLOCKS_PER_PAGE as u64) as u8;
        if !out[..chosen].contains(&candidate) {
            out[chosen] = candidate;
            chosen += 1;
        }
    }
    out
}

/// Similarity keys of a page: for each sampled block position `i`, a hash of the block mixed
/// with the position, or `None` for an all-zero block (zero blocks are everywhere and would make
/// every page look similar to every other).
#[inline]
pub fn similarity_keys(
    page: &Page,
    positions: &[u8],
    out: &mut [Option<u64>; MAX_SIMILARITY_BLOCKS],
) {
    for (slot, (i, &pos)) in out.iter_mut().zip(positions.iter().enumerate()) {
        let start = pos as usize * BLOCK_SIZE;
        let block = &page[start..start + BLOCK_SIZE];
        *slot = if is_zero_block(block) {
            None
        } else {
            Some(XxHash3_64::oneshot_with_seed(i as u64 + 1, block))
        };
    }
    for slot in out.iter_mut().skip(positions.len()) {
        *slot = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut p = [0u8; PAGE_SIZE];
        assert!(is_zero(&p));
        p[PAGE_SIZE - 1] = 1;
        assert!(!is_zero(&p));
        p[PAGE_SIZE - 1] = 0;
        p[0] = 0x80;
        assert!(!is_zero(&p));
        assert_eq!(hash_page(&[0u8; PAGE_SIZE]), zero_page_hash());
    }

    #[test]
    fn positions_are_distinct_and_fixed() {
        let a = similarity_positions(7, 8);
        let b = similarity_positions(7, 8);
        assert_eq!(a, b);
        for i in 0..8 {
            assert!((a[i] as usize) < BLOCKS_PER_PAGE);
            for j in 0..i {
                assert_ne!(a[i], a[j]);
            }
        }
        assert_ne!(similarity_positions(8, 8), a);
    }

    #[test]
    fn keys_skip_zero_blocks_and_depend_on_position() {
        let positions = [0u8, 1];
        let mut page = [0u8; PAGE_SIZE];
        page[..BLOCK_SIZE].fill(5);
        page[BLOCK_SIZE..2 * BLOCK_SIZE].fill(5);
        let mut keys = [None; MAX_SIMILARITY_BLOCKS];
        similarity_keys(&page, &positions, &mut keys);
        assert!(keys[0].is_some() && keys[1].is_some());
        // Same bytes at different positions give different keys.
        assert_ne!(keys[0], keys[1]);
        page[..BLOCK_SIZE].fill(0);
        similarity_keys(&page, &positions, &mut keys);
        assert_eq!(keys[0], None);
        assert!(keys[2..].iter().all(Option::is_none));
    }
}
