//! [`PlainMemory`]: a safe [`MemoryBackend`] over heap-allocated frames, for tests and the host
//! benchmark.
//!
//! It plays both sides of the hardware: the frame allocator and the EPT (a per-VM table of
//! mappings with accessed and dirty bits), and the guest's MMU ([`PlainMemory::guest_read`] and
//! [`PlainMemory::guest_write`] check the mapping and report a [`GuestFault`] exactly where an
//! EPT violation would occur). [`access_read`] and [`access_write`] run the whole loop: access,
//! fault into the engine, retry.
//!
//! Frames are individually boxed. A freed frame goes on a free list of at most
//! [`SPARE_FRAMES`] frames (4 GiB) and is reused by the next allocation, like a hypervisor's
//! frame allocator, whose free is a list push: so fault-in latency measures the engine, not the
//! host's page faults, and scan time does not include the host heap's `free` (which was 8% of
//! a first scan round over real guest images); beyond that freed frames go back to the heap. An optional frame budget makes
//! [`MemoryBackend::alloc_frame`] fail, to test running out of frames.

use crate::backend::PAGE_SIZE;
use crate::backend::{Access, Frame, Gfn, Mapping, MemoryBackend, OutOfFrames, Page, VmId};
use crate::engine::{boxed_page, Engine, FaultResolution};
use crate::error::Error;
use alloc::boxed::Box;
use alloc::vec::Vec;

const NO_FRAME: u64 = u64::MAX;
/// Freed frames kept for reuse (4 GiB).
pub const SPARE_FRAMES: usize = 1 << 20;
const W: u8 = 1;
const A: u8 = 2;
const D: u8 = 4;

#[derive(Clone, Copy)]
struct Pte {
    frame: u64,
    bits: u8,
}

/// Why an emulated guest access did not complete: what an EPT violation would report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestFault {
    /// The page is not mapped.
    NotPresent,
    /// The page is mapped read-only and the access was a write.
    WriteProtected,
    /// The gfn is outside the VM, or the VM does not exist.
    OutOfRange,
}

/// Plain, heap-backed host memory and per-VM mappings.
#[derive(Default)]
pub struct PlainMemory {
    frames: Vec<Option<Box<Page>>>,
    free_slots: Vec<u64>,
    spare: Vec<Box<Page>>,
    in_use: usize,
    peak: usize,
    budget: Option<usize>,
    /// Page tables by VM, sorted by id (a handful of VMs: a binary search beats a tree walk).
    vms: Vec<(VmId, Vec<Pte>)>,
}

impl PlainMemory {
    /// Empty memory with no frame budget.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets (or lifts) the most frames that may be in use at once. Allocation beyond it fails
    /// with [`OutOfFrames`].
    pub fn set_frame_budget(&mut self, frames: Option<usize>) {
        self.budget = frames;
    }

    /// Frames allocated and not freed.
    pub fn frames_in_use(&self) -> usize {
        self.in_use
    }

    /// Most frames in use at any time so far.
    pub fn peak_frames(&self) -> usize {
        self.peak
    }

    /// Creates a VM of `pages` zeroed pages, each on its own writable frame.
    pub fn create_vm(&mut self, vm: VmId, pages: u64) -> Result<(), OutOfFrames> {
        self.create_vm_with(vm, pages, |_, _| {})
    }

    /// Creates a VM holding `image` (padded with zeros to whole pages).
    pub fn create_vm_from_image(&mut self, vm: VmId, image: &[u8]) -> Result<(), OutOfFrames> {
        let pages = image.len().div_ceil(PAGE_SIZE) as u64;
        self.create_vm_with(vm, pages, |gfn, page| {
            let start = gfn as usize * PAGE_SIZE;
            let end = (start + PAGE_SIZE).min(image.len());
            page[..end - start].copy_from_slice(&image[start..end]);
        })
    }

    /// Creates a VM of `pages` pages, letting `fill(gfn, page)` write each page's initial bytes
    /// (the page starts zeroed).
    pub fn create_vm_with(
        &mut self,
        vm: VmId,
        pages: u64,
        mut fill: impl FnMut(u64, &mut Page),
    ) -> Result<(), OutOfFrames> {
        let mut table = Vec::with_capacity(pages as usize);
        for gfn in 0..pages {
            let f = match self.alloc_frame() {
                Ok(f) => f,
                Err(e) => {
                    for pte in table {
                        let pte: Pte = pte;
                        self.free_frame(Frame(pte.frame));
                    }
                    return Err(e);
                }
            };
            let page = self.frame_mut(f);
            page.fill(0);
            fill(gfn, page);
            table.push(Pte {
                frame: f.0,
                bits: W | D,
            });
        }
        match self.vms.binary_search_by_key(&vm, |&(id, _)| id) {
            Ok(i) => self.vms[i].1 = table,
            Err(i) => self.vms.insert(i, (vm, table)),
        }
        Ok(())
    }

    /// Destroys a VM, freeing every frame still mapped writable in it (its private frames).
    /// Call [`Engine::remove_vm`] first so that only private frames are left mapped.
    pub fn destroy_vm(&mut self, vm: VmId) {
        if let Ok(i) = self.vms.binary_search_by_key(&vm, |&(id, _)| id) {
            let (_, table) = self.vms.remove(i);
            for pte in table {
                if pte.frame != NO_FRAME && pte.bits & W != 0 {
                    self.free_frame(Frame(pte.frame));
                }
            }
        }
    }

    /// Number of pages of a VM.
    pub fn vm_pages(&self, vm: VmId) -> Option<u64> {
        self.table(vm).map(|t| t.len() as u64)
    }

    fn table(&self, vm: VmId) -> Option<&Vec<Pte>> {
        let i = self.vms.binary_search_by_key(&vm, |&(id, _)| id).ok()?;
        Some(&self.vms[i].1)
    }

    fn pte(&self, vm: VmId, gfn: Gfn) -> Option<&Pte> {
        self.table(vm)?.get(gfn.0 as usize)
    }

    fn pte_mut(&mut self, vm: VmId, gfn: Gfn) -> Option<&mut Pte> {
        let i = self.vms.binary_search_by_key(&vm, |&(id, _)| id).ok()?;
        self.vms[i].1.get_mut(gfn.0 as usize)
    }

    /// A guest read, as the MMU would do it: sets the accessed bit or faults.
    pub fn guest_read(&mut self, vm: VmId, gfn: Gfn) -> Result<&Page, GuestFault> {
        let pte = self.pte_mut(vm, gfn).ok_or(GuestFault::OutOfRange)?;
        if pte.frame == NO_FRAME {
            return Err(GuestFault::NotPresent);
        }
        pte.bits |= A;
        let f = pte.frame;
        Ok(self.frame(Frame(f)))
    }

    /// A guest write of `data` at `offset` in the page, as the MMU would do it: sets accessed
    /// and dirty, or faults (nothing is written then).
    pub fn guest_write(
        &mut self,
        vm: VmId,
        gfn: Gfn,
        offset: usize,
        data: &[u8],
    ) -> Result<(), GuestFault> {
        if offset
            .checked_add(data.len())
            .is_none_or(|end| end > PAGE_SIZE)
        {
            return Err(GuestFault::OutOfRange);
        }
        let pte = self.pte_mut(vm, gfn).ok_or(GuestFault::OutOfRange)?;
        if pte.frame == NO_FRAME {
            return Err(GuestFault::NotPresent);
        }
        if pte.bits & W == 0 {
            return Err(GuestFault::WriteProtected);
        }
        pte.bits |= A | D;
        let f = pte.frame;
        self.frame_mut(Frame(f))[offset..offset + data.len()].copy_from_slice(data);
        Ok(())
    }

    /// Sets the accessed bit of a mapped page without reading it (as a guest touching it
    /// would). Returns false if the page is not present.
    pub fn touch(&mut self, vm: VmId, gfn: Gfn) -> bool {
        match self.pte_mut(vm, gfn) {
            Some(pte) if pte.frame != NO_FRAME => {
                pte.bits |= A;
                true
            }
            _ => false,
        }
    }

    fn slot(&self, frame: Frame) -> &Page {
        match self.frames.get(frame.0 as usize) {
            Some(Some(p)) => p,
            _ => panic!("PlainMemory: frame {:#x} is not allocated", frame.0),
        }
    }
}

impl MemoryBackend for PlainMemory {
    fn mapping(&self, vm: VmId, gfn: Gfn) -> Option<Mapping> {
        let pte = self.pte(vm, gfn)?;
        (pte.frame != NO_FRAME).then_some(Mapping {
            frame: Frame(pte.frame),
            writable: pte.bits & W != 0,
        })
    }

    fn map(&mut self, vm: VmId, gfn: Gfn, frame: Frame, writable: bool) {
        let pte = self
            .pte_mut(vm, gfn)
            .expect("PlainMemory: map outside guest memory");
        let remap = pte.frame != frame.0;
        pte.frame = frame.0;
        pte.bits = if writable {
            pte.bits | W
        } else {
            pte.bits & !W
        };
        if remap {
            // A new translation starts with clear accessed state, like a fresh EPT entry, but
            // a fresh writable mapping counts as dirty (its content is new to the scanner).
            pte.bits &= !(A | D);
            if writable {
                pte.bits |= D;
            }
        }
    }

    fn unmap(&mut self, vm: VmId, gfn: Gfn) {
        if let Some(pte) = self.pte_mut(vm, gfn) {
            pte.frame = NO_FRAME;
            pte.bits = 0;
        }
    }

    fn frame(&self, frame: Frame) -> &Page {
        self.slot(frame)
    }

    fn frame_mut(&mut self, frame: Frame) -> &mut Page {
        match self.frames.get_mut(frame.0 as usize) {
            Some(Some(p)) => p,
            _ => panic!("PlainMemory: frame {:#x} is not allocated", frame.0),
        }
    }

    fn copy_frame(&mut self, src: Frame, dst: Frame) {
        assert_ne!(src, dst, "copy_frame onto itself");
        let bytes: Page = *self.slot(src);
        self.frame_mut(dst).copy_from_slice(&bytes);
    }

    fn alloc_frame(&mut self) -> Result<Frame, OutOfFrames> {
        if self.budget.is_some_and(|b| self.in_use >= b) {
            return Err(OutOfFrames);
        }
        let page = self.spare.pop().unwrap_or_else(boxed_page);
        let index = match self.free_slots.pop() {
            Some(i) => {
                self.frames[i as usize] = Some(page);
                i
            }
            None => {
                self.frames.push(Some(page));
                (self.frames.len() - 1) as u64
            }
        };
        self.in_use += 1;
        self.peak = self.peak.max(self.in_use);
        Ok(Frame(index))
    }

    fn free_frame(&mut self, frame: Frame) {
        let slot = self
            .frames
            .get_mut(frame.0 as usize)
            .expect("PlainMemory: free of a frame that never existed");
        let page = slot.take();
        assert!(
            page.is_some(),
            "PlainMemory: double free of frame {:#x}",
            frame.0
        );
        if self.spare.len() < SPARE_FRAMES {
            self.spare.extend(page);
        }
        self.free_slots.push(frame.0);
        self.in_use -= 1;
    }

    fn test_and_clear_accessed(&mut self, vm: VmId, gfn: Gfn) -> bool {
        self.pte_mut(vm, gfn).is_some_and(|pte| {
            let a = pte.bits & A != 0;
            pte.bits &= !A;
            a
        })
    }

    fn test_and_clear_dirty(&mut self, vm: VmId, gfn: Gfn) -> bool {
        self.pte_mut(vm, gfn).is_some_and(|pte| {
            let d = pte.bits & D != 0;
            pte.bits &= !D;
            d
        })
    }
}

/// Reads a guest page the way a vCPU does: access, and on a fault let the engine resolve it
/// and retry. Returns the page's bytes.
pub fn access_read<'m>(
    engine: &mut Engine,
    mem: &'m mut PlainMemory,
    vm: VmId,
    gfn: Gfn,
) -> Result<&'m Page, Error> {
    // A fault-in makes a read succeed at once, so one retry is enough; a second fault would be
    // an engine bug, reported rather than looped on.
    for _ in 0..2 {
        match mem.guest_read(vm, gfn) {
            Ok(_) => break,
            Err(GuestFault::OutOfRange) => return Err(Error::GfnOutOfRange { vm, gfn }),
            Err(_) => {
                engine.fault(mem, vm, gfn, Access::Read)?;
            }
        }
    }
    mem.guest_read(vm, gfn)
        .map_err(|_| Error::NotMapped { vm, gfn })
}

/// Writes to a guest page the way a vCPU does: access, and on a fault let the engine resolve
/// it and retry. Returns how the fault (if any) was resolved.
pub fn access_write(
    engine: &mut Engine,
    mem: &mut PlainMemory,
    vm: VmId,
    gfn: Gfn,
    offset: usize,
    data: &[u8],
) -> Result<Option<FaultResolution>, Error> {
    let mut resolution = None;
    for _ in 0..2 {
        match mem.guest_write(vm, gfn, offset, data) {
            Ok(()) => return Ok(resolution),
            Err(GuestFault::OutOfRange) => return Err(Error::GfnOutOfRange { vm, gfn }),
            Err(_) => resolution = Some(engine.fault(mem, vm, gfn, Access::Write)?),
        }
    }
    Err(Error::NotMapped { vm, gfn })
}
