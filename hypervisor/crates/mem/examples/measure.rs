//! Measures the engine on raw guest-RAM images (one file per VM): scan throughput, savings
//! compared with a KSM-like sharing-only configuration, and fault-in latency by kind.
//!
//! ```text
//! cargo run --release -p hv-mem --example measure -- [options] IMAGE...
//!   --domains N           spread the VMs over N sharing domains (default 1)
//!   --patch-cutoff B      Config::patch_cutoff
//!   --compress-cutoff B   Config::compress_cutoff
//!   --sim-blocks N / --sim-entries N / --candidates N   similarity knobs
//!   --no-patching / --no-compression / --no-codec-profile
//!   --synthetic VMS:MIB   instead of images, VMs of generated pages (no real-guest claim)
//! ```
//!
//! This is the crate's own tuning tool; the project's benchmark lives in xtask.

use hv_mem::{Access, Config, DomainId, Engine, Gfn, Page, PlainMemory, VmId, PAGE_SIZE};
use std::time::Instant;

struct Args {
    images: Vec<String>,
    domains: u32,
    config: Config,
    synthetic: Option<(u32, usize)>,
    codec_profile: bool,
}

fn parse() -> Args {
    let mut a = Args {
        images: Vec::new(),
        domains: 1,
        config: Config::default(),
        synthetic: None,
        codec_profile: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |what: &str| -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{what} needs a number"))
        };
        match arg.as_str() {
            "--domains" => a.domains = num("--domains") as u32,
            "--patch-cutoff" => a.config.patch_cutoff = num("--patch-cutoff"),
            "--compress-cutoff" => a.config.compress_cutoff = num("--compress-cutoff"),
            "--sim-blocks" => a.config.similarity_blocks = num("--sim-blocks") as u8,
            "--sim-entries" => a.config.similarity_entries_per_page = num("--sim-entries") as u8,
            "--candidates" => a.config.similarity_candidates = num("--candidates") as u8,
            "--no-codec-profile" => a.codec_profile = false,
            "--no-patching" => a.config.patching = false,
            "--no-compression" => a.config.compression = false,
            "--synthetic" => {
                let v = it.next().expect("--synthetic VMS:MIB");
                let (n, m) = v.split_once(':').expect("VMS:MIB");
                a.synthetic = Some((n.parse().unwrap(), m.parse().unwrap()));
            }
            _ => a.images.push(arg),
        }
    }
    a
}

fn load(args: &Args) -> Vec<Vec<u8>> {
    if let Some((vms, mib)) = args.synthetic {
        // Generated guests: a common "kernel" part, per-VM variations of it, zero pages and
        // text. Only for smoke-testing the tool.
        let pages = mib * 256;
        return (0..vms)
            .map(|v| {
                let mut img = vec![0u8; pages * PAGE_SIZE];
                let mut x = 0x1234_5678u64;
                for (i, page) in img.chunks_exact_mut(PAGE_SIZE).enumerate() {
                    match i % 10 {
                        0..=3 => {} // zero
                        4..=6 => {
                            for (j, b) in page.iter_mut().enumerate() {
                                *b = ((i * 31 + j * 7) >> 3) as u8;
                            }
                        }
                        7 => {
                            for (j, b) in page.iter_mut().enumerate() {
                                *b = ((i * 31 + j * 7) >> 3) as u8;
                            }
                            page[(v as usize * 64) % PAGE_SIZE] ^= 0xff;
                        }
                        _ => {
                            for b in page.iter_mut() {
                                x ^= x << 13;
                                x ^= x >> 7;
                                x ^= x << 17;
                                *b = (x % 26) as u8 + b'a';
                            }
                        }
                    }
                }
                img
            })
            .collect();
    }
    args.images
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}")))
        .collect()
}

fn setup(images: &[Vec<u8>], config: Config, domains: u32) -> (Engine, PlainMemory) {
    let mut engine = Engine::new(config).unwrap();
    let mut mem = PlainMemory::new();
    for (i, img) in images.iter().enumerate() {
        let vm = VmId(i as u32);
        mem.create_vm_from_image(vm, img).unwrap();
        let pages = img.len().div_ceil(PAGE_SIZE) as u64;
        engine
            .add_vm(vm, DomainId(i as u32 % domains.max(1)), pages)
            .unwrap();
    }
    (engine, mem)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// LZ4 size histogram and codec speed over the non-zero pages of one image.
fn codec_profile(image: &[u8]) {
    use hv_mem::compress::{compress, decompress, MAX_COMPRESSED};
    let mut buf = vec![0u8; MAX_COMPRESSED];
    let mut out: Page = [0; PAGE_SIZE];
    let mut hist = [0u64; 9];
    let (mut tc, mut td, mut n, mut bytes) = (0f64, 0f64, 0u64, 0u64);
    for page in image.chunks_exact(PAGE_SIZE) {
        let page: &Page = page.try_into().unwrap();
        if hv_mem::page::is_zero(page) {
            continue;
        }
        let t = Instant::now();
        let c = compress(page, &mut buf, MAX_COMPRESSED).unwrap();
        tc += t.elapsed().as_secs_f64();
        let t = Instant::now();
        decompress(&buf[..c], &mut out).unwrap();
        td += t.elapsed().as_secs_f64();
        hist[(c / 512).min(8)] += 1;
        n += 1;
        bytes += c as u64;
    }
    println!(
        "lz4 over {n} non-zero pages: avg {} B, compress {:.2} us/page, decompress {:.2} us/page",
        bytes / n.max(1),
        tc * 1e6 / n as f64,
        td * 1e6 / n as f64
    );
    println!("lz4 size histogram (512 B buckets, last = 4096+): {hist:?}");
}

fn main() {
    let args = parse();
    let images = load(&args);
    if args.codec_profile {
        codec_profile(&images[0]);
    }
    let total_bytes: u64 = images.iter().map(|i| i.len() as u64).sum();
    println!(
        "{} VMs, {:.0} MiB of guest RAM, {} domain(s)",
        images.len(),
        mib(total_bytes),
        args.domains
    );

    // KSM-like peer: zero + identical sharing only, same stability rule.
    let ksm_config = Config {
        patching: false,
        compression: false,
        ..Config::default()
    };
    let (mut ksm, mut ksm_mem) = setup(&images, ksm_config, args.domains);
    let rounds = ksm
        .run_until_converged(&mut ksm_mem, 50)
        .expect("KSM-like converges");
    let k = ksm.stats();
    println!(
        "sharing only (KSM-like): {rounds} rounds, frames {} ({:.1} MiB), footprint {:.1} MiB",
        k.frames_in_use,
        mib(k.frames_in_use * PAGE_SIZE as u64),
        mib(k.footprint_bytes())
    );
    drop((ksm, ksm_mem));

    let (mut engine, mut mem) = setup(&images, args.config.clone(), args.domains);
    // Every round is a coldness threshold later than the previous one (as in
    // `run_until_converged`): a page untouched since its previous visit is cold on its second.
    let span = engine.config().cold_span_us();
    // Round 1 hashes every page (first visit): the raw scan throughput.
    engine.advance_time(span);
    let t = Instant::now();
    engine.scan_round(&mut mem);
    let first = t.elapsed();
    // Round 2 finds the stable pages and merges them (no re-hashing: dirty bits are clear).
    engine.advance_time(span);
    let t = Instant::now();
    engine.scan_round(&mut mem);
    let second = t.elapsed();
    let t = Instant::now();
    let more = engine.run_until_converged(&mut mem, 50).expect("converges");
    let rest = t.elapsed();
    let gbps = |d: std::time::Duration| total_bytes as f64 / d.as_secs_f64() / 1e9;
    println!(
        "scan: round 1 (hash all) {:.3} s = {:.2} GB/s; round 2 (merge) {:.3} s = {:.2} GB/s; \
         {more} more rounds to converge in {:.3} s",
        first.as_secs_f64(),
        gbps(first),
        second.as_secs_f64(),
        gbps(second),
        rest.as_secs_f64()
    );
    let s = engine.stats();
    engine.check_consistency(&mem).unwrap();
    println!("{s:#?}");
    println!(
        "footprint: {:.1} MiB of {:.1} MiB ({:.1}%); KSM-like {:.1} MiB; ratio to KSM-like {:.3}",
        mib(s.footprint_bytes()),
        mib(s.unmanaged_bytes()),
        100.0 * s.footprint_bytes() as f64 / s.unmanaged_bytes() as f64,
        mib(k.footprint_bytes()),
        s.footprint_bytes() as f64 / k.footprint_bytes() as f64
    );
    if s.pages_patched > 0 {
        println!(
            "patches: {} pages, avg {:.0} B",
            s.pages_patched,
            s.bytes_patches as f64 / s.pages_patched as f64
        );
    }
    if s.objects_compressed > 0 {
        println!(
            "compressed: {} objects, avg {:.0} B",
            s.objects_compressed,
            s.bytes_compressed as f64 / s.objects_compressed as f64
        );
    }

    // Correctness: every page reads back as in the image.
    let mut buf: Page = [0; PAGE_SIZE];
    for (i, img) in images.iter().enumerate() {
        for (gfn, want) in img.chunks(PAGE_SIZE).enumerate() {
            engine
                .read_page(&mem, VmId(i as u32), Gfn(gfn as u64), &mut buf)
                .unwrap();
            assert_eq!(&buf[..want.len()], want, "VM {i} gfn {gfn}");
        }
    }
    println!("verified: every page reads back exactly");

    // Fault-in latency, by what the fault had to do. Reads of every non-present page.
    let mut lat: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for (i, img) in images.iter().enumerate() {
        let vm = VmId(i as u32);
        for gfn in 0..img.len().div_ceil(PAGE_SIZE) as u64 {
            if hv_mem::MemoryBackend::mapping(&mem, vm, Gfn(gfn)).is_some() {
                continue;
            }
            let t = Instant::now();
            let r = engine.fault(&mut mem, vm, Gfn(gfn), Access::Read).unwrap();
            let ns = t.elapsed().as_nanos() as u64;
            lat.entry(format!("{r:?}")).or_default().push(ns);
        }
    }
    for (kind, mut v) in lat {
        v.sort_unstable();
        println!(
            "fault {kind:>20}: n={:>7} p50={:>6} ns p99={:>6} ns max={:>7} ns",
            v.len(),
            percentile(&v, 0.5),
            percentile(&v, 0.99),
            v[v.len() - 1]
        );
    }
    for (i, img) in images.iter().enumerate() {
        for (gfn, want) in img.chunks(PAGE_SIZE).enumerate() {
            let got = hv_mem::MemoryBackend::guest_page(&mem, VmId(i as u32), Gfn(gfn as u64))
                .expect("mapped after fault-in");
            assert_eq!(&got[..want.len()], want, "VM {i} gfn {gfn} after fault-in");
        }
    }
    println!("verified: every page correct after fault-in");
}
