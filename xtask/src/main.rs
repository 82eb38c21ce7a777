//! `cargo xtask <command>`: everything around the hypervisor that runs on the host.
//!
//! - `deps`: checks (and as root installs) the Debian packages the other commands need.
//! - `build`: the kernel and the test guests for `x86_64-unknown-none`.
//! - `iso --manifest FILE --images a,b [-o OUT]`: a bootable GRUB ISO.
//! - `run [--manifest FILE]`: builds the demo ISO and boots it on the best engine, streaming the
//!   serial console.
//! - `qemu-test [SCENARIO...]`: the integration scenarios of tests/scenarios.
//! - `test`: formatting, clippy, host unit tests and `qemu-test`; ends with `N passed, N failed`.
//! - `manifest check FILE`: validates a boot manifest with the hypervisor's own parser.

mod engine;
mod image;
mod manifest_cmd;
mod scenario;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let strs: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match strs.as_slice() {
        ["deps"] => engine::ensure_packages(),
        ["build"] => build(),
        ["iso", rest @ ..] => image::iso_command(rest),
        ["run", rest @ ..] => run(rest),
        ["qemu-test", rest @ ..] => scenario::qemu_test(rest).map(|_| ()),
        ["test"] => test(),
        ["manifest", "check", ..] => manifest_cmd::check(&args[2..]),
        _ => Err(String::from(USAGE)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `test` has already printed its closing line, which must stay the last one.
            if !e.is_empty() {
                eprintln!("xtask: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo xtask <command>
  deps                          check/install the system packages (bochs, grub, xorriso, qemu...)
  build                         build the hypervisor and the test guests
  iso --manifest F --images a,b [--cmdline S] [-o OUT.iso]
  run [--manifest F]            boot the demo (examples/demo.toml) and stream its console
  qemu-test [SCENARIO...]       run the integration scenarios (tests/scenarios)
  test                          fmt + clippy + unit tests + qemu-test, ends with 'N passed, N failed'
  manifest check F [--images DIR] [--memory-mib N]";

/// The repository root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent")
        .to_path_buf()
}

/// Where the bare-metal binaries land (honouring CARGO_TARGET_DIR, relative to the root).
pub fn bin_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root().join("target"), |d| root().join(d));
    target.join("x86_64-unknown-none/release")
}

/// Runs a command in the repository root; Err names it when it fails.
pub fn run_cmd(cmd: &mut Command) -> Result<(), String> {
    let status = cmd
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed ({status})"))
    }
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| String::from("cargo")))
}

/// Builds the kernel and the test guests (release: Bochs runs them).
pub fn build() -> Result<(), String> {
    run_cmd(cargo().args([
        "build",
        "--release",
        "-p",
        "hypervisor",
        "-p",
        "test-guests",
        "--target",
        "x86_64-unknown-none",
    ]))
}

fn run(args: &[&str]) -> Result<(), String> {
    let manifest = match args {
        [] => root().join("examples/demo.toml"),
        ["--manifest", f] => PathBuf::from(f),
        _ => return Err(String::from("usage: cargo xtask run [--manifest FILE]")),
    };
    engine::ensure_packages()?;
    build()?;
    let text =
        std::fs::read_to_string(&manifest).map_err(|e| format!("{}: {e}", manifest.display()))?;
    let parsed = hv_manifest::parse(&text, &hv_manifest::HostLimits::default())
        .map_err(|e| format!("{}: {e}", manifest.display()))?;
    let mut images: Vec<String> = parsed.vms.iter().map(|v| v.image.clone()).collect();
    images.sort();
    images.dedup();
    let dir = root().join("target/run");
    let iso = image::make_iso(&dir, &manifest, &images, "")?;
    let engine = engine::pick_vmx_engine();
    println!("xtask: booting {} on {}", iso.display(), engine.describe());
    let serial = dir.join("serial.log");
    engine::boot(engine, &iso, &serial, &dir, None, true)?;
    Ok(())
}

fn test() -> Result<(), String> {
    let mut passed = 0;
    let mut failed = 0;
    let mut step = |name: &str, result: Result<(), String>| match result {
        Ok(()) => {
            println!("PASS {name}");
            passed += 1;
        }
        Err(e) => {
            println!("FAIL {name}: {e}");
            failed += 1;
        }
    };
    step(
        "cargo fmt --check",
        run_cmd(cargo().args(["fmt", "--all", "--", "--check"])),
    );
    step(
        "clippy (host crates)",
        run_cmd(cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "hypervisor",
            "--exclude",
            "test-guests",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])),
    );
    step(
        "clippy (bare-metal crates)",
        run_cmd(cargo().args([
            "clippy",
            "--release",
            "-p",
            "hypervisor",
            "-p",
            "test-guests",
            "--target",
            "x86_64-unknown-none",
            "--",
            "-D",
            "warnings",
        ])),
    );
    step(
        "host unit tests",
        run_cmd(cargo().args([
            "test",
            "--workspace",
            "--exclude",
            "hypervisor",
            "--exclude",
            "test-guests",
        ])),
    );
    match scenario::qemu_test(&[]) {
        Ok((p, f)) => {
            passed += p;
            failed += f;
        }
        Err(e) => {
            println!("FAIL qemu-test: {e}");
            failed += 1;
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        Ok(())
    } else {
        Err(String::new())
    }
}
