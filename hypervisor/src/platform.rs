//! Privileged instructions of the host platform: port I/O, MSRs, the TSC and its calibration
//! against the PIT, and the way the hypervisor stops.
//!
//! Thin wrappers only; each says why it is sound. Policy lives elsewhere.

use core::sync::atomic::{AtomicBool, Ordering};

/// Set from the command line (`exit=emulator`): shut the emulator down instead of halting.
pub static EXIT_EMULATOR: AtomicBool = AtomicBool::new(false);

/// # Safety
/// Writing to an I/O port can have any effect on the device behind it: the caller names a port
/// whose device it owns.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: delegated to the caller.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack))
    };
}

/// # Safety
/// As [`outb`]: reading some ports has side effects.
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: delegated to the caller.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack))
    };
    value
}

/// # Safety
/// RDMSR of an MSR the CPU does not implement raises #GP: the caller checks that it exists.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: delegated to the caller.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// # Safety
/// WRMSR changes processor state: the caller owns the MSR and writes a legal value.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: delegated to the caller.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
            options(nomem, nostack))
    };
}

/// The time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads the TSC (CR4.TSD is clear in ring 0 anyway).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// CPUID, as the host sees it.
#[inline(always)]
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Measures the TSC frequency against PIT channel 2 over ~10 ms (the PIT runs at
/// 1.193182 MHz on every PC; channel 2 is gated by port 0x61 and needs no interrupt).
pub fn calibrate_tsc_hz() -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    const TICKS: u64 = 11_932; // ~10 ms
                               // SAFETY: ports 0x61 (speaker/gate), 0x43 (PIT mode), 0x42 (channel 2) belong to the PIT,
                               // which nothing else in the hypervisor uses.
    unsafe {
        let gate = inb(0x61);
        outb(0x61, (gate & !0x02) | 0x01); // gate on, speaker off
        outb(0x43, 0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
        outb(0x42, (TICKS & 0xff) as u8);
        outb(0x42, (TICKS >> 8) as u8);
        // Restart the count by toggling the gate.
        let g = inb(0x61);
        outb(0x61, g & !0x01);
        outb(0x61, g | 0x01);
        let start = rdtsc();
        // OUT2 (bit 5) goes high when the count reaches zero.
        let mut spins: u64 = 0;
        while inb(0x61) & 0x20 == 0 {
            spins += 1;
            if spins > 100_000_000 {
                break;
            }
        }
        let end = rdtsc();
        outb(0x61, gate);
        ((end - start) * PIT_HZ / TICKS).max(1)
    }
}

/// Stops the machine: in an emulator (exit=emulator) ask it to exit, else halt forever.
pub fn shutdown() -> ! {
    crate::serial::drain();
    if EXIT_EMULATOR.load(Ordering::Relaxed) {
        // SAFETY: these ports are only written when the command line says we run in an
        // emulator: 0x8900 is Bochs's shutdown port, 0xF4 QEMU's isa-debug-exit (exit status
        // (0x31 << 1) | 1 = 99).
        unsafe {
            for &b in b"Shutdown" {
                outb(0x8900, b);
            }
            outb(0xf4, 0x31);
        }
    }
    halt_forever()
}

pub fn halt_forever() -> ! {
    crate::serial::drain();
    loop {
        // SAFETY: interrupts are off; HLT just stops the CPU.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}
