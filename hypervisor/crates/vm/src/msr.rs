//! The MSRs a guest may read and write, the checks a CPU applies to a WRMSR of each, and where
//! each guest value lives so that no VM ever sees another's (docs/isolation.md).
//!
//! Every RDMSR and WRMSR exits (the MSR bitmap is all ones). An MSR not listed in [`Msr`] raises
//! #GP(0), like an MSR the CPU does not implement. A listed MSR is kept per VM in one of three
//! homes ([`Home`]): a VMCS guest-state field, which VM entry and exit switch by themselves; the
//! hardware MSR itself, which the hypervisor never uses, so it holds the guest's value while the
//! VM is on the CPU and is saved and reloaded when another VM is switched in ([`SwitchedMsrs`]);
//! a value kept in software per VM ([`EmulatedMsrs`]), for MSRs the hardware's copy of which
//! belongs to the host (IA32_MISC_ENABLE, the machine-check globals); or a value computed on
//! every read. This module decides; the kernel moves the values.

/// The MSRs guests may access, by architectural name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Msr {
    /// IA32_TSC (0x10): the VM's own TSC (hv_vm::clock plus what the guest wrote); a write
    /// sets it, through the VMCS TSC offset or, with RDTSC exiting, in software. Not stored
    /// here: the exit policy computes it.
    Tsc,
    SysenterCs,
    SysenterEsp,
    SysenterEip,
    DebugCtl,
    Pat,
    /// IA32_XSS: no supervisor state component is offered, so only 0 may be written.
    Xss,
    Efer,
    Star,
    Lstar,
    Cstar,
    Fmask,
    FsBase,
    GsBase,
    KernelGsBase,
    TscAux,
    /// IA32_MISC_ENABLE (0x1a0): [`MISC_ENABLE_WRITABLE`] bits are the guest's, the
    /// "unavailable" bits read 1, the rest are reserved (#GP).
    MiscEnable,
    /// IA32_MCG_CAP (0x179): machine-check architecture with no error-reporting banks and no
    /// IA32_MCG_CTL, read-only.
    McgCap,
    /// IA32_MCG_STATUS (0x17a): bits 3:0 (RIPV, EIPV, MCIP, LMCE_S); no machine check ever
    /// arrives, so only what the guest wrote.
    McgStatus,
    /// IA32_BIOS_SIGN_ID (0x8b): the microcode revision in bits 63:32 ([`MICROCODE_REVISION`]),
    /// which a write of 0 and a CPUID make the CPU load there (SDM Vol. 3A 10.11.7.1). There is
    /// no microcode to update: writes are taken and change nothing, as on KVM.
    BiosSignId,
}

/// The microcode revision guests read in IA32_BIOS_SIGN_ID[63:32] (KVM's default).
pub const MICROCODE_REVISION: u32 = 1;

/// Where a guest's value of an MSR is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Home {
    /// A VMCS guest-state field (FS/GS base, SYSENTER, DEBUGCTL; EFER and PAT when the CPU has
    /// their load/save controls, else the kernel's VMCS MSR-load lists).
    Vmcs,
    /// The hardware MSR, switched by the hypervisor when another VM comes on the CPU; the index
    /// into [`SwitchedMsrs`].
    Switched(usize),
    /// Not stored: computed on read (the TSC) or constant (XSS, MCG_CAP).
    Computed,
    /// In software, per VM ([`EmulatedMsrs`]).
    Emulated,
}

/// IA32_MISC_ENABLE (SDM Vol. 4, Table 2-2): fast strings (0), automatic thermal control (3),
/// Enhanced SpeedStep (16), MONITOR FSM (18), limit CPUID maxval (22), xTPR disable (23) and XD
/// disable (34) are the guest's to set. They are stored and read back; limit-CPUID-maxval
/// lowers CPUID.0:EAX to 2 as the SDM says; the others change nothing else (the features they
/// govern are either not offered or not the guest's to switch off).
pub const MISC_ENABLE_WRITABLE: u64 =
    (1 << 0) | (1 << 3) | (1 << 16) | (1 << 18) | (1 << 22) | (1 << 23) | (1 << 34);
/// Read-only IA32_MISC_ENABLE bits, always 1: branch-trace storage (11) and PEBS (12)
/// unavailable. Bit 7 (performance monitoring available) reads 0: no PMU is offered.
pub const MISC_ENABLE_READ_ONLY: u64 = (1 << 11) | (1 << 12);
/// IA32_MISC_ENABLE bit 22: CPUID.0:EAX reports at most 2.
pub const MISC_ENABLE_LIMIT_CPUID: u64 = 1 << 22;
/// IA32_MCG_STATUS bits a guest may write.
const MCG_STATUS_WRITABLE: u64 = 0xf;

/// The MSRs of [`Home::Emulated`], as a VM holds them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmulatedMsrs {
    pub misc_enable: u64,
    pub mcg_status: u64,
}

impl Default for EmulatedMsrs {
    /// At reset: fast strings on (as firmware leaves it), the read-only bits, no machine check.
    fn default() -> Self {
        EmulatedMsrs {
            misc_enable: 1 | MISC_ENABLE_READ_ONLY,
            mcg_status: 0,
        }
    }
}

impl EmulatedMsrs {
    pub fn read(&self, m: Msr) -> u64 {
        match m {
            Msr::MiscEnable => self.misc_enable,
            Msr::McgStatus => self.mcg_status,
            _ => 0,
        }
    }

    /// Stores a value that passed [`Msr::check_write`].
    pub fn write(&mut self, m: Msr, value: u64) {
        match m {
            Msr::MiscEnable => self.misc_enable = value,
            Msr::McgStatus => self.mcg_status = value,
            _ => {}
        }
    }
}

/// Why a WRMSR faults: the CPU raises #GP(0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GeneralProtection;

/// IA32_EFER bits: SYSCALL enable, long mode enable/active, no-execute enable (SDM 2.2.1).
pub mod efer {
    pub const SCE: u64 = 1 << 0;
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
    pub const NXE: u64 = 1 << 11;
}

/// IA32_PAT at reset (SDM 13.12.4): WB, WT, UC-, UC, twice.
pub const PAT_RESET: u64 = 0x0007_0406_0007_0406;

/// IA32_DEBUGCTL bits a guest may set: BTF (single-step on branches, bit 1). LBR, BTS and the
/// rest would record into or freeze the host's tracing resources, which guests cannot read
/// back, so the CPU the guest sees behaves as if it had none of them.
pub const DEBUGCTL_GUEST_WRITABLE: u64 = 1 << 1;

/// The MSRs of [`Home::Switched`], in [`SwitchedMsrs`] order, with their indices.
pub const SWITCHED: [Msr; 6] = [
    Msr::KernelGsBase,
    Msr::Star,
    Msr::Lstar,
    Msr::Cstar,
    Msr::Fmask,
    Msr::TscAux,
];

impl Msr {
    /// The MSR with architectural index `index`, if guests may access it.
    pub const fn from_index(index: u32) -> Option<Self> {
        Some(match index {
            0x10 => Self::Tsc,
            0x174 => Self::SysenterCs,
            0x175 => Self::SysenterEsp,
            0x176 => Self::SysenterEip,
            0x1d9 => Self::DebugCtl,
            0x277 => Self::Pat,
            0xda0 => Self::Xss,
            0xc000_0080 => Self::Efer,
            0xc000_0081 => Self::Star,
            0xc000_0082 => Self::Lstar,
            0xc000_0083 => Self::Cstar,
            0xc000_0084 => Self::Fmask,
            0xc000_0100 => Self::FsBase,
            0xc000_0101 => Self::GsBase,
            0xc000_0102 => Self::KernelGsBase,
            0xc000_0103 => Self::TscAux,
            0x1a0 => Self::MiscEnable,
            0x179 => Self::McgCap,
            0x17a => Self::McgStatus,
            0x8b => Self::BiosSignId,
            _ => return None,
        })
    }

    /// The architectural index (what RDMSR/WRMSR take in ECX).
    pub const fn index(self) -> u32 {
        match self {
            Self::Tsc => 0x10,
            Self::SysenterCs => 0x174,
            Self::SysenterEsp => 0x175,
            Self::SysenterEip => 0x176,
            Self::DebugCtl => 0x1d9,
            Self::Pat => 0x277,
            Self::Xss => 0xda0,
            Self::Efer => 0xc000_0080,
            Self::Star => 0xc000_0081,
            Self::Lstar => 0xc000_0082,
            Self::Cstar => 0xc000_0083,
            Self::Fmask => 0xc000_0084,
            Self::FsBase => 0xc000_0100,
            Self::GsBase => 0xc000_0101,
            Self::KernelGsBase => 0xc000_0102,
            Self::TscAux => 0xc000_0103,
            Self::MiscEnable => 0x1a0,
            Self::McgCap => 0x179,
            Self::McgStatus => 0x17a,
            Self::BiosSignId => 0x8b,
        }
    }

    pub const fn home(self) -> Home {
        match self {
            Self::Tsc | Self::Xss | Self::McgCap | Self::BiosSignId => Home::Computed,
            Self::MiscEnable | Self::McgStatus => Home::Emulated,
            Self::KernelGsBase => Home::Switched(0),
            Self::Star => Home::Switched(1),
            Self::Lstar => Home::Switched(2),
            Self::Cstar => Home::Switched(3),
            Self::Fmask => Home::Switched(4),
            Self::TscAux => Home::Switched(5),
            _ => Home::Vmcs,
        }
    }

    /// Checks a WRMSR of `value` as the CPU would and returns the value to store. `current` is
    /// the MSR's present value and `paging` the guest's CR0.PG (EFER needs both: LME cannot
    /// change while paging is on, and LMA is read-only, SDM 9.8.5).
    pub fn check_write(
        self,
        value: u64,
        current: u64,
        paging: bool,
    ) -> Result<u64, GeneralProtection> {
        let ok = match self {
            // Any value: the TSC is a free-running 64-bit counter.
            Self::Tsc => true,
            // Addresses the CPU loads into RIP/RSP or a segment base must be canonical.
            Self::SysenterEsp
            | Self::SysenterEip
            | Self::Lstar
            | Self::Cstar
            | Self::FsBase
            | Self::GsBase
            | Self::KernelGsBase => is_canonical(value),
            // The VMCS field is 32 bits wide; the CPU ignores the upper half.
            Self::SysenterCs => return Ok(value & 0xffff_ffff),
            Self::DebugCtl => value & !DEBUGCTL_GUEST_WRITABLE == 0,
            Self::Pat => pat_valid(value),
            Self::Xss => value == 0,
            Self::Efer => {
                let reserved = !(efer::SCE | efer::LME | efer::LMA | efer::NXE);
                // LME changes only with paging off (cpu_mode.rs then activates IA-32e mode);
                // LMA is the CPU's, read-only.
                if value & reserved != 0 || (paging && (value ^ current) & efer::LME != 0) {
                    false
                } else {
                    return Ok((value & !efer::LMA) | (current & efer::LMA));
                }
            }
            Self::Star | Self::BiosSignId => true,
            // The read-only bits keep their value whatever is written (SDM Vol. 4, Table 2-2).
            Self::MiscEnable => {
                if value & !(MISC_ENABLE_WRITABLE | MISC_ENABLE_READ_ONLY) != 0 {
                    false
                } else {
                    return Ok((value & MISC_ENABLE_WRITABLE) | MISC_ENABLE_READ_ONLY);
                }
            }
            Self::McgCap => false,
            Self::McgStatus => value & !MCG_STATUS_WRITABLE == 0,
            // Bits 63:32 of IA32_FMASK and IA32_TSC_AUX are reserved.
            Self::Fmask | Self::TscAux => value >> 32 == 0,
        };
        if ok {
            Ok(value)
        } else {
            Err(GeneralProtection)
        }
    }
}

/// Whether `addr` is canonical for 48-bit linear addresses (bits 63:47 all equal).
pub const fn is_canonical(addr: u64) -> bool {
    let top = addr >> 47;
    top == 0 || top == (1 << 17) - 1
}

/// Whether every entry of a PAT value is a defined memory type (0 UC, 1 WC, 4 WT, 5 WP, 6 WB,
/// 7 UC-) with its reserved bits clear (SDM 13.12.2).
pub const fn pat_valid(value: u64) -> bool {
    let mut i = 0;
    while i < 8 {
        let entry = (value >> (i * 8)) & 0xff;
        if !matches!(entry, 0 | 1 | 4 | 5 | 6 | 7) {
            return false;
        }
        i += 1;
    }
    true
}

/// A VM's values of the [`Home::Switched`] MSRs while it is off the CPU (all zero at reset,
/// SDM Table 10-1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwitchedMsrs {
    pub values: [u64; SWITCHED.len()],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trips_and_unknown_msrs_are_refused() {
        for i in [
            0x10u32,
            0x174,
            0x175,
            0x176,
            0x1d9,
            0x277,
            0xda0,
            0xc000_0080,
            0xc000_0081,
            0xc000_0082,
            0xc000_0083,
            0xc000_0084,
            0xc000_0100,
            0xc000_0101,
            0xc000_0102,
            0xc000_0103,
        ] {
            assert_eq!(Msr::from_index(i).unwrap().index(), i);
        }
        // MTRRs, the APIC base, SPEC_CTRL, performance counters, LBRs, MCA, AMD ranges.
        for i in [
            0x1b,
            0x48,
            0xc1,
            0x186,
            0x200,
            0x2ff,
            0x400,
            0x680,
            0xc001_0000,
            0x4000_0000,
        ] {
            assert_eq!(Msr::from_index(i), None, "{i:#x}");
        }
    }

    #[test]
    fn switched_msrs_are_exactly_those_without_a_vmcs_field() {
        for (n, m) in SWITCHED.iter().enumerate() {
            assert_eq!(m.home(), Home::Switched(n));
        }
        assert_eq!(Msr::Tsc.home(), Home::Computed);
        assert_eq!(Msr::FsBase.home(), Home::Vmcs);
        assert_eq!(Msr::Pat.home(), Home::Vmcs);
    }

    #[test]
    fn non_canonical_addresses_fault() {
        for m in [
            Msr::FsBase,
            Msr::GsBase,
            Msr::KernelGsBase,
            Msr::Lstar,
            Msr::Cstar,
        ] {
            assert_eq!(
                m.check_write(0xffff_8000_0000_0000, 0, true),
                Ok(0xffff_8000_0000_0000)
            );
            assert_eq!(
                m.check_write(0x7fff_ffff_ffff, 0, true),
                Ok(0x7fff_ffff_ffff)
            );
            assert_eq!(
                m.check_write(0x8000_0000_0000, 0, true),
                Err(GeneralProtection),
                "{m:?}"
            );
            assert_eq!(
                m.check_write(0x1234_0000_0000_0000, 0, true),
                Err(GeneralProtection)
            );
        }
    }

    #[test]
    fn reserved_bits_fault() {
        assert_eq!(
            Msr::TscAux.check_write(0xffff_ffff, 0, true),
            Ok(0xffff_ffff)
        );
        assert_eq!(
            Msr::TscAux.check_write(1 << 32, 0, true),
            Err(GeneralProtection)
        );
        assert_eq!(
            Msr::Fmask.check_write(1 << 40, 0, true),
            Err(GeneralProtection)
        );
        assert_eq!(Msr::Star.check_write(u64::MAX, 0, true), Ok(u64::MAX));
        assert_eq!(Msr::Xss.check_write(0, 0, true), Ok(0));
        assert_eq!(
            Msr::Xss.check_write(1 << 8, 0, true),
            Err(GeneralProtection)
        );
        assert_eq!(Msr::Tsc.check_write(5, 0, true), Ok(5));
        assert_eq!(Msr::Tsc.check_write(u64::MAX, 0, true), Ok(u64::MAX));
        assert_eq!(Msr::DebugCtl.check_write(2, 0, true), Ok(2));
        assert_eq!(
            Msr::DebugCtl.check_write(1, 0, true),
            Err(GeneralProtection)
        );
        assert_eq!(
            Msr::SysenterCs.check_write(0x1_0000_0010, 0, true),
            Ok(0x10)
        );
    }

    #[test]
    fn pat_entries_must_be_memory_types() {
        assert_eq!(Msr::Pat.check_write(PAT_RESET, 0, true), Ok(PAT_RESET));
        assert_eq!(
            Msr::Pat.check_write(0x0101_0101_0505_0404, 0, true),
            Ok(0x0101_0101_0505_0404)
        );
        for bad in [2u64, 3, 8, 0x16] {
            assert_eq!(
                Msr::Pat.check_write(bad << 24, 0, true),
                Err(GeneralProtection),
                "{bad}"
            );
        }
    }

    #[test]
    fn efer_keeps_long_mode_and_lma() {
        let long = efer::LME | efer::LMA;
        // SCE and NXE may change; LMA written as 0 is ignored.
        assert_eq!(
            Msr::Efer.check_write(efer::LME | efer::SCE | efer::NXE, long, true),
            Ok(long | efer::SCE | efer::NXE)
        );
        // Clearing LME under paging, or any reserved bit, faults.
        assert_eq!(
            Msr::Efer.check_write(efer::LMA, long, true),
            Err(GeneralProtection)
        );
        assert_eq!(
            Msr::Efer.check_write(long | (1 << 12), long, true),
            Err(GeneralProtection)
        );
        assert_eq!(
            Msr::Efer.check_write(long | 2, long, true),
            Err(GeneralProtection)
        );
    }

    #[test]
    fn efer_lme_changes_with_paging_off() {
        // A 32-bit kernel on its way to long mode sets LME before paging; LMA stays the CPU's.
        assert_eq!(
            Msr::Efer.check_write(efer::LME | efer::LMA, 0, false),
            Ok(efer::LME)
        );
        assert_eq!(Msr::Efer.check_write(0, efer::LME, false), Ok(0));
        assert_eq!(
            Msr::Efer.check_write(efer::LME, 0, true),
            Err(GeneralProtection)
        );
    }

    #[test]
    fn misc_enable_and_machine_check_globals() {
        let reset = EmulatedMsrs::default();
        assert_eq!(reset.read(Msr::MiscEnable), 0x1801);
        // kvm-unit-tests' msr test: 0x400c50809 with bits 7, 11 and 12 kept.
        assert_eq!(
            Msr::MiscEnable.check_write(0x4_00c5_0809 & !0x1880 | 0x1800, 0, true),
            Ok(0x4_00c5_1809)
        );
        // The read-only bits cannot be cleared; reserved bits fault.
        assert_eq!(Msr::MiscEnable.check_write(0, 0, true), Ok(0x1800));
        assert_eq!(
            Msr::MiscEnable.check_write(1 << 7, 0, true),
            Err(GeneralProtection)
        );
        assert_eq!(
            Msr::MiscEnable.check_write(1 << 40, 0, true),
            Err(GeneralProtection)
        );
        assert_eq!(Msr::McgCap.check_write(0, 0, true), Err(GeneralProtection));
        assert_eq!(Msr::McgStatus.check_write(0b101, 0, true), Ok(0b101));
        assert_eq!(
            Msr::McgStatus.check_write(1 << 4, 0, true),
            Err(GeneralProtection)
        );
        let mut m = reset;
        m.write(Msr::McgStatus, 4);
        assert_eq!(m.read(Msr::McgStatus), 4);
        assert_eq!(Msr::from_index(0x1a0), Some(Msr::MiscEnable));
        assert_eq!(Msr::McgCap.home(), Home::Computed);
    }
}
