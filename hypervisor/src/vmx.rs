//! The VMX instructions and VMX operation of the one physical CPU (SDM Vol. 3C, chapters 24-31).
//!
//! This is the hardware half of VT-x; the rules (control negotiation, EPT format, exit
//! decoding) are in the `hv-vmx` crate and tested on the host. Nothing here decides policy.

use core::arch::{asm, naked_asm};

use hv_vm::regs::GuestRegisters;
use hv_vmx::caps::{msr, Capabilities, RawCapabilities};
use hv_vmx::fields;

use crate::platform::{cpuid, rdmsr, wrmsr};

/// Why VT-x cannot be used on this machine.
#[derive(Debug)]
pub enum VmxUnavailable {
    NotIntelVmx,
    DisabledByFirmware,
    Unusable(hv_vmx::controls::NegotiationError),
    VmxonFailed,
}

impl core::fmt::Display for VmxUnavailable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotIntelVmx => f.write_str("the CPU does not report VMX (CPUID.1:ECX.VMX[bit 5] = 0)"),
            Self::DisabledByFirmware => f.write_str(
                "VMX is disabled by the firmware (IA32_FEATURE_CONTROL is locked without VMX outside SMX)",
            ),
            Self::Unusable(e) => write!(f, "VMX lacks a feature this hypervisor needs: {e}"),
            Self::VmxonFailed => f.write_str("VMXON failed"),
        }
    }
}

/// Whether the CPU has VMX at all (CPUID.1:ECX bit 5, SDM 24.6).
pub fn cpu_has_vmx() -> bool {
    cpuid(1, 0)[2] & (1 << 5) != 0
}

/// Reads the capability MSRs; only call when [`cpu_has_vmx`].
pub fn read_capabilities() -> Capabilities {
    // SAFETY: the VMX capability MSRs exist when CPUID reports VMX; PROCBASED_CTLS2 and
    // EPT_VPID_CAP and the TRUE MSRs only when the checked bits say so (SDM A.1, A.3.3, A.10).
    unsafe {
        let basic = rdmsr(msr::IA32_VMX_BASIC);
        let has_true = basic & (1 << 55) != 0;
        let procbased = rdmsr(msr::IA32_VMX_PROCBASED_CTLS);
        let has_secondary = procbased & (1 << 63) != 0;
        let procbased2 = if has_secondary {
            rdmsr(msr::IA32_VMX_PROCBASED_CTLS2)
        } else {
            0
        };
        let has_ept_vpid = procbased2 & ((1 << 33) | (1 << 37)) != 0;
        let true_or = |m: u32, plain: u64| if has_true { rdmsr(m) } else { plain };
        let pinbased = rdmsr(msr::IA32_VMX_PINBASED_CTLS);
        let exit = rdmsr(msr::IA32_VMX_EXIT_CTLS);
        let entry = rdmsr(msr::IA32_VMX_ENTRY_CTLS);
        Capabilities::new(RawCapabilities {
            basic,
            pinbased,
            procbased,
            exit,
            entry,
            true_pinbased: true_or(msr::IA32_VMX_TRUE_PINBASED_CTLS, pinbased),
            true_procbased: true_or(msr::IA32_VMX_TRUE_PROCBASED_CTLS, procbased),
            true_exit: true_or(msr::IA32_VMX_TRUE_EXIT_CTLS, exit),
            true_entry: true_or(msr::IA32_VMX_TRUE_ENTRY_CTLS, entry),
            procbased2,
            ept_vpid: if has_ept_vpid {
                rdmsr(msr::IA32_VMX_EPT_VPID_CAP)
            } else {
                0
            },
            misc: rdmsr(msr::IA32_VMX_MISC),
            cr0_fixed0: rdmsr(msr::IA32_VMX_CR0_FIXED0),
            cr0_fixed1: rdmsr(msr::IA32_VMX_CR0_FIXED1),
            cr4_fixed0: rdmsr(msr::IA32_VMX_CR4_FIXED0),
            cr4_fixed1: rdmsr(msr::IA32_VMX_CR4_FIXED1),
        })
    }
}

/// Enables VMX outside SMX in IA32_FEATURE_CONTROL if the firmware left it unlocked
/// (SDM 24.7), applies the CR0/CR4 fixed bits (SDM 24.8) and executes VMXON with `region`
/// (a zeroed 4 KiB frame, identity-mapped).
pub fn enable(caps: &Capabilities, region: u64) -> Result<(), VmxUnavailable> {
    const LOCK: u64 = 1 << 0;
    const VMX_OUTSIDE_SMX: u64 = 1 << 2;
    // SAFETY: IA32_FEATURE_CONTROL exists on every CPU with VMX; we only set the lock and
    // enable bits when the firmware left it unlocked. CR0/CR4 are changed only by forcing the
    // bits VMX operation requires (fixed bits are compatible with our running state: PE, PG
    // and NE are already set). `region` is ours, 4 KiB aligned, and starts with the revision.
    unsafe {
        let fc = rdmsr(msr::IA32_FEATURE_CONTROL);
        if fc & LOCK == 0 {
            wrmsr(msr::IA32_FEATURE_CONTROL, fc | LOCK | VMX_OUTSIDE_SMX);
        } else if fc & VMX_OUTSIDE_SMX == 0 {
            return Err(VmxUnavailable::DisabledByFirmware);
        }
        let cr0: u64;
        let cr4: u64;
        asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack));
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
        asm!("mov cr0, {}", in(reg) caps.fix_cr0(cr0, false), options(nomem, nostack));
        asm!("mov cr4, {}", in(reg) caps.fix_cr4(cr4 | (1 << 13)), options(nomem, nostack));
        (region as *mut u32).write_volatile(caps.vmcs_revision());
        let ok: u8;
        asm!("vmxon [{}]", "setna {}", in(reg) &region, out(reg_byte) ok, options(nostack));
        if ok != 0 {
            return Err(VmxUnavailable::VmxonFailed);
        }
    }
    Ok(())
}

/// VMCLEAR then VMPTRLD `vmcs` (a 4 KiB frame with the revision identifier written).
///
/// # Safety
/// `vmcs` is a VMCS region owned by the caller, not current on another CPU.
pub unsafe fn vmclear(vmcs: u64) {
    // SAFETY: delegated; VMCLEAR only writes the region.
    unsafe { asm!("vmclear [{}]", in(reg) &vmcs, options(nostack)) };
}

/// # Safety
/// As [`vmclear`].
pub unsafe fn vmptrld(vmcs: u64) {
    // SAFETY: delegated.
    unsafe { asm!("vmptrld [{}]", in(reg) &vmcs, options(nostack)) };
}

/// Reads a field of the current VMCS. A VMREAD that fails (a field this CPU does not have, or
/// no current VMCS) leaves its destination unchanged (SDM Vol. 3C 31.3, VMREAD): the result is
/// then 0, never what the register happened to hold.
#[inline(always)]
pub fn vmread(field: u32) -> u64 {
    // The destination starts at 0 and a failing VMREAD does not write it.
    let mut value: u64 = 0;
    // SAFETY: VMREAD only reads the current VMCS; the hypervisor is in VMX root operation with
    // a current VMCS whenever it handles a VM.
    unsafe {
        asm!("vmread {v}, {f}", v = inout(reg) value, f = in(reg) u64::from(field),
            options(nostack, nomem))
    };
    value
}

/// Writes a field of the current VMCS.
#[inline(always)]
pub fn vmwrite(field: u32, value: u64) {
    let failed: u8;
    // SAFETY: VMWRITE only writes the current VMCS; what the field means is checked at VM entry,
    // which fails cleanly (no state is loaded) if a value is illegal.
    unsafe {
        asm!("vmwrite {}, {}", "setna {}", in(reg) u64::from(field), in(reg) value, out(reg_byte) failed,
            options(nostack, nomem))
    };
    if failed != 0 {
        vmwrite_failed(field, value);
    }
}

#[cold]
#[inline(never)]
fn vmwrite_failed(field: u32, value: u64) {
    log::error!(target: "hv", "VMWRITE of field {field:#x} = {value:#x} failed (error {})",
        vmread(fields::VM_INSTRUCTION_ERROR));
}

/// Invalidates the EPT-derived translations of one EPT (INVEPT single-context, SDM 31.3) or all
/// of them when single-context is not offered.
pub fn invept(eptp: u64, single: bool) {
    let descriptor: [u64; 2] = [eptp, 0];
    let kind: u64 = if single { 1 } else { 2 };
    // SAFETY: INVEPT only drops cached translations.
    unsafe { asm!("invept {}, [{}]", in(reg) kind, in(reg) &descriptor, options(nostack)) };
}

/// Enters the guest of the current VMCS with `regs` (VMLAUNCH when `launched` is false, else
/// VMRESUME) and returns at its next VM exit with the guest's registers saved in `regs`.
/// Returns 0 after a VM exit, 1 when the VM entry itself failed (VMfailValid/VMfailInvalid; the
/// VM-instruction error field says why).
///
/// The current VMCS's HOST_RIP must be [`vm_exit_landing`]; this function sets HOST_RSP itself.
///
/// # Safety
/// A VMCS is current and its host state describes this CPU; `regs` is valid for the duration.
#[unsafe(naked)]
pub unsafe extern "C" fn run_guest(regs: *mut GuestRegisters, launched: u64) -> u64 {
    naked_asm!(
        // Host callee-saved registers (SysV), then the register block pointer.
        "push rbp",
        "push rbx",
        "push r12",
        "push r13",
        "push r14",
        "push r15",
        "push rdi",
        // HOST_RSP = here: the landing pad finds the block pointer at [rsp].
        "mov rax, {host_rsp}",
        "vmwrite rax, rsp",
        "test rsi, rsi",
        "mov rax, [rdi + 0]",
        "mov rbx, [rdi + 8]",
        "mov rcx, [rdi + 16]",
        "mov rdx, [rdi + 24]",
        "mov rsi, [rdi + 32]",
        "mov rbp, [rdi + 48]",
        "mov r8,  [rdi + 56]",
        "mov r9,  [rdi + 64]",
        "mov r10, [rdi + 72]",
        "mov r11, [rdi + 80]",
        "mov r12, [rdi + 88]",
        "mov r13, [rdi + 96]",
        "mov r14, [rdi + 104]",
        "mov r15, [rdi + 112]",
        "mov rdi, [rdi + 40]",
        // MOVs leave the flags of TEST intact.
        "jnz 2f",
        "vmlaunch",
        "jmp 3f",
        "2:",
        "vmresume",
        "3:",
        // Entry failed: nothing of the guest is loaded but its registers; restore ours.
        "pop rdi",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbx",
        "pop rbp",
        "mov eax, 1",
        "ret",
        host_rsp = const fields::HOST_RSP,
    );
}

/// HOST_RIP: where the CPU lands on every VM exit, with RSP = the HOST_RSP set by
/// [`run_guest`]. Saves the guest registers and returns from `run_guest` with 0.
#[unsafe(naked)]
pub unsafe extern "C" fn vm_exit_landing() {
    naked_asm!(
        "push rdi",
        "mov rdi, [rsp + 8]",
        "mov [rdi + 0], rax",
        "mov [rdi + 8], rbx",
        "mov [rdi + 16], rcx",
        "mov [rdi + 24], rdx",
        "mov [rdi + 32], rsi",
        "mov [rdi + 48], rbp",
        "mov [rdi + 56], r8",
        "mov [rdi + 64], r9",
        "mov [rdi + 72], r10",
        "mov [rdi + 80], r11",
        "mov [rdi + 88], r12",
        "mov [rdi + 96], r13",
        "mov [rdi + 104], r14",
        "mov [rdi + 112], r15",
        "pop rax",
        "mov [rdi + 40], rax",
        "pop rdi",
        "pop r15",
        "pop r14",
        "pop r13",
        "pop r12",
        "pop rbx",
        "pop rbp",
        "xor eax, eax",
        "ret",
    );
}
