//! Emulators that boot the ISO: which one to use, and how to run it.
//!
//! The hypervisor needs VT-x with EPT. That comes either from the host (QEMU with KVM and nested
//! VMX, on an Intel host that exposes it) or from Bochs, which emulates VT-x with EPT in software.
//! QEMU+KVM is chosen only when all of these hold:
//!
//! 1. `/proc/cpuinfo` lists the `vmx` flag;
//! 2. `/dev/kvm` opens read-write;
//! 3. a probe works: QEMU with `-accel kvm -cpu host,+vmx` boots a 512-byte boot sector that
//!    executes CPUID and reports through `isa-debug-exit` whether the guest sees VMX.
//!
//! `/dev/kvm` alone proves nothing: some cloud machines have a paravirtual KVM (`kvm_pvm`) that
//! cannot even run real-mode firmware. Anything else gets Bochs. QEMU's TCG has no VMX at all; it
//! serves the `no-vmx` scenarios, which check the hypervisor's "VT-x not available" path.
//!
//! Every run writes its files into one run directory (`serial.log`, the engine's own log and
//! output, the Bochs configuration) and has a hard deadline after which the emulator's whole
//! process group is killed. Pass/fail comes only from `serial.log`: Bochs exits with status 1 both
//! on the hypervisor's clean shutdown and on a fatal error.
//!
//! COM1 goes to `serial.log` directly (Bochs `mode=file`, QEMU `file:`), or, for a run that types
//! on the serial console ([`boot_interactive`]), to a TCP socket on 127.0.0.1 where the emulator
//! is the server and waits for us before it starts the machine (Bochs `mode=socket-server`,
//! QEMU `tcp:...,server=on,wait=on`). A thread of ours then copies every byte into `serial.log`
//! exactly as the file mode would and writes what the [`InputFeeder`] says to type.

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use crate::process::{on_path, Ending, GroupChild};
use crate::scenario::InputFeeder;

/// Guest RAM of the emulated machine, MiB (Bochs and QEMU alike).
pub const MEMORY_MIB: u32 = 256;
/// Bochs CPU model: VT-x with EPT, VPID, unrestricted guest, the preemption timer and TSC
/// scaling (DESIGN.md section 4).
pub const BOCHS_CPU_MODEL: &str = "corei7_skylake_x";
/// The Bochs 2.7 models a scenario may pick (`bochs_cpu`): those with VT-x, EPT, unrestricted
/// guests and the preemption timer. Only `corei7_skylake_x`, `corei3_cnl`, `corei7_icelake_u`
/// and `tigerlake` offer TSC scaling; `corei7_haswell_4770` is the one the time-dilation
/// scenarios use without it.
pub const BOCHS_CPU_MODELS: &[&str] = &[
    "corei7_skylake_x",
    "corei7_haswell_4770",
    "broadwell_ult",
    "corei3_cnl",
    "corei7_icelake_u",
    "tigerlake",
];
/// Emulated instructions per emulated second. With `clock: sync=none` this fixes the ratio of
/// guest-visible time to instructions (the scenarios' quanta are sized for it), not the speed.
pub const BOCHS_IPS: u64 = 4_000_000;
/// The rate for Linux guests: a 100 MHz CPU. At 4 MHz a 250 Hz tick comes every 16,000
/// instructions, and the exits each tick costs leave Linux little else (its boot then takes
/// several times longer and its clocksource watchdog sees ticks arrive late).
pub const BOCHS_IPS_LINUX: u64 = 100_000_000;
/// Bochs's system BIOS and VGA BIOS (packages bochsbios and vgabios).
const BOCHS_BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
const BOCHS_VGA_BIOS: &str = "/usr/share/bochs/VGABIOS-lgpl-latest";
const QEMU: &str = "qemu-system-x86_64";
/// Environment variable that forces the VT-x engine: `bochs` or `qemu-kvm` (default: detect).
pub const ENGINE_ENV: &str = "XTASK_ENGINE";
/// Deadline of the KVM probe; a working KVM answers in well under a second.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// A way to boot the ISO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Bochs with an emulated VT-x CPU.
    Bochs,
    /// QEMU on KVM with nested VMX.
    QemuKvm,
    /// QEMU's TCG: no VT-x.
    QemuTcg,
}

impl Engine {
    /// Short name for messages (`PASS hello (bochs, 3.1 s)`).
    pub fn name(self) -> &'static str {
        match self {
            Engine::Bochs => "bochs",
            Engine::QemuKvm => "qemu-kvm",
            Engine::QemuTcg => "qemu-tcg",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The VT-x engine picked for this host, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmxChoice {
    /// The engine, if any can run the hypervisor.
    pub engine: Option<Engine>,
    /// Why this engine (or none): printed for the user.
    pub reason: String,
}

/// The facts about the host that decide the VT-x engine.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// `vmx` in the CPU flags of /proc/cpuinfo.
    pub cpu_has_vmx: bool,
    /// Whether /dev/kvm opened read-write, or why not.
    pub kvm: std::result::Result<(), String>,
    /// Whether `qemu-system-x86_64` is on PATH.
    pub qemu: bool,
    /// Whether `bochs` is on PATH.
    pub bochs: bool,
    /// A forced choice (`XTASK_ENGINE`), if any.
    pub forced: Option<String>,
}

impl HostFacts {
    /// Reads the facts from this machine.
    pub fn gather() -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let kvm = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
            .map_err(|e| e.to_string());
        HostFacts {
            cpu_has_vmx: cpuinfo_has_vmx(&cpuinfo),
            kvm,
            qemu: on_path(QEMU),
            bochs: on_path("bochs"),
            forced: std::env::var(ENGINE_ENV)
                .ok()
                .filter(|v| !v.is_empty() && v != "auto"),
        }
    }
}

/// Whether any `flags` line of /proc/cpuinfo text lists `vmx` (as a whole word).
pub fn cpuinfo_has_vmx(cpuinfo: &str) -> bool {
    cpuinfo.lines().any(|line| {
        let Some((key, value)) = line.split_once(':') else {
            return false;
        };
        key.trim() == "flags" && value.split_whitespace().any(|flag| flag == "vmx")
    })
}

/// Picks the VT-x engine from `facts`; `probe_kvm` runs only when the cheap checks pass.
pub fn choose_vmx_engine(
    facts: &HostFacts,
    probe_kvm: impl FnOnce() -> std::result::Result<(), String>,
) -> VmxChoice {
    let bochs = |why: String| {
        if facts.bochs {
            VmxChoice {
                engine: Some(Engine::Bochs),
                reason: why,
            }
        } else {
            VmxChoice {
                engine: None,
                reason: format!("{why}, and Bochs is not installed (run `cargo xtask deps`)"),
            }
        }
    };
    match facts.forced.as_deref() {
        Some("bochs") => return bochs(format!("{ENGINE_ENV}=bochs")),
        Some("qemu-kvm") | None => {}
        Some(other) => {
            return VmxChoice {
                engine: None,
                reason: format!("{ENGINE_ENV}={other}: expected bochs, qemu-kvm or auto"),
            }
        }
    }
    let forced_kvm = facts.forced.is_some();
    let kvm_problem = if !facts.cpu_has_vmx {
        Some("the host CPU has no vmx flag in /proc/cpuinfo".to_owned())
    } else if let Err(e) = &facts.kvm {
        Some(format!("/dev/kvm does not open ({e})"))
    } else if !facts.qemu {
        Some(format!("{QEMU} is not installed"))
    } else {
        probe_kvm()
            .err()
            .map(|e| format!("the KVM probe failed: {e}"))
    };
    match kvm_problem {
        None => VmxChoice {
            engine: Some(Engine::QemuKvm),
            reason: "the host has VT-x and a working KVM with nested VMX".to_owned(),
        },
        Some(problem) if forced_kvm => VmxChoice {
            engine: None,
            reason: format!("{ENGINE_ENV}=qemu-kvm, but {problem}"),
        },
        Some(problem) => bochs(problem),
    }
}

/// Detects the VT-x engine of this machine (runs the KVM probe when it applies).
pub fn detect_vmx_engine(scratch: &Path) -> VmxChoice {
    let facts = HostFacts::gather();
    choose_vmx_engine(&facts, || probe_kvm(scratch))
}

/// A real-mode boot sector: CPUID leaf 1, then writes 1 (VMX visible) or 2 (not) to the
/// isa-debug-exit port 0xf4, so QEMU exits with status 3 or 5.
fn probe_boot_sector() -> [u8; 512] {
    #[rustfmt::skip]
    const CODE: &[u8] = &[
        0x66, 0xB8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
        0x0F, 0xA2,                         // cpuid
        0xB0, 0x02,                         // mov al, 2
        0x66, 0x0F, 0xBA, 0xE1, 0x05,       // bt ecx, 5 (VMX)
        0x73, 0x02,                         // jnc +2
        0xB0, 0x01,                         // mov al, 1
        0xE6, 0xF4,                         // out 0xf4, al
        0xF4,                               // hlt
        0xEB, 0xFD,                         // jmp hlt
    ];
    let mut sector = [0u8; 512];
    sector[..CODE.len()].copy_from_slice(CODE);
    sector[510] = 0x55;
    sector[511] = 0xAA;
    sector
}

/// Boots [`probe_boot_sector`] under `-accel kvm -cpu host,+vmx`.
fn probe_kvm(scratch: &Path) -> std::result::Result<(), String> {
    probe_vmx(scratch, "kvm", "host,+vmx")
}

/// Boots [`probe_boot_sector`] in QEMU with `accel` and `cpu`; Ok if the guest sees VMX.
fn probe_vmx(scratch: &Path, accel: &str, cpu: &str) -> std::result::Result<(), String> {
    fs::create_dir_all(scratch).map_err(|e| format!("creating {}: {e}", scratch.display()))?;
    let image = scratch.join(format!("vmx-probe-{accel}.img"));
    fs::write(&image, probe_boot_sector())
        .map_err(|e| format!("writing {}: {e}", image.display()))?;
    let mut command = Command::new(QEMU);
    command
        .args([
            "-accel", accel, "-cpu", cpu, "-m", "16M", "-display", "none",
        ])
        .args(["-nodefaults", "-no-reboot", "-boot", "a", "-drive"])
        .arg(format!("file={},format=raw,if=floppy", qemu_escape(&image)))
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = GroupChild::spawn(&mut command).map_err(|e| e.to_string())?;
    let ending = child
        .wait_with_deadline(KVM_PROBE_TIMEOUT, || {})
        .map_err(|e| e.to_string())?;
    match ending {
        Ending::TimedOut => Err(format!(
            "a boot sector did not finish within {} s under {accel}",
            KVM_PROBE_TIMEOUT.as_secs()
        )),
        Ending::Exited(status) => match status.code() {
            Some(3) => Ok(()),
            Some(5) => Err(format!(
                "the {accel} guest does not see VMX (no nested virtualisation)"
            )),
            _ => Err(format!("QEMU with {accel} failed ({status})")),
        },
    }
}

/// QEMU splits option values at commas; a literal comma is written twice.
fn qemu_escape(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// One boot of an ISO.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// The engine.
    pub engine: Engine,
    /// The ISO to boot.
    pub iso: PathBuf,
    /// Where the run's files go (created if needed; `serial.log` is truncated).
    pub dir: PathBuf,
    /// Hard deadline of the emulator run.
    pub timeout: Duration,
    /// Bochs only: emulated instructions per emulated second ([`BOCHS_IPS`] unless a scenario
    /// asks for another).
    pub bochs_ips: u64,
    /// Bochs only: the CPU model ([`BOCHS_CPU_MODEL`] unless a scenario asks for another).
    pub bochs_cpu: String,
    /// The machine's RAM in MiB ([`MEMORY_MIB`] unless a scenario asks for another).
    pub memory_mib: u32,
}

impl BootSpec {
    /// The hypervisor's serial log.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    /// The emulator's stdout and stderr.
    pub fn emulator_output(&self) -> PathBuf {
        self.dir.join("emulator.out")
    }
}

/// How a boot ended.
#[derive(Debug, Clone)]
pub struct BootOutcome {
    /// Exit or timeout.
    pub ending: Ending,
    /// Wall time from start to exit (or kill).
    pub wall: Duration,
}

/// What Bochs prints when its VNC display found no port: two Bochs starting at the same moment
/// may both bind port 5900 (the socket allows address reuse); the one whose `listen` then fails
/// keeps that socket bound, so every later port fails too and Bochs exits before the machine
/// starts.
const BOCHS_RFB_RACE: &str = "RFB could not bind any port";
/// Starts of one Bochs run that may end in [`BOCHS_RFB_RACE`] before it counts as a failure.
const BOCHS_STARTS: u32 = 3;

/// Whether a Bochs run ended in the display-port race (nothing of the machine ran).
pub fn lost_rfb_race(emulator_output: &str) -> bool {
    emulator_output.contains(BOCHS_RFB_RACE)
}

/// Where the emulator's COM1 goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Com1<'a> {
    /// Into this file.
    File(&'a Path),
    /// To a client of a TCP server on 127.0.0.1 at this port, which the emulator waits for.
    Socket(u16),
}

/// What an emulator prints when the port we picked for COM1 was taken meanwhile (Bochs's
/// serial plugin; QEMU's socket code).
const COM1_PORT_RACE: &[&str] = &["bind() or listen() failed", "Address already in use"];

/// Whether a run ended before the machine started because a port was taken: the display port
/// of Bochs ([`lost_rfb_race`]) or our COM1 port.
fn lost_port_race(engine: Engine, emulator_output: &str) -> bool {
    (engine == Engine::Bochs && lost_rfb_race(emulator_output))
        || COM1_PORT_RACE.iter().any(|m| emulator_output.contains(m))
}

/// Boots `spec`, calling `on_tick` about every 50 ms while the emulator runs. A Bochs run that
/// lost the display-port race to a Bochs started beside it is started again (the other one
/// listens by then), up to [`BOCHS_STARTS`] times.
pub fn boot(spec: &BootSpec, mut on_tick: impl FnMut()) -> Result<BootOutcome> {
    let serial = absolute(&spec.serial_log())?;
    retry_port_races(spec, |spec| {
        boot_once(spec, Com1::File(&serial), &mut on_tick, |child, tick| {
            child.wait_with_deadline(spec.timeout, tick)
        })
    })
}

/// Boots `spec` with COM1 on a socket: copies what the machine sends into `serial.log` and types
/// what `feeder` says. Returns the feeder, whose [`InputFeeder::untyped`] inputs never found
/// their line.
pub fn boot_interactive(
    spec: &BootSpec,
    mut feeder: InputFeeder,
    mut on_tick: impl FnMut(),
) -> Result<(BootOutcome, InputFeeder)> {
    let outcome = retry_port_races(spec, |spec| {
        let port = free_port()?;
        boot_once(spec, Com1::Socket(port), &mut on_tick, |child, tick| {
            serve_com1(
                spec,
                port,
                &mut feeder,
                |t| child.wait_with_deadline(spec.timeout, t),
                tick,
            )
        })
    })?;
    Ok((outcome, feeder))
}

/// Runs `boot_once` again while it loses a port race, up to [`BOCHS_STARTS`] starts.
fn retry_port_races(
    spec: &BootSpec,
    mut boot_once: impl FnMut(&BootSpec) -> Result<BootOutcome>,
) -> Result<BootOutcome> {
    let mut start = 1;
    loop {
        let outcome = boot_once(spec)?;
        let raced = start < BOCHS_STARTS
            && fs::read_to_string(spec.emulator_output())
                .is_ok_and(|out| lost_port_race(spec.engine, &out));
        if !raced {
            return Ok(outcome);
        }
        eprintln!(
            "{}: a port it needed was taken by a process started beside it; starting again ({})",
            spec.engine,
            spec.dir.display()
        );
        std::thread::sleep(Duration::from_millis(200 * u64::from(start)));
        start += 1;
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick for port 0). Another
/// process may take it before the emulator binds it: [`retry_port_races`] covers that.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context(|| "finding a free TCP port on 127.0.0.1".to_owned())?;
    let port = listener
        .local_addr()
        .context(|| "reading a socket's address".to_owned())?
        .port();
    Ok(port)
}

/// While `wait` waits for the emulator: connects to its COM1 server at `port` (retrying while it
/// starts), appends every byte it sends to `serial.log`, and writes what `feeder` returns.
fn serve_com1(
    spec: &BootSpec,
    port: u16,
    feeder: &mut InputFeeder,
    wait: impl FnOnce(&mut dyn FnMut()) -> Result<Ending>,
    on_tick: &mut dyn FnMut(),
) -> Result<Ending> {
    let stop = AtomicBool::new(false);
    let serial = spec.serial_log();
    std::thread::scope(|scope| {
        let copier = scope.spawn(|| copy_com1(port, &serial, feeder, &stop));
        let ending = wait(on_tick);
        stop.store(true, Ordering::SeqCst);
        let copied = copier
            .join()
            .unwrap_or_else(|_| Err(Error::Failed("the COM1 thread panicked".to_owned())));
        let ending = ending?;
        copied?;
        Ok(ending)
    })
}

/// The COM1 client: see [`serve_com1`]. Ends at end of stream, or when `stop` is set and the
/// emulator has nothing more to say (it was killed, or never started its server).
fn copy_com1(port: u16, serial: &Path, feeder: &mut InputFeeder, stop: &AtomicBool) -> Result<()> {
    let mut log = fs::OpenOptions::new()
        .append(true)
        .open(serial)
        .context(|| format!("opening {}", serial.display()))?;
    let mut stream = loop {
        match TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
            Ok(stream) => break stream,
            Err(_) if stop.load(Ordering::SeqCst) => return Ok(()),
            // Not listening yet: the emulator is still starting.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let context = || format!("COM1 socket at 127.0.0.1:{port}");
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .context(context)?;
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; 4096];
    loop {
        let typed = feeder.typed();
        if !typed.is_empty() {
            stream.write_all(&typed).context(context)?;
        }
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                log.write_all(&buf[..n])
                    .context(|| format!("writing {}", serial.display()))?;
                let typed = feeder.feed(&buf[..n]);
                if !typed.is_empty() {
                    stream.write_all(&typed).context(context)?;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
            }
            // The emulator went away mid-stream.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e).context(context),
        }
    }
}

fn boot_once(
    spec: &BootSpec,
    com1: Com1<'_>,
    on_tick: &mut dyn FnMut(),
    wait: impl FnOnce(&mut GroupChild, &mut dyn FnMut()) -> Result<Ending>,
) -> Result<BootOutcome> {
    fs::create_dir_all(&spec.dir).context(|| format!("creating {}", spec.dir.display()))?;
    let serial = spec.serial_log();
    // The emulator appends to or recreates the file; start from an empty one either way, so a
    // stale log can never pass a test.
    fs::write(&serial, b"").context(|| format!("truncating {}", serial.display()))?;
    let iso = absolute(&spec.iso)?;
    let mut command = match spec.engine {
        Engine::Bochs => bochs_command(spec, &iso, com1)?,
        Engine::QemuKvm | Engine::QemuTcg => {
            let mut command = Command::new(QEMU);
            command.args(qemu_args(spec.engine, &iso, com1, spec.memory_mib));
            command
        }
    };
    let output_path = spec.emulator_output();
    let output =
        fs::File::create(&output_path).context(|| format!("creating {}", output_path.display()))?;
    let output_err = output
        .try_clone()
        .context(|| "duplicating a file handle".to_owned())?;
    command
        .current_dir(&spec.dir)
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(output_err);
    let start = Instant::now();
    let mut child = GroupChild::spawn(&mut command)?;
    let ending = wait(&mut child, on_tick)?;
    Ok(BootOutcome {
        ending,
        wall: start.elapsed(),
    })
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).context(|| format!("resolving {}", path.display()))
}

/// Writes the Bochs configuration and debugger script into the run directory and returns the
/// command: `bochs -q -f bochsrc -rc bochs.cmds`.
fn bochs_command(spec: &BootSpec, iso: &Path, com1: Com1<'_>) -> Result<Command> {
    for rom in [BOCHS_BIOS, BOCHS_VGA_BIOS] {
        // `exists` follows symlinks: the VGA BIOS is a link into the vgabios package.
        if !Path::new(rom).exists() {
            return Err(Error::Deps(format!(
                "{rom} is missing (packages bochsbios, vgabios); run `cargo xtask deps`"
            )));
        }
    }
    let dir = absolute(&spec.dir)?;
    let config = bochsrc(
        iso,
        com1,
        &dir.join("bochs.log"),
        spec.bochs_ips,
        &spec.bochs_cpu,
        spec.memory_mib,
    )
    .map_err(|message| Error::Failed(format!("bochs: {message}")))?;
    let rc_path = dir.join("bochsrc");
    fs::write(&rc_path, config).context(|| format!("writing {}", rc_path.display()))?;
    // The Debian build includes Bochs's debugger, which stops at a prompt before the first
    // instruction: this script lets it run, and quits the debugger when the machine stops.
    let cmds_path = dir.join("bochs.cmds");
    fs::write(&cmds_path, "continue\nquit\n")
        .context(|| format!("writing {}", cmds_path.display()))?;
    let mut command = Command::new("bochs");
    command
        .arg("-q")
        .arg("-f")
        .arg(&rc_path)
        .arg("-rc")
        .arg(&cmds_path);
    Ok(command)
}

/// The most RAM Bochs 2.7 allocates up front (`memory: host=`, "out of range 1 to 2048").
const BOCHS_HOST_MIB_MAX: u32 = 2048;

/// The Bochs configuration: `memory_mib` of RAM, a Skylake-X CPU with VT-x/EPT, deterministic time, boot from
/// the ISO, COM1 into a file or a socket server, no GUI, and fatal panics.
pub fn bochsrc(
    iso: &Path,
    com1: Com1<'_>,
    log: &Path,
    ips: u64,
    cpu: &str,
    memory_mib: u32,
) -> std::result::Result<String, String> {
    let quoted = |path: &Path| {
        let text = path.display().to_string();
        if text.contains('"') || text.contains('\n') {
            Err(format!("path {text:?} cannot be written into a bochsrc"))
        } else {
            Ok(format!("\"{text}\""))
        }
    };
    let (iso, log) = (quoted(iso)?, quoted(log)?);
    let com1 = match com1 {
        Com1::File(serial) => format!("mode=file, dev={}", quoted(serial)?),
        // Bochs accepts the client before the machine starts (so nothing is lost before it).
        Com1::Socket(port) => format!("mode=socket-server, dev=localhost:{port}"),
    };
    // Bochs allocates at most 2 GiB up front (`host`); guest RAM beyond it is taken as the
    // guest touches it.
    let host_mib = memory_mib.min(BOCHS_HOST_MIB_MAX);
    Ok(format!(
        "# Written by cargo xtask (xtask/src/engine.rs) for one run.\n\
         memory: guest={memory_mib}, host={host_mib}\n\
         romimage: file={BOCHS_BIOS}, options=fastboot\n\
         vgaromimage: file={BOCHS_VGA_BIOS}\n\
         cpu: model={cpu}, count=1, ips={ips}, reset_on_triple_fault=0\n\
         # Time follows the instruction count: runs are exactly repeatable, and RDTSC counts\n\
         # instructions.\n\
         clock: sync=none\n\
         boot: cdrom\n\
         ata0-master: type=cdrom, path={iso}, status=inserted\n\
         com1: enabled=1, {com1}\n\
         port_e9_hack: enabled=1\n\
         # Without a dummy sound driver Bochs aborts at start on machines without ALSA devices.\n\
         sound: driver=dummy\n\
         speaker: enabled=0\n\
         mouse: enabled=0\n\
         # Debian's Bochs has no `nogui`; rfb with timeout=0 runs headless without waiting for a\n\
         # viewer (a second instance takes the next free port).\n\
         display_library: rfb, options=\"timeout=0\"\n\
         panic: action=fatal\n\
         error: action=report\n\
         log: {log}\n"
    ))
}

/// QEMU's arguments: KVM with the host CPU plus VMX, or TCG's qemu64 (no VMX).
pub fn qemu_args(engine: Engine, iso: &Path, com1: Com1<'_>, memory_mib: u32) -> Vec<String> {
    let (accel, cpu) = match engine {
        Engine::QemuKvm => ("kvm", "host,+vmx"),
        Engine::QemuTcg | Engine::Bochs => ("tcg", "qemu64"),
    };
    [
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-m",
        &format!("{memory_mib}M"),
        "-cdrom",
        &qemu_escape(iso),
        "-serial",
        &match com1 {
            Com1::File(serial) => format!("file:{}", qemu_escape(serial)),
            // `wait=on`: the machine starts once we are connected, as with Bochs.
            Com1::Socket(port) => format!("tcp:127.0.0.1:{port},server=on,wait=on"),
        },
        "-display",
        "none",
        // No NIC: nothing boots from the network, and no option ROM is needed.
        "-nic",
        "none",
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL_VMX: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de \
                             pse tsc msr vmx smx est tm2\nbugs\t\t: spectre_v1\n\nprocessor\t: 1\n\
                             flags\t\t: fpu vme vmx\n";
    // A cloud guest like ours: `hypervisor` flag, no vmx (and `vmx` only inside other words).
    const NO_VMX: &str = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr hypervisor \
                          vmx_ept_ad avx512vl\nvmx flags\t: vnmi preemption_timer\n";

    fn facts(vmx: bool, kvm: bool, qemu: bool, bochs: bool) -> HostFacts {
        HostFacts {
            cpu_has_vmx: vmx,
            kvm: if kvm {
                Ok(())
            } else {
                Err("Permission denied".into())
            },
            qemu,
            bochs,
            forced: None,
        }
    }

    #[test]
    fn vmx_flag_detection() {
        assert!(cpuinfo_has_vmx(INTEL_VMX));
        // `vmx flags` is a different line, and `vmx_ept_ad` is not `vmx`.
        assert!(!cpuinfo_has_vmx(NO_VMX));
        assert!(!cpuinfo_has_vmx(""));
    }

    #[test]
    fn kvm_when_everything_works() {
        let choice = choose_vmx_engine(&facts(true, true, true, true), || Ok(()));
        assert_eq!(choice.engine, Some(Engine::QemuKvm));
    }

    #[test]
    fn bochs_without_vmx_and_no_probe() {
        let choice = choose_vmx_engine(&facts(false, true, true, true), || {
            panic!("the probe must not run without vmx")
        });
        assert_eq!(choice.engine, Some(Engine::Bochs));
        assert!(choice.reason.contains("no vmx flag"), "{}", choice.reason);
    }

    #[test]
    fn bochs_when_kvm_does_not_open() {
        let choice = choose_vmx_engine(&facts(true, false, true, true), || panic!("no probe"));
        assert_eq!(choice.engine, Some(Engine::Bochs));
        assert!(choice.reason.contains("/dev/kvm"), "{}", choice.reason);
    }

    #[test]
    fn bochs_when_the_probe_fails() {
        // A paravirtual /dev/kvm (kvm_pvm) opens fine but cannot run the probe.
        let choice = choose_vmx_engine(&facts(true, true, true, true), || {
            Err("timed out".to_owned())
        });
        assert_eq!(choice.engine, Some(Engine::Bochs));
        assert!(
            choice.reason.contains("probe failed: timed out"),
            "{}",
            choice.reason
        );
    }

    #[test]
    fn none_without_bochs() {
        let choice = choose_vmx_engine(&facts(false, false, true, false), || Ok(()));
        assert_eq!(choice.engine, None);
        assert!(
            choice.reason.contains("Bochs is not installed"),
            "{}",
            choice.reason
        );
    }

    #[test]
    fn forced_engines() {
        let mut f = facts(true, true, true, true);
        f.forced = Some("bochs".into());
        assert_eq!(
            choose_vmx_engine(&f, || panic!("no probe")).engine,
            Some(Engine::Bochs)
        );
        f.forced = Some("qemu-kvm".into());
        assert_eq!(
            choose_vmx_engine(&f, || Ok(())).engine,
            Some(Engine::QemuKvm)
        );
        // Forcing KVM on a host without it is an error, not a silent fallback.
        let choice = choose_vmx_engine(&f, || Err("no".into()));
        assert_eq!(choice.engine, None);
        f.forced = Some("vmware".into());
        assert_eq!(choose_vmx_engine(&f, || Ok(())).engine, None);
    }

    #[test]
    fn probe_sector_is_bootable() {
        let sector = probe_boot_sector();
        assert_eq!(&sector[510..], &[0x55, 0xAA]);
        // The exit values 1 and 2 become QEMU exit statuses 3 and 5 ((v << 1) | 1).
        assert!(sector.windows(2).any(|w| w == [0xB0, 0x01]));
        assert!(sector.windows(2).any(|w| w == [0xE6, 0xF4]));
    }

    #[test]
    fn probe_runs_and_sees_no_vmx_under_tcg() {
        // TCG never offers VMX, so the probe must boot and answer "no" (exit status 5). This
        // checks the boot sector and the exit-status protocol on any machine with QEMU.
        if !on_path(QEMU) {
            eprintln!("{QEMU} is not installed; `cargo xtask deps` installs it");
            return;
        }
        let scratch = std::env::temp_dir().join(format!("xtask-probe-{}", std::process::id()));
        let err = probe_vmx(&scratch, "tcg", "qemu64").unwrap_err();
        assert!(err.contains("does not see VMX"), "{err}");
        fs::remove_dir_all(&scratch).unwrap();
    }

    #[test]
    fn bochsrc_has_the_measured_settings() {
        let rc = bochsrc(
            Path::new("/r/a.iso"),
            Com1::File(Path::new("/r/serial.log")),
            Path::new("/r/bochs.log"),
            BOCHS_IPS,
            BOCHS_CPU_MODEL,
            MEMORY_MIB,
        )
        .unwrap();
        for line in [
            "memory: guest=256, host=256",
            "cpu: model=corei7_skylake_x, count=1, ips=4000000, reset_on_triple_fault=0",
            "clock: sync=none",
            "boot: cdrom",
            "ata0-master: type=cdrom, path=\"/r/a.iso\", status=inserted",
            "com1: enabled=1, mode=file, dev=\"/r/serial.log\"",
            "display_library: rfb, options=\"timeout=0\"",
            "panic: action=fatal",
            "error: action=report",
            "log: \"/r/bochs.log\"",
        ] {
            assert!(rc.lines().any(|l| l == line), "missing `{line}` in:\n{rc}");
        }
        let s = Com1::File(Path::new("/s"));
        assert!(bochsrc(
            Path::new("/a\"b.iso"),
            s,
            Path::new("/l"),
            BOCHS_IPS,
            BOCHS_CPU_MODEL,
            MEMORY_MIB
        )
        .is_err());
        // With input, COM1 is a socket server that waits for the runner.
        let rc = bochsrc(
            Path::new("/a.iso"),
            Com1::Socket(40123),
            Path::new("/l"),
            400_000_000,
            "corei7_haswell_4770",
            128,
        )
        .unwrap();
        assert!(
            rc.lines()
                .any(|l| l == "com1: enabled=1, mode=socket-server, dev=localhost:40123"),
            "{rc}"
        );
        // A scenario's own instruction rate and memory.
        assert!(rc.lines().any(|l| l.contains(" ips=400000000,")), "{rc}");
        assert!(
            rc.lines().any(|l| l == "memory: guest=128, host=128"),
            "{rc}"
        );
    }

    #[test]
    fn qemu_command_lines() {
        let kvm = qemu_args(
            Engine::QemuKvm,
            Path::new("/r/x.iso"),
            Com1::File(Path::new("/r/s,1.log")),
            MEMORY_MIB,
        );
        let text = kvm.join(" ");
        assert!(
            text.starts_with("-accel kvm -cpu host,+vmx -m 256M -cdrom /r/x.iso"),
            "{text}"
        );
        assert!(text.contains("-serial file:/r/s,,1.log"), "{text}");
        assert!(
            text.contains("-device isa-debug-exit,iobase=0xf4,iosize=0x04"),
            "{text}"
        );
        assert!(
            text.contains("-display none") && text.contains("-no-reboot"),
            "{text}"
        );
        let tcg = qemu_args(
            Engine::QemuTcg,
            Path::new("/x.iso"),
            Com1::Socket(5555),
            MEMORY_MIB,
        );
        let text = tcg.join(" ");
        assert!(text.starts_with("-accel tcg -cpu qemu64 "), "{text}");
        assert!(
            text.contains("-serial tcp:127.0.0.1:5555,server=on,wait=on"),
            "{text}"
        );
    }

    #[test]
    fn recognises_the_bochs_display_port_race() {
        // As Bochs 2.7 ends such a run (emulator.out).
        let raced = "00000000000i[      ] installing rfb module as the Bochs GUI\n\
            ========================================================================\n\
            Bochs is exiting with the following message:\n\
            [RFB   ] RFB could not bind any port between 5900 and 5949\n";
        assert!(lost_rfb_race(raced));
        assert!(!lost_rfb_race(
            "Bochs is exiting with the following message:\n[CPU0  ] panic\n"
        ));
        assert!(!lost_rfb_race(""));
    }

    #[test]
    fn recognises_a_taken_com1_port() {
        let bochs = "Bochs is exiting with the following message:\n\
            [SER   ] com1: bind() or listen() failed (host:localhost, port:40123)\n";
        assert!(lost_port_race(Engine::Bochs, bochs));
        let qemu = "qemu-system-x86_64: -serial tcp:127.0.0.1:5555,server=on,wait=on: \
            Failed to bind socket: Address already in use\n";
        assert!(lost_port_race(Engine::QemuKvm, qemu));
        assert!(!lost_port_race(
            Engine::QemuKvm,
            "RFB could not bind any port"
        ));
        assert!(!lost_port_race(Engine::Bochs, "[CPU0  ] panic"));
    }

    /// A stand-in emulator: a COM1 server that sends a log in pieces and records what it is
    /// sent, as Bochs's socket-server mode does.
    #[test]
    fn com1_client_copies_the_log_and_types_the_inputs() {
        use crate::scenario;
        let scenario = scenario::parse(
            "description = \"d\"\nengine = \"vmx\"\ntimeout_s = 1\nexpect = [\"a | x\"]\n\
             [[input]]\nafter = \"a | ready\"\ntext = \"a: hello\"\n",
            &["a".to_owned()],
        )
        .unwrap();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            conn.write_all(b"[INFO] hv: start\r\na | rea").unwrap();
            std::thread::sleep(Duration::from_millis(50));
            conn.write_all(b"dy\n").unwrap();
            let mut typed = [0u8; 9];
            conn.read_exact(&mut typed).unwrap();
            conn.write_all(b"a | echo: hello\n").unwrap();
            typed
        });
        let dir = std::env::temp_dir().join(format!("xtask-com1-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let serial = dir.join("serial.log");
        fs::write(&serial, b"").unwrap();
        let mut feeder = InputFeeder::new(&scenario);
        let stop = AtomicBool::new(false);
        copy_com1(port, &serial, &mut feeder, &stop).unwrap();
        assert_eq!(&server.join().unwrap(), b"a: hello\r");
        assert_eq!(
            fs::read_to_string(&serial).unwrap(),
            "[INFO] hv: start\r\na | ready\na | echo: hello\n"
        );
        assert!(feeder.untyped().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
