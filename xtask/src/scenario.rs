//! Integration scenarios: the `scenario.toml` format and the verdict on a serial log.
//!
//! A scenario is a directory `tests/scenarios/<name>/` with `scenario.toml` (what to boot and
//! what the log must show) and `manifest.toml` (the boot manifest). The format (also in
//! tests/scenarios/README.md):
//!
//! ```toml
//! description = "two VMs print"
//! engine = "vmx"          # or "no-vmx" (QEMU TCG)
//! timeout_s = 120         # hard limit of the emulator run
//! bochs_ips = 400000000   # optional: Bochs's emulated instructions per emulated second
//!                         # (default engine::BOCHS_IPS, 4000000; 1000000 to 2000000000)
//! memory_mib = 128           # optional: the emulated machine's RAM (default 256, 64..=8192)
//! bochs_cpu = "corei7_haswell_4770"  # optional: another Bochs CPU model (default
//!                         # engine::BOCHS_CPU_MODEL; one of engine::BOCHS_CPU_MODELS)
//! cmdline = ""            # extra hypervisor words; the runner always adds exit=emulator
//! images = ["hello"]      # test-guests binaries on the ISO
//! expect = [              # patterns (below) each matching some line of the log
//!     "hello-a | Hello from the serial port",
//!     "[INFO] hv: all VMs stopped: 2 exited, 0 failed",
//! ]
//! reject = ["[ERROR] vm ", "* | panic at"]  # patterns matching no line; [PANIC], [FATAL] always
//! [[at_least]]            # optional, any number: a figure of the log that must be reached
//! line = "[INFO] mem: "   # the last hypervisor line containing this ...
//! key = "saved_shared"    # ... has a word saved_shared=N ...
//! min = 1                 # ... with N >= 1
//! [[at_most]]             # optional, any number: the same with N <= max
//! line = "[INFO] stats vm=hello-a "
//! key = "cpu_us"
//! max = 100000
//! [[relative]]            # optional, any number: a figure against another one
//! line = "[INFO] vm rate-10: report rate_tsc="
//! key = "rate_tsc"
//! base_line = "[INFO] vm rate-1: report rate_tsc="
//! base_key = "rate_tsc"   # optional, default key
//! ratio = 10.0            # N / BASE must be ratio x (1 +- tolerance)
//! tolerance = 0.001
//! [cpu_fairness]          # optional, from the `[INFO] stats vm=NAME ... cpu_us=N` lines
//! vms = ["busy-1", "busy-2"]
//! tolerance = 0.20        # (max - min) / min of cpu_us
//! end_tolerance = 0.10    # optional: spread of the VMs' `busy_end_tsc` reports over the run
//! [[input]]               # optional, any number, in order: typed on the serial console
//! after = "echo-1 | ready"  # once some line of the log matches this pattern
//! text = "echo-1: hello"    # these characters, then "\r" (Enter); `NAME: ` names a VM
//! ```
//!
//! # Input
//!
//! `[[input]]` entries make the run interactive: the runner is the other end of COM1 (a socket
//! instead of a file, engine.rs) and an [`InputFeeder`] decides when to type what. Entries are
//! typed in their order: entry k goes out as soon as entry k - 1 has and some line of the log so
//! far has matched entry k's `after` (also a line that came before entry k - 1 was typed). The
//! hypervisor delivers a line `NAME: text` to the COM1 of the VM NAME as `text` and CR, so `text`
//! must start with the name of a VM of the manifest, then `: `; it may not contain control
//! characters (CR is added, and would end the line early). An entry never typed fails the run.
//!
//! # Whose line
//!
//! The serial log mixes the hypervisor's own lines with the VMs' console output, whose text the
//! guests choose. So every line is classified first, by what only the hypervisor writes:
//!
//! - a *hypervisor line* starts with `[ERROR] `, `[WARN] `, `[INFO] `, `[DEBUG] `, `[TRACE] `,
//!   `[PANIC]` or `[FATAL]`;
//! - a *console line* is `NAME | TEXT` with NAME the `name` of a `[[vm]]` of the scenario's
//!   `manifest.toml` (the hypervisor writes `NAME | `; the guest writes TEXT, in which the
//!   hypervisor shows control characters as `.`, so that no guest can start a line of its own);
//! - any other line (firmware, GRUB) is matched by no pattern.
//!
//! Every pattern (of `expect`, `reject`, and the `line` of `[[at_least]]` and `[[at_most]]`)
//! says whose line it is about:
//!
//! - `"[LEVEL] ..."`, starting with one of the seven tags: a substring of a hypervisor line;
//! - `"NAME | TEXT"`: TEXT is a substring of the TEXT of a console line of the VM NAME;
//!   `"NAME |"` alone matches every console line of that VM;
//! - `"* | TEXT"`: the same on the console of any VM of the manifest.
//!
//! Anything else is an error in the scenario file, never a pattern that silently matches
//! nothing: a pattern of neither form, a NAME that is no VM of the manifest, a hypervisor
//! pattern `[LEVEL] vm NAME...` or `[LEVEL] stats vm=NAME...` whose NAME is no VM of the
//! manifest (a NAME at the very end of the pattern may be the beginning of one), a line break
//! in a pattern, `[[at_least]]`/`[[at_most]]` lines that are not hypervisor patterns, and
//! `cpu_fairness.vms` that are not VMs of the manifest. The figures (`[[at_least]]`,
//! `[[at_most]]`, `[cpu_fairness]`) are read from hypervisor lines only.
//!
//! Equal work gives equal `cpu_us` under any scheduler, so `tolerance` checks the accounting.
//! `end_tolerance` checks the scheduling: from each VM's `report busy_start_tsc=` and
//! `report busy_end_tsc=` lines, `(last end - first end) / (last end - first start)`. A fair
//! round robin ends equal work within about one round (a fraction of a percent); running the VMs
//! one after the other spreads their ends over `(n - 1) / n` of the run.
//!
//! Everything here is pure (text in, verdict out), so it is unit-tested against sample logs.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine;
use crate::error::{Error, IoContext, Result};
use crate::iso;

/// Tags that fail every scenario when a hypervisor line starts with them: a hypervisor panic or
/// an unexpected CPU exception in the hypervisor.
pub const ALWAYS_REJECT: &[&str] = &["[PANIC]", "[FATAL]"];

/// What starts a hypervisor line: a log record's level (then a space), or the panic and
/// exception handlers' tags.
const HYPERVISOR_TAGS: &[&str] = &[
    "[ERROR] ", "[WARN] ", "[INFO] ", "[DEBUG] ", "[TRACE] ", "[PANIC]", "[FATAL]",
];

/// What starts a console line pattern that applies to every VM of the manifest.
const ANY_VM: &str = "*";

/// What a scenario needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// VT-x: Bochs, or QEMU+KVM with nested VMX.
    Vmx,
    /// No VT-x: QEMU TCG.
    NoVmx,
}

/// What `memory_mib` may be: enough for the hypervisor's 16 MiB heap and a VM, and room above
/// 4 GiB (Bochs allocates up to 2 GiB at start and the rest on the guest's first touch).
const MEMORY_MIB_RANGE: std::ops::RangeInclusive<u32> = 64..=8192;
/// What `bochs_ips` may be: Bochs needs at least a million, and keeps the figure in 32 bits.
const BOCHS_IPS_RANGE: std::ops::RangeInclusive<u64> = 1_000_000..=2_000_000_000;

/// `scenario.toml` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    description: String,
    engine: EngineKind,
    timeout_s: u64,
    bochs_ips: Option<u64>,
    bochs_cpu: Option<String>,
    memory_mib: Option<u32>,
    #[serde(default)]
    cmdline: String,
    #[serde(default)]
    images: Vec<String>,
    #[serde(default)]
    expect: Vec<String>,
    #[serde(default)]
    reject: Vec<String>,
    cpu_fairness: Option<Fairness>,
    #[serde(default)]
    at_least: Vec<AtLeast>,
    #[serde(default)]
    at_most: Vec<AtMost>,
    #[serde(default)]
    relative: Vec<RelativeEntry>,
    #[serde(default)]
    input: Vec<InputEntry>,
}

/// `[[relative]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelativeEntry {
    line: String,
    key: String,
    base_line: String,
    base_key: Option<String>,
    ratio: f64,
    tolerance: f64,
}

/// `[[input]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputEntry {
    after: String,
    text: String,
}

/// `[[at_least]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AtLeast {
    line: String,
    key: String,
    min: u64,
}

/// `[[at_most]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AtMost {
    line: String,
    key: String,
    max: u64,
}

/// A checked scenario: `scenario.toml` with its patterns resolved against the manifest's VMs.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// One line: what the scenario proves.
    pub description: String,
    /// The engine it needs.
    pub engine: EngineKind,
    /// Hard limit of the emulator run, seconds.
    pub timeout_s: u64,
    /// Bochs's instructions per emulated second: how fast the emulated CPU is against the
    /// guests' clocks (a scenario about latencies in microseconds needs a faster one than the
    /// default).
    pub bochs_ips: u64,
    /// The Bochs CPU model: which VMX features the hypervisor finds.
    pub bochs_cpu: String,
    /// The emulated machine's RAM, MiB.
    pub memory_mib: u32,
    /// Extra hypervisor command-line words.
    pub cmdline: String,
    /// Guest binaries on the ISO (module name = binary name).
    pub images: Vec<String>,
    /// The names of the manifest's VMs: the `NAME` of the console lines.
    pub vms: Vec<String>,
    /// Each must match some line of the serial log.
    pub expect: Vec<Pattern>,
    /// None may match any line of the serial log.
    pub reject: Vec<Pattern>,
    /// Optional CPU-time fairness check.
    pub cpu_fairness: Option<Fairness>,
    /// Figures of the log that must be within bounds: `key=N` words of a hypervisor line.
    pub figures: Vec<Figure>,
    /// Figures that must be a given multiple of others (`[[relative]]`).
    pub relative: Vec<Relative>,
    /// What to type on the serial console, and when; empty for a run without input.
    pub inputs: Vec<Input>,
}

/// One `[[input]]`: when a line matching `after` has appeared, type `text` and Enter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// The line to wait for.
    pub after: Pattern,
    /// What to type, without the CR that ends it.
    pub text: String,
}

impl Input {
    fn parse(after: &str, text: &str, vms: &[String]) -> Result<Input, String> {
        let after = Pattern::parse(after, vms).map_err(|e| format!("input.after: {e}"))?;
        if let Some(c) = text.chars().find(|c| c.is_control()) {
            return Err(format!(
                "input.text {text:?}: control character {c:?} (the runner adds the CR that ends \
                 the line)"
            ));
        }
        let Some((name, _)) = text.split_once(": ") else {
            return Err(format!(
                "input.text {text:?}: the hypervisor's console takes `NAME: text`, NAME a VM"
            ));
        };
        if !vms.iter().any(|vm| vm == name) {
            return Err(format!(
                "input.text {text:?}: {name:?} is not a VM of the manifest ({})",
                known_vms(vms)
            ));
        }
        Ok(Input {
            after,
            text: text.to_owned(),
        })
    }
}

/// Types a scenario's inputs as the serial log arrives: feed it every byte the emulator's COM1
/// sends ([`InputFeeder::feed`]); it returns the bytes to send back. Pure, so the timing rules
/// are unit-tested. Or, for `cargo xtask run`, types what the user types ([`Self::terminal`]).
#[derive(Debug)]
pub struct InputFeeder {
    vms: Vec<String>,
    inputs: Vec<Input>,
    /// Whether some line so far matched input k's `after`.
    seen: Vec<bool>,
    /// The first input not typed yet.
    next: usize,
    /// The unfinished last line.
    partial: Vec<u8>,
    /// Lines the user types on the terminal (`cargo xtask run`), read by a thread.
    terminal: Option<std::sync::mpsc::Receiver<String>>,
}

impl InputFeeder {
    /// A feeder of what the user types on standard input, line by line (`NAME: text` goes to
    /// VM NAME, as the hypervisor's console routes it), for `cargo xtask run`.
    pub fn terminal() -> Self {
        let (send, receive) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        InputFeeder {
            vms: Vec::new(),
            inputs: Vec::new(),
            seen: Vec::new(),
            next: 0,
            partial: Vec::new(),
            terminal: Some(receive),
        }
    }

    /// What the user typed since the last call, each line ended by a CR (Enter on a serial
    /// terminal).
    pub fn typed(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(lines) = &self.terminal {
            for line in lines.try_iter() {
                out.extend_from_slice(line.trim_end_matches('\r').as_bytes());
                out.push(b'\r');
            }
        }
        out
    }

    /// The feeder of `scenario`'s inputs.
    pub fn new(scenario: &Scenario) -> Self {
        InputFeeder {
            vms: scenario.vms.clone(),
            inputs: scenario.inputs.clone(),
            seen: vec![false; scenario.inputs.len()],
            next: 0,
            partial: Vec::new(),
            terminal: None,
        }
    }

    /// Takes bytes of the serial log; returns what to type now (each text and a CR).
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &byte in bytes {
            if byte != b'\n' {
                self.partial.push(byte);
                continue;
            }
            let line = String::from_utf8_lossy(&self.partial).into_owned();
            self.partial.clear();
            self.line(line.trim_end_matches('\r'), &mut out);
        }
        out
    }

    fn line(&mut self, line: &str, out: &mut Vec<u8>) {
        let class = classify(line, &self.vms);
        for (k, input) in self.inputs.iter().enumerate().skip(self.next) {
            if input.after.matches(line, &class) {
                self.seen[k] = true;
            }
        }
        while self.next < self.inputs.len() && self.seen[self.next] {
            out.extend_from_slice(self.inputs[self.next].text.as_bytes());
            out.push(b'\r');
            self.next += 1;
        }
    }

    /// The inputs not typed (yet), in order.
    pub fn untyped(&self) -> &[Input] {
        &self.inputs[self.next..]
    }
}

/// Whose lines a pattern is matched against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The hypervisor's own lines.
    Hypervisor,
    /// The console lines of the VM of this name.
    Vm(String),
    /// The console lines of every VM of the manifest.
    AnyVm,
}

/// One pattern of `expect`, `reject` or a figure's `line`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    /// Whose lines it is matched against.
    pub source: Source,
    /// For hypervisor lines the whole pattern, a substring of the line; for console lines the
    /// text after `NAME | `, a substring of the guest's text.
    pub text: String,
    /// As written in `scenario.toml`.
    pub raw: String,
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.raw)
    }
}

/// Whether `s` is a name the manifest accepts for a VM (hv-manifest's `NAME_CHARS`, non-empty):
/// only such VMs can run, and only their names make console lines.
fn is_vm_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(is_name_char)
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

fn known_vms(vms: &[String]) -> String {
    if vms.is_empty() {
        "the manifest has none".to_owned()
    } else {
        format!("the manifest's VMs are {}", vms.join(", "))
    }
}

impl Pattern {
    /// Reads one pattern, against the names of the manifest's VMs.
    pub fn parse(raw: &str, vms: &[String]) -> Result<Pattern, String> {
        if raw.is_empty() {
            return Err("patterns may not be empty strings".to_owned());
        }
        if raw.contains(['\n', '\r']) {
            return Err(format!(
                "pattern {raw:?}: a log line has no line break; make it two patterns"
            ));
        }
        if raw.starts_with('[') {
            return Self::hypervisor(raw, vms);
        }
        let console = raw.split_once(" |").filter(|(_, rest)| {
            // `NAME |` alone, or `NAME | TEXT`.
            rest.is_empty() || rest.starts_with(' ')
        });
        let Some((who, rest)) = console else {
            return Err(format!(
                "pattern {raw:?}: say whose line it is about: \"[LEVEL] ...\" for a hypervisor \
                 line, \"NAME | TEXT\" for the console of the VM NAME, \"* | TEXT\" for the \
                 console of any VM"
            ));
        };
        let text = rest.strip_prefix(' ').unwrap_or(rest).to_owned();
        let source = if who == ANY_VM {
            Source::AnyVm
        } else if vms.iter().any(|vm| vm == who) {
            Source::Vm(who.to_owned())
        } else {
            return Err(format!(
                "pattern {raw:?}: {who:?} is not a VM of the manifest ({})",
                known_vms(vms)
            ));
        };
        Ok(Pattern {
            source,
            text,
            raw: raw.to_owned(),
        })
    }

    fn hypervisor(raw: &str, vms: &[String]) -> Result<Pattern, String> {
        let Some(rest) = HYPERVISOR_TAGS
            .iter()
            .find_map(|tag| raw.strip_prefix(tag.trim_end()))
        else {
            return Err(format!(
                "pattern {raw:?}: a hypervisor pattern starts with one of {}",
                HYPERVISOR_TAGS
                    .iter()
                    .map(|t| t.trim_end())
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        };
        // `[LEVEL] vm NAME: ...` (a VM's log context) and `[INFO] stats vm=NAME ...`.
        let named = rest
            .strip_prefix(" vm ")
            .or_else(|| rest.strip_prefix(" stats vm="));
        if let Some(after) = named {
            let end = after.find(|c| !is_name_char(c));
            let name = &after[..end.unwrap_or(after.len())];
            let known = match end {
                // The name is complete: it must be one.
                Some(_) => vms.iter().any(|vm| vm == name),
                // The pattern ends inside the name: it must begin one.
                None => vms.iter().any(|vm| vm.starts_with(name)),
            };
            if !known {
                return Err(format!(
                    "pattern {raw:?}: vm {name:?} is not a VM of the manifest ({})",
                    known_vms(vms)
                ));
            }
        }
        Ok(Pattern {
            source: Source::Hypervisor,
            text: raw.to_owned(),
            raw: raw.to_owned(),
        })
    }

    /// Whether the log line `line`, of class `class`, matches.
    fn matches(&self, line: &str, class: &Line<'_>) -> bool {
        match (&self.source, class) {
            (Source::Hypervisor, Line::Hypervisor) => line.contains(self.text.as_str()),
            (Source::Vm(name), Line::Console { vm, text }) => {
                name == vm && text.contains(self.text.as_str())
            }
            (Source::AnyVm, Line::Console { text, .. }) => text.contains(self.text.as_str()),
            _ => false,
        }
    }
}

/// What a log line is, by whom it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line<'a> {
    /// The hypervisor's own line.
    Hypervisor,
    /// A VM's console line: `vm | text`.
    Console { vm: &'a str, text: &'a str },
    /// Anything else: firmware, the boot loader.
    Other,
}

fn classify<'a>(line: &'a str, vms: &[String]) -> Line<'a> {
    if HYPERVISOR_TAGS.iter().any(|tag| line.starts_with(tag)) {
        return Line::Hypervisor;
    }
    match line.split_once(" | ") {
        Some((vm, text)) if vms.iter().any(|v| v == vm) => Line::Console { vm, text },
        _ => Line::Other,
    }
}

/// One `[[at_least]]` or `[[at_most]]`: in the last hypervisor line that `line` matches, the
/// word `key=N` has N within `bound`.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Picks the line (the last one it matches); a hypervisor pattern.
    pub line: Pattern,
    /// The key of a `key=N` word of that line.
    pub key: String,
    /// The acceptable values of N.
    pub bound: Bound,
}

/// The bound of a [`Figure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// `[[at_least]]`: N >= min.
    AtLeast(u64),
    /// `[[at_most]]`: N <= max.
    AtMost(u64),
    /// One side of a `[[relative]]`: no bound of its own.
    Relative,
}

impl Bound {
    fn table(self) -> &'static str {
        match self {
            Bound::AtLeast(_) => "at_least",
            Bound::AtMost(_) => "at_most",
            Bound::Relative => "relative",
        }
    }
}

impl Figure {
    fn parse(table: Bound, line: &str, key: &str, vms: &[String]) -> Result<Figure, String> {
        let name = table.table();
        let line = Pattern::parse(line, vms).map_err(|e| format!("{name}.line: {e}"))?;
        if line.source != Source::Hypervisor {
            return Err(format!(
                "{name}.line {}: figures are read from hypervisor lines only; start it with \
                 \"[LEVEL] \"",
                line
            ));
        }
        if key.is_empty() || key.contains(['=', ' ']) {
            return Err(format!("{name}.key {key:?}: the key of a key=N word"));
        }
        Ok(Figure {
            line,
            key: key.to_owned(),
            bound: table,
        })
    }
}

/// One `[[relative]]`: the figure `figure` (its bound unused) divided by the figure `base`
/// must be `ratio` within a relative `tolerance`.
#[derive(Debug, Clone, PartialEq)]
pub struct Relative {
    pub figure: Figure,
    pub base: Figure,
    pub ratio: f64,
    pub tolerance: f64,
}

impl Relative {
    fn parse(entry: &RelativeEntry, vms: &[String]) -> Result<Relative, String> {
        let figure = Figure::parse(Bound::Relative, &entry.line, &entry.key, vms)?;
        let base_key = entry.base_key.as_deref().unwrap_or(&entry.key);
        let base = Figure::parse(Bound::Relative, &entry.base_line, base_key, vms)?;
        if !(entry.ratio.is_finite() && entry.ratio > 0.0) {
            return Err("relative.ratio must be a number above 0".to_owned());
        }
        if !(entry.tolerance.is_finite() && entry.tolerance >= 0.0) {
            return Err("relative.tolerance must be a number >= 0".to_owned());
        }
        Ok(Relative {
            figure,
            base,
            ratio: entry.ratio,
            tolerance: entry.tolerance,
        })
    }
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

    /// Reads `manifest.toml` for the VM names, then reads and checks `scenario.toml` against
    /// them.
    pub fn load(&self) -> Result<Scenario> {
        let manifest = self.manifest();
        if !manifest.is_file() {
            return Err(Error::config(
                &manifest,
                "missing (every scenario needs its manifest)",
            ));
        }
        let text =
            fs::read_to_string(&manifest).context(|| format!("reading {}", manifest.display()))?;
        let vms = manifest_vm_names(&text).map_err(|message| Error::config(&manifest, message))?;
        let path = self.dir.join("scenario.toml");
        let text = fs::read_to_string(&path).context(|| format!("reading {}", path.display()))?;
        parse(&text, &vms).map_err(|message| Error::config(&path, message))
    }
}

/// The names of the `[[vm]]` entries of a manifest, in order and once each, as far as the
/// manifest allows them as names. Entries the hypervisor will refuse for other reasons (an
/// unknown key, a missing image, a duplicate) count too: a scenario may check that such a VM
/// printed nothing.
pub fn manifest_vm_names(text: &str) -> Result<Vec<String>, String> {
    #[derive(Deserialize)]
    struct Manifest {
        #[serde(default)]
        vm: Vec<Vm>,
    }
    #[derive(Deserialize)]
    struct Vm {
        name: Option<toml::Value>,
    }
    let manifest: Manifest = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = Vec::new();
    for vm in manifest.vm {
        if let Some(toml::Value::String(name)) = vm.name {
            if is_vm_name(&name) && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    Ok(names)
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

/// Parses and validates `scenario.toml` text; `vms` are the names of the manifest's VMs
/// ([`manifest_vm_names`]).
pub fn parse(text: &str, vms: &[String]) -> Result<Scenario, String> {
    let file: ScenarioFile = toml::from_str(text).map_err(|e| e.to_string())?;
    if file.timeout_s == 0 {
        return Err("timeout_s must be at least 1".to_owned());
    }
    let bochs_cpu = file
        .bochs_cpu
        .unwrap_or_else(|| engine::BOCHS_CPU_MODEL.to_owned());
    if !engine::BOCHS_CPU_MODELS.contains(&bochs_cpu.as_str()) {
        return Err(format!(
            "bochs_cpu {bochs_cpu:?} is not a Bochs CPU model with VT-x and EPT ({})",
            engine::BOCHS_CPU_MODELS.join(", ")
        ));
    }
    let bochs_ips = file.bochs_ips.unwrap_or(engine::BOCHS_IPS);
    if !BOCHS_IPS_RANGE.contains(&bochs_ips) {
        return Err(format!(
            "bochs_ips must be from {} to {}",
            BOCHS_IPS_RANGE.start(),
            BOCHS_IPS_RANGE.end()
        ));
    }
    let memory_mib = file.memory_mib.unwrap_or(engine::MEMORY_MIB);
    if !MEMORY_MIB_RANGE.contains(&memory_mib) {
        return Err(format!(
            "memory_mib must be from {} to {}",
            MEMORY_MIB_RANGE.start(),
            MEMORY_MIB_RANGE.end()
        ));
    }
    // A scenario that expects nothing passes on an empty log: it could not fail.
    if file.expect.is_empty() {
        return Err("expect must list at least one pattern".to_owned());
    }
    for image in &file.images {
        iso::validate_image_name(image).map_err(|e| e.to_string())?;
    }
    iso::validate_cmdline(&file.cmdline).map_err(|e| e.to_string())?;
    let patterns = |list: &[String], name: &str| -> Result<Vec<Pattern>, String> {
        list.iter()
            .map(|raw| Pattern::parse(raw, vms).map_err(|e| format!("{name}: {e}")))
            .collect()
    };
    let expect = patterns(&file.expect, "expect")?;
    let reject = patterns(&file.reject, "reject")?;
    let mut figures = Vec::new();
    for f in &file.at_least {
        figures.push(Figure::parse(Bound::AtLeast(f.min), &f.line, &f.key, vms)?);
    }
    for f in &file.at_most {
        figures.push(Figure::parse(Bound::AtMost(f.max), &f.line, &f.key, vms)?);
    }
    let relative = file
        .relative
        .iter()
        .map(|r| Relative::parse(r, vms))
        .collect::<Result<Vec<_>, String>>()?;
    let inputs = file
        .input
        .iter()
        .map(|i| Input::parse(&i.after, &i.text, vms))
        .collect::<Result<Vec<_>, String>>()?;
    if let Some(fairness) = &file.cpu_fairness {
        if fairness.vms.len() < 2 {
            return Err("cpu_fairness.vms needs at least two VMs".to_owned());
        }
        if let Some(vm) = fairness.vms.iter().find(|vm| !vms.contains(vm)) {
            return Err(format!(
                "cpu_fairness.vms: {vm:?} is not a VM of the manifest ({})",
                known_vms(vms)
            ));
        }
        if !(fairness.tolerance.is_finite() && fairness.tolerance >= 0.0) {
            return Err("cpu_fairness.tolerance must be a number >= 0".to_owned());
        }
        if let Some(t) = fairness.end_tolerance {
            if !(t.is_finite() && (0.0..=1.0).contains(&t)) {
                return Err("cpu_fairness.end_tolerance must be a number from 0 to 1".to_owned());
            }
        }
    }
    Ok(Scenario {
        description: file.description,
        engine: file.engine,
        timeout_s: file.timeout_s,
        bochs_ips,
        bochs_cpu,
        memory_mib,
        cmdline: file.cmdline,
        images: file.images,
        vms: vms.to_vec(),
        expect,
        reject,
        cpu_fairness: file.cpu_fairness,
        figures,
        relative,
        inputs,
    })
}

impl Scenario {
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
    let lines: Vec<(&str, Line<'_>)> = log
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .map(|l| (l, classify(l, &scenario.vms)))
        .collect();
    let hypervisor: Vec<&str> = lines
        .iter()
        .filter(|(_, class)| *class == Line::Hypervisor)
        .map(|(line, _)| *line)
        .collect();
    let mut verdict = Verdict::default();
    if lines.is_empty() {
        verdict.failures.push("the serial log is empty".to_owned());
    }
    for wanted in &scenario.expect {
        if !lines
            .iter()
            .any(|(line, class)| wanted.matches(line, class))
        {
            verdict
                .failures
                .push(format!("expected text not found: {wanted}"));
        }
    }
    for unwanted in &scenario.reject {
        let found = lines
            .iter()
            .enumerate()
            .find(|(_, (line, class))| unwanted.matches(line, class));
        if let Some((n, (line, _))) = found {
            verdict.failures.push(format!(
                "rejected text {unwanted} found on line {}: {line:?}",
                n + 1
            ));
        }
    }
    for tag in ALWAYS_REJECT {
        let found = lines
            .iter()
            .enumerate()
            .find(|(_, (line, class))| *class == Line::Hypervisor && line.starts_with(tag));
        if let Some((n, (line, _))) = found {
            verdict.failures.push(format!(
                "the hypervisor printed {tag} on line {}: {line:?}",
                n + 1
            ));
        }
    }
    for figure in &scenario.figures {
        if let Err(message) = check_figure(figure, &hypervisor) {
            verdict.failures.push(message);
        }
    }
    for relative in &scenario.relative {
        if let Err(message) = check_relative(relative, &hypervisor) {
            verdict.failures.push(message);
        }
    }
    if let Some(fairness) = &scenario.cpu_fairness {
        match check_fairness(fairness, &hypervisor) {
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

/// The value of `figure` in the hypervisor's lines: N of the word `key=N` in the last line
/// its pattern matches.
fn figure_value(figure: &Figure, hypervisor: &[&str]) -> Result<(u64, String), String> {
    let table = figure.bound.table();
    let key = &figure.key;
    let line = hypervisor
        .iter()
        .rev()
        .find(|l| l.contains(figure.line.text.as_str()))
        .ok_or_else(|| format!("{table}: no hypervisor line contains {}", figure.line))?;
    let value = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix(key.as_str())?.strip_prefix('='))
        .ok_or_else(|| format!("{table}: no {key}=N in {line:?}"))?;
    let n = value
        .parse()
        .map_err(|_| format!("{table}: {key}={value} is not a number in {line:?}"))?;
    Ok((n, (*line).to_owned()))
}

/// Checks one figure against the hypervisor's lines.
fn check_figure(figure: &Figure, hypervisor: &[&str]) -> Result<(), String> {
    let table = figure.bound.table();
    let key = &figure.key;
    let (n, line) = figure_value(figure, hypervisor)?;
    match figure.bound {
        Bound::AtLeast(min) if n < min => {
            Err(format!("{table}: {key}={n} is below {min} in {line:?}"))
        }
        Bound::AtMost(max) if n > max => {
            Err(format!("{table}: {key}={n} is above {max} in {line:?}"))
        }
        _ => Ok(()),
    }
}

/// Checks one `[[relative]]`.
fn check_relative(relative: &Relative, hypervisor: &[&str]) -> Result<(), String> {
    let (n, _) = figure_value(&relative.figure, hypervisor)?;
    let (base, _) = figure_value(&relative.base, hypervisor)?;
    let (key, base_key) = (&relative.figure.key, &relative.base.key);
    if base == 0 {
        return Err(format!(
            "relative: the base {base_key}=0 ({})",
            relative.base.line
        ));
    }
    let got = n as f64 / base as f64;
    let off = got / relative.ratio - 1.0;
    if off.abs() > relative.tolerance {
        return Err(format!(
            "relative: {key}={n} ({}) is {got:.6} times {base_key}={base} ({}), not {} within \
             {:.3}% ({:+.4}%)",
            relative.figure.line,
            relative.base.line,
            relative.ratio,
            relative.tolerance * 100.0,
            off * 100.0
        ));
    }
    Ok(())
}

/// `cpu_us` of every VM with a `[INFO] stats vm=NAME ... cpu_us=N` line (the last one wins).
/// Give it hypervisor lines only; it reads only lines that start with `[INFO] stats `.
pub fn cpu_times<'a>(lines: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, u64> {
    let mut times = BTreeMap::new();
    for line in lines {
        let Some(fields) = line.strip_prefix("[INFO] stats ") else {
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

fn check_fairness(fairness: &Fairness, hypervisor: &[&str]) -> Result<FairnessReport, String> {
    let times = cpu_times(hypervisor.iter().copied());
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
        Some(_) => Some(end_spread(&fairness.vms, hypervisor)?),
        None => None,
    };
    Ok(FairnessReport {
        cpu_us,
        spread,
        end_spread,
    })
}

/// The value of the last hypervisor line `[INFO] vm VM: report KEY=N`.
fn report_value(hypervisor: &[&str], vm: &str, key: &str) -> Option<u64> {
    let prefix = format!("[INFO] vm {vm}: report {key}=");
    hypervisor
        .iter()
        .rev()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|value| value.trim().parse().ok())
}

/// `(last end - first end) / (last end - first start)` of the VMs' busy TSC reports.
fn end_spread(vms: &[String], hypervisor: &[&str]) -> Result<f64, String> {
    let mut starts = Vec::with_capacity(vms.len());
    let mut ends = Vec::with_capacity(vms.len());
    for vm in vms {
        let start = report_value(hypervisor, vm, "busy_start_tsc")
            .ok_or_else(|| format!("no busy_start_tsc report from vm {vm}"))?;
        let end = report_value(hypervisor, vm, "busy_end_tsc")
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

    /// A log in the format of docs/architecture.md, as the `hello` scenario produces it.
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
reject = ["[ERROR] vm ", "[ERROR]", "* | panic at"]
"#;

    /// The VMs of the test manifest: the two of the hello log and a hostile one.
    fn vms() -> Vec<String> {
        ["hello-a", "hello-b", "evil"].map(String::from).to_vec()
    }

    fn scenario(text: &str) -> Scenario {
        parse(text, &vms()).unwrap()
    }

    fn pattern(raw: &str) -> Pattern {
        Pattern::parse(raw, &vms()).unwrap()
    }

    /// The hello scenario with `expect` and `reject` replaced.
    fn hello_with(expect: &[&str], reject: &[&str]) -> Scenario {
        let mut s = scenario(HELLO_SCENARIO);
        s.expect = expect.iter().map(|p| pattern(p)).collect();
        s.reject = reject.iter().map(|p| pattern(p)).collect();
        s
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
        let text = r#"
description = "fair"
engine = "vmx"
timeout_s = 300
images = ["busy"]
expect = ["[INFO] x"]
[[at_most]]
line = "[INFO] stats vm=busy-1 "
key = "cpu_us"
max = 7
[cpu_fairness]
vms = ["busy-1", "busy-2", "busy-3", "busy-4"]
tolerance = 0.20
"#;
        let busy: Vec<String> = (1..=4).map(|n| format!("busy-{n}")).collect();
        let s = parse(text, &busy).unwrap();
        assert_eq!(s.engine, EngineKind::Vmx);
        assert_eq!(s.timeout_s, 300);
        assert_eq!(s.cmdline, "");
        assert!(s.reject.is_empty());
        assert_eq!(s.figures.len(), 1);
        assert_eq!(s.figures[0].bound, Bound::AtMost(7));
        let f = s.cpu_fairness.unwrap();
        assert_eq!(f.vms.len(), 4);
        assert_eq!(f.tolerance, 0.20);
        let s = parse(
            "description=\"\"\nengine=\"no-vmx\"\ntimeout_s=60\nexpect=[\"[ERROR] hv: VT-x\"]\n",
            &[],
        )
        .unwrap();
        assert_eq!(s.engine, EngineKind::NoVmx);
        assert!(s.images.is_empty());
        assert_eq!(s.bochs_ips, engine::BOCHS_IPS);
        let s = parse(
            "description=\"\"\nengine=\"vmx\"\ntimeout_s=60\nbochs_ips=400000000\nexpect=[\"[INFO] hv: x\"]\n",
            &[],
        )
        .unwrap();
        assert_eq!(s.bochs_ips, 400_000_000);
        assert_eq!(s.bochs_cpu, engine::BOCHS_CPU_MODEL);
    }

    #[test]
    fn patterns_say_whose_line_they_are_about() {
        let p = pattern("[INFO] hv: all VMs stopped");
        assert_eq!(p.source, Source::Hypervisor);
        assert_eq!(p.text, "[INFO] hv: all VMs stopped");
        let p = pattern("hello-a | Hello");
        assert_eq!(p.source, Source::Vm("hello-a".into()));
        assert_eq!(p.text, "Hello");
        let p = pattern("evil |");
        assert_eq!((p.source, p.text.as_str()), (Source::Vm("evil".into()), ""));
        let p = pattern("* | UNEXPECTED");
        assert_eq!((p.source, p.text.as_str()), (Source::AnyVm, "UNEXPECTED"));
        // A name ending the pattern may be the beginning of a VM's name.
        assert_eq!(pattern("[ERROR] vm ").source, Source::Hypervisor);
        assert_eq!(pattern("[INFO] stats vm=hello").source, Source::Hypervisor);
        assert_eq!(
            pattern("[ERROR] manifest: vm #3").source,
            Source::Hypervisor
        );
    }

    #[test]
    fn a_pattern_without_a_known_source_is_an_error() {
        let cases = [
            ("UNEXPECTED", "say whose line"),
            (": stopped:", "say whose line"),
            ("hello-a|x", "say whose line"),
            ("hello-a |x", "say whose line"),
            ("ghost | hi", "\"ghost\" is not a VM of the manifest"),
            ("hello | hi", "\"hello\" is not a VM of the manifest"),
            ("[INFO] vm ghost: report x=1", "vm \"ghost\" is not a VM"),
            ("[ERROR] vm hello: stopped:", "vm \"hello\" is not a VM"),
            ("[INFO] stats vm=hello-c", "vm \"hello-c\" is not a VM"),
            (
                "[INFO] stats vm=hello-a1 state",
                "vm \"hello-a1\" is not a VM",
            ),
            ("[Info] hv:", "starts with one of"),
            ("[NOTE] x", "starts with one of"),
            ("[INFO] a\n[INFO] b", "line break"),
            ("", "empty"),
        ];
        for (raw, message) in cases {
            let err = Pattern::parse(raw, &vms()).unwrap_err();
            assert!(err.contains(message), "{raw:?}: {err}");
        }
        // The same in a scenario file, for reject as for expect, and in a figure's line.
        let text = format!("{HELLO_SCENARIO}\n").replace("reject = [", "reject = [\"ghost | x\", ");
        let err = parse(&text, &vms()).unwrap_err();
        assert!(
            err.starts_with("reject: ") && err.contains("ghost"),
            "{err}"
        );
        let figure = "[[at_most]]\nline = \"flood-1 | x\"\nkey = \"k\"\nmax = 1\n";
        let err = parse(&format!("{HELLO_SCENARIO}{figure}"), &vms()).unwrap_err();
        assert!(err.contains("at_most.line"), "{err}");
        let figure = "[[at_least]]\nline = \"evil | x\"\nkey = \"k\"\nmin = 1\n";
        let err = parse(&format!("{HELLO_SCENARIO}{figure}"), &vms()).unwrap_err();
        assert!(err.contains("hypervisor lines only"), "{err}");
        let fair = "[cpu_fairness]\nvms = [\"hello-a\", \"ghost\"]\ntolerance = 0.2\n";
        let err = parse(&format!("{HELLO_SCENARIO}{fair}"), &vms()).unwrap_err();
        assert!(err.contains("\"ghost\" is not a VM"), "{err}");
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
            ("bochs_ips = 999999", "bochs_ips must be from 1000000"),
            ("bochs_ips = 2000000001", "bochs_ips must be from"),
            (
                "bochs_cpu = \"pentium\"",
                "not a Bochs CPU model with VT-x and EPT",
            ),
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
            let err = parse(&text, &vms()).unwrap_err();
            assert!(err.contains(message), "`{change}`: {err}");
        }
        let fair = "[cpu_fairness]\nvms = [\"hello-a\"]\ntolerance = 0.2\n";
        let err = parse(&format!("{HELLO_SCENARIO}{fair}"), &vms()).unwrap_err();
        assert!(err.contains("at least two"), "{err}");
        let fair = "[cpu_fairness]\nvms = [\"hello-a\", \"hello-b\"]\ntolerance = -1.0\n";
        assert!(parse(&format!("{HELLO_SCENARIO}{fair}"), &vms()).is_err());
    }

    #[test]
    fn manifest_vm_names_are_read_from_every_vm_entry() {
        let text = r#"
[memory]
multiplex = true

[[vm]]
name = "a"
memory_mib = 4

[[vm]]
name = "typo"
colour = "blue"

[[vm]]
name = "a"

[[vm]]
memory_mib = 4

[[vm]]
name = "bad name"

[[vm]]
name = 7
"#;
        assert_eq!(manifest_vm_names(text).unwrap(), ["a", "typo"]);
        assert!(manifest_vm_names("").unwrap().is_empty());
        assert!(manifest_vm_names("[[vm]\n").is_err());
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
    fn a_guest_cannot_print_a_hypervisor_line() {
        // The summary line, printed by a guest, is that guest's console text.
        let fake = "evil | [INFO] hv: all VMs stopped: 2 exited, 0 failed\n";
        let log = HELLO_LOG.replace("[INFO] hv: all VMs stopped: 2 exited, 0 failed\n", fake);
        let s = hello_with(&["[INFO] hv: all VMs stopped"], &[]);
        assert_eq!(
            judge(&s, &log).failures,
            ["expected text not found: \"[INFO] hv: all VMs stopped\""]
        );
        assert!(judge(&s, HELLO_LOG).passed());
        // Nor a hypervisor line from a VM that is not in the manifest, nor an unprefixed one.
        for line in [
            "stranger | [INFO] hv: all VMs stopped",
            " [INFO] hv: all VMs stopped",
        ] {
            let log = HELLO_LOG.replace("[INFO] hv: all VMs stopped: 2 exited, 0 failed", line);
            assert!(!judge(&s, &log).passed(), "{line}");
        }
    }

    #[test]
    fn a_guest_cannot_fail_a_scenario_with_a_hypervisor_line() {
        let s = scenario(HELLO_SCENARIO);
        for fake in [
            "evil | [PANIC] x",
            "evil | [FATAL] exception #PF rip=0x1",
            "evil | [ERROR] vm hello-a: stopped: triple fault",
        ] {
            let verdict = judge(&s, &format!("{HELLO_LOG}{fake}\n"));
            assert!(verdict.passed(), "{fake}: {:?}", verdict.failures);
        }
    }

    #[test]
    fn a_guest_cannot_print_another_vms_console_line() {
        let s = hello_with(&["hello-a | Hello"], &[]);
        let log = HELLO_LOG.replace("hello-a | Hello", "evil | hello-a | Hello");
        assert_eq!(
            judge(&s, &log).failures,
            ["expected text not found: \"hello-a | Hello\""]
        );
        // A VM's pattern is about its own console only; `* | ` about every VM's.
        let s = hello_with(&["[INFO] hv:"], &["hello-b | UNEXPECTED"]);
        assert!(judge(&s, &format!("{HELLO_LOG}hello-a | UNEXPECTED\n")).passed());
        let s = hello_with(&["[INFO] hv:"], &["* | UNEXPECTED"]);
        let verdict = judge(&s, &format!("{HELLO_LOG}hello-a | UNEXPECTED\n"));
        assert_eq!(
            verdict.failures,
            ["rejected text \"* | UNEXPECTED\" found on line 14: \"hello-a | UNEXPECTED\""]
        );
        // ... and about the text the guest wrote, not the line.
        let s = hello_with(&["[INFO] hv:"], &["* | hello"]);
        assert!(judge(&s, HELLO_LOG).passed());
        // A console pattern never matches a hypervisor line.
        let s = hello_with(&["[INFO] hv:"], &["* | report hello=1"]);
        assert!(judge(&s, HELLO_LOG).passed());
    }

    #[test]
    fn an_empty_console_pattern_matches_any_line_of_that_vm() {
        let s = hello_with(&["[INFO] hv:"], &["evil |"]);
        assert!(judge(&s, HELLO_LOG).passed());
        assert!(!judge(&s, &format!("{HELLO_LOG}evil | \n")).passed());
        assert!(!judge(&s, &format!("{HELLO_LOG}evil | hi\n")).passed());
    }

    #[test]
    fn rejected_text_fails_with_its_line() {
        let log = format!(
            "{HELLO_LOG}[ERROR] vm hello-b: stopped: EPT violation at gpa=0x400000 (write) \
             rip=0x100123\n"
        );
        let verdict = judge(&scenario(HELLO_SCENARIO), &log);
        assert_eq!(verdict.failures.len(), 2, "{:?}", verdict.failures);
        assert!(verdict.failures[0].starts_with("rejected text \"[ERROR] vm \" found on line 14"));
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
            assert!(verdict.failures[0].starts_with("the hypervisor printed"));
        }
    }

    #[test]
    fn an_empty_log_fails() {
        let verdict = judge(&scenario(HELLO_SCENARIO), "");
        assert_eq!(verdict.failures[0], "the serial log is empty");
    }

    #[test]
    fn crlf_logs_are_judged_by_their_text() {
        let mut s = with_fairness(&["hello-a", "hello-b"], 0.05);
        s.expect.push(pattern("hello-b |"));
        // `other=0` ends its line: the `\r` is not part of the value.
        s.figures = vec![Figure {
            line: pattern("[INFO] stats vm=hello-a "),
            key: "other".into(),
            bound: Bound::AtMost(0),
        }];
        let log = HELLO_LOG.replace('\n', "\r\n");
        let verdict = judge(&s, &log);
        assert!(verdict.passed(), "{:?}", verdict.failures);
    }

    #[test]
    fn cpu_times_from_stats_lines() {
        let times = cpu_times(HELLO_LOG.lines());
        assert_eq!(times.get("hello-a"), Some(&812));
        assert_eq!(times.get("hello-b"), Some(&790));
        assert_eq!(times.len(), 2);
        // A line without cpu_us, or with a garbled value, does not count; nor one that does not
        // start with the stats tag.
        let times = cpu_times([
            "[INFO] stats vm=x state=failed",
            "[INFO] stats vm=y cpu_us=1x",
            "evil | [INFO] stats vm=z cpu_us=1",
        ]);
        assert!(times.is_empty());
    }

    #[test]
    fn a_guest_cannot_print_figures() {
        // A fake stats line after the real one, and fake TSC reports.
        let fakes = "evil | [INFO] stats vm=hello-b state=exited(0) cpu_us=812\n\
                     evil | [INFO] vm hello-a: report busy_start_tsc=1000\n\
                     evil | [INFO] vm hello-b: report busy_start_tsc=1000\n\
                     evil | [INFO] vm hello-a: report busy_end_tsc=100000\n\
                     evil | [INFO] vm hello-b: report busy_end_tsc=100000\n";
        let log = format!("{HELLO_LOG}{fakes}");
        let verdict = judge(&with_fairness(&["hello-a", "hello-b"], 0.02), &log);
        assert_eq!(verdict.failures.len(), 1, "{:?}", verdict.failures);
        assert!(verdict.failures[0].starts_with("CPU time not fair"));
        let mut s = with_fairness(&["hello-a", "hello-b"], 0.05);
        s.cpu_fairness.as_mut().unwrap().end_tolerance = Some(0.1);
        assert_eq!(
            judge(&s, &log).failures,
            ["cpu_fairness: no busy_start_tsc report from vm hello-a"]
        );
        // Nor the figures of [[at_least]] and [[at_most]].
        let mut s = scenario(HELLO_SCENARIO);
        s.figures = vec![
            Figure {
                line: pattern("[INFO] stats vm=hello-b "),
                key: "cpu_us".into(),
                bound: Bound::AtLeast(800),
            },
            Figure {
                line: pattern("[INFO] mem: "),
                key: "saved".into(),
                bound: Bound::AtMost(10),
            },
        ];
        let log = format!("{log}evil | [INFO] mem: saved=1\n");
        assert_eq!(
            judge(&s, &log).failures,
            [
                "at_least: cpu_us=790 is below 800 in \"[INFO] stats vm=hello-b state=exited(0) \
                 cpu_us=790 runs=3 exits=41 cpuid=0 rdmsr=0 wrmsr=0 io=38 hlt=0 vmcall=3 ept=0 \
                 preempt=0 extint=0 other=0\"",
                "at_most: no hypervisor line contains \"[INFO] mem: \"",
            ]
        );
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
        let verdict = judge(&with_fairness(&["hello-a", "evil"], 0.5), HELLO_LOG);
        assert_eq!(
            verdict.failures,
            vec!["cpu_fairness: no stats line with cpu_us for vm evil"]
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
            + "[cpu_fairness]\nvms=[\"hello-a\",\"hello-b\"]\ntolerance=0.2\nend_tolerance=2.0\n";
        assert!(parse(&bad, &vms()).unwrap_err().contains("end_tolerance"));
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
        // `b`'s manifest lacks hello-b, which its patterns name.
        let manifest = "[[vm]]\nname = \"hello-a\"\nimage = \"hello\"\nmemory_mib = 4\n";
        fs::write(base.join("b/manifest.toml"), manifest).unwrap();
        let err = all[1].load().unwrap_err().to_string();
        assert!(
            err.contains("scenario.toml") && err.contains("\"hello-b\" is not a VM"),
            "{err}"
        );
        fs::write(
            base.join("b/manifest.toml"),
            format!("{manifest}{}", manifest.replace("-a", "-b")),
        )
        .unwrap();
        let loaded = all[1].load().unwrap();
        assert_eq!(loaded.vms, ["hello-a", "hello-b"]);
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn every_scenario_in_the_repository_loads() {
        // Loading checks every pattern against the scenario's manifest.
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios");
        let scenarios = discover(&base, &[]).unwrap();
        assert!(!scenarios.is_empty());
        for s in scenarios {
            let loaded = s.load().unwrap_or_else(|e| panic!("{e}"));
            assert!(!loaded.vms.is_empty(), "{}: no VMs in the manifest", s.name);
        }
    }

    #[test]
    fn relative_figures_are_checked_against_their_base() {
        let log = "[INFO] vm hello-a: report rate=1000\n[INFO] vm hello-b: report rate=10009\n\
                   [INFO] vm evil: report speed=500\n";
        let with = |ratio: f64, tolerance: f64| {
            let mut s = hello_with(&["[INFO] vm hello-a"], &[]);
            let text = format!(
                "{HELLO_SCENARIO}[[relative]]\nline = \"[INFO] vm hello-b: report\"\nkey = \"rate\"\n\
                 base_line = \"[INFO] vm hello-a: report\"\nratio = {ratio:?}\ntolerance = {tolerance:?}\n"
            );
            s.relative = parse(&text, &vms()).unwrap().relative;
            judge(&s, log).failures
        };
        assert!(with(10.0, 0.001).is_empty(), "{:?}", with(10.0, 0.001));
        let failed = with(10.0, 0.0005);
        assert_eq!(failed.len(), 1);
        assert!(
            failed[0].starts_with(
                "relative: rate=10009 (\"[INFO] vm hello-b: report\") is 10.009000 \
                               times rate=1000"
            ),
            "{failed:?}"
        );
        assert_eq!(with(5.0, 0.5).len(), 1);
        // Another key for the base; a base of 0 or a missing line fails, never divides by 0.
        let text = format!(
            "{HELLO_SCENARIO}[[relative]]\nline = \"[INFO] vm evil:\"\nkey = \"speed\"\n\
             base_line = \"[INFO] vm hello-a:\"\nbase_key = \"rate\"\nratio = 0.5\ntolerance = 0.0\n"
        );
        let mut s = hello_with(&["[INFO] vm hello-a"], &[]);
        s.relative = parse(&text, &vms()).unwrap().relative;
        assert!(judge(&s, log).failures.is_empty());
        let zero = judge(&s, "[INFO] vm hello-a: rate=0\n[INFO] vm evil: speed=1\n").failures;
        assert_eq!(zero.len(), 1);
        assert!(zero[0].starts_with("relative: the base rate=0"), "{zero:?}");
        let missing = judge(&s, "[INFO] vm hello-a: rate=3\n").failures;
        assert_eq!(
            missing,
            ["relative: no hypervisor line contains \"[INFO] vm evil:\""]
        );
        for bad in [
            "ratio = 0.0\ntolerance = 0.1",
            "ratio = 1.0\ntolerance = -0.1",
            "ratio = nan\ntolerance = 0.1",
        ] {
            let text = format!(
                "{HELLO_SCENARIO}[[relative]]\nline = \"[INFO] a\"\nkey = \"k\"\nbase_line = \"[INFO] b\"\n{bad}\n"
            );
            assert!(parse(&text, &vms()).is_err(), "{bad}");
        }
    }

    #[test]
    fn at_least_checks_figures_of_the_last_matching_line() {
        let log =
            "[INFO] mem: saved_zero=0 saved_shared=3\n[INFO] mem: saved_zero=7 saved_shared=12\n";
        let with = |key: &str, min: u64| {
            let mut s = hello_with(&["[INFO] mem:"], &[]);
            s.figures = vec![Figure {
                line: pattern("[INFO] mem:"),
                key: key.to_owned(),
                bound: Bound::AtLeast(min),
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
        s.figures = vec![Figure {
            line: pattern("[INFO] nothing"),
            key: "x".to_owned(),
            bound: Bound::AtLeast(0),
        }];
        assert!(judge(&s, HELLO_LOG)
            .failures
            .contains(&"at_least: no hypervisor line contains \"[INFO] nothing\"".to_owned()));
        let text =
            HELLO_SCENARIO.to_owned() + "[[at_least]]\nline = \"[INFO] a\"\nkey = \"b\"\nmin = 2\n";
        assert_eq!(
            parse(&text, &vms()).unwrap().figures[0].bound,
            Bound::AtLeast(2)
        );
        let text = HELLO_SCENARIO.to_owned()
            + "[[at_least]]\nline = \"[INFO] a\"\nkey = \"b=\"\nmin = 2\n";
        assert!(parse(&text, &vms()).unwrap_err().contains("at_least.key"));
    }

    #[test]
    fn at_most_checks_figures_of_the_last_matching_line() {
        let log = format!(
            "{HELLO_LOG}[INFO] stats vm=hello-a max_wait_us=90000\n\
             [INFO] stats vm=hello-a max_wait_us=50000\n\
             [INFO] stats vm=hello-b max_wait_us=70000\n"
        );
        let text = |line: &str, key: &str, max: u64| {
            format!("{HELLO_SCENARIO}[[at_most]]\nline = {line:?}\nkey = {key:?}\nmax = {max}\n")
        };
        let failures = |line: &str, key: &str, max: u64| {
            let s = parse(&text(line, key, max), &vms()).unwrap();
            judge(&s, &log).failures
        };
        assert!(failures("[INFO] stats vm=hello-a ", "max_wait_us", 60_000).is_empty());
        assert!(failures("[INFO] stats vm=hello-b ", "max_wait_us", 70_000).is_empty());
        assert_eq!(
            failures("[INFO] stats vm=hello-b ", "max_wait_us", 60_000),
            ["at_most: max_wait_us=70000 is above 60000 in \"[INFO] stats vm=hello-b max_wait_us=70000\""]
        );
        // A missing key or line is a failure, not a pass.
        assert_eq!(
            failures("[INFO] hv: all VMs stopped", "max_wait_us", 1),
            ["at_most: no max_wait_us=N in \"[INFO] hv: all VMs stopped: 2 exited, 0 failed\""]
        );
        assert_eq!(
            failures("[INFO] stats vm=evil ", "max_wait_us", 1),
            ["at_most: no hypervisor line contains \"[INFO] stats vm=evil \""]
        );
        // A guest cannot print a better figure.
        let log = format!("{log}evil | [INFO] stats vm=hello-b max_wait_us=1\n");
        let s = parse(
            &text("[INFO] stats vm=hello-b ", "max_wait_us", 60_000),
            &vms(),
        )
        .unwrap();
        assert!(!judge(&s, &log).passed());
    }

    fn with_inputs(inputs: &str) -> Result<Scenario, String> {
        parse(&format!("{HELLO_SCENARIO}\n{inputs}"), &vms())
    }

    #[test]
    fn parses_inputs() {
        let s = with_inputs(
            "[[input]]\nafter = \"hello-a | ready\"\ntext = \"hello-a: hi there\"\n\
             [[input]]\nafter = \"[INFO] hv: all VMs\"\ntext = \"evil: quit\"\n",
        )
        .unwrap();
        assert_eq!(s.inputs.len(), 2);
        assert_eq!(s.inputs[0].after, pattern("hello-a | ready"));
        assert_eq!(s.inputs[0].text, "hello-a: hi there");
        assert_eq!(s.inputs[1].after.source, Source::Hypervisor);
        assert!(scenario(HELLO_SCENARIO).inputs.is_empty());
    }

    #[test]
    fn rejects_bad_inputs() {
        for (input, why) in [
            ("after = \"ready\"\ntext = \"hello-a: x\"", "say whose line"),
            (
                "after = \"nobody | ready\"\ntext = \"hello-a: x\"",
                "not a VM",
            ),
            (
                "after = \"hello-a | ready\"\ntext = \"nobody: x\"",
                "not a VM",
            ),
            (
                "after = \"hello-a | ready\"\ntext = \"hello-a x\"",
                "NAME: text",
            ),
            (
                "after = \"hello-a | ready\"\ntext = \"hello-a: x\\r\"",
                "control character",
            ),
            (
                "after = \"hello-a | ready\"\ntext = \"hello-a: a\\nb\"",
                "control character",
            ),
            ("after = \"hello-a | ready\"", "missing field `text`"),
            (
                "after = \"hello-a | r\"\ntext = \"hello-a: x\"\nwhen = 1",
                "unknown field",
            ),
        ] {
            let err = with_inputs(&format!("[[input]]\n{input}\n")).unwrap_err();
            assert!(err.contains(why), "{input:?}: {err}");
        }
    }

    #[test]
    fn the_feeder_types_in_order_once_each_line_appeared() {
        let s = with_inputs(
            "[[input]]\nafter = \"hello-a | ready\"\ntext = \"hello-a: hello\"\n\
             [[input]]\nafter = \"hello-a | echo: hello\"\ntext = \"hello-a: quit\"\n",
        )
        .unwrap();
        let mut feeder = InputFeeder::new(&s);
        assert_eq!(
            feeder.feed(b"GRUB loading\r\n[INFO] hv: 2 VMs created\n"),
            b""
        );
        // A line split across reads, with CRLF.
        assert_eq!(feeder.feed(b"hello-a | rea"), b"");
        assert_eq!(feeder.feed(b"dy\r\n"), b"hello-a: hello\r");
        assert_eq!(feeder.untyped().len(), 1);
        // Another VM's line, or a guest imitating a hypervisor line, does not count.
        assert_eq!(feeder.feed(b"hello-b | echo: hello\n"), b"");
        assert_eq!(feeder.feed(b"hello-a | echo: hello\n"), b"hello-a: quit\r");
        assert!(feeder.untyped().is_empty());
        assert_eq!(
            feeder.feed(b"hello-a | ready\nhello-a | echo: hello\n"),
            b""
        );
    }

    #[test]
    fn a_later_input_waits_for_the_earlier_one() {
        let s = with_inputs(
            "[[input]]\nafter = \"hello-a | first\"\ntext = \"hello-a: 1\"\n\
             [[input]]\nafter = \"hello-b | second\"\ntext = \"hello-b: 2\"\n",
        )
        .unwrap();
        let mut feeder = InputFeeder::new(&s);
        // The second entry's line comes first: remembered, typed after the first.
        assert_eq!(feeder.feed(b"hello-b | second\n"), b"");
        assert_eq!(
            feeder.feed(b"hello-a | first\n"),
            b"hello-a: 1\rhello-b: 2\r"
        );
        // Without its line an entry stays untyped, which the runner reports.
        let mut feeder = InputFeeder::new(&s);
        assert_eq!(feeder.feed(b"hello-a | first\n"), b"hello-a: 1\r");
        assert_eq!(feeder.untyped()[0].text, "hello-b: 2");
    }
}
