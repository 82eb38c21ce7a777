//! The CPU-bound kernel of the `busy` guest: a fixed amount of pure integer work.
//!
//! Each iteration is one xorshift64 step mixed into an accumulator with a rotate, an add and a
//! multiply: a serial dependency chain the compiler can neither vectorise nor shorten, no memory
//! traffic, no hypercalls. The result depends on every iteration, so the checksum a guest reports
//! also proves that its registers survived every preemption by the hypervisor; the expected values
//! are pinned by the tests below and in the scenarios.

/// Iterations when the command line gives no `work=N`.
pub const DEFAULT_WORK: u64 = 2_000_000;

/// Runs `iterations` rounds of the mix and returns the checksum.
pub fn busy_work(iterations: u64) -> u64 {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut acc: u64 = 0;
    for i in 0..iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc = (acc.rotate_left(5) ^ x.wrapping_add(i)).wrapping_mul(0x2545_F491_4F6C_DD1D);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_iterations_is_zero() {
        assert_eq!(busy_work(0), 0);
    }

    #[test]
    fn every_iteration_changes_the_checksum() {
        let mut seen = std::collections::HashSet::new();
        for n in 0..1000 {
            assert!(seen.insert(busy_work(n)), "collision at {n}");
        }
    }

    /// The checksums the scenarios expect (tests/scenarios/*/scenario.toml): if the kernel
    /// changes, update them together. Cross-checked against an independent Python model of the
    /// mix when they were pinned.
    #[test]
    fn pinned_checksums() {
        for (n, sum) in PINNED {
            assert_eq!(busy_work(n), sum, "work={n}");
        }
    }

    const PINNED: [(u64, u64); 5] = [
        (1, 8_359_755_829_403_592_089),
        (100_000, 10_519_454_173_271_762_100),
        (200_000, 6_565_384_279_910_488_276),
        (2_000_000, 299_784_421_694_476_187),
        (5_000_000, 16_116_937_862_670_734_878),
    ];
}
