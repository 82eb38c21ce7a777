//! ELF guest images: just enough of the format to load a static x86 executable (ELF64 x86-64 for
//! the 64-bit boot protocol, also ELF32 i386 for Multiboot kernels), with every field checked, so
//! that a corrupt image is a clear error and never a crash.

use alloc::vec::Vec;

/// A `PT_LOAD` segment: `filesz` bytes at `offset` in the file go to guest-physical `gpa`;
/// the rest up to `memsz` is zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub gpa: u64,
    pub offset: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// The file's class: which header layout it uses (and which CPU mode it was built for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfClass {
    /// ELFCLASS32, EM_386.
    Elf32,
    /// ELFCLASS64, EM_X86_64.
    Elf64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfImage {
    pub class: ElfClass,
    pub entry: u64,
    pub segments: Vec<Segment>,
}

/// The first byte above every segment of `segments` (0 for none).
pub fn segments_end(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| s.gpa + s.memsz).max().unwrap_or(0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfError {
    TooShort,
    BadMagic,
    /// Not ELFCLASS64 x86-64 or ELFCLASS32 i386, little-endian, ET_EXEC.
    Unsupported(&'static str),
    /// The program header table or a segment's file range is outside the file.
    Truncated,
    /// A segment is below `min_gpa`, past the VM's memory, or wraps around.
    SegmentOutOfRange {
        gpa: u64,
        memsz: u64,
    },
    NoLoadableSegment,
    /// The entry point is not inside any loaded segment.
    BadEntry(u64),
}

impl core::fmt::Display for ElfError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooShort => f.write_str("image is too short to be an ELF file"),
            Self::BadMagic => f.write_str("image is not an ELF file (bad magic)"),
            Self::Unsupported(what) => write!(f, "unsupported ELF image: {what}"),
            Self::Truncated => f.write_str("ELF image is truncated (a header points past its end)"),
            Self::SegmentOutOfRange { gpa, memsz } => {
                write!(
                    f,
                    "ELF segment at {gpa:#x} ({memsz:#x} bytes) does not fit in the VM's memory"
                )
            }
            Self::NoLoadableSegment => f.write_str("ELF image has no PT_LOAD segment"),
            Self::BadEntry(e) => write!(f, "ELF entry point {e:#x} is outside the loaded segments"),
        }
    }
}

/// `N` bytes at offset `o`, or `Truncated` (also when `o + N` overflows).
fn bytes_at<const N: usize>(b: &[u8], o: usize) -> Result<[u8; N], ElfError> {
    o.checked_add(N)
        .and_then(|end| b.get(o..end))
        .map(|s| s.try_into().expect("slice of N bytes"))
        .ok_or(ElfError::Truncated)
}
fn u16_at(b: &[u8], o: usize) -> Result<u16, ElfError> {
    bytes_at(b, o).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], o: usize) -> Result<u32, ElfError> {
    bytes_at(b, o).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], o: usize) -> Result<u64, ElfError> {
    bytes_at(b, o).map(u64::from_le_bytes)
}

const PT_LOAD: u32 = 1;

/// Where the fields this loader reads are, per class (System V ABI, ELF header and program
/// header tables).
struct Layout {
    class: ElfClass,
    machine: u16,
    /// The smallest program header entry that holds the fields read.
    phentsize_min: u64,
    /// Offsets in the file header: e_entry, e_phoff, e_phentsize (e_phnum follows it).
    entry: usize,
    phoff: usize,
    phentsize: usize,
    /// Offsets in a program header: p_offset, p_paddr, p_filesz, p_memsz.
    p_offset: usize,
    p_paddr: usize,
    p_filesz: usize,
    p_memsz: usize,
}

const ELF64: Layout = Layout {
    class: ElfClass::Elf64,
    machine: 62,
    phentsize_min: 56,
    entry: 24,
    phoff: 32,
    phentsize: 54,
    p_offset: 8,
    p_paddr: 24,
    p_filesz: 32,
    p_memsz: 40,
};

const ELF32: Layout = Layout {
    class: ElfClass::Elf32,
    machine: 3,
    phentsize_min: 32,
    entry: 24,
    phoff: 28,
    phentsize: 42,
    p_offset: 4,
    p_paddr: 12,
    p_filesz: 16,
    p_memsz: 20,
};

impl Layout {
    /// A word of the class's size (an address or offset) at `o`.
    fn word(&self, b: &[u8], o: usize) -> Result<u64, ElfError> {
        match self.class {
            ElfClass::Elf32 => u32_at(b, o).map(u64::from),
            ElfClass::Elf64 => u64_at(b, o),
        }
    }
}

/// Parses an ELF64 x86-64 `file` and checks that every segment lies in `min_gpa..mem_size`.
pub fn parse(file: &[u8], min_gpa: u64, mem_size: u64) -> Result<ElfImage, ElfError> {
    let image = parse_any(file, min_gpa, mem_size)?;
    if image.class != ElfClass::Elf64 {
        return Err(ElfError::Unsupported("not 64-bit"));
    }
    Ok(image)
}

/// Like [`parse`], for ELF64 x86-64 and ELF32 i386 files alike.
pub fn parse_any(file: &[u8], min_gpa: u64, mem_size: u64) -> Result<ElfImage, ElfError> {
    if file.len() < 52 {
        return Err(ElfError::TooShort);
    }
    if file[..4] != *b"\x7fELF" {
        return Err(ElfError::BadMagic);
    }
    let l = match file[4] {
        1 => &ELF32,
        2 if file.len() >= 64 => &ELF64,
        2 => return Err(ElfError::TooShort),
        _ => return Err(ElfError::Unsupported("neither 32-bit nor 64-bit")),
    };
    if file[5] != 1 {
        return Err(ElfError::Unsupported("not little-endian"));
    }
    if u16_at(file, 16)? != 2 {
        return Err(ElfError::Unsupported(
            "not an executable (ET_EXEC); PIE/relocatable images are not loaded",
        ));
    }
    if u16_at(file, 18)? != l.machine {
        return Err(ElfError::Unsupported(match l.class {
            ElfClass::Elf64 => "not x86-64",
            ElfClass::Elf32 => "not i386",
        }));
    }
    let entry = l.word(file, l.entry)?;
    let phoff = l.word(file, l.phoff)?;
    let phentsize = u64::from(u16_at(file, l.phentsize)?);
    let phnum = u64::from(u16_at(file, l.phentsize + 2)?);
    if phentsize < l.phentsize_min {
        return Err(ElfError::Unsupported("program header entries too small"));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let at = phentsize
            .checked_mul(i)
            .and_then(|o| o.checked_add(phoff))
            .and_then(|o| usize::try_from(o).ok())
            .ok_or(ElfError::Truncated)?;
        if u32_at(file, at)? != PT_LOAD {
            continue;
        }
        let seg = Segment {
            offset: l.word(file, at.saturating_add(l.p_offset))?,
            gpa: l.word(file, at.saturating_add(l.p_paddr))?,
            filesz: l.word(file, at.saturating_add(l.p_filesz))?,
            memsz: l.word(file, at.saturating_add(l.p_memsz))?,
        };
        if seg.memsz == 0 {
            continue;
        }
        let file_end = seg
            .offset
            .checked_add(seg.filesz)
            .ok_or(ElfError::Truncated)?;
        if seg.filesz > seg.memsz || file_end > file.len() as u64 {
            return Err(ElfError::Truncated);
        }
        check_range(seg.gpa, seg.memsz, min_gpa, mem_size)?;
        segments.push(seg);
    }
    if segments.is_empty() {
        return Err(ElfError::NoLoadableSegment);
    }
    if !segments
        .iter()
        .any(|s| entry >= s.gpa && entry < s.gpa + s.memsz)
    {
        return Err(ElfError::BadEntry(entry));
    }
    Ok(ElfImage {
        class: l.class,
        entry,
        segments,
    })
}

/// `memsz` bytes at `gpa` must lie in `min_gpa..mem_size`.
pub(crate) fn check_range(
    gpa: u64,
    memsz: u64,
    min_gpa: u64,
    mem_size: u64,
) -> Result<(), ElfError> {
    let fits = gpa >= min_gpa && gpa.checked_add(memsz).is_some_and(|end| end <= mem_size);
    if fits {
        Ok(())
    } else {
        Err(ElfError::SegmentOutOfRange { gpa, memsz })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::vec;

    /// A minimal valid image: one PT_LOAD of 16 bytes at 1 MiB, entry at its start.
    pub fn tiny_elf() -> Vec<u8> {
        let mut f = vec![0u8; 0x100];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        f[ph + 8..ph + 16].copy_from_slice(&0xf0u64.to_le_bytes());
        f[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&0x2000u64.to_le_bytes());
        f[0xf0..0x100].copy_from_slice(&[0xf4; 16]);
        f
    }

    #[test]
    fn parses_a_valid_image() {
        let img = parse(&tiny_elf(), 0x10_0000, 4 << 20).unwrap();
        assert_eq!(img.entry, 0x10_0000);
        assert_eq!(
            img.segments,
            [Segment {
                gpa: 0x10_0000,
                offset: 0xf0,
                filesz: 16,
                memsz: 0x2000
            }]
        );
    }

    #[test]
    fn corrupt_images_are_errors() {
        assert_eq!(parse(b"short", 0, 1 << 20), Err(ElfError::TooShort));
        let mut f = tiny_elf();
        f[0] = 0;
        assert_eq!(parse(&f, 0x10_0000, 4 << 20), Err(ElfError::BadMagic));
        let mut f = tiny_elf();
        f[16] = 3; // ET_DYN
        assert!(matches!(
            parse(&f, 0x10_0000, 4 << 20),
            Err(ElfError::Unsupported(_))
        ));
        let mut f = tiny_elf();
        f[32..40].copy_from_slice(&u64::MAX.to_le_bytes()); // phoff
        assert_eq!(parse(&f, 0x10_0000, 4 << 20), Err(ElfError::Truncated));
        let mut f = tiny_elf();
        f[64 + 32..64 + 40].copy_from_slice(&0x1000u64.to_le_bytes()); // filesz past the file
        assert_eq!(parse(&f, 0x10_0000, 4 << 20), Err(ElfError::Truncated));
        // Too big for a 1 MiB + 4 KiB VM; below the minimum address; wrapping.
        assert!(matches!(
            parse(&tiny_elf(), 0x10_0000, 0x10_1000),
            Err(ElfError::SegmentOutOfRange { .. })
        ));
        assert!(matches!(
            parse(&tiny_elf(), 0x20_0000, 4 << 20),
            Err(ElfError::SegmentOutOfRange { .. })
        ));
        let mut f = tiny_elf();
        f[64 + 24..64 + 32].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
        assert!(matches!(
            parse(&f, 0, u64::MAX),
            Err(ElfError::SegmentOutOfRange { .. })
        ));
        let mut f = tiny_elf();
        f[24..32].copy_from_slice(&0x50_0000u64.to_le_bytes());
        assert_eq!(
            parse(&f, 0x10_0000, 8 << 20),
            Err(ElfError::BadEntry(0x50_0000))
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix and many bit flips of a valid image.
        let good = tiny_elf();
        for n in 0..good.len() {
            let _ = parse(&good[..n], 0, u64::MAX);
        }
        let mut x = 0x1234_5678u32;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let mut f = good.clone();
            let i = (x as usize) % f.len();
            f[i] ^= (x >> 24) as u8 | 1;
            let _ = parse(&f, 0, u64::MAX);
        }
    }
}
