//! Helpers shared by the integration tests.
#![allow(dead_code)]

use hv_mem::{Engine, Gfn, MemoryBackend, Page, PlainMemory, VmId, PAGE_SIZE};

/// xorshift64*: deterministic test data without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A page of random bytes: incompressible, unlike any other.
pub fn random_page(seed: u64) -> Page {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut p = [0u8; PAGE_SIZE];
    for w in p.chunks_exact_mut(8) {
        w.copy_from_slice(&r.next().to_le_bytes());
    }
    p
}

/// A page that compresses well (a few distinct words) but is not zero.
pub fn text_page(seed: u64) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    let words = [
        b"kernel ".as_slice(),
        b"page ",
        b"cache ",
        b"struct ",
        b"inode ",
    ];
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut at = 0;
    while at < PAGE_SIZE {
        let w = words[(r.next() % words.len() as u64) as usize];
        let n = w.len().min(PAGE_SIZE - at);
        p[at..at + n].copy_from_slice(&w[..n]);
        at += n;
    }
    p
}

/// Reads every page of `vm` through the engine (no fault-in) and compares with `expected`.
pub fn assert_vm(engine: &Engine, mem: &PlainMemory, vm: VmId, expected: &[Page]) {
    let mut buf = [0u8; PAGE_SIZE];
    for (gfn, want) in expected.iter().enumerate() {
        engine
            .read_page(mem, vm, Gfn(gfn as u64), &mut buf)
            .unwrap_or_else(|e| panic!("VM {} gfn {gfn}: {e}", vm.0));
        assert!(buf == *want, "VM {} gfn {gfn} differs", vm.0);
        if let Some(p) = mem.guest_page(vm, Gfn(gfn as u64)) {
            assert!(p == want, "VM {} gfn {gfn}: mapped bytes differ", vm.0);
        }
    }
}
