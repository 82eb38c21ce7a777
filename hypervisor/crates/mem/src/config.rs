//! Policy knobs and their defaults.

use crate::backend::PAGE_SIZE;
use crate::compress::MAX_COMPRESSED;
use crate::error::Error;
use crate::page::MAX_SIMILARITY_BLOCKS;

/// Engine policy. `Config::default()` gives the documented defaults; every field can be changed
/// before `Engine::new`, which validates them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Pages one [`crate::Engine::scan_step`] visits (the scan rate is this per call; the caller
    /// decides how often to call). Default 4096 (16 MiB per step).
    pub pages_per_scan: usize,
    /// A page is cold once it has not been accessed for this many microseconds of its VM's own
    /// time ([`crate::Engine::set_vm_time`]) and for [`Config::cold_after_wall_us`] of host
    /// time ([`crate::Engine::set_wall_time`]): it may then be patched or compressed, and a
    /// cold shared page is unmapped so its frame can be compressed. Coldness is time, not scan
    /// visits: however often the scanner comes by, a page the guest keeps using is never cold.
    /// Pages with a write history also need about a sixteenth of it without access (or a use
    /// without a write) to count as holding still (the volatility rule in the crate docs).
    /// At least 1. Default 1 000 000 (1 s).
    pub cold_after_us: u64,
    /// The host-time half of the rule of [`Config::cold_after_us`]; 0: host time does not
    /// count. Default 1 000 000 (1 s).
    pub cold_after_wall_us: u64,
    /// Map zero pages onto one shared zero frame. Default true.
    pub zero_pages: bool,
    /// Share identical pages (content hash + byte comparison). Default true.
    pub share_identical: bool,
    /// Store cold pages as patches against similar pages. Default true.
    pub patching: bool,
    /// Compress cold pages. Default true.
    pub compression: bool,
    /// Also compress shared frames all of whose mappers are cold. Default true.
    pub compress_shared: bool,
    /// Number of 64-byte blocks hashed per page for the similarity index (1..=8). Default 4.
    pub similarity_blocks: u8,
    /// Seed that fixes the block positions. Default 0x5eed_d1ff_e4e0_91e5.
    pub similarity_seed: u64,
    /// Hash similarity blocks with kernel pointers reduced to their page offset
    /// ([`crate::page::normalize_pointer`]), so that pages differing only in where the guest's
    /// kernel layout put things (KASLR, neighbouring `struct page` arrays) find each other.
    /// Default true.
    pub similarity_normalize_pointers: bool,
    /// Also try an XOR patch ([`crate::patch`], version 2) against each candidate whose runs
    /// patch is over [`Config::xor_patch_above`] bytes (or over the limit), and keep the
    /// smaller. Default true.
    pub xor_patches: bool,
    /// Runs patches at most this long are kept without trying XOR (an XOR patch costs at least
    /// 66 bytes, its header and bitmap, and the try a pass over both pages). Default 64.
    pub xor_patch_above: usize,
    /// Reference candidates tried (by descending number of matching blocks) per cold page.
    /// Default 2.
    pub similarity_candidates: u8,
    /// Similarity index entries per page or object recorded in the index (the index is a
    /// bounded, lossy cache of that many entries, 8 bytes each, plus a quarter for growth; zero
    /// pages and pages merged with an identical one are never recorded, so it is sized by the
    /// pages that can use it). Default 4: on the heterogeneous benchmark set (8 Linux guests,
    /// 2 GiB) 4 entries instead of 2 found 13% more patches and cut the footprint by 4.1 MiB
    /// for 1.7 MiB more index; 8 entries (with 8 blocks) patched more pages but no smaller.
    pub similarity_entries_per_page: u8,
    /// A patch is kept only if it is at most this many bytes (and smaller than the page's
    /// compressed size). Difference Engine used half a page. Default 1024: on real Linux guests
    /// the average kept patch is ~60 bytes and the patch-must-beat-LZ4 rule decides almost
    /// every case, so 512, 1024 and 2048 gave footprints within 0.2% (1024 the smallest).
    pub patch_cutoff: usize,
    /// A compressed page is kept only if it is at most this many bytes. Default 3584 (7/8 of a
    /// page): on real Linux guests ~9% of non-zero pages compress to 3072..3584 bytes, and
    /// keeping them cut the total footprint by 3.3% against a 3072 cutoff; 4096 gains only 0.2%
    /// more for pages that barely compress.
    pub compress_cutoff: usize,
    /// Heap bytes the engine's growing structures may hold at most: the store of patches and
    /// compressed pages (its chunks and free lists), the object table and the content indexes.
    /// Past it a page simply stays as it is (counted in [`crate::Counters::heap_limited`]) and
    /// index hints are dropped. Per-page state, 7 bytes per guest page allocated when a VM is
    /// added, is not part of it, so an embedder can bound the engine's heap by that plus this
    /// whatever the guests' memory holds. The store allocates fallibly, but an embedder whose
    /// other allocations cannot fail (the hypervisor's heap) must keep the engine from taking
    /// the last free bytes. Default `usize::MAX`: no limit.
    pub heap_limit_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pages_per_scan: 4096,
            cold_after_us: 1_000_000,
            cold_after_wall_us: 1_000_000,
            zero_pages: true,
            share_identical: true,
            patching: true,
            compression: true,
            compress_shared: true,
            similarity_blocks: 4,
            similarity_seed: 0x5eed_d1ff_e4e0_91e5,
            similarity_normalize_pointers: true,
            xor_patches: true,
            xor_patch_above: 64,
            similarity_candidates: 2,
            similarity_entries_per_page: 4,
            patch_cutoff: 1024,
            compress_cutoff: 3584,
            heap_limit_bytes: usize::MAX,
        }
    }
}

impl Config {
    /// The longer of the two coldness thresholds: advancing every clock by this much
    /// ([`crate::Engine::advance_time`]) ages every page by a whole threshold.
    pub fn cold_span_us(&self) -> u64 {
        self.cold_after_us.max(self.cold_after_wall_us)
    }

    /// Checks every knob's range.
    pub fn validate(&self) -> Result<(), Error> {
        if self.pages_per_scan == 0 {
            return Err(Error::InvalidConfig("pages_per_scan must be at least 1"));
        }
        if self.cold_after_us == 0 {
            return Err(Error::InvalidConfig("cold_after_us must be at least 1"));
        }
        if self.similarity_blocks == 0 || self.similarity_blocks as usize > MAX_SIMILARITY_BLOCKS {
            return Err(Error::InvalidConfig("similarity_blocks must be 1..=8"));
        }
        if self.similarity_candidates == 0 {
            return Err(Error::InvalidConfig(
                "similarity_candidates must be at least 1",
            ));
        }
        if self.patch_cutoff < 1 || self.patch_cutoff > PAGE_SIZE {
            return Err(Error::InvalidConfig("patch_cutoff must be 1..=4096"));
        }
        if self.compress_cutoff < 1 || self.compress_cutoff > MAX_COMPRESSED.min(PAGE_SIZE) {
            return Err(Error::InvalidConfig("compress_cutoff must be 1..=4096"));
        }
        Ok(())
    }
}
