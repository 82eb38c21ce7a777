//! `cargo xtask bench mem`: the memory engine (`hv-mem`) against Linux KSM and against the upper
//! bound, on raw guest-RAM images (see `cargo xtask corpus` and docs/benchmarks.md).
//!
//! One run does, in order (so that no two measurements share the CPU):
//! 1. loads every regular file of `--images DIR` (each a multiple of 4 KiB; file offset =
//!    guest-physical address), one VM per file, all in one sharing domain;
//! 2. computes the upper bound ([`upper_bound`]) independently of the engine;
//! 3. runs the engine over [`hv_mem::PlainMemory`] until it reports convergence, measuring
//!    process CPU time (getrusage) around the scan calls only, with a savings-vs-CPU curve;
//! 4. checks that every page of every VM still reads back as the image says;
//! 5. samples fault-ins of every kind of page (zero, shared, patched, compressed) and times them;
//! 6. frees all of that and gives the same images to KSM at its default and an aggressive
//!    setting ([`crate::ksm`]);
//! 7. prints one table side by side, checks the targets of issue 3, and writes `--json` and
//!    `--svg` (savings against CPU seconds).
//!
//! The measured work must run optimised: a debug build of xtask re-executes itself as
//! `cargo run --release -p xtask -- bench mem ...`.

mod upper_bound;

use std::collections::BTreeMap;
use std::fmt;
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hv_mem::{
    Access, Config, DomainId, Engine, FaultResolution, Gfn, GuestFault, Page, PlainMemory, Stats,
    VmId, PAGE_SIZE,
};
use serde_json::{json, Value};

use crate::ksm::{self, ConvergenceRule, KsmResult, KsmSetting};

/// Set in the environment of the release re-execution, so it never re-executes again.
const REEXEC_ENV: &str = "HV_BENCH_MEM_RELEASE";

const USAGE: &str = "usage: cargo xtask bench mem --images DIR [--json FILE] [--svg FILE]
                              [--ksm-cap-s S] [--ksm-stable-scans N] [--no-ksm]
                              [--fault-samples N] [--exhaustive-sample N] [--max-rounds N]
                              [--no-xor-patches] [--raw-similarity-keys]
  --images DIR           raw guest-RAM images, one VM per regular file (size a multiple of 4096;
                         other files, such as a corpus's manifest.tsv, are skipped with a note)
  --json FILE            write every figure as JSON (fields: docs/benchmarks.md)
  --svg FILE             write a plot of savings against CPU seconds (engine, KSM, upper bound)
  --ksm-cap-s S          give up on a KSM setting after S seconds (default 600)
  --ksm-stable-scans N   KSM converged after N full scans without change (default 2)
  --no-ksm               skip the KSM peer
  --fault-samples N      timed fault-ins per kind of page (default 2000)
  --exhaustive-sample N  pages searched exhaustively for the upper bound (default 96)
  --max-rounds N         give up on engine convergence after N rounds (default 20)
  --no-xor-patches       engine knob xor_patches = false (runs patches only)
  --raw-similarity-keys  engine knob similarity_normalize_pointers = false
                         (the engine is otherwise Config::default(); the JSON records it)";

/// Errors of the benchmark.
#[derive(Debug)]
pub enum BenchError {
    Usage(String),
    Io {
        what: String,
        source: io::Error,
    },
    /// The image directory violates the input contract.
    Images(String),
    /// The engine refused a call (configuration, VM registration, a fault-in).
    Engine(hv_mem::Error),
    /// The release re-execution failed.
    Reexec(String),
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchError::Usage(msg) => write!(f, "{msg}\n\n{USAGE}"),
            BenchError::Io { what, source } => write!(f, "{what}: {source}"),
            BenchError::Images(msg) => write!(f, "images: {msg}"),
            BenchError::Engine(e) => write!(f, "hv-mem: {e}"),
            BenchError::Reexec(msg) => write!(f, "release build: {msg}"),
        }
    }
}

impl std::error::Error for BenchError {}

impl From<hv_mem::Error> for BenchError {
    fn from(e: hv_mem::Error) -> Self {
        BenchError::Engine(e)
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

#[derive(Debug)]
struct Options {
    images: PathBuf,
    json: Option<PathBuf>,
    svg: Option<PathBuf>,
    ksm_cap: Duration,
    ksm_stable_scans: u64,
    no_ksm: bool,
    fault_samples: usize,
    exhaustive_sample: usize,
    max_rounds: u64,
    /// The engine's policy: `Config::default()` unless a knob flag changed it.
    engine: Config,
}

fn parse_args(args: &[String]) -> Result<Options, BenchError> {
    let mut images = None;
    let mut opts = Options {
        images: PathBuf::new(),
        json: None,
        svg: None,
        ksm_cap: Duration::from_secs(600),
        ksm_stable_scans: 2,
        no_ksm: false,
        fault_samples: 2000,
        exhaustive_sample: 96,
        max_rounds: 20,
        engine: Config::default(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| BenchError::Usage(format!("{name} needs a value")))
        };
        let number = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| BenchError::Usage(format!("{name}: not a number: {v}")))
        };
        match arg.as_str() {
            "--images" => images = Some(PathBuf::from(value("--images")?)),
            "--json" => opts.json = Some(PathBuf::from(value("--json")?)),
            "--svg" => opts.svg = Some(PathBuf::from(value("--svg")?)),
            "--ksm-cap-s" => {
                opts.ksm_cap = Duration::from_secs(number("--ksm-cap-s", value("--ksm-cap-s")?)?)
            }
            "--ksm-stable-scans" => {
                opts.ksm_stable_scans =
                    number("--ksm-stable-scans", value("--ksm-stable-scans")?)?.max(1)
            }
            "--no-ksm" => opts.no_ksm = true,
            "--fault-samples" => {
                opts.fault_samples = number("--fault-samples", value("--fault-samples")?)? as usize
            }
            "--exhaustive-sample" => {
                opts.exhaustive_sample =
                    number("--exhaustive-sample", value("--exhaustive-sample")?)? as usize
            }
            "--max-rounds" => {
                opts.max_rounds = number("--max-rounds", value("--max-rounds")?)?.max(1)
            }
            "--no-xor-patches" => opts.engine.xor_patches = false,
            "--raw-similarity-keys" => opts.engine.similarity_normalize_pointers = false,
            other => return Err(BenchError::Usage(format!("unknown argument {other}"))),
        }
    }
    opts.images = images.ok_or_else(|| BenchError::Usage("--images DIR is required".into()))?;
    Ok(opts)
}

/// Entry point of `cargo xtask bench mem`. `-h`/`--help` anywhere prints the usage and
/// succeeds, before anything is built or re-run.
pub fn run(args: &[String]) -> crate::error::Result<()> {
    if crate::cli::help_requested(args) {
        return Err(crate::error::Error::Help(USAGE.to_owned()));
    }
    let failed = |e: BenchError| crate::error::Error::Failed(e.to_string());
    if cfg!(debug_assertions) && std::env::var_os(REEXEC_ENV).is_none() {
        return reexec_release(args).map_err(failed);
    }
    let opts = parse_args(args).map_err(failed)?;
    bench(&opts).map_err(failed)
}

/// Runs the same command from a release build: the engine's speed is part of what we measure.
fn reexec_release(args: &[String]) -> Result<(), BenchError> {
    eprintln!("bench mem: this xtask is a debug build; re-running it with --release");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let status = Command::new(cargo)
        .current_dir(root)
        .args([
            "run",
            "--release",
            "--quiet",
            "--package",
            "xtask",
            "--",
            "bench",
            "mem",
        ])
        .args(args)
        .env(REEXEC_ENV, "1")
        .status()
        .map_err(|e| BenchError::Reexec(format!("cannot run cargo: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(BenchError::Reexec(format!(
            "the release run failed ({status})"
        )))
    }
}

/// The images: names, paths and contents.
struct ImageSet {
    names: Vec<String>,
    paths: Vec<PathBuf>,
    data: Vec<Vec<u8>>,
}

impl ImageSet {
    fn total_bytes(&self) -> u64 {
        self.data.iter().map(|d| d.len() as u64).sum()
    }

    fn pages(&self) -> Vec<&Page> {
        self.data
            .iter()
            .flat_map(|d| d.chunks_exact(PAGE_SIZE))
            .map(|c| c.try_into().expect("chunks_exact yields whole pages"))
            .collect()
    }
}

/// Files that sit beside images in a corpus directory and are never images, whatever their
/// size: notes, tables and logs.
const NOT_IMAGES: &[&str] = &["tsv", "csv", "json", "txt", "md", "log", "toml", "svg"];

/// The images of `dir`: its regular files, sorted by name, each a non-empty multiple of 4 KiB.
/// Anything else there (a `manifest.tsv`, notes, hidden files, a file of another size) is
/// skipped with a note on standard error; no image at all is an error.
fn load_images(dir: &Path) -> Result<ImageSet, BenchError> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(format!("read directory {}", dir.display())))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    paths.sort();
    let mut set = ImageSet {
        names: Vec::new(),
        paths: Vec::new(),
        data: Vec::new(),
    };
    for p in paths {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let extension = p
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        if name.starts_with('.') || extension.is_some_and(|e| NOT_IMAGES.contains(&e.as_str())) {
            eprintln!("bench mem: skipping {}: not a guest-RAM image", p.display());
            continue;
        }
        let data = fs::read(&p).map_err(io_err(format!("read {}", p.display())))?;
        if data.is_empty() || data.len() % PAGE_SIZE != 0 {
            eprintln!(
                "bench mem: skipping {}: {} bytes, not a guest-RAM image (a non-empty multiple \
                 of {PAGE_SIZE} bytes)",
                p.display(),
                data.len()
            );
            continue;
        }
        set.names.push(name);
        set.paths.push(p);
        set.data.push(data);
    }
    if set.data.is_empty() {
        return Err(BenchError::Images(format!(
            "no guest-RAM images (files of a non-empty multiple of {PAGE_SIZE} bytes) in {}",
            dir.display()
        )));
    }
    Ok(set)
}

/// Process CPU time (user + system), from getrusage(RUSAGE_SELF).
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one rusage into the zeroed struct we pass; RUSAGE_SELF is valid.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One point of a savings curve.
#[derive(Clone, Copy, Debug)]
struct CurvePoint {
    cpu_seconds: f64,
    saved_bytes: i64,
}

/// Net bytes saved by the engine: memory without it minus memory with it (frames in use, the
/// blob heap and metadata).
fn net_saved(s: &Stats) -> i64 {
    s.unmanaged_bytes() as i64 - s.footprint_bytes() as i64
}

/// Latency samples of one kind of fault-in, in nanoseconds: wall-clock time and the thread's
/// CPU time over the same call. On a shared host the wall clock also counts time the thread
/// was preempted by unrelated work, which a hypervisor's fault handler (interrupts off) never
/// sees; the CPU time does not.
#[derive(Default)]
struct Latencies {
    wall: Vec<u64>,
    cpu: Vec<u64>,
}

impl Latencies {
    fn len(&self) -> usize {
        self.wall.len()
    }

    fn wall_percentile(&self, p: f64) -> Option<u64> {
        percentile(&self.wall, p)
    }

    fn cpu_percentile(&self, p: f64) -> Option<u64> {
        percentile(&self.cpu, p)
    }
}

/// The nearest-rank percentile `p` (0..=1) of `samples`.
fn percentile(samples: &[u64], p: f64) -> Option<u64> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[i])
}

/// This thread's CPU time in nanoseconds (CLOCK_THREAD_CPUTIME_ID).
fn thread_cpu_ns() -> u64 {
    // SAFETY: clock_gettime writes one timespec into the zeroed struct we pass; the clock id
    // is valid on Linux.
    let ts = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts);
        ts
    };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What the engine run measured.
struct EngineRun {
    config: Config,
    stats: Stats,
    /// Scan CPU seconds until the savings last changed.
    cpu_seconds: f64,
    /// Scan CPU seconds including the round that confirmed convergence.
    cpu_seconds_total: f64,
    wall_seconds: f64,
    rounds: u64,
    converged: bool,
    curve: Vec<CurvePoint>,
    /// Scan CPU seconds and pages visited of the last (confirming) round.
    last_round: (f64, u64),
    /// Pages whose bytes differ from the image after convergence (must be 0).
    mismatched_pages: u64,
    /// Backend frames allocated at convergence (cross-check of `stats.frames_in_use`).
    backend_frames: u64,
    /// Fault-in latencies per kind of page.
    faults: BTreeMap<&'static str, Latencies>,
    fault_errors: u64,
}

/// Scans until the engine reports convergence, measuring CPU around the scan calls only.
fn run_engine(images: &ImageSet, opts: &Options) -> Result<EngineRun, BenchError> {
    let config = opts.engine.clone();
    let mut engine = Engine::new(config.clone())?;
    let mut mem = PlainMemory::new();
    for (i, data) in images.data.iter().enumerate() {
        let vm = VmId(i as u32);
        mem.create_vm_from_image(vm, data)
            .map_err(|_| BenchError::Images("out of memory loading the images".into()))?;
        engine.add_vm(vm, DomainId(0), (data.len() / PAGE_SIZE) as u64)?;
    }
    // One engine step per sample: the curve's resolution is the engine's own scan granularity.
    // (stats() walks every object, but it runs outside the measured CPU time.)
    let chunk = config.pages_per_scan as u64;
    // No VM runs here: every round is a coldness threshold later than the previous one (as in
    // `Engine::run_until_converged`), so a page is cold on its second visit. Steps stop at the
    // end of a round, so that the clock moves exactly between rounds.
    let pages_per_round: u64 = images
        .data
        .iter()
        .map(|d| (d.len() / PAGE_SIZE) as u64)
        .sum();
    let span = config.cold_span_us();
    let mut left_in_round = pages_per_round;
    engine.advance_time(span);

    let wall0 = Instant::now();
    let mut cpu = 0.0f64;
    let mut curve = vec![CurvePoint {
        cpu_seconds: 0.0,
        saved_bytes: net_saved(&engine.stats()),
    }];
    let mut last_change = curve[0];
    let mut rounds = 0u64;
    let mut round_cpu = 0.0f64;
    let mut round_pages = 0u64;
    let mut last_round = (0.0, 0);
    let converged = loop {
        let c0 = process_cpu_seconds();
        let rep = engine.scan(&mut mem, chunk.min(left_in_round));
        let dt = process_cpu_seconds() - c0;
        left_in_round -= rep.pages.min(left_in_round);
        if rep.rounds_completed > 0 {
            engine.advance_time(span);
            left_in_round = pages_per_round;
        }
        cpu += dt;
        round_cpu += dt;
        round_pages += rep.pages;
        let p = CurvePoint {
            cpu_seconds: cpu,
            saved_bytes: net_saved(&engine.stats()),
        };
        curve.push(p);
        if p.saved_bytes != last_change.saved_bytes {
            last_change = p;
        }
        if rep.rounds_completed > 0 {
            rounds += rep.rounds_completed;
            last_round = (round_cpu, round_pages);
            round_cpu = 0.0;
            round_pages = 0;
            eprintln!(
                "engine: round {rounds}: saved {} MiB, {:.2} CPU-s so far",
                p.saved_bytes >> 20,
                cpu
            );
            if engine.converged() {
                break true;
            }
            if rounds >= opts.max_rounds {
                break false;
            }
        }
        if rep.pages == 0 {
            break false;
        }
    };
    let wall_seconds = wall0.elapsed().as_secs_f64();
    let stats = engine.stats();

    // Every page must still read back as the image says.
    let mut mismatched_pages = 0u64;
    let mut out: Box<Page> = vec![0u8; PAGE_SIZE]
        .into_boxed_slice()
        .try_into()
        .expect("page");
    for (i, data) in images.data.iter().enumerate() {
        for (g, want) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let ok = engine
                .read_page(&mem, VmId(i as u32), Gfn(g as u64), &mut out)
                .is_ok()
                && out[..] == want[..];
            mismatched_pages += u64::from(!ok);
        }
    }
    if let Err(e) = engine.check_consistency(&mem) {
        eprintln!("engine: consistency check failed: {e}");
        mismatched_pages += 1;
    }
    let backend_frames = mem.frames_in_use() as u64;

    let (faults, fault_errors) = sample_faults(&mut engine, &mut mem, images, opts.fault_samples);
    Ok(EngineRun {
        config,
        stats,
        cpu_seconds: last_change.cpu_seconds,
        cpu_seconds_total: cpu,
        wall_seconds,
        rounds,
        converged,
        curve,
        last_round,
        mismatched_pages,
        backend_frames,
        faults,
        fault_errors,
    })
}

/// The kind of page a fault-in restored, from the engine's answer and its counters.
fn fault_kind(res: FaultResolution, access: Access, decompressed: bool) -> &'static str {
    match (res, access) {
        (FaultResolution::ZeroFilled, _) => "zero (write)",
        (FaultResolution::MappedShared, _) => "shared (read)",
        (FaultResolution::CopiedOnWrite | FaultResolution::TookOver, _) if !decompressed => {
            "shared (write)"
        }
        (FaultResolution::Unpatched, Access::Read) => "patched (read)",
        (FaultResolution::Unpatched, Access::Write) => "patched (write)",
        (_, Access::Read) if decompressed => "compressed (read)",
        (_, Access::Write) if decompressed => "compressed (write)",
        (FaultResolution::Spurious, _) => "spurious",
        _ => "other",
    }
}

/// Times fault-ins after convergence: reads of every `stride`-th page, then writes of others,
/// until each kind has `per_kind` samples or the pages run out. Only the engine's `fault`
/// call is timed (what an EPT violation handler would spend), not the emulated access.
fn sample_faults(
    engine: &mut Engine,
    mem: &mut PlainMemory,
    images: &ImageSet,
    per_kind: usize,
) -> (BTreeMap<&'static str, Latencies>, u64) {
    let mut lat: BTreeMap<&'static str, Latencies> = BTreeMap::new();
    let mut errors = 0u64;
    // A fixed pseudo-random walk (odd multiplier modulo a power of two visits every index once).
    let total: u64 = images
        .data
        .iter()
        .map(|d| (d.len() / PAGE_SIZE) as u64)
        .sum();
    let span = total.next_power_of_two();
    let locate = |i: u64| -> Option<(VmId, Gfn)> {
        let mut i = i;
        for (vm, d) in images.data.iter().enumerate() {
            let n = (d.len() / PAGE_SIZE) as u64;
            if i < n {
                return Some((VmId(vm as u32), Gfn(i)));
            }
            i -= n;
        }
        None
    };
    let budget = per_kind.saturating_mul(16).max(1) as u64;
    let mut decompressions = engine.stats().counters.faults_decompressed;
    let mut done = 0u64;
    for step in 0..span {
        if done >= budget {
            break;
        }
        let idx = step.wrapping_mul(0x9E37_79B9_7F4A_7C15 | 1) & (span - 1);
        let Some((vm, gfn)) = locate(idx) else {
            continue;
        };
        // Alternate reads and writes so both paths are covered for every kind.
        let access = if step % 2 == 0 {
            Access::Read
        } else {
            Access::Write
        };
        let faulted = match access {
            Access::Read => mem.guest_read(vm, gfn).err(),
            Access::Write => mem.guest_write(vm, gfn, 0, &[]).err(),
        };
        if !matches!(
            faulted,
            Some(GuestFault::NotPresent | GuestFault::WriteProtected)
        ) {
            continue;
        }
        let c = thread_cpu_ns();
        let t = Instant::now();
        let res = engine.fault(mem, vm, gfn, access);
        let ns = t.elapsed().as_nanos() as u64;
        let cpu_ns = thread_cpu_ns().saturating_sub(c);
        let Ok(res) = res else {
            errors += 1;
            continue;
        };
        // Only a copy-on-write leaves open whether the shared content was resident or
        // compressed; ask the counters then (stats() walks every object: not on every fault).
        let decompressed = match res {
            FaultResolution::Decompressed | FaultResolution::DecompressedShared => {
                decompressions += 1;
                true
            }
            FaultResolution::CopiedOnWrite => {
                let now = engine.stats().counters.faults_decompressed;
                let d = now != decompressions;
                decompressions = now;
                d
            }
            _ => false,
        };
        let samples = lat
            .entry(fault_kind(res, access, decompressed))
            .or_default();
        if samples.len() < per_kind {
            samples.wall.push(ns);
            samples.cpu.push(cpu_ns);
            done += 1;
        }
    }
    if engine.stats().counters.faults_decompressed != decompressions {
        log::warn!("fault sampling: decompression count drifted; compressed/shared labels may mix");
    }
    (lat, errors)
}

/// Entry point after argument parsing.
fn bench(opts: &Options) -> Result<(), BenchError> {
    // Before anything runs: the tree may change while we measure.
    let source = provenance();
    let images = load_images(&opts.images)?;
    let image_bytes = images.total_bytes();
    eprintln!(
        "bench mem: {} images, {} MiB, from {}",
        images.names.len(),
        image_bytes >> 20,
        opts.images.display()
    );

    eprintln!(
        "upper bound: computing (every page hashed, {} searched exhaustively)...",
        opts.exhaustive_sample
    );
    let ub = {
        let pages = images.pages();
        upper_bound::compute(&pages, opts.exhaustive_sample)
    };
    eprintln!(
        "upper bound: {} MiB ({:.1}%) in {:.1} s",
        ub.saved_bytes >> 20,
        pct(ub.saved_bytes as f64, image_bytes),
        ub.seconds
    );

    let engine = run_engine(&images, opts)?;
    let paths = images.paths.clone();
    let names = images.names.clone();
    let sizes: Vec<u64> = images.data.iter().map(|d| d.len() as u64).collect();
    drop(images);

    let (ksm_results, ksm_skipped) = if opts.no_ksm {
        (Vec::new(), Some("--no-ksm".to_string()))
    } else {
        let rule = ConvergenceRule {
            cap: opts.ksm_cap,
            stable_scans: opts.ksm_stable_scans,
            sample_every: Duration::from_millis(200),
        };
        match ksm::measure(&paths, &[KsmSetting::DEFAULT, KsmSetting::AGGRESSIVE], rule) {
            Ok(r) => (r, None),
            Err(e @ ksm::KsmError::Unavailable(_)) => {
                eprintln!("ksm: skipped: {e}");
                (Vec::new(), Some(e.to_string()))
            }
            Err(e) => return Err(BenchError::Images(format!("KSM measurement failed: {e}"))),
        }
    };

    let report = Report {
        source,
        images_dir: &opts.images,
        names: &names,
        sizes: &sizes,
        image_bytes,
        engine: &engine,
        ub: &ub,
        ksm: &ksm_results,
        ksm_skipped: ksm_skipped.as_deref(),
        ksm_cap: opts.ksm_cap,
    };
    print!("{}", report.table());
    if let Some(path) = &opts.json {
        let text = serde_json::to_string_pretty(&report.json()).expect("JSON values serialise");
        fs::write(path, text + "\n").map_err(io_err(format!("write {}", path.display())))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &opts.svg {
        fs::write(path, report.svg()).map_err(io_err(format!("write {}", path.display())))?;
        eprintln!("wrote {}", path.display());
    }
    if engine.mismatched_pages > 0 {
        return Err(BenchError::Images(format!(
            "the engine returned wrong bytes for {} pages (an hv-mem bug)",
            engine.mismatched_pages
        )));
    }
    Ok(())
}

fn pct(part: f64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part / whole as f64
    }
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

/// Everything the outputs are made from.
struct Report<'a> {
    /// [`provenance`] at the start of the run.
    source: Value,
    images_dir: &'a Path,
    names: &'a [String],
    sizes: &'a [u64],
    image_bytes: u64,
    engine: &'a EngineRun,
    ub: &'a upper_bound::UpperBound,
    ksm: &'a [KsmResult],
    ksm_skipped: Option<&'a str>,
    ksm_cap: Duration,
}

/// A plotted line: legend, colour, (CPU seconds, % saved) points.
type Series = (String, &'static str, Vec<(f64, f64)>);

/// One mechanism's share of the engine's savings.
struct Mechanism {
    name: &'static str,
    pages: u64,
    /// Frames no longer needed.
    gross_bytes: u64,
    /// Bytes the mechanism stores instead (patches, compressed data).
    stored_bytes: u64,
}

/// A target of issue 3 and where we stand.
struct Target {
    name: &'static str,
    goal: String,
    value: String,
    met: Option<bool>,
    note: String,
}

impl Report<'_> {
    fn mechanisms(&self) -> Vec<Mechanism> {
        let s = &self.engine.stats;
        let page = PAGE_SIZE as u64;
        vec![
            Mechanism {
                name: "zero",
                pages: s.pages_zero,
                gross_bytes: s.frames_saved_zero * page,
                stored_bytes: 0,
            },
            Mechanism {
                name: "shared",
                pages: s.frames_saved_shared,
                gross_bytes: s.frames_saved_shared * page,
                stored_bytes: 0,
            },
            Mechanism {
                name: "patched",
                pages: s.pages_patched,
                gross_bytes: s.frames_saved_patched * page,
                stored_bytes: s.bytes_patches,
            },
            Mechanism {
                name: "compressed",
                pages: s.objects_compressed,
                gross_bytes: s.frames_saved_compressed * page,
                stored_bytes: s.bytes_compressed,
            },
        ]
    }

    /// Blob heap bytes that hold neither a patch nor compressed data (slot rounding, free
    /// slots, chunk tails).
    fn blob_slack(&self) -> u64 {
        let s = &self.engine.stats;
        s.bytes_blob_heap
            .saturating_sub(s.bytes_patches + s.bytes_compressed)
    }

    /// Whether the parts add up: frames saved + frames in use = pages, and the mechanisms'
    /// net savings minus metadata and slack = the net total.
    fn accounting_consistent(&self) -> bool {
        let s = &self.engine.stats;
        let parts: i64 = self
            .mechanisms()
            .iter()
            .map(|m| m.gross_bytes as i64 - m.stored_bytes as i64)
            .sum::<i64>()
            - s.bytes_metadata as i64
            - self.blob_slack() as i64;
        s.frames_in_use + s.frames_saved() == s.pages_total && parts == self.engine_saved()
    }

    fn engine_saved(&self) -> i64 {
        net_saved(&self.engine.stats)
    }

    fn ksm_best(&self) -> Option<&KsmResult> {
        self.ksm.iter().max_by_key(|r| r.saved_bytes)
    }

    fn ksm_aggressive(&self) -> Option<&KsmResult> {
        self.ksm
            .iter()
            .find(|r| r.setting == KsmSetting::AGGRESSIVE)
    }

    /// Engine scan CPU seconds until its net savings first reached `bytes`.
    fn engine_cpu_to_reach(&self, bytes: u64) -> Option<f64> {
        self.engine
            .curve
            .iter()
            .find(|p| p.saved_bytes >= bytes as i64)
            .map(|p| p.cpu_seconds)
    }

    fn scan_gbps(&self) -> f64 {
        let bytes = self.engine.stats.counters.pages_scanned as f64 * PAGE_SIZE as f64;
        bytes / self.engine.cpu_seconds_total.max(1e-9) / 1e9
    }

    /// (thread CPU, wall) percentile `p` of the fault-ins of `kind`.
    fn latency(&self, kind: &str, p: f64) -> Option<(u64, u64)> {
        let l = self.engine.faults.get(kind)?;
        Some((l.cpu_percentile(p)?, l.wall_percentile(p)?))
    }

    fn targets(&self) -> Vec<Target> {
        let total = self.image_bytes as f64;
        let fp_engine = total - self.engine_saved() as f64;
        let fp_ub = total - self.ub.saved_bytes as f64;
        let mut t = Vec::new();
        match self.ksm_best() {
            Some(k) => {
                let fp_ksm = total - k.saved_bytes as f64;
                t.push(Target {
                    name: "footprint vs KSM",
                    goal: "<= 0.5x KSM's footprint".into(),
                    value: format!(
                        "{:.3}x ({:.0} vs {:.0} MiB)",
                        fp_engine / fp_ksm,
                        mib(fp_engine),
                        mib(fp_ksm)
                    ),
                    met: Some(fp_engine <= 0.5 * fp_ksm),
                    note: String::new(),
                });
            }
            None => t.push(Target {
                name: "footprint vs KSM",
                goal: "<= 0.5x KSM's footprint".into(),
                value: "n/a".into(),
                met: None,
                note: format!("KSM not measured: {}", self.ksm_skipped.unwrap_or("?")),
            }),
        }
        t.push(Target {
            name: "footprint vs upper bound",
            goal: "<= 1.1x the bound's footprint".into(),
            value: format!(
                "{:.3}x ({:.0} vs {:.0} MiB)",
                fp_engine / fp_ub,
                mib(fp_engine),
                mib(fp_ub)
            ),
            met: Some(fp_engine <= 1.1 * fp_ub),
            note: String::new(),
        });
        match self.ksm_aggressive() {
            Some(k) => {
                let reach = self.engine_cpu_to_reach(k.saved_bytes);
                t.push(Target {
                    name: "CPU to KSM's savings",
                    goal: format!(
                        "<= 1/10 of ksmd's {:.2} CPU-s = {:.3} s",
                        k.cpu_seconds,
                        k.cpu_seconds / 10.0
                    ),
                    value: reach.map_or("never reached".into(), |c| format!("{c:.3} CPU-s")),
                    met: Some(reach.is_some_and(|c| c <= k.cpu_seconds / 10.0)),
                    note: String::new(),
                });
            }
            None => t.push(Target {
                name: "CPU to KSM's savings",
                goal: "<= 1/10 of ksmd's CPU at 5000 pages/0 ms".into(),
                value: "n/a".into(),
                met: None,
                note: "KSM not measured".into(),
            }),
        }
        t.push(Target {
            name: "scan throughput",
            goal: ">= 2 GB/s per core".into(),
            value: format!("{:.2} GB/s", self.scan_gbps()),
            met: Some(self.scan_gbps() >= 2.0),
            note: String::new(),
        });
        for kind in [
            "patched (read)",
            "patched (write)",
            "compressed (read)",
            "compressed (write)",
        ] {
            let p99 = self.latency(kind, 0.99);
            t.push(Target {
                name: "fault-in p99",
                goal: format!("{kind} < 10 us"),
                value: p99.map_or("no samples".into(), |(cpu, _)| {
                    format!("{:.2} us", cpu as f64 / 1e3)
                }),
                met: p99.map(|(cpu, _)| cpu < 10_000),
                note: match p99 {
                    None => "no page of this kind after convergence".into(),
                    Some((_, wall)) => {
                        format!("thread CPU time; wall clock {:.2} us", wall as f64 / 1e3)
                    }
                },
            });
        }
        t
    }

    fn table(&self) -> String {
        let total = self.image_bytes;
        let mut out = String::new();
        let e = self.engine;
        let s = &e.stats;
        let _ = writeln!(
            out,
            "\nMemory multiplexing: {} images, {:.0} MiB ({})",
            self.names.len(),
            mib(total as f64),
            self.images_dir.display()
        );
        let mut cols: Vec<(String, Vec<String>)> = Vec::new();
        let fmt_saved = |b: f64| format!("{:.0} MiB {:.1}%", mib(b), pct(b, total));
        cols.push((
            "hv-mem engine".into(),
            vec![
                fmt_saved(self.engine_saved() as f64),
                format!("{:.0} MiB", mib(total as f64 - self.engine_saved() as f64)),
                format!("{:.3}", e.cpu_seconds),
                format!("{:.3}", e.cpu_seconds_total),
                format!("{:.2}", e.wall_seconds),
                format!(
                    "{} rounds{}",
                    e.rounds,
                    if e.converged { "" } else { " NOT CONV." }
                ),
            ],
        ));
        for k in self.ksm {
            cols.push((
                format!(
                    "KSM {}/{}ms",
                    k.setting.pages_to_scan, k.setting.sleep_millisecs
                ),
                vec![
                    fmt_saved(k.saved_bytes as f64),
                    format!("{:.0} MiB", mib(total as f64 - k.saved_bytes as f64)),
                    format!("{:.3}", k.cpu_seconds),
                    format!("{:.3}", k.cpu_seconds_total),
                    format!("{:.1}", k.seconds_to_converge),
                    if k.converged {
                        format!("{} scans", k.full_scans)
                    } else {
                        format!("NOT conv. in {:.0}s", self.ksm_cap.as_secs_f64())
                    },
                ],
            ));
        }
        cols.push((
            "upper bound".into(),
            vec![
                fmt_saved(self.ub.saved_bytes as f64),
                format!("{:.0} MiB", mib(total as f64 - self.ub.saved_bytes as f64)),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ],
        ));
        let rows = [
            "saved (net)",
            "footprint",
            "CPU-s to final savings",
            "CPU-s incl. confirmation",
            "wall-s to final savings",
            "convergence",
        ];
        let w0 = 26;
        let w = cols
            .iter()
            .map(|(h, v)| {
                v.iter()
                    .map(String::len)
                    .chain([h.len()])
                    .max()
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(12)
            + 2;
        let _ = write!(out, "{:w0$}", "");
        for (h, _) in &cols {
            let _ = write!(out, "{h:>w$}");
        }
        out.push('\n');
        for (r, name) in rows.iter().enumerate() {
            let _ = write!(out, "{name:w0$}");
            for (_, v) in &cols {
                let _ = write!(out, "{:>w$}", v[r]);
            }
            out.push('\n');
        }

        let _ = writeln!(
            out,
            "\nSavings by mechanism (engine | upper bound), MiB net:"
        );
        let ub_parts = [
            ("zero", &self.ub.zero),
            ("shared", &self.ub.identical),
            ("patched", &self.ub.patched),
            ("compressed", &self.ub.compressed),
        ];
        for (m, (_, u)) in self.mechanisms().iter().zip(ub_parts.iter()) {
            let net = m.gross_bytes as f64 - m.stored_bytes as f64;
            let _ = writeln!(
                out,
                "  {:12} {:>8} pages {:>9.1} MiB ({:>5.1}%) | {:>8} pages {:>9.1} MiB ({:>5.1}%)",
                m.name,
                m.pages,
                mib(net),
                pct(net, total),
                u.pages,
                mib(u.saved_bytes as f64),
                pct(u.saved_bytes as f64, total)
            );
        }
        let _ = writeln!(
            out,
            "  {:12} {:>29.1} MiB",
            "metadata",
            -mib(s.bytes_metadata as f64)
        );
        let _ = writeln!(
            out,
            "  {:12} {:>29.1} MiB{}",
            "blob slack",
            -mib(self.blob_slack() as f64),
            if self.accounting_consistent() {
                ""
            } else {
                "   (ENGINE ACCOUNTING DOES NOT ADD UP)"
            }
        );
        let _ = writeln!(
            out,
            "  upper bound: exhaustive search on {} pages found {} better patches, +{:.1} MiB \
             (+-{:.1}) estimated",
            self.ub.exhaustive.sampled,
            self.ub.exhaustive.improved,
            mib(self.ub.exhaustive.estimated_extra_bytes as f64),
            mib(self.ub.exhaustive.estimated_extra_stderr_bytes as f64)
        );

        let _ = writeln!(out, "\nEngine:");
        let _ = writeln!(
            out,
            "  scan throughput {:.2} GB/s per core ({} pages visited); last round {:.2} GB/s",
            self.scan_gbps(),
            s.counters.pages_scanned,
            e.last_round.1 as f64 * PAGE_SIZE as f64 / e.last_round.0.max(1e-9) / 1e9
        );
        let _ = writeln!(
            out,
            "  metadata {:.1} bytes per guest page ({:.1} MiB); read-back check: {}",
            s.bytes_metadata as f64 / s.pages_total.max(1) as f64,
            mib(s.bytes_metadata as f64),
            if e.mismatched_pages == 0 {
                "all pages intact".to_string()
            } else {
                format!("{} PAGES WRONG", e.mismatched_pages)
            }
        );
        let _ = writeln!(
            out,
            "  fault-in latency of the engine's fault() call, us (thread CPU | wall clock):"
        );
        for (kind, l) in &e.faults {
            let us = |v: Option<u64>| v.unwrap_or(0) as f64 / 1e3;
            let _ = writeln!(
                out,
                "    {:20} n={:>5}  p50 {:>7.2} p99 {:>7.2} | p50 {:>7.2} p99 {:>7.2}",
                kind,
                l.len(),
                us(l.cpu_percentile(0.5)),
                us(l.cpu_percentile(0.99)),
                us(l.wall_percentile(0.5)),
                us(l.wall_percentile(0.99)),
            );
        }
        if e.fault_errors > 0 {
            let _ = writeln!(out, "    {} fault-ins FAILED", e.fault_errors);
        }
        if let Some(why) = self.ksm_skipped {
            let _ = writeln!(out, "\nKSM: not measured ({why})");
        }

        let _ = writeln!(out, "\nTargets (issue 3):");
        for t in self.targets() {
            let verdict = match t.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "n/a",
            };
            let _ = writeln!(
                out,
                "  {:26} {:36} {:>28}  {}{}",
                t.name,
                t.goal,
                t.value,
                verdict,
                if t.note.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", t.note)
                }
            );
        }
        out
    }

    fn json(&self) -> Value {
        let e = self.engine;
        let s = &e.stats;
        let c = &s.counters;
        let saved_by: serde_json::Map<String, Value> = self
            .mechanisms()
            .iter()
            .map(|m| {
                (
                    m.name.to_string(),
                    json!({
                        "pages": m.pages,
                        "gross_bytes": m.gross_bytes,
                        "stored_bytes": m.stored_bytes,
                        "net_bytes": m.gross_bytes as i64 - m.stored_bytes as i64,
                    }),
                )
            })
            .chain([
                (
                    "metadata".to_string(),
                    json!({ "net_bytes": -(s.bytes_metadata as i64) }),
                ),
                (
                    "blob_heap_slack".to_string(),
                    json!({ "net_bytes": -(self.blob_slack() as i64) }),
                ),
            ])
            .collect();
        let faults: serde_json::Map<String, Value> = e
            .faults
            .iter()
            .map(|(k, l)| {
                (
                    k.to_string(),
                    json!({
                        "samples": l.len(),
                        "p50_ns": l.cpu_percentile(0.5),
                        "p99_ns": l.cpu_percentile(0.99),
                        "max_ns": l.cpu.iter().max(),
                        "wall_p50_ns": l.wall_percentile(0.5),
                        "wall_p99_ns": l.wall_percentile(0.99),
                        "wall_max_ns": l.wall.iter().max(),
                    }),
                )
            })
            .collect();
        let curve = |pts: &mut dyn Iterator<Item = (f64, i64)>| -> Value {
            pts.map(|(c, b)| json!([c, b])).collect::<Vec<_>>().into()
        };
        let ksm: Vec<Value> = self
            .ksm
            .iter()
            .map(|k| {
                json!({
                    "pages_to_scan": k.setting.pages_to_scan,
                    "sleep_millisecs": k.setting.sleep_millisecs,
                    "saved_bytes": k.saved_bytes,
                    "net_saved_bytes": k.net_saved_bytes,
                    "cpu_seconds": k.cpu_seconds,
                    "cpu_seconds_total": k.cpu_seconds_total,
                    "seconds_to_converge": k.seconds_to_converge,
                    "wall_seconds": k.wall_seconds,
                    "converged": k.converged,
                    "cap_seconds": self.ksm_cap.as_secs_f64(),
                    "full_scans": k.full_scans,
                    "pages_shared": k.pages_shared,
                    "pages_sharing": k.pages_sharing,
                    "pages_unshared": k.pages_unshared,
                    "pages_volatile": k.pages_volatile,
                    "curve": curve(&mut decimate(&k.samples, 400).into_iter().map(|s| (s.cpu_seconds, s.saved_bytes() as i64))),
                })
            })
            .collect();
        let targets: Vec<Value> = self
            .targets()
            .into_iter()
            .map(|t| json!({"name": t.name, "goal": t.goal, "value": t.value, "met": t.met, "note": t.note}))
            .collect();
        let ub = self.ub;
        let part = |p: &upper_bound::Part| json!({"pages": p.pages, "stored_bytes": p.stored_bytes, "saved_bytes": p.saved_bytes});
        // Built in parts: one json! literal this size exceeds the default macro recursion limit.
        let upper_bound = json!({
            "zero": part(&ub.zero),
            "identical": part(&ub.identical),
            "patched": part(&ub.patched),
            "compressed": part(&ub.compressed),
            "pages": ub.pages,
            "distinct_pages": ub.distinct_pages,
            "raw_pages": ub.raw_pages,
            "index_saved_bytes": ub.index_saved_bytes,
            "exhaustive_sampled": ub.exhaustive.sampled,
            "exhaustive_improved": ub.exhaustive.improved,
            "exhaustive_estimated_extra_bytes": ub.exhaustive.estimated_extra_bytes,
            "exhaustive_estimated_extra_stderr_bytes": ub.exhaustive.estimated_extra_stderr_bytes,
            "seconds": ub.seconds,
        });
        let scan = json!({
            "pages_visited": c.pages_scanned,
            "pages_hashed": c.pages_hashed,
            "gb_per_s_per_core": self.scan_gbps(),
            "last_round_cpu_seconds": e.last_round.0,
            "last_round_pages": e.last_round.1,
        });
        let images: Vec<Value> = self
            .names
            .iter()
            .zip(self.sizes)
            .map(|(n, b)| json!({"name": n, "bytes": b}))
            .collect();
        let mut root = serde_json::Map::new();
        let mut put = |k: &str, v: Value| {
            root.insert(k.to_string(), v);
        };
        put("machine", machine_info());
        put("source", self.source.clone());
        put("images_dir", json!(self.images_dir.display().to_string()));
        put("images", json!(images));
        put("image_bytes", json!(self.image_bytes));
        put("pages", json!(s.pages_total));
        put("saved_bytes", json!(self.engine_saved()));
        put(
            "saved_percent",
            json!(pct(self.engine_saved() as f64, self.image_bytes)),
        );
        put("footprint_bytes", json!(s.footprint_bytes()));
        put("saved_by", Value::Object(saved_by));
        put("cpu_seconds", json!(e.cpu_seconds));
        put("cpu_seconds_total", json!(e.cpu_seconds_total));
        put("wall_seconds", json!(e.wall_seconds));
        put("rounds", json!(e.rounds));
        put("converged", json!(e.converged));
        put("scan", scan);
        put("metadata_bytes", json!(s.bytes_metadata));
        put(
            "metadata_bytes_per_page",
            json!(s.bytes_metadata as f64 / s.pages_total.max(1) as f64),
        );
        put("blob_heap_bytes", json!(s.bytes_blob_heap));
        put("frames_in_use", json!(s.frames_in_use));
        put("backend_frames_in_use", json!(e.backend_frames));
        put("mismatched_pages", json!(e.mismatched_pages));
        put("accounting_consistent", json!(self.accounting_consistent()));
        put("fault_in", Value::Object(faults));
        put("fault_in_errors", json!(e.fault_errors));
        put("engine_config", json!(format!("{:?}", e.config)));
        put("counters", json!(format!("{:?}", c)));
        put(
            "curve",
            curve(&mut e.curve.iter().map(|p| (p.cpu_seconds, p.saved_bytes))),
        );
        put("upper_bound_saved_bytes", json!(ub.saved_bytes));
        put("upper_bound", upper_bound);
        put("ksm", json!(ksm));
        put("ksm_skipped", json!(self.ksm_skipped));
        put("targets", json!(targets));
        Value::Object(root)
    }

    /// Savings (% of image bytes) against CPU seconds, log-scaled x axis.
    fn svg(&self) -> String {
        let (w, h) = (760.0f64, 440.0f64);
        let (l, r, t, b) = (70.0, 200.0, 40.0, 50.0);
        let total = self.image_bytes;
        let mut series: Vec<Series> = vec![(
            "hv-mem engine".into(),
            "#1f77b4",
            self.engine
                .curve
                .iter()
                .map(|p| (p.cpu_seconds, pct(p.saved_bytes as f64, total)))
                .collect(),
        )];
        let colours = ["#ff7f0e", "#d62728", "#9467bd"];
        for (i, k) in self.ksm.iter().enumerate() {
            series.push((
                format!(
                    "KSM {}/{} ms",
                    k.setting.pages_to_scan, k.setting.sleep_millisecs
                ),
                colours[i % colours.len()],
                decimate(&k.samples, 400)
                    .iter()
                    .map(|s| (s.cpu_seconds, pct(s.saved_bytes() as f64, total)))
                    .collect(),
            ));
        }
        let xmax = series
            .iter()
            .flat_map(|(_, _, p)| p.iter().map(|q| q.0))
            .fold(0.01f64, f64::max);
        let xmin = 0.01f64.min(xmax / 10.0);
        let (lx0, lx1) = (xmin.log10().floor(), xmax.log10().ceil());
        let x = |v: f64| l + (v.max(xmin).log10() - lx0) / (lx1 - lx0) * (w - l - r);
        let y = |v: f64| t + (1.0 - v.clamp(0.0, 100.0) / 100.0) * (h - t - b);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" font-size="14" text-anchor="middle">Memory saved vs CPU spent ({} images, {:.0} MiB)</text>"#,
            (l + w - r) / 2.0,
            self.names.len(),
            mib(total as f64)
        );
        for d in (lx0 as i32)..=(lx1 as i32) {
            let xv = x(10f64.powi(d));
            let _ = writeln!(
                s,
                r##"<line x1="{xv:.1}" y1="{t}" x2="{xv:.1}" y2="{}" stroke="#ddd"/><text x="{xv:.1}" y="{}" text-anchor="middle">{}</text>"##,
                h - b,
                h - b + 16.0,
                fmt_pow10(d)
            );
        }
        for pctv in (0..=100).step_by(20) {
            let yv = y(pctv as f64);
            let _ = writeln!(
                s,
                r##"<line x1="{l}" y1="{yv:.1}" x2="{}" y2="{yv:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{pctv}%</text>"##,
                w - r,
                l - 6.0,
                yv + 4.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">CPU seconds (log scale)</text>"#,
            (l + w - r) / 2.0,
            h - 12.0
        );
        let _ = writeln!(
            s,
            r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">memory saved (% of guest RAM)</text>"#,
            (t + h - b) / 2.0,
            (t + h - b) / 2.0
        );
        let ubv = y(pct(self.ub.saved_bytes as f64, total));
        let _ = writeln!(
            s,
            r##"<line x1="{l}" y1="{ubv:.1}" x2="{}" y2="{ubv:.1}" stroke="#2ca02c" stroke-dasharray="6 4" stroke-width="2"/>"##,
            w - r
        );
        let mut legend = vec![("upper bound".to_string(), "#2ca02c")];
        for (name, colour, pts) in &series {
            // A step curve: savings hold until the next sample.
            let mut d = String::new();
            let mut prev: Option<(f64, f64)> = None;
            for &(cx, cy) in pts {
                match prev {
                    None => {
                        let _ = write!(d, "M{:.1},{:.1}", x(cx), y(cy));
                    }
                    Some((_, py)) => {
                        let _ = write!(d, " L{:.1},{:.1} L{:.1},{:.1}", x(cx), y(py), x(cx), y(cy));
                    }
                }
                prev = Some((cx, cy));
            }
            let _ = writeln!(
                s,
                r#"<path d="{d}" fill="none" stroke="{colour}" stroke-width="2"/>"#
            );
            if let Some(&(cx, cy)) = pts.last() {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{colour}"/>"#,
                    x(cx),
                    y(cy)
                );
            }
            legend.push((name.clone(), colour));
        }
        for (i, (name, colour)) in legend.iter().enumerate() {
            let ly = t + 10.0 + i as f64 * 20.0;
            let _ = writeln!(
                s,
                r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}">{name}</text>"#,
                w - r + 12.0,
                w - r + 36.0,
                w - r + 42.0,
                ly + 4.0
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

fn fmt_pow10(d: i32) -> String {
    match d {
        d if d >= 0 => format!("{}", 10u64.pow(d as u32)),
        d => format!("{}", 10f64.powi(d)),
    }
}

/// At most `n` samples, evenly spaced, always keeping the first and last.
fn decimate(samples: &[ksm::KsmSample], n: usize) -> Vec<ksm::KsmSample> {
    if samples.len() <= n || n < 2 {
        return samples.to_vec();
    }
    (0..n)
        .map(|i| samples[i * (samples.len() - 1) / (n - 1)])
        .collect()
}

/// Which engine is measured: the commit, and whether hv-mem has uncommitted changes (taken when
/// the run starts, which is when the release re-execution has just built it).
fn provenance() -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let dirty =
        git(&["status", "--porcelain", "--", "hypervisor/crates/mem"]).map(|s| !s.is_empty());
    json!({ "commit": git(&["rev-parse", "HEAD"]), "hv_mem_uncommitted_changes": dirty })
}

fn machine_info() -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok());
    json!({
        "cpu": model,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "memory_bytes": mem_kib.map(|k| k * 1024),
        "kernel": fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&[], 0.5), None);
        let l = Latencies {
            wall: vec![5, 1],
            cpu: vec![2, 1],
        };
        assert_eq!(
            (l.len(), l.wall_percentile(1.0), l.cpu_percentile(1.0)),
            (2, Some(5), Some(2))
        );
    }

    #[test]
    fn images_are_the_whole_page_files_and_the_rest_is_skipped() {
        let dir = std::env::temp_dir().join(format!("hv-bench-test-{}", std::process::id()));
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("a.raw"), vec![0u8; 8192]).unwrap();
        fs::write(dir.join("sub/ignored"), b"x").unwrap();
        let set = load_images(&dir).unwrap();
        assert_eq!(set.names, ["a.raw"]);
        assert_eq!(set.pages().len(), 2);
        // A corpus directory: a manifest beside the images (even one of a whole page), notes,
        // a hidden file and a file of another size are all skipped.
        fs::write(dir.join("b.raw"), vec![0u8; 100]).unwrap();
        fs::write(dir.join("manifest.tsv"), vec![b'x'; 4096]).unwrap();
        fs::write(dir.join(".DS_Store"), vec![0u8; 4096]).unwrap();
        fs::write(dir.join("c.raw"), vec![1u8; 4096]).unwrap();
        let set = load_images(&dir).unwrap();
        assert_eq!(set.names, ["a.raw", "c.raw"]);
        // Nothing left that is an image: an error that says so.
        for f in ["a.raw", "c.raw"] {
            fs::remove_file(dir.join(f)).unwrap();
        }
        assert!(matches!(load_images(&dir), Err(BenchError::Images(_))));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn engine_run_on_synthetic_images_is_measured_and_intact() {
        // Two 1 MiB VMs: zero pages, identical pages across VMs, a near-copy and text.
        let mut a = vec![0u8; 1 << 20];
        for (i, b) in a[..512 * 1024].iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[(i / 7) % 4];
        }
        let mut b = a.clone();
        b[100] ^= 1;
        for (i, x) in b[600 * 1024..700 * 1024].iter_mut().enumerate() {
            *x = b"the quick brown fox "[i % 20];
        }
        let images = ImageSet {
            names: vec!["a".into(), "b".into()],
            paths: vec![],
            data: vec![a, b],
        };
        let opts = parse_args(&[
            "--images".into(),
            "x".into(),
            "--fault-samples".into(),
            "50".into(),
        ])
        .unwrap();
        let run = run_engine(&images, &opts).unwrap();
        assert!(run.converged);
        assert_eq!(run.mismatched_pages, 0);
        assert!(run.stats.frames_saved_zero > 0);
        assert!(run.stats.frames_saved_shared > 0);
        assert!(net_saved(&run.stats) > 0);
        assert!(run.cpu_seconds <= run.cpu_seconds_total);
        assert!(run.faults.contains_key("zero (write)"));
        assert_eq!(run.fault_errors, 0);

        // The outputs carry the documented keys and add up.
        let ub = upper_bound::compute(&images.pages(), 4);
        let sizes: Vec<u64> = images.data.iter().map(|d| d.len() as u64).collect();
        let report = Report {
            source: provenance(),
            images_dir: Path::new("synthetic"),
            names: &images.names,
            sizes: &sizes,
            image_bytes: images.total_bytes(),
            engine: &run,
            ub: &ub,
            ksm: &[],
            ksm_skipped: Some("test"),
            ksm_cap: Duration::from_secs(1),
        };
        assert!(report.accounting_consistent());
        let j = report.json();
        for key in [
            "image_bytes",
            "saved_bytes",
            "saved_by",
            "cpu_seconds",
            "upper_bound_saved_bytes",
            "ksm",
        ] {
            assert!(j.get(key).is_some(), "JSON lacks {key}");
        }
        assert_eq!(j["image_bytes"], json!(2u64 << 20));
        assert_eq!(j["saved_bytes"], json!(net_saved(&run.stats)));
        let by_parts: i64 = j["saved_by"]
            .as_object()
            .unwrap()
            .values()
            .map(|m| m["net_bytes"].as_i64().unwrap())
            .sum();
        assert_eq!(by_parts, net_saved(&run.stats));
        assert!(
            ub.saved_bytes as i64 >= net_saved(&run.stats),
            "the bound bounds the engine"
        );
        assert!(report.table().contains("hv-mem engine"));
        let svg = report.svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn args() {
        assert!(parse_args(&[]).is_err());
        let o = parse_args(&[
            "--images".into(),
            "d".into(),
            "--no-ksm".into(),
            "--ksm-cap-s".into(),
            "5".into(),
        ])
        .unwrap();
        assert!(o.no_ksm);
        assert_eq!(o.ksm_cap, Duration::from_secs(5));
        assert_eq!(o.engine, Config::default());
        let o = parse_args(&[
            "--images".into(),
            "d".into(),
            "--no-xor-patches".into(),
            "--raw-similarity-keys".into(),
        ])
        .unwrap();
        assert!(!o.engine.xor_patches && !o.engine.similarity_normalize_pointers);
        assert!(o.engine.patching, "only the named knobs change");
    }
}
