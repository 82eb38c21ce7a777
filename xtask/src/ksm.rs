//! Linux KSM as the peer the memory engine must beat (`cargo xtask bench mem`).
//!
//! Copies raw guest-RAM images into private anonymous memory, marks it `MADV_MERGEABLE` and lets
//! ksmd merge it at one or more settings (`pages_to_scan`, `sleep_millisecs`), sampling
//! `/sys/kernel/mm/ksm/*` and ksmd's CPU time until the savings stop changing. Linux-only and
//! root-only: it changes system-wide KSM settings, and a [`KsmSettingsGuard`] puts them back
//! (unmerge with `run=2`, then `run=0`, then the original values) on every exit path we control,
//! including SIGINT/SIGTERM during a measurement. (The workspace builds with `panic = "abort"`,
//! so a panic cannot run the guard; nothing in the measured loop panics on bad input.)
//!
//! What counts as saved: `pages_sharing` ("how many more sites are sharing them, i.e. how much
//! saved", Documentation/ABI/testing/sysfs-kernel-mm-ksm) plus `ksm_zero_pages` (pages merged
//! with the kernel zero page when `use_zero_pages=1`), times 4 KiB. KSM's own net figure,
//! `general_profit` (saved bytes minus its rmap_item metadata), is recorded beside it.

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const KSM_DIR: &str = "/sys/kernel/mm/ksm";
const PAGE_SIZE: usize = 4096;

/// Errors of the KSM measurement.
#[derive(Debug)]
pub enum KsmError {
    /// KSM cannot be used here (not Linux, no `/sys/kernel/mm/ksm`, not root, no ksmd).
    Unavailable(String),
    /// An I/O operation failed.
    Io { what: String, source: io::Error },
    /// A system call failed.
    Sys {
        call: &'static str,
        source: io::Error,
    },
    /// The measurement was interrupted by SIGINT or SIGTERM.
    Interrupted,
}

impl fmt::Display for KsmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KsmError::Unavailable(why) => write!(f, "KSM unavailable: {why}"),
            KsmError::Io { what, source } => write!(f, "{what}: {source}"),
            KsmError::Sys { call, source } => write!(f, "{call}: {source}"),
            KsmError::Interrupted => write!(f, "interrupted (KSM settings restored)"),
        }
    }
}

impl std::error::Error for KsmError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KsmError::Io { source, .. } | KsmError::Sys { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> KsmError {
    let what = what.into();
    move |source| KsmError::Io { what, source }
}

/// One ksmd configuration to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KsmSetting {
    pub pages_to_scan: u64,
    pub sleep_millisecs: u64,
}

impl KsmSetting {
    /// The kernel's defaults: 100 pages every 20 ms (5,000 pages/s).
    pub const DEFAULT: KsmSetting = KsmSetting {
        pages_to_scan: 100,
        sleep_millisecs: 20,
    };
    /// An aggressive setting: 5,000 pages per batch, no sleep (about one core).
    pub const AGGRESSIVE: KsmSetting = KsmSetting {
        pages_to_scan: 5000,
        sleep_millisecs: 0,
    };
}

/// How long to wait and when to call KSM converged.
#[derive(Clone, Copy, Debug)]
pub struct ConvergenceRule {
    /// Give up after this long and report "not converged".
    pub cap: Duration,
    /// Converged once this many full scans completed with no change in the merged counts.
    pub stable_scans: u64,
    /// How often to sample the counters.
    pub sample_every: Duration,
}

/// One sample of KSM's counters during a measurement.
#[derive(Clone, Copy, Debug, Default)]
pub struct KsmSample {
    /// Seconds since `run=1`.
    pub seconds: f64,
    /// ksmd CPU seconds since `run=1`.
    pub cpu_seconds: f64,
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub ksm_zero_pages: u64,
    pub full_scans: u64,
}

impl KsmSample {
    /// Bytes saved: every page that shares a KSM page (or the zero page) instead of owning one.
    pub fn saved_bytes(&self) -> u64 {
        (self.pages_sharing + self.ksm_zero_pages) * PAGE_SIZE as u64
    }
}

/// The outcome for one setting.
#[derive(Clone, Debug)]
pub struct KsmResult {
    pub setting: KsmSetting,
    /// Bytes saved when converged (or when the cap hit).
    pub saved_bytes: u64,
    /// KSM's `general_profit` at the same moment (saved bytes minus rmap_item metadata), if the
    /// kernel has it.
    pub net_saved_bytes: Option<i64>,
    pub pages_shared: u64,
    pub pages_sharing: u64,
    pub pages_unshared: u64,
    pub pages_volatile: u64,
    /// Seconds from `run=1` until the merged counts last changed (the final savings reached).
    pub seconds_to_converge: f64,
    /// ksmd CPU seconds from `run=1` until the merged counts last changed.
    pub cpu_seconds: f64,
    /// ksmd CPU seconds over the whole measurement, including the confirming scans.
    pub cpu_seconds_total: f64,
    /// Wall seconds of the whole measurement.
    pub wall_seconds: f64,
    /// Full scans completed during the measurement.
    pub full_scans: u64,
    /// False when the cap hit before `stable_scans` scans passed without change.
    pub converged: bool,
    /// The samples, for plotting savings against CPU time.
    pub samples: Vec<KsmSample>,
}

/// The sysfs knobs we change, with their values before we did.
const SAVED_KNOBS: [&str; 3] = ["pages_to_scan", "sleep_millisecs", "run"];

/// Restores KSM's global settings when dropped: unmerge everything (`run=2`), wait for it, stop
/// (`run=0`), then write back the saved values (`run` last).
pub struct KsmSettingsGuard {
    saved: Vec<(&'static str, String)>,
}

impl KsmSettingsGuard {
    /// Records the current values of the knobs we touch.
    pub fn save() -> Result<Self, KsmError> {
        let saved = SAVED_KNOBS
            .iter()
            .map(|k| read_knob_raw(k).map(|v| (*k, v)))
            .collect::<Result<_, _>>()?;
        Ok(KsmSettingsGuard { saved })
    }

    fn restore(&self) -> Result<(), KsmError> {
        unmerge_all()?;
        write_knob("run", "0")?;
        for (k, v) in &self.saved {
            write_knob(k, v)?;
        }
        Ok(())
    }
}

impl Drop for KsmSettingsGuard {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            log::error!("restoring KSM settings failed: {e}");
            eprintln!("warning: restoring KSM settings failed: {e}; check {KSM_DIR}");
        }
    }
}

fn knob_path(name: &str) -> PathBuf {
    Path::new(KSM_DIR).join(name)
}

fn read_knob_raw(name: &str) -> Result<String, KsmError> {
    fs::read_to_string(knob_path(name))
        .map(|s| s.trim().to_string())
        .map_err(io_err(format!("read {KSM_DIR}/{name}")))
}

/// Reads a numeric knob; `None` where this kernel lacks it.
fn read_counter(name: &str) -> Result<Option<i64>, KsmError> {
    match fs::read_to_string(knob_path(name)) {
        Ok(s) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| KsmError::Unavailable(format!("{name} is not a number: {s:?}"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(format!("read {KSM_DIR}/{name}"))(e)),
    }
}

fn counter(name: &str) -> Result<u64, KsmError> {
    Ok(read_counter(name)?.unwrap_or(0).max(0) as u64)
}

fn write_knob(name: &str, value: &str) -> Result<(), KsmError> {
    fs::write(knob_path(name), value).map_err(io_err(format!("write {value} to {KSM_DIR}/{name}")))
}

/// `run=2`: unmerge every KSM page, then wait (bounded) until the counters say so.
fn unmerge_all() -> Result<(), KsmError> {
    write_knob("run", "2")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while counter("pages_shared")? + counter("pages_sharing")? > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Checks that KSM can be driven from here; the reason when not.
pub fn check_available() -> Result<(), KsmError> {
    if !cfg!(target_os = "linux") {
        return Err(KsmError::Unavailable("not Linux".into()));
    }
    if !knob_path("run").exists() {
        return Err(KsmError::Unavailable(format!(
            "{KSM_DIR} missing (CONFIG_KSM off?)"
        )));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(KsmError::Unavailable(
            "changing KSM settings needs root".into(),
        ));
    }
    ksmd_pid()?;
    Ok(())
}

/// The pid of the `ksmd` kernel thread.
fn ksmd_pid() -> Result<u32, KsmError> {
    for entry in fs::read_dir("/proc")
        .map_err(io_err("read /proc"))?
        .flatten()
    {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if fs::read_to_string(entry.path().join("comm")).is_ok_and(|c| c.trim() == "ksmd") {
            return Ok(pid);
        }
    }
    Err(KsmError::Unavailable("no ksmd thread".into()))
}

/// ksmd's CPU time in seconds: nanoseconds from `schedstat`, else ticks from `stat`.
fn ksmd_cpu_seconds(pid: u32) -> Result<f64, KsmError> {
    if let Ok(s) = fs::read_to_string(format!("/proc/{pid}/schedstat")) {
        if let Some(ns) = s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        {
            return Ok(ns as f64 / 1e9);
        }
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(io_err(format!("read /proc/{pid}/stat")))?;
    // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks(14) + ticks(15)) as f64 / hz)
}

/// Private anonymous memory holding a copy of the images, registered with KSM.
pub struct MergeableRegion {
    ptr: *mut u8,
    len: usize,
}

impl MergeableRegion {
    /// Maps `len` bytes of private anonymous memory, without transparent huge pages (guest pages
    /// are 4 KiB and KSM merges 4 KiB pages).
    fn map(len: usize) -> Result<Self, KsmError> {
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(KsmError::Sys {
                call: "mmap",
                source: io::Error::last_os_error(),
            });
        }
        let region = MergeableRegion {
            ptr: ptr.cast(),
            len,
        };
        region.advise(libc::MADV_NOHUGEPAGE, "madvise(MADV_NOHUGEPAGE)")?;
        Ok(region)
    }

    fn advise(&self, advice: libc::c_int, call: &'static str) -> Result<(), KsmError> {
        // SAFETY: ptr/len describe exactly the mapping we own.
        if unsafe { libc::madvise(self.ptr.cast(), self.len, advice) } != 0 {
            return Err(KsmError::Sys {
                call,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Copies every image into a fresh region and marks it mergeable. `read` writes every byte
    /// of the destination, zero pages included (holes of sparse files are copied as zeros), so
    /// every page is a private resident page, as in a running VM.
    pub fn load(images: &[PathBuf]) -> Result<Self, KsmError> {
        let mut total = 0usize;
        for p in images {
            let len = fs::metadata(p)
                .map_err(io_err(format!("stat {}", p.display())))?
                .len();
            total += len as usize;
        }
        let region = Self::map(total.max(PAGE_SIZE))?;
        // SAFETY: the mapping is `len` bytes, readable and writable, and owned by `region`
        // for the lifetime of this slice (dropped before `region` is returned).
        let mem = unsafe { std::slice::from_raw_parts_mut(region.ptr, region.len) };
        let mut off = 0usize;
        for p in images {
            let mut f = fs::File::open(p).map_err(io_err(format!("open {}", p.display())))?;
            let len = f
                .metadata()
                .map_err(io_err(format!("stat {}", p.display())))?
                .len() as usize;
            f.read_exact(&mut mem[off..off + len])
                .map_err(io_err(format!("read {}", p.display())))?;
            off += len;
        }
        region.advise(libc::MADV_MERGEABLE, "madvise(MADV_MERGEABLE)")?;
        Ok(region)
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for MergeableRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping we created; nothing borrows it any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Routes SIGINT/SIGTERM to a flag while alive, so an interrupted run still restores KSM.
struct SignalFlag {
    old: [libc::sighandler_t; 2],
}

impl SignalFlag {
    fn install() -> Self {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let old = unsafe {
            [
                libc::signal(libc::SIGINT, handler),
                libc::signal(libc::SIGTERM, handler),
            ]
        };
        SignalFlag { old }
    }
}

impl Drop for SignalFlag {
    fn drop(&mut self) {
        // SAFETY: reinstalling the handlers that were there before.
        unsafe {
            libc::signal(libc::SIGINT, self.old[0]);
            libc::signal(libc::SIGTERM, self.old[1]);
        }
    }
}

fn sample(pid: u32, t0: Instant, cpu0: f64) -> Result<KsmSample, KsmError> {
    Ok(KsmSample {
        seconds: t0.elapsed().as_secs_f64(),
        cpu_seconds: ksmd_cpu_seconds(pid)? - cpu0,
        pages_shared: counter("pages_shared")?,
        pages_sharing: counter("pages_sharing")?,
        ksm_zero_pages: counter("ksm_zero_pages")?,
        full_scans: counter("full_scans")?,
    })
}

/// Decides from successive samples when KSM has converged: `stable_scans` full scans without
/// a change in what is merged.
#[derive(Clone, Copy, Debug)]
struct Convergence {
    scans0: u64,
    stable_scans: u64,
    last_change: KsmSample,
}

impl Convergence {
    /// `first` is the sample taken at `run=1`; `scans0` the full-scan count before it.
    fn new(first: KsmSample, scans0: u64, stable_scans: u64) -> Self {
        Convergence {
            scans0,
            stable_scans,
            last_change: first,
        }
    }

    /// Feeds the next sample; true once converged.
    fn observe(&mut self, s: KsmSample) -> bool {
        let merged = |x: &KsmSample| (x.pages_shared, x.pages_sharing, x.ksm_zero_pages);
        if merged(&s) != merged(&self.last_change) {
            self.last_change = s;
        }
        // KSM merges a page no earlier than its second scan (the first only checksums it), so
        // demand a few scans before calling a run that never changed converged.
        let scans = s.full_scans - self.scans0;
        scans >= self.stable_scans + 2
            && s.full_scans - self.last_change.full_scans >= self.stable_scans
    }

    /// The first sample that showed the final merged counts.
    fn last_change(&self) -> KsmSample {
        self.last_change
    }
}

/// Loads `images` once and measures KSM at each setting in turn, unmerging in between.
pub fn measure(
    images: &[PathBuf],
    settings: &[KsmSetting],
    rule: ConvergenceRule,
) -> Result<Vec<KsmResult>, KsmError> {
    check_available()?;
    let pid = ksmd_pid()?;
    let _signals = SignalFlag::install();
    let guard = KsmSettingsGuard::save()?;
    // Start from a clean slate: nothing merged, ksmd stopped.
    unmerge_all()?;
    write_knob("run", "0")?;

    let region = MergeableRegion::load(images)?;
    eprintln!(
        "ksm: {} MiB of images in mergeable anonymous memory",
        region.len() >> 20
    );
    let mut results = Vec::new();
    for &setting in settings {
        let r = measure_one(pid, setting, rule)?;
        eprintln!(
            "ksm: {}/{} ms: saved {} MiB in {:.1} s, ksmd {:.2} CPU-s{}",
            setting.pages_to_scan,
            setting.sleep_millisecs,
            r.saved_bytes >> 20,
            r.seconds_to_converge,
            r.cpu_seconds,
            if r.converged { "" } else { " (NOT converged)" }
        );
        results.push(r);
        // Unmerge before the next setting so it starts from the same state.
        unmerge_all()?;
        write_knob("run", "0")?;
    }
    // Restore before freeing the region: unmerging is cheaper than freeing merged pages.
    drop(guard);
    drop(region);
    Ok(results)
}

/// How often a long KSM measurement prints its progress.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

fn measure_one(
    pid: u32,
    setting: KsmSetting,
    rule: ConvergenceRule,
) -> Result<KsmResult, KsmError> {
    write_knob("pages_to_scan", &setting.pages_to_scan.to_string())?;
    write_knob("sleep_millisecs", &setting.sleep_millisecs.to_string())?;
    let scans0 = counter("full_scans")?;
    let cpu0 = ksmd_cpu_seconds(pid)?;
    let t0 = Instant::now();
    write_knob("run", "1")?;

    let mut samples = vec![sample(pid, t0, cpu0)?];
    let mut tracker = Convergence::new(samples[0], scans0, rule.stable_scans);
    // At KSM's default rate a setting can take minutes: say how it goes every so often.
    let mut reported = Instant::now();
    let converged = loop {
        std::thread::sleep(rule.sample_every);
        if INTERRUPTED.load(Ordering::SeqCst) {
            return Err(KsmError::Interrupted);
        }
        let s = sample(pid, t0, cpu0)?;
        samples.push(s);
        if reported.elapsed() >= PROGRESS_EVERY {
            reported = Instant::now();
            eprintln!(
                "ksm: {}/{} ms: {:.0} s, {} full scans, {} MiB saved so far, ksmd {:.1} CPU-s \
                 (gives up after {} s)",
                setting.pages_to_scan,
                setting.sleep_millisecs,
                s.seconds,
                s.full_scans - scans0,
                s.saved_bytes() >> 20,
                s.cpu_seconds,
                rule.cap.as_secs()
            );
        }
        if tracker.observe(s) {
            break true;
        }
        if t0.elapsed() >= rule.cap {
            break false;
        }
    };
    let last_change = tracker.last_change();
    let last = *samples.last().expect("at least one sample");
    let end = if converged { last_change } else { last };
    Ok(KsmResult {
        setting,
        saved_bytes: end.saved_bytes(),
        net_saved_bytes: read_counter("general_profit")?,
        pages_shared: end.pages_shared,
        pages_sharing: end.pages_sharing,
        pages_unshared: counter("pages_unshared")?,
        pages_volatile: counter("pages_volatile")?,
        seconds_to_converge: end.seconds,
        cpu_seconds: end.cpu_seconds,
        cpu_seconds_total: last.cpu_seconds,
        wall_seconds: last.seconds,
        full_scans: last.full_scans - scans0,
        converged,
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(full_scans: u64, pages_sharing: u64) -> KsmSample {
        KsmSample {
            full_scans,
            pages_sharing,
            pages_shared: pages_sharing / 10,
            ..Default::default()
        }
    }

    #[test]
    fn converges_after_stable_scans_following_the_last_change() {
        let mut c = Convergence::new(at(10, 0), 10, 2);
        // Scan 1 only checksums; merging happens during scans 2 and 3.
        assert!(!c.observe(at(11, 0)));
        assert!(!c.observe(at(11, 500)));
        assert!(!c.observe(at(12, 900)));
        assert!(!c.observe(at(13, 1000)));
        assert!(!c.observe(at(14, 1000)));
        assert_eq!(c.last_change().pages_sharing, 1000);
        assert!(c.observe(at(15, 1000)), "two full scans without change");
        assert_eq!(c.last_change().full_scans, 13);
    }

    #[test]
    fn a_run_that_never_merges_needs_warm_up_scans() {
        let mut c = Convergence::new(at(0, 0), 0, 1);
        assert!(!c.observe(at(1, 0)));
        assert!(!c.observe(at(2, 0)));
        assert!(c.observe(at(3, 0)));
    }

    #[test]
    fn a_late_change_restarts_the_count() {
        let mut c = Convergence::new(at(0, 0), 0, 2);
        for scan in 1..=4 {
            c.observe(at(scan, 100));
        }
        assert!(!c.observe(at(5, 90)), "unmerged pages count as a change");
        assert!(!c.observe(at(6, 90)));
        assert!(c.observe(at(7, 90)));
    }

    #[test]
    fn saved_bytes_counts_sharing_and_zero_pages() {
        let s = KsmSample {
            pages_sharing: 3,
            pages_shared: 1,
            ksm_zero_pages: 2,
            ..Default::default()
        };
        assert_eq!(s.saved_bytes(), 5 * 4096);
    }

    #[test]
    fn ksmd_cpu_time_is_readable_when_ksm_exists() {
        // Reads only: never changes KSM settings from a test.
        if let Ok(pid) = ksmd_pid() {
            assert!(ksmd_cpu_seconds(pid).unwrap() >= 0.0);
        }
    }
}
