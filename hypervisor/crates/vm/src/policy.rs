//! What a guest sees of the CPU: CPUID answers and the MSR allow-list.
//!
//! CPUID is the host's, except that the hypervisor-present bit is set, VMX is hidden, and leaves
//! 0x4000_0000.. answer with our signature (guest-abi). MSRs: a guest may touch only the MSRs
//! below, each emulated from or into the VMCS; every other RDMSR/WRMSR gets #GP(0), like an MSR
//! the CPU does not implement.

use guest_abi::{ABI_VERSION, CPUID_LEAF_BASE, CPUID_LEAF_MAX, CPUID_SIGNATURE};

/// CPUID.1:ECX bits.
const ECX_VMX: u32 = 1 << 5;
const ECX_HYPERVISOR: u32 = 1 << 31;

/// The guest's CPUID result for `leaf`/`subleaf`, given the host's answer `native`.
pub fn cpuid(leaf: u32, native: [u32; 4]) -> [u32; 4] {
    let [eax, ebx, ecx, edx] = native;
    match leaf {
        1 => [eax, ebx, (ecx | ECX_HYPERVISOR) & !ECX_VMX, edx],
        CPUID_LEAF_BASE => {
            let s = CPUID_SIGNATURE;
            let word = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
            [CPUID_LEAF_MAX, word(0), word(4), word(8)]
        }
        l if l == CPUID_LEAF_BASE + 1 => [ABI_VERSION, 0, 0, 0],
        l if l > CPUID_LEAF_BASE && l <= 0x4000_00ff => [0; 4],
        _ => native,
    }
}

/// MSRs a guest may access.
pub mod msr {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_EFER: u32 = 0xc000_0080;
    pub const IA32_FS_BASE: u32 = 0xc000_0100;
    pub const IA32_GS_BASE: u32 = 0xc000_0101;
}

/// What to do with a guest's RDMSR or WRMSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrAccess {
    /// Emulate it on this MSR (the kernel reads or writes the VMCS field behind it).
    Emulate(u32),
    /// Inject #GP(0).
    Fault,
}

/// EFER bits a guest may change: SCE (0) and NXE (11). LME/LMA stay as the VMCS has them
/// (the guest is in long mode for good).
pub const EFER_GUEST_WRITABLE: u64 = (1 << 0) | (1 << 11);

pub fn msr_access(msr: u32, write: bool) -> MsrAccess {
    match msr {
        msr::IA32_TSC if !write => MsrAccess::Emulate(msr),
        msr::IA32_EFER | msr::IA32_FS_BASE | msr::IA32_GS_BASE => MsrAccess::Emulate(msr),
        _ => MsrAccess::Fault,
    }
}

/// The value an unknown I/O port reads as (all bits set, as on an empty ISA bus).
pub const UNKNOWN_PORT_VALUE: u32 = 0xffff_ffff;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf1_sets_hypervisor_and_hides_vmx() {
        let r = cpuid(1, [1, 2, ECX_VMX | 1, 4]);
        assert_eq!(r, [1, 2, ECX_HYPERVISOR | 1, 4]);
    }

    #[test]
    fn signature_leaves() {
        let r = cpuid(0x4000_0000, [9; 4]);
        assert_eq!(r[0], CPUID_LEAF_MAX);
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&r[1].to_le_bytes());
        sig[4..8].copy_from_slice(&r[2].to_le_bytes());
        sig[8..].copy_from_slice(&r[3].to_le_bytes());
        assert_eq!(&sig, CPUID_SIGNATURE);
        assert_eq!(cpuid(0x4000_0001, [9; 4])[0], ABI_VERSION);
        assert_eq!(cpuid(0x4000_0010, [9; 4]), [0; 4]);
        assert_eq!(cpuid(0, [9, 8, 7, 6]), [9, 8, 7, 6]);
    }

    #[test]
    fn msr_allow_list() {
        assert_eq!(msr_access(0x1234, false), MsrAccess::Fault);
        assert_eq!(msr_access(0xc001_1234, true), MsrAccess::Fault);
        assert_eq!(msr_access(msr::IA32_TSC, true), MsrAccess::Fault);
        assert_eq!(
            msr_access(msr::IA32_TSC, false),
            MsrAccess::Emulate(msr::IA32_TSC)
        );
        assert_eq!(
            msr_access(msr::IA32_EFER, true),
            MsrAccess::Emulate(msr::IA32_EFER)
        );
    }
}
