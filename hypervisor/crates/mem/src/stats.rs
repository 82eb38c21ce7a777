//! Accounting: what the engine saved, what it costs, and what it did.

use crate::backend::PAGE_SIZE;

/// Event counters (monotonic since the engine was created).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Page visits by the scanner.
    pub pages_scanned: u64,
    /// Pages whose content hash was computed.
    pub pages_hashed: u64,
    /// Full passes over all pages.
    pub rounds: u64,
    /// Visits that found a page's hash changed since the previous visit (volatile: skipped).
    pub volatile_skips: u64,
    /// Pages mapped onto a zero frame (one per sharing domain).
    pub merges_zero: u64,
    /// Pages merged with an identical page or shared frame.
    pub merges_identical: u64,
    /// Pages turned into patches.
    pub patches_made: u64,
    /// Of those, patches stored as an XOR delta ([`crate::patch`], version 2).
    pub patches_xor: u64,
    /// Private pages compressed.
    pub pages_compressed: u64,
    /// Shared frames compressed (all their mappers cold).
    pub shared_compressed: u64,
    /// Shared pages unmapped because they were cold.
    pub cold_unmaps: u64,
    /// Byte comparisons that found two candidates different (hash collisions or stale hashes).
    pub compare_mismatches: u64,
    /// Write faults that gave a VM its own copy of a shared or zero page.
    pub cow_breaks: u64,
    /// Of those, how many could take over the shared frame without copying (sole owner).
    pub cow_takeovers: u64,
    /// Fault-ins of zero pages on write (a fresh zeroed frame).
    pub faults_zero: u64,
    /// Read fault-ins that mapped a resident shared frame read-only.
    pub faults_shared: u64,
    /// Fault-ins that decompressed a page.
    pub faults_decompressed: u64,
    /// Fault-ins that decoded a patch.
    pub faults_patched: u64,
    /// Faults with nothing to do (the page was already mapped as needed).
    pub faults_spurious: u64,
    /// Fault-ins that failed because no frame was available.
    pub faults_out_of_frames: u64,
    /// Shares, patches and compressions not made, and blobs not stored, because the engine's
    /// tables and store had reached [`crate::Config::heap_limit_bytes`].
    pub heap_limited: u64,
}

/// A snapshot of the engine's accounting. Gauges describe the current state; `counters` are
/// cumulative.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// VMs registered.
    pub vms: u64,
    /// Guest pages registered, all VMs.
    pub pages_total: u64,
    /// Pages backed by their own writable frame.
    pub pages_private: u64,
    /// Pages mapped onto a zero frame (one per sharing domain).
    pub pages_zero: u64,
    /// Pages that reference a shared frame or a compressed object (mapped or not).
    pub pages_shared: u64,
    /// Pages stored as patches.
    pub pages_patched: u64,
    /// Shared objects kept in a frame.
    pub objects_resident: u64,
    /// Shared objects kept compressed.
    pub objects_compressed: u64,
    /// Objects (resident or compressed) kept only as patch references: no page refers to
    /// them any more.
    pub objects_reference_only: u64,
    /// Host frames the engine's pages use: private pages + resident objects + the zero frames.
    pub frames_in_use: u64,
    /// Frames saved by zero pages (zero pages minus the zero frames).
    pub frames_saved_zero: u64,
    /// Frames saved by sharing: sum over objects of (pages referencing it - 1).
    pub frames_saved_shared: u64,
    /// Frames saved by patching: patched pages minus resident reference-only frames kept for
    /// them.
    pub frames_saved_patched: u64,
    /// Frames saved by compression: compressed objects that pages refer to (their cost is
    /// `bytes_compressed`).
    pub frames_saved_compressed: u64,
    /// Bytes of live patches (including their 4-byte reference id).
    pub bytes_patches: u64,
    /// Bytes of live compressed pages.
    pub bytes_compressed: u64,
    /// Heap bytes of the blob store (patches + compressed data + slot rounding + free space).
    pub bytes_blob_heap: u64,
    /// Heap bytes of metadata: per-page state, the object table, the content indexes.
    pub bytes_metadata: u64,
    /// Heap bytes charged to [`crate::Config::heap_limit_bytes`]: the blob heap and the
    /// growing tables (the object table and its free lists, the content indexes).
    pub bytes_heap_limited: u64,
    /// Event counters.
    pub counters: Counters,
}

impl Stats {
    /// Total frames saved, all mechanisms.
    pub fn frames_saved(&self) -> u64 {
        self.frames_saved_zero
            + self.frames_saved_shared
            + self.frames_saved_patched
            + self.frames_saved_compressed
    }

    /// Total memory the guests cost: frames in use, the blob heap and metadata, in bytes.
    pub fn footprint_bytes(&self) -> u64 {
        self.frames_in_use * PAGE_SIZE as u64 + self.bytes_blob_heap + self.bytes_metadata
    }

    /// Memory the guests would cost without the engine: one frame per page.
    pub fn unmanaged_bytes(&self) -> u64 {
        self.pages_total * PAGE_SIZE as u64
    }
}
