//! `cargo xtask bench linux`: what running Debian's cloud kernel under muxvisor costs against
//! the same kernel on bare Bochs.
//!
//! Both boots use the same bzImage, the same initramfs (`tests/linux/bench.sh`: its `/init`
//! says it started and powers off), the same command line and Bochs at 100 M instructions per
//! emulated second ([`engine::BOCHS_IPS_LINUX`]); bare Bochs boots the kernel from GRUB
//! (`linux`/`initrd`), muxvisor from its manifest. Measured per boot: the wall time from the
//! emulator's start to the kernel's "Run /init" line (the harness watches the serial log), and
//! the kernel's own uptime at that line (its clock, the TSC, counts emulated time: Bochs's
//! instructions over 100 M, idle time included). Under muxvisor the closing stats line gives
//! the exits of the whole run by reason. The kernel's boot before its clock starts
//! (decompression) and the firmware and GRUB are in the wall time only.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::build;
use crate::cli::{Args, Spec};
use crate::deps;
use crate::engine::{self, BootSpec, Engine};
use crate::error::{Error, IoContext, Result};
use crate::iso::{self, IsoSpec};
use crate::linux;
use crate::workspace::Workspace;

const USAGE: &str = "cargo xtask bench linux [--cmdline \"KERNEL ARGS\"]";
/// The kernel's command line unless `--cmdline` gives another.
const CMDLINE: &str = "console=ttyS0 panic=-1";
/// The kernel's line as it starts /init (not printed with `quiet`), and the line of /init
/// itself, which gives its uptime: `bench: /init at SECONDS s of uptime`.
const INIT_LINE: &str = "Run /init as init process";
const BENCH_LINE: &str = "bench: /init at ";
const TIMEOUT: Duration = Duration::from_secs(900);

/// One boot's figures.
struct Boot {
    /// Wall seconds from the emulator's start to the "Run /init" line.
    wall_to_init: f64,
    /// The kernel's uptime at that line, seconds.
    uptime_at_init: f64,
    /// Wall seconds of the whole run.
    wall: f64,
    /// The TSC rate the kernel detected, MHz (its uptime counts in it).
    tsc_mhz: Option<f64>,
}

/// `cargo xtask bench linux`.
pub fn run(ws: &Workspace, args: &[String]) -> Result<()> {
    let args = Args::parse(
        args,
        &Spec {
            usage: USAGE,
            with_value: &["--cmdline"],
            positional: false,
        },
    )?;
    let cmdline = args.value("--cmdline").unwrap_or(CMDLINE).to_owned();
    if cmdline.contains(['"', '\\', '\n']) {
        return Err(Error::Usage(format!(
            "bench linux: --cmdline must not hold quotes, backslashes or line breaks\n{USAGE}"
        )));
    }
    println!("bench linux: kernel command line \"{cmdline}\"");
    deps::ensure_packages()?;
    build::build_all(ws)?;
    let kernel = linux::kernel(ws)?;
    let initrd = linux::initramfs(ws, "bench")?;

    // Bare Bochs: GRUB loads the kernel and the initramfs itself.
    let bare_dir = ws.scratch("bench-linux").join("bare");
    let staging = bare_dir.join("iso-root");
    if staging.exists() {
        fs::remove_dir_all(&staging).context(|| format!("emptying {}", staging.display()))?;
    }
    let grub = staging.join("boot").join("grub");
    fs::create_dir_all(&grub).context(|| format!("creating {}", grub.display()))?;
    for (from, to) in [(&kernel, "vmlinuz"), (&initrd, "initramfs")] {
        let to = staging.join("boot").join(to);
        fs::copy(from, &to).context(|| format!("copying {}", from.display()))?;
    }
    let cfg = format!(
        "set timeout=0\nset default=0\nmenuentry \"Linux on bare Bochs\" {{\n    linux /boot/vmlinuz \
         {cmdline}\n    initrd /boot/initramfs\n}}\n"
    );
    fs::write(grub.join("grub.cfg"), cfg).context(|| "writing grub.cfg".to_owned())?;
    let bare_iso = bare_dir.join("bare.iso");
    iso::mkrescue(&staging, &bare_iso)?;
    println!("bench linux: the kernel on bare Bochs ...");
    let bare = boot(&bare_dir, &bare_iso)?;

    // Under muxvisor.
    let mux_dir = ws.scratch("bench-linux").join("muxvisor");
    fs::create_dir_all(&mux_dir).context(|| format!("creating {}", mux_dir.display()))?;
    let manifest = mux_dir.join("manifest.toml");
    let text = format!(
        "[[vm]]\nname = \"linux\"\nmemory_mib = 128\nkernel = \"{}\"\ninitrd = \"{}bench\"\n\
         cmdline = \"{cmdline}\"\n",
        linux::KERNEL_IMAGE,
        linux::INITRAMFS_PREFIX,
    );
    fs::write(&manifest, text).context(|| format!("writing {}", manifest.display()))?;
    let images = [
        linux::KERNEL_IMAGE.to_owned(),
        format!("{}bench", linux::INITRAMFS_PREFIX),
    ];
    let spec = IsoSpec::from_build(ws, &manifest, &images, "exit=emulator")?;
    let mux_iso = mux_dir.join("muxvisor.iso");
    iso::make_iso(ws, &spec, &mux_dir.join("iso-root"), &mux_iso)?;
    println!("bench linux: the kernel under muxvisor ...");
    let mux = boot(&mux_dir, &mux_iso)?;
    let log = fs::read_to_string(mux_dir.join("serial.log")).unwrap_or_default();
    let stats = log
        .lines()
        .find(|l| l.starts_with("[INFO] stats vm=linux "))
        .unwrap_or("(no stats line)")
        .to_owned();

    println!();
    println!("| boot | wall s to /init | kernel uptime s at /init | TSC the kernel detected | wall s in all |");
    println!("|---|---|---|---|---|");
    for (name, b) in [("bare Bochs", &bare), ("muxvisor", &mux)] {
        let tsc = b.tsc_mhz.map_or("?".to_owned(), |m| format!("{m:.3} MHz"));
        println!(
            "| {name} | {:.1} | {:.2} | {tsc} | {:.1} |",
            b.wall_to_init, b.uptime_at_init, b.wall
        );
    }
    println!(
        "| muxvisor / bare | {:.2}x | | | |",
        mux.wall_to_init / bare.wall_to_init
    );
    // The uptimes compare only when both kernels' TSCs tick at the same emulated rate.
    if bare.tsc_mhz != mux.tsc_mhz {
        println!(
            "\nThe kernels detected different TSC rates (bare Bochs's own TSC against muxvisor's \
             guest TSC), so their uptimes measure different clocks: compare the wall times."
        );
    }
    println!("\nexits under muxvisor, whole run: {}", exits_of(&stats));
    Ok(())
}

/// Boots `iso` on Bochs with its logs in `dir`; watches the serial log for the "Run /init" line.
fn boot(dir: &Path, iso: &Path) -> Result<Boot> {
    let spec = BootSpec {
        engine: Engine::Bochs,
        iso: iso.to_path_buf(),
        dir: dir.to_path_buf(),
        timeout: TIMEOUT,
        bochs_ips: engine::BOCHS_IPS_LINUX,
        bochs_cpu: engine::BOCHS_CPU_MODEL.to_owned(),
        memory_mib: engine::MEMORY_MIB,
    };
    let serial = spec.serial_log();
    let start = Instant::now();
    let mut at_init: Option<f64> = None;
    let outcome = engine::boot(&spec, || {
        if at_init.is_none()
            && fs::read_to_string(&serial)
                .is_ok_and(|log| log.contains(INIT_LINE) || log.contains(BENCH_LINE))
        {
            at_init = Some(start.elapsed().as_secs_f64());
        }
    })?;
    let log = fs::read_to_string(&serial).context(|| format!("reading {}", serial.display()))?;
    // The kernel's timestamp where it printed one, else what /init read from /proc/uptime.
    let uptime = log
        .lines()
        .find(|l| l.contains(INIT_LINE))
        .and_then(kernel_timestamp)
        .or_else(|| {
            let line = log.lines().find(|l| l.contains(BENCH_LINE))?;
            let rest = &line[line.find(BENCH_LINE)? + BENCH_LINE.len()..];
            rest.split(' ').next()?.parse().ok()
        })
        .ok_or_else(|| {
            Error::Failed(format!(
                "bench linux: the kernel never ran /init (log {})",
                serial.display()
            ))
        })?;
    let tsc_mhz = log.lines().find_map(|l| {
        let rest = &l[l.find("tsc: Detected ")? + "tsc: Detected ".len()..];
        rest.strip_suffix(" MHz TSC")?.trim().parse().ok()
    });
    Ok(Boot {
        wall_to_init: at_init.unwrap_or(outcome.wall.as_secs_f64()),
        tsc_mhz,
        uptime_at_init: uptime,
        wall: outcome.wall.as_secs_f64(),
    })
}

/// The kernel's `[ seconds.micros]` timestamp in a console line.
fn kernel_timestamp(line: &str) -> Option<f64> {
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    line[open + 1..close].trim().parse().ok()
}

/// The `name=N` exit counts of a stats line that are not zero, after `exits=`.
fn exits_of(stats: &str) -> String {
    let Some(at) = stats.find(" exits=") else {
        return stats.to_owned();
    };
    stats[at + 1..]
        .split(' ')
        .filter(|kv| {
            !kv.starts_with("interrupts=")
                && !kv.starts_with("coalesced_ticks=")
                && !kv.starts_with("unclaimed_")
                && !kv.ends_with("=0")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_exits_are_read_from_the_logs() {
        assert_eq!(
            kernel_timestamp("linux | [   13.993732] Run /init as init process"),
            Some(13.993732)
        );
        assert_eq!(kernel_timestamp("no stamp"), None);
        assert_eq!(
            exits_of("[INFO] stats vm=linux state=x exits=9 interrupts=3 unclaimed_pio=2 cpuid=4 hlt=0 io=5"),
            "exits=9 cpuid=4 io=5"
        );
    }
}
