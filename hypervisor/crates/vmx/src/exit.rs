//! VM-exit decoding: basic exit reasons (SDM Vol. 3D, Appendix C) and the exit qualifications we
//! interpret (SDM Vol. 3C, 28.2.1).

/// Basic exit reasons (EXIT_REASON bits 15:0, SDM Vol. 3D, Appendix C), every one the SDM
/// defines up to 69, so that a log can name any exit.
pub mod reason {
    pub const EXCEPTION_OR_NMI: u16 = 0;
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    pub const TRIPLE_FAULT: u16 = 2;
    pub const INIT_SIGNAL: u16 = 3;
    pub const SIPI: u16 = 4;
    pub const IO_SMI: u16 = 5;
    pub const OTHER_SMI: u16 = 6;
    pub const INTERRUPT_WINDOW: u16 = 7;
    pub const NMI_WINDOW: u16 = 8;
    pub const TASK_SWITCH: u16 = 9;
    pub const CPUID: u16 = 10;
    pub const GETSEC: u16 = 11;
    pub const HLT: u16 = 12;
    pub const INVD: u16 = 13;
    pub const INVLPG: u16 = 14;
    pub const RDPMC: u16 = 15;
    pub const RDTSC: u16 = 16;
    pub const RSM: u16 = 17;
    pub const VMCALL: u16 = 18;
    pub const VMCLEAR: u16 = 19;
    pub const VMLAUNCH: u16 = 20;
    pub const VMPTRLD: u16 = 21;
    pub const VMPTRST: u16 = 22;
    pub const VMREAD: u16 = 23;
    pub const VMRESUME: u16 = 24;
    pub const VMWRITE: u16 = 25;
    pub const VMXOFF: u16 = 26;
    pub const VMXON: u16 = 27;
    pub const CR_ACCESS: u16 = 28;
    pub const DR_ACCESS: u16 = 29;
    pub const IO_INSTRUCTION: u16 = 30;
    pub const RDMSR: u16 = 31;
    pub const WRMSR: u16 = 32;
    pub const ENTRY_FAIL_GUEST_STATE: u16 = 33;
    pub const ENTRY_FAIL_MSR_LOADING: u16 = 34;
    pub const MWAIT: u16 = 36;
    pub const MONITOR_TRAP_FLAG: u16 = 37;
    pub const MONITOR: u16 = 39;
    pub const PAUSE: u16 = 40;
    pub const ENTRY_FAIL_MACHINE_CHECK: u16 = 41;
    pub const TPR_BELOW_THRESHOLD: u16 = 43;
    pub const APIC_ACCESS: u16 = 44;
    pub const VIRTUALIZED_EOI: u16 = 45;
    pub const GDTR_IDTR_ACCESS: u16 = 46;
    pub const LDTR_TR_ACCESS: u16 = 47;
    pub const EPT_VIOLATION: u16 = 48;
    pub const EPT_MISCONFIGURATION: u16 = 49;
    pub const INVEPT: u16 = 50;
    pub const RDTSCP: u16 = 51;
    pub const PREEMPTION_TIMER: u16 = 52;
    pub const INVVPID: u16 = 53;
    pub const WBINVD: u16 = 54;
    pub const XSETBV: u16 = 55;
    pub const APIC_WRITE: u16 = 56;
    pub const RDRAND: u16 = 57;
    pub const INVPCID: u16 = 58;
    pub const VMFUNC: u16 = 59;
    pub const ENCLS: u16 = 60;
    pub const RDSEED: u16 = 61;
    pub const PML_FULL: u16 = 62;
    pub const XSAVES: u16 = 63;
    pub const XRSTORS: u16 = 64;
    pub const SPP_EVENT: u16 = 66;
    pub const UMWAIT: u16 = 67;
    pub const TPAUSE: u16 = 68;
    pub const LOADIWKEY: u16 = 69;

    /// The SDM's name of a basic exit reason, for logs.
    pub const fn name(reason: u16) -> &'static str {
        match reason {
            EXCEPTION_OR_NMI => "exception or NMI",
            EXTERNAL_INTERRUPT => "external interrupt",
            TRIPLE_FAULT => "triple fault",
            INIT_SIGNAL => "INIT signal",
            SIPI => "start-up IPI",
            IO_SMI => "I/O SMI",
            OTHER_SMI => "other SMI",
            INTERRUPT_WINDOW => "interrupt window",
            NMI_WINDOW => "NMI window",
            TASK_SWITCH => "task switch",
            CPUID => "CPUID",
            GETSEC => "GETSEC",
            HLT => "HLT",
            INVD => "INVD",
            INVLPG => "INVLPG",
            RDPMC => "RDPMC",
            RDTSC => "RDTSC",
            RSM => "RSM",
            VMCALL => "VMCALL",
            VMCLEAR => "VMCLEAR",
            VMLAUNCH => "VMLAUNCH",
            VMPTRLD => "VMPTRLD",
            VMPTRST => "VMPTRST",
            VMREAD => "VMREAD",
            VMRESUME => "VMRESUME",
            VMWRITE => "VMWRITE",
            VMXOFF => "VMXOFF",
            VMXON => "VMXON",
            CR_ACCESS => "control-register access",
            DR_ACCESS => "MOV DR",
            IO_INSTRUCTION => "I/O instruction",
            RDMSR => "RDMSR",
            WRMSR => "WRMSR",
            ENTRY_FAIL_GUEST_STATE => "VM-entry failure: invalid guest state",
            ENTRY_FAIL_MSR_LOADING => "VM-entry failure: MSR loading",
            MWAIT => "MWAIT",
            MONITOR_TRAP_FLAG => "monitor trap flag",
            MONITOR => "MONITOR",
            PAUSE => "PAUSE",
            ENTRY_FAIL_MACHINE_CHECK => "VM-entry failure: machine-check event",
            TPR_BELOW_THRESHOLD => "TPR below threshold",
            APIC_ACCESS => "APIC access",
            VIRTUALIZED_EOI => "virtualized EOI",
            GDTR_IDTR_ACCESS => "GDTR/IDTR access",
            LDTR_TR_ACCESS => "LDTR/TR access",
            EPT_VIOLATION => "EPT violation",
            EPT_MISCONFIGURATION => "EPT misconfiguration",
            INVEPT => "INVEPT",
            RDTSCP => "RDTSCP",
            PREEMPTION_TIMER => "VMX-preemption timer expired",
            INVVPID => "INVVPID",
            WBINVD => "WBINVD",
            XSETBV => "XSETBV",
            APIC_WRITE => "APIC write",
            RDRAND => "RDRAND",
            INVPCID => "INVPCID",
            VMFUNC => "VMFUNC",
            ENCLS => "ENCLS",
            RDSEED => "RDSEED",
            PML_FULL => "page-modification log full",
            XSAVES => "XSAVES",
            XRSTORS => "XRSTORS",
            SPP_EVENT => "SPP-related event",
            UMWAIT => "UMWAIT",
            TPAUSE => "TPAUSE",
            LOADIWKEY => "LOADIWKEY",
            _ => "reserved exit reason",
        }
    }
}

/// EXIT_REASON bit 31: the VM entry failed (SDM 25.9.1, Table 25-18 "Format of Exit Reason").
pub const EXIT_REASON_ENTRY_FAILURE: u32 = 1 << 31;

/// The basic exit reason of an EXIT_REASON field value.
pub const fn basic_reason(exit_reason: u32) -> u16 {
    exit_reason as u16
}

/// What the guest tried to do when an EPT violation occurred (SDM 28.2.1, Table 28-7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptAccess {
    Read,
    Write,
    Fetch,
}

impl EptAccess {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Fetch => "fetch",
        }
    }
}

/// Decoded exit qualification of an EPT violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptViolation {
    pub access: EptAccess,
    /// The permissions the translation had (bits 5:3): 0 when the GPA is not mapped at all.
    pub present_perms: u8,
    /// Bit 7: the guest linear address field is valid.
    pub linear_valid: bool,
}

impl EptViolation {
    pub const fn from_qualification(q: u64) -> Self {
        // Bit 1 (write) wins over bit 0 (read): a read-modify-write reports both.
        let access = if q & 0b10 != 0 {
            EptAccess::Write
        } else if q & 0b100 != 0 {
            EptAccess::Fetch
        } else {
            EptAccess::Read
        };
        Self {
            access,
            present_perms: ((q >> 3) & 0b111) as u8,
            linear_valid: q & (1 << 7) != 0,
        }
    }
}

/// Decoded exit qualification of an I/O instruction (SDM 28.2.1, Table 28-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoExit {
    /// 1, 2 or 4 bytes.
    pub size: u8,
    pub is_in: bool,
    /// INS/OUTS: the string forms are not emulated.
    pub string: bool,
    pub rep: bool,
    pub port: u16,
}

impl IoExit {
    pub const fn from_qualification(q: u64) -> Self {
        Self {
            size: ((q & 0b111) + 1) as u8,
            is_in: q & (1 << 3) != 0,
            string: q & (1 << 4) != 0,
            rep: q & (1 << 5) != 0,
            port: (q >> 16) as u16,
        }
    }
}

/// Decoded exit qualification of a control-register access (SDM 28.2.1, Table 28-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrAccess {
    /// MOV to CR`cr` from general-purpose register `gpr` (0 RAX, 1 RCX, 2 RDX, 3 RBX, 4 RSP,
    /// 5 RBP, 6 RSI, 7 RDI, 8-15 R8-R15).
    MovTo {
        cr: u8,
        gpr: u8,
    },
    /// MOV from CR`cr` into `gpr`.
    MovFrom {
        cr: u8,
        gpr: u8,
    },
    Clts,
    /// LMSW with its 16-bit source operand.
    Lmsw {
        source: u16,
    },
}

impl CrAccess {
    pub const fn from_qualification(q: u64) -> Self {
        let cr = (q & 0xf) as u8;
        let gpr = ((q >> 8) & 0xf) as u8;
        match (q >> 4) & 0b11 {
            0 => Self::MovTo { cr, gpr },
            1 => Self::MovFrom { cr, gpr },
            2 => Self::Clts,
            _ => Self::Lmsw {
                source: (q >> 16) as u16,
            },
        }
    }
}

/// An event in the VM-exit interruption-information or IDT-vectoring information format
/// (SDM 25.9.2, Table 25-19), also the VM-entry interruption-information format (25.8.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interruption {
    pub vector: u8,
    /// 0 external interrupt, 2 NMI, 3 hardware exception, 4 software interrupt, 5 privileged
    /// software exception, 6 software exception.
    pub kind: u8,
    pub has_error_code: bool,
}

impl Interruption {
    pub const EXTERNAL_INTERRUPT: u8 = 0;
    pub const NMI: u8 = 2;
    pub const HARDWARE_EXCEPTION: u8 = 3;

    /// The event of an information field, if its valid bit (31) is set.
    pub const fn from_info(info: u32) -> Option<Self> {
        if info & (1 << 31) == 0 {
            return None;
        }
        Some(Self {
            vector: info as u8,
            kind: ((info >> 8) & 0b111) as u8,
            has_error_code: info & (1 << 11) != 0,
        })
    }

    /// The VM-entry interruption-information value that injects this event.
    pub const fn entry_info(self) -> u32 {
        (1 << 31)
            | ((self.has_error_code as u32) << 11)
            | ((self.kind as u32) << 8)
            | self.vector as u32
    }

    /// A hardware exception (#UD = 6, #GP = 13, ...); `error_code` as the vector defines.
    pub const fn exception(vector: u8, has_error_code: bool) -> Self {
        Self {
            vector,
            kind: Self::HARDWARE_EXCEPTION,
            has_error_code,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ept_violation_qualifications() {
        let w = EptViolation::from_qualification(0b0_0000_0011 | (1 << 7));
        assert_eq!(w.access, EptAccess::Write);
        assert_eq!(w.present_perms, 0);
        assert!(w.linear_valid);
        let f = EptViolation::from_qualification(0b0010_1100);
        assert_eq!(f.access, EptAccess::Fetch);
        assert_eq!(f.present_perms, 0b101);
        assert_eq!(EptViolation::from_qualification(1).access, EptAccess::Read);
    }

    #[test]
    fn io_qualifications() {
        // IN AL, DX with DX = 0x3fd.
        let q = (0x3fd << 16) | (1 << 3);
        assert_eq!(
            IoExit::from_qualification(q),
            IoExit {
                size: 1,
                is_in: true,
                string: false,
                rep: false,
                port: 0x3fd
            }
        );
        // OUT DX, EAX to 0xcf8.
        let q = (0xcf8 << 16) | 3;
        let io = IoExit::from_qualification(q);
        assert_eq!((io.size, io.is_in, io.port), (4, false, 0xcf8));
    }

    #[test]
    fn cr_access_qualifications() {
        // MOV CR8, R9 (SDM Table 28-3: CR in 3:0, type in 5:4, GPR in 11:8).
        assert_eq!(
            CrAccess::from_qualification(8 | (9 << 8)),
            CrAccess::MovTo { cr: 8, gpr: 9 }
        );
        // MOV RAX, CR8.
        assert_eq!(
            CrAccess::from_qualification(8 | (1 << 4)),
            CrAccess::MovFrom { cr: 8, gpr: 0 }
        );
        assert_eq!(CrAccess::from_qualification(2 << 4), CrAccess::Clts);
        assert_eq!(
            CrAccess::from_qualification((3 << 4) | (0xfff1 << 16)),
            CrAccess::Lmsw { source: 0xfff1 }
        );
    }

    #[test]
    fn interruption_information_round_trips() {
        assert_eq!(Interruption::from_info(0x0000_0b0d), None);
        let gp = Interruption::exception(13, true);
        assert_eq!(gp.entry_info(), 0x8000_0b0d);
        assert_eq!(Interruption::from_info(gp.entry_info()), Some(gp));
        let ud = Interruption::exception(6, false);
        assert_eq!(ud.entry_info(), 0x8000_0306);
        // An NMI as the exit interruption information reports it.
        let nmi = Interruption::from_info(0x8000_0202).unwrap();
        assert_eq!((nmi.vector, nmi.kind), (2, Interruption::NMI));
        assert_eq!(reason::name(reason::XSETBV), "XSETBV");
        assert_eq!(reason::name(65), "reserved exit reason");
    }

    #[test]
    fn entry_failure_bit() {
        let r = EXIT_REASON_ENTRY_FAILURE | reason::ENTRY_FAIL_GUEST_STATE as u32;
        assert_eq!(basic_reason(r), reason::ENTRY_FAIL_GUEST_STATE);
    }
}
