//! `cargo xtask kvm-unit-tests`: the KVM project's x86 unit tests, run as muxvisor guests under
//! Bochs, judged against the checked-in expectations (`tests/kvm-unit-tests.toml`).
//!
//! - The suite comes from `--src DIR` or `$KVM_UNIT_TESTS_SRC` (a kvm-unit-tests checkout), else
//!   from the source archive the project's CI machines keep in `../shared/third_party/` next to
//!   the workspace; it is unpacked and built (`./configure --arch=x86_64 && make`) under
//!   `target/kvm-unit-tests/` once, and again when the source changes.
//! - Each test of `x86/unittests.cfg` is one VM: its `.flat` kernel (Multiboot) as the image,
//!   its `test_args` as the command line, the environment file (`NR_CPUS=1`, `MEMSIZE`) as its
//!   one Multiboot module, the test-exit device at 0xf4 that the suite's `exit()` writes, and
//!   the test device (QEMU's pc-testdev: interrupt-line ports, scratch port, MMIO RAM).
//!   Several tests share one boot, side by side.
//! - A test's verdict comes from its exit code (0 all passed, 1 failures, 38 all skipped: the
//!   suite's own convention), its `PASS:`/`FAIL:`/`SKIP:` lines are counted. A test the
//!   expectations call must-pass fails the run unless it passes; an excluded test that passes
//!   fails it too, so the exclusion list only shrinks.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use serde::Deserialize;

use crate::build;
use crate::cli::{parse_positive, Args, Spec};
use crate::deps;
use crate::engine::{self, BootSpec, Engine};
use crate::error::{Error, IoContext, Result};
use crate::iso::{self, IsoSpec};
use crate::process::{self, Ending};
use crate::workspace::Workspace;

const USAGE: &str =
    "cargo xtask kvm-unit-tests [TEST...] [--src DIR] [--set must-pass|ci|excluded|all] \
                     [--per-boot N] [--jobs N] [--engine muxvisor|qemu-tcg]";
/// The expectations, relative to the workspace root.
pub const EXPECTATIONS: &str = "tests/kvm-unit-tests.toml";
/// Tests booted side by side unless `--per-boot` says otherwise: one, so that a test that hangs
/// holds up no other.
const DEFAULT_PER_BOOT: usize = 1;
/// Boots at once unless `--jobs` says otherwise (each Bochs is single-threaded).
const DEFAULT_JOBS: usize = 2;
/// The longest a test runs on QEMU TCG, in seconds.
const TCG_TIMEOUT_S: u64 = 60;
/// What the exit code of a kvm-unit-tests `exit()` means (lib/report.c `report_summary`).
const EXIT_PASS: u64 = 0;
const EXIT_FAIL: u64 = 1;
/// 77 >> 1: every check was skipped.
const EXIT_SKIP: u64 = 38;

/// One `[name]` section of `x86/unittests.cfg`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CfgTest {
    pub name: String,
    /// The `.flat` kernel.
    pub file: String,
    /// `test_args`: the kernel's command line after its name.
    pub args: String,
    /// `smp`: how many CPUs the test wants.
    pub smp: u32,
    /// `arch`: only on this architecture (`x86_64`, `i386`), if given.
    pub arch: Option<String>,
    /// `timeout` in seconds of QEMU time, if given.
    pub timeout_s: Option<u64>,
}

/// Parses `unittests.cfg`: `[name]` sections of `key = value` lines, `#` comments; values may be
/// quoted with `'` or `"`.
pub fn parse_cfg(text: &str) -> std::result::Result<Vec<CfgTest>, String> {
    let mut tests: Vec<CfgTest> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            tests.push(CfgTest {
                name: name.to_owned(),
                file: String::new(),
                args: String::new(),
                smp: 1,
                arch: None,
                timeout_s: None,
            });
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {}: expected `key = value`", n + 1));
        };
        let Some(test) = tests.last_mut() else {
            return Err(format!(
                "line {}: `{}` before any [test]",
                n + 1,
                key.trim()
            ));
        };
        let value = unquote(value.trim());
        let number = |what: &str| {
            value
                .parse::<u64>()
                .map_err(|_| format!("line {}: {what} `{value}` is not a number", n + 1))
        };
        match key.trim() {
            "file" => test.file = value.to_owned(),
            "test_args" | "extra_params" if value.starts_with("-append") => {
                test.args = unquote(value.trim_start_matches("-append").trim()).to_owned()
            }
            "test_args" => test.args = value.to_owned(),
            "smp" => test.smp = number("smp")?.try_into().unwrap_or(u32::MAX),
            "arch" => test.arch = Some(value.to_owned()),
            "timeout" => test.timeout_s = Some(number("timeout")?),
            _ => {} // qemu_params, groups, check, accel: QEMU's business
        }
    }
    if let Some(t) = tests.iter().find(|t| t.file.is_empty()) {
        return Err(format!("[{}] has no `file`", t.name));
    }
    Ok(tests)
}

/// `value` without the `'` or `"` quotes around it, if it has them.
fn unquote(value: &str) -> &str {
    value
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .or_else(|| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
        .unwrap_or(value)
}

/// `tests/kvm-unit-tests.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectations {
    /// Guest memory of each test VM unless its entry says otherwise.
    pub memory_mib: u64,
    /// Emulated seconds a test may take unless its entry says otherwise.
    pub timeout_s: u64,
    pub test: BTreeMap<String, Expect>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// `pass` (must pass), `skip` (must end with every check skipped, as on a CPU without
    /// the feature; with the reason) or `excluded` (with the reason).
    pub expect: Expected,
    pub reason: Option<String>,
    pub memory_mib: Option<u64>,
    pub timeout_s: Option<u64>,
    /// For a test that `unittests.cfg` does not list (a `.flat` kernel the suite builds but
    /// upstream runs by hand): its kernel, and its command line (`args`).
    pub file: Option<String>,
    pub args: Option<String>,
    /// Whether `cargo xtask test` (CI) runs it; `false` for tests too slow under Bochs, which
    /// `cargo xtask kvm-unit-tests` still runs and judges.
    #[serde(default = "yes")]
    pub ci: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Expected {
    Pass,
    Skip,
    Excluded,
}

impl Expectations {
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let e: Expectations = toml::from_str(text).map_err(|e| e.to_string())?;
        for (name, t) in &e.test {
            match (t.expect, &t.reason) {
                (Expected::Excluded | Expected::Skip, None) => {
                    return Err(format!(
                        "[test.{name}]: an excluded or skipped test needs a `reason`"
                    ))
                }
                (_, Some(r)) if r.trim().is_empty() => {
                    return Err(format!("[test.{name}]: the `reason` is empty"))
                }
                _ => {}
            }
        }
        Ok(e)
    }

    /// The tests `unittests.cfg` does not list that the expectations add (with a `file`).
    pub fn extra_tests(&self) -> Vec<CfgTest> {
        self.test
            .iter()
            .filter_map(|(name, e)| {
                Some(CfgTest {
                    name: name.clone(),
                    file: e.file.clone()?,
                    args: e.args.clone().unwrap_or_default(),
                    smp: 1,
                    arch: None,
                    timeout_s: None,
                })
            })
            .collect()
    }

    /// Every x86_64 test of the suite must be listed, and nothing else but the extra tests
    /// (those with a `file`): a new upstream test gets a decision, a removed one leaves no stale
    /// entry.
    pub fn check_complete(&self, tests: &[CfgTest]) -> std::result::Result<(), String> {
        let unlisted: Vec<&str> = tests
            .iter()
            .filter(|t| !self.test.contains_key(&t.name))
            .map(|t| t.name.as_str())
            .collect();
        let unknown: Vec<&str> = self
            .test
            .iter()
            .filter(|(name, e)| e.file.is_none() && !tests.iter().any(|t| &t.name == *name))
            .map(|(name, _)| name.as_str())
            .collect();
        if unlisted.is_empty() && unknown.is_empty() {
            return Ok(());
        }
        let mut message = String::new();
        if !unlisted.is_empty() {
            message += &format!(
                "tests of the suite not in the expectations: {}",
                unlisted.join(", ")
            );
        }
        if !unknown.is_empty() {
            if !message.is_empty() {
                message += "; ";
            }
            message += &format!(
                "expectations for tests the suite does not have: {}",
                unknown.join(", ")
            );
        }
        Err(message)
    }
}

/// What one test did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub passes: u32,
    pub failures: u32,
    pub skips: u32,
    /// How the VM ended: its exit code, or why it did not exit.
    pub end: End,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Exited(u64),
    /// The hypervisor stopped it (the reason is in the log).
    Failed(String),
    /// Still running when the boot's time was up.
    TimedOut,
    /// Never created (the hypervisor refused its image or manifest entry).
    NotStarted(String),
}

/// The suite's verdict on a test, from its exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    Skip,
    Error,
}

impl Outcome {
    pub fn verdict(&self) -> Verdict {
        match self.end {
            End::Exited(EXIT_PASS) if self.failures == 0 => Verdict::Pass,
            End::Exited(EXIT_SKIP) => Verdict::Skip,
            End::Exited(EXIT_FAIL) => Verdict::Fail,
            End::Exited(_) | End::Failed(_) | End::TimedOut | End::NotStarted(_) => Verdict::Error,
        }
    }
}

/// Reads the outcome of VM `vm` from a boot's serial log. `timed_out`: the boot was killed.
pub fn outcome_of(log: &str, vm: &str, timed_out: bool) -> Outcome {
    let console = format!("{vm} | ");
    let mut end = None;
    let stats = format!("[INFO] stats vm={vm} state=");
    let not_started = format!("vm \"{vm}\" not started: ");
    let stopped = format!("[ERROR] vm {vm}: ");
    let mut failure = None;
    let (passes, failures, skips) =
        count_checks(log.lines().filter_map(|l| l.strip_prefix(&console)));
    for line in log.lines().map(str::trim_end) {
        if let Some(state) = line.strip_prefix(&stats) {
            let state = state.split_whitespace().next().unwrap_or("");
            if let Some(code) = state
                .strip_prefix("exited(")
                .and_then(|s| s.strip_suffix(')'))
                .and_then(|s| s.parse().ok())
            {
                end = Some(End::Exited(code));
            } else if state == "failed" {
                end = Some(End::Failed(failure.clone().unwrap_or_default()));
            }
        } else if let Some(why) = line.split_once(&not_started).map(|(_, w)| w) {
            end = Some(End::NotStarted(why.to_owned()));
        } else if let Some(why) = line.strip_prefix(&stopped) {
            failure.get_or_insert_with(|| why.to_owned());
        }
    }
    let end = end.unwrap_or(if timed_out {
        End::TimedOut
    } else {
        End::Failed(failure.unwrap_or_else(|| "no stats line in the log".to_owned()))
    });
    Outcome {
        passes,
        failures,
        skips,
        end,
    }
}

/// Counts the checks in a test's output lines: report() prints `PASS: ...`, `FAIL: ...`,
/// `SKIP: ...`, `XFAIL: ...` and `XPASS: ...` (lib/report.c).
fn count_checks<'a>(lines: impl Iterator<Item = &'a str>) -> (u32, u32, u32) {
    let (mut passes, mut failures, mut skips) = (0, 0, 0);
    for text in lines.map(str::trim_end) {
        if text.starts_with("PASS: ") || text.starts_with("XFAIL: ") {
            passes += 1;
        } else if text.starts_with("FAIL: ") || text.starts_with("XPASS: ") {
            failures += 1;
        } else if text.starts_with("SKIP: ") {
            skips += 1;
        }
    }
    (passes, failures, skips)
}

/// The VM name of a test: its name, cut to the manifest's 31 bytes.
fn vm_name(test: &str) -> String {
    test.chars().take(hv_manifest::NAME_MAX).collect()
}

/// The environment variable naming a kvm-unit-tests checkout, for runs without `--src`
/// (`cargo xtask test` among them).
pub const SRC_ENV: &str = "KVM_UNIT_TESTS_SRC";

/// Why the suite cannot run without `--src`.
pub const SOURCE_MISSING: &str = "kvm-unit-tests: the suite's source is missing: no --src DIR, \
     no KVM_UNIT_TESTS_SRC=DIR (a kvm-unit-tests checkout), and no kvm-unit-tests-*.tar.gz in \
     ../shared/third_party/ next to the workspace";

/// The checkout `$KVM_UNIT_TESTS_SRC` names, if set.
fn env_source() -> Option<PathBuf> {
    std::env::var_os(SRC_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Whether the suite's source is at hand for a run without `--src`.
pub fn source_available(ws: &Workspace) -> bool {
    env_source().is_some() || shared_archive(ws).is_some()
}

/// Where the suite's build lives and how it came there.
struct Suite {
    /// The built tree (x86/*.flat, x86/unittests.cfg).
    dir: PathBuf,
    /// For the table's header: the archive or the checkout.
    origin: String,
}

/// The source archive in `../shared/third_party/`, if the workspace has one next to it.
fn shared_archive(ws: &Workspace) -> Option<PathBuf> {
    let dir = ws.root().parent()?.join("shared").join("third_party");
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("kvm-unit-tests") && n.ends_with(".tar.gz"))
        })
        .collect();
    found.sort();
    found.pop()
}

/// Unpacks (from an archive) and builds the suite unless the build is already there.
fn prepare(ws: &Workspace, src: Option<&Path>) -> Result<Suite> {
    let base = ws.scratch("kvm-unit-tests");
    let from_env = env_source();
    let (tree, origin) = match src.or(from_env.as_deref()) {
        Some(dir) => {
            if !dir.join("x86").join("unittests.cfg").is_file() {
                return Err(Error::config(
                    dir,
                    "not a kvm-unit-tests tree (no x86/unittests.cfg)",
                ));
            }
            (dir.to_path_buf(), dir.display().to_string())
        }
        None => {
            let Some(archive) = shared_archive(ws) else {
                return Err(Error::Failed(SOURCE_MISSING.to_owned()));
            };
            let stem = archive
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("kvm-unit-tests")
                .trim_end_matches(".tar.gz")
                .to_owned();
            let unpacked = base.join(&stem);
            let tree = unpacked.join("kvm-unit-tests");
            if !tree.join("x86").join("unittests.cfg").is_file() {
                if unpacked.exists() {
                    fs::remove_dir_all(&unpacked)
                        .context(|| format!("emptying {}", unpacked.display()))?;
                }
                fs::create_dir_all(&unpacked)
                    .context(|| format!("creating {}", unpacked.display()))?;
                println!("kvm-unit-tests: unpacking {}", archive.display());
                process::run_captured(
                    Command::new("tar")
                        .arg("xzf")
                        .arg(&archive)
                        .arg("-C")
                        .arg(&unpacked),
                )?;
            }
            (tree, archive.display().to_string())
        }
    };
    let built = tree.join("x86").join("msr.flat");
    if !built.is_file() {
        for tool in ["gcc", "make"] {
            if !process::on_path(tool) {
                return Err(Error::Deps(format!(
                    "kvm-unit-tests: `{tool}` is needed to build the suite (run `cargo xtask deps`)"
                )));
            }
        }
        println!("kvm-unit-tests: building the suite in {}", tree.display());
        process::run_captured(
            Command::new("./configure")
                .arg("--arch=x86_64")
                .current_dir(&tree),
        )?;
        let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
        process::run_captured(
            Command::new("make")
                .arg(format!("-j{jobs}"))
                .current_dir(&tree),
        )?;
    }
    Ok(Suite { dir: tree, origin })
}

/// `cargo xtask kvm-unit-tests`.
pub fn run(ws: &Workspace, args: &[String]) -> Result<()> {
    let args = Args::parse(
        args,
        &Spec {
            usage: USAGE,
            with_value: &["--src", "--set", "--per-boot", "--jobs", "--engine"],
            positional: true,
        },
    )?;
    let set = args.value("--set").unwrap_or("must-pass");
    if !["must-pass", "ci", "excluded", "all"].contains(&set) {
        return Err(Error::Usage(format!(
            "`--set {set}`: use must-pass, ci, excluded or all\nusage: {USAGE}"
        )));
    }
    let count = |flag: &str, default: usize| -> Result<usize> {
        Ok(match args.value(flag) {
            Some(v) => parse_positive(flag, v)? as usize,
            None => default,
        })
    };
    let tcg = match args.value("--engine").unwrap_or("muxvisor") {
        "muxvisor" => false,
        "qemu-tcg" => true,
        other => {
            return Err(Error::Usage(format!(
                "`--engine {other}`: use muxvisor or qemu-tcg\nusage: {USAGE}"
            )))
        }
    };
    let shape = Shape {
        per_boot: count("--per-boot", DEFAULT_PER_BOOT)?,
        jobs: count("--jobs", DEFAULT_JOBS)?,
        tcg,
    };
    let results = run_suite(
        ws,
        args.value("--src").map(Path::new),
        args.positional(),
        set,
        shape,
    )?;
    let failed = results.iter().filter(|(_, ok)| !ok).count();
    println!("{} passed, {failed} failed", results.len() - failed);
    if failed > 0 {
        return Err(Error::AlreadyReported);
    }
    Ok(())
}

/// How the tests are spread over boots.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Tests per boot (one VM each).
    pub per_boot: usize,
    /// Boots at once.
    pub jobs: usize,
    /// For comparison: each test straight on QEMU TCG (`-cpu max`, one CPU, the same
    /// environment and test-exit device), without muxvisor.
    pub tcg: bool,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            per_boot: DEFAULT_PER_BOOT,
            jobs: DEFAULT_JOBS,
            tcg: false,
        }
    }
}

/// Builds what is needed, runs the selected tests and prints the table; returns each test's
/// name and whether it did what the expectations say.
pub fn run_suite(
    ws: &Workspace,
    src: Option<&Path>,
    names: &[String],
    set: &str,
    shape: Shape,
) -> Result<Vec<(String, bool)>> {
    let path = ws.root().join(EXPECTATIONS);
    let text = fs::read_to_string(&path).context(|| format!("reading {}", path.display()))?;
    let expectations = Expectations::parse(&text).map_err(|m| Error::config(&path, m))?;
    deps::ensure_packages()?;
    let suite = prepare(ws, src)?;
    let cfg_path = suite.dir.join("x86").join("unittests.cfg");
    let cfg =
        fs::read_to_string(&cfg_path).context(|| format!("reading {}", cfg_path.display()))?;
    let tests: Vec<CfgTest> = parse_cfg(&cfg)
        .map_err(|m| Error::config(&cfg_path, m))?
        .into_iter()
        .filter(|t| t.arch.as_deref().is_none_or(|a| a == "x86_64"))
        .collect();
    expectations
        .check_complete(&tests)
        .map_err(|m| Error::config(&path, m))?;
    let mut tests = tests;
    tests.extend(expectations.extra_tests());
    let selected: Vec<&CfgTest> = if names.is_empty() {
        tests
            .iter()
            .filter(|t| {
                let e = &expectations.test[&t.name];
                match set {
                    "all" => true,
                    "must-pass" => e.expect != Expected::Excluded,
                    "ci" => e.expect != Expected::Excluded && e.ci,
                    _ => e.expect == Expected::Excluded,
                }
            })
            .collect()
    } else {
        let mut chosen = Vec::new();
        for name in names {
            match tests.iter().find(|t| &t.name == name) {
                Some(t) => chosen.push(t),
                None => {
                    return Err(Error::Usage(format!(
                        "kvm-unit-tests: no test `{name}` in {}",
                        cfg_path.display()
                    )))
                }
            }
        }
        chosen
    };
    let batches: Vec<&[&CfgTest]> = if shape.tcg {
        println!(
            "kvm-unit-tests: {} tests from {} on QEMU TCG without muxvisor ({} at once)",
            selected.len(),
            suite.origin,
            shape.jobs
        );
        selected.chunks(1).collect()
    } else {
        build::build_all(ws)?;
        println!(
            "kvm-unit-tests: {} tests from {} on muxvisor in Bochs ({} per boot, {} boots at once)",
            selected.len(),
            suite.origin,
            shape.per_boot,
            shape.jobs
        );
        selected.chunks(shape.per_boot.max(1)).collect()
    };
    // Each invocation has its own directory, so that two runs at once never share a boot's;
    // those of earlier invocations are pruned to the newest few.
    prune_runs(&ws.scratch("kvm-unit-tests"), KEEP_RUNS);
    let runs = ws.scratch("kvm-unit-tests").join(format!(
        "{}-{}",
        if shape.tcg { "runs-tcg" } else { "runs" },
        std::process::id()
    ));
    println!("kvm-unit-tests: logs in {}/boot-N/", runs.display());
    let runs = &runs;
    let next = Mutex::new(0usize);
    type Done<'t> = Vec<(usize, Result<Vec<(&'t CfgTest, Outcome)>>)>;
    let done: Mutex<Done<'_>> = Mutex::new(Vec::new());
    thread::scope(|scope| {
        for _ in 0..shape.jobs.clamp(1, batches.len().max(1)) {
            scope.spawn(|| loop {
                let n = {
                    let mut next = next.lock().expect("no panics while held");
                    *next += 1;
                    *next - 1
                };
                let Some(batch) = batches.get(n) else { break };
                let dir = runs.join(format!("boot-{n}"));
                let result = if shape.tcg {
                    run_on_tcg(&suite, &expectations, batch[0], &dir).map(|o| vec![(batch[0], o)])
                } else {
                    run_batch(ws, &suite, &expectations, batch, &dir)
                };
                done.lock().expect("no panics while held").push((n, result));
            });
        }
    });
    let mut done = done.into_inner().expect("no panics while held");
    done.sort_by_key(|(n, _)| *n);
    let mut results: Vec<(&CfgTest, Outcome)> = Vec::new();
    for (_, result) in done {
        results.extend(result?);
    }
    Ok(print_table(&expectations, &results))
}

/// Log directories of finished invocations kept besides the new one.
const KEEP_RUNS: usize = 4;

/// Removes the `runs-*` directories under `dir` beyond the `keep` newest, never one whose
/// invocation (the PID in its name) is still running. Failures are ignored: these are logs.
fn prune_runs(dir: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut finished: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let pid = name.strip_prefix("runs-")?.rsplit('-').next()?;
            let running = pid.parse::<u32>().is_ok_and(|pid| {
                pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists()
            });
            let modified = e.metadata().and_then(|m| m.modified()).ok()?;
            (!running).then(|| (modified, e.path()))
        })
        .collect();
    finished.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    for (_, path) in finished.into_iter().skip(keep) {
        let _ = fs::remove_dir_all(path);
    }
}

/// The environment file the suite reads from its first module (lib/x86/setup.c): one CPU, the
/// VM's memory, and TEST_DEVICE=0 although each VM has the test device: the suite reads that
/// variable as "not on QEMU+KVM" too, and with it set `syscall` expects SYSCALL in compatibility
/// mode to work on an Intel CPU (KVM emulates it for cross-vendor migration), where a real Intel
/// CPU, and so muxvisor, raises #UD. It overrides what QEMU's fw_cfg would say. Returns its name
/// and path.
fn environment(dir: &Path, memory_mib: u64) -> Result<(String, PathBuf)> {
    let name = format!("env-{memory_mib}");
    let path = dir.join(&name);
    fs::write(
        &path,
        format!("NR_CPUS=1\nMEMSIZE={memory_mib}\nTEST_DEVICE=0\n"),
    )
    .context(|| format!("writing {}", path.display()))?;
    Ok((name, path))
}

/// The emulated seconds `test` may take.
fn budget_s(expectations: &Expectations, test: &CfgTest) -> u64 {
    // Ours, else the suite's (QEMU's timeout), else the default.
    expectations.test[&test.name]
        .timeout_s
        .or(test.timeout_s)
        .unwrap_or(expectations.timeout_s)
}

/// Runs `test` straight on QEMU TCG as upstream's `x86/run` would, with the environment and
/// test-exit device and pc-testdev muxvisor gives it.
fn run_on_tcg(
    suite: &Suite,
    expectations: &Expectations,
    test: &CfgTest,
    dir: &Path,
) -> Result<Outcome> {
    if dir.exists() {
        fs::remove_dir_all(dir).context(|| format!("emptying {}", dir.display()))?;
    }
    fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
    let memory_mib = expectations.test[&test.name]
        .memory_mib
        .unwrap_or(expectations.memory_mib);
    let (_, env) = environment(dir, memory_mib)?;
    let serial = dir.join("serial.log");
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m"])
        .arg(format!("{memory_mib}M"))
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x4"])
        .args(["-device", "pc-testdev"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(suite.dir.join("x86").join(&test.file))
        .arg("-initrd")
        .arg(&env)
        .args(["-append", &test.args])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    println!("kvm-unit-tests: QEMU TCG: {}", test.name);
    let mut child = process::GroupChild::spawn(&mut qemu)?;
    // Wall time: QEMU TCG runs the tests at host speed, and upstream's own runs give a test
    // its unittests.cfg timeout (at most a minute here, as the comparison table says).
    let limit = budget_s(expectations, test).min(TCG_TIMEOUT_S);
    let ending = child.wait_with_deadline(Duration::from_secs(limit), || {})?;
    let log = fs::read(&serial).unwrap_or_default();
    let log = String::from_utf8_lossy(&log);
    let (passes, failures, skips) = count_checks(log.lines());
    let end = match ending {
        // isa-debug-exit: QEMU exits with (code << 1) | 1.
        Ending::Exited(status) => match status.code() {
            Some(c) if c & 1 == 1 => End::Exited((c >> 1) as u64),
            other => End::Failed(format!(
                "QEMU exited with {other:?} without the test-exit device"
            )),
        },
        Ending::TimedOut => End::TimedOut,
    };
    Ok(Outcome {
        passes,
        failures,
        skips,
        end,
    })
}

/// Boots `batch` side by side (one VM each) and reads each one's outcome.
fn run_batch<'t>(
    ws: &Workspace,
    suite: &Suite,
    expectations: &Expectations,
    batch: &[&'t CfgTest],
    dir: &Path,
) -> Result<Vec<(&'t CfgTest, Outcome)>> {
    if dir.exists() {
        fs::remove_dir_all(dir).context(|| format!("emptying {}", dir.display()))?;
    }
    fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
    let mut manifest =
        String::from("# Written by `cargo xtask kvm-unit-tests`: one VM per test.\n");
    let mut images: Vec<(String, PathBuf)> = Vec::new();
    let mut timeout_s = 0;
    for test in batch {
        let e = &expectations.test[&test.name];
        let memory_mib = e.memory_mib.unwrap_or(expectations.memory_mib);
        timeout_s += budget_s(expectations, test);
        let (env_name, env) = environment(dir, memory_mib)?;
        if !images.iter().any(|(n, _)| *n == env_name) {
            images.push((env_name.clone(), env));
        }
        if !images.iter().any(|(n, _)| *n == test.file) {
            images.push((test.file.clone(), suite.dir.join("x86").join(&test.file)));
        }
        manifest += &format!(
            "\n[[vm]]\nname = \"{}\"\nmemory_mib = {memory_mib}\nimage = \"{}\"\ncmdline = \"{}\"\n\
             modules = [\"{env_name}\"]\ndebug_exit = true\ntest_device = true\n",
            vm_name(&test.name),
            test.file,
            test.args.replace('\\', "\\\\").replace('"', "\\\"")
        );
    }
    let manifest_path = dir.join("manifest.toml");
    fs::write(&manifest_path, &manifest)
        .context(|| format!("writing {}", manifest_path.display()))?;
    let spec = IsoSpec {
        kernel: ws.kernel_elf(),
        manifest: manifest_path,
        images,
        cmdline: "exit=emulator log=info".to_owned(),
    };
    let iso_path = dir.join("kut.iso");
    iso::make_iso(ws, &spec, &dir.join("iso-root"), &iso_path)?;
    let boot = BootSpec {
        engine: Engine::Bochs,
        iso: iso_path,
        dir: dir.to_path_buf(),
        // Emulated time is instructions at BOCHS_IPS; Bochs runs them at a few tens of MIPS.
        timeout: Duration::from_secs(20 + timeout_s / 3),
        bochs_ips: engine::BOCHS_IPS,
        bochs_cpu: engine::BOCHS_CPU_MODEL.to_owned(),
        memory_mib: engine::MEMORY_MIB,
    };
    let names: Vec<&str> = batch.iter().map(|t| t.name.as_str()).collect();
    println!("kvm-unit-tests: booting {}", names.join(", "));
    let outcome = engine::boot(&boot, || {})?;
    let serial = boot.serial_log();
    let log = fs::read(&serial).context(|| format!("reading {}", serial.display()))?;
    let log = String::from_utf8_lossy(&log);
    let timed_out = outcome.ending == Ending::TimedOut;
    Ok(batch
        .iter()
        .map(|t| (*t, outcome_of(&log, &vm_name(&t.name), timed_out)))
        .collect())
}

/// Prints the table; returns each test's name and whether it met the expectations.
fn print_table(
    expectations: &Expectations,
    results: &[(&CfgTest, Outcome)],
) -> Vec<(String, bool)> {
    let mut judged = Vec::new();
    println!(
        "\n{:<28} {:>5} {:>5} {:>5}  {:<14} {:<9} verdict",
        "test", "pass", "fail", "skip", "end", "expected"
    );
    for (test, o) in results {
        let expected = expectations.test[&test.name].expect;
        let verdict = o.verdict();
        let (ok, note) = match (expected, verdict) {
            (Expected::Pass, Verdict::Pass) => (true, "ok"),
            (Expected::Pass, _) => (false, "FAILED (must pass)"),
            (Expected::Skip, Verdict::Skip) => (true, "ok (skips)"),
            (Expected::Skip, Verdict::Pass) => (false, "PASSES: expect pass now"),
            (Expected::Skip, _) => (false, "FAILED (must skip)"),
            (Expected::Excluded, Verdict::Pass) => (false, "PASSES: take it off the exclusions"),
            (Expected::Excluded, _) => (true, "excluded"),
        };
        judged.push((test.name.clone(), ok));
        let end = match &o.end {
            End::Exited(c) => format!("exit {c}"),
            End::Failed(_) => "stopped".to_owned(),
            End::TimedOut => "timed out".to_owned(),
            End::NotStarted(_) => "not started".to_owned(),
        };
        let expected = match expected {
            Expected::Pass => "pass",
            Expected::Skip => "skip",
            Expected::Excluded => "excluded",
        };
        println!(
            "{:<28} {:>5} {:>5} {:>5}  {:<14} {:<9} {note}",
            test.name, o.passes, o.failures, o.skips, end, expected
        );
        if let End::Failed(why) | End::NotStarted(why) = &o.end {
            println!("    {why}");
        }
    }
    println!();
    judged
}

#[cfg(test)]
mod tests;
