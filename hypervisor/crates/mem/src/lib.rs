//! # hv-mem: the memory multiplexing engine
//!
//! Works on the 4 KiB pages of many VMs and makes them cost less host memory, with four
//! mechanisms: zero pages map onto one zero frame, identical pages share one read-only frame
//! (VMware ESX, Linux KSM), cold pages similar to another page are stored as a small patch
//! against it (Difference Engine), and other cold pages are compressed with LZ4. Any access to a
//! page gives back exactly the bytes the VM last wrote.
//!
//! `no_std` + `alloc`. The engine owns the policy and the bookkeeping; it touches memory and
//! mappings only through the [`MemoryBackend`] trait: the hypervisor implements it over EPT,
//! the host benchmark and the tests use [`PlainMemory`] (heap frames plus an emulated MMU).
//!
//! ```
//! use hv_mem::*;
//! let mut mem = PlainMemory::new();
//! let mut engine = Engine::new(Config::default()).unwrap();
//! for vm in [VmId(1), VmId(2)] {
//!     // Two VMs with the same 64 pages of content (a real user loads guest-RAM images).
//!     mem.create_vm_with(vm, 64, |gfn, page| page[..8].copy_from_slice(&gfn.to_le_bytes()))
//!         .unwrap();
//!     engine.add_vm(vm, DomainId(0), 64).unwrap();
//! }
//! engine.run_until_converged(&mut mem, 20).expect("static memory converges");
//! assert!(engine.stats().frames_saved() > 64);
//! // A guest write goes through the MMU; a write to a shared page faults into the engine
//! // (the EPT violation path) and gets a private copy.
//! access_write(&mut engine, &mut mem, VmId(1), Gfn(3), 100, b"hello").unwrap();
//! let page = access_read(&mut engine, &mut mem, VmId(1), Gfn(3)).unwrap();
//! assert_eq!(&page[100..105], b"hello");
//! assert_eq!(&page[..8], &3u64.to_le_bytes());
//! ```
//!
//! ## Driving it
//! - [`Engine::add_vm`] registers a VM's pages (all mapped writable on frames it owns) in a
//!   sharing domain; [`Engine::remove_vm`] drops everything the engine holds for it.
//! - [`Engine::scan`] / [`Engine::scan_step`] visit pages round-robin over all VMs (a full pass
//!   is a *round*); call them at the rate you want to spend CPU on. [`Engine::scan_round`],
//!   [`Engine::converged`] and [`Engine::run_until_converged`] for batch use. Scanning never
//!   allocates a frame.
//! - [`Engine::set_vm_time`] and [`Engine::set_wall_time`] before a scan call: each VM's own
//!   time and host time, which decide when a page is cold (see *Coldness*). Batch use without
//!   running VMs moves both with [`Engine::advance_time`] (as [`Engine::run_until_converged`]
//!   does, a threshold per round).
//! - [`Engine::fault`] on an EPT violation (`Access::Read` or `Access::Write`). Reads of a shared
//!   page get a read-only mapping; writes always end with a private writable frame.
//! - [`Engine::read_page`] reconstructs any page without changing state; [`Engine::stats`] the
//!   accounting; [`Engine::check_consistency`] checks every invariant against the backend.
//!
//! ## Page state machine
//! ```text
//!                 scan: zero, stable                  write fault (new zeroed frame)
//!    ┌──────────┐ ─────────────────────────▶ Zero ─────────────────────────────┐
//!    │          │ scan: stable, same content as an object/another page         │
//!    │          │ ─────────────────────────▶ Mapped(obj) ── write fault: copy ─┤
//!    │ Private  │                             │  ▲       (or take the frame    │
//!    │ (own RW  │                 scan: cold  │  │ read    over if sole user)  │
//!    │  frame)  │                             ▼  │ fault                       │
//!    │          │ scan: cold, compresses ──▶ Unmapped(obj) ── write fault ─────┤
//!    │          │ scan: cold, patch smaller ▶ Patched(blob) ── any fault ──────┤
//!    └──────────┘ ◀────────────────────────────────────────────────────────────┘
//! ```
//! - **Private**: the VM's own frame, mapped writable. The scanner tracks its hash and age.
//! - **Zero**: mapped read-only on the domain's zero frame.
//! - **Mapped(obj)**: mapped read-only on the frame of a shared *object*.
//! - **Unmapped(obj)**: not present; the content is object `obj`, resident or compressed.
//! - **Patched**: not present; the content is a patch against a reference object.
//!
//! An *object* is immutable, refcounted content of one domain: in a frame (mapped read-only by
//! its Mapped pages) or LZ4-compressed in the blob store (then no page maps it). It counts the
//! pages that refer to it, those that map it, and the patches that use it as their reference;
//! it is freed when all three are zero. A compressed private page is just an object with one
//! page, so a later identical page joins it like any shared content. An object all of whose
//! mappers went cold is compressed (shared frames of idle VMs cost a compressed copy, not a
//! frame); the next read decompresses it once into a shared frame.
//!
//! ## Coldness
//! A page is *cold* once it has not been accessed for [`Config::cold_after_us`] of its VM's own
//! time **and** [`Config::cold_after_wall_us`] of host time (both 1 s by default). The VM's own
//! time is what the caller reports with [`Engine::set_vm_time`]: the time the VM ran (the
//! hypervisor also counts the rest of a quantum the VM gave back), never time it spent waiting
//! for the CPU. So coldness does not depend on how often the scanner passes: a page the guest
//! uses whenever it runs is never cold, however many passes happen while other VMs run, and
//! the pages of a VM that does not get to run do not age. Host time as a second condition keeps
//! a VM whose own clock runs ahead of the host's (a VM that yields at once, quantum after
//! quantum) from having its pages taken away within moments.
//!
//! The engine sees accesses only through the accessed bit at scan visits, so a visit that finds
//! it set stamps the page with the VM's aging clock; a later visit that finds it clear tests the
//! time since that stamp. A page that comes back from a fault counts as accessed at its next
//! visit. The clock counts in sixteenths of the thresholds and a page keeps 8 bits of it, so
//! pages use no more metadata than a visit counter. The rounding only ever makes a page cold
//! later than the thresholds, never earlier (by a sixteenth or two of them, plus the time to the
//! next visit), and when a scan round takes longer than 7 thresholds the clock slows down to
//! keep stamps in range (see `src/clock.rs`).
//!
//! ## What a scan visit does
//! 1. Reads and clears the page's accessed bit and ages the page (see *Coldness*).
//! 2. Private page: if it is dirty (or never hashed), hash it (XXH3-64, of which the indexes
//!    keep the low 32 bits: a hint, every use is confirmed byte for byte; an all-zero page,
//!    found by an early-exit test of 64-byte chunks, gets the precomputed zero hash without
//!    hashing). A clean page keeps its hash without re-hashing. Then the **volatility rule**
//!    decides whether the page is a merge candidate now (see below).
//! 3. Candidate, cheap merges first: zero -> zero frame; else look its hash up in the domain's
//!    *shared index* (hash -> object) and then in the *unstable index* (hash -> another
//!    candidate private page); a hit is confirmed **byte for byte** before anything is shared
//!    (never on the hash alone). Two matching private pages become a new object that reuses
//!    one of their frames. A page with no twin enters the unstable index.
//! 4. Candidate and cold, with no identical page, and not on the visit that put it in the
//!    unstable index (its twins later in the round must find it there first): compress it
//!    (LZ4) and look for a *similar* page through the similarity index; keep whichever is
//!    smaller, a patch if it beats both the compressed size and [`Config::patch_cutoff`], else
//!    the compressed page if it is at most [`Config::compress_cutoff`], else nothing (the page
//!    is marked and not retried until its content changes).
//! 5. Every new object and every compressed page is recorded in the similarity index as a
//!    candidate reference, and so is a private page that stays as it is: when cold processing
//!    found nothing to gain, or at once when the guest is using it (it will not go cold soon).
//!
//! So on memory that holds still, round 1 merges every zero page and every identical page
//! (hashing each page once, no LZ4), and round 2 patches and compresses what is left: the
//! cheap savings come first, the expensive ones after, and no page is patched or compressed
//! while an identical twin might still come along in the same round.
//!
//! **Volatility rule** (which pages are skipped): a page is a merge candidate
//! - on its *first* visit, if the guest has not accessed it since it was mapped (accessed bit
//!   clear): nothing says it is changing, and a wrong guess costs one copy-on-write fault;
//! - otherwise only once a visit finds it unwritten since the previous one (dirty bit clear)
//!   with the same hash, and the VM used it meanwhile without writing it (accessed bit set) or
//!   it is *quiet* (not accessed for more than a sixteenth of the cold thresholds of its VM's
//!   own time). That is KSM's rule for its unstable tree (the same checksum on two scans), in
//!   the VM's time rather than in passes: passes made while the VM does not run prove nothing.
//!   It covers every page with a write history: one whose share a write broke (copy-on-write,
//!   zero fill, fault-in of a patched or compressed page), one whose hash changed between
//!   visits (counted in `volatile_skips`), one written with the bytes it held (a stack; with
//!   EPT A/D flags the guest's page tables, which the CPU's page walks count as written), one
//!   whose content moved during a check, and one the guest touched before the first visit.
//!
//! A volatile page therefore waits at least one full round after every change, and a page that
//! keeps being written is never merged; a page shared on its first visit and then written goes
//! back to this rule for good (until the VM is removed).
//!
//! **Protocol for every merge**: write-protect the page(s) through the backend first, then
//! compare / re-hash / encode the frozen bytes, then switch the mapping and free the old frame;
//! on a mismatch restore write access. Hashes taken before protection are only hints. This is
//! what makes it safe for vCPUs to keep running on other cores while the scanner works (their
//! writes during the check fault and wait for the engine's lock).
//!
//! **Convergence**: a round that changed nothing and left nothing pending (no volatile, warming
//! or not-yet-cold page) means further scans change nothing until a guest touches memory;
//! [`Engine::converged`] reports it. On static images with [`Engine::run_until_converged`] (a
//! threshold of time per round, so a page is cold on its second visit) this takes 3 rounds.
//! At convergence the unstable index (pages that found no twin and gained nothing) is dropped
//! and the object table trimmed; a page enters the unstable index again only when it turns
//! stable after a change, so the index is rebuilt from changed pages alone (an unchanged page
//! that a changed page comes to equal is then not found until one of them changes again).
//!
//! ## Similar pages (Difference Engine)
//! The similarity index is keyed by hashes of [`Config::similarity_blocks`] 64-byte blocks at
//! fixed block positions drawn once from a seeded generator ([`Config::similarity_seed`]; all
//! pages use the same positions). Before hashing, every word of a block that looks like a
//! kernel pointer (top 16 bits all ones) keeps only its page offset
//! ([`page::normalize_pointer`], [`Config::similarity_normalize_pointers`]): guests randomize
//! their kernel layout (KASLR), so the same records in two guests differ in every pointer and
//! share no raw 64-byte block, yet their normalized blocks are equal. Blocks whose eight words
//! are all equal (zero, fills) are not indexed (they would make every page look alike). A cold
//! page looks up its keys, ranks the candidates by matching blocks, and encodes a patch against
//! the best [`Config::similarity_candidates`]. The index is a bounded,
//! lossy cache of [`Config::similarity_entries_per_page`] entries of 8 bytes (plus a quarter for
//! growth) per page or object recorded in it, at least 1024: zero pages and pages merged with an
//! identical page are never recorded, so it is sized by the pages that can use it, not by guest
//! RAM. Every hit is re-validated, so a stale entry costs only a failed attempt.
//!
//! The **reference stays immutable** while patches point at it: it is always an object (a
//! private reference page is turned into one, mapped read-only in its VM), and an object is
//! never modified: a write to it by a VM is a copy-on-write break, and the object lives on as
//! long as a patch refers to it (it may be compressed then; decoding a patch against a
//! compressed reference decompresses it first).
//!
//! ## Patch format
//! Defined in [`patch`], two encodings told apart by their first byte. **Runs** (version 1):
//! `VERSION run*`, each run `skip:varint head:varint payload` with `head = len << 1 | fill`:
//! skip `skip` bytes unchanged from the reference, then `len` literal bytes, or one byte
//! repeated `len` times; runs compare the pages at the same offsets. **XOR words** (version 2):
//! a bitmap of the 64-bit words that differ, a palette of up to 8 XOR values several of them
//! share, and per word a nibble naming an entry or the length of a literal XOR value; tried when
//! the runs patch is over [`Config::xor_patch_above`] bytes ([`Config::xor_patches`]): pointers
//! moved by another kernel layout differ in a few bytes of every word, a run each, while their
//! XOR is one value. Applying it touches only the differing words.
//! The smaller is kept. Decoding is checked and total: malformed input returns a
//! [`patch::PatchError`], never panics and never touches memory outside the output page. A
//! stored patch is prefixed with its reference's 4-byte object id.
//!
//! ## Sharing domains
//! Each VM belongs to one [`DomainId`]. Every content index (shared, unstable, similarity) and
//! the zero frame exist per domain, and objects record their domain, so pages of VMs in
//! different domains are never shared, patched against each other, or even compared.
//!
//! ## Running out of frames
//! Scanning frees frames and never allocates one. A fault-in allocates first and changes
//! state only once nothing can fail any more: when [`MemoryBackend::alloc_frame`] fails,
//! [`Engine::fault`] returns [`Error::OutOfFrames`] and the page stays exactly as it was
//! (shared, patched or compressed, readable through [`Engine::read_page`]); the hypervisor
//! retries or stops the VM. Heap exhaustion while storing a blob makes the merge not happen.
//!
//! ## Knobs ([`Config`]) and defaults
//! | knob | default | meaning |
//! |---|---|---|
//! | `pages_per_scan` | 4096 | pages per [`Engine::scan_step`] (16 MiB) |
//! | `cold_after_us` | 1 s | a page not accessed for this long of its VM's own time... |
//! | `cold_after_wall_us` | 1 s | ...and this long of host time is cold |
//! | `zero_pages`, `share_identical`, `patching`, `compression` | on | mechanisms |
//! | `compress_shared` | on | compress shared frames once all their mappers are cold |
//! | `similarity_blocks` | 4 | 64-byte blocks hashed per page (1..=8) |
//! | `similarity_seed` | fixed | chooses the block positions |
//! | `similarity_candidates` | 2 | references tried per cold page |
//! | `similarity_entries_per_page` | 4 | similarity index entries per recorded page or object |
//! | `similarity_normalize_pointers` | on | hash blocks with kernel pointers cut to their page offset |
//! | `xor_patches`, `xor_patch_above` | on, 64 B | also try an XOR patch when the runs patch is larger |
//! | `patch_cutoff` | 1024 B | largest patch kept (and it must beat LZ4) |
//! | `compress_cutoff` | 3584 B | largest compressed page kept |
//!
//! The cutoffs and index size were chosen by measuring real Linux guests (Debian 6.1 kernel
//! booted to its initramfs under QEMU/TCG, 256 MiB each, raw RAM images) with
//! `examples/measure.rs`: the kept patches average 40-65 bytes (150-170 on the heterogeneous
//! benchmark set), and the footprint (frames + blob heap + metadata) was 0.45-0.48 of a
//! sharing-only (KSM-like) configuration of the same engine, 0.46-0.50 of its frames alone.
//! On the heterogeneous set, 4 similarity entries per recorded page instead of 2 cut the
//! footprint by 4.1 MiB (1.9%); 8 blocks, 8 entries and 4 candidates patched 12% more pages
//! but needed a larger index and ended 0.2 MiB larger. A patch format of LZ4 with the reference
//! as dictionary (tried beside the run list, the smaller kept) changed the footprint by less
//! than 0.1 MiB there. What did pay was finding the pages that differ by the kernel layout:
//! pointer-normalized keys plus XOR patches saved 22 MiB more there (footprint 218 -> 196 MiB);
//! normalized keys with runs patches alone saved 7.8 MiB, XOR patches with raw keys nothing
//! (the raw index never pairs those pages). The XOR patches were first an LZ4 block of the
//! whole XOR page: 3.5 MiB larger in all and ~2 us to decode on every fault-in.
//!
//! ## Accounting
//! [`Stats`] (from [`Engine::stats`], which reads counters kept as pages and objects change: it
//! walks nothing, so asking is cheap and leaves the caches alone) has gauges: pages by state, objects resident/compressed,
//! frames in use, frames saved by zero pages, sharing, patching and compression (they add up
//! to pages minus frames in use), bytes of patches, of compressed data, of the blob heap and
//! of metadata; and cumulative [`Counters`]: pages scanned and hashed, rounds, volatile skips,
//! merges by kind, CoW breaks, fault-ins by kind, out-of-frame failures.
//!
//! ## Costs
//! Measured with `cargo xtask bench mem` and `examples/scan_cost.rs` on the heterogeneous set of
//! docs/benchmarks.md (8 Linux guests, 2 GiB; release build, one core of the 2-core development
//! VM, other work beside it): round 1 (zero test, hash, all zero and identical merges, no LZ4)
//! 0.20-0.47 CPU-s, 4.5-10.7 GB/s, close to what one core can read from memory (a plain read of
//! 2 GiB takes 0.22-0.24 s there); round 2 (LZ4, patch search with runs and XOR patches for
//! every cold page) 1.3-1.7 CPU-s; a round after convergence ~100-300 GB/s. Fault-in: see
//! docs/benchmarks.md (p50 ~1 us for a zero or shared page, ~3-4 us to decompress, ~3.5-4.5 us
//! to unpatch, most of it restoring a compressed reference: at convergence nearly every
//! reference is cold and compressed; `examples/codec_cost.rs` times the two decoders warm).
//! Metadata: 7 bytes per page, 28 per object, 8 per index slot, 56 per VM for its aging clock; on that set ~17 bytes per
//! guest page in all (8.3 MiB of 2 GiB), 5 MiB after round 1. On the host XXH3 uses AVX2/SSE2 (twox-hash's
//! run-time detection); the hypervisor build hashes with portable code.
//!
//! ## Testing
//! `cargo test -p hv-mem`: unit tests, behaviour through the public API (`tests/engine.rs`),
//! a proptest model check (any interleaving of guest writes, scans and faults leaves every
//! page byte-identical to plain memory, `tests/model.rs`) and proptests of the decoders
//! (`tests/decoders.rs`: total on arbitrary and corrupted input, the LZ4 decoder agreeing with
//! `lz4_flex`'s, the XOR-words decoder with a step-by-step model of its format). `fuzz/` has
//! cargo-fuzz targets for the same decoders (nightly; see its README).
#![no_std]
#![deny(missing_docs)]

extern crate alloc;

pub mod arena;
mod backend;
mod clock;
pub mod compress;
mod config;
mod engine;
mod error;
pub mod index;
pub mod page;
pub mod patch;
mod plain;
mod stats;

pub use backend::{
    Access, DomainId, Frame, Gfn, Mapping, MemoryBackend, OutOfFrames, Page, VmId, PAGE_SIZE,
};
pub use config::Config;
pub use engine::{Engine, FaultResolution, ScanReport, PAGE_META_BYTES};
pub use error::{CorruptKind, Error};
pub use plain::{access_read, access_write, GuestFault, PlainMemory, SPARE_FRAMES};
pub use stats::{Counters, Stats};
