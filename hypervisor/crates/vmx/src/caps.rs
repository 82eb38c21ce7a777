//! VMX capability MSRs and control negotiation (SDM Vol. 3C, Appendix A).
//!
//! Every control word written to a VMCS comes from [`Capabilities::negotiate`]: the bits that
//! the CPU forces to 1 are set whatever we ask, a bit we *require* that the CPU cannot set is an
//! error, and a bit we merely *want* is set only when allowed. No control word is hard-coded.

/// MSR numbers of the VMX capability MSRs (SDM Vol. 4, Table 2-2).
pub mod msr {
    pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
    pub const IA32_VMX_BASIC: u32 = 0x480;
    pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
    pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
    pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
    pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
    pub const IA32_VMX_MISC: u32 = 0x485;
    pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
    pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
    pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
    pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
    pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
    pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;
    pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
    pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
    pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
    pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
}

/// Which control word a capability applies to (for error messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlKind {
    PinBased,
    PrimaryProcBased,
    SecondaryProcBased,
    Exit,
    Entry,
}

/// A control negotiation failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlError {
    /// Bits we require that the CPU cannot set (allowed-1 is 0).
    Unsupported { kind: ControlKind, missing: u32 },
}

impl core::fmt::Display for ControlError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Unsupported { kind, missing } => {
                write!(
                    f,
                    "{kind:?} controls: required bits {missing:#x} not supported"
                )
            }
        }
    }
}

/// One control capability MSR: allowed-0 settings in bits 31:0 (a 1 there means the control
/// must be 1), allowed-1 settings in bits 63:32 (a 0 there means the control must be 0)
/// (SDM A.3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlCap(pub u64);

impl ControlCap {
    /// Bits the CPU forces to 1.
    pub const fn must_be_one(self) -> u32 {
        self.0 as u32
    }
    /// Bits the CPU lets us set.
    pub const fn may_be_one(self) -> u32 {
        (self.0 >> 32) as u32
    }
    /// Whether all of `bits` may be 1.
    pub const fn allows(self, bits: u32) -> bool {
        self.may_be_one() & bits == bits
    }

    /// The control word: forced bits, plus `required` (an error if not allowed), plus the
    /// allowed part of `wanted`. Bits neither forced nor asked for are 0 (SDM A.3.1: "the
    /// default setting" of a control whose both settings are allowed is chosen by software).
    pub fn negotiate(
        self,
        kind: ControlKind,
        required: u32,
        wanted: u32,
    ) -> Result<u32, ControlError> {
        let missing = required & !self.may_be_one();
        if missing != 0 {
            return Err(ControlError::Unsupported { kind, missing });
        }
        Ok(self.must_be_one() | required | (wanted & self.may_be_one()))
    }
}

/// The VMX capability MSR values of one CPU, as read with RDMSR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawCapabilities {
    pub basic: u64,
    pub pinbased: u64,
    pub procbased: u64,
    pub exit: u64,
    pub entry: u64,
    pub true_pinbased: u64,
    pub true_procbased: u64,
    pub true_exit: u64,
    pub true_entry: u64,
    /// 0 when the primary controls cannot activate secondary controls (the MSR does not exist).
    pub procbased2: u64,
    /// 0 when neither EPT nor VPID can be enabled (the MSR does not exist).
    pub ept_vpid: u64,
    pub misc: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
}

/// The capabilities, interpreted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub raw: RawCapabilities,
}

/// IA32_VMX_EPT_VPID_CAP bits (SDM A.10).
pub mod ept_vpid_cap {
    pub const EXECUTE_ONLY: u64 = 1 << 0;
    pub const PAGE_WALK_4: u64 = 1 << 6;
    pub const MEMORY_TYPE_WB: u64 = 1 << 14;
    pub const PDE_2MB: u64 = 1 << 16;
    pub const INVEPT: u64 = 1 << 20;
    pub const ACCESSED_DIRTY: u64 = 1 << 21;
    pub const INVEPT_SINGLE_CONTEXT: u64 = 1 << 25;
    pub const INVEPT_ALL_CONTEXT: u64 = 1 << 26;
    pub const INVVPID: u64 = 1 << 32;
    pub const INVVPID_SINGLE_CONTEXT: u64 = 1 << 41;
    pub const INVVPID_ALL_CONTEXT: u64 = 1 << 42;
}

impl Capabilities {
    pub const fn new(raw: RawCapabilities) -> Self {
        Self { raw }
    }

    /// VMCS revision identifier (IA32_VMX_BASIC bits 30:0, SDM A.1).
    pub const fn vmcs_revision(&self) -> u32 {
        (self.raw.basic & 0x7fff_ffff) as u32
    }

    /// Bytes to allocate for the VMXON region and each VMCS (bits 44:32).
    pub const fn vmcs_size(&self) -> u32 {
        ((self.raw.basic >> 32) & 0x1fff) as u32
    }

    /// Whether the TRUE_* control MSRs exist (IA32_VMX_BASIC bit 55, SDM A.1); when they do,
    /// they are the ones that say which default-1 controls may be 0.
    pub const fn has_true_controls(&self) -> bool {
        self.raw.basic & (1 << 55) != 0
    }

    /// Whether the VMCS must be write-back memory (bits 53:50 = 6).
    pub const fn vmcs_memory_type_wb(&self) -> bool {
        (self.raw.basic >> 50) & 0xf == 6
    }

    pub const fn pin_based(&self) -> ControlCap {
        ControlCap(if self.has_true_controls() {
            self.raw.true_pinbased
        } else {
            self.raw.pinbased
        })
    }
    pub const fn primary_proc_based(&self) -> ControlCap {
        ControlCap(if self.has_true_controls() {
            self.raw.true_procbased
        } else {
            self.raw.procbased
        })
    }
    pub const fn exit(&self) -> ControlCap {
        ControlCap(if self.has_true_controls() {
            self.raw.true_exit
        } else {
            self.raw.exit
        })
    }
    pub const fn entry(&self) -> ControlCap {
        ControlCap(if self.has_true_controls() {
            self.raw.true_entry
        } else {
            self.raw.entry
        })
    }
    /// Secondary controls exist only when the primary controls allow activating them (A.3.3).
    pub const fn secondary_proc_based(&self) -> ControlCap {
        if ControlCap(self.raw.procbased).allows(1 << 31) {
            ControlCap(self.raw.procbased2)
        } else {
            ControlCap(0)
        }
    }

    /// Whether EPT can be enabled with a 4-level walk of write-back paging structures.
    pub const fn ept_usable(&self) -> bool {
        use ept_vpid_cap::*;
        self.secondary_proc_based().allows(1 << 1)
            && self.raw.ept_vpid & PAGE_WALK_4 != 0
            && self.raw.ept_vpid & MEMORY_TYPE_WB != 0
    }
    pub const fn ept_ad_bits(&self) -> bool {
        self.raw.ept_vpid & ept_vpid_cap::ACCESSED_DIRTY != 0
    }
    pub const fn invept_single_context(&self) -> bool {
        use ept_vpid_cap::*;
        self.raw.ept_vpid & INVEPT != 0 && self.raw.ept_vpid & INVEPT_SINGLE_CONTEXT != 0
    }
    pub const fn vpid_usable(&self) -> bool {
        self.secondary_proc_based().allows(1 << 5) && self.raw.ept_vpid & ept_vpid_cap::INVVPID != 0
    }
    pub const fn unrestricted_guest(&self) -> bool {
        self.secondary_proc_based().allows(1 << 7)
    }
    pub const fn tsc_scaling(&self) -> bool {
        self.secondary_proc_based().allows(1 << 25)
    }
    pub const fn preemption_timer(&self) -> bool {
        self.pin_based().allows(1 << 6)
    }
    /// The preemption timer counts down once every 2^rate TSC ticks (IA32_VMX_MISC bits 4:0).
    pub const fn preemption_timer_rate(&self) -> u32 {
        (self.raw.misc & 0x1f) as u32
    }

    /// CR0 for VMX operation: `value` with the fixed bits applied (SDM A.7). `unrestricted`
    /// exempts PE and PG from FIXED0 for a guest running with unrestricted guest.
    pub const fn fix_cr0(&self, value: u64, unrestricted: bool) -> u64 {
        let mut fixed0 = self.raw.cr0_fixed0;
        if unrestricted {
            fixed0 &= !((1 << 0) | (1 << 31));
        }
        (value | fixed0) & self.raw.cr0_fixed1
    }

    /// CR4 for VMX operation: `value` with the fixed bits applied (SDM A.8).
    pub const fn fix_cr4(&self, value: u64) -> u64 {
        (value | self.raw.cr4_fixed0) & self.raw.cr4_fixed1
    }
}

#[cfg(test)]
mod tests;
