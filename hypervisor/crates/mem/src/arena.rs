//! The blob store: where patches and compressed pages live.
//!
//! A blob is up to a page and a bit of bytes. Storing each in its own heap allocation would
//! cost an allocator round trip per page and, on the hypervisor's simple heap, a walk of a free
//! list. Instead blobs live in size classes of [`GRAIN`]-byte slots carved out of
//! [`CHUNK_BYTES`] chunks (like zsmalloc's classes): storing is a free-list pop and a copy,
//! freeing is a push. A slot holds a 2-byte length and the bytes. Chunks are allocated
//! fallibly, so running out of heap makes a store fail (the page simply stays as it was)
//! instead of aborting.

use alloc::boxed::Box;
use alloc::vec::Vec;

/// Slot size granularity in bytes.
pub const GRAIN: usize = 32;
/// Bytes per chunk (at least four slots for the largest class).
pub const CHUNK_BYTES: usize = 16 * 1024;
/// Largest blob the store accepts.
pub const MAX_BLOB: usize = 4096 + 64;
const LEN_BYTES: usize = 2;
const CLASSES: usize = (MAX_BLOB + LEN_BYTES).div_ceil(GRAIN);
const INDEX_BITS: u32 = 24;
const INDEX_MASK: u32 = (1 << INDEX_BITS) - 1;

/// A handle to a stored blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobRef(u32);

impl BlobRef {
    /// Raw handle, for packing into page metadata.
    pub fn raw(self) -> u32 {
        self.0
    }

    /// Rebuilds a handle from [`BlobRef::raw`].
    pub fn from_raw(raw: u32) -> Self {
        BlobRef(raw)
    }
}

/// Why a blob could not be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The blob is larger than [`MAX_BLOB`].
    TooLarge,
    /// The heap refused a new chunk, or a class ran out of slot numbers.
    NoMemory,
}

struct Class {
    slot: usize,
    per_chunk: usize,
    chunks: Vec<Box<[u8]>>,
    free: Vec<u32>,
    /// Slots handed out so far from the chunks (the bump pointer).
    used: usize,
}

impl Class {
    fn new(index: usize) -> Self {
        let slot = (index + 1) * GRAIN;
        Class {
            slot,
            per_chunk: (CHUNK_BYTES / slot).max(4),
            chunks: Vec::new(),
            free: Vec::new(),
            used: 0,
        }
    }

    fn slot_mut(&mut self, index: u32) -> &mut [u8] {
        let index = index as usize;
        let chunk = &mut self.chunks[index / self.per_chunk];
        let off = (index % self.per_chunk) * self.slot;
        &mut chunk[off..off + self.slot]
    }

    fn slot(&self, index: u32) -> Option<&[u8]> {
        let index = index as usize;
        let chunk = self.chunks.get(index / self.per_chunk)?;
        let off = (index % self.per_chunk) * self.slot;
        chunk.get(off..off + self.slot)
    }

    fn alloc(&mut self) -> Result<u32, StoreError> {
        if let Some(i) = self.free.pop() {
            return Ok(i);
        }
        if self.used > INDEX_MASK as usize {
            return Err(StoreError::NoMemory);
        }
        if self.used == self.chunks.len() * self.per_chunk {
            let bytes = self.per_chunk * self.slot;
            let mut v: Vec<u8> = Vec::new();
            v.try_reserve_exact(bytes)
                .map_err(|_| StoreError::NoMemory)?;
            v.resize(bytes, 0);
            self.chunks
                .try_reserve(1)
                .map_err(|_| StoreError::NoMemory)?;
            self.chunks.push(v.into_boxed_slice());
        }
        // Reserve room to free every handed-out slot later without allocating on the free path.
        self.free
            .try_reserve(self.used + 1 - self.free.len())
            .map_err(|_| StoreError::NoMemory)?;
        let i = self.used as u32;
        self.used += 1;
        Ok(i)
    }
}

/// Size-classed storage for variable-length blobs.
pub struct BlobArena {
    classes: Vec<Class>,
    /// Heap bytes the store may hold ([`Self::heap_bytes`]); a store that would need a new
    /// chunk past it fails as if the heap were full.
    limit_bytes: usize,
    /// Sum of the lengths of live blobs.
    live_bytes: usize,
    live_blobs: usize,
}

impl Default for BlobArena {
    fn default() -> Self {
        Self::new()
    }
}

impl BlobArena {
    /// An empty store. Allocates only the class table.
    pub fn new() -> Self {
        Self::with_limit(usize::MAX)
    }

    /// An empty store that holds at most `limit_bytes` of heap (chunks and free lists).
    pub fn with_limit(limit_bytes: usize) -> Self {
        BlobArena {
            classes: (0..CLASSES).map(Class::new).collect(),
            limit_bytes,
            live_blobs: 0,
            live_bytes: 0,
        }
    }

    /// Changes the limit: later stores that need a new chunk past it fail; what is stored
    /// stays.
    pub fn set_limit(&mut self, limit_bytes: usize) {
        self.limit_bytes = limit_bytes;
    }

    fn class_of(len: usize) -> usize {
        (len + LEN_BYTES).div_ceil(GRAIN) - 1
    }

    /// Stores the concatenation of `parts`.
    pub fn store(&mut self, parts: &[&[u8]]) -> Result<BlobRef, StoreError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > MAX_BLOB {
            return Err(StoreError::TooLarge);
        }
        let c = Self::class_of(len);
        let class = &self.classes[c];
        let needs_chunk =
            class.free.is_empty() && class.used == class.chunks.len() * class.per_chunk;
        if needs_chunk && self.limit_bytes != usize::MAX {
            // The new chunk, and room in the free list for every slot of it.
            let grows = class.per_chunk * (class.slot + 4);
            if self.heap_bytes().saturating_add(grows) > self.limit_bytes {
                return Err(StoreError::NoMemory);
            }
        }
        let class = &mut self.classes[c];
        let index = class.alloc()?;
        let slot = class.slot_mut(index);
        slot[..LEN_BYTES].copy_from_slice(&(len as u16).to_le_bytes());
        let mut at = LEN_BYTES;
        for p in parts {
            slot[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        self.live_bytes += len;
        self.live_blobs += 1;
        Ok(BlobRef(((c as u32) << INDEX_BITS) | index))
    }

    /// The bytes of a blob. `None` only for a handle this store never gave out.
    pub fn get(&self, blob: BlobRef) -> Option<&[u8]> {
        let class = self.classes.get((blob.0 >> INDEX_BITS) as usize)?;
        let slot = class.slot(blob.0 & INDEX_MASK)?;
        let len = u16::from_le_bytes([slot[0], slot[1]]) as usize;
        slot.get(LEN_BYTES..LEN_BYTES + len)
    }

    /// Frees a blob. The handle must be live.
    pub fn free(&mut self, blob: BlobRef) {
        let len = self.get(blob).map_or(0, <[u8]>::len);
        let class = &mut self.classes[(blob.0 >> INDEX_BITS) as usize];
        // Cannot allocate: `alloc` reserved room for every slot it handed out.
        class.free.push(blob.0 & INDEX_MASK);
        self.live_bytes -= len;
        self.live_blobs -= 1;
    }

    /// Sum of the lengths of live blobs.
    pub fn live_bytes(&self) -> usize {
        self.live_bytes
    }

    /// Number of live blobs.
    pub fn live_blobs(&self) -> usize {
        self.live_blobs
    }

    /// Heap bytes the store holds: chunks (including unused slots and slot rounding) and free
    /// lists.
    pub fn heap_bytes(&self) -> usize {
        self.classes
            .iter()
            .map(|c| c.chunks.len() * c.per_chunk * c.slot + c.free.capacity() * 4)
            .sum::<usize>()
            + self.classes.capacity() * core::mem::size_of::<Class>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_get_free_reuse() {
        let mut a = BlobArena::new();
        let x = a.store(&[b"hello", b" world"]).unwrap();
        let y = a.store(&[&[7u8; 4000]]).unwrap();
        let z = a.store(&[]).unwrap();
        assert_eq!(a.get(x).unwrap(), b"hello world");
        assert_eq!(a.get(y).unwrap(), &[7u8; 4000][..]);
        assert_eq!(a.get(z).unwrap(), b"");
        assert_eq!(a.live_bytes(), 4011);
        assert_eq!(a.live_blobs(), 3);
        a.free(x);
        let w = a.store(&[b"again"]).unwrap();
        assert_eq!(w, x, "slot reused");
        assert_eq!(a.get(w).unwrap(), b"again");
        assert_eq!(a.store(&[&[0u8; MAX_BLOB + 1]]), Err(StoreError::TooLarge));
        a.store(&[&[0u8; MAX_BLOB]]).unwrap();
        assert!(a.heap_bytes() >= a.live_bytes());
    }

    #[test]
    fn many_blobs_span_chunks() {
        let mut a = BlobArena::new();
        let refs: Vec<_> = (0..2000u32)
            .map(|i| a.store(&[&i.to_le_bytes(), &[i as u8; 40]]).unwrap())
            .collect();
        for (i, r) in refs.iter().enumerate() {
            let b = a.get(*r).unwrap();
            assert_eq!(&b[..4], &(i as u32).to_le_bytes());
            assert_eq!(b.len(), 44);
        }
        for r in refs {
            a.free(r);
        }
        assert_eq!(a.live_bytes(), 0);
    }

    #[test]
    fn the_store_stays_within_its_limit_and_frees_room_again() {
        let limit = 256 * 1024;
        let mut a = BlobArena::with_limit(limit);
        let mut refs = Vec::new();
        while let Ok(r) = a.store(&[&[1u8; 3000]]) {
            refs.push(r);
            assert!(a.heap_bytes() <= limit, "{} over the limit", a.heap_bytes());
        }
        assert!(
            refs.len() > 40,
            "it filled most of the limit: {}",
            refs.len()
        );
        assert_eq!(a.store(&[&[1u8; 3000]]), Err(StoreError::NoMemory));
        // Freed slots are reused without growing.
        a.free(refs.pop().unwrap());
        a.store(&[&[2u8; 3000]]).unwrap();
        // Another size class has no chunk yet, and none fits.
        assert_eq!(a.store(&[b"small"]), Err(StoreError::NoMemory));
    }
}
