//! Physical frame allocator: the usable RAM of the boot memory map minus what is in use (the
//! kernel image, the boot information, the modules), handed out in 4 KiB frames.
//!
//! Free memory is a sorted list of disjoint ranges, handed out from the top down, so that RAM
//! above 4 GiB is used before the low memory that boot-time structures (the heap, the kernel,
//! the modules) share; freed frames go on a stack and are reused first. Frames above `limit`
//! are ignored: the kernel only reaches memory through its identity map.

use alloc::vec::Vec;
use core::ops::Range;

pub const FRAME_SIZE: u64 = 4096;

#[derive(Debug, Default)]
pub struct FrameAllocator {
    ranges: Vec<Range<u64>>,
    freed: Vec<u64>,
    free_frames: u64,
}

impl FrameAllocator {
    /// `available`: RAM from the memory map; `reserved`: ranges in use; only frames wholly
    /// inside `available`, outside every `reserved` range and below `limit` are used.
    pub fn new(available: &[Range<u64>], reserved: &[Range<u64>], limit: u64) -> Self {
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for r in available {
            let start = r.start.div_ceil(FRAME_SIZE) * FRAME_SIZE;
            let end = (r.end.min(limit) / FRAME_SIZE) * FRAME_SIZE;
            if start < end {
                ranges.push(start..end);
            }
        }
        for res in reserved {
            let (rs, re) = (
                res.start / FRAME_SIZE * FRAME_SIZE,
                res.end.div_ceil(FRAME_SIZE) * FRAME_SIZE,
            );
            let mut next = Vec::with_capacity(ranges.len() + 1);
            for r in ranges.drain(..) {
                if re <= r.start || rs >= r.end {
                    next.push(r);
                    continue;
                }
                if r.start < rs {
                    next.push(r.start..rs);
                }
                if re < r.end {
                    next.push(re..r.end);
                }
            }
            ranges = next;
        }
        ranges.sort_by_key(|r| r.start);
        let free_frames = ranges.iter().map(|r| (r.end - r.start) / FRAME_SIZE).sum();
        Self {
            ranges,
            freed: Vec::new(),
            free_frames,
        }
    }

    /// A frame's physical address, or `None` when memory is exhausted. Not zeroed.
    pub fn alloc(&mut self) -> Option<u64> {
        let frame = match self.freed.pop() {
            Some(f) => f,
            None => {
                let r = self.ranges.last_mut()?;
                r.end -= FRAME_SIZE;
                let f = r.end;
                if r.start == r.end {
                    self.ranges.pop();
                }
                f
            }
        };
        self.free_frames -= 1;
        Some(frame)
    }

    /// Returns a frame obtained from [`alloc`](Self::alloc).
    pub fn free(&mut self, frame: u64) {
        debug_assert_eq!(frame % FRAME_SIZE, 0);
        self.freed.push(frame);
        self.free_frames += 1;
    }

    pub fn free_frames(&self) -> u64 {
        self.free_frames
    }

    pub fn free_bytes(&self) -> u64 {
        self.free_frames * FRAME_SIZE
    }
}

/// Bytes of the hypervisor's heap for a machine with `available` bytes of RAM: a sixteenth of it
/// (the memory engine keeps its metadata, patches and compressed pages there), at least 16 MiB
/// and at most 1 GiB, in whole 2 MiB.
pub const fn heap_bytes_for(available: u64) -> u64 {
    const MIN: u64 = 16 << 20;
    const MAX: u64 = 1 << 30;
    let bytes = available / 16;
    let bytes = if bytes < MIN {
        MIN
    } else if bytes > MAX {
        MAX
    } else {
        bytes
    };
    bytes / (2 << 20) * (2 << 20)
}

/// The highest `align`-aligned range of `size` bytes that lies wholly inside one `available`
/// range, below `limit`, and overlaps no `reserved` range. Allocation-free, because it places the
/// heap itself.
pub fn place_region(
    available: &[Range<u64>],
    reserved: &[Range<u64>],
    size: u64,
    align: u64,
    limit: u64,
) -> Option<Range<u64>> {
    let mut best: Option<Range<u64>> = None;
    for a in available {
        let mut end = a.end.min(limit);
        while let Some(start) = end.checked_sub(size).map(|s| s / align * align) {
            if start < a.start {
                break;
            }
            let candidate = start..start + size;
            // The lowest-starting reserved range in the way: below it is the next try.
            match reserved
                .iter()
                .filter(|r| r.start < candidate.end && candidate.start < r.end)
                .map(|r| r.start)
                .min()
            {
                Some(blocked) => end = blocked,
                None => {
                    if best.as_ref().is_none_or(|b| candidate.start > b.start) {
                        best = Some(candidate);
                    }
                    break;
                }
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn reserved_ranges_are_never_handed_out() {
        let mut a = FrameAllocator::new(
            &[0x1000..0x10_0000, 0x20_0000..0x40_0000],
            &[0x20_0000..0x30_0800, 0x3f_f000..0x40_0000],
            u64::MAX,
        );
        // 255 low frames + (0x301000..0x3ff000) = 254 frames.
        assert_eq!(a.free_frames(), 255 + 254);
        let mut got = vec![];
        while let Some(f) = a.alloc() {
            assert!(!(0x20_0000..0x30_1000).contains(&f), "{f:#x}");
            assert!(f < 0x3f_f000);
            got.push(f);
        }
        assert_eq!(got.len(), 509);
        got.sort();
        got.dedup();
        assert_eq!(got.len(), 509, "a frame was handed out twice");
    }

    #[test]
    fn unaligned_and_limited_ranges() {
        let a = FrameAllocator::new(
            &[0x1800..0x5800, 0x1_0000_0000..0x2_0000_0000],
            &[],
            0x1_0000_0000,
        );
        assert_eq!(a.free_frames(), 3); // 0x2000..0x5000
    }

    #[test]
    fn the_highest_frames_go_first() {
        let mut a = FrameAllocator::new(
            &[0x1000..0x3000, 0x1_0000_0000..0x1_0000_2000],
            &[],
            u64::MAX,
        );
        assert_eq!(a.alloc(), Some(0x1_0000_1000));
        assert_eq!(a.alloc(), Some(0x1_0000_0000));
        assert_eq!(a.alloc(), Some(0x2000));
        assert_eq!(a.alloc(), Some(0x1000));
        assert_eq!(a.alloc(), None);
    }

    #[test]
    fn freed_frames_are_reused() {
        let ram: Range<u64> = 0..0x3000;
        let mut a = FrameAllocator::new(core::slice::from_ref(&ram), &[], u64::MAX);
        let f = a.alloc().unwrap();
        a.alloc().unwrap();
        a.alloc().unwrap();
        assert_eq!(a.alloc(), None);
        a.free(f);
        assert_eq!(a.free_frames(), 1);
        assert_eq!(a.alloc(), Some(f));
    }

    #[test]
    fn heap_size_follows_the_machine() {
        const MIB: u64 = 1 << 20;
        assert_eq!(heap_bytes_for(0), 16 * MIB);
        assert_eq!(heap_bytes_for(256 * MIB), 16 * MIB);
        assert_eq!(heap_bytes_for(8192 * MIB), 512 * MIB);
        assert_eq!(heap_bytes_for(8200 * MIB), 512 * MIB); // whole 2 MiB
        assert_eq!(heap_bytes_for(1 << 40), 1024 * MIB);
    }

    #[test]
    fn region_goes_as_high_as_it_can_around_reserved_ranges() {
        const MIB: u64 = 1 << 20;
        let avail = [0x9_0000..0xa_0000, MIB..256 * MIB, 300 * MIB..310 * MIB];
        // Top of the largest fitting range, below the limit.
        assert_eq!(
            place_region(&avail, &[], 16 * MIB, 2 * MIB, 4 << 30),
            Some(240 * MIB..256 * MIB)
        );
        // The 10 MiB range at 300 MiB is higher and fits 8 MiB.
        assert_eq!(
            place_region(&avail, &[], 8 * MIB, 2 * MIB, 4 << 30),
            Some(302 * MIB..310 * MIB)
        );
        // Modules at the top push it down; a small hole between reserved ranges is skipped.
        let reserved = [2 * MIB..6 * MIB, 250 * MIB..251 * MIB, 236 * MIB..239 * MIB];
        assert_eq!(
            place_region(&avail[..2], &reserved, 16 * MIB, 2 * MIB, 4 << 30),
            Some(220 * MIB..236 * MIB)
        );
        // The limit clips the ranges; alignment rounds down.
        assert_eq!(
            place_region(&avail, &[], 3 * MIB, 2 * MIB, 100 * MIB + 5),
            Some(96 * MIB..99 * MIB)
        );
        // Nothing fits.
        assert_eq!(place_region(&avail, &[], 512 * MIB, 2 * MIB, 4 << 30), None);
        // Only the low range is left: its top page.
        let all_high = [MIB..256 * MIB, 300 * MIB..310 * MIB];
        assert_eq!(
            place_region(&avail, &all_high, 4096, 4096, 4 << 30),
            Some(0x9_f000..0xa_0000)
        );
        assert_eq!(
            place_region(&avail[1..], &all_high, 4096, 4096, 4 << 30),
            None
        );
        assert_eq!(place_region(&[], &[], 4096, 4096, 4 << 30), None);
    }
}
