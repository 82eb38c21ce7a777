//! `cargo xtask build`: the kernel and the guest images, release builds for
//! `x86_64-unknown-none` into cargo's target directory.

use crate::deps;
use crate::error::{Error, Result};
use crate::process;
use crate::workspace::{Workspace, BARE_METAL_TARGET, GUESTS_PACKAGE, KERNEL_PACKAGE};

/// `cargo xtask build`.
pub fn run(ws: &Workspace, args: &[String]) -> Result<()> {
    crate::cli::no_arguments(
        "build",
        "usage: cargo xtask build   (the hypervisor and the test guests, release builds)",
        args,
    )?;
    build_all(ws)?;
    println!("build: kernel {}", ws.kernel_elf().display());
    println!("build: guests in {}", ws.bare_metal_dir().display());
    Ok(())
}

/// Builds the kernel, then the guests (two cargo runs, so each package gets exactly its own
/// feature set, as when built alone).
pub fn build_all(ws: &Workspace) -> Result<()> {
    deps::ensure_rust_target()?;
    for package in [KERNEL_PACKAGE, GUESTS_PACKAGE] {
        let mut cargo = ws.cargo();
        cargo.args([
            "build",
            "--release",
            "-p",
            package,
            "--target",
            BARE_METAL_TARGET,
        ]);
        println!("build: {}", process::describe(&cargo));
        process::run_inherited(&mut cargo)?;
    }
    let kernel = ws.kernel_elf();
    if !kernel.is_file() {
        return Err(Error::Failed(format!(
            "build: cargo succeeded but {} does not exist",
            kernel.display()
        )));
    }
    Ok(())
}
