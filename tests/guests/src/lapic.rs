//! The local APIC of the guest's one vCPU, as a driver for real hardware programs it (Intel SDM
//! Vol. 3A chapter 11, "Advanced Programmable Interrupt Controller"; section numbers below are
//! those of chapter 10 in older editions, which the hypervisor's model cites too).
//!
//! Owns: the choice of interface (xAPIC MMIO page at [`XAPIC_BASE`], or the x2APIC MSRs after
//! [`enable_x2apic`]; 10.12), register access by xAPIC offset in either mode ([`read`],
//! [`write`]), the timer in its three modes ([`start_timer`], [`set_tsc_deadline`], 10.5.4),
//! EOI, TPR, self-IPIs through the ICR, and the error status register.
//!
//! The mode is global state of this module because an interrupt handler must be able to send its
//! EOI without a handle. The encodings (LVT timer, divide configuration, ICR, x2APIC MSR numbers)
//! are pure functions, unit-tested on the host.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::cpu;

/// Physical (= identity-mapped virtual) address of the xAPIC register page after reset
/// (10.4.1).
pub const XAPIC_BASE: u64 = 0xFEE0_0000;
/// IA32_APIC_BASE (10.4.4): bit 8 BSP, bit 10 EXTD (x2APIC mode), bit 11 EN (global enable).
pub const IA32_APIC_BASE: u32 = 0x1B;
/// IA32_TSC_DEADLINE (10.5.4.1).
pub const IA32_TSC_DEADLINE: u32 = 0x6E0;
/// IA32_APIC_BASE bit 10: x2APIC mode.
pub const APIC_BASE_EXTD: u64 = 1 << 10;
/// IA32_APIC_BASE bit 11: the APIC is globally enabled.
pub const APIC_BASE_EN: u64 = 1 << 11;
/// IA32_APIC_BASE bit 8: this is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// First x2APIC MSR; the register at xAPIC offset `o` is MSR `0x800 + (o >> 4)` (10.12.1.2).
pub const X2APIC_MSR_BASE: u32 = 0x800;
/// The x2APIC SELF IPI register (MSR 0x83F, x2APIC only, 10.12.11).
pub const X2APIC_SELF_IPI: u32 = 0x83F;

/// xAPIC register offsets (Table 10-1).
pub mod reg {
    pub const ID: u32 = 0x20;
    pub const VERSION: u32 = 0x30;
    pub const TPR: u32 = 0x80;
    pub const PPR: u32 = 0xA0;
    pub const EOI: u32 = 0xB0;
    pub const LDR: u32 = 0xD0;
    pub const SVR: u32 = 0xF0;
    /// In-service register: eight 32-bit registers 0x10 apart.
    pub const ISR: u32 = 0x100;
    pub const TMR: u32 = 0x180;
    pub const IRR: u32 = 0x200;
    pub const ESR: u32 = 0x280;
    pub const ICR_LOW: u32 = 0x300;
    pub const ICR_HIGH: u32 = 0x310;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_THERMAL: u32 = 0x330;
    pub const LVT_PERF: u32 = 0x340;
    pub const LVT_LINT0: u32 = 0x350;
    pub const LVT_LINT1: u32 = 0x360;
    pub const LVT_ERROR: u32 = 0x370;
    pub const TIMER_INITIAL: u32 = 0x380;
    pub const TIMER_CURRENT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3E0;
}

/// LVT bit 16: masked (10.5.1).
pub const LVT_MASKED: u32 = 1 << 16;
/// SVR bit 8: APIC software enable (10.9).
pub const SVR_ENABLE: u32 = 1 << 8;
/// ESR bit 5: send illegal vector; bit 6: receive illegal vector; bit 7: illegal register
/// address (10.5.3).
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

/// The LVT timer modes, bits 18:17 (10.5.4, Figure 10-8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    OneShot = 0,
    Periodic = 1,
    TscDeadline = 2,
}

static X2APIC: AtomicBool = AtomicBool::new(false);

/// The LVT timer value for `vector` in `mode`.
pub const fn lvt_timer(vector: u8, mode: TimerMode, masked: bool) -> u32 {
    (vector as u32) | ((mode as u32) << 17) | if masked { LVT_MASKED } else { 0 }
}

/// The divide configuration register value for `divisor` (1, 2, 4, ..., 128), or `None`.
/// Figure 10-10: bits 3, 1, 0 hold a 3-bit code; 0b111 is divide by 1, 0b000..=0b110 divide by
/// 2 << code.
pub const fn divide_config(divisor: u32) -> Option<u32> {
    let code = match divisor {
        1 => 0b111,
        2 => 0b000,
        4 => 0b001,
        8 => 0b010,
        16 => 0b011,
        32 => 0b100,
        64 => 0b101,
        128 => 0b110,
        _ => return None,
    };
    Some(((code & 0b100) << 1) | (code & 0b011))
}

/// The x2APIC MSR of the register at xAPIC offset `offset`.
pub const fn x2apic_msr(offset: u32) -> u32 {
    X2APIC_MSR_BASE + (offset >> 4)
}

/// ICR delivery modes, bits 10:8 (10.6.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    Fixed = 0,
    Nmi = 4,
}

/// An ICR value (x2APIC layout: destination in bits 63:32) for an IPI to self with the "self"
/// shorthand (bits 19:18 = 01), edge-triggered, level "assert" (bit 14) as the SDM asks for
/// everything but INIT level de-assert.
pub const fn icr_self(vector: u8, delivery: Delivery) -> u64 {
    (vector as u64) | ((delivery as u64) << 8) | (1 << 14) | (0b01 << 18)
}

/// Whether the x2APIC interface is in use.
pub fn is_x2apic() -> bool {
    X2APIC.load(Ordering::SeqCst)
}

/// Reads the register at xAPIC offset `offset` (32 bits; in x2APIC mode the MSR's low half).
pub fn read(offset: u32) -> u32 {
    if is_x2apic() {
        // SAFETY: an x2APIC MSR of a defined register; the APIC is in x2APIC mode.
        unsafe { cpu::rdmsr(x2apic_msr(offset)) as u32 }
    } else {
        // SAFETY: the xAPIC page is identity-mapped (the boot page tables map 4 GiB) and the
        // access is an aligned 32-bit load, the only width the SDM defines (10.4.1).
        unsafe { core::ptr::read_volatile((XAPIC_BASE + u64::from(offset)) as *const u32) }
    }
}

/// Writes the register at xAPIC offset `offset`.
pub fn write(offset: u32, value: u32) {
    if is_x2apic() {
        // SAFETY: an x2APIC MSR of a defined register; callers write architectural values.
        unsafe { cpu::wrmsr(x2apic_msr(offset), u64::from(value)) }
    } else {
        // SAFETY: as in `read`: an aligned 32-bit store to the identity-mapped xAPIC page.
        unsafe { core::ptr::write_volatile((XAPIC_BASE + u64::from(offset)) as *mut u32, value) }
    }
}

/// IA32_APIC_BASE.
pub fn apic_base() -> u64 {
    // SAFETY: the platform's local APIC implements IA32_APIC_BASE (CPUID.1:EDX bit 9).
    unsafe { cpu::rdmsr(IA32_APIC_BASE) }
}

/// Switches to x2APIC mode (EN and EXTD set together, the legal xAPIC -> x2APIC transition of
/// 10.12.5). There is no way back but through the disabled state.
pub fn enable_x2apic() {
    let base = apic_base();
    // SAFETY: setting EXTD with EN is architectural when CPUID.1:ECX bit 21 is set, which the
    // platform promises; it changes only how this VM's APIC is addressed.
    unsafe { cpu::wrmsr(IA32_APIC_BASE, base | APIC_BASE_EN | APIC_BASE_EXTD) };
    X2APIC.store(true, Ordering::SeqCst);
}

/// The local APIC ID: bits 31:24 of the xAPIC ID register, all 32 bits in x2APIC mode
/// (10.4.6, 10.12.5.1).
pub fn id() -> u32 {
    let raw = read(reg::ID);
    if is_x2apic() {
        raw
    } else {
        raw >> 24
    }
}

/// Signals the end of the highest-priority in-service interrupt (10.8.5). x2APIC requires the
/// value 0 (a non-zero write is #GP, 10.12.1.2).
#[inline]
pub fn eoi() {
    write(reg::EOI, 0);
}

/// Sets the task priority: interrupts whose class (vector >> 4) is at most `tpr >> 4` are held
/// in the IRR (10.8.3.1).
pub fn set_tpr(tpr: u8) {
    write(reg::TPR, u32::from(tpr));
}

/// Software-enables the APIC with `spurious` as the spurious-interrupt vector.
pub fn software_enable(spurious: u8) {
    write(reg::SVR, SVR_ENABLE | u32::from(spurious));
}

/// Masks the timer, LINT0/1, error, thermal and performance-counter LVTs.
pub fn mask_all_lvts() {
    for lvt in [
        reg::LVT_TIMER,
        reg::LVT_THERMAL,
        reg::LVT_PERF,
        reg::LVT_LINT0,
        reg::LVT_LINT1,
        reg::LVT_ERROR,
    ] {
        write(lvt, LVT_MASKED);
    }
}

/// Programs and starts the timer: `initial_count` bus ticks divided by `divisor`, one-shot or
/// periodic (10.5.4). The LVT is written first: a mode change may disarm the timer.
pub fn start_timer(vector: u8, mode: TimerMode, initial_count: u32, divisor: u32) {
    let divide = divide_config(divisor).expect("divisor is a power of two up to 128");
    write(reg::LVT_TIMER, lvt_timer(vector, mode, false));
    write(reg::TIMER_DIVIDE, divide);
    write(reg::TIMER_INITIAL, initial_count);
}

/// Puts the timer in TSC-deadline mode at `vector`, disarmed (10.5.4.1).
pub fn tsc_deadline_mode(vector: u8) {
    write(
        reg::LVT_TIMER,
        lvt_timer(vector, TimerMode::TscDeadline, false),
    );
    // 10.5.4.1: the xAPIC LVT write (a memory write) and the WRMSR that arms the deadline are not
    // ordered with respect to each other; MFENCE orders them.
    // SAFETY: MFENCE has no effect but ordering.
    unsafe { core::arch::asm!("mfence", options(nostack, preserves_flags)) };
}

/// Arms the TSC deadline at `tsc` (0 disarms).
#[inline]
pub fn set_tsc_deadline(tsc: u64) {
    // SAFETY: IA32_TSC_DEADLINE exists when CPUID.1:ECX bit 24 is set (the platform promises
    // it); writing it only arms this VM's timer.
    unsafe { cpu::wrmsr(IA32_TSC_DEADLINE, tsc) };
}

/// Stops the timer: masks its LVT and clears the initial count and the deadline.
pub fn stop_timer() {
    let mode_bits = read(reg::LVT_TIMER) & (0b11 << 17);
    write(reg::LVT_TIMER, LVT_MASKED | mode_bits);
    if mode_bits == (TimerMode::TscDeadline as u32) << 17 {
        set_tsc_deadline(0);
    } else {
        write(reg::TIMER_INITIAL, 0);
    }
}

/// Writes the ICR (x2APIC layout: destination in bits 63:32). In xAPIC mode the high half goes
/// first: the write of the low half sends the IPI (10.6.1).
pub fn write_icr(icr: u64) {
    if is_x2apic() {
        // SAFETY: the x2APIC ICR is one 64-bit MSR; callers send IPIs to this CPU only.
        unsafe { cpu::wrmsr(x2apic_msr(reg::ICR_LOW), icr) }
    } else {
        write(reg::ICR_HIGH, ((icr >> 32) as u32) << 24);
        write(reg::ICR_LOW, icr as u32);
    }
}

/// Sends a fixed interrupt at `vector` to this CPU through the ICR's self shorthand.
pub fn self_ipi(vector: u8) {
    write_icr(icr_self(vector, Delivery::Fixed));
}

/// Reads the error status register: the write before the read latches the errors seen since the
/// last write (10.5.3), so this also clears them.
pub fn esr() -> u32 {
    write(reg::ESR, 0);
    read(reg::ESR)
}

/// Whether `vector`'s bit is set in the 256-bit register starting at `base` (ISR, TMR, IRR).
pub fn bit(base: u32, vector: u8) -> bool {
    let word = read(base + u32::from(vector / 32) * 0x10);
    word & (1 << (vector % 32)) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divide_configuration_follows_figure_10_10() {
        assert_eq!(divide_config(1), Some(0xB));
        assert_eq!(divide_config(2), Some(0x0));
        assert_eq!(divide_config(4), Some(0x1));
        assert_eq!(divide_config(16), Some(0x3));
        assert_eq!(divide_config(32), Some(0x8));
        assert_eq!(divide_config(128), Some(0xA));
        assert_eq!(divide_config(3), None);
        assert_eq!(divide_config(256), None);
    }

    #[test]
    fn lvt_timer_modes() {
        assert_eq!(lvt_timer(0x40, TimerMode::OneShot, false), 0x40);
        assert_eq!(lvt_timer(0x40, TimerMode::Periodic, false), 0x2_0040);
        assert_eq!(lvt_timer(0x40, TimerMode::TscDeadline, false), 0x4_0040);
        assert_eq!(lvt_timer(0xEF, TimerMode::Periodic, true), 0x3_00EF);
    }

    #[test]
    fn x2apic_msrs() {
        assert_eq!(x2apic_msr(reg::ID), 0x802);
        assert_eq!(x2apic_msr(reg::EOI), 0x80B);
        assert_eq!(x2apic_msr(reg::ICR_LOW), 0x830);
        assert_eq!(x2apic_msr(reg::LVT_TIMER), 0x832);
        assert_eq!(x2apic_msr(reg::TIMER_DIVIDE), 0x83E);
    }

    #[test]
    fn self_ipis() {
        assert_eq!(icr_self(0x50, Delivery::Fixed), 0x4_4050);
        assert_eq!(icr_self(0, Delivery::Nmi), 0x4_4400);
    }
}
