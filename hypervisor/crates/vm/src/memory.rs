//! A VM's guest-physical memory: page `n` of `0..size` is backed by the host frame `frames[n]`.
//!
//! Every copy between the hypervisor and a guest goes through [`GuestMemory::read`] and
//! [`GuestMemory::write`], which check the whole range against the VM's size first (with
//! overflow-safe arithmetic) and then split it at page boundaries, because consecutive guest
//! pages are not consecutive host frames. A range that is not entirely inside the VM's memory is
//! refused before a byte is copied, so a guest can only ever name its own memory.

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

#[derive(Debug, Default)]
pub struct GuestMemory {
    frames: Vec<u64>,
}

impl GuestMemory {
    /// Memory backed by `frames` (host-physical, one per 4 KiB guest page, in GPA order).
    pub fn new(frames: Vec<u64>) -> Self {
        Self { frames }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.frames.len() as u64 * FRAME_SIZE
    }

    /// The backing frames, in guest page order.
    pub fn frames(&self) -> &[u64] {
        &self.frames
    }

    /// Takes the frames back (for freeing them).
    pub fn into_frames(self) -> Vec<u64> {
        self.frames
    }

    /// Checks that `gpa..gpa+len` lies inside this VM's memory.
    pub fn check(&self, gpa: u64, len: u64) -> Result<(), OutOfRange> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(OutOfRange { gpa, len }),
        }
    }

    /// The host-physical address of `gpa`, if it is in this VM's memory.
    pub fn translate(&self, gpa: u64) -> Option<u64> {
        let frame = *self.frames.get(usize::try_from(gpa / FRAME_SIZE).ok()?)?;
        Some(frame + gpa % FRAME_SIZE)
    }

    /// Calls `f(hpa, offset_in_range, chunk_len)` for each page-sized piece of a checked range.
    fn chunks(
        &self,
        gpa: u64,
        len: u64,
        mut f: impl FnMut(u64, usize, usize),
    ) -> Result<(), OutOfRange> {
        self.check(gpa, len)?;
        let mut done = 0u64;
        while done < len {
            let at = gpa + done;
            let n = (FRAME_SIZE - at % FRAME_SIZE).min(len - done);
            let hpa = self.frames[(at / FRAME_SIZE) as usize] + at % FRAME_SIZE;
            f(hpa, done as usize, n as usize);
            done += n;
        }
        Ok(())
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, phys: &impl PhysMemory, gpa: u64, buf: &mut [u8]) -> Result<(), OutOfRange> {
        self.chunks(gpa, buf.len() as u64, |hpa, off, n| {
            phys.read(hpa, &mut buf[off..off + n])
        })
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(
        &self,
        phys: &mut impl PhysMemory,
        gpa: u64,
        data: &[u8],
    ) -> Result<(), OutOfRange> {
        self.chunks(gpa, data.len() as u64, |hpa, off, n| {
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
                    Err(OutOfRange { gpa, len })
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
}
