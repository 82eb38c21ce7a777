//! Emulators: which one can run VT-x guests here, how to boot an ISO on it, and the system
//! packages they need.
//!
//! QEMU+KVM is used only when the host really exposes VT-x (`vmx` in /proc/cpuinfo and the
//! kvm_intel module loaded): our AMD machines have a paravirtual /dev/kvm (kvm_pvm) that opens
//! fine but cannot run a hypervisor. Otherwise Bochs, which emulates VT-x with EPT. QEMU TCG
//! (no VT-x) serves the "VT-x missing" scenario. Every run has a hard time limit and is killed
//! with its whole process group; the serial log is the only verdict.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Debian packages the emulator runs need.
const PACKAGES: &[&str] = &[
    "bochs",
    "bochsbios",
    "vgabios",
    "grub-pc-bin",
    "grub-efi-amd64-bin",
    "grub-common",
    "xorriso",
    "mtools",
    "qemu-system-x86",
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// Installs the missing packages with apt-get when root; otherwise says what to run.
pub fn ensure_packages() -> Result<(), String> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let cmd = format!("apt-get update && apt-get install -y {}", missing.join(" "));
    if !is_root() {
        return Err(format!("missing system packages; run as root:\n  {cmd}"));
    }
    println!("xtask: installing {}", missing.join(" "));
    let status = Command::new("sh")
        .args(["-c", &cmd])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{cmd}` failed ({status})"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Bochs,
    QemuKvm,
    QemuTcg,
}

impl Engine {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Bochs => "Bochs (emulated VT-x with EPT; this host has no usable hardware VT-x)",
            Self::QemuKvm => "QEMU+KVM (the host exposes VT-x)",
            Self::QemuTcg => "QEMU TCG (no VT-x)",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Bochs => "bochs",
            Self::QemuKvm => "qemu-kvm",
            Self::QemuTcg => "qemu-tcg",
        }
    }
}

/// Whether a /proc/cpuinfo text shows VT-x.
pub fn cpuinfo_has_vmx(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx"))
}

/// The engine for VT-x scenarios on this host.
pub fn pick_vmx_engine() -> Engine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let kvm_intel = Path::new("/sys/module/kvm_intel").exists();
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if cpuinfo_has_vmx(&cpuinfo) && kvm_intel && kvm {
        Engine::QemuKvm
    } else {
        Engine::Bochs
    }
}

fn bochsrc(iso: &Path, serial: &Path, dir: &Path) -> String {
    format!(
        "memory: guest=256, host=256
romimage: file=/usr/share/bochs/BIOS-bochs-latest, options=fastboot
vgaromimage: file=/usr/share/bochs/VGABIOS-lgpl-latest
cpu: model=corei7_skylake_x, count=1, ips=4000000, reset_on_triple_fault=0
clock: sync=none
ata0-master: type=cdrom, path={iso}, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev={serial}
port_e9_hack: enabled=1
display_library: rfb, options=\"timeout=0\"
sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy
speaker: enabled=0
panic: action=fatal
error: action=report
log: {log}
",
        iso = iso.display(),
        serial = serial.display(),
        log = dir.join("bochs.log").display(),
    )
}

/// Boots `iso` on `engine`, serial console to `serial`, until the emulator exits or `timeout`
/// passes (then its process group is killed). With `stream`, the console is copied to stdout as
/// it grows. Returns whether it ended by itself.
pub fn boot(
    engine: Engine,
    iso: &Path,
    serial: &Path,
    dir: &Path,
    timeout: Option<Duration>,
    stream: bool,
) -> Result<bool, String> {
    let _ = std::fs::remove_file(serial);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let mut cmd = match engine {
        Engine::Bochs => {
            let rc = dir.join("bochsrc");
            std::fs::write(&rc, bochsrc(iso, serial, dir)).map_err(|e| e.to_string())?;
            let cmds = dir.join("bochs-commands");
            std::fs::write(&cmds, "continue\nquit\n").map_err(|e| e.to_string())?;
            let mut c = Command::new("bochs");
            c.arg("-q").arg("-f").arg(&rc).arg("-rc").arg(&cmds);
            c
        }
        Engine::QemuKvm | Engine::QemuTcg => {
            let mut c = Command::new("qemu-system-x86_64");
            if engine == Engine::QemuKvm {
                c.args(["-accel", "kvm", "-cpu", "host,+vmx"]);
            } else {
                c.args(["-accel", "tcg", "-cpu", "qemu64"]);
            }
            c.args(["-m", "256M", "-display", "none", "-no-reboot"])
                .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
                .arg("-cdrom")
                .arg(iso)
                .arg("-serial")
                .arg(format!("file:{}", serial.display()));
            c
        }
    };
    let out = std::fs::File::create(dir.join("emulator.out")).map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out);
    if !stream {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", engine.name()))?;
    let start = Instant::now();
    let mut shown = 0usize;
    loop {
        if stream {
            if let Ok(bytes) = std::fs::read(serial) {
                if bytes.len() > shown {
                    use std::io::Write;
                    let mut o = std::io::stdout();
                    let _ = o.write_all(&bytes[shown..]);
                    let _ = o.flush();
                    shown = bytes.len();
                }
            }
        }
        if child.try_wait().map_err(|e| e.to_string())?.is_some() {
            break;
        }
        if timeout.is_some_and(|t| start.elapsed() > t) {
            let pid = child.id();
            let _ = Command::new("kill")
                .args(["-KILL", &format!("-{pid}")])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if stream {
        if let Ok(bytes) = std::fs::read(serial) {
            print!(
                "{}",
                String::from_utf8_lossy(bytes.get(shown..).unwrap_or_default())
            );
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmx_flag_detection() {
        assert!(cpuinfo_has_vmx(
            "processor : 0\nflags\t\t: fpu vme vmx sse\n"
        ));
        assert!(!cpuinfo_has_vmx(
            "flags\t\t: fpu svm sse\nvmx_flags : foo\n"
        ));
        assert!(!cpuinfo_has_vmx("flags : fpu vmxx\n"));
    }
}
