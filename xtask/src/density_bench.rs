//! `cargo xtask bench density`: how many idle VMs one machine holds, and what they cost.
//!
//! One Bochs boot of a machine with `--ram-mib` of RAM runs `--vms` `idler` VMs of `--vm-mib`
//! each and one `busy` VM. Each idle VM fills its memory (all of it but its image and stack) in
//! the proportions of idle Linux guests (`mix=linux`: 63% zero, 14% identical across VMs, 10%
//! similar, 9% half-compressible, 4% random: what the memory engine made of the `cargo xtask
//! corpus` heterogeneous set, see `tests/guests/src/pages.rs`), then sleeps between `--hz`
//! timer ticks touching 4 pages on each.
//!
//! The harness pings every idle VM once it says it is ready (each after the previous answer:
//! every VM boots and answers), then, once the last one is dormant again, starts the busy VM
//! (`start=line`), which computes and reports its share of the machine over that work
//! (`busy_cpu_permille`, from the VM-stats hypercall). While it computes, the harness types
//! `ping` to `--pings` VMs drawn at random; once the busy VM has reported, `check` to every VM
//! (each reads its memory back against its fill and answers `checking NAME` at once, then
//! `check NAME ok`: 14 MiB read and faulted back each, which must not fall in the busy VM's
//! work), then `quit`. Answer delays come from the hypervisor (`log=debug`: `input answered in N
//! us`, from the line's hand-over to the VM to the VM's next line, in Bochs-exact host time), so
//! they are guest-time figures; each is told a ping's or a check's by that next line, and a
//! ping's phase by where it falls against the busy VM's start.
//!
//! The baseline is the same manifest with multiplexing and idle detection off: every VM's
//! memory is allocated at creation, so only as many VMs start as fit; they run for a fixed
//! time (`ms=`) and stop themselves.
//!
//! The scenario files and logs are kept in `target/qemu-test/bench-density-*/`.

use std::collections::BTreeMap;
use std::fs;
use std::time::Instant;

use crate::build;
use crate::cli::{parse_positive, Args, Spec};
use crate::density_plot::{self, SweepPoint};
use crate::deps;
use crate::engine::BOCHS_CPU_MODEL;
use crate::error::{Error, IoContext, Result};
use crate::process::on_path;
use crate::qemu_test;
use crate::scenario::ScenarioDir;
use crate::workspace::Workspace;

const USAGE: &str = "cargo xtask bench density [--vms N] [--vm-mib M] [--ram-mib R] [--hz H]
       [--pings K] [--busy-work W] [--ips I] [--runs both|multiplexed|baseline]
       [--sweep N1,N2,...]
  --vms N            idle VMs (default 100)
  --sweep N1,N2,...  one multiplexed run for each number of idle VMs instead, and a plot of
                     memory per VM, ping p99 and the busy VM's share against N
                     (target/bench/density-sweep.svg)
  --vm-mib M         memory of each idle VM (default 64)
  --ram-mib R        the emulated machine's RAM (default 2048, at most 8192)
  --hz H             the idle VMs' timer rate (default 100)
  --pings K          pings to VMs drawn at random while the busy VM computes (default N)
  --busy-work W      the busy VM's work, in busy_work iterations (default 60000000)
  --ips I            Bochs instructions per emulated second (default 400000000)
  --runs R           which runs (default both)";

/// Pages below the idle VM's fill (its image from 1 MiB) and above it (its stack).
const RESERVED_MIB: u64 = 2;
const STACK_KIB: u64 = 256;
const BUSY_MIB: u64 = 2;
/// How long a baseline VM runs before it stops itself, own time.
const BASELINE_MS: u64 = 4_000;
/// When the baseline's busy VM starts (its own TSC time): the baseline's VMs need no faults to
/// fill their memory, which is allocated at creation.
const BASELINE_BUSY_AFTER_MS: u64 = 2_000;

#[derive(Clone)]
struct Options {
    vms: u64,
    vm_mib: u64,
    ram_mib: u64,
    hz: u64,
    pings: u64,
    busy_work: u64,
    ips: u64,
    multiplexed: bool,
    baseline: bool,
    /// `--pings` as given: a sweep's runs default to one ping per VM each.
    pings_flag: Option<u64>,
    sweep: Vec<u64>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options> {
        let args = Args::parse(
            args,
            &Spec {
                usage: USAGE,
                with_value: &[
                    "--vms",
                    "--vm-mib",
                    "--ram-mib",
                    "--hz",
                    "--pings",
                    "--busy-work",
                    "--ips",
                    "--runs",
                    "--sweep",
                ],
                positional: false,
            },
        )?;
        let num = |flag: &str, default: u64| -> Result<u64> {
            args.value(flag)
                .map_or(Ok(default), |v| parse_positive(flag, v))
        };
        let vms = num("--vms", 100)?;
        let vm_mib = num("--vm-mib", 64)?;
        let (multiplexed, baseline) = match args.value("--runs").unwrap_or("both") {
            "both" => (true, true),
            "multiplexed" => (true, false),
            "baseline" => (false, true),
            other => {
                return Err(Error::Usage(format!(
                    "`--runs` is both, multiplexed or baseline, not `{other}`\n{USAGE}"
                )))
            }
        };
        let pings_flag = args
            .value("--pings")
            .map(|v| parse_positive("--pings", v))
            .transpose()?;
        let sweep = match args.value("--sweep") {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|n| parse_positive("--sweep", n.trim()))
                .collect::<Result<Vec<u64>>>()?,
        };
        let o = Options {
            vms,
            vm_mib,
            ram_mib: num("--ram-mib", 2048)?,
            hz: num("--hz", 100)?,
            pings: num("--pings", vms)?,
            busy_work: num("--busy-work", 60_000_000)?,
            ips: num("--ips", 400_000_000)?,
            multiplexed,
            baseline,
            pings_flag,
            sweep,
        };
        if o.vm_mib <= RESERVED_MIB + 1 || o.ram_mib < 64 || o.ram_mib > 8192 || o.hz > 1000 {
            return Err(Error::Usage(format!(
                "need --vm-mib > {}, 64 <= --ram-mib <= 8192, --hz <= 1000\n{USAGE}",
                RESERVED_MIB + 1
            )));
        }
        Ok(o)
    }

    /// Pages each idle VM fills: all of its memory from 2 MiB up to its stack.
    fn fill_pages(&self) -> u64 {
        ((self.vm_mib - RESERVED_MIB) * 1024 - STACK_KIB) / 4
    }
}

/// `cargo xtask bench density`.
pub fn run(ws: &Workspace, args: &[String]) -> Result<()> {
    let o = Options::parse(args)?;
    deps::ensure_packages()?;
    if !on_path("bochs") {
        return Err(Error::Deps(
            "bench density runs on Bochs, which is not installed".into(),
        ));
    }
    build::build_all(ws)?;
    if !o.sweep.is_empty() {
        return sweep(ws, &o);
    }
    let mut results = Vec::new();
    for (run, label) in [(o.multiplexed, "multiplexed"), (o.baseline, "baseline")] {
        if run {
            results.push((label, boot(ws, &o, label == "multiplexed")?));
        }
    }
    print_header(&o);
    for (label, r) in &results {
        print_run(&o, label, r);
    }
    Ok(())
}

/// `--sweep`: one multiplexed run per number of idle VMs, then the plot.
fn sweep(ws: &Workspace, o: &Options) -> Result<()> {
    let mut points = Vec::new();
    for &n in &o.sweep {
        let run = Options {
            vms: n,
            pings: o.pings_flag.unwrap_or(n),
            ..o.clone()
        };
        let r = boot(ws, &run, true)?;
        print_header(&run);
        print_run(&run, "multiplexed", &r);
        let (Some(mem), Some(busy)) = (&r.mem, r.busy_permille) else {
            println!("    (not plotted: the run gave no memory or busy figures)");
            continue;
        };
        let frames = mem["pages"].saturating_sub(mem["saved_frames"]);
        points.push(SweepPoint {
            vms: n,
            mib_per_vm: frames as f64 * 4096.0 / r.ready.max(1) as f64 / 1048576.0,
            ping_p99_ms: percentile_or_zero(&r.phases[1], 99) as f64 / 1000.0,
            busy_percent: busy as f64 / 10.0,
        });
    }
    let dir = ws.target_dir().join("bench");
    fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("density-sweep.svg");
    let title = format!(
        "bench density: {} MiB idle VMs on a {} MiB machine (Bochs, {} M instructions/s)",
        o.vm_mib,
        o.ram_mib,
        o.ips / 1_000_000
    );
    fs::write(&path, density_plot::svg(&points, o.vm_mib, &title))
        .context(|| format!("writing {}", path.display()))?;
    println!();
    println!("idle VMs\tMiB per idle VM\tping p99 ms\tbusy VM %");
    for p in &points {
        println!(
            "{}\t{:.2}\t{:.1}\t{:.1}",
            p.vms, p.mib_per_vm, p.ping_p99_ms, p.busy_percent
        );
    }
    println!("plot: {}", path.display());
    Ok(())
}

fn print_header(o: &Options) {
    println!();
    println!(
        "bench density: Bochs {BOCHS_CPU_MODEL} at {} M instructions per emulated second, {} MiB \
         RAM; {} idle VMs of {} MiB ({} pages filled, mix=linux, {} Hz ticks) + a busy VM",
        o.ips / 1_000_000,
        o.ram_mib,
        o.vms,
        o.vm_mib,
        o.fill_pages(),
        o.hz
    );
}

fn print_run(o: &Options, label: &str, r: &RunResult) {
    println!();
    println!("  {label} ({:.0} s wall):", r.wall_s);
    println!("    {}", r.free_line);
    println!(
        "    idle VMs started {} of {}, answered every ping and check: {}, data intact: {} of {} checked",
        r.ready, o.vms, r.all_answered, r.checks_ok, r.checks
    );
    for (what, delays) in [
        ("first ping, as each VM is ready", &r.phases[0]),
        ("pings while the busy VM computes", &r.phases[1]),
        ("check, acknowledged", &r.phases[2]),
    ] {
        if !delays.is_empty() {
            println!(
                "    answer delay, {what}, us: n={} p50 {} p99 {} max {}",
                delays.len(),
                percentile(delays, 50),
                percentile(delays, 99),
                delays.iter().max().copied().unwrap_or(0)
            );
        }
    }
    match r.busy_permille {
        Some(p) => println!("    busy VM's share over its work: {:.1}%", p as f64 / 10.0),
        None => println!("    busy VM's share: not reported (it did not finish)"),
    }
    if !r.busy_after_ready {
        println!("    note: the busy VM started before every idle VM was ready");
    }
    if let Some(m) = &r.mem {
        let per_vm = |x: f64| x / r.ready.max(1) as f64;
        let frames = m["pages"].saturating_sub(m["saved_frames"]);
        println!(
            "    memory at the engine's peak: {} frames in use of {} pages ({:.2} MiB per idle VM), \
             engine heap {:.2} MiB ({:.1} KiB per idle VM: blob heap {} KiB, metadata {} KiB in all)",
            frames,
            m["pages"],
            per_vm(frames as f64 * 4096.0) / 1048576.0,
            (m["blob_heap_bytes"] + m["metadata_bytes"]) as f64 / 1048576.0,
            per_vm((m["blob_heap_bytes"] + m["metadata_bytes"]) as f64) / 1024.0,
            m["blob_heap_bytes"] / 1024,
            m["metadata_bytes"] / 1024
        );
    } else {
        println!("    memory: {} MiB per VM, allocated at creation", o.vm_mib);
    }
    if let Some(scan) = r.scan_permille {
        println!("    scanner: {:.1}% of the machine", scan as f64 / 10.0);
    }
    if let Some(w) = &r.busy_window {
        let total: u64 = HOST_TIME_PARTS.iter().map(|k| w[*k]).sum();
        let pct = |k: &str| w[k] as f64 * 100.0 / total.max(1) as f64;
        println!(
            "    host time {} the busy VM's work ({:.1} s, snapshots 1 s apart): in guests \
             {:.1}%, handling exits {:.1}%, switching VMs {:.1}%, scanning {:.1}%, deciding \
             {:.1}% (memory pressure {:.1}%, waking sleepers and console {:.1}%), asleep {:.1}%; \
             {} decisions ({} TSC ticks each), {} wake-ups, {} deferred to the slack grid",
            if r.busy_window_inside {
                "during"
            } else {
                "around"
            },
            total as f64 / 1e6,
            pct("guest_us"),
            pct("exit_us"),
            pct("switch_us"),
            pct("scan_us"),
            pct("sched_us"),
            pct("pressure_us"),
            pct("sleepers_us"),
            pct("idle_us"),
            w["decisions"],
            (w["sched_us"] * (o.ips / 1_000_000))
                .checked_div(w["decisions"])
                .unwrap_or(0),
            w["wakeups"],
            w["deferred_wakes"]
        );
    }
}

/// What one boot showed.
struct RunResult {
    wall_s: f64,
    free_line: String,
    ready: u64,
    all_answered: bool,
    checks: u64,
    checks_ok: u64,
    /// Answer delays, us: the first pings, the pings under load, the checks.
    phases: [Vec<u64>; 3],
    busy_permille: Option<u64>,
    busy_after_ready: bool,
    mem: Option<BTreeMap<String, u64>>,
    scan_permille: Option<u64>,
    /// The hypervisor's host-time totals over the busy VM's work: the difference of two of its
    /// debug-level snapshots (one a second), both inside the work when two fall in it, else the
    /// last before and the first after it.
    busy_window: Option<BTreeMap<String, u64>>,
    /// Whether `busy_window` lies inside the work.
    busy_window_inside: bool,
}

/// The parts of a `hv: host time:` line that add up to the host's whole time.
const HOST_TIME_PARTS: [&str; 6] = [
    "guest_us",
    "exit_us",
    "switch_us",
    "scan_us",
    "sched_us",
    "idle_us",
];

/// The other fields of that line the benchmark reads.
const HOST_TIME_KEYS: [&str; 6] = [
    "at_tsc",
    "pressure_us",
    "sleepers_us",
    "decisions",
    "wakeups",
    "deferred_wakes",
];

/// The idle VMs' names.
fn names(o: &Options) -> Vec<String> {
    (1..=o.vms).map(|i| format!("idle-{i}")).collect()
}

fn manifest_text(o: &Options, multiplexed: bool) -> String {
    let mut m = format!(
        "# Written by `cargo xtask bench density`.\n[memory]\nmultiplex = {multiplexed}\n\
         scan_pages = 512\nscan_interval_us = 10000\n\n[idle]\ndetect = {multiplexed}\n\
         # At Bochs speed a tick with its exits takes tens of microseconds: keep the dormant\n\
         # quantum well above that.\nquantum_shrink = 2\n\n\
         [[vm]]\nname = \"busy\"\nmemory_mib = {BUSY_MIB}\nimage = \"busy\"\n\
         cmdline = \"{} work={}\"\n",
        if multiplexed {
            "start=line".to_owned()
        } else {
            format!("after_ms={BASELINE_BUSY_AFTER_MS}")
        },
        o.busy_work
    );
    // A baseline VM stops itself after BASELINE_MS; a multiplexed one is told to quit.
    let ms = if multiplexed { 3_600_000 } else { BASELINE_MS };
    for name in names(o) {
        m.push_str(&format!(
            "\n[[vm]]\nname = \"{name}\"\nmemory_mib = {}\nimage = \"idler\"\n\
             cmdline = \"pages={} ws=4 hz={} mix=linux ms={ms}\"\n",
            o.vm_mib,
            o.fill_pages(),
            o.hz
        ));
    }
    m
}

/// xorshift64*, seeded: the same VMs are pinged in every run. Never the same VM twice in a row:
/// its second ping would be typed before its first answer (the chain waits for that answer's
/// line, already seen), and one answer would stand for two pings.
fn draws(n: u64, count: u64) -> Vec<u64> {
    let mut s: u64 = 0x5eed_0de9_5171_u64;
    let mut out: Vec<u64> = Vec::new();
    while (out.len() as u64) < count {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        let v = s.wrapping_mul(0x2545_f491_4f6c_dd1d) % n + 1;
        if n == 1 || out.last() != Some(&v) {
            out.push(v);
        }
    }
    out
}

fn scenario_text(o: &Options, multiplexed: bool) -> String {
    let mut s = format!(
        "description = \"bench density ({})\"\nmemory_mib = {}\nengine = \"vmx\"\n\
         bochs_ips = {}\ntimeout_s = 7200\ncmdline = \"log=debug\"\nimages = [\"idler\", \"busy\"]\n\
         expect = [\"[INFO] hv: all VMs stopped\"]\nreject = []\n",
        if multiplexed { "multiplexed" } else { "baseline" },
        o.ram_mib,
        o.ips
    );
    if !multiplexed {
        return s;
    }
    let mut input = |after: String, text: String| {
        s.push_str(&format!(
            "\n[[input]]\nafter = {after:?}\ntext = {text:?}\n"
        ))
    };
    // Every VM once, as it becomes ready (typed earlier, its line would meet a UART the guest
    // has not set up yet); then the busy VM starts.
    // Inputs are typed in order, each once its line has been seen (at any time before): ping v
    // goes out when VM v is ready and ping v-1 was typed, so several may be in flight.
    for v in 1..=o.vms {
        input(format!("idle-{v} | ready"), format!("idle-{v}: ping"));
    }
    // The busy VM starts once the last VM pinged is dormant again (5.3 s after its answer at
    // the detector's defaults): the fleet has settled, as a consolidated machine's idle VMs
    // have; the pings while the busy VM computes wake some of them again.
    let mut after = format!("[INFO] vm idle-{}: idle -> dormant", o.vms);
    input(after, "busy: go".to_owned());
    after = "busy | busy: work=".to_owned();
    for v in draws(o.vms, o.pings) {
        input(after, format!("idle-{v}: ping"));
        after = format!("idle-{v} | pong idle-{v}");
    }
    // The checks wait for the busy VM's report as well (the last ping is typed by then, in
    // order): reading its memory back is real work for each VM, and beside the busy VM's work
    // it took the busy VM's share down (71.6% instead of about 90% in a run whose 25 pings were
    // answered early in the work).
    after = "[INFO] vm busy: report busy_cpu_permille=".to_owned();
    for v in 1..=o.vms {
        input(after, format!("idle-{v}: check"));
        // Its verdict, ok or not: the count comes from the log.
        after = format!("idle-{v} | check idle-{v} ");
    }
    for v in 1..=o.vms {
        input(after, format!("idle-{v}: quit"));
        after = format!("[INFO] vm idle-{v}: exited");
    }
    s
}

fn boot(ws: &Workspace, o: &Options, multiplexed: bool) -> Result<RunResult> {
    let name = format!(
        "bench-density-{}",
        if multiplexed {
            "multiplexed"
        } else {
            "baseline"
        }
    );
    let dir = ws.scratch("bench-density").join(&name);
    fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
    let write = |file: &str, text: String| {
        let path = dir.join(file);
        fs::write(&path, text).context(|| format!("writing {}", path.display()))
    };
    write("manifest.toml", manifest_text(o, multiplexed))?;
    write("scenario.toml", scenario_text(o, multiplexed))?;
    let started = Instant::now();
    // Whether the run "passed" says little here (the baseline cannot start every VM); the
    // figures come from the log.
    let _ = qemu_test::run_scenarios(
        ws,
        &[ScenarioDir {
            name: name.clone(),
            dir,
        }],
        1,
    );
    let wall_s = started.elapsed().as_secs_f64();
    let log_path = ws.scenario_run_dir(&name).join("serial.log");
    let log =
        fs::read_to_string(&log_path).context(|| format!("reading {}", log_path.display()))?;
    Ok(analyze(o, &log, wall_s))
}

fn analyze(o: &Options, log: &str, wall_s: f64) -> RunResult {
    let lines: Vec<&str> = log.lines().collect();
    let position = |pat: &str| lines.iter().position(|l| l.contains(pat));
    let names = names(o);
    let ready_at: Vec<Option<usize>> = names
        .iter()
        .map(|n| position(&format!("{n} | idler: ")).filter(|&i| lines[i].ends_with("ready")))
        .collect();
    let ready = ready_at.iter().flatten().count() as u64;
    let last_ready = ready_at.iter().flatten().max().copied();
    let busy_start = position("busy | busy: work=");
    let checks = lines
        .iter()
        .filter(|l| l.contains(" | check idle-"))
        .count() as u64;
    let checks_ok = lines
        .iter()
        .filter(|l| l.contains(" | check idle-") && l.ends_with(" ok"))
        .count() as u64;
    // The phases: a check's answer (the VM's next line is its `check...` line); a ping's before
    // the busy VM starts; a ping's after.
    let mut phases: [Vec<u64>; 3] = Default::default();
    for (i, l) in lines.iter().enumerate() {
        let Some((vm, us)) = l
            .strip_prefix("[DEBUG] vm ")
            .and_then(|rest| rest.split_once(": input answered in "))
            .and_then(|(vm, rest)| Some((vm, rest.strip_suffix(" us")?.parse::<u64>().ok()?)))
        else {
            continue;
        };
        let console = format!("{vm} | ");
        let check = lines[i + 1..]
            .iter()
            .find(|l| l.starts_with(&console))
            .is_some_and(|l| l[console.len()..].starts_with("check"));
        let phase = if check {
            2
        } else if busy_start.is_none_or(|b| i < b) {
            0
        } else {
            1
        };
        phases[phase].push(us);
    }
    let key = |line: &str, key: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
    };
    let busy_permille = lines
        .iter()
        .find(|l| l.contains("[INFO] vm busy: report busy_cpu_permille="))
        .and_then(|l| key(l, "busy_cpu_permille"));
    let mem = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("[INFO] mem: peak at"))
        .map(|l| {
            ["pages", "saved_frames", "blob_heap_bytes", "metadata_bytes"]
                .iter()
                .map(|k| (k.to_string(), key(l, k).unwrap_or(0)))
                .collect()
        });
    let scan_permille = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("[INFO] mem: cpu:"))
        .and_then(|l| key(l, "scan_permille"));
    // Two snapshots inside the busy VM's work when there are (before its start line the busy VM
    // polls COM1 between yields, thousands of scheduling decisions a second that a window
    // around the work would mix in), else the last before the work and the first after it.
    let snapshot = |i: usize| lines[i].starts_with("[DEBUG] hv: host time: at_tsc=");
    let busy_end = position("[INFO] vm busy: report busy_cpu_permille=");
    let inside = busy_start.zip(busy_end).and_then(|(b, e)| {
        let first = (b..e).find(|&i| snapshot(i))?;
        let last = (first + 1..e).rev().find(|&i| snapshot(i))?;
        Some((first, last))
    });
    let around = busy_start
        .and_then(|b| (0..b).rev().find(|&i| snapshot(i)))
        .zip(busy_end.and_then(|e| (e..lines.len()).find(|&i| snapshot(i))));
    let busy_window = inside.or(around).map(|(from, to)| {
        HOST_TIME_PARTS
            .iter()
            .chain(&HOST_TIME_KEYS)
            .map(|k| {
                let v = |i: usize| key(lines[i], k).unwrap_or(0);
                (k.to_string(), v(to).saturating_sub(v(from)))
            })
            .collect()
    });
    let pinged = draws(o.vms, o.pings);
    let all_answered = pinged
        .iter()
        .all(|v| position(&format!("idle-{v} | pong idle-{v}")).is_some())
        && checks == o.vms;
    RunResult {
        wall_s,
        free_line: lines
            .iter()
            .find(|l| l.contains("[INFO] hv: guest memory:"))
            .map_or("(no memory line)".to_owned(), |l| l.to_string()),
        ready,
        all_answered,
        checks,
        checks_ok,
        phases,
        busy_permille,
        busy_after_ready: matches!((busy_start, last_ready), (Some(b), Some(r)) if b > r),
        mem,
        scan_permille,
        busy_window,
        busy_window_inside: inside.is_some(),
    }
}

/// [`percentile`], 0 for no values.
fn percentile_or_zero(values: &[u64], p: usize) -> u64 {
    if values.is_empty() {
        0
    } else {
        percentile(values, p)
    }
}

/// Nearest-rank percentile of unsorted `values` (not empty).
fn percentile(values: &[u64], p: usize) -> u64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = (p * v.len()).div_ceil(100).max(1);
    v[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(vms: u64, vm_mib: u64, ram_mib: u64) -> Options {
        Options::parse(&[
            "--vms".into(),
            vms.to_string(),
            "--vm-mib".into(),
            vm_mib.to_string(),
            "--ram-mib".into(),
            ram_mib.to_string(),
        ])
        .unwrap()
    }

    #[test]
    fn manifests_are_valid_and_fill_the_vms() {
        let o = options(24, 16, 256);
        for multiplexed in [true, false] {
            let text = manifest_text(&o, multiplexed);
            let parsed = hv_manifest::parse(&text, &hv_manifest::HostLimits::default()).unwrap();
            assert_eq!(parsed.errors, []);
            assert_eq!(parsed.vms.len(), 25);
            assert_eq!(parsed.memory.multiplex, multiplexed);
            assert!(parsed.vms[1].cmdline.contains("pages=3520 "));
        }
        // The fill ends where the idler's stack room begins.
        assert_eq!(
            (RESERVED_MIB << 20) + o.fill_pages() * 4096 + (STACK_KIB << 10),
            16 << 20
        );
    }

    #[test]
    fn scenarios_parse_and_name_only_the_manifests_vms() {
        let o = options(5, 8, 128);
        for multiplexed in [true, false] {
            let vms = crate::scenario::manifest_vm_names(&manifest_text(&o, multiplexed)).unwrap();
            let s = crate::scenario::parse(&scenario_text(&o, multiplexed), &vms).unwrap();
            assert_eq!(s.memory_mib, 128);
            // A ping each as it is ready, the busy VM's start, random pings, checks and quits.
            assert_eq!(
                s.inputs.len(),
                if multiplexed { 5 + 1 + 5 + 5 + 5 } else { 0 }
            );
        }
        // The checks wait for the busy VM's report: they must not fall in its work.
        let text = scenario_text(&o, true);
        let first_check = text.find("text = \"idle-1: check\"").unwrap();
        let after = text[..first_check].rfind("after = ").unwrap();
        assert!(text[after..first_check]
            .starts_with("after = \"[INFO] vm busy: report busy_cpu_permille=\""));
    }

    #[test]
    fn answers_and_figures_are_read_from_the_log() {
        let o = options(2, 8, 128);
        let pinged = draws(2, 2);
        let mut log = String::from(
            "[INFO] hv: guest memory: 18 MiB declared by 3 VMs against 109 MiB free for VMs\n\
             idle-1 | idler: 1472 pages filled (seed 2), ticking at 100 Hz, working set 4 pages; ready\n\
             idle-2 | idler: 1472 pages filled (seed 3), ticking at 100 Hz, working set 4 pages; ready\n\
             [DEBUG] vm idle-1: input answered in 3000 us\nidle-1 | pong idle-1\n\
             [DEBUG] vm idle-2: input answered in 2000 us\nidle-2 | pong idle-2\n\
             [DEBUG] hv: host time: at_tsc=1000 guest_us=10 exit_us=5 sched_us=1 decisions=3\n\
             busy | busy: work=5\n",
        );
        for v in &pinged {
            log.push_str(&format!(
                "[DEBUG] vm idle-{v}: input answered in 100 us\nidle-{v} | pong idle-{v}\n"
            ));
        }
        log.push_str(
            "[DEBUG] vm idle-1: input answered in 7000 us\nidle-1 | check idle-1 ok\n\
             idle-2 | check idle-2 CORRUPTED\n[INFO] vm busy: report busy_cpu_permille=912\n\
             [INFO] mem: peak at scan 3 of 4: pages=4608 saved_frames=4000 blob_heap_bytes=2048 metadata_bytes=1024\n\
             [INFO] mem: cpu: scan_us=1 scan_permille=48 budget_percent=5\n\
             [DEBUG] hv: host time: at_tsc=9000 guest_us=910 exit_us=25 sched_us=3 decisions=13\n",
        );
        let r = analyze(&o, &log, 1.0);
        assert_eq!((r.ready, r.checks, r.checks_ok), (2, 2, 1));
        assert!(r.all_answered && r.busy_after_ready);
        assert_eq!(r.phases[0], [3000, 2000]);
        assert_eq!(r.phases[1], vec![100; pinged.len()]);
        assert_eq!(r.phases[2], [7000]);
        assert_eq!(percentile(&r.phases[0], 50), 2000);
        assert_eq!(percentile(&r.phases[0], 99), 3000);
        assert_eq!(r.busy_permille, Some(912));
        assert_eq!(r.scan_permille, Some(48));
        let mem = r.mem.unwrap();
        assert_eq!((mem["pages"], mem["saved_frames"]), (4608, 4000));
        let w = r.busy_window.unwrap();
        assert!(
            !r.busy_window_inside,
            "one snapshot during the work: around it"
        );
        assert_eq!((w["at_tsc"], w["guest_us"], w["exit_us"]), (8000, 900, 20));
        assert_eq!((w["sched_us"], w["decisions"], w["idle_us"]), (2, 10, 0));

        // Two snapshots during the work: the window is between them, without what came before
        // the start line.
        let during = "busy | busy: work=5\n\
            [DEBUG] hv: host time: at_tsc=3000 guest_us=100 exit_us=6 sched_us=1 decisions=4\n\
            [DEBUG] hv: host time: at_tsc=5000 guest_us=500 exit_us=8 sched_us=2 decisions=6\n";
        let log = log.replacen("busy | busy: work=5\n", during, 1);
        let r = analyze(&o, &log, 1.0);
        assert!(r.busy_window_inside);
        let w = r.busy_window.unwrap();
        assert_eq!((w["at_tsc"], w["guest_us"], w["exit_us"]), (2000, 400, 2));
        assert_eq!((w["sched_us"], w["decisions"]), (1, 2));
    }
}
