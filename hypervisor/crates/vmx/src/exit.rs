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
    pub const SOFTWARE_INTERRUPT: u8 = 4;

    /// An external interrupt with `vector`.
    pub const fn external(vector: u8) -> Self {
        Self {
            vector,
            kind: Self::EXTERNAL_INTERRUPT,
            has_error_code: false,
        }
    }

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

/// The address size of a string I/O instruction (VM-exit instruction information bits 9:7,
/// SDM 28.2.5, Table 28-8), as a mask of the address bits that RSI/RDI/RCX use.
pub const fn address_size_mask(instruction_info: u64) -> u64 {
    match (instruction_info >> 7) & 0b111 {
        0 => 0xffff,
        1 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

/// An event whose delivery the VM exit interrupted (IDT-vectoring information, SDM 28.2.4),
/// with what re-injecting it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterruptedEvent {
    pub event: Interruption,
    /// Its error code, when `event.has_error_code`.
    pub error_code: u32,
    /// The length of the instruction that raised it: software interrupts and exceptions are
    /// re-injected with it (SDM 27.6.1.1).
    pub instruction_len: u32,
}

/// A VM exit, decoded: the reason with its qualification and the other exit-information fields
/// it needs, so that no handler looks at a raw reason or a raw qualification (SDM 28.2).
///
/// Only what each reason needs is read ([`VmExit::decode`] takes a field reader): every
/// VMREAD costs the exit path, and the CPUID round trip is its benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// VM entry failed after loading guest state (EXIT_REASON bit 31, SDM 27.8).
    EntryFailure {
        reason: u16,
        qualification: u64,
    },
    /// An exception or NMI the exception bitmap (or the NMI-exiting control) intercepts.
    ExceptionOrNmi(Interruption),
    /// A host interrupt arrived; `vector` when the exit acknowledged it.
    ExternalInterrupt {
        vector: Option<u8>,
    },
    TripleFault,
    /// The guest can take an interrupt now (interrupt-window exiting, SDM 26.7.5).
    InterruptWindow,
    NmiWindow,
    Cpuid,
    Hlt,
    Invd,
    Rdpmc,
    Rdtsc,
    Rdtscp,
    Vmcall,
    Xsetbv,
    Wbinvd,
    Pause,
    Rdmsr,
    Wrmsr,
    CrAccess(CrAccess),
    Io(IoExit),
    /// INS/OUTS: the qualification, the guest-linear address of the memory operand and the
    /// address-size mask of RSI/RDI/RCX (SDM 28.2.5).
    StringIo {
        io: IoExit,
        linear: u64,
        address_mask: u64,
    },
    EptViolation {
        gpa: u64,
        violation: EptViolation,
    },
    EptMisconfiguration {
        gpa: u64,
    },
    PreemptionTimer,
    /// An instruction of a feature the guest does not have (VMX, SMX, MONITOR/MWAIT, SGX,
    /// WAITPKG, key locker, INVPCID, VMFUNC, RSM): `reason` says which.
    Unavailable {
        reason: u16,
    },
    /// A host event: SMI, INIT or SIPI.
    HostEvent {
        reason: u16,
    },
    /// Any other reason: one the VMCS controls rule out.
    Other {
        reason: u16,
    },
}

impl VmExit {
    /// Decodes the exit whose EXIT_REASON field is `raw_reason`, reading the other fields it
    /// needs through `read` (a VMREAD of the current VMCS on hardware, a table in tests).
    /// Inlined, so that the exit handler's dispatch sees the reason itself.
    #[inline(always)]
    pub fn decode(raw_reason: u32, mut read: impl FnMut(u32) -> u64) -> Self {
        use crate::fields as f;
        let basic = basic_reason(raw_reason);
        if raw_reason & EXIT_REASON_ENTRY_FAILURE != 0 {
            return Self::EntryFailure {
                reason: basic,
                qualification: read(f::EXIT_QUALIFICATION),
            };
        }
        match basic {
            reason::CPUID => Self::Cpuid,
            reason::VMCALL => Self::Vmcall,
            reason::IO_INSTRUCTION => {
                let io = IoExit::from_qualification(read(f::EXIT_QUALIFICATION));
                if io.string {
                    Self::StringIo {
                        io,
                        linear: read(f::GUEST_LINEAR_ADDRESS),
                        address_mask: address_size_mask(read(f::EXIT_INSTRUCTION_INFO)),
                    }
                } else {
                    Self::Io(io)
                }
            }
            reason::RDMSR => Self::Rdmsr,
            reason::WRMSR => Self::Wrmsr,
            reason::HLT => Self::Hlt,
            reason::PREEMPTION_TIMER => Self::PreemptionTimer,
            reason::INTERRUPT_WINDOW => Self::InterruptWindow,
            reason::NMI_WINDOW => Self::NmiWindow,
            reason::EXTERNAL_INTERRUPT => Self::ExternalInterrupt {
                vector: Interruption::from_info(read(f::EXIT_INTERRUPTION_INFO) as u32)
                    .map(|e| e.vector),
            },
            reason::EXCEPTION_OR_NMI => {
                match Interruption::from_info(read(f::EXIT_INTERRUPTION_INFO) as u32) {
                    Some(event) => Self::ExceptionOrNmi(event),
                    None => Self::Other { reason: basic },
                }
            }
            reason::EPT_VIOLATION => Self::EptViolation {
                gpa: read(f::GUEST_PHYSICAL_ADDRESS),
                violation: EptViolation::from_qualification(read(f::EXIT_QUALIFICATION)),
            },
            reason::EPT_MISCONFIGURATION => Self::EptMisconfiguration {
                gpa: read(f::GUEST_PHYSICAL_ADDRESS),
            },
            reason::CR_ACCESS => {
                Self::CrAccess(CrAccess::from_qualification(read(f::EXIT_QUALIFICATION)))
            }
            reason::TRIPLE_FAULT => Self::TripleFault,
            reason::XSETBV => Self::Xsetbv,
            reason::INVD => Self::Invd,
            reason::WBINVD => Self::Wbinvd,
            reason::RDPMC => Self::Rdpmc,
            reason::RDTSC => Self::Rdtsc,
            reason::RDTSCP => Self::Rdtscp,
            reason::PAUSE => Self::Pause,
            reason::VMCLEAR
            | reason::VMLAUNCH
            | reason::VMPTRLD
            | reason::VMPTRST
            | reason::VMREAD
            | reason::VMRESUME
            | reason::VMWRITE
            | reason::VMXOFF
            | reason::VMXON
            | reason::INVEPT
            | reason::INVVPID
            | reason::VMFUNC
            | reason::GETSEC
            | reason::MONITOR
            | reason::MWAIT
            | reason::RSM
            | reason::ENCLS
            | reason::UMWAIT
            | reason::TPAUSE
            | reason::LOADIWKEY
            | reason::INVPCID => Self::Unavailable { reason: basic },
            reason::IO_SMI | reason::OTHER_SMI | reason::INIT_SIGNAL | reason::SIPI => {
                Self::HostEvent { reason: basic }
            }
            other => Self::Other { reason: other },
        }
    }

    /// Whether this exit can have interrupted the delivery of an event to the guest, so that
    /// the IDT-vectoring information must be looked at (SDM 28.2.4): exits of instructions
    /// never do.
    #[inline(always)]
    pub const fn may_interrupt_delivery(&self) -> bool {
        matches!(
            self,
            Self::ExceptionOrNmi(_)
                | Self::ExternalInterrupt { .. }
                | Self::EptViolation { .. }
                | Self::EptMisconfiguration { .. }
                | Self::PreemptionTimer
                | Self::InterruptWindow
                | Self::NmiWindow
        )
    }

    /// The event whose delivery this exit interrupted, if any (SDM 28.2.4), read through `read`.
    pub fn interrupted_event(&self, mut read: impl FnMut(u32) -> u64) -> Option<InterruptedEvent> {
        use crate::fields as f;
        if !self.may_interrupt_delivery() {
            return None;
        }
        let event = Interruption::from_info(read(f::IDT_VECTORING_INFO) as u32)?;
        Some(InterruptedEvent {
            event,
            error_code: if event.has_error_code {
                read(f::IDT_VECTORING_ERROR_CODE) as u32
            } else {
                0
            },
            instruction_len: if event.kind >= Interruption::SOFTWARE_INTERRUPT {
                read(f::EXIT_INSTRUCTION_LENGTH) as u32
            } else {
                0
            },
        })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
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

    /// A VMCS of exit-information fields for `VmExit::decode`, which records what it read.
    struct Fields {
        values: &'static [(u32, u64)],
        read: std::vec::Vec<u32>,
    }

    impl Fields {
        fn new(values: &'static [(u32, u64)]) -> Self {
            Self {
                values,
                read: std::vec::Vec::new(),
            }
        }
        fn decode(&mut self, raw: u32) -> VmExit {
            VmExit::decode(raw, |field| {
                self.read.push(field);
                self.values
                    .iter()
                    .find(|(f, _)| *f == field)
                    .map_or(0, |&(_, v)| v)
            })
        }
    }

    #[test]
    fn every_reason_decodes_and_reads_only_what_it_needs() {
        use crate::fields as f;
        // CPUID reads nothing beyond the reason: the exit path's benchmark.
        let mut none = Fields::new(&[]);
        assert_eq!(none.decode(reason::CPUID.into()), VmExit::Cpuid);
        assert_eq!(none.decode(reason::VMCALL.into()), VmExit::Vmcall);
        assert_eq!(none.decode(reason::HLT.into()), VmExit::Hlt);
        assert!(none.read.is_empty(), "read {:?}", none.read);

        let mut io = Fields::new(&[(f::EXIT_QUALIFICATION, (0x3f8 << 16) | (1 << 3))]);
        assert_eq!(
            io.decode(reason::IO_INSTRUCTION.into()),
            VmExit::Io(IoExit {
                size: 1,
                is_in: true,
                string: false,
                rep: false,
                port: 0x3f8
            })
        );
        assert_eq!(io.read, [f::EXIT_QUALIFICATION]);

        // REP OUTSB with a 32-bit address size.
        let mut s = Fields::new(&[
            (f::EXIT_QUALIFICATION, (0x3f8 << 16) | (1 << 4) | (1 << 5)),
            (f::GUEST_LINEAR_ADDRESS, 0x1234),
            (f::EXIT_INSTRUCTION_INFO, 1 << 7),
        ]);
        match s.decode(reason::IO_INSTRUCTION.into()) {
            VmExit::StringIo {
                io,
                linear,
                address_mask,
            } => {
                assert!(io.string && io.rep && !io.is_in);
                assert_eq!((linear, address_mask), (0x1234, 0xffff_ffff));
            }
            other => panic!("{other:?}"),
        }

        let mut ept = Fields::new(&[
            (f::GUEST_PHYSICAL_ADDRESS, 0xfee0_0300),
            (f::EXIT_QUALIFICATION, 0b10 | (1 << 7)),
        ]);
        assert_eq!(
            ept.decode(reason::EPT_VIOLATION.into()),
            VmExit::EptViolation {
                gpa: 0xfee0_0300,
                violation: EptViolation {
                    access: EptAccess::Write,
                    present_perms: 0,
                    linear_valid: true
                }
            }
        );

        let mut ext = Fields::new(&[(f::EXIT_INTERRUPTION_INFO, 0x8000_0030)]);
        assert_eq!(
            ext.decode(reason::EXTERNAL_INTERRUPT.into()),
            VmExit::ExternalInterrupt { vector: Some(0x30) }
        );
        let mut nmi = Fields::new(&[(f::EXIT_INTERRUPTION_INFO, 0x8000_0202)]);
        assert_eq!(
            nmi.decode(reason::EXCEPTION_OR_NMI.into()),
            VmExit::ExceptionOrNmi(Interruption {
                vector: 2,
                kind: Interruption::NMI,
                has_error_code: false
            })
        );
        let mut cr = Fields::new(&[(f::EXIT_QUALIFICATION, 8 | (1 << 4) | (3 << 8))]);
        assert_eq!(
            cr.decode(reason::CR_ACCESS.into()),
            VmExit::CrAccess(CrAccess::MovFrom { cr: 8, gpr: 3 })
        );
        let mut fail = Fields::new(&[(f::EXIT_QUALIFICATION, 2)]);
        assert_eq!(
            fail.decode(EXIT_REASON_ENTRY_FAILURE | u32::from(reason::ENTRY_FAIL_GUEST_STATE)),
            VmExit::EntryFailure {
                reason: reason::ENTRY_FAIL_GUEST_STATE,
                qualification: 2
            }
        );

        // Every basic reason decodes to something, and the table of simple ones holds.
        for (raw, want) in [
            (reason::RDMSR, VmExit::Rdmsr),
            (reason::WRMSR, VmExit::Wrmsr),
            (reason::PREEMPTION_TIMER, VmExit::PreemptionTimer),
            (reason::INTERRUPT_WINDOW, VmExit::InterruptWindow),
            (reason::TRIPLE_FAULT, VmExit::TripleFault),
            (reason::XSETBV, VmExit::Xsetbv),
            (reason::INVD, VmExit::Invd),
            (reason::RDPMC, VmExit::Rdpmc),
            (
                reason::VMXON,
                VmExit::Unavailable {
                    reason: reason::VMXON,
                },
            ),
            (
                reason::MWAIT,
                VmExit::Unavailable {
                    reason: reason::MWAIT,
                },
            ),
            (
                reason::INIT_SIGNAL,
                VmExit::HostEvent {
                    reason: reason::INIT_SIGNAL,
                },
            ),
            (
                reason::APIC_WRITE,
                VmExit::Other {
                    reason: reason::APIC_WRITE,
                },
            ),
        ] {
            assert_eq!(Fields::new(&[]).decode(raw.into()), want, "reason {raw}");
        }
        for raw in 0..=80u32 {
            let _ = Fields::new(&[]).decode(raw);
        }
    }

    #[test]
    fn interrupted_events_are_read_only_after_delivery_exits() {
        use crate::fields as f;
        let values: &[(u32, u64)] = &[
            (f::IDT_VECTORING_INFO, 0x8000_0b0e), // #PF with an error code
            (f::IDT_VECTORING_ERROR_CODE, 2),
            (f::EXIT_INSTRUCTION_LENGTH, 2),
        ];
        let read = |field: u32| {
            values
                .iter()
                .find(|(f, _)| *f == field)
                .map_or(0, |&(_, v)| v)
        };
        let ept = VmExit::EptViolation {
            gpa: 0,
            violation: EptViolation::from_qualification(0),
        };
        let e = ept.interrupted_event(read).unwrap();
        assert_eq!(
            (e.event.vector, e.error_code, e.instruction_len),
            (14, 2, 0)
        );
        // A software interrupt (INT 0x80) keeps its instruction length.
        let soft: &[(u32, u64)] = &[
            (f::IDT_VECTORING_INFO, 0x8000_0480),
            (f::EXIT_INSTRUCTION_LENGTH, 2),
        ];
        let read = |field: u32| {
            soft.iter()
                .find(|(f, _)| *f == field)
                .map_or(0, |&(_, v)| v)
        };
        let e = VmExit::PreemptionTimer.interrupted_event(read).unwrap();
        assert_eq!((e.event.vector, e.instruction_len), (0x80, 2));
        // Instruction exits never interrupt a delivery: nothing is read.
        assert_eq!(VmExit::Cpuid.interrupted_event(|_| panic!("read")), None);
    }
}
