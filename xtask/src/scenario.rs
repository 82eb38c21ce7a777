//! Integration scenarios (tests/scenarios/NAME/scenario.toml + manifest.toml): each is booted on
//! an emulator and judged by its serial log. See tests/scenarios/README.md for the format.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::engine::{self, Engine};
use crate::root;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub description: String,
    /// "vmx" or "no-vmx".
    pub engine: String,
    pub timeout_s: u64,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub images: Vec<String>,
    #[serde(default)]
    pub expect: Vec<String>,
    #[serde(default)]
    pub reject: Vec<String>,
    pub cpu_fairness: Option<Fairness>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fairness {
    pub vms: Vec<String>,
    pub tolerance: f64,
}

/// Substrings no scenario may show.
const ALWAYS_REJECT: &[&str] = &["[PANIC]", "[FATAL]"];

/// Checks a serial log against a scenario; Err says the first thing that is wrong.
pub fn judge(s: &Scenario, log: &str) -> Result<(), String> {
    for e in &s.expect {
        if !log.lines().any(|l| l.contains(e.as_str())) {
            return Err(format!("expected line not found: {e:?}"));
        }
    }
    for r in s
        .reject
        .iter()
        .map(String::as_str)
        .chain(ALWAYS_REJECT.iter().copied())
    {
        if let Some(l) = log.lines().find(|l| l.contains(r)) {
            return Err(format!("rejected text {r:?} found: {l:?}"));
        }
    }
    if let Some(f) = &s.cpu_fairness {
        let times = cpu_times(log);
        let mut got = Vec::new();
        for vm in &f.vms {
            got.push(
                *times
                    .get(vm)
                    .ok_or(format!("no stats line with cpu_us for vm {vm}"))?,
            );
        }
        let (min, max) = (
            *got.iter().min().unwrap_or(&0),
            *got.iter().max().unwrap_or(&0),
        );
        let spread = if min == 0 {
            f64::INFINITY
        } else {
            (max - min) as f64 / min as f64
        };
        if spread > f.tolerance {
            return Err(format!(
                "CPU times {got:?} us differ by {:.1}% > {:.0}%",
                spread * 100.0,
                f.tolerance * 100.0
            ));
        }
        println!("  cpu_fairness: {got:?} us, spread {:.1}%", spread * 100.0);
    }
    Ok(())
}

/// `vm -> cpu_us` from the `[INFO] stats vm=NAME ... cpu_us=N` lines.
pub fn cpu_times(log: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in log.lines().filter_map(|l| l.strip_prefix("[INFO] stats ")) {
        let mut vm = None;
        let mut cpu = None;
        for word in line.split_whitespace() {
            match word.split_once('=') {
                Some(("vm", v)) => vm = Some(v.to_string()),
                Some(("cpu_us", v)) => cpu = v.parse().ok(),
                _ => {}
            }
        }
        if let (Some(vm), Some(cpu)) = (vm, cpu) {
            out.insert(vm, cpu);
        }
    }
    out
}

fn load(dir: &Path) -> Result<Scenario, String> {
    let path = dir.join("scenario.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn run_one(name: &str, dir: &Path, vmx_engine: Engine) -> Result<String, String> {
    let s = load(dir)?;
    let engine = match s.engine.as_str() {
        "vmx" => vmx_engine,
        "no-vmx" => Engine::QemuTcg,
        other => return Err(format!("unknown engine {other:?}")),
    };
    let work = root().join("target/qemu-test").join(name);
    let iso = crate::image::make_iso(&work, &dir.join("manifest.toml"), &s.images, &s.cmdline)?;
    let serial = work.join("serial.log");
    let start = Instant::now();
    let finished = engine::boot(
        engine,
        &iso,
        &serial,
        &work,
        Some(Duration::from_secs(s.timeout_s)),
        false,
    )?;
    let secs = start.elapsed().as_secs_f64();
    let log = String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
    let verdict = judge(&s, &log).and_then(|()| {
        if finished {
            Ok(())
        } else {
            Err(format!("did not finish within {} s", s.timeout_s))
        }
    });
    match verdict {
        Ok(()) => Ok(format!(
            "{} ({}, {secs:.1} s)",
            engine.name(),
            s.description
        )),
        Err(e) => {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(format!(
                "{e}\n  engine {}, {secs:.1} s; log {}; last lines:\n    {}",
                engine.name(),
                serial.display(),
                tail.join("\n    ")
            ))
        }
    }
}

/// Runs the named scenarios (all when none), two at a time; returns (passed, failed).
pub fn qemu_test(names: &[&str]) -> Result<(usize, usize), String> {
    engine::ensure_packages()?;
    crate::build()?;
    let base = root().join("tests/scenarios");
    let mut all: Vec<(String, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(&base).map_err(|e| format!("{}: {e}", base.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.join("scenario.toml").exists() {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if names.is_empty() || names.contains(&name.as_str()) {
                all.push((name, path));
            }
        }
    }
    all.sort();
    for n in names {
        if !all.iter().any(|(a, _)| a == n) {
            return Err(format!("no scenario named {n}"));
        }
    }
    let vmx_engine = engine::pick_vmx_engine();
    println!(
        "qemu-test: {} scenarios; VT-x engine: {}",
        all.len(),
        vmx_engine.describe()
    );
    let queue = Arc::new(Mutex::new(all));
    let results = Arc::new(Mutex::new((0usize, 0usize)));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (queue, results) = (queue.clone(), results.clone());
            std::thread::spawn(move || loop {
                let Some((name, dir)) = queue.lock().expect("queue").pop() else {
                    break;
                };
                let r = run_one(&name, &dir, vmx_engine);
                let mut res = results.lock().expect("results");
                match r {
                    Ok(info) => {
                        println!("PASS {name}: {info}");
                        res.0 += 1;
                    }
                    Err(e) => {
                        println!("FAIL {name}: {e}");
                        res.1 += 1;
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| "a scenario worker panicked")?;
    }
    let (p, f) = *results.lock().expect("results");
    println!("qemu-test: {p} passed, {f} failed");
    Ok((p, f))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(expect: &[&str], reject: &[&str], fair: Option<f64>) -> Scenario {
        Scenario {
            description: String::new(),
            engine: "vmx".into(),
            timeout_s: 1,
            cmdline: String::new(),
            images: vec![],
            expect: expect.iter().map(|s| s.to_string()).collect(),
            reject: reject.iter().map(|s| s.to_string()).collect(),
            cpu_fairness: fair.map(|t| Fairness {
                vms: vec!["a".into(), "b".into()],
                tolerance: t,
            }),
        }
    }

    const LOG: &str = "a | hi\n[INFO] stats vm=a state=exited(0) cpu_us=100 runs=3\n\
                       [INFO] stats vm=b state=exited(0) cpu_us=115 runs=3\n";

    #[test]
    fn expectations_and_rejections() {
        assert!(judge(&scenario(&["a | hi"], &[], None), LOG).is_ok());
        assert!(judge(&scenario(&["b | hi"], &[], None), LOG).is_err());
        assert!(judge(&scenario(&[], &["cpu_us=115"], None), LOG).is_err());
        assert!(judge(&scenario(&[], &[], None), "[PANIC] boom\n").is_err());
    }

    #[test]
    fn fairness_uses_the_stats_lines() {
        assert_eq!(cpu_times(LOG).get("b"), Some(&115));
        assert!(judge(&scenario(&[], &[], Some(0.20)), LOG).is_ok());
        assert!(judge(&scenario(&[], &[], Some(0.10)), LOG).is_err());
        assert!(judge(&scenario(&[], &[], Some(0.20)), "a | x\n").is_err());
    }

    #[test]
    fn every_scenario_file_parses() {
        let base = root().join("tests/scenarios");
        for entry in std::fs::read_dir(base).unwrap() {
            let dir = entry.unwrap().path();
            if dir.join("scenario.toml").exists() {
                let s = load(&dir).unwrap();
                assert!(
                    matches!(s.engine.as_str(), "vmx" | "no-vmx"),
                    "{}",
                    dir.display()
                );
                assert!(dir.join("manifest.toml").exists(), "{}", dir.display());
            }
        }
    }
}
