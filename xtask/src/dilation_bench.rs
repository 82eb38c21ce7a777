//! `cargo xtask bench dilation`: how exactly a time-dilated VM's clocks keep their factor, and
//! what one RDTSC costs with VMX TSC scaling and with RDTSC exiting.
//!
//! For each way of dilating the TSC (the default, TSC scaling, on `corei7_skylake_x`; then
//! `tsc=exiting` on the same model) and each factor K of 1, 2, 5, 10, 50, 100 and 1000, one Bochs
//! boot runs one VM at factor K with the `dilation` guest: a fixed amount of work, timed by the
//! guest's TSC, local APIC timer and PIT. One VM per boot, so that every factor is measured in
//! the same surroundings (VMs asleep beside it would cost the scheduler a little per quantum,
//! which under Bochs's 4 MHz shows). A clock's perceived-rate error at factor K is
//! `rate(K) / (K x rate_tsc(1)) - 1`, in ppm: the undilated TSC rate is the truth (Bochs time
//! is instruction-exact). Bochs runs at 40 M instructions per emulated second ([`BENCH_IPS`]). Each clock can only be read to one of its ticks, so the table also
//! gives that resolution. A last boot per way times back-to-back RDTSCs at factor 2: its guest
//! ticks times 2 are host ticks, which under Bochs are instructions.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::bench::{boot_one, today, OneVm};
use crate::build;
use crate::cli::{Args, Spec};
use crate::deps;
use crate::engine::BOCHS_CPU_MODEL;
use crate::error::{Error, Result};
use crate::process::on_path;
use crate::workspace::Workspace;

const USAGE: &str = "cargo xtask bench dilation";
const GUEST: &str = "dilation";
/// Bochs's rate here: ten times the scenarios' default, so that the hypervisor's own costs (a
/// dilated VM's exits are a little dearer) weigh ten times less in the work rate, while the
/// PIT still counts some 12 000 edges of guest time at K = 1000.
const BENCH_IPS: u64 = 40_000_000;
/// The factors measured, and the work each VM times (LCG rounds, about half an instruction
/// each): 10 ms of guest time or more at every factor.
const FACTORS: [(u64, u64); 7] = [
    (1, 40_000_000),
    (2, 40_000_000),
    (5, 40_000_000),
    (10, 40_000_000),
    (50, 100_000_000),
    (100, 200_000_000),
    (1000, 800_000_000),
];
const RDTSC_LOOP: u64 = 100_000;
/// Rounds between PIT readings (the only exits while measuring): a chunk must stay well within
/// the PIT's 55 ms period at factor 1 (a million rounds: about 13 ms at 40 M instructions per
/// second).
const CHUNK: u64 = 1_000_000;
const RDTSC_TDF: u64 = 2;
/// The PIT's input clock, for its resolution column.
const PIT_HZ: u64 = 1_193_182;

/// `cargo xtask bench dilation`.
pub fn run(ws: &Workspace, args: &[String]) -> Result<()> {
    Args::parse(
        args,
        &Spec {
            usage: USAGE,
            with_value: &[],
            positional: false,
        },
    )?;
    deps::ensure_packages()?;
    if !on_path("bochs") {
        return Err(Error::Deps(
            "bench dilation runs on Bochs, which is not installed".into(),
        ));
    }
    build::build_all(ws)?;
    let mut rows = Vec::new();
    for (mode, words) in [("TSC scaling", ""), ("RDTSC exiting", "tsc=exiting")] {
        let mut reports = BTreeMap::new();
        for (k, steps) in FACTORS {
            let vm = format!("rate-{k}");
            let cmdline = format!("tdf={k} steps={steps} chunk={CHUNK}");
            reports.insert(vm.clone(), boot(ws, mode, words, &vm, k, &cmdline)?);
        }
        let cmdline = format!("tdf={RDTSC_TDF} rdtsc_loop={RDTSC_LOOP}");
        let r = boot(ws, mode, words, "rdtsc", RDTSC_TDF, &cmdline)?;
        reports.insert("rdtsc".to_owned(), r);
        rows.push((mode, reports));
    }
    println!();
    println!(
        "bench dilation: Bochs {BOCHS_CPU_MODEL}, {BENCH_IPS} instructions per emulated second"
    );
    println!(
        "  clock error: the local APIC timer's and the PIT's elapsed time against the guest's TSC \
         (ppm); work rate: rate(K) / (K x rate(1)) - 1 by the TSC (ppm), which also holds the \
         hypervisor's own per-exit cost, which differs by factor and way"
    );
    for (mode, reports) in &rows {
        println!();
        println!("  {mode}:");
        println!(
            "  {:>6} {:>10} {:>10} {:>12} {:>24}",
            "factor", "APIC ppm", "PIT ppm", "work rate ppm", "resolution TSC / PIT ppm"
        );
        for (k, _) in FACTORS {
            let line = Line::of(reports, k)?;
            println!(
                "  {k:>6} {:>10} {:>10} {:>12.0} {:>13.1} / {:.1}",
                line.apic_ppm,
                line.pit_ppm,
                line.work_ppm,
                line.tsc_resolution,
                line.pit_resolution
            );
        }
        let ticks = value(reports, "rdtsc", "rdtsc_ticks_x100")? * RDTSC_TDF;
        println!(
            "  one RDTSC at factor {RDTSC_TDF}: {}.{:02} host ticks (instructions)",
            ticks / 100,
            ticks % 100
        );
    }
    println!();
    println!("Rows for docs/benchmarks.md (ppm: APIC vs TSC / PIT vs TSC / work rate):");
    print!("| date | mode |");
    for (k, _) in FACTORS {
        print!(" K={k} |");
    }
    println!(" RDTSC host ticks |");
    for (mode, reports) in &rows {
        print!("| {} | {mode} |", today());
        for (k, _) in FACTORS {
            let line = Line::of(reports, k)?;
            print!(
                " {} / {} / {:+.0} |",
                line.apic_ppm, line.pit_ppm, line.work_ppm
            );
        }
        let ticks = value(reports, "rdtsc", "rdtsc_ticks_x100")? * RDTSC_TDF;
        println!(" {}.{:02} |", ticks / 100, ticks % 100);
    }
    Ok(())
}

/// One factor's figures.
struct Line {
    apic_ppm: u64,
    pit_ppm: u64,
    work_ppm: f64,
    tsc_resolution: f64,
    pit_resolution: f64,
}

impl Line {
    fn of(reports: &BTreeMap<String, BTreeMap<String, u64>>, k: u64) -> Result<Line> {
        let vm = format!("rate-{k}");
        let base = value(reports, "rate-1", "rate_tsc")? as f64;
        let guest_s = value(reports, &vm, "guest_us")? as f64 / 1e6;
        Ok(Line {
            apic_ppm: value(reports, &vm, "lapic_ppm")?,
            pit_ppm: value(reports, &vm, "pit_ppm")?,
            work_ppm: (value(reports, &vm, "rate_tsc")? as f64 / (k as f64 * base) - 1.0) * 1e6,
            tsc_resolution: 1e6 / (guest_s * BENCH_IPS as f64),
            pit_resolution: 1e6 / (guest_s * PIT_HZ as f64),
        })
    }
}

/// The manifest of one boot: one VM `name` at factor `k` with the guest's `cmdline`.
fn manifest_text(name: &str, k: u64, cmdline: &str) -> String {
    format!(
        "# Written by `cargo xtask bench dilation`.\n[[vm]]\nname = \"{name}\"\n\
         memory_mib = 4\nimage = \"{GUEST}\"\ntime_dilation = {k}\ncmdline = \"{cmdline}\"\n"
    )
}

/// Boots one VM and returns its reports.
fn boot(
    ws: &Workspace,
    mode: &str,
    words: &str,
    name: &str,
    k: u64,
    cmdline: &str,
) -> Result<BTreeMap<String, u64>> {
    let way = if words.is_empty() {
        "scaling"
    } else {
        "exiting"
    };
    let hv_cmdline = format!("exit=emulator log=info {words}");
    let booted = boot_one(&OneVm {
        ws,
        dir: ws.scratch("bench-dilation").join(format!("{way}-{name}")),
        manifest: &manifest_text(name, k, cmdline),
        image: GUEST,
        hv_cmdline: hv_cmdline.trim(),
        vm: name,
        timeout: Duration::from_secs(900),
        bochs_ips: BENCH_IPS,
        what: &format!("bench dilation: {mode}, {name}"),
    })?;
    Ok(booted.reports)
}

fn value(reports: &BTreeMap<String, BTreeMap<String, u64>>, vm: &str, key: &str) -> Result<u64> {
    reports
        .get(vm)
        .and_then(|r| r.get(key))
        .copied()
        .ok_or_else(|| Error::Failed(format!("bench dilation: VM {vm} did not report {key}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_valid() {
        for (k, steps) in FACTORS {
            let cmdline = format!("tdf={k} steps={steps} chunk={CHUNK}");
            let text = manifest_text("rate", k, &cmdline);
            let parsed = hv_manifest::parse(&text, &hv_manifest::HostLimits::default()).unwrap();
            assert_eq!(parsed.errors, []);
            assert_eq!(parsed.vms[0].time_dilation_milli, k as u32 * 1000);
            assert_eq!(parsed.vms[0].cmdline, cmdline);
        }
    }
}
