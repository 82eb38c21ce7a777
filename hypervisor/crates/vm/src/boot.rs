//! The 64-bit boot area a guest finds at its first instruction (guest-abi's boot protocol):
//! page tables identity-mapping 4 GiB with 2 MiB pages, a flat GDT, the boot information and
//! the command line. [`boot_area`] lists the bytes to write; the kernel writes them into the
//! VM's (zeroed) memory with `GuestMemory::write`.

use alloc::vec::Vec;
use guest_abi::boot::{BootInfo, BOOT_INFO_GPA, BOOT_INFO_MAGIC, CMDLINE_MAX, GDT_GPA, PML4_GPA};

/// Page-table flags: present, writable; PS for 2 MiB pages.
const P_RW: u64 = 0x3;
const PS: u64 = 0x80;

/// The boot area as (guest-physical address, bytes) pieces.
pub fn boot_area(memory_bytes: u64, cmdline: &str) -> Vec<(u64, Vec<u8>)> {
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
