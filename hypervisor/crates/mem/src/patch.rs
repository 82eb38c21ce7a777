//! Page patches: a page stored as its differences against an immutable reference page.
//!
//! # Format (version 1)
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
//! The encoder compares 8-byte words, trims differing words to the differing bytes, merges spans
//! separated by at most [`MERGE_GAP`] equal bytes (a new run header costs at least as much), and
//! turns repeats of one byte of at least [`FILL_MIN`] bytes into fill runs (a page zeroed or
//! memset over part of the reference patches to a few bytes).

use crate::backend::{Page, PAGE_SIZE};
use core::fmt;

/// The format version byte.
pub const VERSION: u8 = 1;
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
}

impl fmt::Display for PatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            PatchError::BadVersion => "unknown patch version",
            PatchError::Truncated => "patch truncated",
            PatchError::Overlong => "overlong varint in patch",
            PatchError::EmptyRun => "empty run in patch",
            PatchError::OutOfBounds => "patch run past end of page",
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
    let mut r = Reader { data: patch, at: 0 };
    if r.byte().map_err(|_| PatchError::BadVersion)? != VERSION {
        return Err(PatchError::BadVersion);
    }
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
        assert_eq!(apply(&[2], &mut p), Err(PatchError::BadVersion));
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
    }
}
