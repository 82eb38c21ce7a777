//! `cargo xtask qemu-test [SCENARIO...] [--jobs N]`: boots every integration scenario (or the
//! named ones) and judges its serial log.
//!
//! The kernel and guests are built once; then each scenario gets its own ISO and run directory,
//! `target/qemu-test/<name>/` (serial.log, the engine's log and output, the ISO), which is kept
//! for inspection. Two scenarios run at a time by default: CI has two cores, and each emulator is
//! single-threaded. `vmx` scenarios run on the detected VT-x engine (QEMU+KVM or Bochs), `no-vmx`
//! ones on QEMU TCG. A scenario whose engine is missing fails with the reason; none is skipped.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, Write};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use crate::build;
use crate::cli::{parse_positive, Args, Spec};
use crate::deps;
use crate::engine::{self, BootSpec, Engine, VmxChoice};
use crate::error::{Error, Result};
use crate::iso::{self, IsoSpec};
use crate::process::{on_path, Ending};
use crate::scenario::{self, EngineKind, InputFeeder, ScenarioDir};
use crate::workspace::Workspace;

const USAGE: &str = "cargo xtask qemu-test [SCENARIO...] [--jobs N]";
/// Scenarios run at once unless `--jobs` says otherwise.
const DEFAULT_JOBS: usize = 2;
/// Log lines shown with a failure.
const TAIL_LINES: usize = 40;

/// The engines this host offers for each kind of scenario.
#[derive(Debug, Clone)]
pub struct Engines {
    /// For `vmx` scenarios.
    pub vmx: VmxChoice,
    /// For `no-vmx` scenarios: QEMU TCG, or why not.
    pub no_vmx: std::result::Result<Engine, String>,
}

impl Engines {
    /// Detects the engines and prints the choice and the reason.
    pub fn detect(ws: &Workspace) -> Self {
        let vmx = engine::detect_vmx_engine(&ws.scratch("kvm-probe"));
        match vmx.engine {
            Some(engine) => println!("qemu-test: VT-x engine: {engine} ({})", vmx.reason),
            None => println!("qemu-test: no VT-x engine: {}", vmx.reason),
        }
        let no_vmx = if on_path("qemu-system-x86_64") {
            Ok(Engine::QemuTcg)
        } else {
            Err("qemu-system-x86_64 is not installed (run `cargo xtask deps`)".to_owned())
        };
        Engines { vmx, no_vmx }
    }

    fn for_kind(&self, kind: EngineKind) -> std::result::Result<Engine, String> {
        match kind {
            EngineKind::Vmx => self
                .vmx
                .engine
                .ok_or_else(|| format!("no VT-x engine on this host: {}", self.vmx.reason)),
            EngineKind::NoVmx => self.no_vmx.clone(),
        }
    }
}

/// The outcome of one scenario.
#[derive(Debug, Clone)]
pub struct ScenarioResult {
    /// Scenario name.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
}

/// Counts of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Checks that passed.
    pub passed: usize,
    /// Checks that failed.
    pub failed: usize,
    /// Names of the failed checks, in the order they finished.
    pub failed_names: Vec<String>,
}

impl Tally {
    fn of(results: &[ScenarioResult]) -> Self {
        let mut tally = Tally::default();
        for result in results {
            tally.count(&result.name, result.passed);
        }
        tally
    }

    /// Counts one check.
    pub fn count(&mut self, name: &str, passed: bool) {
        if passed {
            self.passed += 1;
        } else {
            self.failed += 1;
            self.failed_names.push(name.to_owned());
        }
    }

    /// Adds another tally's counts.
    pub fn add(&mut self, other: Tally) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.failed_names.extend(other.failed_names);
    }
}

/// `cargo xtask qemu-test`.
pub fn run(ws: &Workspace, args: &[String]) -> Result<()> {
    let args = Args::parse(
        args,
        &Spec {
            usage: USAGE,
            with_value: &["--jobs"],
            positional: true,
        },
    )?;
    let jobs = match args.value("--jobs") {
        Some(value) => parse_positive("--jobs", value)? as usize,
        None => DEFAULT_JOBS,
    };
    let scenarios = scenario::discover(&ws.scenarios_dir(), args.positional())?;
    deps::ensure_packages()?;
    build::build_all(ws)?;
    let tally = run_scenarios(ws, &scenarios, jobs);
    if !tally.failed_names.is_empty() {
        println!("qemu-test: failed: {}", tally.failed_names.join(", "));
    }
    println!(
        "qemu-test: {} passed, {} failed",
        tally.passed, tally.failed
    );
    if tally.failed == 0 {
        Ok(())
    } else {
        Err(Error::AlreadyReported)
    }
}

/// Runs `scenarios` (already built), `jobs` at a time, printing one result block each.
pub fn run_scenarios(ws: &Workspace, scenarios: &[ScenarioDir], jobs: usize) -> Tally {
    let engines = Engines::detect(ws);
    println!(
        "qemu-test: {} scenarios, {} at a time",
        scenarios.len(),
        jobs.max(1)
    );
    let queue: Mutex<VecDeque<&ScenarioDir>> = Mutex::new(scenarios.iter().collect());
    let results: Mutex<Vec<ScenarioResult>> = Mutex::new(Vec::new());
    thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, scenarios.len().max(1)) {
            scope.spawn(|| loop {
                let next = queue.lock().map(|mut q| q.pop_front()).unwrap_or(None);
                let Some(scenario) = next else { break };
                let report = run_one(ws, &engines, scenario);
                // One block per scenario, never interleaved with another worker's.
                let stdout = io::stdout();
                let mut out = stdout.lock();
                let _ = out.write_all(report.text.as_bytes());
                let _ = out.flush();
                drop(out);
                if let Ok(mut results) = results.lock() {
                    results.push(ScenarioResult {
                        name: scenario.name.clone(),
                        passed: report.passed,
                    });
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_default();
    Tally::of(&results)
}

/// Counts every scenario as failed with `reason` (when they cannot run at all), printing a
/// FAIL line for each.
pub fn fail_all(scenarios: &[ScenarioDir], reason: &str) -> Tally {
    let mut tally = Tally::default();
    for scenario in scenarios {
        println!("FAIL {}: not run: {reason}", scenario.name);
        tally.count(&scenario.name, false);
    }
    tally
}

/// The printed result of one scenario.
struct Report {
    passed: bool,
    text: String,
}

fn run_one(ws: &Workspace, engines: &Engines, dir: &ScenarioDir) -> Report {
    let fail = |reason: String| Report {
        passed: false,
        text: format!("FAIL {}: {reason}\n", dir.name),
    };
    let scenario = match dir.load() {
        Ok(scenario) => scenario,
        Err(e) => return fail(e.to_string()),
    };
    let engine = match engines.for_kind(scenario.engine) {
        Ok(engine) => engine,
        Err(reason) => return fail(reason),
    };
    let run_dir = ws.scenario_run_dir(&dir.name);
    if let Err(e) = fs::create_dir_all(&run_dir) {
        return fail(format!("creating {}: {e}", run_dir.display()));
    }
    let iso_path = run_dir.join("scenario.iso");
    let made = IsoSpec::from_build(
        ws,
        &dir.manifest(),
        &scenario.images,
        &scenario.kernel_cmdline(),
    )
    .and_then(|spec| iso::make_iso(ws, &spec, &run_dir.join("iso-root"), &iso_path));
    if let Err(e) = made {
        return fail(format!("cannot make the ISO: {e}"));
    }
    let spec = BootSpec {
        engine,
        iso: iso_path,
        dir: run_dir.clone(),
        timeout: Duration::from_secs(scenario.timeout_s),
        bochs_ips: scenario.bochs_ips,
        bochs_cpu: scenario.bochs_cpu.clone(),
        memory_mib: scenario.memory_mib,
    };
    // With `[[input]]`, COM1 is a socket this process serves (engine::boot_interactive).
    let booted = if scenario.inputs.is_empty() {
        engine::boot(&spec, || {}).map(|outcome| (outcome, Vec::new()))
    } else {
        engine::boot_interactive(&spec, InputFeeder::new(&scenario), || {})
            .map(|(outcome, feeder)| (outcome, feeder.untyped().to_vec()))
    };
    let (outcome, untyped) = match booted {
        Ok(booted) => booted,
        Err(e) => return fail(format!("cannot boot on {engine}: {e}")),
    };
    let serial = spec.serial_log();
    let log = fs::read(&serial).map(|b| String::from_utf8_lossy(&b).into_owned());
    let log = match log {
        Ok(log) => log,
        Err(e) => return fail(format!("cannot read {}: {e}", serial.display())),
    };
    let mut verdict = scenario::judge(&scenario, &log);
    for input in &untyped {
        verdict.failures.push(format!(
            "input {:?} was never typed: no line matched {}",
            input.text, input.after
        ));
    }
    if outcome.ending == Ending::TimedOut {
        verdict.failures.insert(
            0,
            format!(
                "the emulator did not exit within {} s and was killed",
                scenario.timeout_s
            ),
        );
    }
    let seconds = outcome.wall.as_secs_f64();
    let mut text = String::new();
    if verdict.passed() {
        text.push_str(&format!("PASS {} ({engine}, {seconds:.1} s)\n", dir.name));
        if let (Some(report), Some(fairness)) = (&verdict.fairness, &scenario.cpu_fairness) {
            text.push_str(&format!("    {}\n", report.summary(fairness.tolerance)));
        }
    } else {
        text.push_str(&format!("FAIL {}: {}\n", dir.name, verdict.failures[0]));
        text.push_str(&format!("    scenario: {}\n", scenario.description));
        for failure in &verdict.failures[1..] {
            text.push_str(&format!("    also: {failure}\n"));
        }
        text.push_str(&format!(
            "    ({engine}, {seconds:.1} s; serial log {}; emulator output {})\n",
            serial.display(),
            spec.emulator_output().display()
        ));
        let tail = scenario::tail(&log, TAIL_LINES);
        if !tail.is_empty() {
            text.push_str(&format!(
                "    --- last {} lines of the serial log ---\n",
                tail.len()
            ));
        }
        for line in tail {
            text.push_str(&format!("    | {line}\n"));
        }
    }
    Report {
        passed: verdict.passed(),
        text,
    }
}
