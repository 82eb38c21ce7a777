//! `cargo xtask test`: everything CI checks, each step and each scenario counted as one check.
//!
//! Steps: the system packages, `cargo fmt --check`, clippy (`-D warnings`) on the host crates
//! and on the bare-metal crates, the host unit tests, the release build of the kernel and
//! guests, then every integration scenario, then each kvm-unit-tests test of the CI set
//! (tests/kvm-unit-tests.toml). A failing step does not stop the others (a clippy complaint
//! should not hide a failing scenario); steps that cannot run because an earlier one failed
//! count as failed, never as skipped. The one exception: without the kvm-unit-tests source next
//! to the checkout (`../shared/third_party/`), a user's run says so and counts nothing, while
//! CI (`MUXVISOR_REQUIRE_KVM_UNIT_TESTS` set by .ci/run) counts it as a failure. The last line
//! is exactly `N passed, N failed`.

use std::process::Command;
use std::time::Instant;

use crate::build;
use crate::deps;
use crate::error::{Error, Result};
use crate::kut;
use crate::process;
use crate::qemu_test::{self, Tally};
use crate::scenario;
use crate::workspace::{Workspace, BARE_METAL_TARGET, GUESTS_PACKAGE, KERNEL_PACKAGE};

/// Scenarios run at once (CI has two cores).
const JOBS: usize = 2;
/// Set (by .ci/run) when a missing kvm-unit-tests source must fail the run rather than skip.
const KUT_REQUIRED: &str = "MUXVISOR_REQUIRE_KVM_UNIT_TESTS";

/// `cargo xtask test`.
pub fn run(ws: &Workspace, args: &[String]) -> Result<()> {
    crate::cli::no_arguments(
        "test",
        "usage: cargo xtask test   (everything CI checks: fmt, clippy, unit tests, builds, scenarios, kvm-unit-tests; ends with `N passed, N failed`)",
        args,
    )?;
    let mut tally = Tally::default();
    let mut step = |name: &str, result: Result<()>, start: Instant| {
        let seconds = start.elapsed().as_secs_f64();
        match &result {
            Ok(()) => println!("PASS {name} ({seconds:.1} s)"),
            Err(e) => println!("FAIL {name}: {e}"),
        }
        tally.count(name, result.is_ok());
        result.is_ok()
    };

    let start = Instant::now();
    let deps_ok = step(
        "deps",
        deps::ensure_packages().and_then(|()| deps::ensure_rust_target()),
        start,
    );
    for (name, args) in cargo_steps() {
        let start = Instant::now();
        let mut cargo = ws.cargo();
        cargo.args(args);
        step(name, checked(&mut cargo), start);
    }
    let start = Instant::now();
    let built = step("build (kernel and guests)", build::build_all(ws), start);

    let scenarios = match scenario::discover(&ws.scenarios_dir(), &[]) {
        Ok(scenarios) => scenarios,
        Err(e) => {
            println!("FAIL qemu-test: {e}");
            tally.count("qemu-test", false);
            Vec::new()
        }
    };
    let scenario_tally = if !deps_ok {
        qemu_test::fail_all(&scenarios, "the system packages are missing")
    } else if !built {
        qemu_test::fail_all(&scenarios, "the build failed")
    } else {
        qemu_test::run_scenarios(ws, &scenarios, JOBS)
    };
    tally.add(scenario_tally);

    // kvm-unit-tests' must-pass set that fits in CI (tests/kvm-unit-tests.toml), one check each.
    if !kut::source_available(ws) && std::env::var_os(KUT_REQUIRED).is_none() {
        // A user's checkout without the suite next to it: say so, count nothing.
        println!("SKIP kvm-unit-tests: {}", kut::SOURCE_MISSING);
    } else if !deps_ok || !built {
        println!("FAIL kvm-unit-tests: the system packages or the build are missing");
        tally.count("kvm-unit-tests", false);
    } else {
        match kut::run_suite(ws, None, &[], "ci", kut::Shape::default()) {
            Ok(results) => {
                for (name, ok) in results {
                    tally.count(&format!("kvm-unit-tests {name}"), ok);
                }
            }
            Err(e) => {
                println!("FAIL kvm-unit-tests: {e}");
                tally.count("kvm-unit-tests", false);
            }
        }
    }

    if !tally.failed_names.is_empty() {
        println!("test: failed: {}", tally.failed_names.join(", "));
    }
    println!("{} passed, {} failed", tally.passed, tally.failed);
    if tally.failed == 0 {
        Ok(())
    } else {
        Err(Error::AlreadyReported)
    }
}

/// The cargo checks, by name.
fn cargo_steps() -> Vec<(&'static str, Vec<&'static str>)> {
    let host_exclude = [
        "--workspace",
        "--exclude",
        KERNEL_PACKAGE,
        "--exclude",
        GUESTS_PACKAGE,
    ];
    let mut clippy_host = vec!["clippy"];
    clippy_host.extend(host_exclude);
    clippy_host.extend(["--all-targets", "--", "-D", "warnings"]);
    let clippy_bare = vec![
        "clippy",
        "--release",
        "-p",
        KERNEL_PACKAGE,
        "-p",
        GUESTS_PACKAGE,
        "--target",
        BARE_METAL_TARGET,
        "--",
        "-D",
        "warnings",
    ];
    let mut unit_tests = vec!["test"];
    unit_tests.extend(host_exclude);
    vec![
        ("cargo fmt --check", vec!["fmt", "--all", "--", "--check"]),
        ("clippy (host crates)", clippy_host),
        ("clippy (bare-metal crates)", clippy_bare),
        ("host unit tests", unit_tests),
    ]
}

/// Runs a cargo step with its output on the terminal.
fn checked(command: &mut Command) -> Result<()> {
    println!("test: {}", process::describe(command));
    process::run_inherited(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cargo_steps_are_the_documented_commands() {
        let steps: Vec<String> = cargo_steps()
            .into_iter()
            .map(|(_, args)| args.join(" "))
            .collect();
        assert_eq!(
            steps,
            [
                "fmt --all -- --check",
                "clippy --workspace --exclude hypervisor --exclude test-guests --all-targets -- \
                 -D warnings",
                "clippy --release -p hypervisor -p test-guests --target x86_64-unknown-none -- \
                 -D warnings",
                "test --workspace --exclude hypervisor --exclude test-guests",
            ]
        );
    }
}
