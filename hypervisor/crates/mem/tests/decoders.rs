//! The patch decoder and the decompressor are total: arbitrary input gives an error or a page,
//! never a panic or an out-of-bounds access. And the encoder round-trips.

use hv_mem::compress::{self, MAX_COMPRESSED};
use hv_mem::patch;
use hv_mem::{Page, PAGE_SIZE};
use proptest::prelude::*;

fn page_from(seed: u64) -> Page {
    let mut x = seed | 1;
    let mut p = [0u8; PAGE_SIZE];
    for b in p.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    p
}

/// An edit applied to a page: overwrite `len` bytes at `at` with `value` (a fill) or with
/// bytes derived from `value` (literals).
#[derive(Clone, Debug)]
struct Edit {
    at: usize,
    len: usize,
    value: u8,
    fill: bool,
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(
        (0..PAGE_SIZE, 1usize..300, any::<u8>(), any::<bool>()).prop_map(
            |(at, len, value, fill)| Edit {
                at,
                len: len.min(PAGE_SIZE - at),
                value,
                fill,
            },
        ),
        0..12,
    )
}

fn apply_edits(mut p: Page, edits: &[Edit]) -> Page {
    for e in edits {
        for (i, b) in p[e.at..e.at + e.len].iter_mut().enumerate() {
            *b = if e.fill {
                e.value
            } else {
                e.value.wrapping_add((i as u8).wrapping_mul(7))
            };
        }
    }
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn patch_decoder_is_total(data in prop::collection::vec(any::<u8>(), 0..6000), seed: u64) {
        let reference = page_from(seed);
        let mut out = [0u8; PAGE_SIZE];
        // Whatever happens, no panic; and a successful decode only touched `out`.
        let _ = patch::decode(&data, &reference, &mut out);
        // With the version byte right, the decoder gets past the header and into the runs.
        let mut versioned = data.clone();
        versioned.insert(0, patch::VERSION);
        let _ = patch::decode(&versioned, &reference, &mut out);
    }

    #[test]
    fn decompressor_is_total(data in prop::collection::vec(any::<u8>(), 0..6000)) {
        let mut out = [0u8; PAGE_SIZE];
        if compress::decompress(&data, &mut out).is_ok() {
            // Success means exactly one page came out; nothing to check beyond no panic.
        }
    }

    #[test]
    fn corrupted_valid_inputs_never_panic(
        seed: u64,
        edits in edits(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let reference = page_from(seed);
        let target = apply_edits(reference, &edits);
        let mut buf = vec![0u8; 2 * PAGE_SIZE];
        let n = patch::encode(&target, &reference, &mut buf).unwrap();
        let mut lz = vec![0u8; MAX_COMPRESSED];
        let m = compress::compress(&target, &mut lz, MAX_COMPRESSED).unwrap();
        let mut out = [0u8; PAGE_SIZE];
        for (data, len) in [(&mut buf, n), (&mut lz, m)] {
            let data = &mut data[..len];
            for (i, x) in &flips {
                data[i.index(len)] ^= x | 1;
            }
            let _ = patch::decode(data, &reference, &mut out);
            let _ = compress::decompress(data, &mut out);
            let _ = patch::decode(&data[..cut.index(len)], &reference, &mut out);
            let _ = compress::decompress(&data[..cut.index(len)], &mut out);
        }
    }

    #[test]
    fn patch_round_trips(seed: u64, edits in edits()) {
        let reference = page_from(seed);
        let target = apply_edits(reference, &edits);
        let mut buf = vec![0u8; 2 * PAGE_SIZE];
        let n = patch::encode(&target, &reference, &mut buf).unwrap();
        let mut out = [0u8; PAGE_SIZE];
        patch::decode(&buf[..n], &reference, &mut out).unwrap();
        prop_assert!(out == target);
        // Edits bound the patch size: per edit at most its bytes plus a few header bytes.
        let bound: usize = 1 + edits.iter().map(|e| e.len + 6).sum::<usize>();
        prop_assert!(n <= bound, "{} > {}", n, bound);
        // A too-small output is reported, not overrun.
        if n > 1 {
            prop_assert_eq!(patch::encode(&target, &reference, &mut buf[..n - 1]), None);
        }
    }

    #[test]
    fn compression_round_trips(seed: u64, edits in edits(), zero_base: bool) {
        let base = if zero_base { [0u8; PAGE_SIZE] } else { page_from(seed) };
        let page = apply_edits(base, &edits);
        let mut lz = vec![0u8; MAX_COMPRESSED];
        let n = compress::compress(&page, &mut lz, MAX_COMPRESSED).unwrap();
        let mut out = [0u8; PAGE_SIZE];
        compress::decompress(&lz[..n], &mut out).unwrap();
        prop_assert!(out == page);
    }
}
