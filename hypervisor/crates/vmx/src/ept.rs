//! Extended page tables: a 4-level EPT with 4 KiB leaves (SDM Vol. 3C, 29.3).
//!
//! The builder never touches memory itself: [`FrameSource`] hands it zeroed frames and a view of
//! a table frame by its host-physical address. The kernel implements it over its identity map;
//! the tests implement it over a `Vec`. Guest memory is mapped in 4 KiB pages because the memory
//! engine shares, patches and compresses 4 KiB pages.

/// Access rights of an EPT entry (bits 2:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptPerms(pub u8);

impl EptPerms {
    pub const NONE: Self = Self(0);
    pub const READ: Self = Self(1);
    pub const WRITE: Self = Self(2);
    pub const EXECUTE: Self = Self(4);
    pub const RWX: Self = Self(7);
    pub const RX: Self = Self(5);

    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

/// Leaf memory type write-back (bits 5:3 = 6, SDM 29.3.7).
const MEMORY_TYPE_WB: u64 = 6 << 3;
const ACCESSED: u64 = 1 << 8;
const DIRTY: u64 = 1 << 9;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Guest-physical addresses are 48 bits with a 4-level walk.
pub const GPA_LIMIT: u64 = 1 << 48;

/// Where table frames come from.
pub trait FrameSource {
    /// A zero-filled 4 KiB frame, by host-physical address; `None` when memory is exhausted.
    fn alloc_table(&mut self) -> Option<u64>;
    /// The table stored in the frame at host-physical `hpa` (a frame from `alloc_table`).
    fn table(&mut self, hpa: u64) -> &mut [u64; 512];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptError {
    OutOfFrames,
    /// The address is not 4 KiB aligned or not below [`GPA_LIMIT`] (or the HPA is over 52 bits).
    BadAddress(u64),
}

impl core::fmt::Display for EptError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfFrames => f.write_str("out of frames for EPT tables"),
            Self::BadAddress(a) => write!(f, "bad EPT address {a:#x}"),
        }
    }
}

/// A leaf mapping found by [`Ept::translate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub hpa: u64,
    pub perms: EptPerms,
    pub accessed: bool,
    pub dirty: bool,
}

/// One guest's EPT hierarchy, identified by its PML4's host-physical address.
#[derive(Debug)]
pub struct Ept {
    pml4: u64,
}

const fn index(gpa: u64, level: u32) -> usize {
    ((gpa >> (12 + 9 * level)) & 0x1ff) as usize
}

impl Ept {
    pub fn new(frames: &mut impl FrameSource) -> Result<Self, EptError> {
        Ok(Self {
            pml4: frames.alloc_table().ok_or(EptError::OutOfFrames)?,
        })
    }

    pub const fn pml4(&self) -> u64 {
        self.pml4
    }

    /// The EPT pointer for the VMCS (SDM 25.6.11): WB paging structures, walk length 4, and the
    /// accessed/dirty enable when `ad`.
    pub const fn eptp(&self, ad: bool) -> u64 {
        self.pml4 | 6 | (3 << 3) | if ad { 1 << 6 } else { 0 }
    }

    fn check(gpa: u64, hpa: u64) -> Result<(), EptError> {
        if !gpa.is_multiple_of(4096) || gpa >= GPA_LIMIT {
            return Err(EptError::BadAddress(gpa));
        }
        if hpa & !ADDR_MASK != 0 {
            return Err(EptError::BadAddress(hpa));
        }
        Ok(())
    }

    /// The leaf entry slot for `gpa`, creating intermediate tables when `create`.
    fn leaf_slot(
        &self,
        frames: &mut impl FrameSource,
        gpa: u64,
        create: bool,
    ) -> Result<Option<(u64, usize)>, EptError> {
        let mut table = self.pml4;
        for level in (1..4).rev() {
            let i = index(gpa, level);
            let entry = frames.table(table)[i];
            table = if entry & 0b111 != 0 {
                entry & ADDR_MASK
            } else if create {
                let next = frames.alloc_table().ok_or(EptError::OutOfFrames)?;
                // Non-leaf entries grant everything; the leaf decides (SDM 29.3.2).
                frames.table(table)[i] = next | EptPerms::RWX.0 as u64;
                next
            } else {
                return Ok(None);
            };
        }
        Ok(Some((table, index(gpa, 0))))
    }

    /// Maps the 4 KiB page at `gpa` to `hpa` with `perms`, write-back; replaces any earlier
    /// mapping (the caller invalidates cached translations with INVEPT).
    pub fn map(
        &mut self,
        frames: &mut impl FrameSource,
        gpa: u64,
        hpa: u64,
        perms: EptPerms,
    ) -> Result<(), EptError> {
        Self::check(gpa, hpa)?;
        let (table, i) = self.leaf_slot(frames, gpa, true)?.expect("created");
        frames.table(table)[i] = hpa | MEMORY_TYPE_WB | perms.0 as u64;
        Ok(())
    }

    /// Creates the tables down to the leaf table of `gpa` and leaves its entry as it is (not
    /// present for a new EPT): a page mapped later then needs no allocation.
    pub fn prepare(&mut self, frames: &mut impl FrameSource, gpa: u64) -> Result<(), EptError> {
        Self::check(gpa, 0)?;
        self.leaf_slot(frames, gpa, true).map(|_| ())
    }

    /// Removes the mapping of `gpa`; returns what it was.
    pub fn unmap(&mut self, frames: &mut impl FrameSource, gpa: u64) -> Option<Mapping> {
        let old = self.translate(frames, gpa)?;
        let (table, i) = self.leaf_slot(frames, gpa & !0xfff, false).ok()??;
        frames.table(table)[i] = 0;
        Some(old)
    }

    /// Walks the tables like the CPU does and returns the leaf mapping of `gpa`, if any.
    pub fn translate(&self, frames: &mut impl FrameSource, gpa: u64) -> Option<Mapping> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        let (table, i) = self.leaf_slot(frames, gpa & !0xfff, false).ok()??;
        let e = frames.table(table)[i];
        if e & 0b111 == 0 {
            return None;
        }
        Some(Mapping {
            hpa: (e & ADDR_MASK) | (gpa & 0xfff),
            perms: EptPerms((e & 0b111) as u8),
            accessed: e & ACCESSED != 0,
            dirty: e & DIRTY != 0,
        })
    }

    /// Reads and clears the accessed flag (bit 8) of the leaf of `gpa`; `None` if not mapped.
    /// The flags are only written by the CPU when the EPTP enables them (SDM 29.3.5); clearing
    /// one takes effect for the guest after the next INVEPT, which the caller issues.
    pub fn take_accessed(&mut self, frames: &mut impl FrameSource, gpa: u64) -> Option<bool> {
        self.take_flag(frames, gpa, ACCESSED)
    }

    /// Reads and clears the dirty flag (bit 9) of the leaf of `gpa`; as [`Self::take_accessed`].
    pub fn take_dirty(&mut self, frames: &mut impl FrameSource, gpa: u64) -> Option<bool> {
        self.take_flag(frames, gpa, DIRTY)
    }

    fn take_flag(&mut self, frames: &mut impl FrameSource, gpa: u64, flag: u64) -> Option<bool> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        let (table, i) = self.leaf_slot(frames, gpa & !0xfff, false).ok()??;
        let entry = &mut frames.table(table)[i];
        if *entry & 0b111 == 0 {
            return None;
        }
        let was = *entry & flag != 0;
        *entry &= !flag;
        Some(was)
    }

    /// Every table frame of this hierarchy (PML4 included), for freeing the EPT.
    pub fn table_frames(&self, frames: &mut impl FrameSource, out: &mut impl FnMut(u64)) {
        fn walk(frames: &mut impl FrameSource, table: u64, level: u32, out: &mut impl FnMut(u64)) {
            if level > 0 {
                for i in 0..512 {
                    let e = frames.table(table)[i];
                    if e & 0b111 != 0 {
                        walk(frames, e & ADDR_MASK, level - 1, out);
                    }
                }
            }
            out(table);
        }
        walk(frames, self.pml4, 3, out);
    }
}

#[cfg(test)]
mod tests {
    extern crate alloc;
    extern crate std;
    use super::*;
    use alloc::vec::Vec;

    /// Frames at fake host-physical addresses 0x1000, 0x2000, ...
    struct VecFrames {
        tables: Vec<[u64; 512]>,
        limit: usize,
    }

    impl FrameSource for VecFrames {
        fn alloc_table(&mut self) -> Option<u64> {
            if self.tables.len() == self.limit {
                return None;
            }
            self.tables.push([0; 512]);
            Some(self.tables.len() as u64 * 4096)
        }
        fn table(&mut self, hpa: u64) -> &mut [u64; 512] {
            &mut self.tables[(hpa / 4096) as usize - 1]
        }
    }

    fn frames() -> VecFrames {
        VecFrames {
            tables: Vec::new(),
            limit: 64,
        }
    }

    #[test]
    fn map_then_walk_finds_every_mapping() {
        let mut f = frames();
        let mut ept = Ept::new(&mut f).unwrap();
        let pages: Vec<(u64, u64)> = (0..600u64)
            .map(|i| (i * 4096, 0x4000_0000 + i * 0x3000))
            .collect();
        for &(gpa, hpa) in &pages {
            ept.map(&mut f, gpa, hpa, EptPerms::RWX).unwrap();
        }
        // Far-apart addresses use other PDPT/PML4 slots.
        ept.map(&mut f, 0x7f_ffff_f000, 0x1234_5000, EptPerms::READ)
            .unwrap();
        for &(gpa, hpa) in &pages {
            let m = ept.translate(&mut f, gpa + 0x10).unwrap();
            assert_eq!(m.hpa, hpa + 0x10);
            assert_eq!(m.perms, EptPerms::RWX);
        }
        let m = ept.translate(&mut f, 0x7f_ffff_f008).unwrap();
        assert_eq!((m.hpa, m.perms), (0x1234_5008, EptPerms::READ));
        assert_eq!(ept.translate(&mut f, 600 * 4096), None);
        assert_eq!(ept.translate(&mut f, GPA_LIMIT), None);
    }

    #[test]
    fn leaf_entries_are_write_back_and_non_leaf_grant_all() {
        let mut f = frames();
        let mut ept = Ept::new(&mut f).unwrap();
        ept.map(&mut f, 0x20_0000, 0x9000, EptPerms::RX).unwrap();
        let pml4e = f.table(ept.pml4())[0];
        assert_eq!(pml4e & 7, 7);
        let pdpte = f.table(pml4e & ADDR_MASK)[0];
        let pde = f.table(pdpte & ADDR_MASK)[1];
        let pte = f.table(pde & ADDR_MASK)[0];
        assert_eq!(pte, 0x9000 | (6 << 3) | 5);
        assert_eq!(ept.eptp(true) & 0xfff, 0x5e);
        assert_eq!(ept.eptp(false) & 0xfff, 0x1e);
    }

    #[test]
    fn prepared_pages_are_absent_and_map_without_allocating() {
        let mut f = frames();
        let mut ept = Ept::new(&mut f).unwrap();
        ept.prepare(&mut f, 0x40_0000).unwrap();
        let tables = f.tables.len();
        assert_eq!(ept.translate(&mut f, 0x40_0000), None);
        f.limit = tables; // no frame left: mapping must not need one
        ept.map(&mut f, 0x40_0000, 0x9000, EptPerms::RWX).unwrap();
        ept.map(&mut f, 0x40_1000, 0x9000, EptPerms::RWX).unwrap();
        assert_eq!(ept.translate(&mut f, 0x40_0000).unwrap().hpa, 0x9000);
        assert!(ept.prepare(&mut f, 0x123).is_err(), "not page aligned");
    }

    #[test]
    fn remap_and_unmap() {
        let mut f = frames();
        let mut ept = Ept::new(&mut f).unwrap();
        ept.map(&mut f, 0x1000, 0x5000, EptPerms::RWX).unwrap();
        ept.map(&mut f, 0x1000, 0x6000, EptPerms::READ).unwrap();
        assert_eq!(ept.translate(&mut f, 0x1000).unwrap().hpa, 0x6000);
        assert_eq!(ept.unmap(&mut f, 0x1000).unwrap().hpa, 0x6000);
        assert_eq!(ept.translate(&mut f, 0x1000), None);
        assert_eq!(ept.unmap(&mut f, 0x1000), None);
    }

    #[test]
    fn bad_addresses_and_exhaustion_are_errors() {
        let mut f = frames();
        let mut ept = Ept::new(&mut f).unwrap();
        assert_eq!(
            ept.map(&mut f, 0x1001, 0x5000, EptPerms::RWX),
            Err(EptError::BadAddress(0x1001))
        );
        assert_eq!(
            ept.map(&mut f, GPA_LIMIT, 0x5000, EptPerms::RWX),
            Err(EptError::BadAddress(GPA_LIMIT))
        );
        assert_eq!(
            ept.map(&mut f, 0, 1 << 60, EptPerms::RWX),
            Err(EptError::BadAddress(1 << 60))
        );
        let mut tiny = VecFrames {
            tables: Vec::new(),
            limit: 2,
        };
        let mut ept = Ept::new(&mut tiny).unwrap();
        assert_eq!(
            ept.map(&mut tiny, 0, 0x5000, EptPerms::RWX),
            Err(EptError::OutOfFrames)
        );
    }

    #[test]
    fn table_frames_lists_each_table_once() {
        let mut f = frames();
        let mut ept = Ept::new(&mut f).unwrap();
        for i in 0..1024u64 {
            ept.map(&mut f, i * 4096, 0x10_0000, EptPerms::RWX).unwrap();
        }
        let mut seen = Vec::new();
        ept.table_frames(&mut f, &mut |t| seen.push(t));
        // PML4 + PDPT + PD + 2 PTs.
        assert_eq!(seen.len(), 5);
        assert_eq!(*seen.last().unwrap(), ept.pml4());
    }

    #[test]
    fn accessed_and_dirty_flags_are_read_and_cleared_per_leaf() {
        let mut f = frames();
        let mut ept = Ept::new(&mut f).unwrap();
        ept.map(&mut f, 0x5000, 0x9_0000, EptPerms::RWX).unwrap();
        ept.map(&mut f, 0x6000, 0xa_0000, EptPerms::RX).unwrap();
        // What the CPU does on a guest write to 0x5000 (SDM 29.3.5): set A and D in the leaf.
        let (table, i) = ept.leaf_slot(&mut f, 0x5000, false).unwrap().unwrap();
        f.table(table)[i] |= ACCESSED | DIRTY;
        assert_eq!(ept.take_accessed(&mut f, 0x5123), Some(true));
        assert_eq!(ept.take_accessed(&mut f, 0x5000), Some(false));
        assert_eq!(ept.take_dirty(&mut f, 0x5000), Some(true));
        assert_eq!(ept.take_dirty(&mut f, 0x5000), Some(false));
        // The neighbour's flags and every mapping stay as they were.
        assert_eq!(ept.take_accessed(&mut f, 0x6000), Some(false));
        let m = ept.translate(&mut f, 0x5000).unwrap();
        assert_eq!((m.hpa, m.perms), (0x9_0000, EptPerms::RWX));
        // Not mapped: no flag to read.
        assert_eq!(ept.take_accessed(&mut f, 0x7000), None);
        assert_eq!(ept.take_dirty(&mut f, GPA_LIMIT), None);
        ept.unmap(&mut f, 0x6000);
        assert_eq!(ept.take_accessed(&mut f, 0x6000), None);
    }
}
