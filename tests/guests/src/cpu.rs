//! Thin wrappers over the instructions the guests use to poke the hypervisor: CPUID, RDTSC,
//! port I/O, RDMSR/WRMSR, LIDT.
//!
//! Most of them cause a VM exit under our hypervisor; that is the point. They are written with
//! `asm!` rather than taken from `core::arch` so that each is exactly one instruction with a known
//! encoding: the #GP handler in [`crate::idt`] recognises a faulting RDMSR/WRMSR by its bytes.

use core::arch::asm;

/// The four registers CPUID returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Executes CPUID with `EAX = leaf`, `ECX = subleaf`.
#[inline(always)]
pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let (eax, ebx, ecx, edx);
    // SAFETY: CPUID reads no memory and changes only the four output registers. RBX is reserved
    // by LLVM, so it is saved in a scratch register around the instruction.
    unsafe {
        asm!(
            "mov {saved:r}, rbx",
            "cpuid",
            "xchg {saved:r}, rbx",
            saved = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags),
        );
    }
    Cpuid { eax, ebx, ecx, edx }
}

/// Reads the time-stamp counter. Not serialising; callers time loops long enough for that not to
/// matter. Inside Bochs the TSC counts instructions, so differences are exactly repeatable.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC reads no memory and writes EDX:EAX only.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Reads one byte from an I/O port.
///
/// # Safety
/// Port I/O reaches devices; the caller must know what the port does. In our VMs every port is
/// emulated or ignored by the hypervisor, and none of them can touch guest memory.
#[inline(always)]
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the caller vouches for the port (see above).
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes one byte to an I/O port.
///
/// # Safety
/// As for [`inb`].
#[inline(always)]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller vouches for the port (see above).
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Executes RDMSR (bytes `0F 32`) and returns EDX:EAX.
///
/// # Safety
/// An MSR the hypervisor does not allow raises #GP: without the handler of [`crate::idt`] that is
/// a triple fault. Use [`crate::idt::rdmsr`] to probe MSRs.
#[inline(always)]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // Not `nomem`: when the instruction faults, the #GP handler records the fault in memory that
    // the caller reads right after, so this must be a compiler barrier for memory.
    // SAFETY: the caller vouches for the MSR or has a #GP handler installed (see above).
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Executes WRMSR (bytes `0F 30`) with EDX:EAX = `value`.
///
/// # Safety
/// As for [`rdmsr`]; writing a real MSR can change anything about the CPU.
#[inline(always)]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller vouches for the MSR and the value, or expects #GP (see above).
    unsafe {
        asm!(
            "wrmsr",
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags),
        )
    };
}

/// The operand of LIDT/SIDT.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug)]
pub struct DescriptorTablePointer {
    /// Size of the table in bytes, minus one.
    pub limit: u16,
    /// Linear address of the table.
    pub base: u64,
}

/// Loads the IDT register.
///
/// # Safety
/// `idtr` must describe a table that stays valid (and whose handlers are sound) for as long as it
/// is loaded; a limit of 0 is allowed and makes every exception escalate to a triple fault.
#[inline(always)]
pub unsafe fn lidt(idtr: &DescriptorTablePointer) {
    // SAFETY: the caller vouches for the table (see above).
    unsafe { asm!("lidt [{}]", in(reg) idtr, options(readonly, nostack, preserves_flags)) };
}

/// Halts until the next event; under our hypervisor this gives the CPU away.
#[inline(always)]
pub fn hlt() {
    // SAFETY: HLT has no memory effects; with interrupts off the hypervisor resumes us.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) };
}
