//! The Linux/x86 boot protocol (the kernel's Documentation/arch/x86/boot.rst): what a bzImage's
//! setup header says, where its protected-mode kernel, command line, initrd and zero page
//! (`struct boot_params`) go in guest memory, and the bytes of that zero page, with the e820
//! memory map of the VM.
//!
//! This module only parses, plans and encodes, from bytes to bytes; the kernel writes the pieces
//! into the VM's memory and enters the kernel at its 64-bit entry point as section "64-bit Boot
//! Protocol" says: long mode, paging on with the loaded kernel, zero page and command line
//! identity-mapped, a GDT whose selectors 0x10 and 0x18 are flat 64-bit code and data
//! (`__BOOT_CS`, `__BOOT_DS`), interrupts off, RSI = the zero page's address.
//!
//! Every field is read with bounds checks: a damaged or truncated bzImage is a [`BzImageError`],
//! never a panic (fuzzed in the tests).
//!
//! Guest-physical layout (each piece checked to fit the VM's memory):
//! - 0x1000-0x6FFF: page tables identity-mapping 4 GiB (`boot::identity_page_tables`); 0x7000:
//!   the GDT; 0x8000: the zero page; 0x20000: the command line; 0xE0000: the ACPI tables
//!   (`crate::acpi`), whose RSDP address the zero page also gives (`acpi_rsdp_addr`);
//! - the protected-mode kernel at its preferred address (`pref_address`, 16 MiB for distribution
//!   kernels), or, if that does not leave `init_size` bytes of room, at the lowest address from
//!   1 MiB aligned to `kernel_alignment` that does (the kernel is relocatable: required);
//! - the initrd at the top of memory below `initrd_addr_max`, page-aligned, above the kernel's
//!   `init_size`.

use crate::acpi;
use alloc::vec::Vec;
use core::fmt;

/// "HdrS", the setup header's magic at 0x202.
const HEADER_MAGIC: u32 = 0x5372_6448;
/// The boot sector's flag at 0x1FE.
const BOOT_FLAG: u16 = 0xaa55;
/// The oldest protocol this loader takes: 2.12 has `xloadflags` and the 64-bit entry point.
pub const MIN_PROTOCOL: u16 = 0x020c;
/// Where the setup header starts, in the image and in the zero page.
const SETUP_HEADER: usize = 0x1f1;
/// `xloadflags` bit 0: the kernel has the 64-bit entry point at its load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// `loadflags` bit 0: the protected-mode kernel is loaded at 1 MiB or above.
const LOADED_HIGH: u8 = 1 << 0;
/// The loader ID for a loader without an assigned one (`type_of_loader`).
const LOADER_UNDEFINED: u8 = 0xff;

/// The zero page's size and the offsets of the fields this loader fills (boot_params, see
/// arch/x86/include/uapi/asm/bootparam.h and Documentation/arch/x86/zero-page.rst).
pub const ZERO_PAGE_SIZE: usize = 4096;
const E820_ENTRIES: usize = 0x1e8;
const E820_TABLE: usize = 0x2d0;
/// Most e820 entries the zero page holds.
pub const E820_MAX: usize = 128;
const TYPE_OF_LOADER: usize = 0x210;
const LOADFLAGS: usize = 0x211;
const RAMDISK_IMAGE: usize = 0x218;
const RAMDISK_SIZE: usize = 0x21c;
const CMD_LINE_PTR: usize = 0x228;
const EXT_RAMDISK_IMAGE: usize = 0x0c0;
const EXT_RAMDISK_SIZE: usize = 0x0c4;
const EXT_CMD_LINE_PTR: usize = 0x0c8;
/// `acpi_rsdp_addr` (protocol 2.14): where the RSDP is, so that the kernel need not scan.
const ACPI_RSDP_ADDR: usize = 0x070;

/// Where the boot pieces go.
pub const GDT_GPA: u64 = 0x7000;
pub const ZERO_PAGE_GPA: u64 = 0x8000;
pub const CMDLINE_GPA: u64 = 0x2_0000;
/// The GDT: null, null, 64-bit code at 0x10 (`__BOOT_CS`), data at 0x18 (`__BOOT_DS`).
pub const GDT: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
/// The 64-bit entry point's offset from the load address.
const ENTRY_64: u64 = 0x200;
/// Memory below this is for the boot pieces, the BIOS data area and legacy holes.
const HIGH_MEMORY: u64 = 0x10_0000;

/// e820 memory types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// Why a bzImage cannot be booted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BzImageError {
    /// Shorter than its setup header, or than the setup sectors it declares.
    Truncated { len: usize, needed: usize },
    /// No boot flag 0xAA55 or no "HdrS" magic: not a bzImage.
    NotBzImage,
    /// The boot protocol is older than 2.12 (no 64-bit entry point to rely on).
    OldProtocol { version: u16 },
    /// Not built to load high (a zImage) or not relocatable.
    NotRelocatable,
    /// No 64-bit entry point (`xloadflags` lacks XLF_KERNEL_64).
    No64BitEntry,
    /// `kernel_alignment` is not a power of two of at least 4 KiB.
    BadAlignment { alignment: u32 },
    /// The command line is longer than the kernel takes (`cmdline_size`).
    CmdlineTooLong { len: usize, max: u32 },
    /// The kernel, its initrd and the boot pieces do not fit the VM's memory.
    TooLarge { needed: u64, memory: u64 },
}

impl fmt::Display for BzImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { len, needed } => {
                write!(f, "truncated: {len} bytes, the header needs {needed}")
            }
            Self::NotBzImage => {
                f.write_str("not a bzImage (no boot flag 0xAA55 and \"HdrS\" header)")
            }
            Self::OldProtocol { version } => write!(
                f,
                "boot protocol {}.{:02} is older than 2.12",
                version >> 8,
                version & 0xff
            ),
            Self::NotRelocatable => f.write_str("the kernel is not relocatable or not loaded high"),
            Self::No64BitEntry => {
                f.write_str("the kernel has no 64-bit entry point (XLF_KERNEL_64)")
            }
            Self::BadAlignment { alignment } => {
                write!(
                    f,
                    "kernel_alignment {alignment:#x} is not a power of two >= 4 KiB"
                )
            }
            Self::CmdlineTooLong { len, max } => {
                write!(
                    f,
                    "the command line is {len} bytes, the kernel takes at most {max}"
                )
            }
            Self::TooLarge { needed, memory } => write!(
                f,
                "needs {needed:#x} bytes of guest memory, the VM has {memory:#x}"
            ),
        }
    }
}

/// What the setup header says, and where the protected-mode kernel lies in the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BzImage<'a> {
    /// The setup header as it is in the image, from 0x1F1 to its end: copied into the zero page.
    pub header: &'a [u8],
    /// The protected-mode kernel (after the setup sectors): loaded at [`LinuxPlan::kernel`].
    pub kernel: &'a [u8],
    /// The boot protocol version (0x020f is 2.15).
    pub version: u16,
    pub kernel_alignment: u64,
    /// Where the kernel prefers to run, and how much memory from its load address it needs
    /// while it decompresses and initialises.
    pub pref_address: u64,
    pub init_size: u64,
    /// The longest command line it takes, without the NUL.
    pub cmdline_size: u32,
    /// The highest address the initrd may end at, plus one.
    pub initrd_addr_max: u64,
}

fn u8_at(b: &[u8], at: usize) -> Option<u8> {
    b.get(at).copied()
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parses and checks a bzImage's setup header (boot.rst, "The Real-Mode Kernel Header"):
/// protocol 2.12 or later, loaded high, relocatable, with the 64-bit entry point.
pub fn parse(image: &[u8]) -> Result<BzImage<'_>, BzImageError> {
    // Up to `init_size` (0x260), the last field this loader reads.
    const HEADER_END: usize = 0x264;
    let truncated = |needed: usize| BzImageError::Truncated {
        len: image.len(),
        needed,
    };
    if image.len() < HEADER_END {
        return Err(truncated(HEADER_END));
    }
    let field16 = |at| u16_at(image, at).ok_or(truncated(at + 2));
    let field32 = |at| u32_at(image, at).ok_or(truncated(at + 4));
    if field16(0x1fe)? != BOOT_FLAG || field32(0x202)? != HEADER_MAGIC {
        return Err(BzImageError::NotBzImage);
    }
    let version = field16(0x206)?;
    if version < MIN_PROTOCOL {
        return Err(BzImageError::OldProtocol { version });
    }
    let loadflags = u8_at(image, 0x211).ok_or(truncated(0x212))?;
    let relocatable = u8_at(image, 0x234).ok_or(truncated(0x235))?;
    if loadflags & LOADED_HIGH == 0 || relocatable == 0 {
        return Err(BzImageError::NotRelocatable);
    }
    if field16(0x236)? & XLF_KERNEL_64 == 0 {
        return Err(BzImageError::No64BitEntry);
    }
    let alignment = field32(0x230)?;
    if !alignment.is_power_of_two() || alignment < 0x1000 {
        return Err(BzImageError::BadAlignment { alignment });
    }
    // The header ends at 0x202 plus the byte at 0x201 (the jump's offset).
    let header_end = 0x202 + usize::from(u8_at(image, 0x201).ok_or(truncated(0x202))?);
    let header = image
        .get(SETUP_HEADER..header_end.max(HEADER_END))
        .ok_or(truncated(header_end))?;
    // setup_sects: 0 means 4 (boot.rst); the boot sector is one more.
    let setup_sects = match u8_at(image, 0x1f1).ok_or(truncated(0x1f2))? {
        0 => 4,
        n => usize::from(n),
    };
    let kernel_start = (setup_sects + 1) * 512;
    let kernel = image
        .get(kernel_start..)
        .filter(|k| !k.is_empty())
        .ok_or(truncated(kernel_start + 1))?;
    let pref_address = u64_at(image, 0x258).ok_or(truncated(0x260))?;
    let init_size = u64::from(field32(0x260)?).max(kernel.len() as u64);
    Ok(BzImage {
        header,
        kernel,
        version,
        kernel_alignment: alignment.into(),
        pref_address,
        init_size,
        cmdline_size: field32(0x238)?,
        initrd_addr_max: u64::from(field32(0x22c)?) + 1,
    })
}

/// One e820 entry: `len` bytes from `base` of `kind` ([`E820_RAM`], [`E820_RESERVED`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub base: u64,
    pub len: u64,
    pub kind: u32,
}

/// The memory map of a VM of `mem_size` bytes (at least 1 MiB) as a PC's firmware reports it:
/// conventional memory up to 639 KiB, the extended BIOS data area and the BIOS area (with the
/// ACPI tables) reserved (the VGA window is no memory), RAM from 1 MiB, and the IOAPIC and local APIC pages reserved.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let entry = |base, len, kind| E820Entry { base, len, kind };
    alloc::vec![
        entry(0, 0x9_fc00, E820_RAM),
        entry(0x9_fc00, 0x400, E820_RESERVED),
        // The BIOS area: the ACPI tables (crate::acpi) in its first half, the ROM above.
        entry(
            acpi::TABLES_GPA,
            0x10_0000 - acpi::TABLES_GPA,
            E820_RESERVED
        ),
        entry(HIGH_MEMORY, mem_size.saturating_sub(HIGH_MEMORY), E820_RAM),
        entry(0xfec0_0000, 0x1000, E820_RESERVED),
        entry(0xfee0_0000, 0x1000, E820_RESERVED),
    ]
}

/// Where everything goes, and the bytes to write besides the kernel and the initrd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxPlan {
    /// (guest-physical address, bytes): the GDT, the zero page, the command line, the ACPI
    /// tables.
    pub pieces: Vec<(u64, Vec<u8>)>,
    /// Where the protected-mode kernel goes.
    pub kernel: u64,
    /// Where the initrd goes, if there is one.
    pub initrd: Option<u64>,
    /// RIP at entry: the 64-bit entry point.
    pub entry: u64,
    /// RSI at entry: the zero page.
    pub zero_page: u64,
    /// The highest guest-physical address the boot uses, plus one: the identity map must
    /// cover it.
    pub end: u64,
}

/// Plans the boot of `image` in a VM of `mem_size` bytes with `cmdline` and an initrd of
/// `initrd_len` bytes.
pub fn plan(
    image: &BzImage<'_>,
    mem_size: u64,
    cmdline: &str,
    initrd_len: Option<u64>,
) -> Result<LinuxPlan, BzImageError> {
    if cmdline.len() > image.cmdline_size as usize {
        return Err(BzImageError::CmdlineTooLong {
            len: cmdline.len(),
            max: image.cmdline_size,
        });
    }
    let too_large = |needed| BzImageError::TooLarge {
        needed,
        memory: mem_size,
    };
    // The kernel: at its preferred address if the room is there, else as low as its alignment
    // allows from 1 MiB.
    let fits = |at: u64| {
        at.checked_add(image.init_size)
            .filter(|&end| end <= mem_size)
    };
    let lowest = HIGH_MEMORY.next_multiple_of(image.kernel_alignment);
    let kernel = if image.pref_address >= HIGH_MEMORY
        && image.pref_address.is_multiple_of(image.kernel_alignment)
        && fits(image.pref_address).is_some()
    {
        image.pref_address
    } else {
        fits(lowest).ok_or(too_large(lowest.saturating_add(image.init_size)))?;
        lowest
    };
    let kernel_end = kernel + image.init_size;
    // The initrd at the top, below initrd_addr_max and the 4 GiB the 32-bit fields reach.
    let initrd = match initrd_len {
        None => None,
        Some(len) => {
            let top = mem_size.min(image.initrd_addr_max).min(1 << 32);
            let at = top.checked_sub(len).map(|a| a & !0xfff);
            match at {
                Some(at) if at >= kernel_end => Some(at),
                _ => return Err(too_large(kernel_end.saturating_add(len))),
            }
        }
    };
    let map = e820_map(mem_size);
    let zero_page = zero_page(image, initrd.zip(initrd_len), &map);
    let mut cmdline_bytes = Vec::with_capacity(cmdline.len() + 1);
    cmdline_bytes.extend_from_slice(cmdline.as_bytes());
    cmdline_bytes.push(0);
    let pieces = alloc::vec![
        (GDT_GPA, GDT.iter().flat_map(|d| d.to_le_bytes()).collect()),
        (ZERO_PAGE_GPA, zero_page),
        (CMDLINE_GPA, cmdline_bytes),
        (acpi::TABLES_GPA, acpi::tables()),
    ];
    let end = initrd
        .zip(initrd_len)
        .map_or(kernel_end, |(at, len)| kernel_end.max(at + len));
    Ok(LinuxPlan {
        pieces,
        kernel,
        initrd,
        entry: kernel + ENTRY_64,
        zero_page: ZERO_PAGE_GPA,
        end,
    })
}

/// The zero page: the image's setup header, with what the loader fills in (boot.rst, "Details
/// of Header Fields": type_of_loader, loadflags, cmd_line_ptr, ramdisk_image/size and their
/// `ext_` high halves) and the e820 map.
pub fn zero_page(image: &BzImage<'_>, initrd: Option<(u64, u64)>, map: &[E820Entry]) -> Vec<u8> {
    let mut zp = alloc::vec![0u8; ZERO_PAGE_SIZE];
    let header_len = image.header.len().min(E820_TABLE - SETUP_HEADER);
    zp[SETUP_HEADER..SETUP_HEADER + header_len].copy_from_slice(&image.header[..header_len]);
    let put32 = |zp: &mut [u8], at: usize, v: u32| zp[at..at + 4].copy_from_slice(&v.to_le_bytes());
    zp[TYPE_OF_LOADER] = LOADER_UNDEFINED;
    // LOADED_HIGH stays; no heap (only the 16-bit entry uses it), not quiet, segments reloaded.
    zp[LOADFLAGS] = LOADED_HIGH;
    put32(&mut zp, CMD_LINE_PTR, CMDLINE_GPA as u32);
    put32(&mut zp, EXT_CMD_LINE_PTR, (CMDLINE_GPA >> 32) as u32);
    let (ramdisk, ramdisk_len) = initrd.unwrap_or((0, 0));
    put32(&mut zp, RAMDISK_IMAGE, ramdisk as u32);
    put32(&mut zp, EXT_RAMDISK_IMAGE, (ramdisk >> 32) as u32);
    put32(&mut zp, RAMDISK_SIZE, ramdisk_len as u32);
    put32(&mut zp, EXT_RAMDISK_SIZE, (ramdisk_len >> 32) as u32);
    zp[ACPI_RSDP_ADDR..ACPI_RSDP_ADDR + 8].copy_from_slice(&acpi::TABLES_GPA.to_le_bytes());
    let entries = &map[..map.len().min(E820_MAX)];
    zp[E820_ENTRIES] = entries.len() as u8;
    for (i, e) in entries.iter().enumerate() {
        let at = E820_TABLE + i * 20;
        zp[at..at + 8].copy_from_slice(&e.base.to_le_bytes());
        zp[at + 8..at + 16].copy_from_slice(&e.len.to_le_bytes());
        zp[at + 16..at + 20].copy_from_slice(&e.kind.to_le_bytes());
    }
    zp
}

#[cfg(test)]
mod tests;
