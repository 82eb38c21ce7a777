//! The 64-bit boot protocol: the state a guest finds at its first instruction.
//!
//! The hypervisor loads the guest's ELF `PT_LOAD` segments at their physical addresses and enters
//! the ELF entry point in 64-bit mode, like Firecracker's 64-bit boot:
//! - paging on, an identity map of the first 4 GiB of guest-physical space with 2 MiB pages
//!   (tables at [`PML4_GPA`]..); accesses past the VM's memory end in an EPT violation that stops
//!   the VM;
//! - a flat GDT at [`GDT_GPA`] with a 64-bit code segment (selector 0x08) and a data segment
//!   (selector 0x10); no IDT (IDTR limit 0): a guest that wants to catch exceptions loads its own;
//! - `RFLAGS` = 0x2 (interrupts off), `RSP` = the top of memory, 16-byte aligned (today
//!   `memory_bytes - 16`);
//! - `RDI` = guest-physical address of a [`BootInfo`] at [`BOOT_INFO_GPA`], followed by the
//!   command line.
//!
//! Images must be linked at or above [`IMAGE_MIN_GPA`]; everything below is the hypervisor's
//! boot area inside the guest (still the guest's own memory, which it may reuse once started).

/// Guest-physical address of the PML4; the PDPT follows at +0x1000, then four PDs.
pub const PML4_GPA: u64 = 0x1000;
/// Guest-physical address of the GDT.
pub const GDT_GPA: u64 = 0x7000;
/// Guest-physical address of [`BootInfo`].
pub const BOOT_INFO_GPA: u64 = 0x8000;
/// Lowest guest-physical address an image segment may occupy.
pub const IMAGE_MIN_GPA: u64 = 0x10_0000;
/// Smallest VM memory size that can hold the boot area, an image and a stack.
pub const MIN_MEMORY_BYTES: u64 = 2 << 20;
/// Longest command line handed to a guest, in bytes.
pub const CMDLINE_MAX: usize = 2048;
/// Code segment selector in the boot GDT.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector in the boot GDT.
pub const DATA_SELECTOR: u16 = 0x10;

/// Magic value in [`BootInfo::magic`].
pub const BOOT_INFO_MAGIC: u64 = 0x4d55_5856_424f_4f54; // "MUXVBOOT"

/// Found at [`BOOT_INFO_GPA`] when the guest starts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BootInfo {
    pub magic: u64,
    /// Size of the VM's memory: guest-physical `0..memory_bytes` is RAM.
    pub memory_bytes: u64,
    /// Guest-physical address of the command line (UTF-8, not NUL-terminated).
    pub cmdline_gpa: u64,
    pub cmdline_len: u64,
}
