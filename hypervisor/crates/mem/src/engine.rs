//! The engine: per-page state machine, scanner and fault handler.
//!
//! See the crate documentation for the design; this module holds the mechanics. Every
//! transition that changes what a guest sees follows the same protocol:
//!
//! 1. write-protect the page (and a partner page, if any) through the backend, so its bytes are
//!    frozen from here on;
//! 2. check on the frozen bytes (compare byte for byte, re-hash, encode, compress);
//! 3. on success switch the mapping and free the old frame; on failure restore write access.
//!
//! Fault-ins allocate first and change state only once nothing can fail any more, so an
//! allocation failure leaves the page exactly as it was.

use crate::arena::{BlobArena, BlobRef, StoreError};
use crate::backend::{Access, DomainId, Frame, Gfn, MemoryBackend, Page, VmId, PAGE_SIZE};
use crate::clock::{AgingClock, COLD_TICKS, QUIET_TICKS};
use crate::compress::{self, MAX_COMPRESSED};
use crate::config::Config;
use crate::error::{CorruptKind, Error};
use crate::index::{SimTable, U32Map};
use crate::page::{
    hash_page, is_zero, similarity_keys, similarity_positions, zero_page_hash,
    MAX_SIMILARITY_BLOCKS,
};
use crate::patch;
use crate::stats::{Counters, Stats};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// The page's hash field holds the hash of its content at the last visit.
const F_HASHED: u8 = 1;
/// The hash was the same on two consecutive visits (the page is not volatile).
const F_STABLE: u8 = 2;
/// Cold processing found nothing worth doing; not retried until the content changes.
const F_NO_GAIN: u8 = 4;
/// The page is the entry for its hash in its domain's unstable index.
const F_INDEXED: u8 = 8;
/// The page has a write history the scanner saw (a share broken by a write, a hash that
/// changed between visits, content that moved during a check, or an access before its first
/// visit): it is merged only after its hash held for two consecutive visits.
const F_WATCH: u8 = 16;
/// The page (with its current content) was recorded in the similarity index.
const F_SIM: u8 = 32;
/// A visit found the page cold (it stays cold until a visit finds it accessed).
const F_COLD: u8 = 64;
/// The page came back from a fault since its last visit: the next visit counts it as accessed
/// (the guest is using it, whether or not the accessed bit says so).
const F_FRESH: u8 = 128;
/// The flags about time, which the content flags' resets keep.
const TIME_FLAGS: u8 = F_COLD | F_FRESH;

/// Smallest similarity index of a domain that has any entry (8 KiB), so that small domains
/// do not thrash a table of a few sets.
const MIN_SIM_ENTRIES: u64 = 1024;

/// Similarity index values with this bit refer to an object, without it to a page (by its
/// global page number).
const OBJ_BIT: u32 = 1 << 31;
/// Bytes of the reference id in front of a stored patch.
const PATCH_HEADER: usize = 4;

/// State of a guest page. See the crate docs for the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    /// Own frame, mapped writable.
    Private,
    /// Mapped read-only onto the zero frame.
    Zero,
    /// Mapped read-only onto a resident object's frame; `payload` is the object.
    Mapped,
    /// Not present; the content is object `payload` (resident or compressed).
    Unmapped,
    /// Not present; the content is a patch (blob `payload`) against a resident object.
    Patched,
}

/// Per-page metadata: 7 bytes (packed: it exists for every guest page, so every byte here is
/// half a MiB per 256 MiB guest... times eight guests).
#[derive(Clone, Copy, Debug)]
#[repr(C, packed)]
struct PageMeta {
    /// Private pages: the content hash (XXH3-64, low 32 bits) seen at the last visit, valid
    /// with `F_HASHED`. Other kinds: the payload (object id, or blob handle of a patch).
    word: u32,
    kind: Kind,
    /// The low 8 bits of the VM's aging clock when a visit last found the page accessed (or
    /// when the VM was added); see [`crate::clock`].
    seen: u8,
    flags: u8,
}

const _: () = assert!(core::mem::size_of::<PageMeta>() == PAGE_META_BYTES);

/// Heap bytes of engine state per registered guest page, whatever the page holds (what an
/// embedder must budget for before [`Config::heap_limit_bytes`]).
pub const PAGE_META_BYTES: usize = 7;

impl PageMeta {
    const PRIVATE: PageMeta = PageMeta {
        word: 0,
        kind: Kind::Private,
        seen: 0,
        flags: 0,
    };

    /// The payload of a non-private page.
    fn payload(self) -> u32 {
        self.word
    }

    /// The content hash of a private page (valid with `F_HASHED`).
    fn hash(self) -> u32 {
        self.word
    }
}

/// Where an object's content is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Store {
    /// Not in use (on the free list).
    Free,
    /// In a frame, read-only, possibly mapped by pages.
    Frame(Frame),
    /// Compressed in the blob store; no page maps it.
    Blob(BlobRef),
}

const STORE_FREE: u64 = u64::MAX;
const STORE_BLOB: u64 = 1 << 63;

impl Store {
    /// Packs into 8 bytes: frame numbers are below 2^63 (they are addresses >> 12).
    fn pack(self) -> u64 {
        match self {
            Store::Free => STORE_FREE,
            Store::Frame(f) => {
                debug_assert!(f.0 < STORE_BLOB);
                f.0
            }
            Store::Blob(b) => STORE_BLOB | b.raw() as u64,
        }
    }

    fn unpack(raw: u64) -> Store {
        if raw == STORE_FREE {
            Store::Free
        } else if raw & STORE_BLOB != 0 {
            Store::Blob(BlobRef::from_raw(raw as u32))
        } else {
            Store::Frame(Frame(raw))
        }
    }
}

/// A refcounted, immutable piece of page content shared by pages and patches of one domain.
#[derive(Clone, Copy, Debug)]
struct Object {
    /// Content hash (XXH3-64, low 32 bits): its key in the domain's shared index.
    hash: u32,
    /// A packed [`Store`], as two halves so that the object needs only 4-byte alignment.
    store: [u32; 2],
    /// Pages in state Mapped or Unmapped that reference it.
    page_refs: u32,
    /// Of those, pages in state Mapped.
    mapped: u32,
    /// Patches that use it as their reference (they pin it resident).
    patch_refs: u32,
    domain: u16,
    /// Compression was tried and did not meet the cutoff.
    incompressible: bool,
    /// Compression was tried and met the cutoff (so cold mappers may be unmapped).
    compressible: bool,
}

const _: () = assert!(core::mem::size_of::<Object>() == 28);

impl Object {
    /// A new object holding `store` for `page_refs` pages, `mapped` of them mapping it; no
    /// patch uses it yet. A compressed one has met the compression cutoff by being made.
    fn new(hash: u32, store: Store, page_refs: u32, mapped: u32, domain: usize) -> Self {
        Object {
            hash,
            store: split(store.pack()),
            page_refs,
            mapped,
            patch_refs: 0,
            domain: domain as u16,
            incompressible: false,
            compressible: matches!(store, Store::Blob(_)),
        }
    }

    fn store(&self) -> Store {
        Store::unpack(self.store[0] as u64 | (self.store[1] as u64) << 32)
    }

    fn set_store(&mut self, store: Store) {
        self.store = split(store.pack());
    }
}

/// A packed [`Store`] as the two halves [`Object::store`] keeps.
fn split(raw: u64) -> [u32; 2] {
    [raw as u32, (raw >> 32) as u32]
}

struct VmSlot {
    id: VmId,
    domain: usize,
    /// Global page number of gfn 0 (global numbers are never reused, so a stale similarity
    /// entry can never name a page of a later VM).
    base: u64,
    pages: Vec<PageMeta>,
    /// The VM's aging clock: when its pages are cold.
    clock: AgingClock,
    /// Its pages backed by a writable frame of their own: its footprint beyond what it shares.
    private: u64,
    /// Where [`Engine::scan_vm`] goes on in this VM.
    own_cursor: usize,
    /// Its own coldness thresholds (own time, host time), in place of the configuration's:
    /// shorter for an idle VM, whose pages outside the working set should go at once.
    cold_after: Option<(u64, u64)>,
}

/// Content indexes of one sharing domain. Nothing ever looks across domains.
struct DomainIndex {
    id: DomainId,
    pages: u64,
    /// Content hash -> object (resident or compressed): the stable tree of KSM.
    shared: U32Map,
    /// Content hash -> private page (global page number) seen stable with that hash: the
    /// unstable tree of KSM. Dropped when the engine converges.
    unstable: U32Map,
    /// Similarity key -> page or object: candidate references for patches. Sized by
    /// `sources`, not by the domain's pages: zero pages and pages that merged with an
    /// identical page never need an entry.
    similar: SimTable,
    /// Pages and objects recorded in `similar` so far (its capacity follows this).
    sources: u64,
    /// The domain's zero frame (one per domain: not even zeros are shared across domains).
    zero_frame: Option<Frame>,
    /// Pages of the domain mapped onto it.
    zero_pages: u64,
}

/// A page position, resolved once per operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Loc {
    slot: usize,
    gfn: usize,
    vm: VmId,
    domain: usize,
}

impl Loc {
    fn gfn(self) -> Gfn {
        Gfn(self.gfn as u64)
    }
}

/// What a visit learned about a page's use, from its accessed bit and its VM's aging clock.
#[derive(Clone, Copy, Debug)]
struct Age {
    /// Not accessed for the cold thresholds.
    cold: bool,
    /// Accessed since the previous visit (or back from a fault since).
    in_use: bool,
    /// Not accessed for a while of its VM's time (see `clock::QUIET_TICKS`).
    quiet: bool,
}

/// What one scan visit did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// The page changed representation.
    Changed,
    /// Nothing now, but a later visit may act (volatile, warming up, not cold yet).
    Pending,
    /// Nothing to do unless the guest touches the page.
    Final,
}

/// A reference for a patch.
#[derive(Clone, Copy, Debug)]
enum Reference {
    /// An object: resident in `frame`, or compressed (`None`).
    Object { id: u32, frame: Option<Frame> },
    /// A stable private page, which becomes an object if chosen.
    Page { at: Loc, frame: Frame },
}

/// Result of a [`Engine::scan`] call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Pages visited.
    pub pages: u64,
    /// Pages that changed representation.
    pub changes: u64,
    /// Rounds (full passes over all pages) that ended during the call.
    pub rounds_completed: u64,
}

/// How a fault was resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultResolution {
    /// The page was already mapped with the needed access (e.g. a fault that raced with the
    /// scanner); nothing changed.
    Spurious,
    /// A read of an unmapped shared page: mapped read-only onto the resident shared frame.
    MappedShared,
    /// A read of a compressed shared page: decompressed into a new shared frame, mapped
    /// read-only.
    DecompressedShared,
    /// A compressed page with one owner: decompressed into the VM's own writable frame.
    Decompressed,
    /// A patched page: decoded into the VM's own writable frame.
    Unpatched,
    /// A write to a shared page: the VM got its own writable copy.
    CopiedOnWrite,
    /// A write to a shared frame the VM was the only user of: the frame became its own, no copy.
    TookOver,
    /// A write to a zero page: the VM got a fresh zeroed writable frame.
    ZeroFilled,
}

/// The memory multiplexing engine. It does not own memory: every call that touches memory
/// takes the [`MemoryBackend`].
pub struct Engine {
    config: Config,
    positions: [u8; MAX_SIMILARITY_BLOCKS],
    zero_hash: u32,
    vms: Vec<Option<VmSlot>>,
    /// `vms[i].base`, kept also for removed slots, for global page number lookups.
    slot_bases: Vec<u64>,
    next_base: u64,
    /// VM id -> slot, sorted by id.
    vm_slots: Vec<(VmId, usize)>,
    domains: Vec<DomainIndex>,
    objects: Vec<Object>,
    free_objects: Vec<u32>,
    /// Resident objects that lost their last page but are still patch references: compressed
    /// at the next scan call rather than in the fault path that orphaned them.
    orphans: Vec<u32>,
    blobs: BlobArena,
    /// Host time as last reported, microseconds.
    wall_us: u64,
    total_pages: u64,
    cursor: (usize, usize),
    round_changes: u64,
    round_pending: u64,
    /// The current round covered every page from its start (no VM added mid-round).
    round_clean: bool,
    last_round_converged: bool,
    counters: Counters,
    pages_private: u64,
    pages_zero: u64,
    pages_shared: u64,
    pages_patched: u64,
    /// Bytes of live patches in the blob store (with their reference ids), kept as they are
    /// stored and freed so that [`Engine::stats`] never reads the blobs: a walk over every
    /// compressed blob would evict the caches of whatever runs next (a fault handler).
    bytes_patches: u64,
    /// Live objects by `[resident, no page | resident, pages | compressed, no page |
    /// compressed, pages]`, kept at every change for the same reason.
    census: [u64; 4],
    scratch_page: Box<Page>,
    scratch_lz: Box<[u8]>,
    scratch_patch: Box<[u8]>,
    scratch_best: Box<[u8]>,
    scratch_xor: Box<[u8]>,
    scratch_ref: Box<Page>,
}

/// A zeroed page on the heap, built there (a `Box::new` of an array would build it on the
/// stack first, 4 KiB of a hypervisor's small stack).
pub(crate) fn boxed_page() -> Box<Page> {
    let b: Box<[u8]> = vec![0u8; PAGE_SIZE].into_boxed_slice();
    match b.try_into() {
        Ok(p) => p,
        Err(_) => unreachable!("length is PAGE_SIZE"),
    }
}

impl Engine {
    /// Creates an engine with `config` (validated).
    pub fn new(config: Config) -> Result<Self, Error> {
        config.validate()?;
        let positions =
            similarity_positions(config.similarity_seed, config.similarity_blocks as usize);
        Ok(Engine {
            config,
            positions,
            zero_hash: zero_page_hash() as u32,
            vms: Vec::new(),
            slot_bases: Vec::new(),
            next_base: 0,
            vm_slots: Vec::new(),
            domains: Vec::new(),
            objects: Vec::new(),
            free_objects: Vec::new(),
            orphans: Vec::new(),
            blobs: BlobArena::new(),
            wall_us: 0,
            total_pages: 0,
            cursor: (0, 0),
            round_changes: 0,
            round_pending: 0,
            round_clean: true,
            last_round_converged: false,
            counters: Counters::default(),
            pages_private: 0,
            pages_zero: 0,
            pages_shared: 0,
            pages_patched: 0,
            bytes_patches: 0,
            census: [0; 4],
            scratch_page: boxed_page(),
            scratch_lz: vec![0u8; MAX_COMPRESSED].into_boxed_slice(),
            scratch_patch: vec![0u8; PAGE_SIZE].into_boxed_slice(),
            scratch_best: vec![0u8; PAGE_SIZE].into_boxed_slice(),
            scratch_xor: vec![0u8; PAGE_SIZE].into_boxed_slice(),
            scratch_ref: boxed_page(),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Registers a VM of `pages` pages (gfn `0..pages`) in sharing domain `domain`. Every page
    /// must be mapped writable onto a frame the VM owns (gfns with no mapping are skipped: holes).
    pub fn add_vm(&mut self, vm: VmId, domain: DomainId, pages: u64) -> Result<(), Error> {
        let pos = match self.vm_slots.binary_search_by_key(&vm, |&(id, _)| id) {
            Ok(_) => return Err(Error::DuplicateVm(vm)),
            Err(pos) => pos,
        };
        if pages > u32::MAX as u64 || self.vms.len() >= (1 << 31) {
            return Err(Error::TooManyPages(vm));
        }
        if self.domains.len() >= u16::MAX as usize && !self.domains.iter().any(|d| d.id == domain) {
            return Err(Error::InvalidConfig("more than 65535 sharing domains"));
        }
        let d = match self.domains.iter().position(|d| d.id == domain) {
            Some(d) => d,
            None => {
                self.domains.push(DomainIndex {
                    id: domain,
                    pages: 0,
                    shared: U32Map::new(),
                    unstable: U32Map::new(),
                    similar: SimTable::with_capacity(0),
                    sources: 0,
                    zero_frame: None,
                    zero_pages: 0,
                });
                self.domains.len() - 1
            }
        };
        self.domains[d].pages += pages;
        let slot = self.vms.len();
        self.vms.push(Some(VmSlot {
            id: vm,
            domain: d,
            base: self.next_base,
            pages: vec![PageMeta::PRIVATE; pages as usize],
            clock: AgingClock::new(self.wall_us),
            private: pages,
            own_cursor: 0,
            cold_after: None,
        }));
        self.slot_bases.push(self.next_base);
        self.next_base += pages;
        self.vm_slots.insert(pos, (vm, slot));
        self.total_pages += pages;
        self.pages_private += pages;
        self.round_clean = false;
        log::info!(
            "hv-mem: VM {} added: {} pages, sharing domain {}",
            vm.0,
            pages,
            domain.0
        );
        Ok(())
    }

    /// Registers a VM as [`Engine::add_vm`] does, but one whose memory is allocated on demand:
    /// every gfn the backend has no mapping for is a zero page from the start, mapped read-only
    /// onto the domain's zero frame (taken from the backend here if the domain has none yet),
    /// and the guest's first write to it gets a frame of its own through [`Engine::fault`].
    /// Mapped gfns must be writable frames the VM owns, as for `add_vm`. Returns how many
    /// pages start as zero pages. Out of frames for the zero frame: nothing is registered.
    pub fn add_vm_on_demand<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &mut M,
        vm: VmId,
        domain: DomainId,
        pages: u64,
    ) -> Result<u64, Error> {
        let absent = |mem: &M, g: u64| mem.mapping(vm, Gfn(g)).is_none();
        let any_absent = (0..pages).any(|g| absent(mem, g));
        let has_zero = self
            .domains
            .iter()
            .any(|d| d.id == domain && d.zero_frame.is_some());
        let fresh = if any_absent && !has_zero {
            let f = mem.alloc_frame().map_err(|_| Error::OutOfFrames)?;
            mem.frame_mut(f).fill(0);
            Some(f)
        } else {
            None
        };
        if let Err(e) = self.add_vm(vm, domain, pages) {
            if let Some(f) = fresh {
                mem.free_frame(f);
            }
            return Err(e);
        }
        let slot = self.slot_of(vm)?;
        let d = self.slot(slot).domain;
        if let Some(f) = fresh {
            self.domains[d].zero_frame = Some(f);
        }
        let Some(zero) = self.domains[d].zero_frame else {
            return Ok(0);
        };
        let mut zeros = 0;
        for g in 0..pages {
            if absent(mem, g) {
                let at = Loc {
                    slot,
                    gfn: g as usize,
                    vm,
                    domain: d,
                };
                mem.map(vm, Gfn(g), zero, false);
                self.set_page(at, Kind::Zero, 0, false);
                zeros += 1;
            }
        }
        Ok(zeros)
    }

    /// Unregisters a VM. Every page the engine mapped (zero, shared) is unmapped and every
    /// reference it held is dropped; afterwards every page still mapped in the VM is a private
    /// frame that the caller owns and frees with the VM.
    pub fn remove_vm<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &mut M,
        vm: VmId,
    ) -> Result<(), Error> {
        let slot = self.slot_of(vm)?;
        let (domain, n) = {
            let s = self.slot(slot);
            (s.domain, s.pages.len())
        };
        for gfn in 0..n {
            let at = Loc {
                slot,
                gfn,
                vm,
                domain,
            };
            let meta = self.meta(at);
            match meta.kind {
                Kind::Private => self.unindex(at),
                Kind::Zero => {
                    mem.unmap(vm, at.gfn());
                }
                Kind::Mapped => {
                    mem.unmap(vm, at.gfn());
                    let id = meta.payload();
                    self.census_out(id);
                    let o = &mut self.objects[id as usize];
                    o.page_refs -= 1;
                    o.mapped -= 1;
                    self.census_in(id);
                    self.note_orphan(id);
                    self.release_if_unused(mem, id);
                }
                Kind::Unmapped => {
                    let id = meta.payload();
                    self.census_out(id);
                    self.objects[id as usize].page_refs -= 1;
                    self.census_in(id);
                    self.note_orphan(id);
                    self.release_if_unused(mem, id);
                }
                Kind::Patched => {
                    let blob = BlobRef::from_raw(meta.payload());
                    if let Some(base) = self.patch_base(blob) {
                        self.objects[base as usize].patch_refs -= 1;
                        self.release_if_unused(mem, base);
                    }
                    self.free_patch(blob);
                }
            }
            self.count_kind(meta.kind, false);
            if meta.kind == Kind::Zero {
                self.domains[domain].zero_pages -= 1;
            }
        }
        // Every zero page of this VM is gone from the count now; drop the frame if unused.
        self.release_zero_frame_if_unused(mem, domain);
        self.domains[domain].pages -= n as u64;
        self.total_pages -= n as u64;
        self.vms[slot] = None;
        self.vm_slots.retain(|&(id, _)| id != vm);
        log::info!("hv-mem: VM {} removed", vm.0);
        Ok(())
    }

    fn slot_of(&self, vm: VmId) -> Result<usize, Error> {
        self.vm_slots
            .binary_search_by_key(&vm, |&(id, _)| id)
            .map(|i| self.vm_slots[i].1)
            .map_err(|_| Error::UnknownVm(vm))
    }

    fn slot(&self, slot: usize) -> &VmSlot {
        match self.vms.get(slot) {
            Some(Some(s)) => s,
            _ => unreachable!("slot {slot} is live"),
        }
    }

    fn meta(&self, at: Loc) -> PageMeta {
        self.slot(at.slot).pages[at.gfn]
    }

    fn meta_mut(&mut self, at: Loc) -> &mut PageMeta {
        &mut self.slot_mut(at.slot).pages[at.gfn]
    }

    fn slot_mut(&mut self, slot: usize) -> &mut VmSlot {
        match self.vms.get_mut(slot) {
            Some(Some(s)) => s,
            _ => unreachable!("slot {slot} is live"),
        }
    }

    /// Whether page `gfn` of VM `vm` is a zero page (its first write takes a new frame).
    pub fn is_zero_page(&self, vm: VmId, gfn: Gfn) -> Result<bool, Error> {
        let at = self.locate(vm, gfn)?;
        Ok(self.meta(at).kind == Kind::Zero)
    }

    /// VM `vm`'s pages that have a writable frame of their own (private): the frames it holds
    /// alone, its footprint beyond the zero, shared and compressed pages it refers to.
    pub fn vm_private_pages(&self, vm: VmId) -> Result<u64, Error> {
        Ok(self.slot(self.slot_of(vm)?).private)
    }

    /// The global page number of a page, if it fits a similarity index entry.
    fn global(&self, at: Loc) -> Option<u32> {
        let g = self.slot(at.slot).base + at.gfn as u64;
        (g < OBJ_BIT as u64).then_some(g as u32)
    }

    /// The live page a global page number names, if any.
    fn by_global(&self, g: u32) -> Option<Loc> {
        let g = g as u64;
        let slot = self
            .slot_bases
            .partition_point(|&b| b <= g)
            .checked_sub(1)?;
        let vm = self.vms.get(slot)?.as_ref()?;
        let gfn = (g - vm.base) as usize;
        (gfn < vm.pages.len()).then_some(Loc {
            slot,
            gfn,
            vm: vm.id,
            domain: vm.domain,
        })
    }

    fn locate(&self, vm: VmId, gfn: Gfn) -> Result<Loc, Error> {
        let slot = self.slot_of(vm)?;
        let s = self.slot(slot);
        if gfn.0 >= s.pages.len() as u64 {
            return Err(Error::GfnOutOfRange { vm, gfn });
        }
        Ok(Loc {
            slot,
            gfn: gfn.0 as usize,
            vm,
            domain: s.domain,
        })
    }

    fn count_kind(&mut self, kind: Kind, add: bool) {
        let c = match kind {
            Kind::Private => &mut self.pages_private,
            Kind::Zero => &mut self.pages_zero,
            Kind::Mapped | Kind::Unmapped => &mut self.pages_shared,
            Kind::Patched => &mut self.pages_patched,
        };
        if add {
            *c += 1;
        } else {
            *c -= 1;
        }
    }

    /// Changes a page's kind and payload, keeping the gauges right. `reset` forgets the
    /// scanner's history (used when a page becomes private again after a fault).
    fn set_page(&mut self, at: Loc, kind: Kind, payload: u32, reset: bool) {
        let m = self.meta_mut(at);
        let old = m.kind;
        m.kind = kind;
        m.word = payload;
        if reset {
            // Back after a fault: the guest is using the page, so it must prove stable again
            // (two visits with one hash) before the scanner merges it, and it is not cold
            // before a threshold from its next visit.
            m.flags = F_WATCH | F_FRESH;
        }
        self.count_kind(old, false);
        self.count_kind(kind, true);
        let vm = self.slot_mut(at.slot);
        vm.private =
            vm.private - u64::from(old == Kind::Private) + u64::from(kind == Kind::Private);
        let d = &mut self.domains[at.domain];
        if old == Kind::Zero {
            d.zero_pages -= 1;
        }
        if kind == Kind::Zero {
            d.zero_pages += 1;
        }
    }

    /// Removes the page from its domain's unstable index if it is the entry there.
    fn unindex(&mut self, at: Loc) {
        let m = self.meta(at);
        if m.flags & F_INDEXED != 0 {
            if let Some(g) = self.global(at) {
                self.domains[at.domain].unstable.remove_if(m.hash(), g);
            }
            self.meta_mut(at).flags &= !F_INDEXED;
        }
    }

    /// The content hash the indexes use: XXH3-64 of the page, low 32 bits (an all-zero page,
    /// found with an early-exit word test, gets the precomputed zero hash without hashing).
    /// 32 bits are plenty for a hint that every user confirms byte for byte.
    fn content_hash(&self, content: &Page) -> u32 {
        self.content_hash_and_zero(content).0
    }

    /// [`Engine::content_hash`], and whether the page was found all zero (byte for byte, not
    /// by its hash).
    fn content_hash_and_zero(&self, content: &Page) -> (u32, bool) {
        if is_zero(content) {
            (self.zero_hash, true)
        } else {
            (hash_page(content) as u32, false)
        }
    }

    fn new_object(&mut self, obj: Object) -> u32 {
        let id = self.place_object(obj);
        self.census_in(id);
        id
    }

    fn place_object(&mut self, obj: Object) -> u32 {
        match self.free_objects.pop() {
            Some(id) => {
                self.objects[id as usize] = obj;
                id
            }
            None => {
                // Grow by a quarter rather than doubling: the table is metadata charged to
                // the engine, and most objects are made in one or two rounds. The free list
                // grows with it, so that freeing an object never allocates.
                if self.objects.len() == self.objects.capacity() {
                    self.objects.reserve_exact(self.object_growth());
                    let free_room = self.objects.capacity() - self.free_objects.len();
                    self.free_objects.reserve_exact(free_room);
                }
                self.objects.push(obj);
                (self.objects.len() - 1) as u32
            }
        }
    }

    /// Object slots the table grows by when it is full.
    fn object_growth(&self) -> usize {
        (self.objects.len() / 4).max(256)
    }

    /// Heap bytes of the tables that grow as the engine works, besides the store: the object
    /// table and its free lists, the content indexes. (Per-page state is allocated when a VM is
    /// added and is not charged to [`Config::heap_limit_bytes`].)
    fn table_bytes(&self) -> usize {
        let indexes: usize = self
            .domains
            .iter()
            .map(|d| d.shared.heap_bytes() + d.unstable.heap_bytes() + d.similar.heap_bytes())
            .sum();
        indexes
            + self.objects.capacity() * core::mem::size_of::<Object>()
            + (self.free_objects.capacity() + self.orphans.capacity()) * 4
    }

    /// Whether `extra` more heap bytes fit under [`Config::heap_limit_bytes`] beside what the
    /// tables and the store hold now.
    fn heap_room(&self, extra: usize) -> bool {
        let limit = self.config.heap_limit_bytes;
        limit == usize::MAX
            || self
                .table_bytes()
                .saturating_add(self.blobs.heap_bytes())
                .saturating_add(extra)
                <= limit
    }

    /// Whether one more object of `domain`, and its entry in the domain's shared index, fit
    /// under the heap limit (counted in [`Counters::heap_limited`] when not): asked before an
    /// operation that makes one changes anything.
    fn object_room(&mut self, domain: usize) -> bool {
        let table = if self.free_objects.is_empty() && self.objects.len() == self.objects.capacity()
        {
            self.object_growth() * (core::mem::size_of::<Object>() + 4)
        } else {
            0
        };
        let fits = self.heap_room(table + self.domains[domain].shared.growth_bytes());
        if !fits {
            self.counters.heap_limited += 1;
        }
        fits
    }

    /// Gives the store what the heap limit leaves beside the tables: called before each store
    /// (the tables grow and shrink between stores).
    fn sync_store_limit(&mut self) {
        let limit = self.config.heap_limit_bytes;
        if limit != usize::MAX {
            self.blobs
                .set_limit(limit.saturating_sub(self.table_bytes()));
        }
    }

    /// The outcome of a store, a refusal counted in [`Counters::heap_limited`].
    fn stored(&mut self, result: Result<BlobRef, StoreError>) -> Option<BlobRef> {
        if result.is_err() {
            self.counters.heap_limited += 1;
        }
        result.ok()
    }

    /// The census class of an object: `[content compressed][pages refer to it]` as an index
    /// into `census`, or `None` for a free slot.
    fn census_class(o: &Object) -> Option<usize> {
        let compressed = match o.store() {
            Store::Free => return None,
            Store::Frame(_) => 0,
            Store::Blob(_) => 2,
        };
        Some(compressed + usize::from(o.page_refs > 0))
    }

    /// Takes an object out of the census before a change of its store or page count...
    fn census_out(&mut self, id: u32) {
        if let Some(c) = Self::census_class(&self.objects[id as usize]) {
            self.census[c] -= 1;
        }
    }

    /// ...and puts it back after.
    fn census_in(&mut self, id: u32) {
        if let Some(c) = Self::census_class(&self.objects[id as usize]) {
            self.census[c] += 1;
        }
    }

    /// Changes where an object's content is, keeping the census right.
    fn set_object_store(&mut self, id: u32, store: Store) {
        self.census_out(id);
        self.objects[id as usize].set_store(store);
        self.census_in(id);
    }

    /// Remembers a resident object that only patches use any more, to compress it later.
    fn note_orphan(&mut self, id: u32) {
        let o = &self.objects[id as usize];
        if o.page_refs == 0 && o.patch_refs > 0 && matches!(o.store(), Store::Frame(_)) {
            self.orphans.push(id);
        }
    }

    /// Compresses the orphaned references noted since the last scan. Returns how many changed.
    fn compress_orphans<M: MemoryBackend + ?Sized>(&mut self, mem: &mut M) -> u64 {
        let mut changed = 0;
        while let Some(id) = self.orphans.pop() {
            let o = self.objects[id as usize];
            let Store::Frame(f) = o.store() else { continue };
            if o.page_refs != 0 || o.patch_refs == 0 || o.incompressible || !self.config.compression
            {
                continue;
            }
            match self.compress_to_blob(mem, f) {
                Some(blob) => {
                    mem.free_frame(f);
                    self.set_object_store(id, Store::Blob(blob));
                    self.counters.shared_compressed += 1;
                    changed += 1;
                }
                None => self.objects[id as usize].incompressible = true,
            }
        }
        changed
    }

    /// Frees an object nobody references any more.
    fn release_if_unused<M: MemoryBackend + ?Sized>(&mut self, mem: &mut M, id: u32) {
        let o = self.objects[id as usize];
        if o.page_refs != 0 || o.patch_refs != 0 {
            return;
        }
        match o.store() {
            Store::Frame(f) => mem.free_frame(f),
            Store::Blob(b) => self.blobs.free(b),
            Store::Free => return,
        }
        self.domains[o.domain as usize].shared.remove_if(o.hash, id);
        self.set_object_store(id, Store::Free);
        self.free_objects.push(id);
    }

    fn release_zero_frame_if_unused<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &mut M,
        domain: usize,
    ) {
        let d = &mut self.domains[domain];
        if d.zero_pages == 0 {
            if let Some(z) = d.zero_frame.take() {
                mem.free_frame(z);
            }
        }
    }

    /// The patch proper of a stored patch (after its reference id).
    fn patch_bytes(&self, blob: BlobRef) -> &[u8] {
        self.blobs
            .get(blob)
            .and_then(|d| d.get(PATCH_HEADER..))
            .unwrap_or(&[])
    }

    /// Frees a stored patch, keeping the live patch bytes right.
    fn free_patch(&mut self, blob: BlobRef) {
        let len = self.blobs.get(blob).map_or(0, <[u8]>::len);
        self.bytes_patches -= len as u64;
        self.blobs.free(blob);
    }

    fn patch_base(&self, blob: BlobRef) -> Option<u32> {
        let data = self.blobs.get(blob)?;
        let id = data.get(..PATCH_HEADER)?;
        Some(u32::from_le_bytes([id[0], id[1], id[2], id[3]]))
    }

    // ---------------------------------------------------------------------------------------
    // Scanning
    // ---------------------------------------------------------------------------------------

    /// Visits up to [`Config::pages_per_scan`] pages. See [`Engine::scan`].
    pub fn scan_step<M: MemoryBackend + ?Sized>(&mut self, mem: &mut M) -> ScanReport {
        let n = self.config.pages_per_scan as u64;
        self.scan_inner(mem, n, false)
    }

    /// Visits up to `max_pages` pages, continuing where the previous call stopped and wrapping
    /// around all VMs (one wrap is a round). Each visit reads the page's accessed/dirty state and,
    /// depending on its state, merges it with the zero frame or an identical page, or (when cold)
    /// patches or compresses it. Never allocates a frame; frees the frames it saves.
    pub fn scan<M: MemoryBackend + ?Sized>(&mut self, mem: &mut M, max_pages: u64) -> ScanReport {
        self.scan_inner(mem, max_pages, false)
    }

    /// Scans until the current round ends (a full round if the previous call ended one).
    pub fn scan_round<M: MemoryBackend + ?Sized>(&mut self, mem: &mut M) -> ScanReport {
        self.scan_inner(mem, u64::MAX, true)
    }

    /// Whether the last completed round was a full round that changed nothing and left nothing
    /// pending (no volatile, warming-up or not-yet-cold page): further scans would change
    /// nothing until a guest touches memory.
    pub fn converged(&self) -> bool {
        self.last_round_converged
    }

    /// Scans whole rounds until [`Engine::converged`], at most `max_rounds`. Returns the rounds
    /// scanned, or `None` if it did not converge.
    ///
    /// For batch use on memory that holds still (guest RAM images, tests): before each round it
    /// advances every clock by [`Config::cold_span_us`] ([`Engine::advance_time`]), as if every
    /// VM had run that long since the previous round, so that a page untouched since the
    /// previous visit is one threshold older at each visit (cold on its second visit).
    pub fn run_until_converged<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &mut M,
        max_rounds: u64,
    ) -> Option<u64> {
        for r in 1..=max_rounds {
            self.advance_time(self.config.cold_span_us());
            let rep = self.scan_round(mem);
            if rep.rounds_completed == 0 {
                return None; // no pages at all
            }
            if self.converged() {
                return Some(r);
            }
        }
        None
    }

    /// Rounds completed so far.
    pub fn rounds(&self) -> u64 {
        self.counters.rounds
    }

    /// Reports host time: microseconds on a clock that never goes back (a smaller value than
    /// before is ignored). With [`Engine::set_vm_time`] it decides which pages are cold
    /// ([`Config::cold_after_us`]); both are read at the start of each scan call.
    pub fn set_wall_time(&mut self, us: u64) {
        self.wall_us = self.wall_us.max(us);
    }

    /// Reports VM `vm`'s own time: microseconds of the time it has run (or, as the hypervisor
    /// counts it, been given the CPU) since [`Engine::add_vm`], the clock its pages age by.
    /// Time the VM spends waiting for the CPU must not count, so that the pages of a VM that
    /// does not get to run do not go cold. A smaller value than before is ignored.
    pub fn set_vm_time(&mut self, vm: VmId, us: u64) -> Result<(), Error> {
        let slot = self.slot_of(vm)?;
        match self.vms.get_mut(slot) {
            Some(Some(s)) => s.clock.set_own_time(us),
            _ => unreachable!("slot {slot} is live"),
        }
        Ok(())
    }

    /// Gives VM `vm` its own coldness thresholds, microseconds of its own time and of host time
    /// (each at least 1), or back the configuration's (`None`); read at the start of each scan
    /// call. The hypervisor shortens them for an idle VM: a page its idle wake-ups have not
    /// touched for that long is outside its working set. A page already found warm keeps its
    /// stamp, so it goes cold after the new threshold from then on, never sooner.
    pub fn set_vm_cold_after(&mut self, vm: VmId, after: Option<(u64, u64)>) -> Result<(), Error> {
        let slot = self.slot_of(vm)?;
        match self.vms.get_mut(slot) {
            Some(Some(s)) => s.cold_after = after.map(|(own, wall)| (own.max(1), wall.max(1))),
            _ => unreachable!("slot {slot} is live"),
        }
        Ok(())
    }

    /// Advances host time and every VM's own time by `us`, as if every VM had run that long:
    /// the clock of batch use, where there is no VM running (guest RAM images, tests).
    pub fn advance_time(&mut self, us: u64) {
        self.wall_us = self.wall_us.saturating_add(us);
        for vm in self.vms.iter_mut().flatten() {
            vm.clock.advance_own_time(us);
        }
    }

    fn finish_round(&mut self) {
        self.counters.rounds += 1;
        for vm in self.vms.iter_mut().flatten() {
            vm.clock.start_round();
        }
        for d in &mut self.domains {
            d.unstable.compact();
            d.shared.compact();
        }
        self.last_round_converged =
            self.round_clean && self.round_changes == 0 && self.round_pending == 0;
        if self.last_round_converged {
            self.drop_unstable();
            // The object table grew by quarters while objects were made; give the slack back.
            self.objects.shrink_to_fit();
            self.free_objects.shrink_to_fit();
        }
        self.round_changes = 0;
        self.round_pending = 0;
        self.round_clean = true;
    }

    /// After a round that changed nothing, the unstable index only holds private pages that
    /// found no twin and gain nothing from patching or compression: drop it (and the pages'
    /// `F_INDEXED` marks). A page enters it again only when its content changes and holds
    /// still (see `scan_private`), so the index is rebuilt from changed pages alone.
    fn drop_unstable(&mut self) {
        if self.domains.iter().all(|d| d.unstable.is_empty()) {
            return;
        }
        for d in &mut self.domains {
            d.unstable.clear();
        }
        for vm in self.vms.iter_mut().flatten() {
            for m in vm.pages.iter_mut() {
                m.flags &= !F_INDEXED;
            }
        }
    }

    /// Moves the cursor forward to the first page at or after it, wrapping past the last VM.
    /// Returns whether it wrapped (a round ended). Needs at least one page to exist.
    fn settle_cursor(&mut self) -> bool {
        let (mut slot, mut gfn) = self.cursor;
        let mut wrapped = false;
        loop {
            match self.vms.get(slot) {
                Some(Some(vm)) if gfn < vm.pages.len() => break,
                Some(_) => {
                    slot += 1;
                    gfn = 0;
                }
                None if wrapped => break, // no page at all (guarded by the caller)
                None => {
                    wrapped = true;
                    slot = 0;
                    gfn = 0;
                }
            }
        }
        self.cursor = (slot, gfn);
        wrapped
    }

    fn scan_inner<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &mut M,
        max_pages: u64,
        stop_at_round_end: bool,
    ) -> ScanReport {
        let mut rep = ScanReport::default();
        if self.total_pages == 0 {
            return rep;
        }
        self.update_clocks();
        let orphans = self.compress_orphans(mem);
        rep.changes += orphans;
        self.round_changes += orphans;
        // The cursor may point past a VM removed since the last call.
        if self.settle_cursor() {
            self.finish_round();
            rep.rounds_completed += 1;
            if stop_at_round_end {
                return rep;
            }
        }
        while rep.pages < max_pages {
            let (slot, gfn) = self.cursor;
            let at = match &self.vms[slot] {
                Some(vm) => Loc {
                    slot,
                    gfn,
                    vm: vm.id,
                    domain: vm.domain,
                },
                None => unreachable!("settled cursor points at a live VM"),
            };
            self.visit(mem, at, &mut rep);
            self.cursor = (slot, gfn + 1);
            if self.settle_cursor() {
                self.finish_round();
                rep.rounds_completed += 1;
                if stop_at_round_end {
                    break;
                }
            }
        }
        rep
    }

    /// Brings every VM's aging clock up to the reported times.
    fn update_clocks(&mut self) {
        let (wall, own_after, wall_after) = (
            self.wall_us,
            self.config.cold_after_us,
            self.config.cold_after_wall_us,
        );
        for vm in self.vms.iter_mut().flatten() {
            let (own, wall_cold) = vm.cold_after.unwrap_or((own_after, wall_after));
            vm.clock.update(wall, own, wall_cold);
        }
    }

    /// Visits up to `max_pages` pages of VM `vm` alone, from where the last call for it
    /// stopped, as the scan would: the hypervisor's way to spend scan work on a VM first (an
    /// idle one, whose memory should go at once). The global scan's cursor and rounds are
    /// unaffected; a change counts against the round in progress, which then does not count
    /// as converged. `rounds_completed` says how many times this VM's own pass wrapped.
    pub fn scan_vm<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &mut M,
        vm: VmId,
        max_pages: u64,
    ) -> Result<ScanReport, Error> {
        let slot = self.slot_of(vm)?;
        let mut rep = ScanReport::default();
        let (domain, n) = {
            let s = self.slot(slot);
            (s.domain, s.pages.len())
        };
        if n == 0 {
            return Ok(rep);
        }
        self.update_clocks();
        while rep.pages < max_pages {
            let gfn = self.slot(slot).own_cursor;
            let at = Loc {
                slot,
                gfn,
                vm,
                domain,
            };
            self.visit(mem, at, &mut rep);
            let s = self.slot_mut(slot);
            s.own_cursor = (gfn + 1) % n;
            if s.own_cursor == 0 {
                rep.rounds_completed += 1;
            }
        }
        self.round_clean = false;
        Ok(rep)
    }

    /// Scans the page at `at` and counts the visit in `rep` and in the round in progress.
    fn visit<M: MemoryBackend + ?Sized>(&mut self, mem: &mut M, at: Loc, rep: &mut ScanReport) {
        rep.pages += 1;
        match self.scan_page(mem, at) {
            Outcome::Changed => {
                rep.changes += 1;
                self.round_changes += 1;
            }
            Outcome::Pending => self.round_pending += 1,
            Outcome::Final => {}
        }
    }

    fn scan_page<M: MemoryBackend + ?Sized>(&mut self, mem: &mut M, at: Loc) -> Outcome {
        self.counters.pages_scanned += 1;
        let meta = self.meta(at);
        match meta.kind {
            Kind::Private => self.scan_private(mem, at),
            Kind::Mapped => self.scan_mapped(mem, at, meta.payload()),
            Kind::Unmapped => self.scan_unmapped(mem, meta.payload()),
            Kind::Zero | Kind::Patched => Outcome::Final,
        }
    }

    /// Ages a page on a visit that found its accessed bit as `accessed`.
    fn age(&mut self, at: Loc, accessed: bool) -> Age {
        let now = self.slot(at.slot).clock.ticks() as u8;
        let m = self.meta_mut(at);
        if accessed || m.flags & F_FRESH != 0 {
            m.seen = now;
            m.flags &= !TIME_FLAGS;
            return Age {
                cold: false,
                in_use: true,
                quiet: false,
            };
        }
        let idle = now.wrapping_sub(m.seen);
        if idle >= COLD_TICKS {
            m.flags |= F_COLD;
        }
        let cold = m.flags & F_COLD != 0;
        Age {
            cold,
            in_use: false,
            quiet: cold || idle >= QUIET_TICKS,
        }
    }

    fn scan_private<M: MemoryBackend + ?Sized>(&mut self, mem: &mut M, at: Loc) -> Outcome {
        let Some(mapping) = mem.mapping(at.vm, at.gfn()) else {
            return Outcome::Final; // a hole in guest RAM
        };
        let frame = mapping.frame;
        let accessed = mem.test_and_clear_accessed(at.vm, at.gfn());
        // Clear dirty *before* reading: a write after this point sets it again and the next
        // visit re-hashes.
        let dirty = mem.test_and_clear_dirty(at.vm, at.gfn());
        let Age {
            cold,
            in_use,
            quiet,
        } = self.age(at, accessed);
        let meta = self.meta(at);
        let was_stable = meta.flags & F_STABLE != 0;
        // Whether this visit read the page and found every byte zero (not merely its hash).
        let mut read_zero = false;
        if dirty || meta.flags & F_HASHED == 0 {
            let (h, zero) = self.content_hash_and_zero(mem.frame(frame));
            read_zero = zero;
            self.counters.pages_hashed += 1;
            let first_sight = meta.flags & (F_HASHED | F_WATCH) == 0;
            if first_sight && !accessed {
                // Never seen before and not touched since it was mapped: nothing says it is
                // volatile, so it is a candidate at once (merging it costs one fault if the
                // guest writes it later; that write marks it F_WATCH).
                let m = self.meta_mut(at);
                m.word = h;
                m.flags = m.flags & TIME_FLAGS | F_HASHED;
            } else {
                // Changed content, a page back from a fault, one the guest touched before the
                // first visit, or one written since the previous visit even if with the same
                // bytes (a page the guest keeps writing, such as its stack or, with EPT A/D
                // flags, its page tables, which the CPU's page walks count as written): volatile
                // for now. Remember the hash; the page becomes a candidate only once a visit
                // finds it unwritten and unchanged (see below).
                if meta.flags & F_HASHED != 0 && h != meta.hash() {
                    self.counters.volatile_skips += 1;
                }
                self.unindex(at);
                let m = self.meta_mut(at);
                m.word = h;
                m.flags = m.flags & TIME_FLAGS | F_HASHED | F_WATCH;
                return Outcome::Pending;
            }
        } else if !was_stable && !in_use && !quiet {
            // Unwritten and unchanged since the previous visit, but that says nothing if the VM
            // has hardly run since: passes made while other VMs run must not make a page the
            // guest writes whenever it runs look stable. The page needs a visit after the VM
            // used it without writing it (accessed, clean), or one that finds it quiet.
            return Outcome::Pending;
        }
        self.meta_mut(at).flags |= F_STABLE;
        let h = self.meta(at).hash();

        // Cheap merges first: the zero frame, then an identical object or page.
        if self.config.zero_pages
            && h == self.zero_hash
            && self.merge_zero(mem, at, frame, read_zero)
        {
            return Outcome::Changed;
        }
        let mut just_indexed = false;
        if self.config.share_identical {
            if let Some(obj) = self.domains[at.domain].shared.get(h) {
                if self.join_object(mem, at, frame, obj, cold) {
                    return Outcome::Changed;
                }
            }
            if let Some(me) = self.global(at) {
                match self.domains[at.domain].unstable.get(h) {
                    Some(other) if other == me => {}
                    found => {
                        let partner = found.and_then(|o| self.valid_partner(mem, o, at.domain, h));
                        if let Some((p, pf)) = partner {
                            if self.pair(mem, at, frame, p, pf) {
                                return Outcome::Changed;
                            }
                        } else if (!was_stable || found.is_some())
                            && self.heap_room(self.domains[at.domain].unstable.growth_bytes())
                        {
                            // A page enters the index when it turns stable (or takes over a
                            // stale entry), not on every visit: after convergence drops the
                            // index, unchanged pages stay out of it. Past the heap limit it
                            // stays out: the entry is only a hint.
                            self.domains[at.domain].unstable.insert(h, me);
                            self.meta_mut(at).flags |= F_INDEXED;
                            just_indexed = true;
                        }
                    }
                }
            }
        }
        // Expensive work (patch, LZ4) only for cold pages, and never on the visit that put
        // the page in the unstable index: its identical twins (in later VMs of the round)
        // must be able to find it there before it is patched or compressed.
        let defer = just_indexed && !was_stable;
        if cold && !defer && self.meta(at).flags & F_NO_GAIN == 0 {
            match self.reduce_cold(mem, at, frame) {
                Outcome::Changed => return Outcome::Changed,
                Outcome::Pending => return Outcome::Pending,
                Outcome::Final => self.meta_mut(at).flags |= F_NO_GAIN,
            }
        }
        // A page stays as it is: record it once as a candidate reference for similar pages,
        // when cold processing left it alone, or at once when the guest is using it (it will
        // not go cold soon). A page going cold is recorded when it is processed (as itself, or
        // as the compressed object it becomes), which keeps the first round free of this work.
        let flags = self.meta(at).flags;
        if self.config.patching && flags & F_SIM == 0 && (flags & F_NO_GAIN != 0 || in_use) {
            if let Some(g) = self.global(at) {
                self.index_similar(mem, at.domain, frame, g);
                self.meta_mut(at).flags |= F_SIM;
            }
        }
        if !defer && (cold || self.meta(at).flags & F_NO_GAIN != 0) {
            Outcome::Final
        } else {
            Outcome::Pending
        }
    }

    fn scan_mapped<M: MemoryBackend + ?Sized>(&mut self, mem: &mut M, at: Loc, id: u32) -> Outcome {
        let accessed = mem.test_and_clear_accessed(at.vm, at.gfn());
        let cold = self.age(at, accessed).cold;
        let o = self.objects[id as usize];
        if !self.config.compression
            || o.incompressible
            || (o.page_refs > 1 && !self.config.compress_shared)
        {
            return Outcome::Final;
        }
        if !cold {
            return Outcome::Pending;
        }
        let Store::Frame(f) = o.store() else {
            return Outcome::Final; // cannot happen: a mapped object is resident
        };
        if o.mapped == 1 {
            // The last mapper: compress, then unmap it and drop the frame.
            let Some(blob) = self.compress_to_blob(mem, f) else {
                self.objects[id as usize].incompressible = true;
                return Outcome::Final;
            };
            mem.unmap(at.vm, at.gfn());
            mem.free_frame(f);
            self.objects[id as usize].mapped = 0;
            self.set_object_store(id, Store::Blob(blob));
            self.set_page(at, Kind::Unmapped, id, false);
            self.counters.shared_compressed += 1;
            self.counters.cold_unmaps += 1;
            return Outcome::Changed;
        }
        if !o.compressible {
            // Unmapping cold mappers only pays if the frame will compress once all are cold.
            let cutoff = self.config.compress_cutoff;
            if compress::compress(mem.frame(f), &mut self.scratch_lz, cutoff).is_none() {
                self.objects[id as usize].incompressible = true;
                return Outcome::Final;
            }
            self.objects[id as usize].compressible = true;
        }
        mem.unmap(at.vm, at.gfn());
        self.objects[id as usize].mapped -= 1;
        self.set_page(at, Kind::Unmapped, id, false);
        self.counters.cold_unmaps += 1;
        Outcome::Changed
    }

    fn scan_unmapped<M: MemoryBackend + ?Sized>(&mut self, mem: &mut M, id: u32) -> Outcome {
        // A resident object no page maps any more (its last mapper took a copy, or a read
        // fault-in was followed by a CoW) is compressed when one of its unmapped pages is seen.
        let o = self.objects[id as usize];
        let Store::Frame(f) = o.store() else {
            return Outcome::Final;
        };
        if o.mapped != 0
            || o.incompressible
            || !self.config.compression
            || (o.page_refs > 1 && !self.config.compress_shared)
        {
            return Outcome::Final;
        }
        match self.compress_to_blob(mem, f) {
            Some(blob) => {
                mem.free_frame(f);
                self.set_object_store(id, Store::Blob(blob));
                self.counters.shared_compressed += 1;
                Outcome::Changed
            }
            None => {
                self.objects[id as usize].incompressible = true;
                Outcome::Final
            }
        }
    }

    /// Compresses a frame nobody can write into a new blob, if it meets the cutoff.
    fn compress_to_blob<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &M,
        f: Frame,
    ) -> Option<BlobRef> {
        let cutoff = self.config.compress_cutoff;
        let n = compress::compress(mem.frame(f), &mut self.scratch_lz, cutoff)?;
        self.sync_store_limit();
        let result = self.blobs.store(&[&self.scratch_lz[..n]]);
        self.stored(result)
    }

    fn protect<M: MemoryBackend + ?Sized>(mem: &mut M, at: Loc, frame: Frame) {
        mem.map(at.vm, at.gfn(), frame, false);
    }

    fn unprotect<M: MemoryBackend + ?Sized>(mem: &mut M, at: Loc, frame: Frame) {
        mem.map(at.vm, at.gfn(), frame, true);
    }

    /// The page's check failed on frozen bytes: its content moved since it was hashed. Forget
    /// the hash so the next visit starts the stability check again.
    fn content_moved(&mut self, at: Loc) {
        self.unindex(at);
        let m = self.meta_mut(at);
        m.flags = m.flags & TIME_FLAGS | F_WATCH;
        self.counters.compare_mismatches += 1;
    }

    /// Maps a page whose hash is the zero hash onto the zero frame, after checking its frozen
    /// bytes. `read_zero`: this visit read every byte as zero, after clearing the dirty flag;
    /// if no write set the flag again before the page was frozen, the bytes are still zero and
    /// are not read a second time (most of guest RAM is zero pages, so a first round saves a
    /// pass over most of it).
    fn merge_zero<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &mut M,
        at: Loc,
        frame: Frame,
        read_zero: bool,
    ) -> bool {
        Self::protect(mem, at, frame);
        let unchanged = read_zero && !mem.test_and_clear_dirty(at.vm, at.gfn());
        if !unchanged && !is_zero(mem.frame(frame)) {
            Self::unprotect(mem, at, frame);
            self.content_moved(at);
            return false;
        }
        match self.domains[at.domain].zero_frame {
            // The first zero page's frame becomes the zero frame: no copy, no allocation.
            None => self.domains[at.domain].zero_frame = Some(frame),
            Some(z) => {
                mem.map(at.vm, at.gfn(), z, false);
                mem.free_frame(frame);
            }
        }
        self.unindex(at);
        self.set_page(at, Kind::Zero, 0, false);
        self.counters.merges_zero += 1;
        true
    }

    /// Merges a stable private page into an existing object with the same hash; a `cold` page
    /// joining compressed content is left unmapped.
    fn join_object<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &mut M,
        at: Loc,
        frame: Frame,
        id: u32,
        cold: bool,
    ) -> bool {
        let h = self.meta(at).hash();
        let Some(&o) = self.objects.get(id as usize) else {
            return false;
        };
        if o.store() == Store::Free || o.domain as usize != at.domain || o.hash != h {
            return false;
        }
        Self::protect(mem, at, frame);
        let equal = match o.store() {
            Store::Frame(f) => mem.frame(frame) == mem.frame(f),
            Store::Blob(b) => match self.blobs.get(b) {
                Some(data) => {
                    compress::decompress(data, &mut self.scratch_page).is_ok()
                        && *self.scratch_page == *mem.frame(frame)
                }
                None => false,
            },
            Store::Free => false,
        };
        if !equal {
            Self::unprotect(mem, at, frame);
            self.counters.compare_mismatches += 1;
            return false;
        }
        self.census_out(id);
        let kind = match o.store() {
            Store::Frame(f) => {
                mem.map(at.vm, at.gfn(), f, false);
                mem.free_frame(frame);
                self.objects[id as usize].mapped += 1;
                Kind::Mapped
            }
            Store::Blob(_) if cold => {
                mem.unmap(at.vm, at.gfn());
                mem.free_frame(frame);
                Kind::Unmapped
            }
            Store::Blob(b) => {
                // A warm page joining compressed content: keep its frame as the object's frame
                // (it is read-only already) instead of unmapping a page that is in use.
                self.blobs.free(b);
                let o = &mut self.objects[id as usize];
                o.set_store(Store::Frame(frame));
                o.mapped += 1;
                Kind::Mapped
            }
            Store::Free => unreachable!("checked above"),
        };
        self.objects[id as usize].page_refs += 1;
        self.census_in(id);
        self.unindex(at);
        self.set_page(at, kind, id, false);
        self.counters.merges_identical += 1;
        true
    }

    /// Resolves an unstable-index entry to a private, stable page of the same domain with hash
    /// `h`, still mapped writable.
    fn valid_partner<M: MemoryBackend + ?Sized>(
        &self,
        mem: &M,
        global: u32,
        domain: usize,
        h: u32,
    ) -> Option<(Loc, Frame)> {
        let at = self.by_global(global)?;
        if at.domain != domain {
            return None;
        }
        let m = self.meta(at);
        if m.kind != Kind::Private || m.flags & (F_HASHED | F_STABLE) != F_HASHED | F_STABLE {
            return None;
        }
        if m.hash() != h {
            return None;
        }
        let mapping = mem.mapping(at.vm, at.gfn())?;
        if !mapping.writable {
            return None;
        }
        Some((at, mapping.frame))
    }

    /// Makes a new shared object out of two identical private pages: `other`'s frame becomes
    /// the shared frame, `at`'s frame is freed.
    fn pair<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &mut M,
        at: Loc,
        frame: Frame,
        other: Loc,
        other_frame: Frame,
    ) -> bool {
        debug_assert_eq!(at.domain, other.domain, "never compare across domains");
        if !self.object_room(at.domain) {
            return false;
        }
        Self::protect(mem, at, frame);
        Self::protect(mem, other, other_frame);
        if mem.frame(frame) != mem.frame(other_frame) {
            Self::unprotect(mem, at, frame);
            Self::unprotect(mem, other, other_frame);
            self.counters.compare_mismatches += 1;
            return false;
        }
        // Hash the frozen bytes: the hashes seen before protection are only hints.
        let h = self.content_hash(mem.frame(other_frame));
        let id = self.new_object(Object::new(h, Store::Frame(other_frame), 2, 2, at.domain));
        mem.map(at.vm, at.gfn(), other_frame, false);
        mem.free_frame(frame);
        self.unindex(at);
        self.unindex(other);
        self.set_page(at, Kind::Mapped, id, false);
        self.set_page(other, Kind::Mapped, id, false);
        self.domains[at.domain].shared.insert(h, id);
        if self.config.patching {
            self.index_similar(mem, at.domain, other_frame, OBJ_BIT | id);
        }
        self.counters.merges_identical += 1;
        true
    }

    /// Records a page or object as a candidate patch reference under its similarity keys.
    fn index_similar<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &M,
        domain: usize,
        frame: Frame,
        value: u32,
    ) {
        let mut keys = [None; MAX_SIMILARITY_BLOCKS];
        let n = self.config.similarity_blocks as usize;
        let normalize = self.config.similarity_normalize_pointers;
        similarity_keys(mem.frame(frame), &self.positions[..n], normalize, &mut keys);
        let per_source = self.config.similarity_entries_per_page as u64;
        let d = &mut self.domains[domain];
        d.sources += 1;
        // Capacity follows the pages and objects that were recorded (never more than the
        // domain's pages allow): grow by a quarter when it is exceeded, rehashing what is in.
        let want = (d.sources.min(d.pages) * per_source).clamp(MIN_SIM_ENTRIES, 1 << 30) as usize;
        // Past the heap limit the table keeps its size and evicts older hints instead.
        let grown = want + want / 4;
        if want > d.similar.capacity() && self.heap_room(grown * 8) {
            let d = &mut self.domains[domain];
            d.similar.resize(grown);
        }
        let d = &mut self.domains[domain];
        for k in keys.iter().flatten() {
            d.similar.insert(*k, value);
        }
    }

    /// A cold, stable private page: store it as a patch or compressed, whichever is smaller and
    /// meets its cutoff. Returns Changed, Pending (the content moved under us) or Final (no
    /// gain: the page stays private and writable).
    fn reduce_cold<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &mut M,
        at: Loc,
        frame: Frame,
    ) -> Outcome {
        if !self.config.patching && !self.config.compression {
            return Outcome::Final;
        }
        // A patch (against a page that becomes an object) or a compressed page needs one more
        // object; without room the page waits for a later visit.
        if !self.object_room(at.domain) {
            return Outcome::Pending;
        }
        Self::protect(mem, at, frame);
        let h = self.content_hash(mem.frame(frame));
        if h != self.meta(at).hash() {
            Self::unprotect(mem, at, frame);
            self.content_moved(at);
            return Outcome::Pending;
        }
        let lz = if self.config.compression {
            let cutoff = self.config.compress_cutoff;
            compress::compress(mem.frame(frame), &mut self.scratch_lz, cutoff)
        } else {
            None
        };
        if self.config.patching {
            // A patch must beat compression (counting its reference id) to be worth its pinned
            // reference.
            let limit = match lz {
                Some(n) => self
                    .config
                    .patch_cutoff
                    .min(n.saturating_sub(PATCH_HEADER + 1)),
                None => self.config.patch_cutoff,
            };
            if limit > 0 {
                if let Some((reference, len)) = self.find_patch(mem, at, frame, limit) {
                    if self.commit_patch(mem, at, frame, reference, len) {
                        return Outcome::Changed;
                    }
                }
            }
        }
        if let Some(n) = lz {
            self.sync_store_limit();
            let result = self.blobs.store(&[&self.scratch_lz[..n]]);
            if let Some(blob) = self.stored(result) {
                let id = self.new_object(Object::new(h, Store::Blob(blob), 1, 0, at.domain));
                if self.config.share_identical {
                    self.domains[at.domain].shared.insert(h, id);
                }
                if self.config.patching {
                    // Compressed objects are patch references too: a similar page seen later
                    // patches against this one instead of being compressed on its own.
                    self.index_similar(mem, at.domain, frame, OBJ_BIT | id);
                }
                mem.unmap(at.vm, at.gfn());
                mem.free_frame(frame);
                self.unindex(at);
                self.set_page(at, Kind::Unmapped, id, false);
                self.counters.pages_compressed += 1;
                return Outcome::Changed;
            }
            // The store is at the heap limit: a later visit tries again (pages faulted back
            // free room).
            Self::unprotect(mem, at, frame);
            return Outcome::Pending;
        }
        Self::unprotect(mem, at, frame);
        Outcome::Final
    }

    /// Resolves a similarity index entry to a usable reference: an object of the domain
    /// (resident or compressed), or another stable private page of the domain (not yet
    /// protected).
    fn resolve_reference<M: MemoryBackend + ?Sized>(
        &self,
        mem: &M,
        value: u32,
        at: Loc,
    ) -> Option<Reference> {
        if value & OBJ_BIT != 0 {
            let id = value & !OBJ_BIT;
            let o = self.objects.get(id as usize)?;
            if o.domain as usize != at.domain {
                return None;
            }
            return match o.store() {
                Store::Frame(frame) => Some(Reference::Object {
                    id,
                    frame: Some(frame),
                }),
                Store::Blob(_) => Some(Reference::Object { id, frame: None }),
                Store::Free => None,
            };
        }
        let r = self.by_global(value)?;
        if r.domain != at.domain || (r.slot, r.gfn) == (at.slot, at.gfn) {
            return None;
        }
        let m = self.meta(r);
        if m.kind != Kind::Private || m.flags & F_STABLE == 0 {
            return None;
        }
        let mapping = mem.mapping(r.vm, r.gfn())?;
        if !mapping.writable {
            return None;
        }
        Some(Reference::Page {
            at: r,
            frame: mapping.frame,
        })
    }

    /// Finds the best patch (at most `limit` bytes) of the frozen page at `at` against the
    /// candidates its similarity keys point to. The winning reference, if a page, is left
    /// write-protected; every other candidate page is restored. The patch is in
    /// `scratch_best`.
    fn find_patch<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &mut M,
        at: Loc,
        frame: Frame,
        mut limit: usize,
    ) -> Option<(Reference, usize)> {
        let n = self.config.similarity_blocks as usize;
        let mut keys = [None; MAX_SIMILARITY_BLOCKS];
        let normalize = self.config.similarity_normalize_pointers;
        similarity_keys(mem.frame(frame), &self.positions[..n], normalize, &mut keys);
        // Candidates with their votes (matching blocks), best first.
        let mut cands = [(0u32, 0u8); MAX_SIMILARITY_BLOCKS];
        let mut count = 0;
        let me = self.global(at);
        let table = &self.domains[at.domain].similar;
        for k in keys.iter().flatten() {
            let Some(v) = table.get(*k) else { continue };
            if Some(v) == me {
                continue;
            }
            match cands[..count].iter_mut().find(|(c, _)| *c == v) {
                Some(c) => c.1 += 1,
                None => {
                    cands[count] = (v, 1);
                    count += 1;
                }
            }
        }
        cands[..count].sort_by_key(|c| core::cmp::Reverse(c.1));
        let mut best: Option<(Reference, usize)> = None;
        for &(value, _) in cands[..count]
            .iter()
            .take(self.config.similarity_candidates as usize)
        {
            let Some(reference) = self.resolve_reference(mem, value, at) else {
                continue;
            };
            let ref_frame = match reference {
                Reference::Page { at: r, frame: rf } => {
                    Self::protect(mem, r, rf);
                    Some(rf)
                }
                Reference::Object { frame, .. } => frame,
            };
            if let Reference::Object { id, frame: None } = reference {
                // A compressed reference: encode against its decompressed bytes.
                let Store::Blob(b) = self.objects[id as usize].store() else {
                    continue;
                };
                let Some(data) = self.blobs.get(b) else {
                    continue;
                };
                if compress::decompress(data, &mut self.scratch_ref).is_err() {
                    continue;
                }
            }
            let reference_bytes: &Page = match ref_frame {
                Some(f) => mem.frame(f),
                None => &self.scratch_ref,
            };
            let target = mem.frame(frame);
            let mut encoded =
                patch::encode(target, reference_bytes, &mut self.scratch_patch[..limit]);
            if self.config.xor_patches && encoded.is_none_or(|n| n > self.config.xor_patch_above) {
                let cutoff = encoded.map_or(limit, |n| n - 1);
                if let Some(n) =
                    patch::encode_xor(target, reference_bytes, &mut self.scratch_xor, cutoff)
                {
                    core::mem::swap(&mut self.scratch_xor, &mut self.scratch_patch);
                    encoded = Some(n);
                }
            }
            match encoded {
                Some(len) => {
                    core::mem::swap(&mut self.scratch_patch, &mut self.scratch_best);
                    if let Some((Reference::Page { at: r, frame: rf }, _)) = best {
                        Self::unprotect(mem, r, rf);
                    }
                    best = Some((reference, len));
                    if len <= 1 {
                        break;
                    }
                    limit = len - 1;
                }
                None => {
                    if let Reference::Page { at: r, frame: rf } = reference {
                        Self::unprotect(mem, r, rf);
                    }
                }
            }
        }
        best
    }

    /// Turns a frozen private page into a resident object (a patch reference).
    fn page_to_object<M: MemoryBackend + ?Sized>(&mut self, mem: &M, at: Loc, frame: Frame) -> u32 {
        let h = self.content_hash(mem.frame(frame));
        let id = self.new_object(Object::new(h, Store::Frame(frame), 1, 1, at.domain));
        self.unindex(at);
        self.set_page(at, Kind::Mapped, id, false);
        if self.config.share_identical {
            self.domains[at.domain].shared.insert(h, id);
        }
        self.index_similar(mem, at.domain, frame, OBJ_BIT | id);
        id
    }

    fn commit_patch<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &mut M,
        at: Loc,
        frame: Frame,
        reference: Reference,
        len: usize,
    ) -> bool {
        let base = match reference {
            Reference::Object { id, .. } => id,
            // The reference page is frozen already; it becomes a shared read-only frame. If
            // storing the patch fails below it simply stays that way (a valid state).
            Reference::Page { at: r, frame: rf } => self.page_to_object(mem, r, rf),
        };
        self.sync_store_limit();
        let result = self
            .blobs
            .store(&[&base.to_le_bytes(), &self.scratch_best[..len]]);
        let Some(blob) = self.stored(result) else {
            return false;
        };
        self.bytes_patches += (PATCH_HEADER + len) as u64;
        self.objects[base as usize].patch_refs += 1;
        mem.unmap(at.vm, at.gfn());
        mem.free_frame(frame);
        self.unindex(at);
        self.set_page(at, Kind::Patched, blob.raw(), false);
        self.counters.patches_made += 1;
        if self.scratch_best.first() == Some(&patch::VERSION_XOR) {
            self.counters.patches_xor += 1;
        }
        true
    }

    // ---------------------------------------------------------------------------------------
    // Faults
    // ---------------------------------------------------------------------------------------

    /// Resolves an EPT violation (or, for [`crate::PlainMemory`], an emulated guest fault) on
    /// `gfn` of `vm`. On success the page is mapped so that `access` succeeds: read faults on a
    /// shared page get a read-only mapping, write faults always a private writable frame holding
    /// exactly the bytes the VM last wrote.
    ///
    /// On `Err(OutOfFrames)` (or `Corrupt`) nothing changed: the page keeps its shared, patched
    /// or compressed state and its content; the caller retries later or stops the VM.
    pub fn fault<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &mut M,
        vm: VmId,
        gfn: Gfn,
        access: Access,
    ) -> Result<FaultResolution, Error> {
        let at = self.locate(vm, gfn)?;
        let meta = self.meta(at);
        let result = match (meta.kind, access) {
            (Kind::Private, _) => {
                let m = mem.mapping(vm, gfn).ok_or(Error::NotMapped { vm, gfn })?;
                if access == Access::Write && !m.writable {
                    // Not expected (the engine restores write access before it returns), but
                    // harmless to repair.
                    log::warn!(
                        "hv-mem: private gfn {:#x} of VM {} was read-only",
                        gfn.0,
                        vm.0
                    );
                    mem.map(vm, gfn, m.frame, true);
                }
                Ok(FaultResolution::Spurious)
            }
            (Kind::Zero, Access::Read) => {
                if let Some(z) = self.domains[at.domain].zero_frame {
                    mem.map(vm, gfn, z, false);
                }
                Ok(FaultResolution::Spurious)
            }
            (Kind::Zero, Access::Write) => {
                let f = mem.alloc_frame().map_err(|_| self.oom())?;
                mem.frame_mut(f).fill(0);
                mem.map(vm, gfn, f, true);
                self.set_page(at, Kind::Private, 0, true);
                self.release_zero_frame_if_unused(mem, at.domain);
                self.counters.faults_zero += 1;
                self.counters.cow_breaks += 1;
                Ok(FaultResolution::ZeroFilled)
            }
            (Kind::Mapped, Access::Read) => {
                if let Store::Frame(f) = self.objects[meta.payload() as usize].store() {
                    mem.map(vm, gfn, f, false);
                }
                Ok(FaultResolution::Spurious)
            }
            (Kind::Mapped | Kind::Unmapped, Access::Write) => self.break_share(mem, at, meta),
            (Kind::Unmapped, Access::Read) => self.fault_in_shared(mem, at, meta.payload()),
            (Kind::Patched, _) => self.unpatch(mem, at, meta.payload()),
        };
        if result == Ok(FaultResolution::Spurious) {
            self.counters.faults_spurious += 1;
        }
        result
    }

    fn oom(&mut self) -> Error {
        self.counters.faults_out_of_frames += 1;
        log::debug!("hv-mem: fault-in failed: out of frames");
        Error::OutOfFrames
    }

    fn corrupt(at: Loc, kind: CorruptKind) -> Error {
        log::error!(
            "hv-mem: stored page gfn {:#x} of VM {} is corrupt",
            at.gfn,
            at.vm.0
        );
        Error::Corrupt {
            vm: at.vm,
            gfn: at.gfn(),
            kind,
        }
    }

    /// Decompresses blob `b` into frame `f`.
    fn decompress_into<M: MemoryBackend + ?Sized>(
        &self,
        mem: &mut M,
        at: Loc,
        b: BlobRef,
        f: Frame,
    ) -> Result<(), Error> {
        let data = self
            .blobs
            .get(b)
            .ok_or_else(|| Self::corrupt(at, CorruptKind::Metadata))?;
        compress::decompress(data, mem.frame_mut(f))
            .map_err(|e| Self::corrupt(at, CorruptKind::Compressed(e)))
    }

    /// A write to a page that references an object: give the VM its own frame.
    fn break_share<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &mut M,
        at: Loc,
        meta: PageMeta,
    ) -> Result<FaultResolution, Error> {
        let id = meta.payload();
        let o = self.objects[id as usize];
        let was_mapped = meta.kind == Kind::Mapped;
        let sole = o.page_refs == 1 && o.patch_refs == 0;
        let resolution = match (o.store(), sole) {
            (Store::Frame(f), true) => {
                // Nobody else can see this frame: it simply becomes the VM's again.
                mem.map(at.vm, at.gfn(), f, true);
                self.drop_object_slot(id);
                self.counters.cow_takeovers += 1;
                FaultResolution::TookOver
            }
            (Store::Frame(src), false) => {
                let f = mem.alloc_frame().map_err(|_| self.oom())?;
                mem.copy_frame(src, f);
                mem.map(at.vm, at.gfn(), f, true);
                FaultResolution::CopiedOnWrite
            }
            (Store::Blob(b), _) => {
                let f = mem.alloc_frame().map_err(|_| self.oom())?;
                if let Err(e) = self.decompress_into(mem, at, b, f) {
                    mem.free_frame(f);
                    return Err(e);
                }
                mem.map(at.vm, at.gfn(), f, true);
                self.counters.faults_decompressed += 1;
                if sole {
                    FaultResolution::Decompressed
                } else {
                    FaultResolution::CopiedOnWrite
                }
            }
            (Store::Free, _) => return Err(Self::corrupt(at, CorruptKind::Metadata)),
        };
        if resolution != FaultResolution::TookOver {
            self.census_out(id);
            let o = &mut self.objects[id as usize];
            o.page_refs -= 1;
            if was_mapped {
                o.mapped -= 1;
            }
            self.census_in(id);
            self.note_orphan(id);
            self.release_if_unused(mem, id);
        }
        self.set_page(at, Kind::Private, 0, true);
        self.counters.cow_breaks += 1;
        Ok(resolution)
    }

    /// Drops an object whose storage was handed over (no frame or blob to free).
    fn drop_object_slot(&mut self, id: u32) {
        self.census_out(id);
        let o = self.objects[id as usize];
        self.domains[o.domain as usize].shared.remove_if(o.hash, id);
        let o = &mut self.objects[id as usize];
        o.page_refs = 0;
        o.mapped = 0;
        o.set_store(Store::Free);
        self.free_objects.push(id);
    }

    /// A read of an unmapped page that references an object.
    fn fault_in_shared<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &mut M,
        at: Loc,
        id: u32,
    ) -> Result<FaultResolution, Error> {
        let o = self.objects[id as usize];
        match o.store() {
            Store::Frame(f) => {
                mem.map(at.vm, at.gfn(), f, false);
                self.objects[id as usize].mapped += 1;
                self.set_page(at, Kind::Mapped, id, true);
                self.counters.faults_shared += 1;
                Ok(FaultResolution::MappedShared)
            }
            Store::Blob(b) => {
                let f = mem.alloc_frame().map_err(|_| self.oom())?;
                if let Err(e) = self.decompress_into(mem, at, b, f) {
                    mem.free_frame(f);
                    return Err(e);
                }
                self.blobs.free(b);
                self.counters.faults_decompressed += 1;
                if o.page_refs == 1 && o.patch_refs == 0 {
                    // Only this page uses it: make it private and writable, no second fault on
                    // the next write.
                    mem.map(at.vm, at.gfn(), f, true);
                    self.drop_object_slot(id);
                    self.set_page(at, Kind::Private, 0, true);
                    Ok(FaultResolution::Decompressed)
                } else {
                    mem.map(at.vm, at.gfn(), f, false);
                    self.set_object_store(id, Store::Frame(f));
                    self.objects[id as usize].mapped += 1;
                    self.set_page(at, Kind::Mapped, id, true);
                    Ok(FaultResolution::DecompressedShared)
                }
            }
            Store::Free => Err(Self::corrupt(at, CorruptKind::Metadata)),
        }
    }

    /// Any access to a patched page: rebuild it into the VM's own frame.
    fn unpatch<M: MemoryBackend + ?Sized>(
        &mut self,
        mem: &mut M,
        at: Loc,
        raw: u32,
    ) -> Result<FaultResolution, Error> {
        let blob = BlobRef::from_raw(raw);
        let base = self
            .patch_base(blob)
            .ok_or_else(|| Self::corrupt(at, CorruptKind::Metadata))?;
        let reference = match self.objects.get(base as usize).map(|o| o.store()) {
            Some(Store::Free) | None => return Err(Self::corrupt(at, CorruptKind::Metadata)),
            Some(store) => store,
        };
        let f = mem.alloc_frame().map_err(|_| self.oom())?;
        // Rebuild in the new frame: the reference's bytes first (copied or decompressed), then
        // the patch on top.
        match reference {
            Store::Frame(rf) => mem.copy_frame(rf, f),
            Store::Blob(b) => {
                if let Err(e) = self.decompress_into(mem, at, b, f) {
                    mem.free_frame(f);
                    return Err(e);
                }
            }
            Store::Free => unreachable!("checked above"),
        }
        let data = self.patch_bytes(blob);
        if let Err(e) = patch::apply(data, mem.frame_mut(f)) {
            mem.free_frame(f);
            return Err(Self::corrupt(at, CorruptKind::Patch(e)));
        }
        mem.map(at.vm, at.gfn(), f, true);
        self.free_patch(blob);
        self.objects[base as usize].patch_refs -= 1;
        self.release_if_unused(mem, base);
        self.set_page(at, Kind::Private, 0, true);
        self.counters.faults_patched += 1;
        Ok(FaultResolution::Unpatched)
    }

    // ---------------------------------------------------------------------------------------
    // Inspection
    // ---------------------------------------------------------------------------------------

    /// Reconstructs the bytes of a page as the guest would read them, without changing any
    /// state (no fault-in, no accessed bit). For verification, debugging and migration.
    pub fn read_page<M: MemoryBackend + ?Sized>(
        &self,
        mem: &M,
        vm: VmId,
        gfn: Gfn,
        out: &mut Page,
    ) -> Result<(), Error> {
        let at = self.locate(vm, gfn)?;
        let meta = self.meta(at);
        match meta.kind {
            Kind::Private => {
                let m = mem.mapping(vm, gfn).ok_or(Error::NotMapped { vm, gfn })?;
                out.copy_from_slice(mem.frame(m.frame));
            }
            Kind::Zero => out.fill(0),
            Kind::Mapped | Kind::Unmapped => match self.objects[meta.payload() as usize].store() {
                Store::Frame(f) => out.copy_from_slice(mem.frame(f)),
                Store::Blob(b) => {
                    let data = self
                        .blobs
                        .get(b)
                        .ok_or_else(|| Self::corrupt(at, CorruptKind::Metadata))?;
                    compress::decompress(data, out)
                        .map_err(|e| Self::corrupt(at, CorruptKind::Compressed(e)))?;
                }
                Store::Free => return Err(Self::corrupt(at, CorruptKind::Metadata)),
            },
            Kind::Patched => {
                let blob = BlobRef::from_raw(meta.payload());
                let base = self
                    .patch_base(blob)
                    .ok_or_else(|| Self::corrupt(at, CorruptKind::Metadata))?;
                match self.objects.get(base as usize).map(|o| o.store()) {
                    Some(Store::Frame(rf)) => out.copy_from_slice(mem.frame(rf)),
                    Some(Store::Blob(b)) => {
                        let data = self
                            .blobs
                            .get(b)
                            .ok_or_else(|| Self::corrupt(at, CorruptKind::Metadata))?;
                        compress::decompress(data, out)
                            .map_err(|e| Self::corrupt(at, CorruptKind::Compressed(e)))?;
                    }
                    _ => return Err(Self::corrupt(at, CorruptKind::Metadata)),
                }
                patch::apply(self.patch_bytes(blob), out)
                    .map_err(|e| Self::corrupt(at, CorruptKind::Patch(e)))?;
            }
        }
        Ok(())
    }

    /// A snapshot of the accounting.
    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            vms: self.vm_slots.len() as u64,
            pages_total: self.total_pages,
            pages_private: self.pages_private,
            pages_zero: self.pages_zero,
            pages_shared: self.pages_shared,
            pages_patched: self.pages_patched,
            counters: self.counters,
            ..Stats::default()
        };
        // Everything here comes from counters kept as things change: no walk over objects or
        // blobs, so asking costs nothing and evicts no cache.
        let [resident_references, resident_with_pages, compressed_references, compressed_with_pages] =
            self.census;
        s.objects_resident = resident_references + resident_with_pages;
        s.objects_compressed = compressed_references + compressed_with_pages;
        s.objects_reference_only = resident_references + compressed_references;
        s.frames_saved_compressed = compressed_with_pages;
        // Each object with pages keeps one frame (or compressed copy) for all of them; the
        // others are saved. Frames kept only as patch references are charged to patching.
        s.frames_saved_shared = self.pages_shared - (resident_with_pages + compressed_with_pages);
        let zero_frame = self
            .domains
            .iter()
            .filter(|d| d.zero_frame.is_some())
            .count() as u64;
        s.frames_in_use = self.pages_private + s.objects_resident + zero_frame;
        s.frames_saved_zero = self.pages_zero.saturating_sub(zero_frame);
        s.frames_saved_patched = self.pages_patched.saturating_sub(resident_references);
        s.bytes_patches = self.bytes_patches;
        s.bytes_compressed = self.blobs.live_bytes() as u64 - self.bytes_patches;
        s.bytes_blob_heap = self.blobs.heap_bytes() as u64;
        s.bytes_heap_limited = (self.blobs.heap_bytes() + self.table_bytes()) as u64;
        let pages: usize = self
            .vms
            .iter()
            .flatten()
            .map(|v| v.pages.capacity() * core::mem::size_of::<PageMeta>())
            .sum();
        // Everything the engine holds on the heap besides the blob store: per-page state, the
        // growing tables (indexes, the object table and its free lists), the VM and domain
        // tables, the scratch buffers.
        s.bytes_metadata = (pages
            + self.table_bytes()
            + self.vms.capacity() * core::mem::size_of::<Option<VmSlot>>()
            + self.slot_bases.capacity() * 8
            + self.vm_slots.capacity() * core::mem::size_of::<(VmId, usize)>()
            + self.domains.capacity() * core::mem::size_of::<DomainIndex>()
            + 4 * PAGE_SIZE
            + MAX_COMPRESSED) as u64;
        s
    }

    /// Checks every internal invariant against the backend: page counts, object reference
    /// counts, and that every mapping is what the page's state says (private pages writable,
    /// shared pages read-only on the object's frame, unmapped pages not present). Meant for
    /// tests and debug builds; costs a walk over all pages.
    pub fn check_consistency<M: MemoryBackend + ?Sized>(&self, mem: &M) -> Result<(), String> {
        let mut counts = [0u64; 5];
        let mut patch_bytes = 0u64;
        let mut refs = vec![(0u32, 0u32, 0u32); self.objects.len()];
        for vm in self.vms.iter().flatten() {
            let private = vm.pages.iter().filter(|m| m.kind == Kind::Private).count() as u64;
            if private != vm.private {
                return Err(format!(
                    "VM {}: {private} private pages, its gauge says {}",
                    vm.id.0, vm.private
                ));
            }
            for (gfn, m) in vm.pages.iter().enumerate() {
                let g = Gfn(gfn as u64);
                let mapping = mem.mapping(vm.id, g);
                counts[m.kind as usize] += 1;
                let here = || format!("VM {} gfn {:#x} ({:?})", vm.id.0, gfn, m.kind);
                match m.kind {
                    Kind::Private => {
                        if let Some(mp) = mapping {
                            if !mp.writable {
                                return Err(format!("{}: private but read-only", here()));
                            }
                        }
                    }
                    Kind::Zero => match (mapping, self.domains[vm.domain].zero_frame) {
                        (Some(mp), Some(z)) if mp.frame == z && !mp.writable => {}
                        _ => return Err(format!("{}: not mapped on the zero frame", here())),
                    },
                    Kind::Mapped | Kind::Unmapped => {
                        let id = m.payload() as usize;
                        let o = self
                            .objects
                            .get(id)
                            .ok_or_else(|| format!("{}: dangling object", here()))?;
                        if o.domain as usize != vm.domain {
                            return Err(format!("{}: object of another domain", here()));
                        }
                        refs[id].0 += 1;
                        if m.kind == Kind::Mapped {
                            refs[id].1 += 1;
                            match (mapping, o.store()) {
                                (Some(mp), Store::Frame(f)) if mp.frame == f && !mp.writable => {}
                                _ => return Err(format!("{}: wrong shared mapping", here())),
                            }
                        } else if mapping.is_some() {
                            return Err(format!("{}: unmapped page is present", here()));
                        }
                    }
                    Kind::Patched => {
                        if mapping.is_some() {
                            return Err(format!("{}: patched page is present", here()));
                        }
                        let blob = BlobRef::from_raw(m.payload());
                        patch_bytes += self.blobs.get(blob).map_or(0, <[u8]>::len) as u64;
                        let base = self
                            .patch_base(blob)
                            .ok_or_else(|| format!("{}: dangling patch", here()))?;
                        let o = self
                            .objects
                            .get(base as usize)
                            .ok_or_else(|| format!("{}: dangling reference", here()))?;
                        if o.store() == Store::Free {
                            return Err(format!("{}: reference freed", here()));
                        }
                        if o.domain as usize != vm.domain {
                            return Err(format!("{}: reference of another domain", here()));
                        }
                        refs[base as usize].2 += 1;
                    }
                }
            }
        }
        if counts[0] != self.pages_private
            || counts[1] != self.pages_zero
            || counts[2] + counts[3] != self.pages_shared
            || counts[4] != self.pages_patched
        {
            return Err(format!("page counts {counts:?} disagree with gauges"));
        }
        if patch_bytes != self.bytes_patches {
            return Err(format!(
                "patches hold {patch_bytes} bytes, accounting says {}",
                self.bytes_patches
            ));
        }
        for (i, d) in self.domains.iter().enumerate() {
            let zeros = self
                .vms
                .iter()
                .flatten()
                .filter(|v| v.domain == i)
                .flat_map(|v| v.pages.iter())
                .filter(|m| m.kind == Kind::Zero)
                .count() as u64;
            if zeros != d.zero_pages || (zeros > 0) != d.zero_frame.is_some() {
                return Err(format!("domain {}: zero frame or count wrong", d.id.0));
            }
        }
        let mut census = [0u64; 4];
        for o in &self.objects {
            if let Some(c) = Self::census_class(o) {
                census[c] += 1;
            }
        }
        if census != self.census {
            return Err(format!(
                "object census {:?}, counted {census:?}",
                self.census
            ));
        }
        for (id, o) in self.objects.iter().enumerate() {
            let (p, m, r) = refs[id];
            if o.store() == Store::Free {
                if p + m + r != 0 {
                    return Err(format!("object {id} is free but referenced"));
                }
                continue;
            }
            if (o.page_refs, o.mapped, o.patch_refs) != (p, m, r) {
                return Err(format!(
                    "object {id}: counts {:?} but found {:?}",
                    (o.page_refs, o.mapped, o.patch_refs),
                    (p, m, r)
                ));
            }
            if p == 0 && r == 0 {
                return Err(format!("object {id} is unreferenced but live"));
            }
            if matches!(o.store(), Store::Blob(_)) && m != 0 {
                return Err(format!("object {id} is compressed but mapped"));
            }
        }
        Ok(())
    }
}
