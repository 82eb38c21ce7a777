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

/// Keeps only the page offset of a word that looks like a kernel pointer (bits 63..48 all ones:
/// the canonical upper half, where x86-64 kernels live); other words are unchanged.
///
/// Why: guests randomize their kernel's virtual layout (KASLR; on Linux the text slide is 2 MiB
/// aligned, the direct map and `vmemmap` bases 1 GiB aligned), so the same structure in two
/// guests, or two neighbouring `struct page` arrays in one, holds pointers that differ above
/// the page offset and nowhere else. Hashed raw, such blocks never match; hashed normalized,
/// they do, and an XOR delta against the match stores the page in a few dozen bytes
/// ([`crate::patch`]). On the project's 8-guest corpus, pages whose best reference shares no
/// raw 64-byte block shared 30 to 64 normalized ones with it.
#[inline]
pub fn normalize_pointer(word: u64) -> u64 {
    if word >> 48 == 0xffff {
        word & 0xffff_0000_0000_0fff
    } else {
        word
    }
}

/// Similarity keys of a page: for each sampled block position `i`, a hash of the block mixed
/// with the position, or `None` for a block whose eight 64-bit words are all equal (zero
/// blocks, fills: they are everywhere and would make every page look similar to every other).
/// With `normalize`, each word is hashed after [`normalize_pointer`].
#[inline]
pub fn similarity_keys(
    page: &Page,
    positions: &[u8],
    normalize: bool,
    out: &mut [Option<u64>; MAX_SIMILARITY_BLOCKS],
) {
    for (slot, (i, &pos)) in out.iter_mut().zip(positions.iter().enumerate()) {
        let start = pos as usize * BLOCK_SIZE;
        let mut words = [0u64; BLOCK_SIZE / 8];
        for (w, bytes) in words
            .iter_mut()
            .zip(page[start..start + BLOCK_SIZE].chunks_exact(8))
        {
            let raw = u64::from_le_bytes([
                bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
            ]);
            *w = if normalize {
                normalize_pointer(raw)
            } else {
                raw
            };
        }
        *slot = if words.iter().all(|&w| w == words[0]) {
            None
        } else {
            let mut block = [0u8; BLOCK_SIZE];
            for (b, w) in block.chunks_exact_mut(8).zip(words) {
                b.copy_from_slice(&w.to_le_bytes());
            }
            Some(XxHash3_64::oneshot_with_seed(i as u64 + 1, &block))
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
    fn keys_skip_uniform_blocks_and_depend_on_position() {
        let positions = [0u8, 1];
        let mut page = [0u8; PAGE_SIZE];
        for (i, b) in page[..2 * BLOCK_SIZE].iter_mut().enumerate() {
            *b = (i % BLOCK_SIZE) as u8;
        }
        let mut keys = [None; MAX_SIMILARITY_BLOCKS];
        similarity_keys(&page, &positions, false, &mut keys);
        assert!(keys[0].is_some() && keys[1].is_some());
        // Same bytes at different positions give different keys.
        assert_ne!(keys[0], keys[1]);
        // Zero and a repeated word say nothing about similarity.
        page[..BLOCK_SIZE].fill(0);
        page[BLOCK_SIZE..2 * BLOCK_SIZE].fill(0xa5);
        similarity_keys(&page, &positions, false, &mut keys);
        assert_eq!(keys[0], None);
        assert_eq!(keys[1], None);
        assert!(keys[2..].iter().all(Option::is_none));
    }

    /// A block of a `struct page`-like record: two self pointers, flags, a count.
    fn record(base: u64) -> Page {
        let mut page = [0u8; PAGE_SIZE];
        for (k, w) in page.chunks_exact_mut(8).enumerate() {
            let v = match k % 4 {
                0 => 0x0010_0000_0000_0200,
                1 | 2 => base + (k as u64 / 4) * 64 + 8,
                _ => 1,
            };
            w.copy_from_slice(&v.to_le_bytes());
        }
        page
    }

    #[test]
    fn normalized_keys_match_across_pointer_slides() {
        // The same records in two guests whose kernel layouts differ (another vmemmap base).
        let a = record(0xffff_ea00_0120_0000);
        let b = record(0xffff_f77f_c00c_9000 & !0xfff);
        let positions = [3u8, 17, 40];
        let (mut ka, mut kb) = ([None; MAX_SIMILARITY_BLOCKS], [None; MAX_SIMILARITY_BLOCKS]);
        similarity_keys(&a, &positions, false, &mut ka);
        similarity_keys(&b, &positions, false, &mut kb);
        assert!(
            ka[..3].iter().zip(&kb[..3]).all(|(x, y)| x != y),
            "raw keys differ"
        );
        similarity_keys(&a, &positions, true, &mut ka);
        similarity_keys(&b, &positions, true, &mut kb);
        assert!(ka[0].is_some());
        assert_eq!(ka, kb, "normalized keys match");
        // A different page offset, or a user-space pointer, is still a difference.
        let c = record(0xffff_ea00_0120_0010);
        let mut kc = [None; MAX_SIMILARITY_BLOCKS];
        similarity_keys(&c, &positions, true, &mut kc);
        assert_ne!(ka[0], kc[0]);
        assert_eq!(
            normalize_pointer(0x0000_7fff_1234_5678),
            0x0000_7fff_1234_5678
        );
        assert_eq!(
            normalize_pointer(0xffff_8880_1234_5678),
            0xffff_0000_0000_0678
        );
    }
}
