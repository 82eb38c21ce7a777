//! The contract between the hypervisor and its guests.
//!
//! This crate owns three things and nothing else:
//! - the hypercall ABI ([`Hypercall`] numbers, the register convention, [`HypercallError`] codes
//!   and the `#[repr(C)]` structures the hypervisor writes into guest memory);
//! - the boot protocol of the 64-bit entry ([`boot`]): where the hypervisor puts the page tables,
//!   the boot information and the stack, and what the registers hold at the first instruction;
//! - the guest-side library ([`guest`]) that issues the hypercalls with `VMCALL`.
//!
//! It must not depend on anything of the hypervisor: guests link it, and the hypervisor links it,
//! and it is the only thing they share. docs/hypercalls.md is the prose version of this file.
//!
//! # Register convention
//! `VMCALL` with `RAX` = call number, arguments in `RDI`, `RSI`, `RDX`, `R10` (the order of the
//! Linux system-call ABI). The result comes back in `RAX`: a value in `0..=i64::MAX` is success,
//! a negative value is `-(HypercallError as i64)`. No other register is changed.
//!
//! Every address a guest passes is a **guest-physical** address (the guests we load run on an
//! identity map, so for them it is also the virtual address). The hypervisor checks every
//! address and length against the VM's own memory before it touches a byte.
#![no_std]

pub mod boot;
pub mod guest;

/// Signature returned by CPUID leaf 0x4000_0000 in EBX, ECX, EDX (12 bytes).
pub const CPUID_SIGNATURE: &[u8; 12] = b"MuxVisor\0\0\0\0";
/// The hypervisor CPUID leaf range: leaf 0x4000_0000 reports the highest leaf in EAX.
pub const CPUID_LEAF_BASE: u32 = 0x4000_0000;
/// Highest hypervisor leaf answered (EAX of leaf 0x4000_0000).
pub const CPUID_LEAF_MAX: u32 = 0x4000_0010;
/// Leaf 0x4000_0001 EAX: the hypercall ABI version below. Version 2 added the idle detector's
/// fields to [`VmStats`] (104 bytes before, 144 now).
pub const ABI_VERSION: u32 = 2;

/// Longest console write accepted in one call, in bytes.
pub const CONSOLE_WRITE_MAX: u64 = 4096;
/// Longest report key accepted, in bytes.
pub const REPORT_KEY_MAX: u64 = 64;

/// Hypercall numbers (`RAX` at `VMCALL`).
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hypercall {
    /// `console_write(gpa, len) -> len`: write `len` bytes (at most [`CONSOLE_WRITE_MAX`]) at
    /// `gpa` to this VM's console.
    ConsoleWrite = 1,
    /// `exit(code) -> !`: stop this VM with an exit code; the call does not return.
    Exit = 2,
    /// `vm_info(gpa, len) -> size`: write a [`VmInfo`] at `gpa`; `len` must be at least its size,
    /// and the whole declared buffer `[gpa, gpa + len)` must lie in the VM's memory.
    VmInfo = 3,
    /// `yield() -> 0`: give the rest of this quantum to the other VMs.
    Yield = 4,
    /// `report(key_gpa, key_len, value) -> 0`: log `key=value` for tests and benchmarks; the key
    /// is at most [`REPORT_KEY_MAX`] bytes of `[A-Za-z0-9_.-]` and not empty. The address range is
    /// checked first: an empty key at a bad address is `BadAddress`, at a good one `BadArgument`.
    Report = 5,
    /// `vm_stats(gpa, len) -> size`: write this VM's [`VmStats`] at `gpa`; checked as `vm_info`.
    VmStats = 6,
    /// `nop() -> 0`: does nothing; measures the bare hypercall round trip.
    Nop = 7,
}

impl Hypercall {
    /// Decodes a call number; `None` for numbers this ABI does not define.
    pub const fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            1 => Self::ConsoleWrite,
            2 => Self::Exit,
            3 => Self::VmInfo,
            4 => Self::Yield,
            5 => Self::Report,
            6 => Self::VmStats,
            7 => Self::Nop,
            _ => return None,
        })
    }
}

/// Why a hypercall failed. Returned as `-(code)` in `RAX`.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallError {
    /// The call number is not defined.
    UnknownCall = 1,
    /// An address range is not entirely inside this VM's memory (or wraps around).
    BadAddress = 2,
    /// A length is over the call's limit, or a buffer is too small for the result.
    BadLength = 3,
    /// An argument is malformed (for example a report key that is not of `[A-Za-z0-9_.-]`).
    BadArgument = 4,
}

impl HypercallError {
    /// The value placed in `RAX`.
    pub const fn to_rax(self) -> u64 {
        (self as u64).wrapping_neg()
    }

    /// Decodes a `RAX` value returned by a hypercall.
    pub const fn from_rax(rax: u64) -> Result<u64, Self> {
        if rax <= i64::MAX as u64 {
            return Ok(rax);
        }
        Err(match rax.wrapping_neg() {
            1 => Self::UnknownCall,
            2 => Self::BadAddress,
            3 => Self::BadLength,
            _ => Self::BadArgument,
        })
    }
}

/// Magic value in [`VmInfo::magic`].
pub const VM_INFO_MAGIC: u32 = 0x564d_494e; // "VMIN"

/// Written by [`Hypercall::VmInfo`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VmInfo {
    pub magic: u32,
    /// Index of the VM in the manifest's order of running VMs, from 0.
    pub vm_id: u32,
    pub vcpus: u32,
    pub name_len: u32,
    pub memory_bytes: u64,
    pub quantum_us: u64,
    /// The VM's name, UTF-8, `name_len` bytes used.
    pub name: [u8; 32],
    /// The VM's time-dilation factor in thousandths (1000: its clocks run at the host's rate).
    pub time_dilation_milli: u32,
    /// The VM's CPU weight from the manifest (`cpu_share`, default 1).
    pub cpu_share: u32,
}

/// Per-VM exit counters, in this order, in [`VmStats::exits`].
#[repr(usize)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    Cpuid = 0,
    MsrRead,
    MsrWrite,
    Io,
    Hlt,
    Vmcall,
    EptViolation,
    PreemptionTimer,
    ExternalInterrupt,
    Other,
}

/// Number of [`ExitKind`]s.
pub const EXIT_KINDS: usize = 10;

impl ExitKind {
    /// All kinds, in counter order.
    pub const ALL: [ExitKind; EXIT_KINDS] = [
        Self::Cpuid,
        Self::MsrRead,
        Self::MsrWrite,
        Self::Io,
        Self::Hlt,
        Self::Vmcall,
        Self::EptViolation,
        Self::PreemptionTimer,
        Self::ExternalInterrupt,
        Self::Other,
    ];

    /// Short name used in logs and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Cpuid => "cpuid",
            Self::MsrRead => "rdmsr",
            Self::MsrWrite => "wrmsr",
            Self::Io => "io",
            Self::Hlt => "hlt",
            Self::Vmcall => "vmcall",
            Self::EptViolation => "ept",
            Self::PreemptionTimer => "preempt",
            Self::ExternalInterrupt => "extint",
            Self::Other => "other",
        }
    }
}

/// Written by [`Hypercall::VmStats`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VmStats {
    /// Exits by [`ExitKind`].
    pub exits: [u64; EXIT_KINDS],
    /// Time this VM has been on the CPU (guest time plus exit handling), in TSC ticks.
    pub cpu_tsc: u64,
    /// The same in microseconds, from the hypervisor's calibrated TSC frequency.
    pub cpu_us: u64,
    /// Number of times the VM was scheduled in.
    pub runs: u64,
    /// The idle detector's state for this VM: [`IDLE_STATE_ACTIVE`], [`IDLE_STATE_IDLE`] or
    /// [`IDLE_STATE_DORMANT`].
    pub idle_state: u64,
    /// Times the idle detector changed this VM's state.
    pub idle_changes: u64,
    /// Microseconds of host time spent active, idle and dormant since the VMs started.
    pub active_us: u64,
    pub idle_us: u64,
    pub dormant_us: u64,
}

/// [`VmStats::idle_state`] values.
pub const IDLE_STATE_ACTIVE: u64 = 0;
pub const IDLE_STATE_IDLE: u64 = 1;
pub const IDLE_STATE_DORMANT: u64 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_round_trip_through_rax() {
        for e in [
            HypercallError::UnknownCall,
            HypercallError::BadAddress,
            HypercallError::BadLength,
            HypercallError::BadArgument,
        ] {
            assert_eq!(HypercallError::from_rax(e.to_rax()), Err(e));
        }
        assert_eq!(HypercallError::from_rax(0), Ok(0));
        assert_eq!(HypercallError::from_rax(4096), Ok(4096));
    }

    #[test]
    fn call_numbers_round_trip() {
        for raw in 0..16 {
            if let Some(c) = Hypercall::from_raw(raw) {
                assert_eq!(c as u64, raw);
            }
        }
        assert_eq!(Hypercall::from_raw(0), None);
        assert_eq!(Hypercall::from_raw(u64::MAX), None);
    }

    #[test]
    fn exit_kinds_are_in_counter_order() {
        for (i, k) in ExitKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }
}
