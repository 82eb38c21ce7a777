//! The per-VM CPU state that VM entry and exit do not switch, and its switch when another VM
//! comes on the CPU (docs/isolation.md has the whole table).
//!
//! VMX loads and saves the guest's control, segment, descriptor-table, SYSENTER, DR7, DEBUGCTL,
//! PAT and EFER state through the VMCS. Everything else the guest can write stays in the CPU
//! across VM exits: the x87/SSE/AVX registers (and XCR0), DR0-DR3 and DR6, CR2, and the MSRs
//! with no VMCS field (`hv_vm::msr::SWITCHED`: KERNEL_GS_BASE, the SYSCALL MSRs, TSC_AUX). The
//! hypervisor itself never uses any of them (it is built without SSE, takes no debug traps,
//! page faults or system calls), so they can hold the running VM's values all the time, even
//! while its exits are handled; [`switch`] saves the leaving VM's values and loads the coming
//! VM's. A new VM starts from the architectural reset values (SDM Vol. 3A, Table 10-1).
//!
//! This module must not decide policy (which values are legal is `hv_vm`'s) and must not touch
//! the VMCS.

use hv_vm::msr::{SwitchedMsrs, SWITCHED};
use hv_vm::policy::CpuPolicy;

use crate::platform::{rdmsr, wrmsr};

/// DR6 at reset: reserved bits set, no debug condition.
pub const DR6_RESET: u64 = 0xffff_0ff0;
/// XCR0 at reset: x87 only.
pub const XCR0_RESET: u64 = 1;

/// A VM's unswitched CPU state while it is off the CPU.
pub struct CpuState {
    /// A 4 KiB frame (identity-mapped, 64-byte aligned) holding the XSAVE image (standard
    /// format) or, on a CPU without XSAVE, the FXSAVE image.
    pub xsave_area: u64,
    pub xcr0: u64,
    pub dr: [u64; 4],
    pub dr6: u64,
    pub cr2: u64,
    pub msrs: SwitchedMsrs,
}

impl CpuState {
    /// Reset state around `frame`, a zeroed 4 KiB frame the VM owns from now on.
    pub fn new(frame: u64) -> Self {
        // FCW 0x037F (all x87 exceptions masked) and MXCSR 0x1F80 (all SSE exceptions masked),
        // the reset values; XSTATE_BV = 0 (bytes 512..520, zero) makes XRSTOR put every other
        // component in its initial state.
        // SAFETY: `frame` is a zeroed frame owned by this VM, identity-mapped.
        unsafe {
            (frame as *mut u16).write(0x037f);
            ((frame + 24) as *mut u32).write(0x1f80);
        }
        Self {
            xsave_area: frame,
            xcr0: XCR0_RESET,
            dr: [0; 4],
            dr6: DR6_RESET,
            cr2: 0,
            msrs: SwitchedMsrs::default(),
        }
    }
}

/// Sets XCR0.
///
/// # Safety
/// CR4.OSXSAVE is set and `value` is a valid XCR0 for this CPU.
pub unsafe fn xsetbv(value: u64) {
    // SAFETY: delegated to the caller.
    unsafe {
        core::arch::asm!("xsetbv", in("ecx") 0, in("eax") value as u32, in("edx") (value >> 32) as u32,
            options(nomem, nostack))
    };
}

/// Saves the state of the VM leaving the CPU (if any) into its [`CpuState`] and loads the state of
/// the VM coming. `policy` says which XSAVE components guests may use and which MSRs exist.
pub fn switch(out: Option<&mut CpuState>, into: &CpuState, policy: &CpuPolicy) {
    let xcr0_all = policy.xcr0_allowed;
    // SAFETY: XSAVE/XRSTOR (or FXSAVE/FXRSTOR) work on each VM's own 64-byte aligned frame,
    // large enough for every component in `xcr0_all` (CpuPolicy sized it); XCR0 is set to
    // `xcr0_all` (valid: boot enabled it) around them so that components a VM has disabled are
    // saved and restored as well and never carry one VM's values into another. Debug registers,
    // CR2 and the SWITCHED MSRs are registers the hypervisor itself does not use; the MSRs
    // exist on every x86_64 CPU with VMX (RDTSCP's TSC_AUX: when the CPU lacks it the guest
    // cannot observe it either, and WRMSR/RDMSR of it would #GP, so it is skipped).
    unsafe {
        let all = xcr0_all | 1;
        if let Some(out) = out {
            if xcr0_all != 0 {
                xsetbv(all);
                core::arch::asm!("xsave64 [{}]", in(reg) out.xsave_area, in("eax") all as u32,
                    in("edx") (all >> 32) as u32, options(nostack));
            } else {
                core::arch::asm!("fxsave64 [{}]", in(reg) out.xsave_area, options(nostack));
            }
            core::arch::asm!("mov {}, cr2", out(reg) out.cr2, options(nomem, nostack));
            core::arch::asm!("mov {}, dr0", out(reg) out.dr[0], options(nomem, nostack));
            core::arch::asm!("mov {}, dr1", out(reg) out.dr[1], options(nomem, nostack));
            core::arch::asm!("mov {}, dr2", out(reg) out.dr[2], options(nomem, nostack));
            core::arch::asm!("mov {}, dr3", out(reg) out.dr[3], options(nomem, nostack));
            core::arch::asm!("mov {}, dr6", out(reg) out.dr6, options(nomem, nostack));
            for (slot, msr) in out.msrs.values.iter_mut().zip(SWITCHED) {
                if policy.has_msr(msr) {
                    *slot = rdmsr(msr.index());
                }
            }
        }
        if xcr0_all != 0 {
            xsetbv(all);
            core::arch::asm!("xrstor64 [{}]", in(reg) into.xsave_area, in("eax") all as u32,
                in("edx") (all >> 32) as u32, options(nostack));
            xsetbv(into.xcr0);
        } else {
            core::arch::asm!("fxrstor64 [{}]", in(reg) into.xsave_area, options(nostack));
        }
        core::arch::asm!("mov cr2, {}", in(reg) into.cr2, options(nomem, nostack));
        core::arch::asm!("mov dr0, {}", in(reg) into.dr[0], options(nomem, nostack));
        core::arch::asm!("mov dr1, {}", in(reg) into.dr[1], options(nomem, nostack));
        core::arch::asm!("mov dr2, {}", in(reg) into.dr[2], options(nomem, nostack));
        core::arch::asm!("mov dr3, {}", in(reg) into.dr[3], options(nomem, nostack));
        core::arch::asm!("mov dr6, {}", in(reg) into.dr6, options(nomem, nostack));
        for (&value, msr) in into.msrs.values.iter().zip(SWITCHED) {
            if policy.has_msr(msr) {
                wrmsr(msr.index(), value);
            }
        }
    }
}
