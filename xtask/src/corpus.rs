//! `cargo xtask corpus`: real guest-RAM images for the memory engine's benchmarks.
//!
//! Boots N real Linux guests under QEMU (Debian's `linux-image-amd64` kernel and a
//! `busybox-static` initramfs whose `/init` runs one workload), each with file-backed RAM
//! (`memory-backend-file,share=on`), so that when QEMU stops the file holds the guest's memory:
//! one raw image per VM, file offset = guest-physical address (all RAM lies below the 3 GiB PCI
//! hole for the sizes we use). The guest prints `CORPUS-READY` once its workload is done and it
//! has settled; we then `stop` the VM through the QEMU monitor and `quit`, which leaves the last
//! state in the file.
//!
//! Layout of the output directory: `DIR/vmN.raw` (the images; nothing else at the top level, so
//! `cargo xtask bench mem --images DIR` takes every file there) and `DIR/logs/` (serial logs,
//! the initramfs and `corpus.json`, which records how each image was made).
//!
//! Accelerator: TCG (`-accel tcg -cpu qemu64`) unless the host has real hardware virtualisation
//! (a `vmx`/`svm` CPU flag *and* a usable `/dev/kvm`); our hosts' `/dev/kvm` is `kvm_pvm`, which
//! cannot boot an unmodified kernel (see DESIGN.md section 5).

use std::fmt;
use std::fs;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The guest's `/init`, a busybox shell script (see the file for the workloads).
const INIT_SCRIPT: &str = include_str!("corpus/init.sh");
/// What the guest prints on its serial console once its workload has settled.
const READY_MARKER: &str = "CORPUS-READY";
/// What `init.sh` prints for a workload it does not know.
const ERROR_MARKER: &str = "CORPUS-ERROR";
/// The workloads `init.sh` understands; the heterogeneous set assigns them round-robin.
pub const WORKLOADS: [&str; 5] = ["idle", "churn", "text", "compress", "random"];

/// Errors of corpus generation.
#[derive(Debug)]
pub enum CorpusError {
    /// Bad command-line arguments.
    Usage(String),
    /// An I/O operation failed.
    Io { what: String, source: io::Error },
    /// A required host tool or file is missing and could not be installed.
    Missing(String),
    /// A guest failed: QEMU exited early, the guest reported an error, or it timed out.
    Guest {
        vm: String,
        reason: String,
        log_tail: String,
    },
}

impl fmt::Display for CorpusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CorpusError::Usage(msg) => write!(f, "{msg}\n\n{USAGE}"),
            CorpusError::Io { what, source } => write!(f, "{what}: {source}"),
            CorpusError::Missing(what) => write!(f, "missing: {what}"),
            CorpusError::Guest {
                vm,
                reason,
                log_tail,
            } => {
                write!(
                    f,
                    "guest {vm}: {reason}\n--- last serial output ---\n{log_tail}"
                )
            }
        }
    }
}

impl std::error::Error for CorpusError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CorpusError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> CorpusError {
    let what = what.into();
    move |source| CorpusError::Io { what, source }
}

const USAGE: &str =
    "usage: cargo xtask corpus [--out DIR] [--set homogeneous|heterogeneous] [--vms N]
                           [--memory-mib M] [--nokaslr] [--jobs J] [--settle-s S]
                           [--timeout-s T] [--kernel PATH] [--accel auto|tcg|kvm]
  --out DIR        output directory (default: images/ under the repository root)
  --set            homogeneous: N identical idle guests; heterogeneous (default): workloads
                   idle, churn, text, compress, random assigned round-robin
  --vms N          number of guests (default 8)
  --memory-mib M   RAM per guest in MiB (default 256)
  --nokaslr        boot the guests with nokaslr (more sharing between identical guests)
  --jobs J         guests running at once (default: number of host CPUs)
  --settle-s S     seconds each guest idles after its workload before the snapshot (default 10)
  --timeout-s T    per-guest limit in seconds (default 900)
  --kernel PATH    guest kernel (default: newest /boot/vmlinuz-*, installing linux-image-amd64)
  --accel          auto (default: KVM only with real VT-x/AMD-V), tcg or kvm";

/// Which kind of corpus to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CorpusSet {
    /// N identical idle guests (same workload, same seed).
    Homogeneous,
    /// Different workloads, round-robin over [`WORKLOADS`], each VM with its own seed.
    Heterogeneous,
}

impl CorpusSet {
    fn name(self) -> &'static str {
        match self {
            CorpusSet::Homogeneous => "homogeneous",
            CorpusSet::Heterogeneous => "heterogeneous",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Accel {
    Auto,
    Tcg,
    Kvm,
}

/// Parsed `corpus` options.
#[derive(Debug)]
struct Options {
    out: PathBuf,
    set: CorpusSet,
    vms: usize,
    memory_mib: u64,
    nokaslr: bool,
    jobs: usize,
    settle_s: u64,
    timeout: Duration,
    kernel: Option<PathBuf>,
    accel: Accel,
}

fn parse_args(args: &[String]) -> Result<Options, CorpusError> {
    let mut opts = Options {
        out: crate_root_images(),
        set: CorpusSet::Heterogeneous,
        vms: 8,
        memory_mib: 256,
        nokaslr: false,
        jobs: thread::available_parallelism().map_or(2, |n| n.get()),
        settle_s: 10,
        timeout: Duration::from_secs(900),
        kernel: None,
        accel: Accel::Auto,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| CorpusError::Usage(format!("{name} needs a value")))
        };
        let number = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| CorpusError::Usage(format!("{name}: not a number: {v}")))
        };
        match arg.as_str() {
            "--out" => opts.out = PathBuf::from(value("--out")?),
            "--set" => {
                opts.set = match value("--set")?.as_str() {
                    "homogeneous" => CorpusSet::Homogeneous,
                    "heterogeneous" => CorpusSet::Heterogeneous,
                    other => return Err(CorpusError::Usage(format!("unknown set {other}"))),
                }
            }
            "--vms" => opts.vms = number("--vms", value("--vms")?)? as usize,
            "--memory-mib" => opts.memory_mib = number("--memory-mib", value("--memory-mib")?)?,
            "--nokaslr" => opts.nokaslr = true,
            "--jobs" => opts.jobs = number("--jobs", value("--jobs")?)? as usize,
            "--settle-s" => opts.settle_s = number("--settle-s", value("--settle-s")?)?,
            "--timeout-s" => {
                opts.timeout = Duration::from_secs(number("--timeout-s", value("--timeout-s")?)?)
            }
            "--kernel" => opts.kernel = Some(PathBuf::from(value("--kernel")?)),
            "--accel" => {
                opts.accel = match value("--accel")?.as_str() {
                    "auto" => Accel::Auto,
                    "tcg" => Accel::Tcg,
                    "kvm" => Accel::Kvm,
                    other => return Err(CorpusError::Usage(format!("unknown accel {other}"))),
                }
            }
            other => return Err(CorpusError::Usage(format!("unknown argument {other}"))),
        }
    }
    if opts.vms == 0 || opts.jobs == 0 {
        return Err(CorpusError::Usage(
            "--vms and --jobs must be at least 1".into(),
        ));
    }
    // Below 64 MiB the Debian kernel plus initramfs does not boot; above 2.5 GiB QEMU's pc
    // machine splits RAM around the PCI hole and file offset would no longer equal GPA.
    if !(64..=2560).contains(&opts.memory_mib) {
        return Err(CorpusError::Usage(
            "--memory-mib must be within 64..=2560".into(),
        ));
    }
    Ok(opts)
}

/// `images/` under the repository root (the parent of xtask's manifest directory).
fn crate_root_images() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("images")
}

/// One guest to boot.
#[derive(Clone, Debug)]
struct VmSpec {
    name: String,
    workload: &'static str,
    seed: u64,
}

fn vm_specs(set: CorpusSet, vms: usize) -> Vec<VmSpec> {
    (0..vms)
        .map(|i| match set {
            CorpusSet::Homogeneous => VmSpec {
                name: format!("vm{i}"),
                workload: "idle",
                seed: 1,
            },
            CorpusSet::Heterogeneous => VmSpec {
                name: format!("vm{i}"),
                workload: WORKLOADS[i % WORKLOADS.len()],
                seed: i as u64 + 1,
            },
        })
        .collect()
}

/// Entry point of `cargo xtask corpus`.
pub fn run(args: &[String]) -> crate::error::Result<()> {
    if crate::cli::help_requested(args) {
        return Err(crate::error::Error::Help(USAGE.to_owned()));
    }
    let failed = |e: CorpusError| crate::error::Error::Failed(e.to_string());
    let opts = parse_args(args).map_err(failed)?;
    generate(&opts).map_err(failed)
}

fn generate(opts: &Options) -> Result<(), CorpusError> {
    let qemu = ensure_qemu()?;
    let kernel = match &opts.kernel {
        Some(k) => k.clone(),
        None => ensure_kernel()?,
    };
    let busybox = ensure_busybox()?;
    let use_kvm = match opts.accel {
        Accel::Tcg => false,
        Accel::Kvm => true,
        Accel::Auto => host_has_real_kvm(),
    };

    let logs = opts.out.join("logs");
    fs::create_dir_all(&logs).map_err(io_err(format!("create {}", logs.display())))?;
    let initrd = logs.join("initramfs.cpio");
    let busybox_bytes =
        fs::read(&busybox).map_err(io_err(format!("read {}", busybox.display())))?;
    let cpio = build_initramfs(&busybox_bytes, INIT_SCRIPT.as_bytes());
    fs::write(&initrd, cpio).map_err(io_err(format!("write {}", initrd.display())))?;

    // Monitor sockets live in a short private path: sun_path is limited to 108 bytes.
    let sock_dir = std::env::temp_dir().join(format!("hv-corpus-{}", std::process::id()));
    fs::create_dir_all(&sock_dir).map_err(io_err("create socket directory"))?;

    let specs = vm_specs(opts.set, opts.vms);
    eprintln!(
        "corpus: {} set, {} VMs x {} MiB, {}, kernel {}, {} at a time, into {}",
        opts.set.name(),
        opts.vms,
        opts.memory_mib,
        if use_kvm { "KVM" } else { "TCG" },
        kernel.display(),
        opts.jobs,
        opts.out.display()
    );

    let started = Instant::now();
    let ctx = BootContext {
        qemu: &qemu,
        kernel: &kernel,
        initrd: &initrd,
        out: &opts.out,
        logs: &logs,
        sock_dir: &sock_dir,
        memory_mib: opts.memory_mib,
        nokaslr: opts.nokaslr,
        settle_s: opts.settle_s,
        timeout: opts.timeout,
        use_kvm,
    };
    let results = run_pool(&specs, opts.jobs, |spec| boot_one(&ctx, spec));
    let _ = fs::remove_dir_all(&sock_dir);

    let mut errors = Vec::new();
    let mut records = Vec::new();
    for (spec, result) in specs.iter().zip(results) {
        match result {
            Ok(secs) => records.push(serde_json::json!({
                "name": spec.name,
                "image": format!("{}.raw", spec.name),
                "workload": spec.workload,
                "seed": spec.seed,
                "seconds_to_ready": secs,
            })),
            Err(e) => errors.push(e),
        }
    }
    let meta = serde_json::json!({
        "set": opts.set.name(),
        "vms": opts.vms,
        "memory_mib": opts.memory_mib,
        "nokaslr": opts.nokaslr,
        "accel": if use_kvm { "kvm" } else { "tcg" },
        "kernel": kernel.display().to_string(),
        "settle_s": opts.settle_s,
        "wall_seconds": started.elapsed().as_secs_f64(),
        "guests": records,
    });
    let meta_path = logs.join("corpus.json");
    fs::write(
        &meta_path,
        serde_json::to_string_pretty(&meta).unwrap_or_default(),
    )
    .map_err(io_err(format!("write {}", meta_path.display())))?;

    if let Some(first) = errors.into_iter().next() {
        return Err(first);
    }
    eprintln!(
        "corpus: {} images in {} ({:.0} s)",
        opts.vms,
        opts.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs `work` over `items` on at most `jobs` threads, results in input order.
fn run_pool<T: Sync, R: Send>(items: &[T], jobs: usize, work: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    thread::scope(|s| {
        for _ in 0..jobs.min(items.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = work(item);
                *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .expect("every item was processed")
        })
        .collect()
}

/// Everything a guest boot needs besides its [`VmSpec`].
struct BootContext<'a> {
    qemu: &'a Path,
    kernel: &'a Path,
    initrd: &'a Path,
    out: &'a Path,
    logs: &'a Path,
    sock_dir: &'a Path,
    memory_mib: u64,
    nokaslr: bool,
    settle_s: u64,
    timeout: Duration,
    use_kvm: bool,
}

/// Kills the QEMU process if the boot is abandoned (error, timeout, panic).
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Boots one guest, waits for its marker, stops it; returns seconds until the marker.
fn boot_one(ctx: &BootContext<'_>, spec: &VmSpec) -> Result<f64, CorpusError> {
    let image = ctx.out.join(format!("{}.raw", spec.name));
    let serial = ctx.logs.join(format!("{}.serial.log", spec.name));
    let monitor = ctx.sock_dir.join(format!("{}.mon", spec.name));
    for stale in [&image, &serial, &monitor] {
        match fs::remove_file(stale) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("remove {}", stale.display()))(e)),
        }
    }

    let mut append = format!(
        "console=ttyS0 panic=-1 quiet corpus_workload={} corpus_seed={} corpus_settle={}",
        spec.workload, spec.seed, ctx.settle_s
    );
    if ctx.nokaslr {
        append.push_str(" nokaslr");
    }
    let mut cmd = Command::new(ctx.qemu);
    if ctx.use_kvm {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg", "-cpu", "qemu64"]);
    }
    cmd.arg("-object")
        .arg(format!(
            "memory-backend-file,id=mem,size={}M,mem-path={},share=on",
            ctx.memory_mib,
            image.display()
        ))
        .args(["-machine", "pc,memory-backend=mem"])
        .arg("-m")
        .arg(format!("{}M", ctx.memory_mib))
        .args([
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .args(["-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .arg("-kernel")
        .arg(ctx.kernel)
        .arg("-initrd")
        .arg(ctx.initrd)
        .arg("-append")
        .arg(&append)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    log::debug!("{}: {:?}", spec.name, cmd);

    let started = Instant::now();
    let child = cmd
        .spawn()
        .map_err(io_err(format!("spawn {}", ctx.qemu.display())))?;
    let mut guard = ChildGuard(Some(child));
    let guest_err = |reason: String| CorpusError::Guest {
        vm: spec.name.clone(),
        reason,
        log_tail: tail(&serial, 20),
    };

    loop {
        thread::sleep(Duration::from_millis(250));
        let log = fs::read_to_string(&serial).unwrap_or_default();
        if log.contains(ERROR_MARKER) {
            return Err(guest_err("the guest reported an error".into()));
        }
        if log.contains(READY_MARKER) {
            break;
        }
        let child = guard.0.as_mut().expect("child present until stopped");
        if let Some(status) = child.try_wait().map_err(io_err("wait for qemu"))? {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            return Err(guest_err(format!(
                "QEMU exited early ({status}): {}",
                stderr.trim()
            )));
        }
        if started.elapsed() > ctx.timeout {
            return Err(guest_err(format!(
                "no {READY_MARKER} after {:?}",
                ctx.timeout
            )));
        }
    }
    let secs = started.elapsed().as_secs_f64();

    stop_via_monitor(&monitor)
        .map_err(|e| guest_err(format!("stopping through the monitor: {e}")))?;
    let mut child = guard.0.take().expect("child present until stopped");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().map_err(io_err("wait for qemu"))? {
            if !status.success() {
                return Err(guest_err(format!("QEMU exited with {status} after quit")));
            }
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(guest_err("QEMU did not exit after quit".into()));
        }
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "corpus: {} ({}) ready after {:.0} s",
        spec.name, spec.workload, secs
    );
    Ok(secs)
}

/// Freezes the VM (`stop`) so its RAM no longer changes, then ends QEMU (`quit`).
fn stop_via_monitor(path: &Path) -> io::Result<()> {
    let mut sock = UnixStream::connect(path)?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    read_until_prompt(&mut sock)?;
    sock.write_all(b"stop\n")?;
    read_until_prompt(&mut sock)?;
    sock.write_all(b"quit\n")?;
    // QEMU closes the connection as it exits; a reset or EOF here is the expected outcome.
    let mut rest = Vec::new();
    let _ = sock.read_to_end(&mut rest);
    Ok(())
}

fn read_until_prompt(sock: &mut UnixStream) -> io::Result<()> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.windows(7).any(|w| w == b"(qemu) ") {
        let n = sock.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "monitor closed",
            ));
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    let Ok(f) = fs::File::open(path) else {
        return String::from("(no serial log)");
    };
    let all: Vec<String> = io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// True when the host has hardware virtualisation that QEMU's KVM accelerator can use.
///
/// `/dev/kvm` alone proves nothing: on our hosts it is `kvm_pvm`, a paravirtual KVM that cannot
/// run an unmodified kernel. Require the CPU flag as well.
fn host_has_real_kvm() -> bool {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    has_flag
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// `apt-get update`, for package lists a fresh machine may lack; whether it succeeded.
pub(crate) fn apt_update() -> bool {
    eprintln!("xtask: apt-get update");
    Command::new("apt-get")
        .arg("update")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs Debian packages (root only), running `apt-get update` once if the first try fails.
fn apt_install(packages: &[&str]) -> Result<(), CorpusError> {
    eprintln!("corpus: installing {} with apt-get", packages.join(" "));
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
    };
    if matches!(install(), Ok(s) if s.success()) {
        return Ok(());
    }
    apt_update();
    match install() {
        Ok(s) if s.success() => Ok(()),
        _ => Err(CorpusError::Missing(format!(
            "apt-get install {} failed (needs root and Debian)",
            packages.join(" ")
        ))),
    }
}

fn ensure_qemu() -> Result<PathBuf, CorpusError> {
    if let Some(q) = which("qemu-system-x86_64") {
        return Ok(q);
    }
    apt_install(&["qemu-system-x86"])?;
    which("qemu-system-x86_64")
        .ok_or_else(|| CorpusError::Missing("qemu-system-x86_64 not on PATH".into()))
}

/// The newest `/boot/vmlinuz-*`, installing Debian's `linux-image-amd64` if there is none.
fn ensure_kernel() -> Result<PathBuf, CorpusError> {
    let newest = || -> Option<PathBuf> {
        let mut kernels: Vec<PathBuf> = fs::read_dir("/boot")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .collect();
        // Version-aware enough for Debian's names (6.1.0-56-amd64 vs 6.1.0-9-amd64).
        kernels.sort_by_key(|p| version_key(&p.to_string_lossy()));
        kernels.pop()
    };
    if let Some(k) = newest() {
        return Ok(k);
    }
    apt_install(&["linux-image-amd64"])?;
    newest().ok_or_else(|| CorpusError::Missing("no /boot/vmlinuz-* after install".into()))
}

fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

/// A statically linked busybox (Debian's `busybox-static` installs it as /bin/busybox).
pub(crate) fn ensure_busybox() -> Result<PathBuf, CorpusError> {
    let candidates = ["/bin/busybox", "/usr/bin/busybox"];
    let is_static = |p: &Path| fs::read(p).is_ok_and(|elf| elf_is_static(&elf));
    if let Some(p) = candidates.iter().map(Path::new).find(|p| is_static(p)) {
        return Ok(p.to_path_buf());
    }
    apt_install(&["busybox-static"])?;
    candidates
        .iter()
        .map(Path::new)
        .find(|p| is_static(p))
        .map(Path::to_path_buf)
        .ok_or_else(|| CorpusError::Missing("a static busybox (busybox-static)".into()))
}

/// True for a 64-bit little-endian ELF without a PT_INTERP program header.
fn elf_is_static(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[32..40].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) != PT_INTERP)
            .unwrap_or(false)
    })
}

/// Builds the initramfs: a `newc` cpio archive with busybox, `/init` and `/dev/console`.
///
/// `/dev/console` must exist before devtmpfs is mounted, or init starts without stdio.
pub fn build_initramfs(busybox: &[u8], init: &[u8]) -> Vec<u8> {
    const DIR: u32 = 0o040755;
    const EXE: u32 = 0o100755;
    const CHR: u32 = 0o020600;
    let mut w = CpioWriter::default();
    for dir in [
        "bin", "dev", "proc", "sys", "tmp", "sbin", "usr", "usr/bin", "usr/sbin",
    ] {
        w.entry(dir, DIR, 0, b"");
    }
    w.entry("dev/console", CHR, (5 << 8) | 1, b"");
    w.entry("bin/busybox", EXE, 0, busybox);
    w.entry("init", EXE, 0, init);
    w.finish()
}

/// A minimal writer for the SVR4 `newc` cpio format that the kernel's initramfs unpacker reads.
#[derive(Default)]
pub struct CpioWriter {
    out: Vec<u8>,
    ino: u32,
}

impl CpioWriter {
    /// Appends one entry; `rdev` is `major << 8 | minor` for device nodes.
    pub fn entry(&mut self, name: &str, mode: u32, rdev: u32, data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime: fixed, so the archive is reproducible
            u32::try_from(data.len()).expect("cpio newc entries are < 4 GiB"),
            0, // devmajor
            0, // devminor
            rdev >> 8,
            rdev & 0xff,
            u32::try_from(name.len() + 1).expect("short name"),
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// Appends the trailer and returns the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, b"");
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_round_trips_through_the_cpio_tool() {
        let Some(cpio) = which("cpio") else { return };
        let archive = build_initramfs(b"\x7fELF-not-really", b"#!/bin/sh\necho hi\n");
        let mut child = Command::new(cpio)
            .args(["-t", "-v"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cpio");
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        let out = child.wait_with_output().unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success());
        for name in ["bin/busybox", "init", "dev/console", "usr/sbin"] {
            assert!(listing.contains(name), "{name} missing from\n{listing}");
        }
        assert!(listing
            .lines()
            .any(|l| l.starts_with('c') && l.contains("dev/console")));
    }

    #[test]
    fn cpio_layout_is_aligned_and_terminated() {
        let mut w = CpioWriter::default();
        w.entry("a", 0o100644, 0, b"xyz");
        let out = w.finish();
        assert_eq!(out.len() % 4, 0);
        assert_eq!(&out[..6], b"070701");
        // Header (110) + "a\0" padded to 112, then 3 data bytes padded to 116.
        assert_eq!(&out[116..122], b"070701");
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn heterogeneous_set_cycles_workloads_with_distinct_seeds() {
        let specs = vm_specs(CorpusSet::Heterogeneous, 7);
        let workloads: Vec<_> = specs.iter().map(|s| s.workload).collect();
        assert_eq!(
            workloads,
            ["idle", "churn", "text", "compress", "random", "idle", "churn"]
        );
        assert_ne!(specs[0].seed, specs[5].seed);
        let homo = vm_specs(CorpusSet::Homogeneous, 3);
        assert!(homo
            .iter()
            .all(|s| s.workload == "idle" && s.seed == homo[0].seed));
    }

    #[test]
    fn init_script_knows_every_workload() {
        for w in WORKLOADS {
            assert!(
                INIT_SCRIPT.contains(&format!("    {w})")),
                "init.sh lacks {w}"
            );
        }
        assert!(INIT_SCRIPT.contains(READY_MARKER));
    }

    #[test]
    fn elf_static_detection() {
        assert!(!elf_is_static(b"not an elf"));
        if let Ok(bytes) = fs::read("/bin/busybox") {
            assert!(elf_is_static(&bytes));
        }
        if let Ok(bytes) = fs::read("/bin/ls") {
            assert!(!elf_is_static(&bytes), "/bin/ls is dynamically linked");
        }
    }

    #[test]
    fn kernel_versions_sort_numerically() {
        assert!(
            version_key("/boot/vmlinuz-6.1.0-56-amd64")
                > version_key("/boot/vmlinuz-6.1.0-9-amd64")
        );
    }

    #[test]
    fn args_parse() {
        let a: Vec<String> = [
            "--set",
            "homogeneous",
            "--vms",
            "3",
            "--nokaslr",
            "--out",
            "/x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let o = parse_args(&a).unwrap();
        assert_eq!(o.set, CorpusSet::Homogeneous);
        assert_eq!(o.vms, 3);
        assert!(o.nokaslr);
        assert_eq!(o.out, PathBuf::from("/x"));
        assert!(parse_args(&["--vms".to_string()]).is_err());
        assert!(parse_args(&["--memory-mib".to_string(), "4096".to_string()]).is_err());
    }
}
