//! Scan cost per round on raw guest-RAM images (one file per VM): CPU time of each round
//! (from `/proc/thread-self/schedstat`, so it includes kernel time the scan causes), net
//! savings and metadata after it. For profiling the scanner (`perf record -D <ms>` skips the
//! image loading, whose time this prints first).
//!
//! ```text
//! cargo run --release -p hv-mem --example scan_cost -- [--rounds N] [--pause-ms M] IMAGE...
//! ```

use hv_mem::{Config, DomainId, Engine, PlainMemory, VmId, PAGE_SIZE};
use std::time::Instant;

/// CPU nanoseconds this thread has run (user + system).
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// (user, system) CPU seconds of this thread, at clock-tick resolution.
fn user_sys() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    match f[..] {
        [u, s] => (u / 100.0, s / 100.0),
        _ => (0.0, 0.0),
    }
}

fn main() {
    let mut paths: Vec<String> = std::env::args().skip(1).collect();
    let (mut max_rounds, mut pause_ms) = (20, 0);
    while paths.first().is_some_and(|a| a.starts_with("--")) {
        let n: u64 = paths
            .get(1)
            .and_then(|n| n.parse().ok())
            .expect("option needs a number");
        match paths[0].as_str() {
            "--rounds" => max_rounds = n,
            "--pause-ms" => pause_ms = n,
            other => panic!("unknown option {other}"),
        }
        paths.drain(..2);
    }
    let t = Instant::now();
    let mut engine = Engine::new(Config::default()).unwrap();
    let mut mem = PlainMemory::new();
    for (i, p) in paths.iter().enumerate() {
        let img = std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        mem.create_vm_from_image(VmId(i as u32), &img).unwrap();
        engine
            .add_vm(VmId(i as u32), DomainId(0), (img.len() / PAGE_SIZE) as u64)
            .unwrap();
    }
    println!("loaded in {} ms", t.elapsed().as_millis());
    // Lets a profiler started with a delay skip the loading.
    std::thread::sleep(std::time::Duration::from_millis(pause_ms));
    let total = engine.stats().unmanaged_bytes() as i64;
    // Each round a coldness threshold after the previous one, as in `run_until_converged`.
    let span = engine.config().cold_span_us();
    for round in 1..=max_rounds {
        engine.advance_time(span);
        let c = cpu_ns();
        let (u0, s0) = user_sys();
        engine.scan_round(&mut mem);
        let dt = (cpu_ns() - c) as f64 * 1e-9;
        let (u1, s1) = user_sys();
        let s = engine.stats();
        println!(
            "round {round}: {dt:.3} CPU-s (user {:.2}, sys {:.2}), saved {:.1} MiB net, metadata {:.2} MiB, blob heap {:.1} MiB",
            u1 - u0,
            s1 - s0,
            (total - s.footprint_bytes() as i64) as f64 / 1048576.0,
            s.bytes_metadata as f64 / 1048576.0,
            s.bytes_blob_heap as f64 / 1048576.0,
        );
        if engine.converged() {
            break;
        }
    }
}
