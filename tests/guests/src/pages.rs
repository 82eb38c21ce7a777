//! Page contents that look like a guest's memory to the memory engine, regenerated exactly for
//! checks: zero pages, pages identical in every VM, pages identical but for 16 bytes (similar:
//! patch material), text unique to the VM but compressible, and pseudo-random bytes unique to
//! the VM. `memmux` and `idler` fill their memory with them and verify it.
//!
//! [`Mix::Linux`] takes its fractions from real guests: what the memory engine made of the
//! heterogeneous corpus of `cargo xtask corpus` (8 idle Linux guests of 256 MiB, 524,288 pages;
//! docs/benchmarks.md, "bench mem"): 63.0% zero pages (330,157), 14.1% identical to a page of
//! another VM (74,079: kernel text and the like), 9.6% patched against a similar page (50,373),
//! 9.3% compressed (48,898, to 1.9 KiB on average) and 4.0% left as they were (20,781).

/// Bytes per page.
pub const PAGE: usize = 4096;

/// Which contents a region gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// The five kinds in turn, as a guest's memory holds them.
    Guest,
    /// Pseudo-random bytes unique to the VM in every page: nothing to share, patch or
    /// compress, so every page needs a frame of its own.
    Random,
    /// The kinds in the proportions of idle Linux guests (see the module docs), spread over the
    /// region by a hash of the page number. Zero pages are left unwritten when they read as
    /// zero already (a guest's free memory is memory it never wrote), and compressible pages
    /// are half random, half text, to compress to about half a page as the corpus's did.
    Linux,
}

impl Mix {
    /// The mix named `name` (`guest`, `random` or `linux`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "guest" => Some(Self::Guest),
            "random" => Some(Self::Random),
            "linux" => Some(Self::Linux),
            _ => None,
        }
    }
}

/// xorshift64*: cheap, deterministic, full-period.
pub fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Per mille of [`Mix::Linux`] pages of each kind: zero, identical, similar, compressible
/// (half of it), random.
const LINUX_PER_MILLE: [u64; 5] = [630, 141, 96, 93, 40];

/// The kind of page `k` in [`Mix::Linux`]: 0 zero, 1 identical, 2 similar, 5 half compressible,
/// 4 random.
fn linux_kind(k: u64) -> u64 {
    let mut bucket = (k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % 1000;
    for (kind, share) in [0, 1, 2, 5, 4].into_iter().zip(LINUX_PER_MILLE) {
        if bucket < share {
            return kind;
        }
        bucket -= share;
    }
    4
}

/// The content of page `k` for VM `seed`, and, once `touched`, with the byte the write phase
/// changes.
pub fn fill(page: &mut [u8; PAGE], k: u64, seed: u64, touched: bool, mix: Mix) {
    let kind = match mix {
        Mix::Guest => k % 5,
        Mix::Random => 4,
        Mix::Linux => linux_kind(k),
    };
    match kind {
        // Reading first keeps a never-written page on the hypervisor's zero frame.
        0 if mix == Mix::Linux => {
            if page.iter().any(|&b| b != 0) {
                page.fill(0);
            }
        }
        0 => page.fill(0),
        5 => {
            let mut s = (seed << 32 ^ k).wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1;
            let (noise, text) = page.split_at_mut(PAGE / 2);
            for chunk in noise.chunks_exact_mut(8) {
                chunk.copy_from_slice(&next(&mut s).to_le_bytes());
            }
            fill_text(text, k, seed);
        }
        1 | 2 => {
            let mut s = k.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for chunk in page.chunks_exact_mut(8) {
                chunk.copy_from_slice(&next(&mut s).to_le_bytes());
            }
            if kind == 2 {
                let at = (seed as usize * 64) % (PAGE - 16);
                page[at..at + 16].fill(seed as u8 ^ 0xa5);
            }
        }
        3 => fill_text(page, k, seed),
        _ => {
            let mut s = (seed << 32 ^ k).wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1;
            for chunk in page.chunks_exact_mut(8) {
                chunk.copy_from_slice(&next(&mut s).to_le_bytes());
            }
        }
    }
    if touched {
        page[(k as usize * 7) % PAGE] ^= 0x5a;
    }
}

/// Text that names the VM and the page, one 32-byte line over and over.
fn fill_text(bytes: &mut [u8], k: u64, seed: u64) {
    let mut line = [0u8; 32];
    let text = b"vm seed=0000 page=000000 text. ";
    line[..text.len()].copy_from_slice(text);
    line[8..12].copy_from_slice(&digits::<4>(seed));
    line[18..24].copy_from_slice(&digits::<6>(k));
    for chunk in bytes.chunks_exact_mut(32) {
        chunk.copy_from_slice(&line);
    }
}

fn digits<const N: usize>(mut v: u64) -> [u8; N] {
    let mut out = [b'0'; N];
    for d in out.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out
}

/// FNV-1a over 8-byte words: order-sensitive, enough to catch any changed byte.
pub fn checksum(bytes: &[u8]) -> u64 {
    bytes.chunks_exact(8).fold(0xcbf2_9ce4_8422_2325, |h, w| {
        (h ^ u64::from_le_bytes(w.try_into().unwrap_or([0; 8]))).wrapping_mul(0x100_0000_01b3)
    })
}

/// The checksum the region must have: every page regenerated.
pub fn expected(pages: u64, seed: u64, touched: bool, mix: Mix) -> u64 {
    let mut page = [0u8; PAGE];
    let mut h = 0u64;
    for k in 0..pages {
        fill(&mut page, k, seed, touched, mix);
        h = h.rotate_left(5) ^ checksum(&page);
    }
    h
}

pub fn region_checksum(region: &[u8]) -> u64 {
    region
        .chunks_exact(PAGE)
        .fold(0u64, |h, page| h.rotate_left(5) ^ checksum(page))
}
