//! Multiboot (version 1) kernels: the header, where the kernel, its modules and the boot
//! information go in guest memory, and the bytes of that information (The Multiboot
//! Specification 0.6.96, sections 3.1 and 3.3).
//!
//! This module only plans and encodes; the kernel writes the pieces into the VM's memory and
//! enters the guest as section 3.2 says: 32-bit protected mode, paging off, flat 4 GiB code and
//! data segments, EAX = [`BOOTLOADER_MAGIC`], EBX = the boot information's address, interrupts off. It is what
//! GRUB and QEMU's `-kernel` do for such a kernel, which is how kvm-unit-tests and many small
//! kernels expect to start.
//!
//! Guest-physical layout (every piece checked to fit the VM's memory), as QEMU's loader lays it
//! out, so that the kernel's own use of low memory never meets the boot information:
//! - the kernel where its ELF program headers (or the header's address fields) say;
//! - the modules after the kernel, each on its own page;
//! - after them, on a new page, a flat GDT (null, 32-bit code at 0x08, 32-bit data at 0x10)
//!   that the entry segments match (for a kernel that reloads a segment register before its own
//!   `lgdt`), then the boot information (EBX) with the command line, the memory map, the module
//!   list, the module strings and the boot loader's name;
//! - what a PC BIOS leaves for real-mode code ([`firmware_pieces`]): the interrupt vector
//!   table at 0 and minimal handlers at 0xF0000. The kernel also finds the 8259s and the PIT as
//!   a BIOS leaves them (the platform's `bios_setup`): a Multiboot loader runs after the BIOS.

use alloc::string::String;
use alloc::vec::Vec;

use crate::elf::{self, ElfError, Segment};
use hv_platform::pic::{BIOS_MASTER_BASE, BIOS_SLAVE_BASE};

/// The header's magic (section 3.1.1).
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// What the kernel finds in EAX (section 3.2).
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must be in the first 8192 bytes of the image, 32-bit aligned (section 3.1.1).
const SEARCH_BYTES: usize = 8192;

/// Header flags (section 3.1.2): bits 0-15 are requirements a loader that does not know them
/// must refuse; bits 16-31 are optional.
const PAGE_ALIGN: u32 = 1 << 0;
const MEMORY_INFO: u32 = 1 << 1;
const VIDEO_MODE: u32 = 1 << 2;
const ADDRESSES: u32 = 1 << 16;

/// Boot-information flags (section 3.3).
const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;

/// The flat GDT: null, 32-bit code (0x08), 32-bit data (0x10), as GRUB gives.
pub const GDT: [u64; 3] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
/// The boot information follows the GDT at this offset.
const INFO_OFFSET: u64 = 0x40;
/// The end of conventional memory the map reports: 639 KiB, the last KiB being the BIOS data
/// area a PC keeps there.
pub const LOW_MEMORY_END: u64 = 0x9_fc00;
/// Where extended memory starts (`mem_upper` counts from here).
pub const EXTENDED_MEMORY: u64 = 0x10_0000;
/// The boot information must be reachable with paging off: below 4 GiB.
const BOOT_AREA_LIMIT: u64 = 1 << 32;
/// What the boot loader calls itself (`boot_loader_name`).
pub const LOADER_NAME: &str = "muxvisor";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MultibootError {
    /// No header magic in the first 8192 bytes.
    NoHeader,
    /// The header's checksum does not make magic + flags + checksum zero.
    BadChecksum,
    /// The kernel needs something this loader does not give (e.g. a video mode).
    Requires(&'static str),
    /// Required-feature flags (bits 0-15) that the specification does not define.
    UnknownRequirements(u32),
    /// The image's ELF headers are broken, or it is no ELF and has no address fields.
    Elf(ElfError),
    /// The header's address fields (flag 16) contradict each other or the file.
    BadAddresses(&'static str),
    /// The kernel, the modules and the boot information do not fit in the VM's memory (or, for
    /// the boot information, below 4 GiB).
    TooLarge { needed: u64, memory: u64 },
}

impl core::fmt::Display for MultibootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoHeader => f.write_str("no Multiboot header in the image's first 8 KiB"),
            Self::BadChecksum => f.write_str("the Multiboot header's checksum is wrong"),
            Self::Requires(what) => write!(f, "the Multiboot kernel requires {what}, which muxvisor does not provide"),
            Self::UnknownRequirements(bits) => write!(
                f,
                "the Multiboot header requires features {bits:#x} that the specification does not define"
            ),
            Self::Elf(e) => write!(f, "Multiboot kernel: {e}"),
            Self::BadAddresses(why) => write!(f, "the Multiboot header's address fields are invalid: {why}"),
            Self::TooLarge { needed, memory } => write!(
                f,
                "the kernel and its modules need {needed:#x} bytes of guest memory, the VM has {memory:#x}"
            ),
        }
    }
}

/// Whether `image` carries a Multiboot header (right or wrong: [`load`] says which).
pub fn has_header(image: &[u8]) -> bool {
    header_offset(image).is_some()
}

fn header_offset(image: &[u8]) -> Option<usize> {
    let search = &image[..image.len().min(SEARCH_BYTES)];
    search
        .chunks_exact(4)
        .position(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) == HEADER_MAGIC)
        .map(|i| i * 4)
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    let bytes = b.get(o..o.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// A kernel ready to load: its entry point and the pieces of the file that go into memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub entry: u64,
    pub segments: Vec<Segment>,
}

impl Kernel {
    /// The first byte above the kernel.
    pub fn end(&self) -> u64 {
        elf::segments_end(&self.segments)
    }
}

/// Checks the header of `image` and plans its loading into a VM of `mem_size` bytes: by the
/// header's address fields when flag 16 is set (section 3.1.3), else by its ELF program headers
/// (ELF32 or ELF64).
pub fn load(image: &[u8], mem_size: u64) -> Result<Kernel, MultibootError> {
    let at = header_offset(image).ok_or(MultibootError::NoHeader)?;
    let word = |i: usize| u32_at(image, at + 4 * i);
    let (Some(flags), Some(checksum)) = (word(1), word(2)) else {
        return Err(MultibootError::BadChecksum);
    };
    if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
        return Err(MultibootError::BadChecksum);
    }
    if flags & VIDEO_MODE != 0 {
        return Err(MultibootError::Requires("a graphics mode (header flag 2)"));
    }
    // Page-aligned modules (0) and the memory information (1) are always given.
    let unknown = flags & 0xffff & !(PAGE_ALIGN | MEMORY_INFO | VIDEO_MODE);
    if unknown != 0 {
        return Err(MultibootError::UnknownRequirements(unknown));
    }
    if flags & ADDRESSES == 0 {
        let elf = elf::parse_any(image, 0, mem_size).map_err(MultibootError::Elf)?;
        return Ok(Kernel {
            entry: elf.entry,
            segments: elf.segments,
        });
    }
    let field = |i: usize| {
        word(i).map(u64::from).ok_or(MultibootError::BadAddresses(
            "the header is cut off by the end of the file",
        ))
    };
    let (header_addr, load_addr, load_end, bss_end, entry) =
        (field(3)?, field(4)?, field(5)?, field(6)?, field(7)?);
    // The header's own address says where the file's bytes go: load_addr is the address of
    // the file offset `at - (header_addr - load_addr)`.
    let before = header_addr
        .checked_sub(load_addr)
        .ok_or(MultibootError::BadAddresses(
            "header_addr is below load_addr",
        ))?;
    let offset = (at as u64)
        .checked_sub(before)
        .ok_or(MultibootError::BadAddresses(
            "load_addr is before the file's start",
        ))?;
    let file_left = image.len() as u64 - offset;
    let filesz = match load_end {
        0 => file_left,
        end if end < load_addr => {
            return Err(MultibootError::BadAddresses(
                "load_end_addr is below load_addr",
            ))
        }
        end if end - load_addr > file_left => {
            return Err(MultibootError::BadAddresses(
                "load_end_addr is past the file's end",
            ))
        }
        end => end - load_addr,
    };
    let memsz = match bss_end {
        0 => filesz,
        end if end < load_addr + filesz => {
            return Err(MultibootError::BadAddresses(
                "bss_end_addr is below the loaded data",
            ))
        }
        end => end - load_addr,
    };
    elf::check_range(load_addr, memsz, 0, mem_size).map_err(MultibootError::Elf)?;
    if !(load_addr..load_addr + memsz).contains(&entry) {
        return Err(MultibootError::BadAddresses(
            "entry_addr is outside the loaded image",
        ));
    }
    Ok(Kernel {
        entry,
        segments: alloc::vec![Segment {
            gpa: load_addr,
            offset,
            filesz,
            memsz,
        }],
    })
}

/// A module to hand the kernel: its string (what GRUB's `module` line says after the path) and
/// its size.
#[derive(Clone, Copy, Debug)]
pub struct Module<'a> {
    pub string: &'a str,
    pub len: u64,
}

/// Where everything goes: the pieces of the boot area and the address of each module.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootPlan {
    /// (guest-physical address, bytes) to write; the VM's memory is zero elsewhere.
    pub pieces: Vec<(u64, Vec<u8>)>,
    /// Where each module's bytes go, in the order given.
    pub modules: Vec<u64>,
    /// The GDT's address (GDTR base at entry).
    pub gdt: u64,
    /// The boot information's address (EBX at entry).
    pub info: u64,
}

/// Plans the boot information for a kernel that ends at `kernel_end` in a VM of `mem_size`
/// bytes: `cmdline` is the kernel's command line as the kernel will see it (by convention its
/// own name first, then its arguments), `modules` go after the kernel, page-aligned, and the
/// GDT and boot information after them.
pub fn boot_plan(
    mem_size: u64,
    cmdline: &str,
    kernel_end: u64,
    modules: &[Module<'_>],
) -> Result<BootPlan, MultibootError> {
    let too_large = |needed| MultibootError::TooLarge {
        needed,
        memory: mem_size,
    };
    let mut module_at = Vec::with_capacity(modules.len());
    let mut next = page_up(kernel_end).ok_or(too_large(u64::MAX))?;
    for m in modules {
        let end = next.checked_add(m.len).ok_or(too_large(u64::MAX))?;
        if end > mem_size {
            return Err(too_large(end));
        }
        module_at.push(next);
        next = page_up(end).ok_or(too_large(u64::MAX))?;
    }

    // The GDT, then the information structure (section 3.3, 88 bytes with the fields up to the
    // VBE ones), then everything it points to.
    const INFO_LEN: u64 = 88;
    let gdt_gpa = next;
    let info_gpa = gdt_gpa + INFO_OFFSET;
    let mut tail = Vec::new();
    let mut place = |bytes: &[u8]| -> u32 {
        let at = info_gpa + INFO_LEN + tail.len() as u64;
        tail.extend_from_slice(bytes);
        // Keep every piece 8-byte aligned.
        tail.resize(tail.len().next_multiple_of(8), 0);
        at as u32
    };
    let cmdline_gpa = place(&nul_terminated(cmdline));
    let mut mmap = Vec::new();
    for (base, len, kind) in memory_map(mem_size) {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&kind.to_le_bytes());
    }
    let mmap_len = mmap.len() as u32;
    let mmap_gpa = place(&mmap);
    let strings: Vec<u32> = modules
        .iter()
        .map(|m| place(&nul_terminated(m.string)))
        .collect();
    let mut mods = Vec::new();
    for ((m, &at), string) in modules.iter().zip(&module_at).zip(strings) {
        // mod_start, mod_end (exclusive), string, reserved: 32-bit fields (section 3.3).
        for v in [at as u32, (at + m.len) as u32, string, 0] {
            mods.extend_from_slice(&v.to_le_bytes());
        }
    }
    let mods_gpa = place(&mods);
    let name_gpa = place(&nul_terminated(LOADER_NAME));
    let end = info_gpa + INFO_LEN + tail.len() as u64;
    if end > mem_size || end > BOOT_AREA_LIMIT {
        return Err(too_large(end));
    }

    let mut info = [0u32; INFO_LEN as usize / 4];
    info[0] = INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME;
    info[1] = (LOW_MEMORY_END / 1024) as u32; // mem_lower, KiB from 0
                                              // mem_upper: KiB from 1 MiB to the first hole (the VM's memory is one range).
    info[2] = (mem_size.saturating_sub(EXTENDED_MEMORY) / 1024).min(u64::from(u32::MAX)) as u32;
    info[4] = cmdline_gpa;
    info[5] = modules.len() as u32;
    info[6] = mods_gpa;
    info[11] = mmap_len;
    info[12] = mmap_gpa;
    info[16] = name_gpa;
    let mut info_bytes: Vec<u8> = info.iter().flat_map(|v| v.to_le_bytes()).collect();
    info_bytes.extend_from_slice(&tail);
    let gdt = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    Ok(BootPlan {
        pieces: alloc::vec![(gdt_gpa, gdt), (info_gpa, info_bytes)],
        modules: module_at,
        gdt: gdt_gpa,
        info: info_gpa,
    })
}

/// The memory map of a VM of `mem_size` bytes (at least 1 MiB), as (base, length, type): type
/// 1 is RAM, 2 reserved. It has a PC's shape: conventional memory, the BIOS data area and ROM
/// reserved, the VGA window left out, then everything from 1 MiB.
pub fn memory_map(mem_size: u64) -> [(u64, u64, u32); 4] {
    [
        (0, LOW_MEMORY_END, 1),
        (LOW_MEMORY_END, 0xa_0000 - LOW_MEMORY_END, 2),
        (0xf_0000, 0x1_0000, 2),
        (EXTENDED_MEMORY, mem_size.saturating_sub(EXTENDED_MEMORY), 1),
    ]
}

/// Where the real-mode interrupt handlers of [`firmware_pieces`] go: the start of the BIOS ROM
/// area (segment 0xF000), which the memory map reports reserved.
pub const BIOS_STUBS: u64 = 0xf_0000;

/// What a PC BIOS leaves in memory for the real-mode code of a Multiboot kernel, which a
/// kernel that drops back to real mode (kvm-unit-tests' `realmode`) relies on: the interrupt
/// vector table at 0 (256 far pointers) and the handlers it points to, at [`BIOS_STUBS`].
/// There are no BIOS services: a software `INT n` returns at once; the 8259s' vectors
/// acknowledge the interrupt (EOI to the master, and for IRQ 8-15 to the slave first) and
/// return, as a BIOS's do for the IRQs it owns. A piece that would overlap one of the kernel's
/// `segments` is left out, so that nothing the kernel loads is overwritten.
pub fn firmware_pieces(segments: &[Segment]) -> Vec<(u64, Vec<u8>)> {
    // push ax; mov al, 0x20; [out 0xa0, al;] out 0x20, al; pop ax; iret
    const IRET: &[u8] = &[0xcf];
    const MASTER_EOI: &[u8] = &[0x50, 0xb0, 0x20, 0xe6, 0x20, 0x58, 0xcf];
    const SLAVE_EOI: &[u8] = &[0x50, 0xb0, 0x20, 0xe6, 0xa0, 0xe6, 0x20, 0x58, 0xcf];
    let (iret_at, master_at, slave_at) = (0u16, 0x10u16, 0x20u16);
    let mut stubs = alloc::vec![0u8; 0x30];
    stubs[usize::from(iret_at)..][..IRET.len()].copy_from_slice(IRET);
    stubs[usize::from(master_at)..][..MASTER_EOI.len()].copy_from_slice(MASTER_EOI);
    stubs[usize::from(slave_at)..][..SLAVE_EOI.len()].copy_from_slice(SLAVE_EOI);
    let segment = (BIOS_STUBS >> 4) as u16;
    let mut ivt = Vec::with_capacity(1024);
    for vector in 0..=255u8 {
        let offset = match vector {
            v if (BIOS_MASTER_BASE..BIOS_MASTER_BASE + 8).contains(&v) => master_at,
            v if (BIOS_SLAVE_BASE..BIOS_SLAVE_BASE + 8).contains(&v) => slave_at,
            _ => iret_at,
        };
        ivt.extend_from_slice(&offset.to_le_bytes());
        ivt.extend_from_slice(&segment.to_le_bytes());
    }
    let free = |gpa: u64, len: usize| {
        let end = gpa + len as u64;
        segments
            .iter()
            .all(|s| s.gpa.saturating_add(s.memsz) <= gpa || end <= s.gpa)
    };
    [(0, ivt), (BIOS_STUBS, stubs)]
        .into_iter()
        .filter(|(gpa, bytes)| free(*gpa, bytes.len()))
        .collect()
}

fn page_up(x: u64) -> Option<u64> {
    x.checked_next_multiple_of(4096)
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = String::from(s).into_bytes();
    v.push(0);
    v
}

#[cfg(test)]
mod tests;
