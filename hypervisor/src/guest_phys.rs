//! A VM's guest-physical memory: its EPT, the [`GuestMemory`] mirror of the EPT leaves that the
//! hypervisor's own copies go through, the EPT pointer, and whether the CPU may still cache
//! translations older than the EPT.
//!
//! Both the VM (creation, exits) and the memory engine's backend ([`crate::memmux`]) work on
//! this type; the engine reaches it through [`HasGuestPhys`], so it depends on neither the VM
//! nor its VT-x state. Host frames are reached through the identity map ([`IdentityPhys`]).

use alloc::vec::Vec;

use hv_vm::frames::FrameAllocator;
use hv_vm::memory::{GuestMemory, PhysMemory};
use hv_vmx::ept::{Ept, FrameSource};

use crate::vmx;

/// Host-physical memory through the identity map.
pub struct IdentityPhys;

impl PhysMemory for IdentityPhys {
    fn read(&self, hpa: u64, buf: &mut [u8]) {
        // SAFETY: callers pass frames of a VM's memory (from the frame allocator, below 4 GiB,
        // identity-mapped, owned by the VM), and GuestMemory keeps each copy inside one frame.
        unsafe { core::ptr::copy_nonoverlapping(hpa as *const u8, buf.as_mut_ptr(), buf.len()) };
    }
    fn write(&mut self, hpa: u64, data: &[u8]) {
        // SAFETY: as in `read`.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), hpa as *mut u8, data.len()) };
    }
}

/// Frames for EPT tables, zeroed, from the frame allocator.
pub struct TableFrames<'a>(pub &'a mut FrameAllocator);

impl FrameSource for TableFrames<'_> {
    fn alloc_table(&mut self) -> Option<u64> {
        let frame = self.0.alloc()?;
        zero_frame(frame);
        Some(frame)
    }
    fn table(&mut self, hpa: u64) -> &mut [u64; 512] {
        // SAFETY: `hpa` is a table frame this FrameSource allocated (identity-mapped, 4 KiB
        // aligned, owned by the EPT being built); no other reference to it exists meanwhile.
        unsafe { &mut *(hpa as *mut [u64; 512]) }
    }
}

pub fn zero_frame(frame: u64) {
    // SAFETY: `frame` is a 4 KiB frame just taken from the allocator: ours, identity-mapped.
    unsafe { core::ptr::write_bytes(frame as *mut u8, 0, 4096) };
}

/// Gives the frames of an EPT's tables back to the allocator.
pub fn free_ept_tables(ept: &Ept, frames: &mut FrameAllocator) {
    let mut list = Vec::new();
    ept.table_frames(&mut TableFrames(frames), &mut |t| list.push(t));
    for t in list {
        frames.free(t);
    }
}

pub struct GuestPhys {
    pub memory: GuestMemory,
    pub ept: Ept,
    pub eptp: u64,
    /// The EPT changed (a leaf remapped, an accessed or dirty flag cleared) since the CPU's
    /// cached translations were last dropped: drop them before the guest runs again.
    pub stale: bool,
    /// [`Self::release_memory`] gave its frames back already.
    pub released: bool,
}

impl GuestPhys {
    /// Drops the CPU's cached translations of this EPT if it changed (INVEPT, SDM 29.4.3.1).
    pub fn sync(&mut self, single_context: bool) {
        if self.stale {
            vmx::invept(self.eptp, single_context);
            self.stale = false;
        }
    }

    /// Gives every frame still mapped back to the allocator now, for a VM that stopped for good
    /// (after it left the memory engine, which leaves only its private frames mapped): its
    /// memory goes back to the pool while the other VMs run. Its EPT leaves and the mirror are
    /// cleared, so that [`Self::release`] later frees only the tables.
    pub fn release_memory(&mut self, frames: &mut FrameAllocator) {
        if core::mem::replace(&mut self.released, true) {
            return;
        }
        for page in 0..self.memory.pages() {
            if let Some(m) = self.memory.page(page) {
                self.ept.unmap(&mut TableFrames(frames), page * 4096);
                self.memory.set_page(page, None);
                frames.free(m.hpa);
            }
        }
        self.stale = true;
    }

    /// Gives the EPT tables and every frame still mapped back to the allocator.
    pub fn release(self, frames: &mut FrameAllocator) {
        free_ept_tables(&self.ept, frames);
        // With memory multiplexing, the VM left the engine when it stopped, so every page still
        // present is a private frame of its own; shared and zero frames are the engine's.
        for frame in self.memory.present_frames() {
            frames.free(frame);
        }
    }
}

/// What the memory engine's backend needs of a VM: its guest-physical memory, and the policy
/// state it reads (name, accounting, run state, quantum).
pub trait HasGuestPhys {
    fn vm(&self) -> &hv_vm::Vm;
    fn guest_phys(&self) -> &GuestPhys;
    fn guest_phys_mut(&mut self) -> &mut GuestPhys;
}
