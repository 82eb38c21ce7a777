//! Fault-in cost on raw guest-RAM images, sampled like `cargo xtask bench mem` does: after
//! convergence, pages in a fixed pseudo-random order, reads and writes alternating, the
//! engine's `fault` call timed by the wall clock (run it on a quiet machine). For A/B checks
//! of the fault path.
//!
//! ```text
//! cargo run --release -p hv-mem --example fault_cost -- IMAGE...
//! ```

use hv_mem::{Access, Config, DomainId, Engine, Gfn, PlainMemory, VmId, PAGE_SIZE};
use std::collections::BTreeMap;

fn main() {
    let mut paths: Vec<String> = std::env::args().skip(1).collect();
    let with_stats = paths.first().is_some_and(|a| a == "--stats");
    if with_stats {
        paths.remove(0);
    }
    let mut engine = Engine::new(Config::default()).unwrap();
    let mut mem = PlainMemory::new();
    let mut sizes = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let img = std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        mem.create_vm_from_image(VmId(i as u32), &img).unwrap();
        let n = (img.len() / PAGE_SIZE) as u64;
        engine.add_vm(VmId(i as u32), DomainId(0), n).unwrap();
        sizes.push(n);
    }
    engine.run_until_converged(&mut mem, 20).expect("converges");
    let total: u64 = sizes.iter().sum();
    let span = total.next_power_of_two();
    let mut lat: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut done = 0;
    for step in 0..span {
        if done >= 32_000 {
            break;
        }
        let mut idx = step.wrapping_mul(0x9E37_79B9_7F4A_7C15 | 1) & (span - 1);
        let Some(vm) = sizes.iter().position(|&n| {
            let here = idx < n;
            if !here {
                idx -= n;
            }
            here
        }) else {
            continue;
        };
        let (vm, gfn) = (VmId(vm as u32), Gfn(idx));
        let access = if step % 2 == 0 {
            Access::Read
        } else {
            Access::Write
        };
        let faults = match access {
            Access::Read => mem.guest_read(vm, gfn).is_err(),
            Access::Write => mem.guest_write(vm, gfn, 0, &[]).is_err(),
        };
        if !faults {
            continue;
        }
        let t = std::time::Instant::now();
        let r = engine.fault(&mut mem, vm, gfn, access).unwrap();
        let ns = t.elapsed().as_nanos() as u64;
        lat.entry(format!("{r:?} ({access:?})"))
            .or_default()
            .push(ns);
        if with_stats && r == hv_mem::FaultResolution::CopiedOnWrite {
            // What the benchmark does between samples (to tell shared from compressed).
            std::hint::black_box(engine.stats());
        }
        done += 1;
    }
    for (kind, mut v) in lat {
        v.sort_unstable();
        let p = |q: f64| v[((v.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
        println!(
            "{kind:>32}: n={:>6} p50 {:>6.2} us p99 {:>6.2} us",
            v.len(),
            p(0.5),
            p(0.99)
        );
    }
}
