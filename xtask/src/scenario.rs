//! Integration scenarios: the `scenario.toml` format and the verdict on a serial log.
//!
//! A scenario is a directory `tests/scenarios/<name>/` with `scenario.toml` (what to boot and
//! what the log must show) and `manifest.toml` (the boot manifest). The format (also in
//! tests/scenarios/README.md and the interfaces notes):
//!
//! ```toml
//! description = "two VMs print"
//! engine = "vmx"          # or "no-vmx" (QEMU TCG)
//! timeout_s = 120         # hard limit of the emulator run
//! cmdline = ""            # extra hypervisor words; the runner always adds exit=emulator
//! images = ["hello"]      # test-guests binaries on the ISO
//! expect = ["hello-a | Hello from the serial port"]  # substrings of some log line
//! reject = ["stopped:"]   # substrings of no log line; [PANIC] and [FATAL] always
//! [[at_least]]            # optional, any number: a figure of the log that must be reached
//! line = "[INFO] mem: "   # the last line containing this ...
//! key = "saved_shared"    # ... has a word saved_shared=N ...
//! min = 1                 # ... with N >= 1
//! [cpu_fairness]          # optional, from the `[INFO] stats vm=NAME ... cpu_us=N` lines
//! vms = ["busy-1", "busy-2"]
//! tolerance = 0.20        # (max - min) / min of cpu_us
//! end_tolerance = 0.10    # optional: spread of the VMs' `busy_end_tsc` reports over the run
//! ```
//!
//! Equal work gives equal `cpu_us` under any scheduler, so `tolerance` checks the accounting.
//! `end_tolerance` checks the scheduling: from each VM's `report busy_start_tsc=` and
//! `report busy_end_tsc=` lines, `(last end - first end) / (last end - first start)`. A fair
//! round robin ends equal work within about one round (a fraction of a percent); running the VMs
//! one after the other spreads their ends over `(n - 1) / n` of the run.
//!
//! Everything here is pure (text in, verdict out), so it is unit-tested against sample logs.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, IoContext, Result};
use crate::iso;

/// Substrings that fail every scenario: a hypervisor panic or an unexpected CPU exception.
pub const ALWAYS_REJECT: &[&str] = &["[PANIC]", "[FATAL]"];

/// What a scenario needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// VT-x: Bochs, or QEMU+KVM with nested VMX.
    Vmx,
    /// No VT-x: QEMU TCG.
    NoVmx,
}

/// `scenario.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// One line: what the scenario proves.
    pub description: String,
    /// The engine it needs.
    pub engine: EngineKind,
    /// Hard limit of the emulator run, seconds.
    pub timeout_s: u64,
    /// Extra hypervisor command-line words.
    #[serde(default)]
    pub cmdline: String,
    /// Guest binaries on the ISO (module name = binary name).
    #[serde(default)]
    pub images: Vec<String>,
    /// Each must be a substring of some line of the serial log.
    #[serde(default)]
    pub expect: Vec<String>,
    /// None may be a substring of any line of the serial log.
    #[serde(default)]
    pub reject: Vec<String>,
    /// Optional CPU-time fairness check.
    pub cpu_fairness: Option<Fairness>,
    /// Figures the log must reach: `key=N` words of a line.
    #[serde(default)]
    pub at_least: Vec<AtLeast>,
}

/// One `[[at_least]]`: in the last log line containing `line`, the word `key=N` has `N >= min`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtLeast {
    /// A substring that picks the line (the last one that has it).
    pub line: String,
    /// The key of a `key=N` word of that line.
    pub key: String,
    /// The least acceptable N.
    pub min: u64,
}

/// `[cpu_fairness]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fairness {
    /// The VMs whose `cpu_us` are compared.
    pub vms: Vec<String>,
    /// Largest allowed `(max - min) / min`.
    pub tolerance: f64,
    /// Largest allowed spread of the VMs' end times over the run, when given.
    #[serde(default)]
    pub end_tolerance: Option<f64>,
}

/// A scenario found on disk.
#[derive(Debug, Clone)]
pub struct ScenarioDir {
    /// Directory name.
    pub name: String,
    /// The directory.
    pub dir: PathBuf,
}

impl ScenarioDir {
    /// The boot manifest of the scenario.
    pub fn manifest(&self) -> PathBuf {
        self.dir.join("manifest.toml")
    }

    /// Reads and checks `scenario.toml`, and that `manifest.toml` exists.
    pub fn load(&self) -> Result<Scenario> {
        let path = self.dir.join("scenario.toml");
        let text = fs::read_to_string(&path).context(|| format!("reading {}", path.display()))?;
        let scenario = parse(&text).map_err(|message| Error::config(&path, message))?;
        let manifest = self.manifest();
        if !manifest.is_file() {
            return Err(Error::config(
                &manifest,
                "missing (every scenario needs its manifest)",
            ));
        }
        Ok(scenario)
    }
}

/// The scenarios under `base` (directories with a `scenario.toml`), sorted by name; with
/// `names`, exactly those, in the order given.
pub fn discover(base: &Path, names: &[String]) -> Result<Vec<ScenarioDir>> {
    let mut all = Vec::new();
    for entry in fs::read_dir(base).context(|| format!("reading {}", base.display()))? {
        let dir = entry
            .context(|| format!("reading {}", base.display()))?
            .path();
        if dir.join("scenario.toml").is_file() {
            if let Some(name) = dir.file_name().and_then(|n| n.to_str()) {
                all.push(ScenarioDir {
                    name: name.to_owned(),
                    dir: dir.clone(),
                });
            }
        }
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    if names.is_empty() {
        return Ok(all);
    }
    names
        .iter()
        .map(|wanted| {
            // Accept `hello` as well as `tests/scenarios/hello/` (shell completion).
            let wanted_name = Path::new(wanted.trim_end_matches('/'))
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(wanted);
            all.iter()
                .find(|s| s.name == wanted_name)
                .cloned()
                .ok_or_else(|| {
                    let known: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
                    Error::Usage(format!(
                        "no scenario named `{wanted}` in {} (there are: {})",
                        base.display(),
                        known.join(", ")
                    ))
                })
        })
        .collect()
}

/// Parses and validates `scenario.toml` text.
pub fn parse(text: &str) -> Result<Scenario, String> {
    let scenario: Scenario = toml::from_str(text).map_err(|e| e.to_string())?;
    scenario.validate()?;
    Ok(scenario)
}

impl Scenario {
    fn validate(&self) -> Result<(), String> {
        if self.timeout_s == 0 {
            return Err("timeout_s must be at least 1".to_owned());
        }
        // A scenario that expects nothing passes on an empty log: it could not fail.
        if self.expect.is_empty() {
            return Err("expect must list at least one string".to_owned());
        }
        if self.expect.iter().chain(&self.reject).any(|s| s.is_empty()) {
            return Err("expect and reject may not contain empty strings".to_owned());
        }
        for image in &self.images {
            iso::validate_image_name(image).map_err(|e| e.to_string())?;
        }
        iso::validate_cmdline(&self.cmdline).map_err(|e| e.to_string())?;
        if let Some(fairness) = &self.cpu_fairness {
            if fairness.vms.len() < 2 {
                return Err("cpu_fairness.vms needs at least two VMs".to_owned());
            }
            if !(fairness.tolerance.is_finite() && fairness.tolerance >= 0.0) {
                return Err("cpu_fairness.tolerance must be a number >= 0".to_owned());
            }
            if let Some(t) = fairness.end_tolerance {
                if !(t.is_finite() && (0.0..=1.0).contains(&t)) {
                    return Err(
                        "cpu_fairness.end_tolerance must be a number from 0 to 1".to_owned()
                    );
                }
            }
        }
        Ok(())
    }

    /// The hypervisor command line of a test run: `exit=emulator` and the scenario's words.
    pub fn kernel_cmdline(&self) -> String {
        let extra = self.cmdline.trim();
        if extra.is_empty() {
            "exit=emulator".to_owned()
        } else {
            format!("exit=emulator {extra}")
        }
    }
}

/// The result of the fairness check when it passes.
#[derive(Debug, Clone, PartialEq)]
pub struct FairnessReport {
    /// `cpu_us` per VM, in the scenario's order.
    pub cpu_us: Vec<(String, u64)>,
    /// `(max - min) / min`.
    pub spread: f64,
    /// `(last end - first end) / (last end - first start)` of the TSC reports, when checked.
    pub end_spread: Option<f64>,
}

impl FairnessReport {
    /// One line for the output.
    pub fn summary(&self, tolerance: f64) -> String {
        let times: Vec<String> = self
            .cpu_us
            .iter()
            .map(|(vm, us)| format!("{vm}={us}"))
            .collect();
        format!(
            "cpu_fairness: cpu_us {}; spread {:.1}% (limit {:.1}%){}",
            times.join(" "),
            self.spread * 100.0,
            tolerance * 100.0,
            match self.end_spread {
                Some(e) => format!("; ends spread over {:.2}% of the run", e * 100.0),
                None => String::new(),
            }
        )
    }
}

/// The verdict on one serial log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdict {
    /// Every expectation that failed, in a readable sentence each; empty means pass.
    pub failures: Vec<String>,
    /// The fairness figures, when the scenario has the check and the stats lines are there.
    pub fairness: Option<FairnessReport>,
}

impl Verdict {
    /// Whether every expectation held.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Checks `log` (the whole serial log) against `scenario`.
pub fn judge(scenario: &Scenario, log: &str) -> Verdict {
    let lines: Vec<&str> = log.lines().map(|l| l.trim_end_matches('\r')).collect();
    let mut verdict = Verdict::default();
    if lines.is_empty() {
        verdict.failures.push("the serial log is empty".to_owned());
    }
    for wanted in &scenario.expect {
        if !lines.iter().any(|line| line.contains(wanted.as_str())) {
            verdict
                .failures
                .push(format!("expected text not found: {wanted:?}"));
        }
    }
    let rejects = scenario
        .reject
        .iter()
        .map(String::as_str)
        .chain(ALWAYS_REJECT.iter().copied());
    for unwanted in rejects {
        if let Some((n, line)) = lines.iter().enumerate().find(|(_, l)| l.contains(unwanted)) {
            verdict.failures.push(format!(
                "rejected text {unwanted:?} found on line {}: {line:?}",
                n + 1
            ));
        }
    }
    for want in &scenario.at_least {
        if let Err(message) = check_at_least(want, &lines) {
            verdict.failures.push(message);
        }
    }
    if let Some(fairness) = &scenario.cpu_fairness {
        match check_fairness(fairness, &lines) {
            Ok(report) => {
                if report.spread > fairness.tolerance {
                    verdict.failures.push(format!(
                        "CPU time not fair: {}",
                        report.summary(fairness.tolerance)
                    ));
                }
                if let (Some(spread), Some(limit)) = (report.end_spread, fairness.end_tolerance) {
                    if spread > limit {
                        verdict.failures.push(format!(
                            "scheduling not fair: equal work ended spread over {:.2}% of the run \
                             (limit {:.2}%)",
                            spread * 100.0,
                            limit * 100.0
                        ));
                    }
                }
                verdict.fairness = Some(report);
            }
            Err(message) => verdict.failures.push(format!("cpu_fairness: {message}")),
        }
    }
    verdict
}

fn check_at_least(want: &AtLeast, lines: &[&str]) -> Result<(), String> {
    let line = lines
        .iter()
        .rev()
        .find(|l| l.contains(want.line.as_str()))
        .ok_or_else(|| format!("at_least: no line contains {:?}", want.line))?;
    let value = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix(want.key.as_str())?.strip_prefix('='))
        .ok_or_else(|| format!("at_least: no {}=N in {line:?}", want.key))?;
    let n: u64 = value
        .parse()
        .map_err(|_| format!("at_least: {}={value} is not a number in {line:?}", want.key))?;
    if n < want.min {
        return Err(format!(
            "at_least: {}={n} is below {} in {line:?}",
            want.key, want.min
        ));
    }
    Ok(())
}

/// `cpu_us` of every VM with a `[INFO] stats vm=NAME ... cpu_us=N` line (the last one wins).
pub fn cpu_times<'a>(lines: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, u64> {
    let mut times = BTreeMap::new();
    for line in lines {
        let Some((_, fields)) = line.split_once("[INFO] stats ") else {
            continue;
        };
        let mut vm = None;
        let mut cpu_us = None;
        for word in fields.split_whitespace() {
            match word.split_once('=') {
                Some(("vm", name)) => vm = Some(name),
                Some(("cpu_us", value)) => cpu_us = value.parse::<u64>().ok(),
                _ => {}
            }
        }
        if let (Some(vm), Some(cpu_us)) = (vm, cpu_us) {
            times.insert(vm.to_owned(), cpu_us);
        }
    }
    times
}

fn check_fairness(fairness: &Fairness, lines: &[&str]) -> Result<FairnessReport, String> {
    let times = cpu_times(lines.iter().copied());
    let mut cpu_us = Vec::with_capacity(fairness.vms.len());
    for vm in &fairness.vms {
        let us = times
            .get(vm)
            .ok_or_else(|| format!("no stats line with cpu_us for vm {vm}"))?;
        cpu_us.push((vm.clone(), *us));
    }
    let min = cpu_us.iter().map(|(_, us)| *us).min().unwrap_or(0);
    let max = cpu_us.iter().map(|(_, us)| *us).max().unwrap_or(0);
    if min == 0 {
        return Err(format!("a VM got no CPU time at all ({cpu_us:?})"));
    }
    let spread = (max - min) as f64 / min as f64;
    let end_spread = match fairness.end_tolerance {
        Some(_) => Some(end_spread(&fairness.vms, lines)?),
        None => None,
    };
    Ok(FairnessReport {
        cpu_us,
        spread,
        end_spread,
    })
}

/// The value of the last `[INFO] vm VM: report KEY=N` line.
fn report_value(lines: &[&str], vm: &str, key: &str) -> Option<u64> {
    let prefix = format!("[INFO] vm {vm}: report {key}=");
    lines
        .iter()
        .rev()
        .find_map(|line| line.split_once(prefix.as_str()))
        .and_then(|(_, value)| value.trim().parse().ok())
}

/// `(last end - first end) / (last end - first start)` of the VMs' busy TSC reports.
fn end_spread(vms: &[String], lines: &[&str]) -> Result<f64, String> {
    let mut starts = Vec::with_capacity(vms.len());
    let mut ends = Vec::with_capacity(vms.len());
    for vm in vms {
        let start = report_value(lines, vm, "busy_start_tsc")
            .ok_or_else(|| format!("no busy_start_tsc report from vm {vm}"))?;
        let end = report_value(lines, vm, "busy_end_tsc")
            .ok_or_else(|| format!("no busy_end_tsc report from vm {vm}"))?;
        if end <= start {
            return Err(format!("vm {vm} reports its work ending before it started"));
        }
        starts.push(start);
        ends.push(end);
    }
    let first_start = starts.iter().copied().min().unwrap_or(0);
    let first_end = ends.iter().copied().min().unwrap_or(0);
    let last_end = ends.iter().copied().max().unwrap_or(0);
    Ok((last_end - first_end) as f64 / (last_end - first_start) as f64)
}

/// The last `n` lines of `log`.
pub fn tail(log: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log in the format of the interfaces notes, as the `hello` scenario produces it.
    const HELLO_LOG: &str = "\
[INFO] hv: MuxVisor starting, log=info exit=emulator
[INFO] hv: 2 VMs created
hello-a | Hello from the serial port
hello-b | Hello from the serial port
hello-a | Hello from the console hypercall
[INFO] vm hello-a: report hello=1
hello-b | Hello from the console hypercall
[INFO] vm hello-b: report hello=1
[INFO] vm hello-a: exited with code 0
[INFO] vm hello-b: exited with code 0
[INFO] stats vm=hello-a state=exited(0) cpu_us=812 runs=3 exits=41 cpuid=0 rdmsr=0 wrmsr=0 io=38 hlt=0 vmcall=3 ept=0 preempt=0 extint=0 other=0
[INFO] stats vm=hello-b state=exited(0) cpu_us=790 runs=3 exits=41 cpuid=0 rdmsr=0 wrmsr=0 io=38 hlt=0 vmcall=3 ept=0 preempt=0 extint=0 other=0
[INFO] hv: all VMs stopped: 2 exited, 0 failed
";

    const HELLO_SCENARIO: &str = r#"
description = "two VMs print"
engine = "vmx"
timeout_s = 120
cmdline = ""
images = ["hello"]
expect = [
    "hello-a | Hello from the serial port",
    "hello-b | Hello from the console hypercall",
    "[INFO] hv: all VMs stopped: 2 exited, 0 failed",
]
reject = [": stopped:", "[ERROR]"]
"#;

    fn scenario(text: &str) -> Scenario {
        parse(text).unwrap()
    }

    fn with_fairness(vms: &[&str], tolerance: f64) -> Scenario {
        let mut s = scenario(HELLO_SCENARIO);
        s.cpu_fairness = Some(Fairness {
            vms: vms.iter().map(|v| v.to_string()).collect(),
            tolerance,
            end_tolerance: None,
        });
        s
    }

    #[test]
    fn parses_the_documented_format() {
        let s = scenario(
            r#"
description = "fair"
engine = "vmx"
timeout_s = 300
images = ["busy"]
expect = ["x"]
[cpu_fairness]
vms = ["busy-1", "busy-2", "busy-3", "busy-4"]
tolerance = 0.20
"#,
        );
        assert_eq!(s.engine, EngineKind::Vmx);
        assert_eq!(s.timeout_s, 300);
        assert_eq!(s.cmdline, "");
        assert!(s.reject.is_empty());
        let f = s.cpu_fairness.unwrap();
        assert_eq!(f.vms.len(), 4);
        assert_eq!(f.tolerance, 0.20);
        let s = scenario("description=\"\"\nengine=\"no-vmx\"\ntimeout_s=60\nexpect=[\"VT-x\"]\n");
        assert_eq!(s.engine, EngineKind::NoVmx);
        assert!(s.images.is_empty());
    }

    #[test]
    fn rejects_bad_scenario_files() {
        let cases = [
            ("engine = \"kvm\"", "unknown variant"),
            ("colour = 1", "unknown field"),
            ("timeout_s = 0", "timeout_s"),
            ("expect = []", "at least one"),
            ("expect = [\"\"]", "empty strings"),
            ("images = [\"../x\"]", "invalid image name"),
            ("cmdline = \"a;b\"", "not allowed"),
        ];
        for (change, message) in cases {
            let key = change.split_whitespace().next().unwrap();
            let mut text: String = HELLO_SCENARIO
                .lines()
                .filter(|l| !l.starts_with(key))
                .collect::<Vec<_>>()
                .join("\n");
            if key == "expect" {
                // Drop the multi-line array's remaining lines too.
                text = text
                    .lines()
                    .filter(|l| !l.starts_with("    \"") && *l != "]")
                    .collect::<Vec<_>>()
                    .join("\n");
            }
            text = format!("{change}\n{text}");
            let err = parse(&text).unwrap_err();
            assert!(err.contains(message), "`{change}`: {err}");
        }
        let fair = "[cpu_fairness]\nvms = [\"a\"]\ntolerance = 0.2\n";
        let err = parse(&format!("{HELLO_SCENARIO}{fair}")).unwrap_err();
        assert!(err.contains("at least two"), "{err}");
        let fair = "[cpu_fairness]\nvms = [\"a\", \"b\"]\ntolerance = -1.0\n";
        assert!(parse(&format!("{HELLO_SCENARIO}{fair}")).is_err());
    }

    #[test]
    fn kernel_cmdline_always_exits_the_emulator() {
        let mut s = scenario(HELLO_SCENARIO);
        assert_eq!(s.kernel_cmdline(), "exit=emulator");
        s.cmdline = " log=debug ".into();
        assert_eq!(s.kernel_cmdline(), "exit=emulator log=debug");
    }

    #[test]
    fn a_good_log_passes() {
        let verdict = judge(&scenario(HELLO_SCENARIO), HELLO_LOG);
        assert!(verdict.passed(), "{:?}", verdict.failures);
        assert_eq!(verdict.fairness, None);
    }

    #[test]
    fn missing_lines_fail_each_by_name() {
        let log = HELLO_LOG.replace("hello-a | Hello from the serial port\n", "");
        let log = log.replace("2 exited, 0 failed", "1 exited, 1 failed");
        let verdict = judge(&scenario(HELLO_SCENARIO), &log);
        assert_eq!(
            verdict.failures,
            vec![
                "expected text not found: \"hello-a | Hello from the serial port\"",
                "expected text not found: \"[INFO] hv: all VMs stopped: 2 exited, 0 failed\"",
            ]
        );
    }

    #[test]
    fn expectations_match_within_one_line_only() {
        // The two halves are on consecutive lines: that is not a match.
        let mut s = scenario(HELLO_SCENARIO);
        s.expect = vec!["report hello=1\n[INFO] vm hello-b".into()];
        assert!(!judge(&s, HELLO_LOG).passed());
    }

    #[test]
    fn rejected_text_fails_with_its_line() {
        let log = format!(
            "{HELLO_LOG}[ERROR] vm hello-b: stopped: EPT violation at gpa=0x400000 (write) \
             rip=0x100123\n"
        );
        let verdict = judge(&scenario(HELLO_SCENARIO), &log);
        assert_eq!(verdict.failures.len(), 2, "{:?}", verdict.failures);
        assert!(verdict.failures[0].starts_with("rejected text \": stopped:\" found on line 14"));
        assert!(verdict.failures[1].starts_with("rejected text \"[ERROR]\""));
    }

    #[test]
    fn panics_and_exceptions_always_fail() {
        for bad in [
            "[PANIC] hv: panicked at src/main.rs:1:1",
            "[FATAL] exception #PF rip=0x1",
        ] {
            let verdict = judge(&scenario(HELLO_SCENARIO), &format!("{HELLO_LOG}{bad}\n"));
            assert!(!verdict.passed(), "{bad}");
        }
    }

    #[test]
    fn an_empty_log_fails() {
        let verdict = judge(&scenario(HELLO_SCENARIO), "");
        assert_eq!(verdict.failures[0], "the serial log is empty");
    }

    #[test]
    fn crlf_logs_are_judged_by_their_text() {
        let mut s = scenario(HELLO_SCENARIO);
        s.reject = vec!["failed\r".into()];
        let log = HELLO_LOG.replace('\n', "\r\n");
        assert!(judge(&s, &log).passed());
    }

    #[test]
    fn cpu_times_from_stats_lines() {
        let times = cpu_times(HELLO_LOG.lines());
        assert_eq!(times.get("hello-a"), Some(&812));
        assert_eq!(times.get("hello-b"), Some(&790));
        assert_eq!(times.len(), 2);
        // A line without cpu_us, or with a garbled value, does not count.
        let times = cpu_times([
            "[INFO] stats vm=x state=failed",
            "[INFO] stats vm=y cpu_us=1x",
        ]);
        assert!(times.is_empty());
    }

    #[test]
    fn fairness_within_tolerance_passes() {
        // (812 - 790) / 790 = 2.8%.
        let verdict = judge(&with_fairness(&["hello-a", "hello-b"], 0.05), HELLO_LOG);
        assert!(verdict.passed(), "{:?}", verdict.failures);
        let report = verdict.fairness.unwrap();
        assert!((report.spread - 22.0 / 790.0).abs() < 1e-12);
        assert_eq!(
            report.cpu_us,
            vec![("hello-a".to_owned(), 812), ("hello-b".to_owned(), 790)]
        );
    }

    #[test]
    fn unfair_cpu_time_fails() {
        let verdict = judge(&with_fairness(&["hello-a", "hello-b"], 0.02), HELLO_LOG);
        assert_eq!(verdict.failures.len(), 1);
        assert!(
            verdict.failures[0].starts_with("CPU time not fair"),
            "{:?}",
            verdict.failures
        );
        assert!(
            verdict.failures[0].contains("spread 2.8% (limit 2.0%)"),
            "{:?}",
            verdict
        );
    }

    #[test]
    fn fairness_needs_every_vm_and_nonzero_time() {
        let verdict = judge(&with_fairness(&["hello-a", "busy-9"], 0.5), HELLO_LOG);
        assert_eq!(
            verdict.failures,
            vec!["cpu_fairness: no stats line with cpu_us for vm busy-9"]
        );
        let log = HELLO_LOG.replace("cpu_us=790", "cpu_us=0");
        let verdict = judge(&with_fairness(&["hello-a", "hello-b"], 100.0), &log);
        assert!(
            verdict.failures[0].contains("no CPU time"),
            "{:?}",
            verdict.failures
        );
    }

    /// The hello log plus busy TSC reports: both VMs start at 1000; they end at `end_a`, `end_b`.
    fn log_with_ends(end_a: u64, end_b: u64) -> String {
        format!(
            "{HELLO_LOG}[INFO] vm hello-a: report busy_start_tsc=1000\n\
             [INFO] vm hello-b: report busy_start_tsc=1000\n\
             [INFO] vm hello-a: report busy_end_tsc={end_a}\n\
             [INFO] vm hello-b: report busy_end_tsc={end_b}\n"
        )
    }

    fn with_end_tolerance(end_tolerance: f64) -> Scenario {
        let mut s = with_fairness(&["hello-a", "hello-b"], 0.05);
        s.cpu_fairness.as_mut().unwrap().end_tolerance = Some(end_tolerance);
        s
    }

    #[test]
    fn interleaved_ends_pass_the_scheduling_check() {
        // Ends 1,000 ticks apart over a 100,000-tick run: 1%.
        let verdict = judge(&with_end_tolerance(0.10), &log_with_ends(100_000, 101_000));
        assert!(verdict.passed(), "{:?}", verdict.failures);
        let spread = verdict.fairness.unwrap().end_spread.unwrap();
        assert!((spread - 1_000.0 / 100_000.0).abs() < 1e-12, "{spread}");
    }

    #[test]
    fn sequential_ends_fail_the_scheduling_check() {
        // One VM ran to completion before the other started its share: ends half a run apart.
        let verdict = judge(&with_end_tolerance(0.10), &log_with_ends(51_000, 101_000));
        assert_eq!(verdict.failures.len(), 1, "{:?}", verdict.failures);
        assert!(
            verdict.failures[0].starts_with("scheduling not fair")
                && verdict.failures[0].contains("50.00%"),
            "{:?}",
            verdict.failures
        );
    }

    #[test]
    fn scheduling_check_needs_the_reports() {
        let verdict = judge(&with_end_tolerance(0.10), HELLO_LOG);
        assert_eq!(
            verdict.failures,
            vec!["cpu_fairness: no busy_start_tsc report from vm hello-a"]
        );
        let verdict = judge(&with_end_tolerance(0.10), &log_with_ends(900, 2000));
        assert!(
            verdict.failures[0].contains("ending before it started"),
            "{:?}",
            verdict.failures
        );
        let bad = HELLO_SCENARIO.to_owned()
            + "[cpu_fairness]\nvms=[\"a\",\"b\"]\ntolerance=0.2\nend_tolerance=2.0\n";
        assert!(parse(&bad).unwrap_err().contains("end_tolerance"));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), vec!["b", "c"]);
        assert_eq!(tail("a\n", 40), vec!["a"]);
    }

    #[test]
    fn discovers_and_selects_scenarios() {
        let base = std::env::temp_dir().join(format!("xtask-scenarios-{}", std::process::id()));
        for name in ["b", "a", "not-a-scenario"] {
            fs::create_dir_all(base.join(name)).unwrap();
        }
        fs::write(base.join("a/scenario.toml"), HELLO_SCENARIO).unwrap();
        fs::write(base.join("b/scenario.toml"), HELLO_SCENARIO).unwrap();
        let all = discover(&base, &[]).unwrap();
        let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        let picked = discover(&base, &["b".into(), "tests/scenarios/a/".into()]).unwrap();
        assert_eq!(picked[0].name, "b");
        assert_eq!(picked[1].name, "a");
        let err = discover(&base, &["c".into()]).unwrap_err().to_string();
        assert!(
            err.contains("no scenario named `c`") && err.contains("a, b"),
            "{err}"
        );
        // `a` has no manifest.toml: loading says so.
        let err = all[0].load().unwrap_err().to_string();
        assert!(err.contains("manifest.toml"), "{err}");
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn every_scenario_in_the_repository_loads() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios");
        let scenarios = discover(&base, &[]).unwrap();
        assert!(!scenarios.is_empty());
        for s in scenarios {
            s.load().unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn at_least_checks_figures_of_the_last_matching_line() {
        let log =
            "[INFO] mem: saved_zero=0 saved_shared=3\n[INFO] mem: saved_zero=7 saved_shared=12\n";
        let with = |key: &str, min: u64| {
            let mut s = scenario(HELLO_SCENARIO);
            s.expect = vec!["mem:".to_owned()];
            s.reject.clear();
            s.at_least = vec![AtLeast {
                line: "[INFO] mem:".to_owned(),
                key: key.to_owned(),
                min,
            }];
            judge(&s, log).failures
        };
        assert!(with("saved_shared", 12).is_empty());
        assert!(with("saved_zero", 1).is_empty());
        assert_eq!(
            with("saved_shared", 13),
            ["at_least: saved_shared=12 is below 13 in \"[INFO] mem: saved_zero=7 saved_shared=12\""]
        );
        // `saved` must not match `saved_zero`: whole keys only.
        assert!(with("saved", 0)[0].starts_with("at_least: no saved=N"));
        let mut s = scenario(HELLO_SCENARIO);
        s.at_least = vec![AtLeast {
            line: "[INFO] nothing".to_owned(),
            key: "x".to_owned(),
            min: 0,
        }];
        assert!(judge(&s, HELLO_LOG)
            .failures
            .contains(&"at_least: no line contains \"[INFO] nothing\"".to_owned()));
        let text = HELLO_SCENARIO.to_owned() + "[[at_least]]\nline = \"a\"\nkey = \"b\"\nmin = 2\n";
        assert_eq!(parse(&text).unwrap().at_least.len(), 1);
    }
}
