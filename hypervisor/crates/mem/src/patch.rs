//! Page patches: a page stored as its differences against an immutable reference page.
//!
//! Two encodings, told apart by the first byte; the engine keeps the smaller:
//! - **runs** (version 1): the differing byte runs, for pages that differ in a few places;
//! - **XOR words** (version 2): the 64-bit words in which the page differs, as their XOR with the
//!   reference's, common XOR values kept once in a palette. For pages that differ a little
//!   *everywhere* the same way: records holding kernel pointers of another layout
//!   ([`crate::page::normalize_pointer`]) differ in two to four bytes of every pointer, each a
//!   run of its own, while the XOR of every such pointer is one value.
//!
//! # Format: runs (version 1)
//!
//! ```text
//! patch   := VERSION run*            VERSION = 0x01
//! run     := skip head payload
//! skip    := varint                  bytes left as in the reference, starting at the cursor
//! head    := varint                  (len << 1) | fill,  len >= 1
//! payload := byte[len]               if fill == 0: literal bytes
//!          | byte                    if fill == 1: one byte repeated len times
//! varint  := LEB128, at most 3 bytes (the encoder never needs more than 2)
//! ```
//!
//! Decoding starts from a copy of the reference and a cursor at offset 0. Each run advances the
//! cursor by `skip` (those bytes stay the reference's), then overwrites `len` bytes at the cursor
//! and advances past them. Bytes after the last run stay the reference's. Runs compare the pages
//! at the *same* offset, which is what the similarity detector looks for (blocks at fixed
//! offsets); there is no shifted copy, so the format stays trivially bounded: one pass, no
//! back-references, output size fixed at one page.
//!
//! The decoder is total: every malformed input (bad version, truncated varint or payload, a run
//! of length zero, a run that would end past the page) returns a [`PatchError`]; it never panics
//! and never touches memory outside the output page.
//!
//! # Format: XOR words (version 2)
//!
//! ```text
//! patch    := VERSION_XOR bitmap count palette nibbles literals
//! bitmap   := byte[64]               bit w (byte w / 8, bit w % 8): word w differs
//! count    := byte                   palette entries, 0..=8
//! palette  := u64le[count]           XOR values used by several words
//! nibbles  := byte[ceil(n / 2)]      n = words that differ; word k's nibble is the low (k even)
//!                                    or high (k odd) half of byte k / 2
//! literals := the literal XOR values, in word order
//! nibble   := 0..=7                  palette entry (below count)
//!           | 8..=15                 a literal of (nibble - 7) bytes follows: the XOR's low
//!                                    bytes, little-endian, its other bytes zero
//! ```
//!
//! Applying it XORs each differing word of the page (which holds the reference) with its value:
//! one pass over the bitmap, no scratch page, no decompression. It costs 3-4 ns per differing
//! word, warm (1.5 us when all 512 differ, `examples/codec_cost.rs`; on the benchmark set's
//! patched pages 0.7 us median, 2 us p99, at fault-in); written the obvious way, with a
//! variable-length copy per literal and a branch on each nibble's kind, it took twice that,
//! and nearly three times with a word read that was not inlined. (An LZ4 block of the whole
//! XOR page, tried first, was 12% larger over the XOR patches of the benchmark set and took
//! ~2 us to decode.) The decoder is total like the runs one: a short input, a palette over 8
//! entries, a nibble naming a missing entry, or literal bytes missing or left over are a
//! [`PatchError`].
//!
//! The runs encoder compares 8-byte words, trims differing words to the differing bytes, merges spans
//! separated by at most [`MERGE_GAP`] equal bytes (a new run header costs at least as much), and
//! turns repeats of one byte of at least [`FILL_MIN`] bytes into fill runs (a page zeroed or
//! memset over part of the reference patches to a few bytes).

use crate::backend::{Page, PAGE_SIZE};
use core::fmt;

/// The format byte of a runs patch.
pub const VERSION: u8 = 1;
/// The format byte of an XOR-words patch.
pub const VERSION_XOR: u8 = 2;
/// Words in a page.
const WORDS: usize = PAGE_SIZE / 8;
/// Bytes of the differing-words bitmap.
const BITMAP: usize = WORDS / 8;
/// Most palette entries (nibbles 0..=7 name them).
const PALETTE_MAX: usize = 8;
/// Distinct XOR values the encoder counts when it picks the palette.
const PALETTE_CANDIDATES: usize = 16;
/// Equal bytes between two differing spans that are still emitted as literals rather than
/// starting a new run (a run header costs two bytes).
pub const MERGE_GAP: usize = 2;
/// Shortest repeat of one byte that the encoder emits as a fill run.
pub const FILL_MIN: usize = 8;

/// Why a patch could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchError {
    /// The patch is empty or its version byte is unknown.
    BadVersion,
    /// The input ends inside a run.
    Truncated,
    /// A varint is longer than 3 bytes.
    Overlong,
    /// A run has length zero.
    EmptyRun,
    /// A run reaches past the end of the page.
    OutOfBounds,
    /// An XOR patch names a palette entry it does not have, has more than eight, or has
    /// bytes left over.
    BadXor,
}

impl fmt::Display for PatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            PatchError::BadVersion => "unknown patch version",
            PatchError::Truncated => "patch truncated",
            PatchError::Overlong => "overlong varint in patch",
            PatchError::EmptyRun => "empty run in patch",
            PatchError::OutOfBounds => "patch run past end of page",
            PatchError::BadXor => "malformed XOR patch",
        };
        f.write_str(s)
    }
}

struct Writer<'a> {
    out: &'a mut [u8],
    len: usize,
}

impl Writer<'_> {
    #[inline]
    fn byte(&mut self, b: u8) -> Option<()> {
        *self.out.get_mut(self.len)? = b;
        self.len += 1;
        Some(())
    }

    #[inline]
    fn varint(&mut self, mut v: usize) -> Option<()> {
        loop {
            let low = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                return self.byte(low);
            }
            self.byte(low | 0x80)?;
        }
    }

    #[inline]
    fn bytes(&mut self, b: &[u8]) -> Option<()> {
        let end = self.len.checked_add(b.len())?;
        self.out.get_mut(self.len..end)?.copy_from_slice(b);
        self.len = end;
        Some(())
    }
}

/// Encoder state: the output and the cursor (first byte not described yet).
struct Encoder<'a, 'b> {
    w: Writer<'a>,
    target: &'b Page,
    cursor: usize,
}

impl Encoder<'_, '_> {
    fn literal(&mut self, start: usize, end: usize) -> Option<()> {
        self.w.varint(start - self.cursor)?;
        self.w.varint((end - start) << 1)?;
        self.w.bytes(&self.target[start..end])?;
        self.cursor = end;
        Some(())
    }

    fn fill(&mut self, start: usize, end: usize, value: u8) -> Option<()> {
        self.w.varint(start - self.cursor)?;
        self.w.varint(((end - start) << 1) | 1)?;
        self.w.byte(value)?;
        self.cursor = end;
        Some(())
    }

    /// Emits the differing span `[start, end)` as literal and fill runs.
    fn span(&mut self, start: usize, end: usize) -> Option<()> {
        let t = self.target;
        let mut lit_start = start;
        let mut j = start;
        while j < end {
            let b = t[j];
            let mut k = j + 1;
            while k < end && t[k] == b {
                k += 1;
            }
            if k - j >= FILL_MIN {
                if lit_start < j {
                    self.literal(lit_start, j)?;
                }
                self.fill(j, k, b)?;
                lit_start = k;
            }
            j = k;
        }
        if lit_start < end {
            self.literal(lit_start, end)?;
        }
        Some(())
    }
}

/// The little-endian 64-bit word at byte `i` of `p`: one bounds check and one load. (Built byte
/// by byte it was eight checks and, being too large to inline, a call per word on the fault
/// path.)
#[inline(always)]
fn word(p: &Page, i: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&p[i..i + 8]);
    u64::from_le_bytes(bytes)
}

/// Encodes `target` as a patch against `reference` into `out`. Returns the patch length, or
/// `None` when the patch does not fit in `out` (pass a slice as long as the largest patch worth
/// keeping: the encoder stops as soon as it overflows).
pub fn encode(target: &Page, reference: &Page, out: &mut [u8]) -> Option<usize> {
    let mut enc = Encoder {
        w: Writer { out, len: 0 },
        target,
        cursor: 0,
    };
    enc.w.byte(VERSION)?;
    let mut span: Option<(usize, usize)> = None;
    for chunk in 0..PAGE_SIZE / 64 {
        let base = chunk * 64;
        // Equal 64-byte chunks are the common case in a good patch; one memcmp skips them.
        if target[base..base + 64] == reference[base..base + 64] {
            continue;
        }
        for i in (base..base + 64).step_by(8) {
            let x = word(target, i) ^ word(reference, i);
            if x == 0 {
                continue;
            }
            // Little-endian: byte k of the word is bits 8k..8k+8.
            let first = i + (x.trailing_zeros() / 8) as usize;
            let last = i + 7 - (x.leading_zeros() / 8) as usize;
            span = match span {
                Some((s, e)) if first <= e + MERGE_GAP => Some((s, last + 1)),
                Some((s, e)) => {
                    enc.span(s, e)?;
                    Some((first, last + 1))
                }
                None => Some((first, last + 1)),
            };
        }
    }
    if let Some((s, e)) = span {
        enc.span(s, e)?;
    }
    Some(enc.w.len)
}

/// Encodes `target` as an XOR-words patch against `reference` into `out`. Returns the patch
/// length if it fits in `out` and is at most `cutoff` bytes.
pub fn encode_xor(target: &Page, reference: &Page, out: &mut [u8], cutoff: usize) -> Option<usize> {
    let out = out.get_mut(..cutoff.min(out.len()))?;
    let xor = |w: usize| word(target, 8 * w) ^ word(reference, 8 * w);
    // The palette: among the first distinct values, those that save bytes as an entry (8 bytes
    // once, then nothing per use) over literals (their length per use), most used first.
    let mut seen = [(0u64, 0u16); PALETTE_CANDIDATES];
    let mut distinct = 0;
    let mut differing = 0usize;
    for w in 0..WORDS {
        let x = xor(w);
        if x == 0 {
            continue;
        }
        differing += 1;
        match seen[..distinct].iter_mut().find(|(v, _)| *v == x) {
            Some((_, n)) => *n += 1,
            None if distinct < PALETTE_CANDIDATES => {
                seen[distinct] = (x, 1);
                distinct += 1;
            }
            None => {}
        }
    }
    let seen = &mut seen[..distinct];
    // Stable: equal counts keep their first-seen order, so the encoding is deterministic.
    seen.sort_by_key(|&(_, n)| core::cmp::Reverse(n));
    let mut palette = [0u64; PALETTE_MAX];
    let mut count = 0;
    for &(v, n) in seen.iter() {
        if count < PALETTE_MAX && usize::from(n) * literal_len(v) > 8 {
            palette[count] = v;
            count += 1;
        }
    }
    let palette = &palette[..count];

    let nibbles_at = 1 + BITMAP + 1 + 8 * count;
    let literals_at = nibbles_at + differing.div_ceil(2);
    if literals_at > out.len() {
        return None;
    }
    out[..literals_at].fill(0);
    out[0] = VERSION_XOR;
    out[1 + BITMAP] = count as u8;
    for (k, v) in palette.iter().enumerate() {
        let at = 1 + BITMAP + 1 + 8 * k;
        out[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    let mut lit = literals_at;
    let mut k = 0;
    for w in 0..WORDS {
        let x = xor(w);
        if x == 0 {
            continue;
        }
        out[1 + w / 8] |= 1 << (w % 8);
        let nibble = match palette.iter().position(|&v| v == x) {
            Some(p) => p as u8,
            None => {
                let n = literal_len(x);
                out.get_mut(lit..lit + n)?
                    .copy_from_slice(&x.to_le_bytes()[..n]);
                lit += n;
                (n + 7) as u8
            }
        };
        out[nibbles_at + k / 2] |= nibble << (4 * (k % 2));
        k += 1;
    }
    Some(lit)
}

/// Bytes a literal XOR value needs: up to its highest non-zero byte (1..=8).
fn literal_len(x: u64) -> usize {
    (8 - x.leading_zeros() as usize / 8).max(1)
}

/// Per nibble: the mask that keeps a literal's bytes of an 8-byte load (none for a palette
/// entry) and the literal's length.
const LITERAL_MASK: [u64; 16] = {
    let mut m = [0u64; 16];
    let mut n = 1;
    while n <= 8 {
        m[7 + n] = if n == 8 { !0 } else { (1 << (8 * n)) - 1 };
        n += 1;
    }
    m
};
const LITERAL_LEN: [usize; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];

/// [`apply`] of an XOR-words patch (version byte checked by the caller).
///
/// This is on the fault path of most patched pages (hundreds of words each), so the loop per
/// word has no data-dependent branch and no call: the bitmap is walked 64 bits at a time, a
/// literal is one 8-byte load masked to its length (zero-padded past the end of the patch),
/// and a palette entry and a literal are combined by per-nibble masks from two small tables.
/// Malformed input is still caught, outside the loop: a palette nibble past `count` by a
/// pass over the nibbles, literal lengths that do not add up to the bytes there (too many or
/// too few) by where `lit` ends. On error the page may be partly patched, as [`apply`] says.
fn apply_xor(patch: &[u8], page: &mut Page) -> Result<(), PatchError> {
    let bitmap = patch.get(1..1 + BITMAP).ok_or(PatchError::Truncated)?;
    let count = usize::from(*patch.get(1 + BITMAP).ok_or(PatchError::Truncated)?);
    if count > PALETTE_MAX {
        return Err(PatchError::BadXor);
    }
    let palette_at = 1 + BITMAP + 1;
    let nibbles_at = palette_at + 8 * count;
    let palette = patch
        .get(palette_at..nibbles_at)
        .ok_or(PatchError::Truncated)?;
    // Indexed by nibble: the palette, then zeros where the nibbles name literals. Entries
    // past `count` stay zero and are flagged when named.
    let mut entries = [0u64; 16];
    for (entry, bytes) in entries.iter_mut().zip(palette.chunks_exact(8)) {
        *entry = u64_at(bytes, 0);
    }
    let differing: usize = bitmap.iter().map(|b| b.count_ones() as usize).sum();
    let literals_at = nibbles_at + differing.div_ceil(2);
    let nibbles = patch
        .get(nibbles_at..literals_at)
        .ok_or(PatchError::Truncated)?;
    let literals = &patch[literals_at..];
    // Every palette nibble must name an entry: checked in a pass of its own, outside the
    // per-word loop.
    let names_missing_entry = |n: u8| n < 8 && usize::from(n) >= count;
    let bad_entry = count < PALETTE_MAX
        && nibbles.iter().enumerate().any(|(j, &b)| {
            names_missing_entry(b & 0x0f) || (2 * j + 1 < differing && names_missing_entry(b >> 4))
        });
    let mut lit = 0usize;
    let mut k = 0;
    for (i, chunk) in bitmap.chunks_exact(8).enumerate() {
        let mut bits = u64_at(chunk, 0);
        while bits != 0 {
            // Bit b of the little-endian chunk i is bit b % 8 of bitmap byte 8 i + b / 8,
            // that is word 64 i + b. At most 511: the word lies inside the page.
            let w = 64 * i + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let nibble = usize::from(nibbles[k / 2] >> (4 * (k & 1)) & 0x0f);
            k += 1;
            let x = (u64_at(literals, lit) & LITERAL_MASK[nibble]) | entries[nibble];
            // `lit` only grows (at most 8 per word, 512 words): no overflow, and once past
            // the end it stays past it, which the check after the loop sees.
            lit += LITERAL_LEN[nibble];
            let at = 8 * w;
            let v = word(page, at) ^ x;
            page[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
    }
    if lit > literals.len() {
        return Err(PatchError::Truncated);
    }
    if bad_entry || lit != literals.len() {
        return Err(PatchError::BadXor);
    }
    Ok(())
}

/// The little-endian u64 at `at` in `bytes`, zero-padded where `bytes` ends (nothing read
/// past it).
#[inline(always)]
fn u64_at(bytes: &[u8], at: usize) -> u64 {
    match bytes.get(at..at + 8) {
        Some(b) => {
            let mut le = [0u8; 8];
            le.copy_from_slice(b);
            u64::from_le_bytes(le)
        }
        None => {
            let rest = bytes.get(at..).unwrap_or(&[]);
            rest.iter()
                .take(8)
                .enumerate()
                .fold(0, |v, (j, &b)| v | u64::from(b) << (8 * j))
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    #[inline]
    fn byte(&mut self) -> Result<u8, PatchError> {
        let b = *self.data.get(self.at).ok_or(PatchError::Truncated)?;
        self.at += 1;
        Ok(b)
    }

    #[inline]
    fn varint(&mut self) -> Result<usize, PatchError> {
        let mut v = 0usize;
        for shift in [0, 7, 14] {
            let b = self.byte()?;
            v |= ((b & 0x7f) as usize) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(PatchError::Overlong)
    }

    #[inline]
    fn take(&mut self, n: usize) -> Result<&[u8], PatchError> {
        let end = self.at.checked_add(n).ok_or(PatchError::Truncated)?;
        let s = self.data.get(self.at..end).ok_or(PatchError::Truncated)?;
        self.at = end;
        Ok(s)
    }
}

/// Applies `patch` to `page`, which must hold the reference page's bytes. On error `page` may be
/// partly patched; callers decode into a scratch frame and discard it on error.
pub fn apply(patch: &[u8], page: &mut Page) -> Result<(), PatchError> {
    match patch.first() {
        Some(&VERSION) => apply_runs(patch, page),
        Some(&VERSION_XOR) => apply_xor(patch, page),
        _ => Err(PatchError::BadVersion),
    }
}

/// [`apply`] of a runs patch (version byte checked by the caller).
fn apply_runs(patch: &[u8], page: &mut Page) -> Result<(), PatchError> {
    let mut r = Reader { data: patch, at: 1 };
    let mut cursor = 0usize;
    while r.at < patch.len() {
        let skip = r.varint()?;
        let head = r.varint()?;
        let len = head >> 1;
        if len == 0 {
            return Err(PatchError::EmptyRun);
        }
        // varints are < 2^21, so these sums cannot overflow; the bound check is what matters.
        let start = cursor + skip;
        let end = start + len;
        if end > PAGE_SIZE {
            return Err(PatchError::OutOfBounds);
        }
        if head & 1 == 1 {
            let v = r.byte()?;
            page[start..end].fill(v);
        } else {
            page[start..end].copy_from_slice(r.take(len)?);
        }
        cursor = end;
    }
    Ok(())
}

/// Decodes `patch` against `reference` into `out`.
pub fn decode(patch: &[u8], reference: &Page, out: &mut Page) -> Result<(), PatchError> {
    out.copy_from_slice(reference);
    apply(patch, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn page(seed: u8) -> Page {
        let mut p = [0u8; PAGE_SIZE];
        for (i, b) in p.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        p
    }

    fn round_trip(t: &Page, r: &Page) -> usize {
        let mut buf = vec![0u8; 3 * PAGE_SIZE];
        let n = encode(t, r, &mut buf).expect("fits");
        let mut out = [0u8; PAGE_SIZE];
        decode(&buf[..n], r, &mut out).expect("decodes");
        assert_eq!(&out[..], &t[..]);
        n
    }

    #[test]
    fn identical_pages_patch_to_one_byte() {
        let r = page(1);
        assert_eq!(round_trip(&r, &r), 1);
    }

    #[test]
    fn small_changes_make_small_patches() {
        let r = page(1);
        let mut t = r;
        t[0] ^= 1;
        t[100] ^= 0xff;
        t[101] ^= 0xff;
        t[4095] = t[4095].wrapping_add(1);
        let n = round_trip(&t, &r);
        assert!(n <= 1 + 3 * 3 + 4, "{n}");
    }

    #[test]
    fn fills_are_compact() {
        let r = page(1);
        let mut t = r;
        t[1000..3000].fill(0);
        let n = round_trip(&t, &r);
        assert!(n <= 8, "{n}");
        // A fill in the middle of literals.
        let mut t = page(9);
        t[2000..2100].fill(7);
        let n = round_trip(&t, &r);
        assert!(n < PAGE_SIZE, "{n}");
    }

    #[test]
    fn unrelated_pages_round_trip_and_overflow_is_reported() {
        let r = page(1);
        let t = page(77);
        round_trip(&t, &r);
        let mut small = [0u8; 100];
        assert_eq!(encode(&t, &r, &mut small), None);
        assert_eq!(encode(&t, &r, &mut []), None);
    }

    #[test]
    fn malformed_patches_are_rejected() {
        let mut p = page(3);
        assert_eq!(apply(&[], &mut p), Err(PatchError::BadVersion));
        assert_eq!(apply(&[3], &mut p), Err(PatchError::BadVersion));
        assert_eq!(apply(&[2], &mut p), Err(PatchError::Truncated));
        assert_eq!(apply(&[1, 0], &mut p), Err(PatchError::Truncated));
        assert_eq!(apply(&[1, 0, 0], &mut p), Err(PatchError::EmptyRun));
        assert_eq!(apply(&[1, 0, 4, 9], &mut p), Err(PatchError::Truncated));
        assert_eq!(
            apply(&[1, 0x80, 0x80, 0x80], &mut p),
            Err(PatchError::Overlong)
        );
        // skip 4095, then a 2-byte fill: past the end.
        assert_eq!(
            apply(&[1, 0xff, 0x1f, 5, 1], &mut p),
            Err(PatchError::OutOfBounds)
        );
        // skip 4095, then a 1-byte fill: fine.
        assert_eq!(apply(&[1, 0xff, 0x1f, 3, 1], &mut p), Ok(()));
        assert_eq!(p[4095], 1);
        // XOR patches: cut short, a palette too long, a missing entry, bytes left over.
        let mut buf = vec![0u8; PAGE_SIZE];
        let (r, t) = (page(3), records_pair().1);
        let n = encode_xor(&t, &r, &mut buf, PAGE_SIZE).unwrap();
        let mut q = r;
        assert_eq!(apply(&buf[..n - 1], &mut q), Err(PatchError::Truncated));
        assert_eq!(
            decode(&buf[..n - 1], &r, &mut q),
            Err(PatchError::Truncated)
        );
        let mut long = buf[..n].to_vec();
        long.push(0);
        assert_eq!(decode(&long, &r, &mut q), Err(PatchError::BadXor));
        let mut header = vec![VERSION_XOR];
        header.extend_from_slice(&[0u8; BITMAP]);
        header.push(9);
        assert_eq!(decode(&header, &r, &mut q), Err(PatchError::BadXor));
        // One differing word whose nibble names palette entry 0 of an empty palette.
        let mut missing = vec![VERSION_XOR, 1];
        missing.extend_from_slice(&[0u8; BITMAP - 1]);
        missing.extend_from_slice(&[0, 0]);
        assert_eq!(decode(&missing, &r, &mut q), Err(PatchError::BadXor));
        // The same word as a 1-byte literal (nibble 8) is fine.
        let mut literal = missing.clone();
        *literal.last_mut().unwrap() = 8;
        literal.push(0x5a);
        decode(&literal, &r, &mut q).unwrap();
        assert_eq!(q[0], r[0] ^ 0x5a);
        assert_eq!(q[1..], r[1..]);
        // Its literal cut off: the lengths add up past the end.
        assert_eq!(
            decode(&literal[..literal.len() - 1], &r, &mut q),
            Err(PatchError::Truncated)
        );
        // Many literals (most read by the 8-byte fast path), then a missing palette entry
        // named by the last word: still caught.
        let (a, b) = (noise(1), noise(2));
        let mut buf = vec![0u8; 2 * PAGE_SIZE];
        let n = encode_xor(&a, &b, &mut buf, 2 * PAGE_SIZE).unwrap();
        assert_eq!(buf[1 + BITMAP], 0, "unrelated pages need no palette");
        decode(&buf[..n], &b, &mut q).unwrap();
        assert!(q == a);
        let last_nibble = 1 + BITMAP + 1 + (WORDS - 1) / 2;
        let mut bad = buf[..n].to_vec();
        let literal_len = usize::from(bad[last_nibble] >> 4) - 7;
        bad[last_nibble] &= 0x0f;
        bad.truncate(n - literal_len);
        assert_eq!(decode(&bad, &b, &mut q), Err(PatchError::BadXor));
    }

    /// Pseudo-random words (xorshift64): two such pages differ in every word, each by its
    /// own XOR value.
    fn noise(seed: u64) -> Page {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut p = [0u8; PAGE_SIZE];
        for w in p.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        p
    }

    /// Records whose pointers all moved by the same amount (another kernel layout).
    fn records(base: u64) -> Page {
        let mut p = [0u8; PAGE_SIZE];
        for (k, w) in p.chunks_exact_mut(8).enumerate() {
            let v = if k % 2 == 0 {
                base + 64 * k as u64
            } else {
                k as u64 & 7
            };
            w.copy_from_slice(&v.to_le_bytes());
        }
        p
    }

    /// A reference of records and the same records after their pointers moved.
    fn records_pair() -> (Page, Page) {
        (
            records(0xffff_ea00_0120_0000),
            records(0xffff_f77f_c00c_0000),
        )
    }

    #[test]
    fn xor_patches_store_moved_pointers_small_and_round_trip() {
        let (r, t) = records_pair();
        let mut buf = vec![0u8; 3 * PAGE_SIZE];
        let runs = encode(&t, &r, &mut buf).unwrap();
        let n = encode_xor(&t, &r, &mut buf, PAGE_SIZE).unwrap();
        // 256 moved pointers, one XOR value: bitmap, one palette entry, 128 nibble bytes.
        assert_eq!(n, 1 + BITMAP + 1 + 8 + 128, "runs {runs}");
        assert!(runs > 1000, "runs {runs}");
        assert_eq!(buf[0], VERSION_XOR);
        let mut out = [0u8; PAGE_SIZE];
        decode(&buf[..n], &r, &mut out).unwrap();
        assert!(out == t);
        let mut patched = r;
        apply(&buf[..n], &mut patched).unwrap();
        assert!(patched == t);
        // The cutoff and the output length are both limits.
        assert_eq!(encode_xor(&t, &r, &mut buf, n - 1), None);
        assert_eq!(encode_xor(&t, &r, &mut buf, n), Some(n));
        assert_eq!(encode_xor(&t, &r, &mut buf[..64], PAGE_SIZE), None);
        // Unrelated pages: every word a literal, still exact.
        let (a, b) = (page(1), page(200));
        let n = encode_xor(&a, &b, &mut buf, 3 * PAGE_SIZE).unwrap();
        decode(&buf[..n], &b, &mut out).unwrap();
        assert!(out == a);
        // Identical pages: just the header.
        assert_eq!(
            encode_xor(&a, &a, &mut buf, PAGE_SIZE),
            Some(1 + BITMAP + 1)
        );
    }
}
