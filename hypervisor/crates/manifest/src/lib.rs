//! The boot manifest: the TOML file that declares which VMs the hypervisor runs.
//!
//! This crate owns the manifest's schema, its parsing and its validation, and nothing else: the
//! hypervisor hands it the text of the `manifest` boot module plus what the host offers
//! ([`HostLimits`]), and gets back the VMs to build and the errors to print. `cargo xtask
//! manifest check` runs the same code on the host, so a manifest that passes there passes at
//! boot (given the same images and memory).
//!
//! Error policy: a manifest that is not TOML at all, or declares no `[[vm]]`, is a
//! [`FatalError`]. Anything else is a [`ManifestError`] tied to one place; a VM with an error is
//! skipped and every valid VM still runs, so one typo does not take the whole machine down.
//! Every error names the VM (by name, or `#N` when it has no usable name), the key and the line.
//!
//! The schema is documented in `docs/manifest.md`. In short:
//!
//! ```toml
//! [defaults]
//! quantum_us = 10000        # optional
//!
//! [memory]                  # optional: memory multiplexing (page sharing, patching, compression)
//! multiplex = true          # default false
//! scan_pages = 1024         # pages the scanner visits per step, default 1024
//! scan_interval_us = 10000  # at most one scan step per interval, default 10000
//! cold_after_us = 1000000   # a page untouched this long (VM and host time) is cold, default 1 s
//! scan_cpu_percent = 5      # the scanner's most CPU, percent of host time, default 5
//! low_watermark_mib = 4     # below this much free memory the scanner runs unbudgeted, default 4
//!
//! [idle]                    # optional: the idle-VM detector (docs/manifest.md, "[idle]")
//! detect = true             # default true
//! interval_us = 100000      # one classification per interval, default 100 ms
//! idle_after = 3            # quiet intervals in a row that make a VM idle, default 3
//! dormant_after = 50        # further quiet intervals that make it dormant, default 50
//! busy_cpu_percent = 10     # an interval with more CPU than this is not quiet, default 10
//! quantum_shrink = 4        # idle: quantum / 4; dormant: / 16; default 4
//! timer_slack_us = 50000    # a dormant VM's one-shot timers may fire this late, default 50 ms
//!
//! [[vm]]
//! name = "hello-a"          # required, unique, 1..=31 bytes of A-Z a-z 0-9 _ . -
//! memory_mib = 4            # required, >= 2
//! image = "hello"           # the guest kernel: the GRUB module2 holding an ELF or Multiboot kernel
//! # kernel = "vmlinuz"      # ... or a Linux bzImage instead of `image` (exactly one of the two)
//! # initrd = "initramfs"    # optional with `kernel`: the initrd's module
//! cmdline = "verbose"       # optional, default ""
//! modules = ["env"]         # optional: boot modules handed to a Multiboot kernel
//! debug_exit = true         # optional, default false: a test-exit port (QEMU's isa-debug-exit)
//! debug_exit_port = 0xf4    # optional, default 0xf4: where it is (4 ports)
//! test_device = true        # optional, default false: QEMU's pc-testdev, for test suites
//! quantum_us = 5000         # optional, default [defaults].quantum_us or 10000
//! vcpus = 1                 # optional, default 1 (only 1 is supported for now)
//! sharing_domain = 0        # optional, default 0: only VMs of one domain share memory
//! time_dilation = 2.5       # optional, default 1: the guest's clocks run 2.5 times slower
//! cpu_share = 2             # optional, default 1: a weight; the quantum is quantum_us x share
//! idle_reclaim = true       # optional, default true: false exempts the VM from idle policy
//! ```
//!
//! The crate is `no_std` + `alloc`; it parses with the `toml` crate's spanned parse tree
//! ([`toml::de::DeTable`]) rather than a serde derive, because the derive stops at the first
//! error and loses the positions that the messages need.

#![cfg_attr(not(test), no_std)]

extern crate alloc;

mod error;
mod validate;

#[cfg(test)]
mod tests;

use alloc::string::String;
use alloc::vec::Vec;
use core::ops::RangeInclusive;

pub use error::{ErrorKind, FatalError, ManifestError, Scope};

/// Most boot modules a VM may take.
pub const MODULES_MAX: usize = 16;
/// Where the test-exit device is unless `debug_exit_port` says otherwise (QEMU's default for
/// `isa-debug-exit`, which kvm-unit-tests use).
pub const DEBUG_EXIT_PORT_DEFAULT: u16 = 0xf4;
/// Ports of the virtual PC that the test-exit device may not take (first, count): PIC, PIT,
/// port 0x61 and the keyboard controller, CMOS/RTC, the second PIC, COM1, ELCR, PCI
/// configuration.
pub const PLATFORM_PORTS: &[(u16, u16)] = &[
    (0x20, 2),
    (0x40, 4),
    (0x60, 5),
    (0x70, 2),
    (0xa0, 2),
    (0x3f8, 8),
    (0x4d0, 2),
    (0xcf8, 8),
];

/// The test device's port ranges (first, count), as QEMU's pc-testdev: scratch and flush ports,
/// and one port per interrupt line. The platform's `testdev` module places the device there.
pub const TEST_DEVICE_PORTS: &[(u16, u16)] = &[(0xe0, 12), (0x2000, 24)];
/// Where the test device's 64 KiB of MMIO RAM starts: a VM with the device must end below it.
pub const TEST_DEVICE_RAM_BASE: u64 = 0xff00_0000;

/// Longest VM name, in bytes (names appear in every log line of the VM, so keep them short).
pub const NAME_MAX: usize = 31;
/// The characters allowed in VM and image names, as shown in error messages.
pub const NAME_CHARS: &str = "A-Z a-z 0-9 _ . -";
/// Smallest `memory_mib`: what the boot area, an image and a stack need.
pub const MEMORY_MIB_MIN: u64 = guest_abi::boot::MIN_MEMORY_BYTES >> 20;
/// Largest `memory_mib` whose size in bytes still fits in a `u64`.
pub const MEMORY_MIB_MAX: u64 = u64::MAX >> 20;
/// Longest `cmdline`, in bytes.
pub const CMDLINE_MAX: usize = guest_abi::boot::CMDLINE_MAX;
/// `quantum_us` when neither the VM nor `[defaults]` sets it.
pub const DEFAULT_QUANTUM_US: u64 = 10_000;
/// Allowed `quantum_us`, in microseconds.
pub const QUANTUM_US_RANGE: RangeInclusive<u64> = 100..=1_000_000;

/// `scan_pages` when `[memory]` does not set it.
pub const DEFAULT_SCAN_PAGES: u64 = 1024;
/// Allowed `scan_pages`.
pub const SCAN_PAGES_RANGE: RangeInclusive<u64> = 1..=1 << 20;
/// `scan_interval_us` when `[memory]` does not set it.
pub const DEFAULT_SCAN_INTERVAL_US: u64 = 10_000;
/// Allowed `scan_interval_us`.
pub const SCAN_INTERVAL_US_RANGE: RangeInclusive<u64> = 100..=10_000_000;
/// `cold_after_us` when `[memory]` does not set it.
pub const DEFAULT_COLD_AFTER_US: u64 = 1_000_000;
/// Allowed `cold_after_us` (up to an hour).
pub const COLD_AFTER_US_RANGE: RangeInclusive<u64> = 100..=3_600_000_000;
/// `scan_cpu_percent` when `[memory]` does not set it.
pub const DEFAULT_SCAN_CPU_PERCENT: u64 = 5;
/// Allowed `scan_cpu_percent`.
pub const SCAN_CPU_PERCENT_RANGE: RangeInclusive<u64> = 1..=100;
/// `low_watermark_mib` when `[memory]` does not set it.
pub const DEFAULT_LOW_WATERMARK_MIB: u64 = 4;
/// Allowed `low_watermark_mib`.
pub const LOW_WATERMARK_MIB_RANGE: RangeInclusive<u64> = 0..=1 << 20;
/// `[idle]` defaults and ranges (docs/manifest.md).
pub const DEFAULT_IDLE_INTERVAL_US: u64 = 100_000;
pub const IDLE_INTERVAL_US_RANGE: RangeInclusive<u64> = 1_000..=10_000_000;
pub const DEFAULT_IDLE_AFTER: u64 = 3;
pub const IDLE_AFTER_RANGE: RangeInclusive<u64> = 1..=1_000;
pub const DEFAULT_DORMANT_AFTER: u64 = 50;
pub const DORMANT_AFTER_RANGE: RangeInclusive<u64> = 1..=1_000_000;
pub const DEFAULT_BUSY_CPU_PERCENT: u64 = 10;
pub const BUSY_CPU_PERCENT_RANGE: RangeInclusive<u64> = 1..=100;
pub const DEFAULT_QUANTUM_SHRINK: u64 = 4;
pub const QUANTUM_SHRINK_RANGE: RangeInclusive<u64> = 1..=64;
pub const DEFAULT_TIMER_SLACK_US: u64 = 50_000;
pub const TIMER_SLACK_US_RANGE: RangeInclusive<u64> = 0..=1_000_000;
/// Largest `sharing_domain`.
pub const SHARING_DOMAIN_MAX: u64 = u32::MAX as u64;
/// Largest `time_dilation` (the guest's clocks then run 1000 times slower than the host's).
pub const TIME_DILATION_MAX: u32 = 1000;
/// `time_dilation` is kept in thousandths: at most three decimals are meaningful.
pub const TIME_DILATION_SCALE: u32 = 1000;
/// Allowed `cpu_share`.
pub const CPU_SHARE_RANGE: RangeInclusive<u64> = 1..=1000;

/// The `[memory]` table: whether and how fast the hypervisor multiplexes guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Run the memory engine (share, patch and compress guest pages). Off unless the manifest
    /// turns it on, and off when `[memory]` has any error.
    pub multiplex: bool,
    /// Pages the scanner visits per scan step, within [`SCAN_PAGES_RANGE`].
    pub scan_pages: u64,
    /// At most one scan step per this many microseconds, within [`SCAN_INTERVAL_US_RANGE`].
    pub scan_interval_us: u64,
    /// A page not accessed for this many microseconds of its VM's own time (the quanta it was
    /// given, not time spent waiting for the CPU) and of host time is cold, within
    /// [`COLD_AFTER_US_RANGE`].
    pub cold_after_us: u64,
    /// The most host time the scanner may take, in percent, within [`SCAN_CPU_PERCENT_RANGE`]:
    /// a scan step waits until the scanner's total is under this share of the time since the
    /// first step.
    pub scan_cpu_percent: u64,
    /// Below this much free host memory (MiB, within [`LOW_WATERMARK_MIB_RANGE`]) the scanner
    /// runs without its budget, to reclaim; so it does while a VM waits for a frame.
    pub low_watermark_mib: u64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            multiplex: false,
            scan_pages: DEFAULT_SCAN_PAGES,
            scan_interval_us: DEFAULT_SCAN_INTERVAL_US,
            cold_after_us: DEFAULT_COLD_AFTER_US,
            scan_cpu_percent: DEFAULT_SCAN_CPU_PERCENT,
            low_watermark_mib: DEFAULT_LOW_WATERMARK_MIB,
        }
    }
}

/// The `[idle]` table: how the idle-VM detector classifies VMs and what it does to idle ones
/// (docs/manifest.md, "[idle]"; the detector is hv-vm's `idle` module).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleConfig {
    /// Classify VMs at all. Off: every VM stays active. Off when `[idle]` has any error.
    pub detect: bool,
    /// Length of one classification interval, host time, within [`IDLE_INTERVAL_US_RANGE`].
    pub interval_us: u64,
    /// Quiet intervals in a row (no full quantum, no input, CPU under `busy_cpu_percent`) that
    /// make an active VM idle, within [`IDLE_AFTER_RANGE`].
    pub idle_after: u64,
    /// Quiet intervals in a row, after it became idle, that make a VM dormant, within
    /// [`DORMANT_AFTER_RANGE`].
    pub dormant_after: u64,
    /// An interval in which the VM was on the CPU for more than this share is not quiet,
    /// within [`BUSY_CPU_PERCENT_RANGE`].
    pub busy_cpu_percent: u64,
    /// An idle VM's quantum is its quantum divided by this, a dormant VM's by its square,
    /// within [`QUANTUM_SHRINK_RANGE`].
    pub quantum_shrink: u64,
    /// How late a dormant VM's timer interrupts may come when the guest arms each timer itself
    /// (no periodic timer), so that dormant VMs wake together; 0 for never late. Within
    /// [`TIMER_SLACK_US_RANGE`].
    pub timer_slack_us: u64,
}

impl Default for IdleConfig {
    fn default() -> Self {
        Self {
            detect: true,
            interval_us: DEFAULT_IDLE_INTERVAL_US,
            idle_after: DEFAULT_IDLE_AFTER,
            dormant_after: DEFAULT_DORMANT_AFTER,
            busy_cpu_percent: DEFAULT_BUSY_CPU_PERCENT,
            quantum_shrink: DEFAULT_QUANTUM_SHRINK,
            timer_slack_us: DEFAULT_TIMER_SLACK_US,
        }
    }
}

/// One VM that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Unique in the manifest; 1..=[`NAME_MAX`] bytes of [`NAME_CHARS`].
    pub name: String,
    /// RAM size: guest-physical `0..memory_mib MiB`.
    pub memory_mib: u64,
    /// Name of the boot module that holds the guest kernel: a 64-bit ELF (muxvisor's boot
    /// protocol) or a Multiboot kernel, told apart by the Multiboot header (manifest `image`),
    /// or a Linux bzImage when [`Self::linux`] (manifest `kernel`).
    pub image: String,
    /// Command line handed to the guest (at most [`CMDLINE_MAX`] bytes).
    pub cmdline: String,
    /// Boot modules handed to a Multiboot kernel, in order (at most [`MODULES_MAX`]).
    pub modules: Vec<String>,
    /// `image` names a Linux bzImage (manifest key `kernel`), booted by the Linux/x86 boot
    /// protocol.
    pub linux: bool,
    /// The boot module holding the initrd of a Linux kernel.
    pub initrd: Option<String>,
    /// The first of the 4 ports of the VM's test-exit device, when it has one: a write there
    /// ends the VM with the value written as its exit code.
    pub debug_exit_port: Option<u16>,
    /// The VM has QEMU's pc-testdev ([`TEST_DEVICE_PORTS`], MMIO RAM at
    /// [`TEST_DEVICE_RAM_BASE`]), which test suites such as kvm-unit-tests use.
    pub test_device: bool,
    /// Scheduling quantum in microseconds, within [`QUANTUM_US_RANGE`].
    pub quantum_us: u64,
    /// Number of vCPUs (always 1 for now).
    pub vcpus: u32,
    /// VMs share, patch against and even compare each other's pages only within one domain.
    pub sharing_domain: u32,
    /// The time-dilation factor in thousandths ([`TIME_DILATION_SCALE`]): 1000 runs the guest's
    /// clocks at the host's rate, 2500 makes them 2.5 times slower. From 1000 to
    /// [`TIME_DILATION_MAX`] x 1000.
    pub time_dilation_milli: u32,
    /// The VM's CPU weight, within [`CPU_SHARE_RANGE`]: its quantum is `quantum_us` times this.
    pub cpu_share: u32,
    /// The idle policy applies to the VM (manifest `idle_reclaim`, default true): once idle, its
    /// quantum shrinks and its memory is reclaimed first, down to its working set. False for
    /// latency-critical VMs: they are still classified, and nothing else.
    pub idle_reclaim: bool,
    /// 1-based line of the VM's `[[vm]]` header.
    pub line: Option<usize>,
}

impl VmConfig {
    /// RAM size in bytes (cannot overflow: `memory_mib` <= [`MEMORY_MIB_MAX`]).
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// The quantum the scheduler gives the VM: `quantum_us` x `cpu_share`, microseconds.
    pub fn weighted_quantum_us(&self) -> u64 {
        self.quantum_us * u64::from(self.cpu_share)
    }

    /// The time-dilation factor as a manifest would write it: `1`, `2.5`, `7.125`.
    pub fn time_dilation_text(&self) -> String {
        let (whole, milli) = (
            self.time_dilation_milli / TIME_DILATION_SCALE,
            self.time_dilation_milli % TIME_DILATION_SCALE,
        );
        if milli == 0 {
            alloc::format!("{whole}")
        } else {
            let text = alloc::format!("{whole}.{milli:03}");
            String::from(text.trim_end_matches('0'))
        }
    }

    /// Whether the VM's clocks run slower than the host's.
    pub fn is_dilated(&self) -> bool {
        self.time_dilation_milli != TIME_DILATION_SCALE
    }
}

/// What the host offers, to check the VMs against. `None` means "not known, do not check".
#[derive(Clone, Copy, Debug, Default)]
pub struct HostLimits<'a> {
    /// Names of the available images (the boot modules' names).
    pub images: Option<&'a [&'a str]>,
    /// Memory the host can give to guests, in bytes; a VM larger than this can never run.
    pub memory_bytes: Option<u64>,
}

/// The result of a manifest that could be parsed: the valid VMs in file order and every error,
/// in file order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    pub vms: Vec<VmConfig>,
    /// `[memory]`, or its defaults.
    pub memory: MemoryConfig,
    /// `[idle]`, or its defaults.
    pub idle: IdleConfig,
    pub errors: Vec<ManifestError>,
}

/// Parses and validates a manifest.
///
/// Returns `Err` only when no VM can be taken from the text (invalid TOML, no `[[vm]]`, `vm` not
/// an array of tables). Otherwise every problem is in [`Manifest::errors`] and the VMs without
/// problems are in [`Manifest::vms`] (which may then be empty).
pub fn parse(text: &str, host: &HostLimits<'_>) -> Result<Manifest, FatalError> {
    validate::parse(text, host)
}

/// [`parse`] for raw bytes, e.g. a boot module: rejects text that is not UTF-8 with its position.
pub fn parse_bytes(bytes: &[u8], host: &HostLimits<'_>) -> Result<Manifest, FatalError> {
    match core::str::from_utf8(bytes) {
        Ok(text) => parse(text, host),
        Err(e) => {
            // The prefix up to the error is valid UTF-8 by definition.
            let good = core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default();
            let (line, column) = validate::Lines::new(good).line_col(good.len());
            Err(FatalError::NotUtf8 { line, column })
        }
    }
}
