//! The host's own interrupts and NMIs: the hypervisor takes none on purpose, but a machine can
//! send them anyway (firmware-armed timers, a spurious 8259 IRQ 7, an NMI watchdog or a hardware
//! error), and each must be acknowledged and counted, never allowed to stop the machine.
//!
//! External interrupts arrive as VM exits (external-interrupt exiting with "acknowledge
//! interrupt on exit", so the vector comes with the exit): [`acknowledge`] ends it at the
//! interrupt controller that delivered it, so that later interrupts of the same or lower
//! priority are not blocked forever. The hypervisor runs with RFLAGS.IF = 0, so none arrive in
//! VMX root operation. NMIs can arrive in either mode: in the guest they exit (NMI exiting), in
//! the hypervisor they go through IDT vector 2 to a handler that only counts ([`arch`]); the
//! guests have no virtual NMI source, so every NMI is the host's and none is injected.
//!
//! With `selftest=interrupts` on the command line the hypervisor makes both happen while the
//! VMs run (a periodic local-APIC timer interrupt and a self-NMI every few scheduling rounds),
//! so a test can prove that they are survived and acknowledged.
//!
//! [`arch`]: crate::arch

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::platform::{inb, outb, rdmsr, wrmsr};

/// NMIs taken in VMX root operation (through the IDT) and as VM exits.
pub static NMIS_ROOT: AtomicU64 = AtomicU64::new(0);
pub static NMIS_GUEST: AtomicU64 = AtomicU64::new(0);
/// External interrupts taken as VM exits, and how many of them needed an EOI.
pub static EXTERNAL: AtomicU64 = AtomicU64::new(0);
pub static EXTERNAL_EOI: AtomicU64 = AtomicU64::new(0);
/// Host interrupts taken while the CPU slept in [`idle_until`] (arch.rs counts them), the
/// sleeps, and the TSC ticks they lasted.
pub static IDLE_WAKEUPS: AtomicU64 = AtomicU64::new(0);
static IDLE_HALTS: AtomicU64 = AtomicU64::new(0);
static IDLE_SPIN_LOGGED: AtomicBool = AtomicBool::new(false);
static IDLE_TSC: AtomicU64 = AtomicU64::new(0);

/// `selftest=interrupts` was given.
pub static SELFTEST: AtomicBool = AtomicBool::new(false);

/// The 8259 PICs' vector bases after [`remap_and_mask_pic`].
const PIC_MASTER_BASE: u8 = 0x20;
const PIC_SLAVE_BASE: u8 = 0x28;
/// The self-test timer's vector.
const SELFTEST_VECTOR: u8 = 0xe0;
/// The vector of the timer that ends an idle sleep.
const IDLE_VECTOR: u8 = 0xe1;
const IA32_APIC_BASE: u32 = 0x1b;

/// Moves the 8259 PICs' vectors off the exception vectors (the BIOS leaves the master at 8,
/// where a spurious IRQ 7 would look like #DF) and masks every line.
pub fn remap_and_mask_pic() {
    // SAFETY: 0x20/0x21 and 0xA0/0xA1 are the 8259 PICs' ports; the ICW1-ICW4 sequence
    // (8259A datasheet) re-initialises them; nothing else in the hypervisor uses them.
    unsafe {
        outb(0x20, 0x11);
        outb(0xa0, 0x11);
        outb(0x21, PIC_MASTER_BASE);
        outb(0xa1, PIC_SLAVE_BASE);
        outb(0x21, 4); // slave on IRQ 2
        outb(0xa1, 2);
        outb(0x21, 1); // 8086 mode
        outb(0xa1, 1);
        outb(0x21, 0xff);
        outb(0xa1, 0xff);
    }
}

/// Local APIC access, in x2APIC (MSR) or xAPIC (MMIO) mode as the firmware left it.
enum Lapic {
    X2,
    X(u64),
}

impl Lapic {
    fn current() -> Option<Self> {
        if crate::platform::cpuid(1, 0)[3] & (1 << 9) == 0 {
            return None;
        }
        // SAFETY: IA32_APIC_BASE exists when CPUID reports an APIC.
        let base = unsafe { rdmsr(IA32_APIC_BASE) };
        if base & (1 << 11) == 0 {
            return None; // globally disabled
        }
        Some(if base & (1 << 10) != 0 {
            Self::X2
        } else {
            Self::X(base & 0xf_ffff_f000)
        })
    }

    /// Reads register `offset` (xAPIC offset; x2APIC MSR 0x800 + offset / 16).
    fn read(&self, offset: u32) -> u32 {
        // SAFETY: the local APIC's registers: MSRs 0x800.. in x2APIC mode, its MMIO page
        // (identity-mapped below 4 GiB, uncached by the firmware's MTRRs) in xAPIC mode.
        unsafe {
            match self {
                Self::X2 => rdmsr(0x800 + offset / 16) as u32,
                Self::X(base) => ((base + u64::from(offset)) as *const u32).read_volatile(),
            }
        }
    }

    fn write(&self, offset: u32, value: u32) {
        // SAFETY: as in `read`.
        unsafe {
            match self {
                Self::X2 => wrmsr(0x800 + offset / 16, value.into()),
                Self::X(base) => ((base + u64::from(offset)) as *mut u32).write_volatile(value),
            }
        }
    }

    fn in_service(&self, vector: u8) -> bool {
        let isr = self.read(0x100 + 0x10 * u32::from(vector / 32));
        isr & (1 << (vector % 32)) != 0
    }

    /// Sends an NMI to this CPU (ICR: delivery mode NMI, assert, this APIC's ID; the "self"
    /// shorthand is not valid for NMIs, SDM 11.6.1).
    fn self_nmi(&self) {
        match self {
            // SAFETY: the x2APIC ICR is one MSR; a self-NMI only runs `arch`'s NMI handler.
            Self::X2 => unsafe {
                let id = rdmsr(0x802);
                wrmsr(0x830, (id << 32) | 0x4400);
            },
            Self::X(_) => {
                let id = self.read(0x20) >> 24;
                self.write(0x310, id << 24);
                self.write(0x300, 0x4400);
            }
        }
    }
}

/// Ends external interrupt `vector`, acknowledged by the VM exit, where it is in service: at the
/// 8259 for the PIC's vectors, at the local APIC otherwise. A spurious interrupt (PIC IRQ 7/15
/// not in service, the APIC's spurious vector) gets no EOI, as the SDM and the 8259A require.
pub fn acknowledge(vector: u8) {
    EXTERNAL.fetch_add(1, Ordering::Relaxed);
    if (PIC_MASTER_BASE..PIC_SLAVE_BASE + 8).contains(&vector) {
        let slave = vector >= PIC_SLAVE_BASE;
        let line = (vector - PIC_MASTER_BASE) % 8;
        let cmd = if slave { 0xa0 } else { 0x20 };
        // SAFETY: OCW3 0x0B selects the in-service register for the next read of the command
        // port; OCW2 0x20 is a non-specific EOI. Only the PICs are touched.
        unsafe {
            outb(cmd, 0x0b);
            if inb(cmd) & (1 << line) != 0 {
                outb(cmd, 0x20);
                if slave {
                    outb(0x20, 0x20);
                }
                EXTERNAL_EOI.fetch_add(1, Ordering::Relaxed);
            }
        }
        return;
    }
    if let Some(apic) = Lapic::current() {
        if apic.in_service(vector) {
            apic.write(0xb0, 0);
            EXTERNAL_EOI.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sleeps (HLT with interrupts enabled) until the TSC reaches `deadline` or a host interrupt
/// comes, because every VM waits for a timer: the local APIC timer is armed for the deadline
/// (TSC-deadline mode where the CPU has it, else one-shot, counted in the APIC timer's clock
/// measured against the TSC once). Without a usable local APIC it waits with PAUSE instead.
/// Every vector taken during the sleep gets its EOI afterwards.
pub fn idle_until(deadline: u64, tsc_hz: u64) {
    let start = crate::platform::rdtsc();
    if deadline <= start {
        return;
    }
    let armed = match Lapic::current() {
        // The self-test's periodic timer owns the LVT timer; it wakes the sleep soon enough.
        Some(apic) if SELFTEST.load(Ordering::Relaxed) => Some(apic),
        Some(apic) if arm_idle_timer(&apic, deadline, start, tsc_hz) => Some(apic),
        _ => None,
    };
    let Some(apic) = armed else {
        if !IDLE_SPIN_LOGGED.swap(true, Ordering::Relaxed) {
            log::warn!(target: "hv", "idle: no usable local APIC timer; waiting with PAUSE instead of HLT");
        }
        while crate::platform::rdtsc() < deadline {
            core::hint::spin_loop();
        }
        return;
    };
    IDLE_HALTS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: STI's shadow covers HLT, so an interrupt arriving in between still ends the
    // sleep; every vector has an IDT entry (arch.rs) that returns at once; CLI restores the
    // hypervisor's RFLAGS.IF = 0 before anything else runs.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    IDLE_TSC.fetch_add(
        crate::platform::rdtsc().wrapping_sub(start),
        Ordering::Relaxed,
    );
    // End what was taken: the vectors in service, highest first (SDM 10.8.5).
    for _ in 0..8 {
        let in_service = (0..8).any(|i| apic.read(0x100 + 0x10 * i) != 0);
        if !in_service {
            break;
        }
        apic.write(0xb0, 0);
    }
    if !SELFTEST.load(Ordering::Relaxed) {
        apic.write(0x320, 1 << 16); // masked until the next sleep
    }
}

/// The APIC timer's ticks per second, measured once against the TSC (0: not measured yet).
static APIC_TIMER_HZ: AtomicU64 = AtomicU64::new(0);

/// Arms the local APIC timer to interrupt at TSC `deadline`, software-enabling the APIC if the
/// firmware left it disabled. False when it cannot be done.
fn arm_idle_timer(apic: &Lapic, deadline: u64, now: u64, tsc_hz: u64) -> bool {
    const TSC_DEADLINE_MSR: u32 = 0x6e0;
    if apic.read(0xf0) & 0x100 == 0 {
        apic.write(0xf0, 0x1ff);
    }
    apic.write(0x80, 0); // TPR: accept every priority
    if crate::platform::cpuid(1, 0)[2] & (1 << 24) != 0 {
        apic.write(0x320, (2 << 17) | u32::from(IDLE_VECTOR));
        // SAFETY: IA32_TSC_DEADLINE exists when CPUID reports the TSC-deadline timer; writing
        // it arms (or, for a past value, fires) the timer just set to that mode.
        unsafe { wrmsr(TSC_DEADLINE_MSR, deadline) };
        return true;
    }
    // One-shot, divide by 16 (TDCR 0b0011).
    apic.write(0x3e0, 0b0011);
    let mut hz = APIC_TIMER_HZ.load(Ordering::Relaxed);
    if hz == 0 {
        apic.write(0x320, 1 << 16);
        apic.write(0x380, u32::MAX);
        let t0 = crate::platform::rdtsc();
        let until = t0 + tsc_hz / 1000;
        while crate::platform::rdtsc() < until {
            core::hint::spin_loop();
        }
        let counted = u64::from(u32::MAX - apic.read(0x390));
        apic.write(0x380, 0);
        hz = counted * 1000;
        if hz == 0 {
            return false;
        }
        APIC_TIMER_HZ.store(hz, Ordering::Relaxed);
    }
    let ticks = ((u128::from(deadline - now) * u128::from(hz)) / u128::from(tsc_hz.max(1))) as u64;
    apic.write(0x320, u32::from(IDLE_VECTOR));
    apic.write(0x380, ticks.clamp(1, u64::from(u32::MAX)) as u32);
    true
}

/// Counts an NMI that caused a VM exit.
pub fn nmi_exit() {
    NMIS_GUEST.fetch_add(1, Ordering::Relaxed);
}

/// `selftest=interrupts`: arms the local APIC timer (periodic) so that interrupts keep arriving
/// while the VMs run. Returns false (with a log line) when there is no usable local APIC.
pub fn start_selftest() -> bool {
    let Some(apic) = Lapic::current() else {
        log::warn!(target: "hv", "selftest=interrupts: no enabled local APIC; nothing armed");
        SELFTEST.store(false, Ordering::Relaxed);
        return false;
    };
    // Software-enable the APIC (spurious vector 0xFF), accept every priority (TPR 0), divide by
    // 16, periodic, unmasked.
    apic.write(0xf0, 0x1ff);
    apic.write(0x80, 0);
    apic.write(0x3e0, 0b0011);
    apic.write(0x320, (1 << 17) | u32::from(SELFTEST_VECTOR));
    apic.write(0x380, 20_000);
    SELFTEST.store(true, Ordering::Relaxed);
    log::info!(target: "hv", "selftest=interrupts: local APIC timer armed (vector {SELFTEST_VECTOR:#x}, periodic), self-NMIs every 16 rounds");
    true
}

/// Called once per scheduling round while the self-test runs: every 16th round, a self-NMI.
pub fn selftest_round(round: u64) {
    if SELFTEST.load(Ordering::Relaxed) && round.is_multiple_of(16) {
        if let Some(apic) = Lapic::current() {
            apic.self_nmi();
        }
    }
}

/// Stops the self-test timer and logs what arrived, and how long the CPU slept.
pub fn finish(tsc_hz: u64) {
    if SELFTEST.swap(false, Ordering::Relaxed) {
        if let Some(apic) = Lapic::current() {
            apic.write(0x320, 1 << 16); // masked
            apic.write(0x380, 0);
        }
    }
    log::info!(target: "hv", "idle: halts={} halted_us={} wakeups={}",
        IDLE_HALTS.load(Ordering::Relaxed),
        hv_vm::sched::tsc_to_us(IDLE_TSC.load(Ordering::Relaxed), tsc_hz),
        IDLE_WAKEUPS.load(Ordering::Relaxed));
    log::info!(target: "hv", "host interrupts: external={} eoi={} nmi_root={} nmi_guest={}",
        EXTERNAL.load(Ordering::Relaxed), EXTERNAL_EOI.load(Ordering::Relaxed),
        NMIS_ROOT.load(Ordering::Relaxed), NMIS_GUEST.load(Ordering::Relaxed));
}
