//! `cargo xtask bench exits [--n N]`: the cost of a VM exit round trip.
//!
//! Boots one VM running the `exit-bench` guest under Bochs twice, with `n=N` and `n=4N`. The
//! guest times N iterations each of CPUID, the `nop` hypercall (VMCALL) and an emulated port
//! read with RDTSC, which inside Bochs counts instructions, and reports ticks per iteration x100.
//! Wall time per exit comes from the difference of the two runs: the second does 3*(4N-N) more
//! exits and otherwise the same work (boot, GRUB, setup), which cancels out.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::build;
use crate::cli::{parse_positive, Args, Spec};
use crate::deps;
use crate::engine::{self, BootSpec, Engine, BOCHS_CPU_MODEL};
use crate::error::{Error, IoContext, Result};
use crate::iso::{self, IsoSpec};
use crate::process::{on_path, Ending};
use crate::workspace::Workspace;

const USAGE: &str = "cargo xtask bench exits [--n N]";
const DEFAULT_N: u64 = 100_000;
const GUEST: &str = "exit-bench";
const VM: &str = "bench";
/// What the guest measures, with their report keys: three exits (N iterations each), an MMIO
/// access and a timer interrupt (N/10 iterations each).
const KINDS: [(&str, &str); 5] = [
    ("cpuid", "cpuid_ticks_x100"),
    ("vmcall", "vmcall_ticks_x100"),
    ("io", "io_ticks_x100"),
    ("mmio", "mmio_ticks_x100"),
    ("timer", "timer_ticks_x100"),
];

/// `cargo xtask bench exits ...`.
pub fn exits(ws: &Workspace, args: &[String]) -> Result<()> {
    let args = Args::parse(
        args,
        &Spec {
            usage: USAGE,
            with_value: &["--n"],
            positional: false,
        },
    )?;
    let n = match args.value("--n") {
        Some(value) => parse_positive("--n", value)?,
        None => DEFAULT_N,
    };
    let big_n = n
        .checked_mul(4)
        .filter(|v| *v <= u64::MAX / 100)
        .ok_or_else(|| Error::Usage(format!("--n {n} is too large")))?;
    deps::ensure_packages()?;
    if !on_path("bochs") {
        return Err(Error::Deps(
            "bench exits runs on Bochs, which is not installed".into(),
        ));
    }
    build::build_all(ws)?;
    let small = bench_run(ws, n)?;
    let large = bench_run(ws, big_n)?;
    // One exit per CPUID, VMCALL, IN and MMIO read; two per timer interrupt (the WRMSR that
    // arms it, the WRMSR of its EOI).
    let extra_exits = 3 * (big_n - n) + 3 * (big_n / 10 - n / 10);
    let extra_wall = large.wall.saturating_sub(small.wall);
    let exits_per_s = extra_exits as f64 / extra_wall.as_secs_f64().max(1e-9);

    println!();
    println!("bench exits: Bochs {BOCHS_CPU_MODEL}, ticks = emulated instructions (RDTSC)");
    println!(
        "  n={n}: {:.2} s wall; n={big_n}: {:.2} s wall",
        secs(small.wall),
        secs(large.wall)
    );
    println!(
        "  {:<7} {:>14} {:>14} {:>22}",
        "exit", "ticks/iter", "ticks/iter", "minus empty loop"
    );
    println!(
        "  {:<7} {:>14} {:>14} {:>22}",
        "",
        format!("n={n}"),
        format!("n={big_n}"),
        "(n=4N)"
    );
    for (kind, key) in KINDS {
        println!(
            "  {:<7} {:>14} {:>14} {:>22}",
            kind,
            x100(small.report(key)?),
            x100(large.report(key)?),
            x100(
                large
                    .report(key)?
                    .saturating_sub(large.report("loop_ticks_x100")?)
            ),
        );
    }
    println!(
        "  wall: {extra_exits} more exits in {:.3} s more => {:.0} exits/s",
        secs(extra_wall),
        exits_per_s
    );
    println!();
    println!("Row for docs/benchmarks.md:");
    println!(
        "| date | engine | N | cpuid ticks/exit | vmcall ticks/exit | io ticks/exit | mmio ticks/access | timer ticks/interrupt | exits/s (wall) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | Bochs {BOCHS_CPU_MODEL} | {n} / {big_n} | {} | {} | {} | {} | {} | {:.0} |",
        today(),
        x100(large.report("cpuid_ticks_x100")?),
        x100(large.report("vmcall_ticks_x100")?),
        x100(large.report("io_ticks_x100")?),
        x100(large.report("mmio_ticks_x100")?),
        x100(large.report("timer_ticks_x100")?),
        exits_per_s
    );
    Ok(())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// `12345` (x100) as `123.45`.
fn x100(value: u64) -> String {
    format!("{}.{:02}", value / 100, value % 100)
}

/// One benchmark boot.
struct BenchRun {
    wall: Duration,
    reports: BTreeMap<String, u64>,
    n: u64,
}

impl BenchRun {
    fn report(&self, key: &str) -> Result<u64> {
        self.reports.get(key).copied().ok_or_else(|| {
            Error::Failed(format!(
                "bench exits: the guest did not report {key} (n={})",
                self.n
            ))
        })
    }
}

fn manifest_text(n: u64) -> String {
    format!(
        "# Written by `cargo xtask bench exits`: one VM timing {n} exits of each kind.\n\
         [[vm]]\nname = \"{VM}\"\nmemory_mib = 4\nimage = \"{GUEST}\"\ncmdline = \"n={n}\"\n"
    )
}

fn bench_run(ws: &Workspace, n: u64) -> Result<BenchRun> {
    // Generous: Bochs does ~200k exits/s; allow for a machine 20x slower plus the boot.
    let timeout = Duration::from_secs(120 + 3 * n / 10_000);
    let booted = boot_one(&OneVm {
        ws,
        dir: ws.scratch("bench-exits").join(format!("n-{n}")),
        manifest: &manifest_text(n),
        image: GUEST,
        hv_cmdline: "exit=emulator log=info",
        vm: VM,
        timeout,
        bochs_ips: engine::BOCHS_IPS,
        what: &format!("bench exits, n={n}"),
    })?;
    let run = BenchRun {
        wall: booted.wall,
        reports: booted.reports,
        n,
    };
    if run.report("bench_n")? != n {
        return Err(Error::Failed(format!(
            "bench exits: the guest ran n={} instead of {n}",
            run.report("bench_n")?
        )));
    }
    Ok(run)
}

/// One benchmark boot of one VM under Bochs (the default model and rate).
pub(crate) struct OneVm<'a> {
    pub ws: &'a Workspace,
    /// Where the manifest, the ISO and the logs go.
    pub dir: PathBuf,
    pub manifest: &'a str,
    /// The one guest image.
    pub image: &'a str,
    pub hv_cmdline: &'a str,
    /// The VM whose reports are read; it must exit with code 0.
    pub vm: &'a str,
    pub timeout: Duration,
    /// Bochs's instructions per emulated second.
    pub bochs_ips: u64,
    /// For messages: `bench exits, n=100`.
    pub what: &'a str,
}

/// What a benchmark boot gives back.
pub(crate) struct Booted {
    pub wall: Duration,
    pub reports: BTreeMap<String, u64>,
}

/// Boots `one` and returns the VM's reports, or why it did not finish cleanly.
pub(crate) fn boot_one(one: &OneVm<'_>) -> Result<Booted> {
    let dir = &one.dir;
    fs::create_dir_all(dir).context(|| format!("creating {}", dir.display()))?;
    let manifest = dir.join("manifest.toml");
    fs::write(&manifest, one.manifest).context(|| format!("writing {}", manifest.display()))?;
    let iso_path = dir.join("bench.iso");
    let spec = IsoSpec::from_build(one.ws, &manifest, &[one.image.to_owned()], one.hv_cmdline)?;
    iso::make_iso(one.ws, &spec, &dir.join("iso-root"), &iso_path)?;
    let boot = BootSpec {
        engine: Engine::Bochs,
        iso: iso_path,
        dir: dir.clone(),
        timeout: one.timeout,
        bochs_ips: one.bochs_ips,
        bochs_cpu: engine::BOCHS_CPU_MODEL.to_owned(),
        memory_mib: engine::MEMORY_MIB,
    };
    println!("{} on Bochs ...", one.what);
    let outcome = engine::boot(&boot, || {})?;
    let serial = boot.serial_log();
    let log = fs::read(&serial).context(|| format!("reading {}", serial.display()))?;
    let log = String::from_utf8_lossy(&log);
    if outcome.ending == Ending::TimedOut {
        return Err(Error::Failed(format!(
            "{} did not finish within {} s (log {})",
            one.what,
            one.timeout.as_secs(),
            serial.display()
        )));
    }
    let exited = format!("[INFO] vm {}: exited with code 0", one.vm);
    if !log.lines().any(|line| line.contains(&exited)) {
        return Err(Error::Failed(format!(
            "{}: the guest did not exit cleanly (log {})",
            one.what,
            serial.display()
        )));
    }
    Ok(Booted {
        wall: outcome.wall,
        reports: reports_of(&log, one.vm),
    })
}

/// The `[INFO] vm NAME: report KEY=VALUE` values of VM `vm`.
pub(crate) fn reports_of(log: &str, vm: &str) -> BTreeMap<String, u64> {
    let prefix = format!("[INFO] vm {vm}: report ");
    log.lines()
        .filter_map(|line| line.trim_end().strip_prefix(prefix.as_str()))
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(key, value)| Some((key.to_owned(), value.parse().ok()?)))
        .collect()
}

/// Today's UTC date as YYYY-MM-DD.
pub(crate) fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_of_one_vm() {
        let log = "[INFO] vm bench: report bench_n=100\n\
                   [INFO] vm other: report bench_n=7\n\
                   bench | exit-bench: n=100\n\
                   [INFO] vm bench: report cpuid_ticks_x100=123456\r\n\
                   [INFO] vm bench: report junk=x\n";
        let reports = reports_of(log, "bench");
        assert_eq!(reports.len(), 2);
        assert_eq!(reports["bench_n"], 100);
        assert_eq!(reports["cpuid_ticks_x100"], 123_456);
    }

    #[test]
    fn hundredths() {
        assert_eq!(x100(123_456), "1234.56");
        assert_eq!(x100(5), "0.05");
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn manifest_is_valid_for_the_hypervisor() {
        let text = manifest_text(400_000);
        let parsed = hv_manifest::parse(&text, &hv_manifest::HostLimits::default()).unwrap();
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(parsed.vms.len(), 1);
        assert_eq!(parsed.vms[0].image, GUEST);
        assert_eq!(parsed.vms[0].cmdline, "n=400000");
    }
}
