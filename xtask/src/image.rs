//! Bootable ISO images: the hypervisor, a manifest and guest images as GRUB Multiboot2 modules
//! (boot/grub.cfg.in is the menu entry template), made with grub-mkrescue.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{bin_dir, root, run_cmd};

/// Stages `dir/iso/` and writes `dir/boot.iso`. `images` are test-guests binaries.
pub fn make_iso(
    dir: &Path,
    manifest: &Path,
    images: &[String],
    cmdline: &str,
) -> Result<PathBuf, String> {
    let tree = dir.join("iso");
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("boot/grub")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(tree.join("boot/guests")).map_err(|e| e.to_string())?;
    let copy = |from: &Path, to: &Path| {
        std::fs::copy(from, to)
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", from.display()))
    };
    copy(
        &bin_dir().join("hypervisor"),
        &tree.join("boot/hypervisor.elf"),
    )?;
    copy(manifest, &tree.join("boot/manifest.toml"))?;
    let mut modules = String::new();
    for img in images {
        copy(
            &bin_dir().join(img),
            &tree.join(format!("boot/guests/{img}.elf")),
        )?;
        modules.push_str(&format!("    module2 /boot/guests/{img}.elf {img}\n"));
    }
    let template =
        std::fs::read_to_string(root().join("boot/grub.cfg.in")).map_err(|e| e.to_string())?;
    let cfg = template
        .replace("@CMDLINE@", format!("exit=emulator {cmdline}").trim())
        .replace("@MODULES@\n", &modules);
    std::fs::write(tree.join("boot/grub/grub.cfg"), cfg).map_err(|e| e.to_string())?;
    let iso = dir.join("boot.iso");
    let out = Command::new("grub-mkrescue")
        .arg("-o")
        .arg(&iso)
        .arg(&tree)
        .output()
        .map_err(|e| format!("cannot run grub-mkrescue: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "grub-mkrescue failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(iso)
}

pub fn iso_command(args: &[&str]) -> Result<(), String> {
    let (mut manifest, mut images, mut cmdline, mut out) = (None, Vec::new(), String::new(), None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().copied().ok_or(format!("{a} needs a value"));
        match *a {
            "--manifest" => manifest = Some(PathBuf::from(val()?)),
            "--images" => images = val()?.split(',').map(String::from).collect(),
            "--cmdline" => cmdline = val()?.to_string(),
            "-o" => out = Some(PathBuf::from(val()?)),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let manifest = manifest.ok_or("--manifest FILE is required")?;
    crate::engine::ensure_packages()?;
    crate::build()?;
    let dir = root().join("target/iso");
    let iso = make_iso(&dir, &manifest, &images, &cmdline)?;
    if let Some(out) = out {
        run_cmd(Command::new("cp").arg(&iso).arg(&out))?;
        println!("{}", out.display());
    } else {
        println!("{}", iso.display());
    }
    Ok(())
}
