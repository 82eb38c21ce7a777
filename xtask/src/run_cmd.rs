//! `cargo xtask run [--manifest FILE] [--timeout-s N]`: builds, makes an ISO for the manifest
//! (default: the two-VM demo, examples/demo.toml) and boots it on the best VT-x engine, copying
//! the serial log to the terminal as it grows, until the emulator exits (the hypervisor runs with
//! `exit=emulator`), the optional timeout passes, or Ctrl-C (which stops the emulator too).

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::build;
use crate::cli::{parse_positive, Args, Spec};
use crate::deps;
use crate::engine::{self, BootSpec};
use crate::error::{Error, IoContext, Result};
use crate::iso::{self, IsoSpec};
use crate::process::{self, Ending};
use crate::scenario::InputFeeder;
use crate::workspace::Workspace;

const USAGE: &str = "cargo xtask run [--manifest FILE] [--timeout-s N]";
/// The hypervisor's command line for interactive runs.
const RUN_CMDLINE: &str = "exit=emulator log=info";

/// `cargo xtask run`.
pub fn run(ws: &Workspace, args: &[String]) -> Result<()> {
    let args = Args::parse(
        args,
        &Spec {
            usage: USAGE,
            with_value: &["--manifest", "--timeout-s"],
            positional: false,
        },
    )?;
    let manifest = match args.value("--manifest") {
        Some(path) => PathBuf::from(path),
        None => ws.root().join("examples").join("demo.toml"),
    };
    if !manifest.is_file() {
        return Err(Error::config(&manifest, "no such manifest file"));
    }
    let timeout = match args.value("--timeout-s") {
        Some(value) => Duration::from_secs(parse_positive("--timeout-s", value)?),
        None => Duration::MAX,
    };
    let (images, linux) = manifest_images(&manifest)?;

    deps::ensure_packages()?;
    build::build_all(ws)?;
    let run_dir = ws.scratch("run");
    fs::create_dir_all(&run_dir).context(|| format!("creating {}", run_dir.display()))?;
    let iso_path = run_dir.join("run.iso");
    let spec = IsoSpec::from_build(ws, &manifest, &images, RUN_CMDLINE)?;
    iso::make_iso(ws, &spec, &run_dir.join("iso-root"), &iso_path)?;

    let choice = engine::detect_vmx_engine(&ws.scratch("kvm-probe"));
    let Some(engine) = choice.engine else {
        return Err(Error::Failed(format!(
            "run: no VT-x engine: {}",
            choice.reason
        )));
    };
    println!(
        "run: booting {} on {engine} ({})",
        iso_path.display(),
        choice.reason
    );
    println!("run: the serial log follows (Ctrl-C stops the emulator)\n");
    process::install_interrupt_handler();
    let boot = BootSpec {
        engine,
        iso: iso_path,
        dir: run_dir,
        timeout,
        bochs_ips: if linux {
            engine::BOCHS_IPS_LINUX
        } else {
            engine::BOCHS_IPS
        },
        bochs_cpu: engine::BOCHS_CPU_MODEL.to_owned(),
        memory_mib: engine::MEMORY_MIB,
    };
    let mut tail = LogTail::new(boot.serial_log());
    let stdout = io::stdout();
    // COM1 is a socket this process serves, so that lines typed here reach the VMs.
    let (outcome, _) = engine::boot_interactive(&boot, InputFeeder::terminal(), || {
        let mut out = stdout.lock();
        // A failed copy to the terminal (closed pipe) must not stop the emulator run.
        let _ = tail.pump(&mut out).and_then(|_| out.flush());
    })?;
    match outcome.ending {
        Ending::Exited(status) => println!(
            "\nrun: {engine} exited ({status}) after {:.1} s",
            outcome.wall.as_secs_f64()
        ),
        Ending::TimedOut => println!(
            "\nrun: stopped {engine} after the {} s timeout",
            timeout.as_secs()
        ),
    }
    println!(
        "run: serial log {}, emulator output {}",
        boot.serial_log().display(),
        boot.emulator_output().display()
    );
    Ok(())
}

/// The distinct boot modules the manifest's valid VMs use (kernels, modules, initrds), sorted,
/// and whether one of the VMs is a Linux guest. The manifest is parsed with the hypervisor's
/// own parser; per-VM errors are shown (the hypervisor will skip those VMs).
fn manifest_images(manifest: &Path) -> Result<(Vec<String>, bool)> {
    let bytes = fs::read(manifest).context(|| format!("reading {}", manifest.display()))?;
    let parsed = hv_manifest::parse_bytes(&bytes, &hv_manifest::HostLimits::default())
        .map_err(|e| Error::config(manifest, e.to_string()))?;
    for error in &parsed.errors {
        println!(
            "run: warning: {}: {error} (the hypervisor will skip this VM)",
            manifest.display()
        );
    }
    // Each VM's kernel, its Multiboot modules and its initrd.
    let mut images: Vec<String> = parsed
        .vms
        .iter()
        .flat_map(|vm| {
            std::iter::once(&vm.image)
                .chain(&vm.modules)
                .chain(&vm.initrd)
                .cloned()
        })
        .collect();
    images.sort();
    images.dedup();
    if images.is_empty() {
        return Err(Error::config(manifest, "no valid VM to run"));
    }
    Ok((images, parsed.vms.iter().any(|vm| vm.linux)))
}

/// Follows a file that another process appends to, like `tail -f`.
pub struct LogTail {
    path: PathBuf,
    offset: u64,
}

impl LogTail {
    /// Starts at the beginning of `path` (which may not exist yet).
    pub fn new(path: PathBuf) -> Self {
        LogTail { path, offset: 0 }
    }

    /// Copies what was appended since the last call to `out`; returns the number of bytes.
    pub fn pump(&mut self, out: &mut impl Write) -> io::Result<u64> {
        let mut file = match fs::File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        if len < self.offset {
            // Truncated and rewritten: start over.
            self.offset = 0;
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let copied = io::copy(&mut (&mut file).take(len - self.offset), out)?;
        self.offset += copied;
        Ok(copied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_copies_only_new_bytes() {
        let dir = std::env::temp_dir().join(format!("xtask-tail-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.log");
        let mut tail = LogTail::new(path.clone());
        let mut out = Vec::new();
        assert_eq!(
            tail.pump(&mut out).unwrap(),
            0,
            "a missing file is not an error"
        );
        fs::write(&path, "[INFO] hv: one\n").unwrap();
        tail.pump(&mut out).unwrap();
        let mut file = fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"[INFO] hv: two\n").unwrap();
        tail.pump(&mut out).unwrap();
        assert_eq!(tail.pump(&mut out).unwrap(), 0);
        assert_eq!(out, b"[INFO] hv: one\n[INFO] hv: two\n");
        fs::write(&path, "new\n").unwrap();
        tail.pump(&mut out).unwrap();
        assert!(out.ends_with(b"two\nnew\n"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn demo_manifest_images() {
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo.toml");
        assert_eq!(
            manifest_images(&demo).unwrap(),
            (vec!["hello".to_owned()], false)
        );
        // The Linux demo: two valid VMs, run at the Linux rate.
        let linux = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/linux.toml");
        assert_eq!(
            manifest_images(&linux).unwrap(),
            (
                vec!["initramfs-shell".to_owned(), "vmlinuz".to_owned()],
                true
            )
        );
    }
}
