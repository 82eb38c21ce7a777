//! VM-exit decoding: basic exit reasons (SDM Vol. 3D, Appendix C) and the exit qualifications we
//! interpret (SDM Vol. 3C, 28.2.1).

/// Basic exit reasons (EXIT_REASON bits 15:0) that this hypervisor handles by name.
pub mod reason {
    pub const EXCEPTION_OR_NMI: u16 = 0;
    pub const EXTERNAL_INTERRUPT: u16 = 1;
    pub const TRIPLE_FAULT: u16 = 2;
    pub const INIT_SIGNAL: u16 = 3;
    pub const CPUID: u16 = 10;
    pub const HLT: u16 = 12;
    pub const VMCALL: u16 = 18;
    pub const CR_ACCESS: u16 = 28;
    pub const IO_INSTRUCTION: u16 = 30;
    pub const RDMSR: u16 = 31;
    pub const WRMSR: u16 = 32;
    pub const ENTRY_FAIL_GUEST_STATE: u16 = 33;
    pub const ENTRY_FAIL_MSR_LOADING: u16 = 34;
    pub const ENTRY_FAIL_MACHINE_CHECK: u16 = 41;
    pub const EPT_VIOLATION: u16 = 48;
    pub const EPT_MISCONFIGURATION: u16 = 49;
    pub const PREEMPTION_TIMER: u16 = 52;
}

/// EXIT_REASON bit 31: the VM entry failed (SDM 28.2.1, Table 28-? "VM-entry failure").
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
    fn entry_failure_bit() {
        let r = EXIT_REASON_ENTRY_FAILURE | reason::ENTRY_FAIL_GUEST_STATE as u32;
        assert_eq!(basic_reason(r), reason::ENTRY_FAIL_GUEST_STATE);
    }
}
