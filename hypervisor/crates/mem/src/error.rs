//! Typed errors of the engine.

use crate::backend::{Gfn, VmId};
use crate::compress::DecompressError;
use crate::patch::PatchError;
use core::fmt;

/// What went wrong in an engine call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The VM was never added (or was removed).
    UnknownVm(VmId),
    /// `add_vm` for a VM that is already known.
    DuplicateVm(VmId),
    /// A VM larger than the engine can index (2^32 pages).
    TooManyPages(VmId),
    /// The guest frame number lies outside the VM's registered memory.
    GfnOutOfRange {
        /// The VM.
        vm: VmId,
        /// The faulting frame number.
        gfn: Gfn,
    },
    /// A private page the backend has no mapping for (a hole in guest RAM): the engine has
    /// nothing to restore; the fault is not a memory-multiplexing fault.
    NotMapped {
        /// The VM.
        vm: VmId,
        /// The frame number.
        gfn: Gfn,
    },
    /// The backend had no frame. Nothing changed: the page stays as it was (shared, patched or
    /// compressed) and stays readable through [`crate::Engine::read_page`]; retry later or stop
    /// the VM.
    OutOfFrames,
    /// Stored data of a page failed to decode. This means memory corruption or an engine bug;
    /// the page is left untouched.
    Corrupt {
        /// The VM.
        vm: VmId,
        /// The frame number.
        gfn: Gfn,
        /// What failed.
        kind: CorruptKind,
    },
    /// A configuration value is out of range; the string names it.
    InvalidConfig(&'static str),
}

/// Which stored representation failed to decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CorruptKind {
    /// A patch.
    Patch(PatchError),
    /// A compressed page.
    Compressed(DecompressError),
    /// Engine metadata (a dangling blob or object reference).
    Metadata,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnknownVm(vm) => write!(f, "unknown VM {}", vm.0),
            Error::DuplicateVm(vm) => write!(f, "VM {} already added", vm.0),
            Error::TooManyPages(vm) => write!(f, "VM {} has more than 2^32 pages", vm.0),
            Error::GfnOutOfRange { vm, gfn } => {
                write!(f, "gfn {:#x} outside the memory of VM {}", gfn.0, vm.0)
            }
            Error::NotMapped { vm, gfn } => {
                write!(
                    f,
                    "gfn {:#x} of VM {} is private but not mapped",
                    gfn.0, vm.0
                )
            }
            Error::OutOfFrames => f.write_str("out of host frames"),
            Error::Corrupt { vm, gfn, kind } => {
                write!(
                    f,
                    "stored page gfn {:#x} of VM {} is corrupt: ",
                    gfn.0, vm.0
                )?;
                match kind {
                    CorruptKind::Patch(e) => write!(f, "{e}"),
                    CorruptKind::Compressed(e) => write!(f, "{e}"),
                    CorruptKind::Metadata => f.write_str("dangling metadata"),
                }
            }
            Error::InvalidConfig(what) => write!(f, "invalid configuration: {what}"),
        }
    }
}
