//! Error types of the manifest: [`FatalError`] when no VM can be taken from the text at all,
//! [`ManifestError`] for one problem in one place (a VM, `[defaults]` or the top level).
//!
//! The `Display` texts are part of the interface: the hypervisor prints them on the serial log
//! after `[ERROR] manifest: ` and the integration scenarios match them, so each one names where
//! the problem is (the VM by name, or by position when it has no usable name), the key, and the
//! line.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::NAME_CHARS;

/// The manifest cannot be used at all: no VM is started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FatalError {
    /// The manifest bytes are not UTF-8 (TOML must be); the position is the first bad byte.
    NotUtf8 { line: usize, column: usize },
    /// The text is not valid TOML. `line`/`column` (1-based, column in characters) are absent
    /// only if the parser gave no position.
    Syntax {
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    /// `vm` is present but is not an array of tables (for example `[vm]` or `vm = "x"`).
    VmNotArray {
        line: Option<usize>,
        found: &'static str,
    },
    /// No `[[vm]]` entry at all. Unknown top-level keys are listed because a misspelled table
    /// (`[[vms]]`) is the usual cause.
    NoVms {
        unknown_keys: Vec<(String, Option<usize>)>,
    },
}

impl fmt::Display for FatalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotUtf8 { line, column } => {
                write!(f, "line {line}, column {column}: not valid UTF-8")
            }
            Self::Syntax {
                line,
                column,
                message,
            } => {
                match (line, column) {
                    (Some(l), Some(c)) => write!(f, "line {l}, column {c}: ")?,
                    (Some(l), None) => write!(f, "line {l}: ")?,
                    _ => {}
                }
                write!(f, "invalid TOML: {message}")
            }
            Self::VmNotArray { line, found } => {
                write_line_prefix(f, *line)?;
                write!(
                    f,
                    "key \"vm\": expected an array of tables ([[vm]]), found {found}"
                )
            }
            Self::NoVms { unknown_keys } => {
                f.write_str("manifest declares no [[vm]]")?;
                for (key, line) in unknown_keys {
                    write!(f, "; unknown top-level key \"{key}\"")?;
                    if let Some(l) = line {
                        write!(f, " (line {l})")?;
                    }
                }
                Ok(())
            }
        }
    }
}

fn write_line_prefix(f: &mut fmt::Formatter<'_>, line: Option<usize>) -> fmt::Result {
    match line {
        Some(l) => write!(f, "line {l}: "),
        None => Ok(()),
    }
}

/// Where a [`ManifestError`] is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// A key outside any table.
    TopLevel,
    /// The `[defaults]` table.
    Defaults,
    /// The `[memory]` table.
    Memory,
    /// The `[idle]` table.
    Idle,
    /// The `index`-th `[[vm]]` (1-based, in file order). `name` is set when the entry has a valid
    /// name that no earlier VM uses; otherwise the VM is identified by its index.
    Vm { index: usize, name: Option<String> },
}

/// One problem in the manifest. A VM with at least one error is not started; errors outside any
/// VM leave the VMs alone (except that a VM inheriting an invalid `[defaults]` value fails too,
/// and an error in `[memory]` turns memory multiplexing off: the VMs run without it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub scope: Scope,
    /// The key at fault, if the problem is about one key.
    pub key: Option<String>,
    /// 1-based line of the offending key or value; of the `[[vm]]` header for a missing key.
    pub line: Option<usize>,
    pub kind: ErrorKind,
}

/// What is wrong, independent of where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A key this table does not define; `known` lists the keys it does.
    UnknownKey { known: &'static [&'static str] },
    /// A required key is absent.
    MissingKey,
    /// Neither `image` nor `kernel`.
    MissingKernel,
    /// Both `image` and `kernel`.
    TwoKernels,
    /// `initrd` without `kernel`.
    NeedsLinuxKernel,
    /// `modules` (Multiboot's) with `kernel` (Linux's boot protocol has an initrd instead).
    ModulesWithLinux,
    /// The value has the wrong TOML type (`found` is the TOML type name).
    WrongType {
        expected: &'static str,
        found: &'static str,
    },
    /// An integer outside `min..=max`; `value` is the literal as written (e.g. `0x10`, `-5`).
    OutOfRange { value: String, min: u64, max: u64 },
    /// A string value that must not be empty is.
    Empty,
    /// A string longer than `max` bytes.
    TooLong { len: usize, max: usize },
    /// A name with a character outside [`NAME_CHARS`].
    BadChar { value: String, ch: char },
    /// `vcpus` other than 1 (`value` as written).
    VcpusUnsupported { value: String },
    /// The VM needs more memory than the host has at all.
    MemoryExceedsHost { memory_mib: u64, host_mib: u64 },
    /// No boot module / image file has this name.
    ImageNotFound { image: String },
    /// More than `max` items in a list.
    TooMany { count: usize, max: usize },
    /// `debug_exit_port` without `debug_exit = true`.
    DebugExitOff,
    /// The test-exit device's 4 ports overlap a device (`owner`, at port `taken`).
    PortTaken {
        port: u64,
        taken: u16,
        owner: &'static str,
    },
    /// `test_device = true` in a VM whose memory reaches the device's MMIO RAM.
    HidesTestDevice { memory_mib: u64 },
    /// An earlier VM already uses this name (`first_line`: the line of its `name`).
    DuplicateName {
        name: String,
        first_line: Option<usize>,
    },
    /// `time_dilation` that is not a number from 1 to [`crate::TIME_DILATION_MAX`] with at most
    /// three decimals (`value` as written: `0`, `-2`, `nan`, `1.0001`, `"fast"`).
    BadTimeDilation { value: String },
    /// The key is absent, so the VM takes the `[defaults]` value, which is itself invalid
    /// (reported separately at `defaults_line`).
    InvalidDefault { defaults_line: Option<usize> },
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            Scope::TopLevel => f.write_str("top level")?,
            Scope::Defaults => f.write_str("[defaults]")?,
            Scope::Memory => f.write_str("[memory]")?,
            Scope::Idle => f.write_str("[idle]")?,
            Scope::Vm {
                name: Some(name), ..
            } => write!(f, "vm \"{name}\"")?,
            Scope::Vm { index, name: None } => write!(f, "vm #{index}")?,
        }
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        f.write_str(": ")?;
        let key = self.key.as_deref().unwrap_or("");
        match &self.kind {
            ErrorKind::UnknownKey { known } => {
                write!(f, "unknown key \"{key}\" (known keys: ")?;
                for (i, k) in known.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(k)?;
                }
                f.write_str(")")
            }
            ErrorKind::MissingKey => write!(f, "missing required key \"{key}\""),
            ErrorKind::MissingKernel => {
                f.write_str("missing required key \"image\" (or \"kernel\", for a Linux bzImage)")
            }
            kind => {
                if self.key.is_some() {
                    write!(f, "key \"{key}\": ")?;
                }
                fmt_value_problem(kind, f)
            }
        }
    }
}

/// The part of the message after `key "K": `.
fn fmt_value_problem(kind: &ErrorKind, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match kind {
        // Formatted with their key by `ManifestError::fmt`; nothing to add here.
        ErrorKind::UnknownKey { .. } | ErrorKind::MissingKey | ErrorKind::MissingKernel => Ok(()),
        ErrorKind::TwoKernels => {
            f.write_str("`image` and `kernel` both given: a VM boots one kernel, take one away")
        }
        ErrorKind::NeedsLinuxKernel => {
            f.write_str("an initrd goes with a Linux kernel (`kernel = ...`), not with `image`")
        }
        ErrorKind::ModulesWithLinux => f.write_str(
            "modules are Multiboot's; a Linux kernel (`kernel = ...`) takes an `initrd`",
        ),
        ErrorKind::WrongType { expected, found } => {
            write!(f, "expected {expected}, found {found}")
        }
        ErrorKind::OutOfRange { value, min, max } => {
            write!(f, "{value} is out of range {min}..={max}")
        }
        ErrorKind::Empty => f.write_str("must not be empty"),
        ErrorKind::BadTimeDilation { value } => write!(
            f,
            "{value} is not a time-dilation factor: a number from 1 to {} with at most three \
             decimals",
            crate::TIME_DILATION_MAX
        ),
        ErrorKind::TooLong { len, max } => {
            write!(f, "{len} bytes is longer than the maximum of {max}")
        }
        ErrorKind::BadChar { value, ch } => write!(
            f,
            "\"{}\" contains {:?}; only {NAME_CHARS} are allowed",
            value.escape_debug(),
            ch
        ),
        ErrorKind::VcpusUnsupported { value } => write!(
            f,
            "{value} vCPUs requested, but only 1 vCPU per VM is supported for now"
        ),
        ErrorKind::MemoryExceedsHost {
            memory_mib,
            host_mib,
        } => write!(f, "{memory_mib} MiB is more than the host's {host_mib} MiB"),
        ErrorKind::ImageNotFound { image } => {
            write!(f, "no image named \"{image}\" is available")
        }
        ErrorKind::TooMany { count, max } => write!(f, "{count} items, at most {max} are allowed"),
        ErrorKind::DebugExitOff => {
            f.write_str("is set, but the test-exit device is off (add `debug_exit = true`)")
        }
        ErrorKind::PortTaken { port, taken, owner } => write!(
            f,
            "ports {port:#x}..={:#x} overlap port {taken:#x} of {owner}",
            port + 3
        ),
        ErrorKind::HidesTestDevice { memory_mib } => write!(
            f,
            "the test device's RAM at {:#x} lies inside the VM's {memory_mib} MiB (memory_mib \
             may be at most {} with the test device)",
            crate::TEST_DEVICE_RAM_BASE,
            crate::TEST_DEVICE_RAM_BASE >> 20
        ),
        ErrorKind::DuplicateName { name, first_line } => {
            write!(f, "duplicate name \"{name}\"")?;
            match first_line {
                Some(l) => write!(f, ", first used on line {l}"),
                None => f.write_str(", already used by an earlier VM"),
            }
        }
        ErrorKind::InvalidDefault { defaults_line } => {
            f.write_str("not set, and the [defaults] value it would inherit")?;
            if let Some(l) = defaults_line {
                write!(f, " (line {l})")?;
            }
            f.write_str(" is invalid")
        }
    }
}
