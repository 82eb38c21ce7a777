//! Boot copies of ELF files: only what a loader needs, without debug information.
//!
//! The release profile keeps debug information (`debug = true`), which makes the kernel ELF ~9 MiB
//! of which ~0.3 MiB is loaded. Both loaders that read our ELFs, GRUB's Multiboot2 loader for the
//! kernel and the hypervisor's guest loader, use only the ELF header and the program headers, and
//! reading megabytes of DWARF from an emulated CD-ROM doubles the time of every Bochs boot. So the
//! ISO carries a copy cut after the last byte any program header refers to, with the section
//! header table dropped (`e_shoff`, `e_shnum`, `e_shstrndx` = 0). Segment offsets are unchanged,
//! so everything a loader sees, the Multiboot2 header included, is byte-for-byte the same. The
//! full ELFs stay in the target directory for debugging.

use std::fmt;

/// Why an ELF could not be cut down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElfError {
    /// Not a little-endian ELF64 file.
    NotElf64,
    /// The header or a program header lies outside the file.
    Truncated(&'static str),
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ElfError::NotElf64 => f.write_str("not a little-endian ELF64 file"),
            ElfError::Truncated(what) => write!(f, "truncated ELF: {what} lies outside the file"),
        }
    }
}

impl std::error::Error for ElfError {}

const EHDR_SIZE: usize = 64;
const E_PHOFF: usize = 32;
const E_SHOFF: usize = 40;
const E_PHENTSIZE: usize = 54;
const E_PHNUM: usize = 56;
const E_SHNUM: usize = 60;
const E_SHSTRNDX: usize = 62;
const P_OFFSET: usize = 8;
const P_FILESZ: usize = 32;
const PHDR_MIN_SIZE: usize = 56;

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u64_at(bytes: &[u8], at: usize) -> Result<u64, ElfError> {
    bytes
        .get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .ok_or(ElfError::Truncated("a program header"))
}

/// The boot copy of `elf`: the file up to the end of the last program-header range, with no
/// section headers. Files that are already minimal come back unchanged.
pub fn boot_copy(elf: &[u8]) -> Result<Vec<u8>, ElfError> {
    if elf.len() < EHDR_SIZE || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err(ElfError::NotElf64);
    }
    let phoff = u64_at(elf, E_PHOFF)?;
    let phentsize = u16_at(elf, E_PHENTSIZE) as usize;
    let phnum = u16_at(elf, E_PHNUM) as usize;
    if phnum > 0 && phentsize < PHDR_MIN_SIZE {
        return Err(ElfError::Truncated(
            "a program header (entry size too small)",
        ));
    }
    let table_end = usize::try_from(phoff)
        .ok()
        .and_then(|off| off.checked_add(phentsize.checked_mul(phnum)?))
        .filter(|&end| end <= elf.len())
        .ok_or(ElfError::Truncated("the program header table"))?;
    let mut end = table_end.max(EHDR_SIZE);
    for i in 0..phnum {
        let ph = table_end - (phnum - i) * phentsize;
        let offset = u64_at(elf, ph + P_OFFSET)?;
        let filesz = u64_at(elf, ph + P_FILESZ)?;
        let segment_end = offset
            .checked_add(filesz)
            .and_then(|e| usize::try_from(e).ok())
            .filter(|&e| e <= elf.len())
            .ok_or(ElfError::Truncated("a segment"))?;
        end = end.max(segment_end);
    }
    let mut copy = elf[..end].to_vec();
    copy[E_SHOFF..E_SHOFF + 8].fill(0);
    // e_shentsize may stay: with no sections it is ignored.
    copy[E_SHNUM..E_SHNUM + 2].fill(0);
    copy[E_SHSTRNDX..E_SHSTRNDX + 2].fill(0);
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    const E_SHENTSIZE: usize = 58;

    /// An ELF64 with two PT_LOAD segments, then "debug" bytes and a section header table.
    fn sample() -> Vec<u8> {
        let mut elf = vec![0u8; 0x3000];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // ELFCLASS64
        elf[5] = 1; // little-endian
        elf[E_PHOFF..E_PHOFF + 8].copy_from_slice(&64u64.to_le_bytes());
        elf[E_SHOFF..E_SHOFF + 8].copy_from_slice(&0x2800u64.to_le_bytes());
        elf[E_PHENTSIZE..E_PHENTSIZE + 2].copy_from_slice(&56u16.to_le_bytes());
        elf[E_PHNUM..E_PHNUM + 2].copy_from_slice(&2u16.to_le_bytes());
        elf[E_SHENTSIZE..E_SHENTSIZE + 2].copy_from_slice(&64u16.to_le_bytes());
        elf[E_SHNUM..E_SHNUM + 2].copy_from_slice(&5u16.to_le_bytes());
        elf[E_SHSTRNDX..E_SHSTRNDX + 2].copy_from_slice(&4u16.to_le_bytes());
        for (i, (offset, filesz)) in [(0x1000u64, 0x800u64), (0x1800, 0x100)].iter().enumerate() {
            let ph = 64 + i * 56;
            elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
            elf[ph + P_OFFSET..ph + P_OFFSET + 8].copy_from_slice(&offset.to_le_bytes());
            elf[ph + P_FILESZ..ph + P_FILESZ + 8].copy_from_slice(&filesz.to_le_bytes());
        }
        for (i, byte) in elf[0x1000..0x1900].iter_mut().enumerate() {
            *byte = (i % 251) as u8;
        }
        elf[0x1900..].fill(0xDB); // debug sections and section headers
        elf
    }

    #[test]
    fn cuts_after_the_last_segment_and_drops_sections() {
        let elf = sample();
        let copy = boot_copy(&elf).unwrap();
        assert_eq!(copy.len(), 0x1900);
        assert_eq!(
            &copy[0x1000..0x1900],
            &elf[0x1000..0x1900],
            "segments are unchanged"
        );
        assert_eq!(
            &copy[64..64 + 112],
            &elf[64..64 + 112],
            "program headers are unchanged"
        );
        assert_eq!(u64_at(&copy, E_SHOFF).unwrap(), 0);
        assert_eq!(u16_at(&copy, E_SHNUM), 0);
        assert_eq!(u16_at(&copy, E_SHSTRNDX), 0);
        assert_eq!(
            &copy[..E_SHOFF],
            &elf[..E_SHOFF],
            "the rest of the header is unchanged"
        );
        // Idempotent.
        assert_eq!(boot_copy(&copy).unwrap(), copy);
    }

    #[test]
    fn rejects_what_is_not_elf64() {
        assert_eq!(boot_copy(b"MZ\x90\x00"), Err(ElfError::NotElf64));
        let mut elf32 = sample();
        elf32[4] = 1;
        assert_eq!(boot_copy(&elf32), Err(ElfError::NotElf64));
    }

    #[test]
    fn rejects_ranges_outside_the_file() {
        let mut elf = sample();
        elf[64 + P_FILESZ..64 + P_FILESZ + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(boot_copy(&elf), Err(ElfError::Truncated("a segment")));
        let mut elf = sample();
        elf[E_PHNUM..E_PHNUM + 2].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(
            boot_copy(&elf),
            Err(ElfError::Truncated("the program header table"))
        );
        let mut elf = sample();
        elf[E_PHENTSIZE..E_PHENTSIZE + 2].copy_from_slice(&8u16.to_le_bytes());
        assert!(boot_copy(&elf).is_err());
    }
}
