//! The local APIC of a single-vCPU VM (Intel SDM Vol. 3A chapter 11, "Advanced Programmable
//! Interrupt Controller (APIC)"; chapter 10 in older editions, whose section numbers the
//! comments here use).
//!
//! This model owns the APIC's architectural state: IA32_APIC_BASE and its mode transitions,
//! the xAPIC register page (through [`MmioDevice`]), the x2APIC MSRs, IA32_TSC_DEADLINE, the
//! APIC timer, the IRR/ISR/TMR and the priority logic that picks the vector the CPU takes next.
//! It must not touch the vCPU (the platform injects what [`Lapic::pending_vector`] and
//! [`Lapic::take_nmi`] report and calls [`Lapic::acknowledge`] when it does), the 8259 PICs
//! (the platform asks [`Lapic::lint0_mode`] whether their INTR reaches the CPU) or the IOAPIC
//! (the platform hands it the vectors [`Lapic::take_level_eoi`] reports, and hands this model
//! the IOAPIC's messages after [`Lapic::matches_destination`]).
//!
//! # Choices where the SDM leaves freedom
//!
//! - APIC ID 0 (the only vCPU, the BSP). The xAPIC ID register is writable (bits 31:24; Table
//!   10-1 lists it read/write, and 10.4.6 makes that model specific); the x2APIC ID is always 0.
//! - Version 0x0005_0014: a Pentium 4-class integrated APIC with six LVT entries (timer,
//!   thermal, performance counter, LINT0, LINT1, error); no CMCI LVT (its register is undefined)
//!   and no EOI-broadcast suppression (version bit 24 clear, so SVR bit 12 is reserved).
//! - The timer counts APIC bus ticks at [`APIC_BUS_HZ`] (1 GHz, as KVM: one tick a
//!   nanosecond), or at the TSC's rate where that is slower ([`apic_bus_hz`]). A write to the initial count starts counting at that instant, not at a bus
//!   clock edge. A switch to or from TSC-deadline mode disarms the timer and clears the initial
//!   count and the TSC deadline (10.5.4.1); between one-shot and periodic the count goes on
//!   from where it is (as KVM; kvm-unit-tests' `apic` checks it). Mode 0b11 (reserved) is kept
//!   as written and the timer does not count in it. A write to the divide configuration while the timer counts keeps the current
//!   count and counts on at the new rate from the write (the part of a divided tick already
//!   elapsed is dropped).
//! - A software-disabled APIC (SVR bit 8 clear) does not accept fixed interrupts (as KVM);
//!   interrupts already in the IRR are held and [`Lapic::pending_vector`] reports none.
//! - IA32_APIC_BASE: the BSP bit reads 1 and ignores writes; bits 0-7, 9 and 52-63 are reserved
//!   (#GP): the model assumes a MAXPHYADDR of 52 and leaves a narrower check to the platform's
//!   CPUID. The platform must advertise x2APIC (CPUID.1:ECX bit 21) and the TSC-deadline timer
//!   (CPUID.1:ECX bit 24), both of which this model implements.
//! - Globally disabling the APIC (EN clear) puts every register in its reset state
//!   (10.12.5.1: no register state survives the x2APIC -> disabled -> xAPIC path). The firmware
//!   setup is not re-applied on re-enabling.
//! - The xAPIC page in x2APIC mode or while globally disabled (10.12.2: "the memory-mapped
//!   interface is not available"): reads return all ones, as unbacked physical memory does on a
//!   PC, and writes are ignored. Widths and offsets other than an aligned 32-bit access follow
//!   the crate's `regs` rule: reads give the bytes of the containing register, partial writes
//!   merge into it. Accesses to undefined registers read 0, ignore writes, and set ESR bit 7
//!   ("illegal register address", 10.5.3). Writes to read-only registers are ignored.
//! - x2APIC MSRs (10.12.1.2/10.12.1.3): #GP outside x2APIC mode, for undefined and
//!   xAPIC-only registers (APR, RRD, DFR, ICR high, CMCI), reads of EOI and SELF IPI, writes of
//!   read-only registers, any set reserved bit (bits 63:32 of every register but the ICR), and
//!   non-zero writes to EOI and ESR. Read-only bits such as delivery status may be written back
//!   as read. The ICR's reserved bits are those KVM checks (31:20, 17:16, 13).
//! - IPIs: delivery completes at once, so delivery status (ICR bit 12) always reads 0. A fixed
//!   or lowest-priority IPI that reaches this APIC (self shorthand, all-including-self, or a
//!   destination it matches) sets its IRR bit as an edge; NMI to self sets the pending NMI;
//!   INIT, start-up, SMI and reserved modes to self are ignored (logged). Anything addressed to
//!   other CPUs is dropped with a debug log: there are none. An IPI with an illegal vector
//!   (0-15) sets ESR bit 5 ("send illegal vector") and is not sent.
//! - ExtINT and NMI bypass the IRR and the priority logic: the platform takes the PIC's vector
//!   when [`Lapic::lint0_mode`] is [`LintMode::ExtInt`] and injects NMIs from
//!   [`Lapic::take_nmi`].
//!
//! # Not emulated
//!
//! INIT/SIPI/SMI handling, the thermal and performance-counter interrupt sources (their LVT
//! entries are registers only), CMCI, remote read, arbitration (APR reads 0), the focus
//! processor (SVR bit 9 is stored only), spurious-vector delivery when the TPR rises between
//! INTR and INTA (the platform injects what it acknowledges), and LINT0/LINT1 level sensing
//! (their remote IRR bits read 0).

use crate::bus::{Ctx, MmioDevice};
use crate::regs::{self, Dwords};
use crate::time::{Timebase, Tsc};

/// The APIC timer's input clock: the "bus" or core-crystal clock the divide configuration
/// divides (SDM 10.5.4), at most: 1 GHz as KVM, so one tick is a nanosecond, unless the TSC is
/// slower ([`apic_bus_hz`]). A guest learns it by calibrating against the PIT or from the
/// hypervisor's CPUID leaf 0x4000_0010, never from the model.
pub const APIC_BUS_HZ: u64 = 1_000_000_000;

/// The rate the timer counts at on a CPU whose TSC runs at `tsc_hz`: [`APIC_BUS_HZ`], or the
/// TSC's rate when that is slower (an emulator's TSC can be). On every real CPU the APIC timer's
/// clock (the bus or crystal clock) is slower than the TSC, and guests rely on it: a count of N
/// takes at least N TSC ticks (kvm-unit-tests' `apic` checks it). CPUID leaf 0x4000_0010 EBX
/// reports this rate.
pub fn apic_bus_hz(tsc_hz: u64) -> u64 {
    APIC_BUS_HZ.min(tsc_hz.max(1))
}

/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1B;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6E0;
/// The x2APIC MSR range (SDM 10.12.1.2): MSR 0x800 + (xAPIC offset >> 4).
pub const MSR_X2APIC_FIRST: u32 = 0x800;
pub const MSR_X2APIC_LAST: u32 = 0x8FF;

/// The xAPIC page's address after reset (SDM 10.4.5).
pub const DEFAULT_MMIO_BASE: u64 = 0xFEE0_0000;
/// The size of the xAPIC page.
pub const MMIO_SIZE: u64 = 0x1000;

/// The version register: version 0x14 (integrated APIC), max LVT entry 5 (six entries).
pub const VERSION: u32 = 0x0005_0014;

/// ESR bit 5: an IPI with a vector in 0-15 was sent (SDM 10.5.3).
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// ESR bit 6: an interrupt with a vector in 0-15 was received or generated locally.
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
/// ESR bit 7: the xAPIC page was accessed at an unimplemented register.
pub const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

/// The instruction raises #GP(0): a WRMSR/RDMSR the architecture refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gp;

/// Where an LVT LINT entry sends its pin (SDM 10.5.1, delivery mode bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LintMode {
    /// The pin reaches nothing: masked, or a delivery mode this model does not emulate (SMI,
    /// INIT, reserved).
    Masked,
    /// The pin is the CPU's INTR: the vector comes from the 8259 PIC's INTA cycle. Also
    /// reported for LINT0 while the APIC is hardware-disabled, when the pin is wired to the CPU
    /// directly (SDM 10.4.3).
    ExtInt,
    /// The pin raises this vector through the IRR.
    Fixed(u8),
    /// The pin raises an NMI. Also reported for LINT1 while the APIC is hardware-disabled.
    Nmi,
}

/// Register numbers: the xAPIC offset divided by 16, which is also the x2APIC MSR minus 0x800
/// (SDM Tables 10-1 and 10-6).
mod reg {
    pub const ID: u32 = 0x02;
    pub const VERSION: u32 = 0x03;
    pub const TPR: u32 = 0x08;
    pub const APR: u32 = 0x09;
    pub const PPR: u32 = 0x0A;
    pub const EOI: u32 = 0x0B;
    pub const RRD: u32 = 0x0C;
    pub const LDR: u32 = 0x0D;
    pub const DFR: u32 = 0x0E;
    pub const SVR: u32 = 0x0F;
    pub const ISR: u32 = 0x10;
    pub const ISR_LAST: u32 = 0x17;
    pub const TMR: u32 = 0x18;
    pub const TMR_LAST: u32 = 0x1F;
    pub const IRR: u32 = 0x20;
    pub const IRR_LAST: u32 = 0x27;
    pub const ESR: u32 = 0x28;
    pub const ICR: u32 = 0x30;
    pub const ICR_HIGH: u32 = 0x31;
    pub const LVT: u32 = 0x32;
    pub const LVT_LAST: u32 = 0x37;
    pub const TMICT: u32 = 0x38;
    pub const TMCCT: u32 = 0x39;
    pub const TDCR: u32 = 0x3E;
    pub const SELF_IPI: u32 = 0x3F;
}

// IA32_APIC_BASE (SDM 10.4.4, Figure 10-5).
const BASE_BSP: u64 = 1 << 8;
const BASE_EXTD: u64 = 1 << 10;
const BASE_EN: u64 = 1 << 11;
const MAXPHYADDR: u32 = 52;
const BASE_ADDR: u64 = ((1 << MAXPHYADDR) - 1) & !0xFFF;

// LVT entries in register order (SDM 10.5.1, Figure 10-8), their writable bits and the
// read-only ones (delivery status 12, remote IRR 14) a write may carry back.
const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_LINT1: usize = 4;
const LVT_ERROR: usize = 5;
const LVT_WRITABLE: [u32; 6] = [
    0x0007_00FF, // timer: vector, mask, mode 18:17
    0x0001_07FF, // thermal: vector, delivery mode, mask
    0x0001_07FF, // performance counter: the same
    0x0001_A7FF, // LINT0: vector, delivery mode, polarity 13, trigger 15, mask
    0x0001_A7FF, // LINT1
    0x0001_00FF, // error: vector, mask
];
const LVT_READ_ONLY: [u32; 6] = [0x1000, 0x1000, 0x1000, 0x5000, 0x5000, 0x1000];
const LVT_MASKED: u32 = 1 << 16;
const LVT_LEVEL: u32 = 1 << 15;

// Timer modes, LVT timer bits 18:17 (SDM 10.5.4, Figure 10-8).
const TIMER_ONE_SHOT: u32 = 0;
const TIMER_PERIODIC: u32 = 1;
const TIMER_TSC_DEADLINE: u32 = 2;

/// SVR: vector 7:0, APIC software enable 8, focus processor checking 9 (SDM 10.9, Figure
/// 10-23); bit 12 is reserved because the version register does not offer EOI-broadcast
/// suppression.
const SVR_WRITABLE: u32 = 0x3FF;
const SVR_ENABLE: u32 = 1 << 8;
/// DFR: model bits 31:28 writable; 27:0 read as ones (SDM 10.6.2.2).
const DFR_RESERVED_ONES: u32 = 0x0FFF_FFFF;
/// Divide configuration: bits 0, 1 and 3 (SDM 10.5.4, Figure 10-10).
const TDCR_WRITABLE: u32 = 0xB;
/// ICR low: vector, delivery mode, destination mode, level 14, trigger 15, shorthand 19:18
/// (SDM 10.6.1, Figure 10-12). Delivery status (12) is read-only.
const ICR_LOW_WRITABLE: u32 = 0x000C_CFFF;
/// The x2APIC ICR's reserved bits (SDM 10.12.9, Figure 10-28).
const X2APIC_ICR_RESERVED: u64 = 0xFFF0_0000 | 0x3_0000 | 0x2000;
/// The x2APIC ID of the only vCPU (the initial APIC ID CPUID reports).
const X2APIC_ID: u32 = 0;

/// The APIC timer's state. Counting is kept as an origin and counts from it, never as a
/// decremented value, so current-count reads and expiries are exact functions of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    Idle,
    /// One-shot or periodic: at `origin` the count was `first`; expiry n (from 1) happens
    /// `first + (n - 1) * initial count` divided ticks after `origin`. `fired` expiries have
    /// been handled.
    Counting {
        origin: Tsc,
        first: u64,
        fired: u64,
    },
    /// TSC-deadline mode, armed for this TSC value.
    Deadline(Tsc),
}

/// 256 one-bit-per-vector registers (IRR, ISR, TMR) as eight 32-bit words, as the xAPIC page
/// lays them out (SDM 10.8.4).
type Bits256 = [u32; 8];

fn bit_test(r: &Bits256, v: u8) -> bool {
    r[usize::from(v >> 5)] & (1 << (v & 31)) != 0
}

fn bit_set(r: &mut Bits256, v: u8, on: bool) {
    let w = &mut r[usize::from(v >> 5)];
    if on {
        *w |= 1 << (v & 31);
    } else {
        *w &= !(1 << (v & 31));
    }
}

fn highest(r: &Bits256) -> Option<u8> {
    (0..8u8).rev().find_map(|i| {
        let w = r[usize::from(i)];
        (w != 0).then(|| i * 32 + (31 - w.leading_zeros()) as u8)
    })
}

fn lowest(r: &Bits256) -> Option<u8> {
    (0..8u8).find_map(|i| {
        let w = r[usize::from(i)];
        (w != 0).then(|| i * 32 + w.trailing_zeros() as u8)
    })
}

/// IA32_APIC_BASE's EN and EXTD bits (SDM 10.12.5, Figure 10-27).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Disabled,
    Invalid,
    XApic,
    X2Apic,
}

fn mode_of(apic_base: u64) -> Mode {
    match (apic_base & BASE_EN != 0, apic_base & BASE_EXTD != 0) {
        (false, false) => Mode::Disabled,
        (false, true) => Mode::Invalid,
        (true, false) => Mode::XApic,
        (true, true) => Mode::X2Apic,
    }
}

/// The local APIC.
#[derive(Clone, Debug)]
pub struct Lapic {
    timebase: Timebase,
    apic_base: u64,
    xapic_id: u8,
    tpr: u8,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: Bits256,
    tmr: Bits256,
    irr: Bits256,
    /// ESR as last latched by a write, and the errors seen since (SDM 10.5.3).
    esr: u32,
    esr_pending: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; 6],
    initial_count: u32,
    divide_config: u32,
    timer: Timer,
    timer_coalesced: u64,
    nmi_pending: bool,
    /// Vectors of level-triggered interrupts the guest EOI'd, for the IOAPIC.
    level_eois: Bits256,
}

impl Lapic {
    /// A local APIC in its power-up state (SDM 10.4.7.1): globally enabled in xAPIC mode at
    /// 0xFEE00000 as the BSP, software-disabled (SVR 0xFF), every LVT entry masked, IRR, ISR,
    /// TMR, ICR, LDR, TPR and the timer zero, DFR all ones.
    pub fn new(timebase: Timebase) -> Self {
        Self::power_up(timebase, DEFAULT_MMIO_BASE | BASE_BSP | BASE_EN)
    }

    fn power_up(timebase: Timebase, apic_base: u64) -> Self {
        Self {
            timebase,
            apic_base,
            xapic_id: 0,
            tpr: 0,
            ldr: 0,
            dfr: u32::MAX,
            svr: 0xFF,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_pending: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [LVT_MASKED; 6],
            initial_count: 0,
            divide_config: 0,
            timer: Timer::Idle,
            timer_coalesced: 0,
            nmi_pending: false,
            level_eois: [0; 8],
        }
    }

    /// What PC firmware leaves in the BSP's APIC before it boots an OS (SeaBIOS's
    /// `smp_setup`): software-enabled with spurious vector 0xFF (SVR 0x1FF), LINT0 in ExtINT
    /// mode (0x700: the 8259 PIC's INTR reaches the CPU, "virtual wire" mode) and LINT1 in NMI
    /// mode (0x400). SeaBIOS also sets the trigger bit (0x8700, 0x8400), which the SDM
    /// (10.5.1) ignores for these delivery modes; it is left clear here. The platform applies
    /// this when it creates the VM, since it boots guests without firmware.
    pub fn firmware_setup(&mut self) {
        // SVR first: LVT entries written while software-disabled stay masked.
        self.write_svr(0x1FF);
        // Not the timer's entry: no time is needed.
        self.write_lvt(LVT_LINT0, 0x700, 0);
        self.write_lvt(LVT_LINT1, 0x400, 0);
    }

    /// Every register back to its power-up value; IA32_APIC_BASE and the statistics stay.
    fn reset_registers(&mut self) {
        let coalesced = self.timer_coalesced;
        *self = Self::power_up(self.timebase, self.apic_base);
        self.timer_coalesced = coalesced;
    }

    // ---- IA32_APIC_BASE and modes ----

    /// IA32_APIC_BASE as RDMSR reads it.
    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// WRMSR to IA32_APIC_BASE. The legal transitions are those of SDM 10.12.5.1 (Figure
    /// 10-27): xAPIC -> x2APIC, xAPIC or x2APIC -> disabled, disabled -> xAPIC, and any mode to
    /// itself (which may move the base). Everything else, and any reserved bit, is #GP.
    pub fn write_apic_base(&mut self, value: u64) -> Result<(), Gp> {
        if value & !(BASE_ADDR | BASE_BSP | BASE_EXTD | BASE_EN) != 0 {
            return Err(Gp);
        }
        match (mode_of(self.apic_base), mode_of(value)) {
            (from, to) if from == to => {}
            (Mode::XApic, Mode::X2Apic) => {
                // 10.12.5.1: entering x2APIC mode keeps the register state except the ID
                // written through the page, the LDR (derived from the x2APIC ID from now on)
                // and the ICR's high half.
                self.xapic_id = 0;
                self.ldr = 0;
                self.icr_high = 0;
            }
            (Mode::XApic | Mode::X2Apic, Mode::Disabled) => self.reset_registers(),
            (Mode::Disabled, Mode::XApic) => {}
            _ => return Err(Gp),
        }
        // The BSP flag is the hardware's, not software's: writes do not change it.
        self.apic_base = (value & !BASE_BSP) | (self.apic_base & BASE_BSP);
        Ok(())
    }

    /// Where the guest placed the xAPIC page (IA32_APIC_BASE bits 51:12). The platform maps
    /// [`MMIO_SIZE`] bytes there while [`Self::xapic_mode`] holds.
    pub fn mmio_base(&self) -> u64 {
        self.apic_base & BASE_ADDR
    }

    /// IA32_APIC_BASE.EN: while clear the APIC accepts nothing and the PIC's INTR and the NMI
    /// pin reach the CPU directly (SDM 10.4.3).
    pub fn hardware_enabled(&self) -> bool {
        self.apic_base & BASE_EN != 0
    }

    /// Enabled in xAPIC mode: the MMIO page is the interface.
    pub fn xapic_mode(&self) -> bool {
        mode_of(self.apic_base) == Mode::XApic
    }

    /// Enabled in x2APIC mode: the MSRs are the interface.
    pub fn x2apic_mode(&self) -> bool {
        mode_of(self.apic_base) == Mode::X2Apic
    }

    /// SVR bit 8 (SDM 10.4.3).
    pub fn software_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// The APIC ID: the xAPIC ID register's bits 31:24, or the x2APIC ID.
    pub fn id(&self) -> u32 {
        if self.x2apic_mode() {
            X2APIC_ID
        } else {
            u32::from(self.xapic_id)
        }
    }

    /// The x2APIC logical ID (SDM 10.12.10.2): cluster ID[19:4] in bits 31:16, one bit for
    /// ID[3:0] below.
    fn x2apic_ldr(&self) -> u32 {
        ((X2APIC_ID >> 4) << 16) | (1 << (X2APIC_ID & 0xF))
    }

    // ---- MSRs ----

    /// Whether this model answers RDMSR/WRMSR of `index`.
    pub fn handles_msr(index: u32) -> bool {
        matches!(
            index,
            MSR_APIC_BASE | MSR_TSC_DEADLINE | MSR_X2APIC_FIRST..=MSR_X2APIC_LAST
        )
    }

    /// RDMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register at time `now` (the
    /// current count and the deadline depend on it). Other MSRs are #GP.
    pub fn msr_read(&mut self, index: u32, now: Tsc) -> Result<u64, Gp> {
        self.advance(now);
        match index {
            MSR_APIC_BASE => Ok(self.apic_base),
            MSR_TSC_DEADLINE => Ok(self.tsc_deadline()),
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST if self.x2apic_mode() => {
                self.x2apic_read(index - MSR_X2APIC_FIRST, now)
            }
            _ => Err(Gp),
        }
    }

    /// WRMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register at time `now`.
    /// Other MSRs are #GP.
    pub fn msr_write(&mut self, index: u32, value: u64, now: Tsc) -> Result<(), Gp> {
        self.advance(now);
        match index {
            MSR_APIC_BASE => self.write_apic_base(value),
            MSR_TSC_DEADLINE => {
                self.write_tsc_deadline(value, now);
                Ok(())
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST if self.x2apic_mode() => {
                self.x2apic_write(index - MSR_X2APIC_FIRST, value, now)
            }
            _ => Err(Gp),
        }
    }

    fn x2apic_read(&self, r: u32, now: Tsc) -> Result<u64, Gp> {
        let v = match r {
            reg::ID => X2APIC_ID,
            reg::VERSION => VERSION,
            reg::TPR => u32::from(self.tpr),
            reg::PPR => u32::from(self.ppr()),
            reg::LDR => self.x2apic_ldr(),
            reg::SVR => self.svr,
            reg::ISR..=reg::ISR_LAST => self.isr[(r - reg::ISR) as usize],
            reg::TMR..=reg::TMR_LAST => self.tmr[(r - reg::TMR) as usize],
            reg::IRR..=reg::IRR_LAST => self.irr[(r - reg::IRR) as usize],
            reg::ESR => self.esr,
            reg::ICR => return Ok(u64::from(self.icr_high) << 32 | u64::from(self.icr_low)),
            reg::LVT..=reg::LVT_LAST => self.lvt[(r - reg::LVT) as usize],
            reg::TMICT => self.initial_count,
            reg::TMCCT => self.current_count(now),
            reg::TDCR => self.divide_config,
            // EOI and SELF IPI are write-only; APR, RRD, DFR and the ICR's high half do not
            // exist in x2APIC mode (SDM Table 10-6).
            _ => return Err(Gp),
        };
        Ok(u64::from(v))
    }

    fn x2apic_write(&mut self, r: u32, value: u64, now: Tsc) -> Result<(), Gp> {
        // SDM 10.12.1.3: a non-zero write to a reserved bit is #GP.
        let check = |allowed: u64| {
            if value & !allowed == 0 {
                Ok(())
            } else {
                Err(Gp)
            }
        };
        let v = value as u32;
        match r {
            reg::TPR => {
                check(0xFF)?;
                self.tpr = v as u8;
            }
            reg::EOI => {
                check(0)?;
                self.guest_eoi();
            }
            reg::SVR => {
                check(u64::from(SVR_WRITABLE))?;
                self.write_svr(v);
            }
            reg::ESR => {
                check(0)?;
                self.latch_esr();
            }
            reg::ICR => {
                check(!X2APIC_ICR_RESERVED)?;
                self.icr_low = v & ICR_LOW_WRITABLE;
                self.icr_high = (value >> 32) as u32;
                self.send_ipi(self.icr_low, self.icr_high, u32::MAX);
            }
            reg::LVT..=reg::LVT_LAST => {
                let i = (r - reg::LVT) as usize;
                check(u64::from(LVT_WRITABLE[i] | LVT_READ_ONLY[i]))?;
                self.write_lvt(i, v, now);
            }
            reg::TMICT => {
                check(u64::from(u32::MAX))?;
                self.write_initial_count(v, now);
            }
            reg::TDCR => {
                check(u64::from(TDCR_WRITABLE))?;
                self.write_divide_config(v, now);
            }
            reg::SELF_IPI => {
                check(0xFF)?;
                self.self_ipi(v as u8);
            }
            // Read-only registers (ID, version, PPR, LDR, ISR, TMR, IRR, current count) and
            // undefined ones.
            _ => return Err(Gp),
        }
        Ok(())
    }

    // ---- xAPIC page ----

    fn xapic_peek(&self, r: u32, now: Tsc) -> Option<u32> {
        Some(match r {
            reg::ID => u32::from(self.xapic_id) << 24,
            reg::VERSION => VERSION,
            reg::TPR => u32::from(self.tpr),
            reg::APR | reg::EOI | reg::RRD => 0,
            reg::PPR => u32::from(self.ppr()),
            reg::LDR => self.ldr,
            reg::DFR => self.dfr,
            reg::SVR => self.svr,
            reg::ISR..=reg::ISR_LAST => self.isr[(r - reg::ISR) as usize],
            reg::TMR..=reg::TMR_LAST => self.tmr[(r - reg::TMR) as usize],
            reg::IRR..=reg::IRR_LAST => self.irr[(r - reg::IRR) as usize],
            reg::ESR => self.esr,
            reg::ICR => self.icr_low,
            reg::ICR_HIGH => self.icr_high,
            reg::LVT..=reg::LVT_LAST => self.lvt[(r - reg::LVT) as usize],
            reg::TMICT => self.initial_count,
            reg::TMCCT => self.current_count(now),
            reg::TDCR => self.divide_config,
            _ => return None,
        })
    }

    fn xapic_write(&mut self, r: u32, v: u32, now: Tsc) {
        match r {
            reg::ID => self.xapic_id = (v >> 24) as u8,
            reg::TPR => self.tpr = v as u8,
            // 10.8.5: the value written to EOI does not matter in xAPIC mode.
            reg::EOI => self.guest_eoi(),
            reg::LDR => self.ldr = v & 0xFF00_0000,
            reg::DFR => self.dfr = v | DFR_RESERVED_ONES,
            reg::SVR => self.write_svr(v),
            reg::ESR => self.latch_esr(),
            reg::ICR => {
                self.icr_low = v & ICR_LOW_WRITABLE;
                self.send_ipi(self.icr_low, self.icr_high >> 24, 0xFF);
            }
            reg::ICR_HIGH => self.icr_high = v & 0xFF00_0000,
            reg::LVT..=reg::LVT_LAST => self.write_lvt((r - reg::LVT) as usize, v, now),
            reg::TMICT => self.write_initial_count(v, now),
            reg::TDCR => self.write_divide_config(v, now),
            reg::VERSION
            | reg::APR
            | reg::PPR
            | reg::RRD
            | reg::ISR..=reg::IRR_LAST
            | reg::TMCCT => {}
            _ => self.signal_error(ESR_ILLEGAL_REGISTER),
        }
    }

    fn write_svr(&mut self, v: u32) {
        self.svr = v & SVR_WRITABLE;
        if !self.software_enabled() {
            // 10.4.7.2: software-disabling sets every LVT mask bit.
            for e in &mut self.lvt {
                *e |= LVT_MASKED;
            }
        }
    }

    fn write_lvt(&mut self, i: usize, v: u32, now: Tsc) {
        let Some(&writable) = LVT_WRITABLE.get(i) else {
            return;
        };
        let mut new = v & writable;
        if !self.software_enabled() {
            // 10.4.7.2: while software-disabled, attempts to clear a mask bit are ignored.
            new |= LVT_MASKED;
        }
        if i == LVT_TIMER {
            let (from, to) = (self.timer_mode(), (new >> 17) & 3);
            if from != to {
                self.change_timer_mode(from, to, now);
            }
        }
        self.lvt[i] = new;
    }

    /// 10.5.3: a write to the ESR makes the errors seen since the previous write readable
    /// and starts collecting anew.
    fn latch_esr(&mut self) {
        self.esr = self.esr_pending;
        self.esr_pending = 0;
    }

    /// Records an error and raises the LVT error interrupt if it is unmasked (10.5.3).
    fn signal_error(&mut self, bits: u32) {
        self.esr_pending |= bits;
        let lvt = self.lvt[LVT_ERROR];
        if !self.hardware_enabled() || lvt & LVT_MASKED != 0 {
            return;
        }
        let vector = lvt as u8;
        if vector < 16 {
            // An illegal error vector is itself an error; not raised again, which would loop.
            self.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR;
        } else {
            bit_set(&mut self.irr, vector, true);
            bit_set(&mut self.tmr, vector, false);
        }
    }

    // ---- Interrupt acceptance and priority (SDM 10.8) ----

    /// An interrupt for this APIC (an IOAPIC message that [`Self::matches_destination`], an
    /// LVT source, an IPI): sets its IRR bit and its TMR bit to `level_triggered` (10.8.4).
    /// Vectors 0-15 are illegal (10.5.2): ESR bit 6 and the error interrupt instead. Nothing
    /// is accepted while the APIC is hardware- or software-disabled.
    pub fn accept_interrupt(&mut self, vector: u8, level_triggered: bool) {
        if !self.hardware_enabled() {
            return;
        }
        if vector < 16 {
            self.signal_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        if !self.software_enabled() {
            log::debug!("lapic: vector {vector:#x} dropped, APIC software-disabled");
            return;
        }
        bit_set(&mut self.irr, vector, true);
        bit_set(&mut self.tmr, vector, level_triggered);
    }

    /// The task priority (TPR bits 7:0).
    pub fn tpr(&self) -> u8 {
        self.tpr
    }

    /// The processor priority (10.8.3.1): the TPR if its class is at least that of the highest
    /// in-service vector, else that vector's class.
    pub fn ppr(&self) -> u8 {
        let isrv = highest(&self.isr).unwrap_or(0);
        if self.tpr & 0xF0 >= isrv & 0xF0 {
            self.tpr
        } else {
            isrv & 0xF0
        }
    }

    /// The vector the CPU would take now: the highest IRR vector whose priority class is
    /// above the PPR's (10.8.3.1). None while the APIC is disabled. ExtINT (the PIC through
    /// LINT0) and NMIs bypass this: see [`Self::lint0_mode`] and [`Self::take_nmi`].
    pub fn pending_vector(&self) -> Option<u8> {
        if !self.hardware_enabled() || !self.software_enabled() {
            return None;
        }
        let v = highest(&self.irr)?;
        (v & 0xF0 > self.ppr() & 0xF0).then_some(v)
    }

    /// The CPU took `vector` (the platform injected it): its IRR bit moves to the ISR
    /// (10.8.4). A vector that is not requested is ignored.
    pub fn acknowledge(&mut self, vector: u8) {
        if !bit_test(&self.irr, vector) {
            log::debug!("lapic: acknowledge of vector {vector:#x} that is not requested");
            return;
        }
        bit_set(&mut self.irr, vector, false);
        bit_set(&mut self.isr, vector, true);
    }

    /// An EOI (10.8.5): clears the highest ISR bit. Returns that vector if its TMR bit is set:
    /// a level-triggered interrupt, whose EOI the platform forwards to the IOAPIC.
    pub fn eoi(&mut self) -> Option<u8> {
        let v = highest(&self.isr)?;
        bit_set(&mut self.isr, v, false);
        bit_test(&self.tmr, v).then_some(v)
    }

    /// An EOI written by the guest: the level-triggered vector waits for
    /// [`Self::take_level_eoi`].
    fn guest_eoi(&mut self) {
        if let Some(v) = self.eoi() {
            bit_set(&mut self.level_eois, v, true);
        }
    }

    /// A vector of a level-triggered interrupt the guest EOI'd through the page or the MSR
    /// since the platform last asked, for the IOAPIC's [`crate::ioapic::IoApic::eoi`]. The
    /// platform drains it after each access.
    pub fn take_level_eoi(&mut self) -> Option<u8> {
        if self.level_eois == [0; 8] {
            return None;
        }
        let v = lowest(&self.level_eois)?;
        bit_set(&mut self.level_eois, v, false);
        Some(v)
    }

    /// MOV to CR8 (SDM 10.8.6.1): TPR bits 7:4 = CR8 bits 3:0, TPR bits 3:0 = 0. CR8 bits
    /// 63:4 are reserved (the instruction raises #GP).
    pub fn set_tpr_from_cr8(&mut self, cr8: u64) -> Result<(), Gp> {
        if cr8 > 0xF {
            return Err(Gp);
        }
        self.tpr = (cr8 as u8) << 4;
        Ok(())
    }

    /// MOV from CR8: TPR bits 7:4.
    pub fn cr8(&self) -> u64 {
        u64::from(self.tpr >> 4)
    }

    /// The IRR, ISR or TMR bit of `vector`, for the platform's diagnostics and tests.
    pub fn irr(&self, vector: u8) -> bool {
        bit_test(&self.irr, vector)
    }

    pub fn isr(&self, vector: u8) -> bool {
        bit_test(&self.isr, vector)
    }

    pub fn tmr(&self, vector: u8) -> bool {
        bit_test(&self.tmr, vector)
    }

    // ---- Destinations and IPIs (SDM 10.6) ----

    /// Whether a message with this destination reaches this APIC (10.6.2): physical, `dest`
    /// is the APIC ID or the broadcast 0xFF; logical, `dest` matches the LDR in the DFR's
    /// flat or cluster model (in x2APIC mode, the x2APIC logical ID with cluster 0). Used for
    /// the IOAPIC's 8-bit destinations. Never while hardware-disabled.
    pub fn matches_destination(&self, physical: bool, dest: u8) -> bool {
        self.matches(physical, u32::from(dest), 0xFF)
    }

    fn matches(&self, physical: bool, dest: u32, broadcast: u32) -> bool {
        if !self.hardware_enabled() {
            return false;
        }
        if dest == broadcast {
            return true;
        }
        if self.x2apic_mode() {
            if physical {
                return dest == X2APIC_ID;
            }
            // 10.12.10.2: same cluster, and a common bit in the low 16.
            let ldr = self.x2apic_ldr();
            return dest >> 16 == ldr >> 16 && dest & ldr & 0xFFFF != 0;
        }
        if physical {
            return dest == u32::from(self.xapic_id);
        }
        let (d, l) = (dest as u8, (self.ldr >> 24) as u8);
        match self.dfr >> 28 {
            // Flat model (10.6.2.2): any common bit.
            0xF => d & l != 0,
            // Cluster model: cluster in bits 7:4 (15 = every cluster), a common bit in 3:0.
            0x0 => (d >> 4 == 0xF || d >> 4 == l >> 4) && d & l & 0xF != 0,
            _ => false,
        }
    }

    /// Sends the IPI an ICR write describes (10.6.1). `broadcast` is the all-APICs
    /// destination of the mode (0xFF in xAPIC mode, 0xFFFF_FFFF in x2APIC mode).
    fn send_ipi(&mut self, low: u32, dest: u32, broadcast: u32) {
        let vector = low as u8;
        let delivery = (low >> 8) & 7;
        let physical = low & (1 << 11) == 0;
        let (to_self, to_others) = match (low >> 18) & 3 {
            0 => (
                self.matches(physical, dest, broadcast),
                !(physical && dest == self.id()),
            ),
            1 => (true, false),
            2 => (true, true),
            _ => (false, true),
        };
        if delivery <= 1 && vector < 16 {
            self.signal_error(ESR_SEND_ILLEGAL_VECTOR);
            return;
        }
        if to_others {
            log::debug!("lapic: IPI {low:#x} to {dest:#x} dropped: there is no other CPU");
        }
        if !to_self {
            return;
        }
        match delivery {
            // Fixed and lowest priority: this is the only and so the lowest-priority CPU.
            // 10.6.1: the trigger mode only matters for INIT level de-assert; IPIs are edges.
            0 | 1 => self.accept_interrupt(vector, false),
            4 => self.nmi_pending = true,
            _ => log::debug!("lapic: self IPI {low:#x} (SMI/INIT/SIPI/reserved) ignored"),
        }
    }

    /// x2APIC SELF IPI (10.12.11): a fixed, edge IPI to this APIC.
    fn self_ipi(&mut self, vector: u8) {
        if vector < 16 {
            self.signal_error(ESR_SEND_ILLEGAL_VECTOR);
        } else {
            self.accept_interrupt(vector, false);
        }
    }

    // ---- LINT0, LINT1, NMI ----

    fn lint_mode(&self, i: usize) -> LintMode {
        let lvt = self.lvt[i];
        if lvt & LVT_MASKED != 0 {
            return LintMode::Masked;
        }
        match (lvt >> 8) & 7 {
            0 => LintMode::Fixed(lvt as u8),
            4 => LintMode::Nmi,
            7 => LintMode::ExtInt,
            _ => LintMode::Masked,
        }
    }

    /// Where the LINT0 pin (the 8259 PIC's INTR output on a PC) goes.
    pub fn lint0_mode(&self) -> LintMode {
        if !self.hardware_enabled() {
            return LintMode::ExtInt;
        }
        self.lint_mode(LVT_LINT0)
    }

    /// Where the LINT1 pin (the PC's NMI source) goes.
    pub fn lint1_mode(&self) -> LintMode {
        if !self.hardware_enabled() {
            return LintMode::Nmi;
        }
        self.lint_mode(LVT_LINT1)
    }

    /// The platform asserts LINT1 (an edge): an NMI in NMI mode, the vector in fixed mode,
    /// nothing when masked.
    pub fn raise_lint1(&mut self) {
        match self.lint1_mode() {
            LintMode::Nmi => self.nmi_pending = true,
            LintMode::Fixed(v) => {
                let level = self.lvt[LVT_LINT1] & LVT_LEVEL != 0;
                self.accept_interrupt(v, level)
            }
            LintMode::ExtInt | LintMode::Masked => {}
        }
    }

    /// An NMI message for this APIC (an IOAPIC entry in NMI mode).
    pub fn deliver_nmi(&mut self) {
        if self.hardware_enabled() {
            self.nmi_pending = true;
        }
    }

    /// Whether an NMI is pending (from LINT1, an IPI or a message); taking it clears it.
    pub fn take_nmi(&mut self) -> bool {
        core::mem::take(&mut self.nmi_pending)
    }

    // ---- Timer (SDM 10.5.4) ----

    fn timer_mode(&self) -> u32 {
        (self.lvt[LVT_TIMER] >> 17) & 3
    }

    /// The timer's input clock, Hz ([`apic_bus_hz`]).
    fn bus_hz(&self) -> u64 {
        apic_bus_hz(self.timebase.tsc_hz())
    }

    /// log2 of the divisor: divide configuration bits 3,1:0 = 0b000 divides by 2, ... 0b110
    /// by 128, 0b111 by 1 (10.5.4, Figure 10-10).
    fn divide_shift(&self) -> u32 {
        let v = (self.divide_config & 3) | ((self.divide_config >> 1) & 4);
        (v + 1) & 7
    }

    /// The divisor the divide configuration selects (1 to 128).
    pub fn timer_divisor(&self) -> u32 {
        1 << self.divide_shift()
    }

    /// Whole divided ticks from `origin` to `now` (rounded down).
    fn counts_between(&self, origin: Tsc, now: Tsc) -> u128 {
        // Timebase takes the 64-bit path when the product fits (the common case).
        let bus = self
            .timebase
            .cycles_in(now.saturating_sub(origin), self.bus_hz());
        u128::from(bus >> self.divide_shift())
    }

    /// The TSC time at which `counts` divided ticks from `origin` have elapsed (rounded up, so
    /// the tick has happened then). Saturates.
    fn tsc_after(&self, origin: Tsc, counts: u128) -> Tsc {
        // The 64-bit path when everything fits (one hardware division), else 128 bits.
        let fast = u64::try_from(counts)
            .ok()
            .and_then(|c| c.checked_mul(1 << self.divide_shift()))
            .filter(|bus| bus.checked_mul(self.timebase.tsc_hz()).is_some());
        if let Some(bus) = fast {
            return origin.saturating_add(self.timebase.ticks_for(bus, self.bus_hz()));
        }
        let ticks = counts
            .checked_mul(1 << self.divide_shift())
            .and_then(|bus| bus.checked_mul(u128::from(self.timebase.tsc_hz())))
            .map(|t| t.div_ceil(u128::from(self.bus_hz())));
        let ticks = ticks
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or(u64::MAX);
        origin.saturating_add(ticks)
    }

    fn current_count(&self, now: Tsc) -> u32 {
        let Timer::Counting { origin, first, .. } = self.timer else {
            return 0;
        };
        let elapsed = self.counts_between(origin, now);
        let first = u128::from(first);
        let initial = u128::from(self.initial_count);
        let count = if elapsed < first {
            first - elapsed
        } else if self.timer_mode() == TIMER_PERIODIC && initial != 0 {
            // Reloaded from the initial count at each expiry.
            initial - (elapsed - first) % initial
        } else {
            0
        };
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// The LVT timer's mode changes `from` -> `to` at `now` (expiries up to `now` already
    /// handled under the old mode). A switch to or from TSC-deadline mode disarms the timer and
    /// clears the initial count (10.5.4.1). Between one-shot and periodic the count goes on from
    /// where it is, as KVM and hardware do: a one-shot count switched to periodic reloads from
    /// the initial count when it reaches 0, a periodic one switched to one-shot stops there, and
    /// a one-shot timer that already expired stays at 0.
    fn change_timer_mode(&mut self, from: u32, to: u32, now: Tsc) {
        if from == TIMER_TSC_DEADLINE || to == TIMER_TSC_DEADLINE {
            self.initial_count = 0;
            self.timer = Timer::Idle;
            return;
        }
        let count = self.current_count(now);
        let counts = matches!(to, TIMER_ONE_SHOT | TIMER_PERIODIC);
        self.timer = match self.timer {
            Timer::Counting { .. } if count != 0 && counts => Timer::Counting {
                origin: now,
                first: u64::from(count),
                fired: 0,
            },
            _ => Timer::Idle,
        };
    }

    fn write_initial_count(&mut self, v: u32, now: Tsc) {
        let mode = self.timer_mode();
        if mode == TIMER_TSC_DEADLINE {
            // 10.5.4.1: ignored in TSC-deadline mode.
            return;
        }
        self.initial_count = v;
        self.timer = if v != 0 && (mode == TIMER_ONE_SHOT || mode == TIMER_PERIODIC) {
            Timer::Counting {
                origin: now,
                first: u64::from(v),
                fired: 0,
            }
        } else {
            // Zero stops the timer (10.5.4); the reserved mode does not count.
            Timer::Idle
        };
    }

    fn write_divide_config(&mut self, v: u32, now: Tsc) {
        let count = self.current_count(now);
        self.divide_config = v & TDCR_WRITABLE;
        if let Timer::Counting { .. } = self.timer {
            // Count on from the present count at the new rate.
            self.timer = if count == 0 {
                Timer::Idle
            } else {
                Timer::Counting {
                    origin: now,
                    first: u64::from(count),
                    fired: 0,
                }
            };
        }
    }

    /// IA32_TSC_DEADLINE as RDMSR reads it: the armed deadline in TSC-deadline mode, else 0
    /// (10.5.4.1; it reads 0 again once the timer fired).
    pub fn tsc_deadline(&self) -> u64 {
        match self.timer {
            Timer::Deadline(d) if self.timer_mode() == TIMER_TSC_DEADLINE => d,
            _ => 0,
        }
    }

    fn write_tsc_deadline(&mut self, value: u64, now: Tsc) {
        if self.timer_mode() != TIMER_TSC_DEADLINE {
            return; // 10.5.4.1: ignored in the other modes.
        }
        self.timer = if value == 0 {
            Timer::Idle
        } else {
            Timer::Deadline(value)
        };
        // A deadline already past fires at once.
        self.advance(now);
    }

    /// The time of the timer's next expiry, for the platform's scheduling, or None when it is
    /// not armed. Reported even when the LVT entry is masked: the counter runs regardless.
    pub fn next_deadline(&self) -> Option<Tsc> {
        match self.timer {
            Timer::Idle => None,
            Timer::Deadline(d) => Some(d),
            Timer::Counting {
                origin,
                first,
                fired,
            } => {
                let mut counts = u128::from(first);
                if self.timer_mode() == TIMER_PERIODIC {
                    counts += u128::from(fired) * u128::from(self.initial_count);
                }
                Some(self.tsc_after(origin, counts))
            }
        }
    }

    /// The timer counts in periodic mode: it expires again by itself, so an expiry handled late
    /// is a tick lost (coalesced) rather than a tick delayed.
    pub fn timer_periodic(&self) -> bool {
        matches!(self.timer, Timer::Counting { .. }) && self.timer_mode() == TIMER_PERIODIC
    }

    /// Processes timer expiries up to `now`: each sets the LVT timer vector in the IRR if the
    /// entry is unmasked (lost if masked, as on hardware). Periodic expiries are computed from
    /// the origin (expiry n at origin + first + (n - 1) * period), so they do not drift; if
    /// several passed since the last call, one interrupt is raised (the IRR holds one bit) and
    /// the others count in [`Self::timer_coalesced`].
    pub fn advance(&mut self, now: Tsc) {
        match self.timer {
            Timer::Idle => {}
            Timer::Deadline(d) => {
                if now >= d {
                    self.timer = Timer::Idle;
                    self.fire_timer(0);
                }
            }
            Timer::Counting {
                origin,
                first,
                fired,
            } => {
                let elapsed = self.counts_between(origin, now);
                if elapsed < u128::from(first) {
                    return;
                }
                let initial = u128::from(self.initial_count);
                if self.timer_mode() == TIMER_PERIODIC && initial != 0 {
                    let due = 1 + (elapsed - u128::from(first)) / initial;
                    let due = u64::try_from(due).unwrap_or(u64::MAX);
                    if due <= fired {
                        return;
                    }
                    self.timer = Timer::Counting {
                        origin,
                        first,
                        fired: due,
                    };
                    self.fire_timer(due - fired - 1);
                } else {
                    self.timer = Timer::Idle;
                    self.fire_timer(0);
                }
            }
        }
    }

    fn fire_timer(&mut self, missed: u64) {
        let lvt = self.lvt[LVT_TIMER];
        if lvt & LVT_MASKED != 0 {
            return;
        }
        let vector = lvt as u8;
        let merged = vector >= 16 && bit_test(&self.irr, vector);
        self.timer_coalesced = self
            .timer_coalesced
            .saturating_add(missed)
            .saturating_add(u64::from(merged));
        self.accept_interrupt(vector, false);
    }

    /// Timer expiries that raised no interrupt of their own: several expiries handled by one
    /// [`Self::advance`], or an expiry while the previous one still sat in the IRR.
    pub fn timer_coalesced(&self) -> u64 {
        self.timer_coalesced
    }
}

impl Dwords for Lapic {
    fn read_dword(&mut self, slot: u64, now: Tsc) -> u32 {
        match u32::try_from(slot >> 4)
            .ok()
            .and_then(|r| self.xapic_peek(r, now))
        {
            Some(v) => v,
            None => {
                self.signal_error(ESR_ILLEGAL_REGISTER);
                0
            }
        }
    }

    fn peek_dword(&self, slot: u64, now: Tsc) -> u32 {
        u32::try_from(slot >> 4)
            .ok()
            .and_then(|r| self.xapic_peek(r, now))
            .unwrap_or(0)
    }

    fn write_dword(&mut self, slot: u64, value: u32, now: Tsc) {
        let r = u32::try_from(slot >> 4).unwrap_or(u32::MAX);
        self.xapic_write(r, value, now);
    }
}

impl MmioDevice for Lapic {
    fn mmio_read(&mut self, offset: u64, data: &mut [u8], ctx: &mut Ctx) {
        if !self.xapic_mode() {
            data.fill(0xFF);
            return;
        }
        self.advance(ctx.now);
        regs::read(self, offset, data, ctx.now);
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8], ctx: &mut Ctx) {
        if !self.xapic_mode() {
            return;
        }
        self.advance(ctx.now);
        regs::write(self, offset, data, ctx.now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqLines;

    const TSC_HZ: u64 = 2_400_000_000;

    fn apic() -> Lapic {
        Lapic::new(Timebase::new(TSC_HZ))
    }

    /// A firmware-configured APIC, as the platform creates it.
    fn enabled() -> Lapic {
        let mut a = apic();
        a.firmware_setup();
        a
    }

    fn read_at(a: &mut Lapic, offset: u64, now: Tsc) -> u32 {
        let mut irq = IrqLines::default();
        let mut data = [0u8; 4];
        a.mmio_read(offset, &mut data, &mut Ctx { now, irq: &mut irq });
        u32::from_le_bytes(data)
    }

    fn write_at(a: &mut Lapic, offset: u64, value: u32, now: Tsc) {
        let mut irq = IrqLines::default();
        a.mmio_write(
            offset,
            &value.to_le_bytes(),
            &mut Ctx { now, irq: &mut irq },
        );
    }

    fn read(a: &mut Lapic, offset: u64) -> u32 {
        read_at(a, offset, 0)
    }

    fn write(a: &mut Lapic, offset: u64, value: u32) {
        write_at(a, offset, value, 0)
    }

    /// ESR as software reads it: write, then read (SDM 10.5.3).
    fn esr(a: &mut Lapic) -> u32 {
        write(a, 0x280, 0);
        read(a, 0x280)
    }

    fn to_x2apic(a: &mut Lapic) {
        a.write_apic_base(DEFAULT_MMIO_BASE | BASE_BSP | BASE_EN | BASE_EXTD)
            .unwrap();
    }

    #[test]
    fn power_up_state_is_sdm_10_4_7_1() {
        let mut a = apic();
        assert_eq!(a.apic_base(), 0xFEE0_0900);
        assert_eq!(a.mmio_base(), 0xFEE0_0000);
        assert!(a.hardware_enabled() && a.xapic_mode() && !a.x2apic_mode());
        assert!(!a.software_enabled());
        for (offset, value) in [
            (0x020, 0),
            (0x030, 0x0005_0014),
            (0x080, 0),
            (0x090, 0),
            (0x0A0, 0),
            (0x0B0, 0),
            (0x0C0, 0),
            (0x0D0, 0),
            (0x0E0, 0xFFFF_FFFF),
            (0x0F0, 0xFF),
            (0x100, 0),
            (0x170, 0),
            (0x180, 0),
            (0x200, 0),
            (0x280, 0),
            (0x300, 0),
            (0x310, 0),
            (0x320, 0x1_0000),
            (0x330, 0x1_0000),
            (0x340, 0x1_0000),
            (0x350, 0x1_0000),
            (0x360, 0x1_0000),
            (0x370, 0x1_0000),
            (0x380, 0),
            (0x390, 0),
            (0x3E0, 0),
        ] {
            assert_eq!(read(&mut a, offset), value, "register {offset:#x}");
        }
        assert_eq!(a.lint0_mode(), LintMode::Masked);
        assert_eq!(a.lint1_mode(), LintMode::Masked);
        assert_eq!(a.next_deadline(), None);
        assert_eq!(a.timer_divisor(), 2);
    }

    #[test]
    fn firmware_setup_is_virtual_wire_mode() {
        let mut a = enabled();
        assert_eq!(read(&mut a, 0x0F0), 0x1FF);
        assert_eq!(read(&mut a, 0x350), 0x700);
        assert_eq!(read(&mut a, 0x360), 0x400);
        assert_eq!(read(&mut a, 0x320), 0x1_0000, "timer stays masked");
        assert_eq!(a.lint0_mode(), LintMode::ExtInt);
        assert_eq!(a.lint1_mode(), LintMode::Nmi);
        a.raise_lint1();
        assert!(a.take_nmi());
        assert!(!a.take_nmi());
    }

    #[test]
    fn register_masks() {
        // (offset, written, read back) on a software-enabled APIC.
        let cases: &[(u64, u32, u32)] = &[
            (0x020, 0xFFFF_FFFF, 0xFF00_0000), // ID: bits 31:24
            (0x030, 0xFFFF_FFFF, 0x0005_0014), // version: read-only
            (0x080, 0xFFFF_FFFF, 0xFF),        // TPR
            (0x090, 0xFFFF_FFFF, 0),           // APR: read-only
            (0x0A0, 0x1234_5678, 0xFF),        // PPR: read-only, the TPR's 0xFF
            (0x0C0, 0xFFFF_FFFF, 0),           // RRD
            (0x0D0, 0xFFFF_FFFF, 0xFF00_0000), // LDR: bits 31:24
            (0x0E0, 0x0000_0000, 0x0FFF_FFFF), // DFR: 27:0 read as ones
            (0x0E0, 0xFFFF_FFFF, 0xFFFF_FFFF),
            (0x0F0, 0xFFFF_FFFF, 0x3FF), // SVR: vector, enable, focus
            (0x100, 0xFFFF_FFFF, 0),     // ISR: read-only
            (0x180, 0xFFFF_FFFF, 0),     // TMR
            (0x200, 0xFFFF_FFFF, 0),     // IRR
            (0x310, 0xFFFF_FFFF, 0xFF00_0000),
            (0x300, 0xFFFF_FFFF, 0x000C_CFFF), // all-excluding-self, reserved mode: not sent
            (0x320, 0xFFFF_FFFF, 0x0007_00FF),
            (0x330, 0xFFFF_FFFF, 0x0001_07FF),
            (0x340, 0xFFFF_FFFF, 0x0001_07FF),
            (0x350, 0xFFFF_FFFF, 0x0001_A7FF),
            (0x360, 0xFFFF_FFFF, 0x0001_A7FF),
            (0x370, 0xFFFF_FFFF, 0x0001_00FF),
            (0x3E0, 0xFFFF_FFFF, 0xB),
            (0x380, 0xFFFF_FFFF, 0xFFFF_FFFF),
            (0x390, 0x1234_5678, 0), // current count: read-only, the timer is in mode 0b11
        ];
        let mut a = enabled();
        for &(offset, value, expect) in cases {
            write(&mut a, offset, value);
            assert_eq!(read(&mut a, offset), expect, "register {offset:#x}");
        }
        assert_eq!(esr(&mut a), 0, "no register above is illegal");
    }

    #[test]
    fn lvt_masks_are_forced_while_software_disabled() {
        let mut a = apic();
        write(&mut a, 0x350, 0x700);
        assert_eq!(read(&mut a, 0x350), 0x1_0700, "mask bit cannot be cleared");
        write(&mut a, 0x0F0, 0x1FF);
        write(&mut a, 0x350, 0x700);
        write(&mut a, 0x320, 0x20);
        assert_eq!(read(&mut a, 0x350), 0x700);
        write(&mut a, 0x0F0, 0xFF); // software-disable
        for offset in (0x320..=0x370).step_by(0x10) {
            assert_ne!(read(&mut a, offset) & LVT_MASKED, 0, "LVT {offset:#x}");
        }
        assert_eq!(a.lint0_mode(), LintMode::Masked);
    }

    #[test]
    fn ppr_follows_tpr_and_isr_classes() {
        // (TPR, in-service vector, PPR) per SDM 10.8.3.1.
        for (tpr, isrv, ppr) in [
            (0x00, None, 0x00),
            (0x35, None, 0x35),
            (0x35, Some(0x31), 0x35), // same class: TPR wins, with its low bits
            (0x35, Some(0x41), 0x40), // higher class: ISRV's class, low bits 0
            (0x35, Some(0x2F), 0x35),
            (0xF0, Some(0xFE), 0xF0),
        ] {
            let mut a = enabled();
            if let Some(v) = isrv {
                a.accept_interrupt(v, false);
                a.acknowledge(v);
            }
            write(&mut a, 0x080, tpr);
            assert_eq!(a.ppr(), ppr, "TPR {tpr:#x} ISRV {isrv:?}");
            assert_eq!(read(&mut a, 0x0A0), u32::from(ppr));
        }
    }

    #[test]
    fn pending_vector_needs_a_class_above_ppr() {
        let mut a = enabled();
        a.accept_interrupt(0x31, false);
        write(&mut a, 0x080, 0x30);
        assert_eq!(a.pending_vector(), None, "same class as the TPR");
        write(&mut a, 0x080, 0x2F);
        assert_eq!(a.pending_vector(), Some(0x31));
        a.set_tpr_from_cr8(0).unwrap();
        a.accept_interrupt(0x45, false);
        assert_eq!(a.pending_vector(), Some(0x45), "highest IRR first");
        a.acknowledge(0x45);
        assert!(a.isr(0x45) && !a.irr(0x45));
        assert_eq!(
            a.pending_vector(),
            None,
            "0x31 is below the in-service 0x45"
        );
        a.accept_interrupt(0x41, false);
        assert_eq!(
            a.pending_vector(),
            None,
            "same class as the in-service vector"
        );
        a.accept_interrupt(0x51, false);
        assert_eq!(a.pending_vector(), Some(0x51), "a higher class nests");
        // A software-disabled APIC holds its IRR and delivers nothing.
        write(&mut a, 0x0F0, 0xFF);
        assert_eq!(a.pending_vector(), None);
        a.accept_interrupt(0x61, false);
        assert!(!a.irr(0x61), "fixed interrupts are not accepted");
        assert!(a.irr(0x51));
    }

    #[test]
    fn eoi_clears_the_highest_in_service_vector() {
        let mut a = enabled();
        a.accept_interrupt(0x40, false);
        a.acknowledge(0x40);
        a.accept_interrupt(0x80, true); // level-triggered, nested above 0x40
        assert!(a.tmr(0x80));
        assert_eq!(a.pending_vector(), Some(0x80));
        a.acknowledge(0x80);
        write(&mut a, 0x0B0, 0);
        assert!(!a.isr(0x80) && a.isr(0x40));
        assert_eq!(
            a.take_level_eoi(),
            Some(0x80),
            "level EOI goes to the IOAPIC"
        );
        assert_eq!(a.take_level_eoi(), None);
        write(&mut a, 0x0B0, 0x1234); // any value in xAPIC mode
        assert!(!a.isr(0x40));
        assert_eq!(
            a.take_level_eoi(),
            None,
            "edge-triggered: nothing to forward"
        );
        assert_eq!(a.eoi(), None, "EOI with nothing in service");
        // The direct call returns the vector.
        a.accept_interrupt(0x90, true);
        a.acknowledge(0x90);
        assert_eq!(a.eoi(), Some(0x90));
        assert_eq!(a.take_level_eoi(), None);
    }

    #[test]
    fn illegal_vectors_set_esr_and_raise_the_error_interrupt() {
        let mut a = enabled();
        a.accept_interrupt(5, false);
        assert!(!a.irr(5));
        assert_eq!(
            read(&mut a, 0x280),
            0,
            "errors are readable only after a write"
        );
        assert_eq!(esr(&mut a), ESR_RECEIVE_ILLEGAL_VECTOR);
        assert_eq!(esr(&mut a), 0, "the next write clears them");
        // With the error LVT unmasked, an error raises its vector.
        write(&mut a, 0x370, 0xFE);
        write(&mut a, 0x300, 0x4_000F); // self IPI, vector 15
        assert!(a.irr(0xFE) && !a.irr(0x0F));
        assert_eq!(esr(&mut a), ESR_SEND_ILLEGAL_VECTOR);
        // An illegal error vector records itself rather than looping.
        write(&mut a, 0x370, 0x03);
        a.accept_interrupt(1, false);
        assert_eq!(esr(&mut a), ESR_RECEIVE_ILLEGAL_VECTOR);
        // Unimplemented registers (with the error interrupt masked again).
        write(&mut a, 0x370, 0x1_0000);
        assert_eq!(read(&mut a, 0x000), 0);
        write(&mut a, 0x400, 1);
        assert_eq!(read(&mut a, 0x2F0), 0, "no CMCI LVT");
        assert_eq!(esr(&mut a), ESR_ILLEGAL_REGISTER);
        // The timer's LVT with an illegal vector.
        write(&mut a, 0x320, 0x02);
        write(&mut a, 0x3E0, 0xB);
        write(&mut a, 0x380, 1);
        a.advance(1_000);
        assert_eq!(esr(&mut a), ESR_RECEIVE_ILLEGAL_VECTOR);
    }

    #[test]
    fn icr_self_ipis() {
        // (LDR, ICR high, ICR low, vector delivered?)
        let cases: &[(u32, u32, u32, bool)] = &[
            (0, 0, 0x0004_0031, true),                     // shorthand self
            (0, 0, 0x0008_0031, true),                     // all including self
            (0, 0, 0x000C_0031, false),                    // all excluding self
            (0, 0x0000_0000, 0x0000_0031, true),           // fixed, physical, own ID 0
            (0, 0x0100_0000, 0x0000_0031, false),          // another ID
            (0, 0xFF00_0000, 0x0000_0031, true),           // physical broadcast
            (0, 0x0000_0000, 0x0000_0131, true),           // lowest priority to self
            (0x0100_0000, 0x0100_0000, 0x0000_0831, true), // logical flat, bit matches
            (0x0100_0000, 0x0200_0000, 0x0000_0831, false),
            (0x0100_0000, 0xFF00_0000, 0x0000_0831, true), // logical broadcast
        ];
        for &(ldr, high, low, delivered) in cases {
            let mut a = enabled();
            write(&mut a, 0x0D0, ldr);
            write(&mut a, 0x310, high);
            write(&mut a, 0x300, low);
            assert_eq!(a.irr(0x31), delivered, "ICR {high:#x}:{low:#x}");
            assert!(!a.tmr(0x31), "IPIs are edges");
            assert_eq!(read(&mut a, 0x300) & (1 << 12), 0, "delivery status idle");
            assert_eq!(esr(&mut a), 0);
        }
        let mut a = enabled();
        write(&mut a, 0x300, 0x0004_0400); // NMI to self
        assert!(a.take_nmi());
        write(&mut a, 0x300, 0x0004_0500); // INIT to self: ignored
        write(&mut a, 0x300, 0x0000_0605); // SIPI to APIC 0: ignored
        assert_eq!(a.pending_vector(), None);
        assert_eq!(esr(&mut a), 0, "no vector check for INIT/SIPI");
    }

    #[test]
    fn cluster_and_x2apic_destinations() {
        let mut a = enabled();
        write(&mut a, 0x0E0, 0x0FFF_FFFF); // cluster model
        write(&mut a, 0x0D0, 0x2400_0000); // cluster 2, member bit 2
        for (physical, dest, hit) in [
            (false, 0x24, true),
            (false, 0x26, true),
            (false, 0x21, false),
            (false, 0x34, false),
            (false, 0xF4, true), // every cluster
            (false, 0xFF, true),
            (true, 0x00, true),
            (true, 0x24, false),
            (true, 0xFF, true),
        ] {
            assert_eq!(
                a.matches_destination(physical, dest),
                hit,
                "{physical} {dest:#x}"
            );
        }
        write(&mut a, 0x020, 0x0700_0000);
        assert!(a.matches_destination(true, 7) && !a.matches_destination(true, 0));
        to_x2apic(&mut a);
        assert!(a.matches_destination(true, 0), "x2APIC ID is 0 again");
        assert!(a.matches_destination(false, 0x01) && !a.matches_destination(false, 0x02));
        a.write_apic_base(DEFAULT_MMIO_BASE).unwrap();
        assert!(!a.matches_destination(true, 0xFF), "hardware-disabled");
    }

    #[test]
    fn apic_base_transitions() {
        const DIS: u64 = 0;
        const INV: u64 = BASE_EXTD;
        const X: u64 = BASE_EN;
        const X2: u64 = BASE_EN | BASE_EXTD;
        // (from, to, allowed) per SDM Figure 10-27.
        for (from, to, ok) in [
            (X, X, true),
            (X, X2, true),
            (X, DIS, true),
            (X, INV, false),
            (X2, X2, true),
            (X2, DIS, true),
            (X2, X, false),
            (X2, INV, false),
            (DIS, DIS, true),
            (DIS, X, true),
            (DIS, X2, false),
            (DIS, INV, false),
        ] {
            let mut a = apic();
            match from {
                X2 => to_x2apic(&mut a),
                DIS => a.write_apic_base(DEFAULT_MMIO_BASE | DIS).unwrap(),
                _ => {}
            }
            let before = a.apic_base();
            let r = a.write_apic_base(DEFAULT_MMIO_BASE | BASE_BSP | to);
            assert_eq!(r.is_ok(), ok, "{from:#x} -> {to:#x}");
            if !ok {
                assert_eq!(a.apic_base(), before, "a refused write changes nothing");
            }
        }
        let mut a = apic();
        for reserved in [1u64 << 0, 1 << 7, 1 << 9, 1 << 52, 1 << 63] {
            assert_eq!(
                a.write_apic_base(a.apic_base() | reserved),
                Err(Gp),
                "{reserved:#x}"
            );
        }
        // Relocation is kept; the BSP flag cannot be cleared.
        a.write_apic_base(0x1_2345_6000 | BASE_EN).unwrap();
        assert_eq!(a.mmio_base(), 0x1_2345_6000);
        assert_eq!(a.apic_base(), 0x1_2345_6900);
        assert_eq!(a.msr_read(MSR_APIC_BASE, 0), Ok(0x1_2345_6900));
    }

    #[test]
    fn global_disable_resets_the_registers() {
        let mut a = enabled();
        write(&mut a, 0x080, 0x50);
        write(&mut a, 0x0D0, 0x0100_0000);
        a.accept_interrupt(0x40, false);
        write(&mut a, 0x320, 0x20);
        write(&mut a, 0x380, 1000);
        a.write_apic_base(DEFAULT_MMIO_BASE | BASE_BSP).unwrap();
        assert!(!a.hardware_enabled());
        assert_eq!(
            a.lint0_mode(),
            LintMode::ExtInt,
            "the PIC reaches the CPU directly"
        );
        assert_eq!(read(&mut a, 0x080), 0xFFFF_FFFF, "page inaccessible");
        write(&mut a, 0x080, 0x10);
        a.accept_interrupt(0x50, false);
        assert_eq!(a.pending_vector(), None);
        assert_eq!(a.next_deadline(), None, "timer disarmed");
        a.write_apic_base(DEFAULT_MMIO_BASE | BASE_BSP | BASE_EN)
            .unwrap();
        assert_eq!(read(&mut a, 0x080), 0);
        assert_eq!(read(&mut a, 0x0D0), 0);
        assert_eq!(read(&mut a, 0x0F0), 0xFF);
        assert_eq!(read(&mut a, 0x350), 0x1_0000);
        assert!(!a.irr(0x40) && !a.irr(0x50));
    }

    #[test]
    fn x2apic_msr_rules() {
        let mut a = enabled();
        assert_eq!(a.msr_read(0x802, 0), Err(Gp), "not in x2APIC mode");
        assert_eq!(a.msr_write(0x808, 0, 0), Err(Gp));
        write(&mut a, 0x020, 0x0500_0000);
        write(&mut a, 0x0D0, 0x0100_0000);
        write(&mut a, 0x310, 0x0700_0000);
        write(&mut a, 0x080, 0x20);
        to_x2apic(&mut a);
        assert_eq!(read(&mut a, 0x030), 0xFFFF_FFFF, "no page in x2APIC mode");
        write(&mut a, 0x080, 0x90);
        // Reads: (MSR, value or #GP).
        for (msr, expect) in [
            (0x802, Ok(0)), // the x2APIC ID, not the written xAPIC ID
            (0x803, Ok(0x0005_0014)),
            (0x808, Ok(0x20)), // kept across the switch; the page write was ignored
            (0x809, Err(Gp)),  // APR
            (0x80A, Ok(0x20)),
            (0x80B, Err(Gp)), // EOI: write-only
            (0x80C, Err(Gp)), // RRD
            (0x80D, Ok(1)),   // LDR derived: cluster 0, bit 0
            (0x80E, Err(Gp)), // no DFR
            (0x80F, Ok(0x1FF)),
            (0x810, Ok(0)),
            (0x828, Ok(0)),
            (0x82F, Err(Gp)), // no CMCI
            (0x830, Ok(0)),   // ICR high was not preserved
            (0x831, Err(Gp)), // no ICR high
            (0x835, Ok(0x700)),
            (0x838, Ok(0)),
            (0x839, Ok(0)),
            (0x83E, Ok(0)),
            (0x83F, Err(Gp)), // SELF IPI: write-only
            (0x840, Err(Gp)),
            (0x8FF, Err(Gp)),
            (0x800, Err(Gp)),
        ] {
            assert_eq!(a.msr_read(msr, 0), expect, "RDMSR {msr:#x}");
        }
        // Writes: (MSR, value, accepted).
        for (msr, value, ok) in [
            (0x802, 0, false), // read-only
            (0x803, 0, false),
            (0x80A, 0, false),
            (0x80D, 1, false),
            (0x810, 0, false),
            (0x839, 0, false),
            (0x808, 0x100, false), // reserved bits
            (0x808, 1 << 32, false),
            (0x808, 0x30, true),
            (0x80B, 1, false), // EOI must be 0
            (0x80B, 0, true),
            (0x828, 1, false), // ESR must be 0
            (0x828, 0, true),
            (0x80F, 0x1000, false), // no EOI-broadcast suppression
            (0x80F, 0x1FF, true),
            (0x835, 0x0002_0700, false), // LVT reserved bit 17
            (0x835, 0x0000_5700, true),  // read-only bits may be written back
            (0x838, 1 << 32, false),
            (0x83E, 0x4, false),
            (0x83E, 0xB, true),
            (0x83F, 0x100, false),
            (0x830, 1 << 13, false),
            (0x830, 1 << 20, false),
            (0x809, 0, false),
            (0x80E, 0, false),
            (0x831, 0, false),
        ] {
            assert_eq!(
                a.msr_write(msr, value, 0).is_ok(),
                ok,
                "WRMSR {msr:#x} {value:#x}"
            );
        }
        assert_eq!(a.msr_read(0x808, 0), Ok(0x30));
        assert_eq!(a.cr8(), 3);
        // ICR: one 64-bit MSR, destination in 63:32.
        a.msr_write(0x830, 0x31, 0).unwrap();
        assert!(a.irr(0x31), "fixed to x2APIC ID 0");
        a.msr_write(0x830, 0xFFFF_FFFF_0000_0041, 0).unwrap();
        assert!(a.irr(0x41), "x2APIC broadcast");
        a.msr_write(0x830, 0x0000_0001_0000_0051, 0).unwrap();
        assert!(!a.irr(0x51), "another x2APIC ID");
        assert_eq!(a.msr_read(0x830, 0), Ok(0x0000_0001_0000_0051));
        a.msr_write(0x83F, 0x61, 0).unwrap();
        assert!(a.irr(0x61) && !a.tmr(0x61));
        a.msr_write(0x83F, 0x0E, 0).unwrap();
        a.msr_write(0x828, 0, 0).unwrap();
        assert_eq!(a.msr_read(0x828, 0), Ok(u64::from(ESR_SEND_ILLEGAL_VECTOR)));
        // IRR words as MSRs: 0x61 is bit 1 of word 3.
        assert_eq!(a.msr_read(0x823, 0), Ok(1 << 1));
        assert!(!Lapic::handles_msr(0x10) && Lapic::handles_msr(0x6E0));
        assert_eq!(a.msr_read(0x10, 0), Err(Gp));
    }

    #[test]
    fn cr8_is_tpr_high_nibble() {
        let mut a = enabled();
        a.set_tpr_from_cr8(0x5).unwrap();
        assert_eq!(a.tpr(), 0x50);
        assert_eq!(read(&mut a, 0x080), 0x50);
        write(&mut a, 0x080, 0xAB);
        assert_eq!(a.cr8(), 0xA);
        assert_eq!(a.set_tpr_from_cr8(0x10), Err(Gp));
        assert_eq!(a.tpr(), 0xAB);
    }

    /// TSC ticks for `bus` APIC bus ticks from an origin, rounded up (the expected edges).
    fn ticks(tsc_hz: u64, bus: u128) -> u64 {
        (bus * u128::from(tsc_hz)).div_ceil(u128::from(APIC_BUS_HZ)) as u64
    }

    #[test]
    fn one_shot_timer() {
        let mut a = enabled();
        let t0 = 5_000_000;
        write(&mut a, 0x320, 0x30);
        write(&mut a, 0x3E0, 0x3); // divide by 16
        write_at(&mut a, 0x380, 1000, t0);
        let expiry = t0 + ticks(TSC_HZ, 16_000);
        assert_eq!(a.next_deadline(), Some(expiry));
        assert_eq!(read_at(&mut a, 0x390, t0), 1000);
        // 16 bus ticks (one count) take 38.4 TSC ticks at 2.4 GHz.
        assert_eq!(read_at(&mut a, 0x390, t0 + 38), 1000);
        assert_eq!(read_at(&mut a, 0x390, t0 + 39), 999);
        assert_eq!(read_at(&mut a, 0x390, expiry - 1), 1);
        a.advance(expiry - 1);
        assert!(!a.irr(0x30));
        a.advance(expiry);
        assert!(a.irr(0x30));
        assert_eq!(read_at(&mut a, 0x390, expiry + 100_000), 0);
        assert_eq!(read(&mut a, 0x380), 1000, "initial count is kept");
        assert_eq!(a.next_deadline(), None);
        // Initial count 0 stops a running timer.
        write_at(&mut a, 0x380, 10, expiry);
        write_at(&mut a, 0x380, 0, expiry + 1);
        assert_eq!(a.next_deadline(), None);
        assert_eq!(read_at(&mut a, 0x390, expiry + 2), 0);
    }

    #[test]
    fn divide_configuration() {
        // (divide configuration, divisor) per SDM Figure 10-10; bit 2 is reserved.
        for (tdcr, divisor) in [
            (0x0, 2u64),
            (0x1, 4),
            (0x2, 8),
            (0x3, 16),
            (0x8, 32),
            (0x9, 64),
            (0xA, 128),
            (0xB, 1),
            (0x4, 2),
            (0xF, 1),
        ] {
            let mut a = Lapic::new(Timebase::new(APIC_BUS_HZ));
            a.firmware_setup();
            write(&mut a, 0x320, 0x30);
            write(&mut a, 0x3E0, tdcr);
            assert_eq!(u64::from(a.timer_divisor()), divisor, "TDCR {tdcr:#x}");
            write_at(&mut a, 0x380, 100, 7);
            assert_eq!(a.next_deadline(), Some(7 + 100 * divisor), "TDCR {tdcr:#x}");
            assert_eq!(read_at(&mut a, 0x390, 7 + 10 * divisor), 90);
        }
    }

    #[test]
    fn divide_change_while_counting_keeps_the_count() {
        let mut a = Lapic::new(Timebase::new(APIC_BUS_HZ));
        a.firmware_setup();
        write(&mut a, 0x320, 0x30);
        write(&mut a, 0x3E0, 0xB); // by 1
        write_at(&mut a, 0x380, 1000, 0);
        write_at(&mut a, 0x3E0, 0x0, 400); // by 2, 600 left
        assert_eq!(read_at(&mut a, 0x390, 400), 600);
        assert_eq!(a.next_deadline(), Some(400 + 1200));
    }

    #[test]
    fn periodic_timer_does_not_drift() {
        // A TSC frequency that the period does not divide: every expiry must still be the
        // exact rounded-up edge counted from the origin.
        let tsc_hz = 2_399_999_999;
        let mut a = Lapic::new(Timebase::new(tsc_hz));
        a.firmware_setup();
        let t0 = 123_456_789;
        write(&mut a, 0x320, 0x2_0040); // periodic, vector 0x40
        write(&mut a, 0x3E0, 0x0); // divide by 2
        write_at(&mut a, 0x380, 500_003, t0);
        let period = 2 * 500_003u128;
        for n in 1..=1000u128 {
            let expiry = t0 + ticks(tsc_hz, n * period);
            assert_eq!(a.next_deadline(), Some(expiry), "expiry {n}");
            a.advance(expiry - 1);
            assert!(!a.irr(0x40), "not before expiry {n}");
            a.advance(expiry);
            assert!(a.irr(0x40), "at expiry {n}");
            a.acknowledge(0x40);
            write_at(&mut a, 0x0B0, 0, expiry);
            // Reloaded: the count restarts from the initial count.
            assert_eq!(read_at(&mut a, 0x390, expiry), 500_003);
        }
        assert_eq!(a.timer_coalesced(), 0);
        // Adding a rounded period each time would have drifted by the rounding of each
        // step; the 1000th expiry is exactly 1000 periods from the origin.
        let naive = t0 + 1000 * ticks(tsc_hz, period);
        assert_ne!(naive, t0 + ticks(tsc_hz, 1000 * period));
    }

    #[test]
    fn periodic_expiries_missed_at_once_coalesce() {
        let mut a = Lapic::new(Timebase::new(APIC_BUS_HZ));
        a.firmware_setup();
        write(&mut a, 0x320, 0x2_0040);
        write(&mut a, 0x3E0, 0xB);
        write_at(&mut a, 0x380, 100, 0);
        a.advance(550); // expiries at 100..500: five of them
        assert!(a.irr(0x40));
        assert_eq!(a.timer_coalesced(), 4);
        assert_eq!(a.next_deadline(), Some(600));
        assert_eq!(read_at(&mut a, 0x390, 550), 50);
        a.advance(600); // the IRR bit is still set: merged
        assert_eq!(a.timer_coalesced(), 5);
        // Masked: expiries are lost, not coalesced, and the counter runs on.
        write_at(&mut a, 0x320, 0x3_0040, 600);
        a.acknowledge(0x40);
        a.advance(1000);
        assert!(!a.irr(0x40));
        assert_eq!(a.timer_coalesced(), 5);
        assert_eq!(a.next_deadline(), Some(1100));
    }

    #[test]
    fn tsc_deadline_timer() {
        let mut a = enabled();
        // One-shot mode: the MSR ignores writes and reads 0.
        a.msr_write(MSR_TSC_DEADLINE, 5000, 0).unwrap();
        assert_eq!(a.msr_read(MSR_TSC_DEADLINE, 0), Ok(0));
        assert_eq!(a.next_deadline(), None);
        write(&mut a, 0x320, 0x4_0050); // TSC-deadline mode
        a.msr_write(MSR_TSC_DEADLINE, 5000, 100).unwrap();
        assert_eq!(a.msr_read(MSR_TSC_DEADLINE, 100), Ok(5000));
        assert_eq!(a.next_deadline(), Some(5000));
        write_at(&mut a, 0x380, 77, 200); // ignored in this mode
        assert_eq!(read(&mut a, 0x380), 0);
        assert_eq!(read_at(&mut a, 0x390, 200), 0);
        a.advance(4999);
        assert!(!a.irr(0x50));
        a.advance(5000);
        assert!(a.irr(0x50));
        assert_eq!(
            a.msr_read(MSR_TSC_DEADLINE, 5001),
            Ok(0),
            "cleared when it fires"
        );
        // Zero disarms.
        a.msr_write(MSR_TSC_DEADLINE, 9000, 6000).unwrap();
        a.msr_write(MSR_TSC_DEADLINE, 0, 6001).unwrap();
        assert_eq!(a.next_deadline(), None);
        // A past deadline fires at once.
        a.acknowledge(0x50);
        a.msr_write(MSR_TSC_DEADLINE, 10, 7000).unwrap();
        assert!(a.irr(0x50));
        // Leaving the mode disarms.
        a.msr_write(MSR_TSC_DEADLINE, 9000, 7000).unwrap();
        write_at(&mut a, 0x320, 0x0_0050, 7001);
        assert_eq!(a.next_deadline(), None);
        write_at(&mut a, 0x320, 0x4_0050, 7002);
        assert_eq!(a.msr_read(MSR_TSC_DEADLINE, 7002), Ok(0));
    }

    #[test]
    fn the_timer_never_counts_faster_than_the_tsc() {
        assert_eq!(apic_bus_hz(2_400_000_000), APIC_BUS_HZ);
        assert_eq!(apic_bus_hz(4_000_000), 4_000_000);
        // Bochs's TSC at 4 MHz: a one-shot count of 0x10000 at divide by 1 takes 0x10000 ticks.
        let mut a = Lapic::new(Timebase::new(4_000_000));
        a.firmware_setup();
        write(&mut a, 0x3e0, 0xb);
        write(&mut a, 0x320, 0x30);
        write(&mut a, 0x380, 0x1_0000);
        assert_eq!(a.next_deadline(), Some(0x1_0000));
    }

    #[test]
    fn tsc_deadline_mode_switches_disarm_and_one_shot_periodic_switches_count_on() {
        // TSC ticks per divided APIC tick (divide by 2, the reset value) at TSC_HZ.
        let per = |counts: u64| counts * 2 * TSC_HZ / APIC_BUS_HZ;
        let mut a = enabled();
        write(&mut a, 0x320, 0x30);
        write(&mut a, 0x380, 1000);
        write(&mut a, 0x320, 0x4_0030); // to TSC-deadline mode
        assert_eq!(a.next_deadline(), None);
        assert_eq!(
            read(&mut a, 0x380),
            0,
            "10.5.4.1: the initial count is cleared"
        );
        write(&mut a, 0x320, 0x30); // and back: nothing counts
        assert_eq!(a.next_deadline(), None);
        assert!(!a.timer_periodic());

        // One-shot, a quarter through, to periodic: the count goes on, then reloads.
        write(&mut a, 0x380, 1000);
        let quarter = per(250);
        assert!(!a.timer_periodic(), "one-shot");
        write_at(&mut a, 0x320, 0x2_0030, quarter);
        assert!(a.timer_periodic());
        assert_eq!(read(&mut a, 0x380), 1000, "the initial count is kept");
        assert_eq!(read_at(&mut a, 0x390, quarter), 750);
        a.advance(per(1000));
        assert_eq!(a.pending_vector(), Some(0x30));
        assert_eq!(read_at(&mut a, 0x390, per(1100)), 900, "reloaded at 0");
        // Periodic to one-shot: counts down to 0 and stops there.
        write_at(&mut a, 0x320, 0x30, per(1100));
        assert_eq!(read_at(&mut a, 0x390, per(1500)), 500);
        assert_eq!(read_at(&mut a, 0x390, per(2500)), 0);
        // An expired one-shot timer switched to periodic stays at 0.
        a.advance(per(2500));
        write_at(&mut a, 0x320, 0x2_0030, per(2500));
        assert_eq!(read_at(&mut a, 0x390, per(4000)), 0);
        assert_eq!(a.next_deadline(), None);
        assert!(!a.timer_periodic(), "stopped at 0: nothing will expire");
        // Changing only the vector or mask changes nothing.
        write(&mut a, 0x380, 1000);
        write(&mut a, 0x320, 0x3_0031);
        assert!(a.next_deadline().is_some());
    }

    #[test]
    fn narrow_accesses_use_the_containing_register() {
        let mut a = enabled();
        let mut irq = IrqLines::default();
        let mut ctx = Ctx {
            now: 0,
            irq: &mut irq,
        };
        let mut b = [0u8; 1];
        a.mmio_read(0x031, &mut b, &mut ctx);
        assert_eq!(b, [0x00]);
        a.mmio_read(0x032, &mut b, &mut ctx);
        assert_eq!(b, [0x05], "version byte 2: max LVT entry");
        a.mmio_write(0x083, &[0x12], &mut ctx); // byte 3 of the TPR: reserved bits
        a.mmio_write(0x080, &[0x34], &mut ctx);
        assert_eq!(a.tpr(), 0x34);
        let mut q = [0u8; 8];
        a.mmio_read(0x0F0, &mut q, &mut ctx);
        assert_eq!(q, [0xFF, 0x01, 0, 0, 0, 0, 0, 0]);
        a.mmio_write(0x084, &[0xFF; 4], &mut ctx); // reserved bytes of the slot
        assert_eq!(a.tpr(), 0x34);
    }

    /// A tiny deterministic generator for the junk tests.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn junk_at_every_offset_and_width_does_not_panic() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for tsc_hz in [1_000_000, 2_399_999_999, u64::MAX] {
            let mut a = Lapic::new(Timebase::new(tsc_hz));
            a.firmware_setup();
            let mut irq = IrqLines::default();
            let mut now = 0u64;
            for i in 0..200_000u32 {
                now = match rng.next() % 8 {
                    0 => rng.next(),
                    1 => u64::MAX - rng.next() % 4,
                    _ => now.wrapping_add(rng.next() % 100_000),
                };
                let mut ctx = Ctx { now, irq: &mut irq };
                let offset = match i % 3 {
                    0 => rng.next() % 0x1100,
                    1 => (rng.next() % 0x40) << 4,
                    _ => rng.next(),
                };
                let width = [1, 2, 4, 8, 16][(rng.next() % 5) as usize];
                let mut data = [0u8; 16];
                data.iter_mut().for_each(|b| *b = rng.next() as u8);
                let x = rng.next();
                match rng.next() % 12 {
                    0..=3 => a.mmio_write(offset, &data[..width], &mut ctx),
                    4..=5 => a.mmio_read(offset, &mut data[..width], &mut ctx),
                    6 => {
                        let _ = a.msr_write(0x800 + (x as u32 & 0xFF), rng.next(), now);
                        let _ = a.msr_read(0x800 + (x as u32 & 0xFF), now);
                    }
                    7 => {
                        let _ = a.write_apic_base(x & 0xFFFF_FFFF_FFFF_FD00 | (x & 0xC00));
                        if rng.next().is_multiple_of(4) {
                            let _ = a.write_apic_base(DEFAULT_MMIO_BASE | BASE_EN);
                            a.firmware_setup();
                        }
                    }
                    8 => {
                        let _ = a.msr_write(MSR_TSC_DEADLINE, x, now);
                        a.advance(now);
                        let _ = a.next_deadline();
                    }
                    9 => {
                        a.accept_interrupt(x as u8, x & 0x100 != 0);
                        if let Some(v) = a.pending_vector() {
                            a.acknowledge(v);
                        }
                    }
                    10 => {
                        let _ = a.eoi();
                        let _ = a.take_level_eoi();
                        let _ = a.set_tpr_from_cr8(x % 20);
                        let _ = a.matches_destination(x & 1 != 0, (x >> 8) as u8);
                    }
                    _ => {
                        a.raise_lint1();
                        a.deliver_nmi();
                        let _ = a.take_nmi();
                        a.acknowledge(x as u8);
                    }
                }
            }
        }
    }
}
