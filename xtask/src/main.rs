//! `cargo xtask <command>`: everything around the hypervisor that runs on the host: building,
//! imaging, booting in an emulator, the integration tests and the benchmarks.
//!
//! Commands (`cargo xtask help` prints them):
//! - `deps`: the Debian packages the emulator commands need (installed when root) and the
//!   `x86_64-unknown-none` Rust target.
//! - `build`: the kernel and the test guests (release, `x86_64-unknown-none`).
//! - `iso`: a bootable GRUB ISO (BIOS+UEFI) with a manifest and guest images.
//! - `run`: boots the demo (or a manifest) on the best VT-x engine and streams the serial log.
//! - `qemu-test`: the integration scenarios of tests/scenarios, judged by their serial logs.
//! - `test`: fmt, clippy, host unit tests, build and `qemu-test`; ends with `N passed, N failed`.
//! - `bench exits`: VM exit round-trip cost under Bochs.
//! - `bench dilation`: time-dilated clocks' rate error, RDTSC cost (dilation_bench.rs).
//! - `bench mem`: the memory engine against Linux KSM on raw guest-RAM images (mem_bench.rs).
//! - `bench linux`: a Linux boot under muxvisor against bare Bochs (linux_bench.rs).
//! - `bench density`: idle VMs per machine, answer delays, the busy VM's share
//!   (density_bench.rs).
//! - `corpus`: real Linux guest-RAM images made under QEMU, for `bench mem` (corpus.rs).
//! - `manifest check`: validates a boot manifest with the hypervisor's own parser.

#![recursion_limit = "256"]

mod bench;
mod build;
mod cli;
mod corpus;
mod density_bench;
mod density_plot;
mod deps;
mod dilation_bench;
mod elf;
mod engine;
mod error;
mod iso;
mod ksm;
mod kut;
mod linux;
mod linux_bench;
mod manifest_cmd;
mod mem_bench;
mod process;
mod qemu_test;
mod run_cmd;
mod scenario;
mod test_cmd;
mod workspace;

use std::process::ExitCode;

use error::{Error, Result};
use workspace::Workspace;

const USAGE: &str = "\
usage: cargo xtask <command> [options]

  deps                        check the system packages (bochs, grub, xorriso, mtools, qemu) and
                              the x86_64-unknown-none target; as root, install what is missing
  build                       build the hypervisor and the test guests (release)
  iso --manifest FILE --images a,b,... [--cmdline \"WORDS\"] -o OUT.iso
                              make a bootable ISO (GRUB, BIOS+UEFI)
  run [--manifest FILE] [--timeout-s N]
                              boot the demo (examples/demo.toml) or FILE and stream the serial log
  qemu-test [SCENARIO...] [--jobs N]
                              run the integration scenarios (tests/scenarios)
  test                        fmt + clippy + unit tests + build + qemu-test;
                              ends with `N passed, N failed`
  kvm-unit-tests [TEST...] [--src DIR] [--set must-pass|ci|excluded|all] [--per-boot N]
                 [--jobs N] [--engine muxvisor|qemu-tcg]
                              run the KVM project's x86 unit tests as guests and judge them
                              against tests/kvm-unit-tests.toml
  bench exits [--n N]         VM exit round-trip cost under Bochs (runs N and 4N)
  bench dilation              time-dilated clocks' rate error and RDTSC cost under Bochs
  bench mem --images DIR ...  memory engine vs KSM on raw guest-RAM images
  bench linux                 Debian's cloud kernel under muxvisor vs on bare Bochs
  bench density [--vms N] [--vm-mib M] [--ram-mib R] ...
                              idle VMs per machine: memory per VM, answer delays, busy share
  corpus [--out DIR] ...      make real Linux guest-RAM images under QEMU
  manifest check FILE [--images DIR] [--memory-mib N]
                              validate a boot manifest

environment: XTASK_ENGINE=bochs|qemu-kvm|auto forces or detects the VT-x engine";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ws = Workspace::locate();
    match dispatch(&ws, &args) {
        Ok(()) => ExitCode::SUCCESS,
        // The command printed its verdict already; its last line must stay the last one.
        Err(Error::AlreadyReported) => ExitCode::FAILURE,
        Err(Error::Help(usage)) => {
            println!("{usage}");
            ExitCode::SUCCESS
        }
        Err(Error::Usage(message)) => {
            eprintln!("{message}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(ws: &Workspace, args: &[String]) -> Result<()> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["deps", ..] => deps::run(&args[1..]),
        ["build", ..] => build::run(ws, &args[1..]),
        ["iso", ..] => iso::run(ws, &args[1..]),
        ["run", ..] => run_cmd::run(ws, &args[1..]),
        ["qemu-test", ..] => with_interrupts(|| qemu_test::run(ws, &args[1..])),
        ["test", ..] => with_interrupts(|| test_cmd::run(ws, &args[1..])),
        ["kvm-unit-tests", ..] => with_interrupts(|| kut::run(ws, &args[1..])),
        ["bench", "exits", ..] => with_interrupts(|| bench::exits(ws, &args[2..])),
        ["bench", "dilation", ..] => with_interrupts(|| dilation_bench::run(ws, &args[2..])),
        ["bench", "mem", ..] => mem_bench::run(&args[2..]),
        ["bench", "linux", ..] => with_interrupts(|| linux_bench::run(ws, &args[2..])),
        ["bench", "density", ..] => with_interrupts(|| density_bench::run(ws, &args[2..])),
        ["corpus", ..] => corpus::run(&args[1..]),
        ["manifest", "check", ..] => manifest_cmd::check(&args[2..]),
        // `bench` alone or with a help flag: the overview lists its benchmarks.
        [] | ["help" | "-h" | "--help", ..] | ["bench"] | ["bench", "-h" | "--help", ..] => {
            println!("{USAGE}");
            Ok(())
        }
        [other, ..] => Err(Error::Usage(format!(
            "unknown command `{other}`\n\n{USAGE}"
        ))),
    }
}

/// Runs `command` with Ctrl-C taking the emulators down with xtask.
fn with_interrupts(command: impl FnOnce() -> Result<()>) -> Result<()> {
    process::install_interrupt_handler();
    command()
}
