//! Warm cost of the two decoders a fault-in runs: LZ4 decompression of an image's pages, and
//! applying XOR-words patches. Everything is in the cache (each input is decoded once before
//! the timed decode), so this is the code's own cost; `examples/fault_cost.rs` and the
//! benchmark measure fault-ins with cold memory around them.
//!
//! ```text
//! cargo run --release -p hv-mem --example codec_cost -- IMAGE...
//! ```
//!
//! Decompression: every non-zero page of each image that LZ4 compresses under the engine's
//! default cutoff, by compressed size. Patches: synthetic pages (pseudo-random words; the
//! target differs from the reference in a given number of words, 2 in 5 of them by one shared
//! XOR value as moved kernel pointers do, the others by 1-3 random low bytes), since the
//! decoder's cost depends only on how many words differ and how.

use hv_mem::compress::{compress, decompress, MAX_COMPRESSED};
use hv_mem::{patch, Config, Page, PAGE_SIZE};
use std::hint::black_box;
use std::time::Instant;

/// Nearest-rank percentile of sorted nanoseconds, in microseconds.
fn us(sorted: &[u64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize] as f64 / 1000.0
}

fn decompression(path: &str) {
    let image = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let cutoff = Config::default().compress_cutoff;
    let mut buf = vec![0u8; MAX_COMPRESSED];
    let mut out: Page = [0; PAGE_SIZE];
    // (compressed bytes, warm decode ns)
    let mut samples = Vec::new();
    for page in image.chunks_exact(PAGE_SIZE) {
        let page: &Page = page.try_into().expect("a page");
        if hv_mem::page::is_zero(page) {
            continue;
        }
        let Some(n) = compress(page, &mut buf, cutoff) else {
            continue;
        };
        decompress(&buf[..n], &mut out).expect("own output decodes");
        let t = Instant::now();
        decompress(black_box(&buf[..n]), &mut out).expect("own output decodes");
        samples.push((n, t.elapsed().as_nanos() as u64));
    }
    println!(
        "{path}: {} compressed pages, warm decompression:",
        samples.len()
    );
    for (lo, hi) in [
        (0, 512),
        (512, 1024),
        (1024, 2048),
        (2048, PAGE_SIZE),
        (0, PAGE_SIZE),
    ] {
        let mut v: Vec<u64> = samples
            .iter()
            .filter(|&&(n, _)| n >= lo && n < hi)
            .map(|&(_, ns)| ns)
            .collect();
        if v.is_empty() {
            continue;
        }
        v.sort_unstable();
        let band = if hi - lo == PAGE_SIZE {
            "all".to_string()
        } else {
            format!("{lo}-{hi} B")
        };
        println!(
            "  {band:>12}: n {:>6}  p50 {:5.2} us  p90 {:5.2} us  p99 {:5.2} us",
            v.len(),
            us(&v, 0.5),
            us(&v, 0.9),
            us(&v, 0.99)
        );
    }
}

/// xorshift64: the pseudo-random words of the synthetic pages.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn xor_patches() {
    println!("XOR-words patches, warm apply (synthetic pages):");
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut reference: Page = [0; PAGE_SIZE];
    for w in reference.chunks_exact_mut(8) {
        w.copy_from_slice(&next(&mut x).to_le_bytes());
    }
    for differing in [64usize, 128, 256, 512] {
        let mut target = reference;
        // Every (512 / differing)-th word differs.
        for (k, w) in target.chunks_exact_mut(8).enumerate() {
            if k % (PAGE_SIZE / 8 / differing) != 0 {
                continue;
            }
            let delta = if k % 5 < 2 {
                0x0000_0040_0000_0000
            } else {
                next(&mut x) & 0xff_ffff | 1
            };
            let v = u64::from_le_bytes(w.try_into().expect("8 bytes")) ^ delta;
            w.copy_from_slice(&v.to_le_bytes());
        }
        let mut buf = vec![0u8; 2 * PAGE_SIZE];
        let n = patch::encode_xor(&target, &reference, &mut buf, 2 * PAGE_SIZE).expect("fits");
        let p = &buf[..n];
        let mut page = reference;
        let rounds = 100_000;
        let t = Instant::now();
        for _ in 0..rounds {
            // Applying twice restores the reference: XOR is its own inverse.
            patch::apply(black_box(p), &mut page).expect("valid patch");
        }
        let ns = t.elapsed().as_nanos() as f64 / rounds as f64;
        assert!(page == reference || page == target);
        println!(
            "  {differing:>3} differing words, {n:>4} B patch: {:5.2} us, {:.2} ns per word",
            ns / 1000.0,
            ns / differing as f64
        );
    }
}

fn main() {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    for path in &paths {
        decompression(path);
    }
    xor_patches();
}
