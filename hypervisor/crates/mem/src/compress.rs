//! Page compression with LZ4 (block format, no frame header: the engine knows every compressed
//! blob decodes to exactly one page).
//!
//! Compression is `lz4_flex`'s block encoder. Decompression is this module's own LZ4 block
//! decoder, because a fault-in waits for it and guest pages are full of the one case the crate's
//! decoder is slow at: a match that overlaps its own output (a run of one byte, or a page that
//! repeats a short pattern: LZ4 writes both as a match whose offset is shorter than its length).
//! `lz4_flex` copies such a match one byte at a time, about 8 µs for a page of them; on the
//! project's heterogeneous guest corpus 6-26% of compressed pages are such pages, and they
//! made the fault-in tail (docs/benchmarks.md, "Memory multiplexing"). Here an overlapping
//! match is filled (offset 1) or copied in chunks that double from the repeating period, and
//! short literals and matches use one fixed 16-byte copy.
//!
//! The decoder is safe code and total: every read and write is bounds-checked, a zero or
//! too-far offset, a length past the page, a truncated sequence and an output that is not
//! exactly one page are all [`DecompressError`]. Its tests check it against `lz4_flex`'s own
//! decoder on real and arbitrary input.

use crate::backend::{Page, PAGE_SIZE};
use core::fmt;

/// Largest LZ4 block a page can compress to (LZ4's worst case for 4096 input bytes).
pub const MAX_COMPRESSED: usize = lz4_flex::block::get_maximum_output_size(PAGE_SIZE);

/// The compressed bytes do not decode to one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecompressError;

impl fmt::Display for DecompressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("compressed page is corrupt")
    }
}

/// Compresses `page` into `out`, which must hold at least [`MAX_COMPRESSED`] bytes (the LZ4
/// encoder insists on room for the worst case). Returns the compressed length if it is at most
/// `cutoff`, else `None` (also `None` if `out` is too short).
pub fn compress(page: &Page, out: &mut [u8], cutoff: usize) -> Option<usize> {
    match lz4_flex::block::compress_into(page, out) {
        Ok(n) if n <= cutoff => Some(n),
        _ => None,
    }
}

/// Decompresses `data` into `out`. Total: any input either yields exactly one page or an error.
pub fn decompress(data: &[u8], out: &mut Page) -> Result<(), DecompressError> {
    let mut ip = 0usize;
    let mut op = 0usize;
    loop {
        let token = *data.get(ip).ok_or(DecompressError)?;
        ip += 1;

        // The common sequence: under 15 literals, a match under 19 bytes, far from both ends.
        // Fixed-size copies (the bytes past the real lengths are overwritten by what follows:
        // a decode that succeeds writes every byte of the page in order), no length bytes, and
        // never the last sequence (that one ends the input right after its literals).
        if token >> 4 < 15
            && token & 0x0f < 15
            && ip + FAST_IN <= data.len()
            && op + FAST_OUT <= PAGE_SIZE
        {
            let lit = usize::from(token >> 4);
            out[op..op + WILD].copy_from_slice(&data[ip..ip + WILD]);
            ip += lit;
            op += lit;
            let offset = usize::from(u16::from_le_bytes([data[ip], data[ip + 1]]));
            ip += 2;
            let len = usize::from(token & 0x0f) + MIN_MATCH;
            if offset == 0 || offset > op {
                return Err(DecompressError);
            }
            if offset >= len {
                copy_fixed::<SHORT_MATCH>(out, op - offset, op);
            } else {
                copy_match(out, op, offset, len);
            }
            op += len;
            continue;
        }

        // Literals: copied from the input.
        let lit = read_length(data, &mut ip, usize::from(token >> 4))?;
        if lit <= WILD && ip + WILD <= data.len() && op + WILD <= PAGE_SIZE {
            // One fixed-size copy; the bytes past `lit` are overwritten by what follows (a
            // decode that succeeds writes every byte of the page in order).
            out[op..op + WILD].copy_from_slice(&data[ip..ip + WILD]);
        } else {
            let src = data.get(ip..ip + lit).ok_or(DecompressError)?;
            out.get_mut(op..op + lit)
                .ok_or(DecompressError)?
                .copy_from_slice(src);
        }
        ip += lit;
        op += lit;
        if ip == data.len() {
            // The last sequence has literals only.
            break;
        }

        // Match: `offset` bytes back in the output, at least 4 bytes long.
        let offset = match data.get(ip..ip + 2) {
            Some(&[lo, hi]) => usize::from(u16::from_le_bytes([lo, hi])),
            _ => return Err(DecompressError),
        };
        ip += 2;
        if offset == 0 || offset > op {
            return Err(DecompressError);
        }
        let len = read_length(data, &mut ip, usize::from(token & 0x0f))? + MIN_MATCH;
        if len > PAGE_SIZE - op {
            return Err(DecompressError);
        }
        copy_match(out, op, offset, len);
        op += len;
    }
    if op == PAGE_SIZE {
        Ok(())
    } else {
        Err(DecompressError)
    }
}

/// Bytes moved by one fixed-size copy of a short literal run or match.
const WILD: usize = 16;
/// The longest match a token holds without length bytes (15 + [`MIN_MATCH`]).
const SHORT_MATCH: usize = 18;
/// Input the fast path may touch: token already read, up to 14 literals (copied as [`WILD`]),
/// the 2-byte offset.
const FAST_IN: usize = WILD + 2;
/// Output the fast path may touch: 14 literals then an 18-byte copy, rounded up.
const FAST_OUT: usize = 32;
/// LZ4's shortest match; the token stores the length minus this.
const MIN_MATCH: usize = 4;

/// A sequence length: the token's nibble, and if that is 15, more bytes added while they are 255.
#[inline]
fn read_length(data: &[u8], ip: &mut usize, nibble: usize) -> Result<usize, DecompressError> {
    let mut len = nibble;
    if nibble == 15 {
        loop {
            let b = *data.get(*ip).ok_or(DecompressError)?;
            *ip += 1;
            len += usize::from(b);
            if b != 255 {
                break;
            }
            // Nothing longer fits in a page; stop before a long input could grow `len` further.
            if len > PAGE_SIZE {
                return Err(DecompressError);
            }
        }
    }
    Ok(len)
}

/// Copies `N` bytes of the output from `start` to `op` (`start < op`) through a buffer: one
/// fixed-size copy for a match of at most `N` bytes whose source ends before `op`. The bytes
/// past the match's real length are read from output not yet final and overwritten later (a
/// decode that succeeds writes every byte of the page in order).
#[inline(always)]
fn copy_fixed<const N: usize>(out: &mut Page, start: usize, op: usize) {
    let mut chunk = [0u8; N];
    chunk.copy_from_slice(&out[start..start + N]);
    out[op..op + N].copy_from_slice(&chunk);
}

/// Copies `len` bytes from `offset` bytes back to `op`, with LZ4's meaning when the two
/// overlap (each output byte equals the byte `offset` before it). The caller has checked
/// `1 <= offset <= op` and `op + len <= PAGE_SIZE`.
#[inline]
fn copy_match(out: &mut Page, op: usize, offset: usize, len: usize) {
    let start = op - offset;
    if offset >= len {
        if len <= WILD && op + WILD <= PAGE_SIZE {
            copy_fixed::<WILD>(out, start, op);
        } else {
            out.copy_within(start..start + len, op);
        }
    } else if offset == 1 {
        let b = out[start];
        out[op..op + len].fill(b);
    } else {
        // The output repeats with period `offset` from `start` on. Copy whole periods, each
        // copy twice as long as the last: its source [start, start + n) lies entirely in
        // bytes already written, and `done` stays a multiple of `offset`, so the copy lands
        // in phase.
        let mut done = 0;
        while done < len {
            let n = (offset + done).min(len - done);
            out.copy_within(start..start + n, op + done);
            done += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;

    #[test]
    fn round_trip_and_cutoff() {
        let mut page = [0u8; PAGE_SIZE];
        for (i, b) in page.iter_mut().enumerate() {
            *b = (i / 64) as u8;
        }
        let mut buf = vec![0u8; MAX_COMPRESSED];
        let n = compress(&page, &mut buf, PAGE_SIZE).unwrap();
        assert!(n < 512, "{n}");
        let mut out = [1u8; PAGE_SIZE];
        decompress(&buf[..n], &mut out).unwrap();
        assert_eq!(out, page);
        // A cutoff below the size, or too small an output, is a clean refusal.
        assert_eq!(compress(&page, &mut buf, n - 1), None);
        assert_eq!(compress(&page, &mut buf[..8], PAGE_SIZE), None);
        // A truncated block is an error, not a panic.
        assert_eq!(decompress(&buf[..n - 1], &mut out), Err(DecompressError));
        assert_eq!(decompress(&[], &mut out), Err(DecompressError));
    }

    #[test]
    fn whole_page_patterns_round_trip() {
        // A page repeating a pattern of any period is one long self-overlapping match.
        let mut buf = vec![0u8; MAX_COMPRESSED];
        for period in 1..=80usize {
            let mut page = [0u8; PAGE_SIZE];
            for (i, b) in page.iter_mut().enumerate() {
                *b = 0x80 ^ (i % period) as u8;
            }
            let n = compress(&page, &mut buf, PAGE_SIZE).unwrap();
            let mut out = [0u8; PAGE_SIZE];
            decompress(&buf[..n], &mut out).unwrap();
            assert!(out == page, "period {period}");
        }
    }

    /// A hand-written block: `lit` literal bytes, then a match (offset, extra length bytes).
    fn block(lit: &[u8], offset: u16, match_len: usize, tail: &[u8]) -> Vec<u8> {
        let mut b = vec![];
        let m = match_len - MIN_MATCH;
        b.push(((lit.len().min(15) as u8) << 4) | m.min(15) as u8);
        assert!(lit.len() < 15);
        b.extend_from_slice(lit);
        b.extend_from_slice(&offset.to_le_bytes());
        if m >= 15 {
            let mut rest = m - 15;
            while rest >= 255 {
                b.push(255);
                rest -= 255;
            }
            b.push(rest as u8);
        }
        b.push((tail.len() as u8) << 4);
        b.extend_from_slice(tail);
        b
    }

    #[test]
    fn malformed_blocks_are_errors() {
        let mut out = [0u8; PAGE_SIZE];
        let page_len = PAGE_SIZE - 1 - 5;
        // Well formed: one literal, a match of the rest but 5, 5 trailing literals.
        let good = block(&[7], 1, page_len, &[1, 2, 3, 4, 5]);
        decompress(&good, &mut out).unwrap();
        assert!(out[..PAGE_SIZE - 5].iter().all(|&b| b == 7));
        assert_eq!(&out[PAGE_SIZE - 5..], &[1, 2, 3, 4, 5]);
        // Offset 0, and an offset reaching before the page.
        assert!(decompress(&block(&[7], 0, page_len, &[1, 2, 3, 4, 5]), &mut out).is_err());
        assert!(decompress(&block(&[7], 2, page_len, &[1, 2, 3, 4, 5]), &mut out).is_err());
        // A match past the end of the page; one page short; bytes after the page is full.
        assert!(decompress(&block(&[7], 1, page_len + 1, &[1, 2, 3, 4, 5]), &mut out).is_err());
        assert!(decompress(&block(&[7], 1, page_len - 1, &[1, 2, 3, 4, 5]), &mut out).is_err());
        assert!(decompress(&block(&[7], 1, page_len, &[1, 2, 3, 4, 5, 6]), &mut out).is_err());
        // Truncated inside the offset, and inside the length bytes.
        assert!(decompress(&good[..3], &mut out).is_err());
        assert!(decompress(&good[..5], &mut out).is_err());
        // A length made of 255s longer than any page is refused early.
        let mut long = vec![0x0f, 0, 1, 0];
        long.extend(core::iter::repeat_n(255u8, 64));
        assert!(decompress(&long, &mut out).is_err());
    }

    #[test]
    fn random_data_does_not_fit_a_cutoff() {
        let mut page = [0u8; PAGE_SIZE];
        let mut x = 0x1234_5678_9abc_def0u64;
        for b in page.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let mut buf = vec![0u8; MAX_COMPRESSED];
        assert_eq!(compress(&page, &mut buf, 3 * PAGE_SIZE / 4), None);
        let n = compress(&page, &mut buf, MAX_COMPRESSED).unwrap();
        assert!(n > PAGE_SIZE, "random data grows: {n}");
    }
}
