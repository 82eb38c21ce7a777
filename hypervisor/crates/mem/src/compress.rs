//! Page compression with LZ4 (lz4_flex block format, no frame header: the engine knows every
//! compressed blob decodes to exactly one page).
//!
//! Decompression is checked: lz4_flex's safe decoder with `checked-decode` bounds-checks every
//! copy, and this module additionally insists the output is exactly one page long.

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
    match lz4_flex::block::decompress_into(data, out) {
        Ok(PAGE_SIZE) => Ok(()),
        _ => Err(DecompressError),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

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
