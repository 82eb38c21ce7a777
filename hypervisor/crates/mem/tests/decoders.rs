//! The patch decoder and the decompressor are total: arbitrary input gives an error or a page,
//! never a panic or an out-of-bounds access. And the encoders round-trip. The decompressor is
//! the crate's own LZ4 block decoder: on valid and on corrupted blocks it must give exactly what
//! `lz4_flex`'s decoder gives.

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

/// What an edit writes.
#[derive(Clone, Copy, Debug)]
enum Fill {
    /// Bytes derived from the value (literals).
    Literal,
    /// The value repeated (a run: LZ4 writes it as a match of offset 1).
    Byte,
    /// A short pattern repeated, of period 2..=64 (a match that overlaps its own output).
    Pattern(usize),
}

/// An edit applied to a page: overwrite `len` bytes at `at`.
#[derive(Clone, Debug)]
struct Edit {
    at: usize,
    len: usize,
    value: u8,
    fill: Fill,
}

fn edits_up_to(max_len: usize) -> impl Strategy<Value = Vec<Edit>> {
    let fill = prop_oneof![
        Just(Fill::Literal),
        Just(Fill::Byte),
        (2usize..=64).prop_map(Fill::Pattern),
    ];
    prop::collection::vec(
        (0..PAGE_SIZE, 1usize..max_len, any::<u8>(), fill).prop_map(|(at, len, value, fill)| {
            Edit {
                at,
                len: len.min(PAGE_SIZE - at),
                value,
                fill,
            }
        }),
        0..12,
    )
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    edits_up_to(300)
}

fn apply_edits(mut p: Page, edits: &[Edit]) -> Page {
    for e in edits {
        for (i, b) in p[e.at..e.at + e.len].iter_mut().enumerate() {
            let derived = |i: usize| e.value.wrapping_add((i as u8).wrapping_mul(7));
            *b = match e.fill {
                Fill::Literal => derived(i),
                Fill::Byte => e.value,
                Fill::Pattern(period) => derived(i % period),
            };
        }
    }
    p
}

/// What `lz4_flex`'s own (safe) decoder makes of `data`: a page, or `None`.
fn reference_decode(data: &[u8]) -> Option<Page> {
    let mut out = [0u8; PAGE_SIZE];
    match lz4_flex::block::decompress_into(data, &mut out) {
        Ok(PAGE_SIZE) => Some(out),
        _ => None,
    }
}

/// Our decoder's result in the same shape.
fn our_decode(data: &[u8]) -> Option<Page> {
    let mut out = [0u8; PAGE_SIZE];
    compress::decompress(data, &mut out).ok().map(|()| out)
}

/// The XOR-words format read straight from its description in `hv_mem::patch`, one step at a
/// time: the model the optimized decoder is checked against. `None` for malformed input.
fn spec_apply_xor(p: &[u8], page: &mut Page) -> Option<()> {
    const BITMAP: usize = PAGE_SIZE / 64;
    if *p.first()? != patch::VERSION_XOR {
        return None;
    }
    let bitmap = p.get(1..1 + BITMAP)?;
    let count = usize::from(*p.get(1 + BITMAP)?);
    if count > 8 {
        return None;
    }
    let palette_at = 2 + BITMAP;
    let mut palette = Vec::new();
    for i in 0..count {
        let bytes = p.get(palette_at + 8 * i..palette_at + 8 * i + 8)?;
        palette.push(u64::from_le_bytes(bytes.try_into().unwrap()));
    }
    let words: Vec<usize> = (0..PAGE_SIZE / 8)
        .filter(|w| bitmap[w / 8] >> (w % 8) & 1 == 1)
        .collect();
    let nibbles_at = palette_at + 8 * count;
    let mut lit = nibbles_at + words.len().div_ceil(2);
    if lit > p.len() {
        return None;
    }
    for (k, &w) in words.iter().enumerate() {
        let nibble = usize::from(p[nibbles_at + k / 2] >> (4 * (k % 2)) & 0x0f);
        let x = if nibble < 8 {
            *palette.get(nibble)?
        } else {
            let bytes = p.get(lit..lit + nibble - 7)?;
            lit += nibble - 7;
            bytes.iter().rev().fold(0u64, |v, &b| v << 8 | u64::from(b))
        };
        let old = u64::from_le_bytes(page[8 * w..8 * w + 8].try_into().unwrap());
        page[8 * w..8 * w + 8].copy_from_slice(&(old ^ x).to_le_bytes());
    }
    (lit == p.len()).then_some(())
}

/// `target` with every `stride`-th word XORed with `delta` (pointers of another layout).
fn move_words(mut target: Page, stride: usize, delta: u64) -> Page {
    for w in target.chunks_exact_mut(8).step_by(stride) {
        let v = u64::from_le_bytes(w.try_into().unwrap()) ^ delta;
        w.copy_from_slice(&v.to_le_bytes());
    }
    target
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn xor_patch_decoder_matches_the_format(
        seed: u64,
        edits in edits(),
        stride in 1usize..16,
        delta: u64,
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
    ) {
        // Valid patches with palette entries (moved words) and literals (edits), then the
        // same corrupted and cut short: the decoder and the model agree on every one.
        let reference = page_from(seed);
        let target = apply_edits(move_words(reference, stride, delta), &edits);
        let mut buf = vec![0u8; 3 * PAGE_SIZE];
        let n = patch::encode_xor(&target, &reference, &mut buf, 3 * PAGE_SIZE).unwrap();
        let valid = buf[..n].to_vec();
        let mut corrupt = valid.clone();
        for (i, x) in &flips {
            corrupt[i.index(n)] ^= x | 1;
        }
        let cut_short = &valid[..cut.index(n)];
        for data in [&valid[..], &corrupt[..], cut_short] {
            let mut ours = reference;
            let mut model = reference;
            let verdict = patch::apply(data, &mut ours);
            let expected = spec_apply_xor(data, &mut model);
            prop_assert_eq!(verdict.is_ok(), expected.is_some(), "{:?}", verdict);
            if expected.is_some() {
                prop_assert!(ours == model);
            }
        }
        let mut page = reference;
        patch::apply(&valid, &mut page).unwrap();
        prop_assert!(page == target);
    }

    #[test]
    fn patch_decoder_is_total(data in prop::collection::vec(any::<u8>(), 0..6000), seed: u64) {
        let reference = page_from(seed);
        let mut out = [0u8; PAGE_SIZE];
        // Whatever happens, no panic; and a successful decode only touched `out`.
        let _ = patch::decode(&data, &reference, &mut out);
        // With the version byte right, the decoder gets past the header and into the runs.
        for version in [patch::VERSION, patch::VERSION_XOR] {
            let mut versioned = data.clone();
            versioned.insert(0, version);
            let decoded = patch::decode(&versioned, &reference, &mut out);
            let mut page = reference;
            let applied = patch::apply(&versioned, &mut page);
            prop_assert_eq!(decoded, applied);
            if decoded.is_ok() {
                prop_assert!(out == page);
            }
        }
    }

    #[test]
    fn decompressor_is_total(data in prop::collection::vec(any::<u8>(), 0..6000)) {
        // No panic, and the same verdict as lz4_flex (arbitrary bytes are nearly always an
        // error for both; the corrupted-block test below reaches deeper).
        prop_assert!(our_decode(&data) == reference_decode(&data));
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
            let _ = patch::decode(&data[..cut.index(len)], &reference, &mut out);
        }
        // The LZ4 block, corrupted or cut: our decoder agrees with lz4_flex's on every one.
        let lz = &lz[..m];
        prop_assert!(our_decode(lz) == reference_decode(lz));
        let cut_lz = &lz[..cut.index(m)];
        prop_assert!(our_decode(cut_lz) == reference_decode(cut_lz));
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
        // The XOR encoding round-trips too, through decode and through apply, and any
        // corruption of it is an error or a page, never a panic.
        let mut xbuf = vec![0u8; 3 * PAGE_SIZE];
        let m = patch::encode_xor(&target, &reference, &mut xbuf, 3 * PAGE_SIZE).unwrap();
        patch::decode(&xbuf[..m], &reference, &mut out).unwrap();
        prop_assert!(out == target);
        let mut page = reference;
        patch::apply(&xbuf[..m], &mut page).unwrap();
        prop_assert!(page == target);
        for cut in [1, m / 2, m - 1] {
            let _ = patch::decode(&xbuf[..cut], &reference, &mut out);
        }
        xbuf[m / 2] ^= 0x5a;
        let _ = patch::decode(&xbuf[..m], &reference, &mut out);
    }

    #[test]
    fn compression_round_trips(seed: u64, edits in edits_up_to(PAGE_SIZE), zero_base: bool) {
        // Long edits make whole-page runs and patterns, the decoder's overlapping-match paths.
        let base = if zero_base { [0u8; PAGE_SIZE] } else { page_from(seed) };
        let page = apply_edits(base, &edits);
        let mut lz = vec![0u8; MAX_COMPRESSED];
        let n = compress::compress(&page, &mut lz, MAX_COMPRESSED).unwrap();
        let mut out = [0u8; PAGE_SIZE];
        compress::decompress(&lz[..n], &mut out).unwrap();
        prop_assert!(out == page);
    }
}
