//! Page patches: a page stored as its differences against an immutable reference page.
//!
//! Two encodings, told apart by the first byte; the engine keeps the smaller:
//! - **runs** (version 1): the differing byte runs, for pages that differ in a few places;
//! - **XOR** (version 2): the LZ4 block ([`crate::compress`]) of the page XOR the reference, for
//!   pages that differ a little *everywhere* the same way: records holding kernel pointers of
//!   another layout ([`crate::page::normalize_pointer`]) differ in two to four bytes of every
//!   pointer, each a run of its own, while their XOR is a short pattern repeated.
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
//! # Format: XOR (version 2)
//!
//! ```text
//! patch   := VERSION_XOR lz4         VERSION_XOR = 0x02
//! lz4     := an LZ4 block that decodes to exactly one page: target XOR reference
//! ```
//!
//! Decoding it needs a scratch page for the XOR ([`apply`]); it is as total as the runs: the
//! LZ4 decoder is checked ([`crate::compress::decompress`]).
//!
//! The runs encoder compares 8-byte words, trims differing words to the differing bytes, merges spans
//! separated by at most [`MERGE_GAP`] equal bytes (a new run header costs at least as much), and
//! turns repeats of one byte of at least [`FILL_MIN`] bytes into fill runs (a page zeroed or
//! memset over part of the reference patches to a few bytes).

use crate::backend::{Page, PAGE_SIZE};
use crate::compress::{self, MAX_COMPRESSED};
use core::fmt;

/// The format byte of a runs patch.
pub const VERSION: u8 = 1;
/// The format byte of an XOR patch.
pub const VERSION_XOR: u8 = 2;
/// Room an output buffer needs for [`encode_xor`] (the LZ4 encoder wants its worst case).
pub const XOR_SCRATCH: usize = 1 + MAX_COMPRESSED;
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
    /// The LZ4 block of an XOR patch does not decode to one page.
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
            PatchError::BadXor => "XOR patch does not decompress to a page",
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

#[inline]
fn word(p: &Page, i: usize) -> u64 {
    u64::from_le_bytes([
        p[i],
        p[i + 1],
        p[i + 2],
        p[i + 3],
        p[i + 4],
        p[i + 5],
        p[i + 6],
        p[i + 7],
    ])
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

/// Encodes `target` as an XOR patch against `reference` into `out` (at least [`XOR_SCRATCH`]
/// bytes), using `xor` as scratch. Returns the patch length if it is at most `cutoff`.
pub fn encode_xor(
    target: &Page,
    reference: &Page,
    xor: &mut Page,
    out: &mut [u8],
    cutoff: usize,
) -> Option<usize> {
    xor_into(xor, target, reference);
    let (version, body) = out.split_first_mut()?;
    *version = VERSION_XOR;
    let n = compress::compress(xor, body, cutoff.checked_sub(1)?)?;
    Some(n + 1)
}

/// `out = a ^ b` (a byte loop over whole pages: the compiler vectorizes it).
fn xor_into(out: &mut Page, a: &Page, b: &Page) {
    for (o, (x, y)) in out.iter_mut().zip(a.iter().zip(b.iter())) {
        *o = x ^ y;
    }
}

/// `page ^= delta`.
fn xor_in_place(page: &mut Page, delta: &Page) {
    for (p, d) in page.iter_mut().zip(delta.iter()) {
        *p ^= d;
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

/// Applies `patch` to `page`, which must hold the reference page's bytes; `scratch` holds the
/// XOR of an XOR patch. On error `page` may be partly patched; callers decode into a scratch
/// frame and discard it on error.
pub fn apply(patch: &[u8], page: &mut Page, scratch: &mut Page) -> Result<(), PatchError> {
    match patch.first() {
        Some(&VERSION) => apply_runs(patch, page),
        Some(&VERSION_XOR) => {
            compress::decompress(&patch[1..], scratch).map_err(|_| PatchError::BadXor)?;
            xor_in_place(page, scratch);
            Ok(())
        }
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
    match patch.first() {
        Some(&VERSION) => {
            out.copy_from_slice(reference);
            apply_runs(patch, out)
        }
        Some(&VERSION_XOR) => {
            compress::decompress(&patch[1..], out).map_err(|_| PatchError::BadXor)?;
            xor_in_place(out, reference);
            Ok(())
        }
        _ => Err(PatchError::BadVersion),
    }
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
        let mut s = [0u8; PAGE_SIZE];
        assert_eq!(apply(&[], &mut p, &mut s), Err(PatchError::BadVersion));
        assert_eq!(apply(&[3], &mut p, &mut s), Err(PatchError::BadVersion));
        assert_eq!(apply(&[2], &mut p, &mut s), Err(PatchError::BadXor));
        assert_eq!(apply(&[1, 0], &mut p, &mut s), Err(PatchError::Truncated));
        assert_eq!(apply(&[1, 0, 0], &mut p, &mut s), Err(PatchError::EmptyRun));
        assert_eq!(
            apply(&[1, 0, 4, 9], &mut p, &mut s),
            Err(PatchError::Truncated)
        );
        assert_eq!(
            apply(&[1, 0x80, 0x80, 0x80], &mut p, &mut s),
            Err(PatchError::Overlong)
        );
        // skip 4095, then a 2-byte fill: past the end.
        assert_eq!(
            apply(&[1, 0xff, 0x1f, 5, 1], &mut p, &mut s),
            Err(PatchError::OutOfBounds)
        );
        // skip 4095, then a 1-byte fill: fine.
        assert_eq!(apply(&[1, 0xff, 0x1f, 3, 1], &mut p, &mut s), Ok(()));
        assert_eq!(p[4095], 1);
        // An XOR patch whose LZ4 block is cut short.
        let mut xor = [0u8; PAGE_SIZE];
        let mut buf = vec![0u8; XOR_SCRATCH];
        let n = encode_xor(&page(9), &page(3), &mut xor, &mut buf, PAGE_SIZE).unwrap();
        assert_eq!(
            apply(&buf[..n - 1], &mut p, &mut s),
            Err(PatchError::BadXor)
        );
        assert_eq!(
            decode(&buf[..n - 1], &page(3), &mut s),
            Err(PatchError::BadXor)
        );
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

    #[test]
    fn xor_patches_store_moved_pointers_small_and_round_trip() {
        let r = records(0xffff_ea00_0120_0000);
        let t = records(0xffff_f77f_c00c_9000);
        let mut buf = vec![0u8; XOR_SCRATCH];
        let runs = encode(&t, &r, &mut buf).unwrap();
        let mut xor = [0u8; PAGE_SIZE];
        let n = encode_xor(&t, &r, &mut xor, &mut buf, PAGE_SIZE).unwrap();
        assert!(n < 100 && runs > 1000, "xor {n} bytes, runs {runs} bytes");
        assert_eq!(buf[0], VERSION_XOR);
        let mut out = [0u8; PAGE_SIZE];
        decode(&buf[..n], &r, &mut out).unwrap();
        assert!(out == t);
        let mut scratch = [0u8; PAGE_SIZE];
        let mut page = r;
        apply(&buf[..n], &mut page, &mut scratch).unwrap();
        assert!(page == t);
        // The cutoff counts the version byte; an output too short is a refusal.
        assert_eq!(encode_xor(&t, &r, &mut xor, &mut buf, n - 1), None);
        assert_eq!(encode_xor(&t, &r, &mut xor, &mut buf, n), Some(n));
        assert_eq!(
            encode_xor(&t, &r, &mut xor, &mut buf[..64], PAGE_SIZE),
            None
        );
    }
}
