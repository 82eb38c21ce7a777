//! A VM's guest-physical memory: page `n` of `0..size` is backed by a host frame, or, while the
//! memory engine holds it shared, patched or compressed, by a read-only frame or by nothing.
//!
//! Every copy between the hypervisor and a guest goes through [`GuestMemory::read`] and
//! [`GuestMemory::write`], which check the whole range against the VM's size first (with
//! overflow-safe arithmetic) and then split it at page boundaries, because consecutive guest
//! pages are not consecutive host frames. A range that is not entirely inside the VM's memory is
//! refused before a byte is copied, so a guest can only ever name its own memory. A range that
//! touches a page the engine has taken away (not present), or that would write a read-only page
//! (a frame shared with other VMs), is refused too, also before a byte is copied: the refusal,
//! `AccessError::Unavailable`, names the page, which the kernel has the engine fault in before
//! it retries.
//! This table mirrors the VM's EPT leaves; the kernel updates both together.

use alloc::vec::Vec;

use crate::frames::FRAME_SIZE;

/// Access to host-physical memory; the kernel implements it over its identity map.
pub trait PhysMemory {
    /// Copies `buf.len()` bytes from host-physical `hpa`; the range lies within one frame.
    fn read(&self, hpa: u64, buf: &mut [u8]);
    /// Copies `data` to host-physical `hpa`; the range lies within one frame.
    fn write(&mut self, hpa: u64, data: &[u8]);
}

/// A guest range is not entirely inside the VM's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRange {
    pub gpa: u64,
    pub len: u64,
}

/// Why a copy between the hypervisor and a guest was refused (nothing was copied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessError {
    /// The range is not entirely inside the VM's memory.
    OutOfRange(OutOfRange),
    /// The page at `gpa` is not present, or (for a write) not writable: the memory engine must
    /// fault it in first.
    Unavailable { gpa: u64 },
}

impl From<OutOfRange> for AccessError {
    fn from(e: OutOfRange) -> Self {
        Self::OutOfRange(e)
    }
}

/// How a guest page is backed right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageMapping {
    /// Host-physical address of the frame.
    pub hpa: u64,
    /// Whether the VM (and so the hypervisor on its behalf) may write it.
    pub writable: bool,
}

const PRESENT: u64 = 1;
const WRITABLE: u64 = 2;

#[derive(Debug, Default)]
pub struct GuestMemory {
    /// Per guest page: frame address | [`PRESENT`] | [`WRITABLE`]; 0 when not present.
    pages: Vec<u64>,
}

impl GuestMemory {
    /// Memory backed by `frames` (host-physical, 4 KiB aligned, one per 4 KiB guest page, in GPA
    /// order), all present and writable.
    pub fn new(frames: Vec<u64>) -> Self {
        let pages = frames
            .into_iter()
            .map(|hpa| {
                debug_assert_eq!(hpa % FRAME_SIZE, 0, "frames are 4 KiB aligned");
                hpa | PRESENT | WRITABLE
            })
            .collect();
        Self { pages }
    }

    /// Memory of `frames.len()` pages in which page `n` is backed by `frames[n]` (present and
    /// writable) or, for `None`, not present: memory allocated on demand, whose absent pages
    /// the memory engine registers as zero pages.
    pub fn sparse(frames: Vec<Option<u64>>) -> Self {
        // A fresh vector of exactly 8 bytes per page: collecting in place would keep the
        // 16-byte-per-page allocation of `frames` for the VM's life.
        let mut pages = Vec::with_capacity(frames.len());
        pages.extend(frames.into_iter().map(|f| {
            f.map_or(0, |hpa| {
                debug_assert_eq!(hpa % FRAME_SIZE, 0, "frames are 4 KiB aligned");
                hpa | PRESENT | WRITABLE
            })
        }));
        Self { pages }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.pages.len() as u64 * FRAME_SIZE
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.pages.len() as u64
    }

    /// How page `page` is backed; `None` if it is not present (or beyond the memory).
    pub fn page(&self, page: u64) -> Option<PageMapping> {
        let entry = *self.pages.get(usize::try_from(page).ok()?)?;
        (entry & PRESENT != 0).then_some(PageMapping {
            hpa: entry & !(FRAME_SIZE - 1),
            writable: entry & WRITABLE != 0,
        })
    }

    /// Records how page `page` is backed now (the caller has changed the EPT leaf to match).
    /// Pages beyond the memory are ignored.
    pub fn set_page(&mut self, page: u64, mapping: Option<PageMapping>) {
        let Some(entry) = usize::try_from(page)
            .ok()
            .and_then(|p| self.pages.get_mut(p))
        else {
            return;
        };
        *entry = match mapping {
            Some(m) => {
                debug_assert_eq!(m.hpa % FRAME_SIZE, 0, "frames are 4 KiB aligned");
                m.hpa | PRESENT | if m.writable { WRITABLE } else { 0 }
            }
            None => 0,
        };
    }

    /// The frames of the present pages, in guest page order (for freeing them with the VM).
    pub fn present_frames(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.pages()).filter_map(|p| self.page(p).map(|m| m.hpa))
    }

    /// Checks that `gpa..gpa+len` lies inside this VM's memory.
    pub fn check(&self, gpa: u64, len: u64) -> Result<(), OutOfRange> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(OutOfRange { gpa, len }),
        }
    }

    /// The host-physical address of `gpa`, if it is in this VM's memory and present.
    pub fn translate(&self, gpa: u64) -> Option<u64> {
        let m = self.page(gpa / FRAME_SIZE)?;
        Some(m.hpa + gpa % FRAME_SIZE)
    }

    /// The first page of the (checked) range that a copy could not use now: not present, or
    /// read-only when `write`. `Ok(None)` when the whole range is ready.
    pub fn first_unavailable(
        &self,
        gpa: u64,
        len: u64,
        write: bool,
    ) -> Result<Option<u64>, OutOfRange> {
        self.check(gpa, len)?;
        if len == 0 {
            return Ok(None);
        }
        let (first, last) = (gpa / FRAME_SIZE, (gpa + len - 1) / FRAME_SIZE);
        Ok((first..=last)
            .find(|&p| match self.page(p) {
                Some(m) => write && !m.writable,
                None => true,
            })
            .map(|p| (p * FRAME_SIZE).max(gpa)))
    }

    /// Calls `f(hpa, offset_in_range, chunk_len)` for each page-sized piece of a range that is
    /// in range and entirely available (checked before the first call).
    fn chunks(
        &self,
        gpa: u64,
        len: u64,
        write: bool,
        mut f: impl FnMut(u64, usize, usize),
    ) -> Result<(), AccessError> {
        if let Some(gpa) = self.first_unavailable(gpa, len, write)? {
            return Err(AccessError::Unavailable { gpa });
        }
        let mut done = 0u64;
        while done < len {
            let at = gpa + done;
            let n = (FRAME_SIZE - at % FRAME_SIZE).min(len - done);
            // first_unavailable found every page of the range present.
            let Some(hpa) = self.translate(at) else {
                return Err(AccessError::Unavailable { gpa: at });
            };
            f(hpa, done as usize, n as usize);
            done += n;
        }
        Ok(())
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(
        &self,
        phys: &impl PhysMemory,
        gpa: u64,
        buf: &mut [u8],
    ) -> Result<(), AccessError> {
        self.chunks(gpa, buf.len() as u64, false, |hpa, off, n| {
            phys.read(hpa, &mut buf[off..off + n])
        })
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(
        &self,
        phys: &mut impl PhysMemory,
        gpa: u64,
        data: &[u8],
    ) -> Result<(), AccessError> {
        self.chunks(gpa, data.len() as u64, true, |hpa, off, n| {
            phys.write(hpa, &data[off..off + n])
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::vec;

    /// Host memory as a flat vector; frame addresses index into it.
    pub struct FlatPhys(pub Vec<u8>);

    impl PhysMemory for FlatPhys {
        fn read(&self, hpa: u64, buf: &mut [u8]) {
            assert_eq!(
                hpa / FRAME_SIZE,
                (hpa + buf.len() as u64 - 1) / FRAME_SIZE,
                "crosses a frame"
            );
            buf.copy_from_slice(&self.0[hpa as usize..hpa as usize + buf.len()]);
        }
        fn write(&mut self, hpa: u64, data: &[u8]) {
            assert_eq!(
                hpa / FRAME_SIZE,
                (hpa + data.len() as u64 - 1) / FRAME_SIZE,
                "crosses a frame"
            );
            self.0[hpa as usize..hpa as usize + data.len()].copy_from_slice(data);
        }
    }

    /// A 3-page VM whose pages live in host frames 2, 0, 1 (out of order on purpose).
    pub fn scrambled() -> (GuestMemory, FlatPhys) {
        (
            GuestMemory::new(vec![2 * FRAME_SIZE, 0, FRAME_SIZE]),
            FlatPhys(vec![0; 3 * 4096]),
        )
    }

    #[test]
    fn copies_cross_pages_through_the_right_frames() {
        let (mem, mut phys) = scrambled();
        let data: Vec<u8> = (0..6000u32).map(|i| i as u8).collect();
        mem.write(&mut phys, 100, &data).unwrap();
        let mut back = vec![0; 6000];
        mem.read(&phys, 100, &mut back).unwrap();
        assert_eq!(back, data);
        // Guest page 0 is host frame 2.
        assert_eq!(phys.0[2 * 4096 + 100], 0);
        assert_eq!(phys.0[2 * 4096 + 101], 1);
        assert_eq!(mem.translate(4096 + 5), Some(5));
    }

    #[test]
    fn sparse_memory_refuses_its_absent_pages_until_they_are_mapped() {
        let mut mem = GuestMemory::sparse(vec![Some(FRAME_SIZE), None, Some(0)]);
        let mut phys = FlatPhys(vec![0; 2 * 4096]);
        assert_eq!(mem.pages(), 3);
        assert_eq!(mem.page(1), None);
        assert_eq!(
            mem.write(&mut phys, 4000, &[1; 200]),
            Err(AccessError::Unavailable { gpa: 4096 })
        );
        assert!(phys.0.iter().all(|&b| b == 0), "nothing copied");
        mem.write(&mut phys, 2 * 4096, b"ok").unwrap();
        assert_eq!(&phys.0[..2], b"ok");
        assert_eq!(mem.present_frames().collect::<Vec<_>>(), [FRAME_SIZE, 0]);
        mem.set_page(
            1,
            Some(PageMapping {
                hpa: FRAME_SIZE,
                writable: true,
            }),
        );
        assert!(mem.write(&mut phys, 4000, &[1; 200]).is_ok());
    }

    #[test]
    fn out_of_range_copies_touch_nothing() {
        let (mem, mut phys) = scrambled();
        for (gpa, len) in [
            (3 * 4096 - 1, 2u64),
            (u64::MAX - 1, 16),
            (3 * 4096, 1),
            (0, 3 * 4096 + 1),
        ] {
            let data = vec![0xaa; len.min(8192) as usize];
            if len as usize == data.len() {
                assert_eq!(
                    mem.write(&mut phys, gpa, &data),
                    Err(AccessError::OutOfRange(OutOfRange { gpa, len }))
                );
            }
            assert!(mem.check(gpa, len).is_err());
        }
        assert!(phys.0.iter().all(|&b| b == 0));
        assert_eq!(mem.check(0, 3 * 4096), Ok(()));
        assert_eq!(mem.check(3 * 4096, 0), Ok(()));
        assert_eq!(mem.translate(3 * 4096), None);
        assert_eq!(mem.translate(u64::MAX), None);
    }

    #[test]
    fn unavailable_pages_refuse_the_whole_copy() {
        let (mut mem, mut phys) = scrambled();
        // Page 1 taken away by the engine; page 2 shared read-only.
        mem.set_page(1, None);
        mem.set_page(
            2,
            Some(PageMapping {
                hpa: FRAME_SIZE,
                writable: false,
            }),
        );
        assert_eq!(mem.first_unavailable(0, 4096, true), Ok(None));
        assert_eq!(mem.first_unavailable(100, 5000, false), Ok(Some(4096)));
        assert_eq!(
            mem.first_unavailable(4096 + 7, 1, false),
            Ok(Some(4096 + 7))
        );
        assert_eq!(mem.first_unavailable(2 * 4096, 10, false), Ok(None));
        assert_eq!(
            mem.first_unavailable(2 * 4096 + 3, 10, true),
            Ok(Some(2 * 4096 + 3))
        );
        assert_eq!(mem.first_unavailable(5, 0, true), Ok(None));
        assert!(mem.first_unavailable(3 * 4096, 1, false).is_err());
        // A copy that touches page 1 copies nothing, not even the part in page 0.
        assert_eq!(
            mem.write(&mut phys, 4000, &[0xaa; 200]),
            Err(AccessError::Unavailable { gpa: 4096 })
        );
        let mut buf = [0u8; 200];
        assert_eq!(
            mem.read(&phys, 4000, &mut buf),
            Err(AccessError::Unavailable { gpa: 4096 })
        );
        // The hypervisor never writes a read-only (shared) frame, but may read it.
        assert_eq!(
            mem.write(&mut phys, 2 * 4096, &[1]),
            Err(AccessError::Unavailable { gpa: 2 * 4096 })
        );
        assert!(phys.0.iter().all(|&b| b == 0));
        assert_eq!(mem.read(&phys, 2 * 4096, &mut buf), Ok(()));
        assert_eq!(mem.translate(4096), None);
        assert_eq!(mem.translate(2 * 4096 + 1), Some(FRAME_SIZE + 1));
        assert_eq!(
            mem.present_frames().collect::<Vec<_>>(),
            [2 * FRAME_SIZE, FRAME_SIZE]
        );
        // Mapped back writable, the copy goes through.
        mem.set_page(
            1,
            Some(PageMapping {
                hpa: 0,
                writable: true,
            }),
        );
        assert_eq!(mem.write(&mut phys, 4000, &[0xaa; 200]), Ok(()));
        assert_eq!(
            mem.page(1),
            Some(PageMapping {
                hpa: 0,
                writable: true
            })
        );
        assert_eq!(mem.page(3), None);
    }
}
