//! The only door between the engine and memory: the [`MemoryBackend`] trait.
//!
//! The engine owns policy and bookkeeping; it never dereferences a physical address and never
//! edits a page table itself. Everything it does to memory goes through this trait, so the
//! hypervisor implements it over EPT (frames are host-physical frames, `map` edits an EPT leaf and
//! invalidates) and the host benchmark and the tests implement it over plain memory
//! ([`crate::PlainMemory`]).

use core::fmt;

/// Size of a guest page and of a host frame, in bytes.
pub const PAGE_SIZE: usize = 4096;

/// The bytes of one page or frame.
pub type Page = [u8; PAGE_SIZE];

/// Identifies a VM. Chosen by the caller; the engine only uses it as a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmId(pub u32);

/// A guest frame number: guest-physical address >> 12.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gfn(pub u64);

/// An opaque host frame handle (for the hypervisor: host-physical address >> 12; for
/// [`crate::PlainMemory`]: an index into its frame table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frame(pub u64);

/// A sharing domain. Pages of VMs in different domains are never shared, patched against each
/// other, or even compared: every content index of the engine is per domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DomainId(pub u32);

/// The kind of guest access that faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// A read or an instruction fetch.
    Read,
    /// A write.
    Write,
}

/// Where a guest page currently points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The frame that backs the page.
    pub frame: Frame,
    /// Whether the guest may write it without faulting.
    pub writable: bool,
}

/// The backend has no free frame (or its frame budget is spent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfFrames;

impl fmt::Display for OutOfFrames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("out of host frames")
    }
}

/// Memory and mappings as the engine sees them.
///
/// # Contract
/// - Every guest page the engine was told about (`Engine::add_vm`) starts out mapped writable
///   onto a frame that the VM owns. The engine remaps it, and frees that frame when the page no
///   longer needs it (the frame then belongs to the backend's allocator again).
/// - `map` and `unmap` take effect before they return, as far as the guest can observe: when
///   they remove a permission (writable to read-only, present to not-present) the backend must
///   have invalidated every cached translation (INVEPT) first. The engine relies on this: it
///   write-protects a page *before* it compares or encodes it, so the bytes it checks are the
///   bytes it keeps.
/// - `map` and `unmap` never fail: they only change leaves of a mapping that already exists.
/// - `test_and_clear_accessed` / `test_and_clear_dirty` return whether the page may have been
///   accessed / written since the previous call for that page, and clear that state. A backend
///   without hardware A/D bits must return `true` (the conservative answer): then nothing ever
///   looks cold (no compression or patching) and every scan rehashes every page.
/// - A freshly mapped writable page counts as dirty.
/// - `frame` may be asked for the frame of a page the guest can still write (to hash it, test
///   it for zero, or sample similarity blocks). The engine uses such bytes only as hints and
///   acts only on bytes read after write-protecting the page; an implementation whose vCPUs run
///   concurrently with the scanner must hand out memory that tolerates concurrent writes (for
///   EPT: the identity-mapped frame, read as plain bytes; a torn read only spoils a hint).
/// - The engine calls every method with its own lock held (it is `&mut self`); the hypervisor
///   serialises `scan` and `fault` calls, e.g. with one spin lock around the engine.
pub trait MemoryBackend {
    /// The current mapping of a guest page, or `None` if it is not present (or not guest RAM).
    fn mapping(&self, vm: VmId, gfn: Gfn) -> Option<Mapping>;
    /// Maps a guest page onto `frame`, read-only unless `writable`, replacing any mapping.
    fn map(&mut self, vm: VmId, gfn: Gfn, frame: Frame, writable: bool);
    /// Makes a guest page not present: every access to it faults into the engine.
    fn unmap(&mut self, vm: VmId, gfn: Gfn);
    /// The bytes of a frame.
    fn frame(&self, frame: Frame) -> &Page;
    /// The bytes of a frame, for writing. The engine only writes frames it allocated and has not
    /// mapped yet.
    fn frame_mut(&mut self, frame: Frame) -> &mut Page;
    /// Copies one frame onto another (distinct) frame.
    fn copy_frame(&mut self, src: Frame, dst: Frame);
    /// Allocates a frame. Its content is unspecified; the engine overwrites it entirely.
    fn alloc_frame(&mut self) -> Result<Frame, OutOfFrames>;
    /// Returns a frame to the allocator. It is no longer mapped anywhere.
    fn free_frame(&mut self, frame: Frame);
    /// Reads and clears the accessed state of a guest page.
    fn test_and_clear_accessed(&mut self, vm: VmId, gfn: Gfn) -> bool;
    /// Reads and clears the dirty state of a guest page.
    fn test_and_clear_dirty(&mut self, vm: VmId, gfn: Gfn) -> bool;

    /// The bytes a guest page currently reads as, if it is mapped.
    fn guest_page(&self, vm: VmId, gfn: Gfn) -> Option<&Page> {
        self.mapping(vm, gfn).map(|m| self.frame(m.frame))
    }
}
