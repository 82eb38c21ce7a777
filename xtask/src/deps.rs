//! `cargo xtask deps`: the system packages and the Rust target the other commands need.
//!
//! The packages are Debian's: Bochs (with its BIOS and the VGA BIOS, without which Bochs crashes
//! at start), GRUB for BIOS and UEFI plus `grub-mkrescue`'s helpers (xorriso, mtools), and QEMU.
//! As root the missing ones are installed with apt-get; otherwise the exact command is printed
//! and the check fails. Every command that boots or images something calls [`ensure_packages`]
//! first, so a fresh machine needs nothing but `cargo xtask test`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use crate::error::{Error, Result};
use crate::process::{self, describe, on_path};
use crate::workspace::BARE_METAL_TARGET;

/// Debian packages needed to build ISOs and boot them.
pub const PACKAGES: &[&str] = &[
    "bochs",
    "bochsbios",
    "vgabios",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "grub-common",
    "xorriso",
    "mtools",
    "qemu-system-x86",
    // kvm-unit-tests is built from source (cargo xtask kvm-unit-tests).
    "gcc",
    "make",
];

/// Programs that stand for the packages where dpkg is not available (a non-Debian host).
const PROGRAMS: &[&str] = &[
    "bochs",
    "grub-mkrescue",
    "xorriso",
    "mformat",
    "qemu-system-x86_64",
    "gcc",
    "make",
];

/// `cargo xtask deps`: packages and the bare-metal Rust target.
pub fn run(args: &[String]) -> Result<()> {
    crate::cli::no_arguments(
        "deps",
        "usage: cargo xtask deps   (checks the system packages and the x86_64-unknown-none target; as root, installs what is missing)",
        args,
    )?;
    ensure_packages()?;
    ensure_rust_target()?;
    println!("deps: all system packages and the {BARE_METAL_TARGET} target are present");
    Ok(())
}

/// Makes sure every package of [`PACKAGES`] is installed, installing the missing ones when root.
pub fn ensure_packages() -> Result<()> {
    if !on_path("dpkg-query") {
        let missing: Vec<&str> = PROGRAMS.iter().copied().filter(|p| !on_path(p)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        return Err(Error::Deps(format!(
            "deps: not a Debian system (no dpkg-query) and these programs are missing: {}; \
             install the equivalents of the Debian packages {}",
            missing.join(", "),
            PACKAGES.join(" ")
        )));
    }
    let missing = missing_packages()?;
    if missing.is_empty() {
        return Ok(());
    }
    let install = install_command_line(&missing);
    if !is_root() {
        return Err(Error::Deps(format!(
            "deps: missing packages: {}\nrun as root:\n    {install}",
            missing.join(" ")
        )));
    }
    println!("deps: installing {}", missing.join(" "));
    process::run_inherited(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    process::run_inherited(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let still_missing = missing_packages()?;
    if !still_missing.is_empty() {
        return Err(Error::Deps(format!(
            "deps: still missing after apt-get install: {}",
            still_missing.join(" ")
        )));
    }
    Ok(())
}

/// The command line a non-root user must run.
fn install_command_line(missing: &[String]) -> String {
    format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
         --no-install-recommends {}",
        missing.join(" ")
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Packages of [`PACKAGES`] that dpkg does not list as installed.
fn missing_packages() -> Result<Vec<String>> {
    let mut command = Command::new("dpkg-query");
    command
        .args(["-W", "-f", "${Package} ${db:Status-Status}\\n"])
        .args(PACKAGES);
    // dpkg-query exits 1 when a package is unknown to it; its stdout still lists the others.
    let output = command.output().map_err(|source| Error::Spawn {
        program: describe(&command),
        source,
    })?;
    let listing = String::from_utf8_lossy(&output.stdout);
    Ok(not_installed(PACKAGES, &listing))
}

/// Which of `wanted` are not `installed` in the `dpkg-query -W -f '${Package} ${db:Status-Status}\n'`
/// output `listing`. Multi-arch listings may name a package several times; one installed
/// instance is enough.
fn not_installed(wanted: &[&str], listing: &str) -> Vec<String> {
    let mut status: BTreeMap<&str, bool> = BTreeMap::new();
    for line in listing.lines() {
        let mut words = line.split_whitespace();
        if let (Some(package), Some(state)) = (words.next(), words.next()) {
            // `${Package}` has no architecture suffix, but be lenient with `name:arch`.
            let package = package.split(':').next().unwrap_or(package);
            *status.entry(package).or_default() |= state == "installed";
        }
    }
    wanted
        .iter()
        .filter(|package| !status.get(*package).copied().unwrap_or(false))
        .map(|package| package.to_string())
        .collect()
}

/// Makes sure the active toolchain has the standard library of `x86_64-unknown-none`
/// (rust-toolchain.toml lists it, so rustup normally installed it already).
pub fn ensure_rust_target() -> Result<()> {
    if rust_target_installed()? {
        return Ok(());
    }
    if !on_path("rustup") {
        return Err(Error::Deps(format!(
            "deps: the Rust target {BARE_METAL_TARGET} is not installed and rustup is not \
             available to add it"
        )));
    }
    println!("deps: adding the Rust target {BARE_METAL_TARGET}");
    process::run_inherited(Command::new("rustup").args(["target", "add", BARE_METAL_TARGET]))?;
    if rust_target_installed()? {
        Ok(())
    } else {
        Err(Error::Deps(format!(
            "deps: `rustup target add {BARE_METAL_TARGET}` ran but the target is still missing"
        )))
    }
}

/// Whether the sysroot of the `rustc` that cargo uses has the bare-metal target's libraries.
fn rust_target_installed() -> Result<bool> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let output = process::run_captured(Command::new(rustc).args(["--print", "sysroot"]))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    Ok(sysroot
        .join("lib/rustlib")
        .join(BARE_METAL_TARGET)
        .join("lib")
        .is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_installed() {
        let listing = "bochs installed\nxorriso installed\n";
        assert!(not_installed(&["bochs", "xorriso"], listing).is_empty());
    }

    #[test]
    fn absent_and_half_installed_are_missing() {
        // `config-files`: removed but not purged; a package dpkg does not know is not listed.
        let listing = "bochs installed\nvgabios config-files\nmtools not-installed\n";
        assert_eq!(
            not_installed(&["bochs", "vgabios", "mtools", "xorriso"], listing),
            vec!["vgabios", "mtools", "xorriso"]
        );
    }

    #[test]
    fn one_installed_architecture_is_enough() {
        let listing = "libfoo not-installed\nlibfoo installed\n";
        assert!(not_installed(&["libfoo"], listing).is_empty());
    }

    #[test]
    fn install_line_is_noninteractive() {
        let line = install_command_line(&["bochs".to_owned(), "mtools".to_owned()]);
        assert_eq!(
            line,
            "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
             --no-install-recommends bochs mtools"
        );
    }
}
