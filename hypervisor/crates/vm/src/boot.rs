//! How a guest boots: which of the two boot protocols its image uses ([`kernel`]), and the
//! 64-bit boot area of muxvisor's own protocol (guest-abi's boot protocol): page tables
//! identity-mapping 4 GiB with 2 MiB pages, a flat GDT, the boot information and the command
//! line. [`boot_area`] lists the bytes to write; the kernel writes them into the VM's (zeroed)
//! memory with `GuestMemory::write`. The Multiboot protocol's area is [`crate::multiboot`]'s.

use alloc::vec::Vec;
use guest_abi::boot::{
    BootInfo, BOOT_INFO_GPA, BOOT_INFO_MAGIC, CMDLINE_MAX, GDT_GPA, IMAGE_MIN_GPA, PML4_GPA,
};

use crate::elf::{self, ElfError, ElfImage};
use crate::multiboot::{self, MultibootError};

/// A guest kernel, checked and planned for loading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// A 64-bit ELF entered in long mode with guest-abi's boot information (RDI).
    Native(ElfImage),
    /// A Multiboot kernel entered in 32-bit protected mode ([`crate::multiboot`]).
    Multiboot(multiboot::Kernel),
}

/// Why an image cannot boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageError {
    Elf(ElfError),
    Multiboot(MultibootError),
    /// The manifest's `kernel` is no bootable bzImage.
    Linux(crate::linux::BzImageError),
}

impl core::fmt::Display for ImageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Elf(e) => write!(f, "{e} (and no Multiboot header either)"),
            Self::Multiboot(e) => e.fmt(f),
            Self::Linux(e) => write!(f, "Linux kernel: {e}"),
        }
    }
}

/// Tells the boot protocol by the image, as GRUB does: a Multiboot header in its first 8 KiB
/// makes it a Multiboot kernel; anything else must be a 64-bit ELF for muxvisor's protocol.
/// Either way every segment must fit in `mem_size` bytes.
pub fn kernel(image: &[u8], mem_size: u64) -> Result<Kernel, ImageError> {
    if multiboot::has_header(image) {
        return multiboot::load(image, mem_size)
            .map(Kernel::Multiboot)
            .map_err(ImageError::Multiboot);
    }
    // The top 64 KiB are left for the initial stack.
    elf::parse(image, IMAGE_MIN_GPA, mem_size.saturating_sub(64 * 1024))
        .map(Kernel::Native)
        .map_err(ImageError::Elf)
}

/// Page-table flags: present, writable; PS for 2 MiB pages.
const P_RW: u64 = 0x3;
const PS: u64 = 0x80;

/// Page tables at `PML4_GPA`-0x6FFF identity-mapping the first 4 GiB with 2 MiB pages: CR3 for
/// a guest entered in long mode (muxvisor's protocol, and Linux's 64-bit boot protocol).
pub fn identity_page_tables() -> Vec<(u64, Vec<u8>)> {
    let pdpt = PML4_GPA + 0x1000;
    let pd0 = pdpt + 0x1000;
    let mut pieces = Vec::new();
    pieces.push((PML4_GPA, (pdpt | P_RW).to_le_bytes().to_vec()));
    let mut pdpt_bytes = Vec::new();
    for i in 0..4u64 {
        pdpt_bytes.extend_from_slice(&((pd0 + i * 0x1000) | P_RW).to_le_bytes());
    }
    pieces.push((pdpt, pdpt_bytes));
    let mut pds = Vec::with_capacity(4 * 4096);
    for page in 0..2048u64 {
        pds.extend_from_slice(&((page << 21) | P_RW | PS).to_le_bytes());
    }
    pieces.push((pd0, pds));
    pieces
}

/// The boot area as (guest-physical address, bytes) pieces.
pub fn boot_area(memory_bytes: u64, cmdline: &str) -> Vec<(u64, Vec<u8>)> {
    let mut pieces = identity_page_tables();
    // Null, 64-bit code (0x08), data (0x10): the same descriptors the VMCS segment state says.
    let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    pieces.push((GDT_GPA, gdt.iter().flat_map(|d| d.to_le_bytes()).collect()));
    let cmdline = &cmdline.as_bytes()[..cmdline.len().min(CMDLINE_MAX)];
    let info_size = core::mem::size_of::<BootInfo>() as u64;
    let info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        memory_bytes,
        cmdline_gpa: BOOT_INFO_GPA + info_size,
        cmdline_len: cmdline.len() as u64,
    };
    let mut info_bytes = Vec::new();
    for v in [
        info.magic,
        info.memory_bytes,
        info.cmdline_gpa,
        info.cmdline_len,
    ] {
        info_bytes.extend_from_slice(&v.to_le_bytes());
    }
    info_bytes.extend_from_slice(cmdline);
    pieces.push((BOOT_INFO_GPA, info_bytes));
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn read_u64(pieces: &[(u64, Vec<u8>)], gpa: u64) -> u64 {
        for (at, bytes) in pieces {
            if gpa >= *at && gpa + 8 <= at + bytes.len() as u64 {
                let o = (gpa - at) as usize;
                return u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
            }
        }
        0
    }

    /// Walks the guest page tables like the MMU (4-level, 2 MiB leaves).
    fn walk(pieces: &[(u64, Vec<u8>)], va: u64) -> Option<u64> {
        let pml4e = read_u64(pieces, PML4_GPA + ((va >> 39) & 511) * 8);
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte = read_u64(pieces, (pml4e & !0xfff) + ((va >> 30) & 511) * 8);
        if pdpte & 1 == 0 {
            return None;
        }
        let pde = read_u64(pieces, (pdpte & !0xfff) + ((va >> 21) & 511) * 8);
        if pde & 1 == 0 || pde & PS == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff) + (va & 0x1f_ffff))
    }

    #[test]
    fn tells_the_protocol_by_the_image() {
        let native = crate::elf::tests::tiny_elf();
        assert!(matches!(kernel(&native, 4 << 20), Ok(Kernel::Native(_))));
        // The same file with a Multiboot header (flags 0): loaded by its ELF headers, but
        // entered as a Multiboot kernel.
        let mut mb = native.clone();
        mb[0x80..0x84].copy_from_slice(&multiboot::HEADER_MAGIC.to_le_bytes());
        mb[0x88..0x8c].copy_from_slice(&0u32.wrapping_sub(multiboot::HEADER_MAGIC).to_le_bytes());
        assert!(matches!(kernel(&mb, 4 << 20), Ok(Kernel::Multiboot(_))));
        mb[0x88] ^= 1;
        assert_eq!(
            kernel(&mb, 4 << 20),
            Err(ImageError::Multiboot(MultibootError::BadChecksum))
        );
        assert_eq!(
            kernel(b"neither", 4 << 20),
            Err(ImageError::Elf(ElfError::TooShort))
        );
        assert_eq!(
            ImageError::Elf(ElfError::BadMagic).to_string(),
            "image is not an ELF file (bad magic) (and no Multiboot header either)"
        );
    }

    #[test]
    fn identity_maps_four_gib() {
        let p = boot_area(4 << 20, "x");
        for va in [0, 0x10_0000, 0x12_3456, 0x5000_0000, 0xffff_fff0] {
            assert_eq!(walk(&p, va), Some(va), "{va:#x}");
        }
        assert_eq!(walk(&p, 0x1_0000_0000), None);
        // Everything fits below the image area.
        for (at, bytes) in &p {
            assert!(at + bytes.len() as u64 <= guest_abi::boot::IMAGE_MIN_GPA);
        }
    }

    #[test]
    fn boot_info_and_cmdline() {
        let p = boot_area(8 << 20, "work=5");
        assert_eq!(read_u64(&p, BOOT_INFO_GPA), BOOT_INFO_MAGIC);
        assert_eq!(read_u64(&p, BOOT_INFO_GPA + 8), 8 << 20);
        assert_eq!(read_u64(&p, BOOT_INFO_GPA + 24), 6);
        let info = p.iter().find(|(a, _)| *a == BOOT_INFO_GPA).unwrap();
        assert_eq!(&info.1[32..], b"work=5");
    }
}
