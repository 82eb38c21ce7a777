//! The platform of one VM: every device model, the buses that route guest accesses to them, and
//! the wiring of interrupt lines into the controllers, as a PC's chipset wires them.
//!
//! [`Platform`] is what the exit policy talks to: port I/O ([`Platform::pio_read`]), MMIO
//! ([`Platform::mmio_read`]), the MSRs of the local APIC ([`Platform::msr_read`]), time
//! ([`Platform::advance`], [`Platform::next_deadline`]) and interrupt delivery
//! ([`Platform::pending_interrupt`], [`Platform::acknowledge`]). It must not know how an
//! interrupt is injected (that is the vCPU's) nor where its time comes from (the kernel passes
//! the VM's clock).
//!
//! Wiring (what PC firmware reports in its MP/ACPI tables):
//! - ISA IRQ n drives 8259 input n and IOAPIC pin n, except IRQ 0 (the PIT), which reaches
//!   IOAPIC pin 2 (the interrupt source override of every PC);
//! - the IOAPIC's messages go to the local APIC when their destination matches it;
//! - the master 8259's INTR reaches the CPU through LINT0 in ExtINT mode, or directly while
//!   the local APIC is hardware-disabled;
//! - a level-triggered vector's EOI at the local APIC goes back to the IOAPIC (remote IRR).

use alloc::boxed::Box;

use crate::acpi_pm::{self, AcpiPm};
use crate::bus::{Bus, BusError, Ctx, MmioDevice, PioDevice};
use crate::ioapic::{DeliveryMode, IoApic, Message, IOAPIC_BASE, IOAPIC_SIZE};
use crate::irq::{IrqLines, LineChanges, LINES};
use crate::lapic::{Gp, Lapic, LintMode, MMIO_SIZE, MSR_APIC_BASE, MSR_TSC_DEADLINE};
use crate::pic::{PicPair, BIOS_MASTER_BASE, BIOS_SLAVE_BASE, PORT_RANGES};
use crate::pit::{Pit, PIT_BASE, PIT_PORTS, PORT61};
use crate::reset::{ResetCause, ResetPorts, KBC_DATA, KBC_STATUS, RESET_CONTROL};
use crate::rtc::{DateTime, Rtc, RtcError, RTC_BASE, RTC_PORTS};
use crate::testdev::{self, TestDevice};
use crate::uart::{Uart16550, UART_PORTS};
use crate::{Timebase, Tsc};

/// Which device a port belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PioId {
    Pic,
    Pit,
    Port61,
    Rtc,
    Uart,
    /// The 8042's data and status ports (reset command), the reset control register.
    Kbc,
    ResetControl,
    /// The test device's scratch and flush ports, and its interrupt-line ports.
    TestDev,
    TestDevIrq,
    /// The ACPI PM1 event and control blocks.
    AcpiPm,
}

/// Which device an MMIO range belongs to. (The local APIC's page is decoded by the CPU itself,
/// at the address in IA32_APIC_BASE, before the bus sees the access.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MmioId {
    IoApic,
    TestDevRam,
}

/// The interrupt the CPU would take next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pending {
    /// A vector from the local APIC's IRR, above its processor priority.
    Apic(u8),
    /// The 8259's INTR through LINT0 (ExtINT): the vector comes from the INTA cycle.
    ExtInt,
}

/// Counters for the VM's statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlatformStats {
    /// Interrupts the CPU took (acknowledged), from the local APIC and through ExtINT.
    pub interrupts: u64,
    /// Port and MMIO accesses no device answered.
    pub unclaimed_pio: u64,
    pub unclaimed_mmio: u64,
}

pub struct Platform {
    /// The VM's clock, for devices added later.
    timebase: Timebase,
    lapic: Lapic,
    ioapic: IoApic,
    pic: PicPair,
    pit: Pit,
    rtc: Rtc,
    uart: Uart16550,
    /// The 8042's reset command and the reset control register.
    reset: ResetPorts,
    /// QEMU's pc-testdev, when the VM asked for it ([`Self::attach_test_device`]).
    testdev: Option<Box<TestDevice>>,
    /// The ACPI power-management registers, when the VM has ACPI tables
    /// ([`Self::attach_acpi_pm`]).
    acpi_pm: Option<AcpiPm>,
    lines: IrqLines,
    pio: Bus<PioId>,
    mmio: Bus<MmioId>,
    pub stats: PlatformStats,
    /// Kept up to date after every access (`refresh`), so that the check before each VM entry
    /// ([`Self::needs_attention`]) is two comparisons: the earliest timer deadline, and whether
    /// an interrupt or NMI waits.
    deadline: Tsc,
    ready: bool,
    nmi: bool,
    /// A timer's programming or state may have changed since `deadline` was computed.
    timers_dirty: bool,
}

/// The value a read from a port or MMIO address without a device returns: all ones, as the
/// ISA bus floats high.
pub const FLOATING: u8 = 0xff;

impl Platform {
    /// A PC as firmware leaves it at `now` on the VM's clock (`timebase`): local APIC enabled in
    /// virtual-wire mode, 8259s and IOAPIC masked, PIT idle, RTC running from `boot`.
    pub fn new(timebase: Timebase, now: Tsc, boot: DateTime) -> Result<Self, RtcError> {
        let mut lapic = Lapic::new(timebase);
        lapic.firmware_setup();
        let mut pio = Bus::default();
        let mut mmio = Bus::default();
        let uart = Uart16550::com1();
        let ranges = [
            (u64::from(PIT_BASE), u64::from(PIT_PORTS), PioId::Pit),
            (u64::from(PORT61), 1, PioId::Port61),
            (u64::from(RTC_BASE), u64::from(RTC_PORTS), PioId::Rtc),
            (u64::from(uart.base()), u64::from(UART_PORTS), PioId::Uart),
            (u64::from(KBC_DATA), 1, PioId::Kbc),
            (u64::from(KBC_STATUS), 1, PioId::Kbc),
            (u64::from(RESET_CONTROL), 1, PioId::ResetControl),
        ];
        for (base, len, id) in ranges {
            pio.insert(base, len, id)
                .expect("the platform's port ranges are disjoint");
        }
        for (base, len) in PORT_RANGES {
            pio.insert(u64::from(base), u64::from(len), PioId::Pic)
                .expect("the platform's port ranges are disjoint");
        }
        mmio.insert(IOAPIC_BASE, IOAPIC_SIZE, MmioId::IoApic)
            .expect("one range");
        Ok(Self {
            timebase,
            lapic,
            ioapic: IoApic::new(),
            pic: PicPair::new(),
            pit: Pit::new(timebase),
            rtc: Rtc::new(timebase, now, boot)?,
            uart,
            reset: ResetPorts::default(),
            testdev: None,
            acpi_pm: None,
            lines: IrqLines::default(),
            pio,
            mmio,
            stats: PlatformStats::default(),
            deadline: Tsc::MAX,
            ready: false,
            nmi: false,
            timers_dirty: true,
        })
    }

    /// Leaves the 8259s and the PIT as a PC BIOS does before it hands over to a boot loader
    /// (SeaBIOS's `pic_setup` and `timer_setup`), for kernels a boot loader starts (Multiboot):
    /// both 8259s initialised (edge-triggered, vector bases [`BIOS_MASTER_BASE`] and
    /// [`BIOS_SLAVE_BASE`], cascade on IRQ 2), every input masked but the timer's IRQ 0 and the
    /// cascade; PIT channel 0 in mode 3 with count 65536 (18.2 Hz). The IOAPIC stays masked.
    pub fn bios_setup(&mut self, now: Tsc) {
        let writes: [(u16, u8); 13] = [
            (0x20, 0x11), // ICW1: edge, cascade, ICW4 follows
            (0x21, BIOS_MASTER_BASE),
            (0x21, 0x04), // ICW3: the slave on IRQ 2
            (0x21, 0x01), // ICW4: 8086 mode, normal EOI
            (0xa0, 0x11),
            (0xa1, BIOS_SLAVE_BASE),
            (0xa1, 0x02), // ICW3: slave ID 2
            (0xa1, 0x01),
            (0x21, !0x05), // OCW1: IRQ 0 and the cascade unmasked
            (0xa1, 0xff),
            (0x43, 0x36), // PIT channel 0, lobyte/hibyte, mode 3, binary
            (0x40, 0x00), // count 0 = 65536
            (0x40, 0x00),
        ];
        for (port, value) in writes {
            self.pio_write(port, 1, value.into(), now);
        }
    }

    /// The reset the guest asked for since the last call (the 8042's reset command or the
    /// reset control register), if any.
    pub fn take_reset(&mut self) -> Option<ResetCause> {
        self.reset.take_request()
    }

    /// Adds the ACPI PM1 event and control blocks ([`crate::acpi_pm`]), for a VM whose FADT
    /// points at them. Fails when they are already attached.
    pub fn attach_acpi_pm(&mut self) -> Result<(), BusError> {
        if self.acpi_pm.is_some() {
            return Err(BusError::Overlap);
        }
        self.pio.insert(
            u64::from(acpi_pm::PM1A_EVT),
            u64::from(acpi_pm::PORTS),
            PioId::AcpiPm,
        )?;
        self.acpi_pm = Some(AcpiPm::new(self.timebase));
        Ok(())
    }

    /// Whether the guest asked for soft-off (ACPI S5) since the last call.
    pub fn take_power_off(&mut self) -> bool {
        self.acpi_pm.as_mut().is_some_and(AcpiPm::take_power_off)
    }

    /// Adds QEMU's pc-testdev ([`crate::testdev`]): its ports and its MMIO RAM. Fails when a
    /// range is taken (it is already attached).
    pub fn attach_test_device(&mut self) -> Result<(), BusError> {
        if self.testdev.is_some() {
            return Err(BusError::Overlap);
        }
        let ports = [
            (testdev::PORT_BASE, testdev::PORTS, PioId::TestDev),
            (
                testdev::IRQ_PORT_BASE,
                testdev::IRQ_PORTS,
                PioId::TestDevIrq,
            ),
        ];
        for (base, len, id) in ports {
            self.pio.insert(u64::from(base), u64::from(len), id)?;
        }
        self.mmio
            .insert(testdev::RAM_BASE, testdev::RAM_SIZE, MmioId::TestDevRam)?;
        self.testdev = Some(Box::new(TestDevice::new()));
        Ok(())
    }

    /// An IN of `size` bytes (1, 2 or 4) from `port`: each byte lane reads the device at its own
    /// port, as the ISA bus splits wide accesses; ports without a device float high.
    pub fn pio_read(&mut self, port: u16, size: u8, now: Tsc) -> u32 {
        self.advance(now);
        let mut value = 0u32;
        let mut timers_or_controllers = false;
        for i in 0..size.min(4) {
            let p = port.wrapping_add(u16::from(i));
            let mut byte = [FLOATING];
            match self.pio.find(u64::from(p)) {
                Some((id, offset)) => {
                    timers_or_controllers |= id != PioId::Uart;
                    // Reading register C clears the RTC's flags, which resumes its deadlines;
                    // reading the PIT or port 0x61 moves none.
                    self.timers_dirty |= id == PioId::Rtc;
                    self.pio_access(id, p, offset as u16, &mut byte, None, now);
                }
                None => self.stats.unclaimed_pio += 1,
            }
            value |= u32::from(byte[0]) << (8 * i);
        }
        self.settle(timers_or_controllers);
        value
    }

    /// An OUT of the low `size` bytes of `value` to `port` (byte lanes as in
    /// [`Self::pio_read`]); writes to ports without a device are dropped.
    pub fn pio_write(&mut self, port: u16, size: u8, value: u32, now: Tsc) {
        self.advance(now);
        let mut timers_or_controllers = false;
        for i in 0..size.min(4) {
            let p = port.wrapping_add(u16::from(i));
            let byte = [(value >> (8 * i)) as u8];
            match self.pio.find(u64::from(p)) {
                Some((id, offset)) => {
                    timers_or_controllers |= id != PioId::Uart;
                    // A PIT counter latch (how guests read the time) moves no deadline.
                    self.timers_dirty |= match id {
                        PioId::Pit => Pit::write_moves_irq0(offset as u16, byte[0]),
                        PioId::Port61 | PioId::Rtc => true,
                        _ => false,
                    };
                    if id == PioId::ResetControl {
                        // Byte writes only: a wider one is the PCI configuration address at
                        // 0xCF8 (crate::reset).
                        if size == 1 {
                            self.reset.write_reset_control(byte[0]);
                        }
                        continue;
                    }
                    if id == PioId::TestDevIrq {
                        // Only a byte write sets a line, as in QEMU: the size is the access's.
                        let mut ctx = Ctx {
                            now,
                            irq: &mut self.lines,
                        };
                        TestDevice::irq_write(offset as u16, size, byte[0].into(), &mut ctx);
                        continue;
                    }
                    let mut scratch = [0];
                    self.pio_access(id, p, offset as u16, &mut scratch, Some(&byte), now);
                }
                None => self.stats.unclaimed_pio += 1,
            }
        }
        self.settle(timers_or_controllers);
    }

    fn pio_access(
        &mut self,
        id: PioId,
        port: u16,
        offset: u16,
        read: &mut [u8],
        write: Option<&[u8]>,
        now: Tsc,
    ) {
        let mut ctx = Ctx {
            now,
            irq: &mut self.lines,
        };
        let device: &mut dyn PioDevice = match id {
            // One device answers three port ranges: it takes absolute ports.
            PioId::Pic => {
                match write {
                    Some(data) => self.pic.pio_write(port, data, &mut ctx),
                    None => self.pic.pio_read(port, read, &mut ctx),
                }
                return;
            }
            PioId::Pit => &mut self.pit,
            PioId::Port61 => {
                let mut p61 = self.pit.port61();
                match write {
                    Some(data) => p61.pio_write(offset, data, &mut ctx),
                    None => p61.pio_read(offset, read, &mut ctx),
                }
                return;
            }
            PioId::Rtc => &mut self.rtc,
            PioId::Uart => &mut self.uart,
            // Both 8042 ports as one device: offsets from 0x60.
            PioId::Kbc => {
                let offset = port - KBC_DATA;
                match write {
                    Some(data) => self.reset.pio_write(offset, data, &mut ctx),
                    None => self.reset.pio_read(offset, read, &mut ctx),
                }
                return;
            }
            PioId::ResetControl => {
                read[0] = self.reset.read_reset_control();
                return;
            }
            PioId::TestDev => match self.testdev.as_deref_mut() {
                Some(dev) => dev,
                None => unreachable!("the test device's ports are mapped only with it"),
            },
            PioId::AcpiPm => match self.acpi_pm.as_mut() {
                Some(dev) => dev,
                None => unreachable!("the ACPI PM ports are mapped only with the device"),
            },
            // Writes are handled in `pio_write` (they need the access size); reads return 0.
            PioId::TestDevIrq => {
                read.fill(0);
                return;
            }
        };
        match write {
            Some(data) => device.pio_write(offset, data, &mut ctx),
            None => device.pio_read(offset, read, &mut ctx),
        }
    }

    /// Whether `gpa` is a device register (the local APIC's page or the IOAPIC's): an access
    /// there is emulated rather than a fault.
    /// Whether the local APIC is enabled in IA32_APIC_BASE (CPUID.1:EDX.APIC follows it).
    pub fn lapic_enabled(&self) -> bool {
        self.lapic.hardware_enabled()
    }

    pub fn is_mmio(&self, gpa: u64) -> bool {
        self.lapic_offset(gpa).is_some() || self.mmio.find(gpa).is_some()
    }

    fn lapic_offset(&self, gpa: u64) -> Option<u64> {
        let base = self.lapic.mmio_base();
        (self.lapic.hardware_enabled() && (base..base + MMIO_SIZE).contains(&gpa))
            .then(|| gpa - base)
    }

    /// An MMIO read of `data.len()` bytes at `gpa`; addresses without a device read all ones.
    pub fn mmio_read(&mut self, gpa: u64, data: &mut [u8], now: Tsc) {
        self.mmio_access(gpa, data, None, now);
    }

    /// An MMIO write of `data` at `gpa`; writes to addresses without a device are dropped.
    pub fn mmio_write(&mut self, gpa: u64, data: &[u8], now: Tsc) {
        let mut scratch = [0u8; 8];
        self.mmio_access(gpa, &mut scratch, Some(data), now);
    }

    fn mmio_access(&mut self, gpa: u64, read: &mut [u8], write: Option<&[u8]>, now: Tsc) {
        self.advance(now);
        let lapic_offset = self.lapic_offset(gpa);
        let mut ctx = Ctx {
            now,
            irq: &mut self.lines,
        };
        let target: Option<(&mut dyn MmioDevice, u64)> = if let Some(off) = lapic_offset {
            // The timer's registers: LVT timer, initial count, divide configuration.
            self.timers_dirty |= write.is_some() && matches!(off & !0xf, 0x320 | 0x380 | 0x3e0);
            Some((&mut self.lapic, off))
        } else {
            match self.mmio.find(gpa) {
                Some((MmioId::IoApic, off)) => Some((&mut self.ioapic, off)),
                Some((MmioId::TestDevRam, off)) => self
                    .testdev
                    .as_deref_mut()
                    .map(|dev| (dev as &mut dyn MmioDevice, off)),
                None => None,
            }
        };
        match (target, write) {
            (Some((dev, off)), Some(data)) => dev.mmio_write(off, data, &mut ctx),
            (Some((dev, off)), None) => dev.mmio_read(off, read, &mut ctx),
            (None, _) => {
                read.fill(FLOATING);
                self.stats.unclaimed_mmio += 1;
            }
        }
        self.route();
    }

    /// RDMSR of a platform MSR (IA32_APIC_BASE, IA32_TSC_DEADLINE, the x2APIC range): `None`
    /// when `index` is not one, else the value or #GP.
    pub fn msr_read(&mut self, index: u32, now: Tsc) -> Option<Result<u64, Gp>> {
        if !Self::owns_msr(index) {
            return None;
        }
        self.advance(now);
        let r = self.lapic.msr_read(index, now);
        self.route();
        Some(r)
    }

    /// WRMSR of a platform MSR, as [`Self::msr_read`].
    pub fn msr_write(&mut self, index: u32, value: u64, now: Tsc) -> Option<Result<(), Gp>> {
        if !Self::owns_msr(index) {
            return None;
        }
        self.advance(now);
        let r = self.lapic.msr_write(index, value, now);
        // IA32_APIC_BASE (a reset), the TSC deadline, the LVT timer, initial count, divide.
        self.timers_dirty |= matches!(
            index,
            MSR_APIC_BASE | MSR_TSC_DEADLINE | 0x832 | 0x838 | 0x83e
        );
        self.route();
        Some(r)
    }

    pub fn owns_msr(index: u32) -> bool {
        index == MSR_APIC_BASE || index == MSR_TSC_DEADLINE || Lapic::handles_msr(index)
    }

    /// Brings every timer up to `now`: expired ones raise their interrupts.
    #[inline]
    pub fn advance(&mut self, now: Tsc) {
        // Nothing due: port 0x61 and count reads compute from `now` themselves.
        if now >= self.deadline {
            self.advance_timers(now);
        }
    }

    #[inline(never)]
    fn advance_timers(&mut self, now: Tsc) {
        self.timers_dirty = true;
        self.lapic.advance(now);
        self.pit.advance(now, &mut self.lines);
        self.rtc.advance(now, &mut self.lines);
        self.route();
    }

    /// The earliest time a timer needs [`Self::advance`], if any is armed.
    pub fn next_deadline(&self) -> Option<Tsc> {
        [
            self.lapic.next_deadline(),
            self.pit.next_deadline(),
            self.rtc.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// A timer that fires by itself, period after period, is armed: the LAPIC timer in periodic
    /// mode, PIT counter 0 in mode 2 or 3, or any RTC interrupt (periodic, update or alarm).
    /// When none is, every timer interrupt the guest gets is one it armed itself (one-shot or
    /// TSC-deadline), and its handler arms the next from the time it handles this one or from
    /// this one's deadline: an interrupt that comes late delays the guest's ticks but loses
    /// none, which is what lets the scheduler wake a dormant VM a little late.
    pub fn periodic_timer_armed(&self) -> bool {
        self.lapic.timer_periodic() || self.pit.periodic() || self.rtc.next_deadline().is_some()
    }

    /// Host input for the VM's COM1: returns how many bytes it took (the rest did not fit).
    pub fn push_input(&mut self, bytes: &[u8], now: Tsc) -> usize {
        let mut ctx = Ctx {
            now,
            irq: &mut self.lines,
        };
        let n = self.uart.push_input(bytes, &mut ctx);
        self.route();
        n
    }

    /// The interrupt the CPU would take now if it could (RFLAGS.IF and no interrupt shadow).
    pub fn pending_interrupt(&self) -> Option<Pending> {
        if let Some(v) = self.lapic.pending_vector() {
            return Some(Pending::Apic(v));
        }
        (self.lapic.lint0_mode() == LintMode::ExtInt && self.pic.intr()).then_some(Pending::ExtInt)
    }

    /// The CPU takes the pending interrupt (the INTA cycle): returns its vector.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let vector = match self.pending_interrupt()? {
            Pending::Apic(v) => {
                self.lapic.acknowledge(v);
                v
            }
            Pending::ExtInt => self.pic.acknowledge(),
        };
        self.stats.interrupts += 1;
        self.route();
        Some(vector)
    }

    /// An NMI is pending (LINT1, an NMI IPI or message): taken by this call.
    pub fn take_nmi(&mut self) -> bool {
        let nmi = core::mem::take(&mut self.nmi);
        self.refresh();
        nmi
    }

    /// Whether the vCPU must look at the platform before entering the guest at `now`: a timer
    /// is due, or an interrupt or NMI waits.
    #[inline]
    pub fn needs_attention(&self, now: Tsc) -> bool {
        self.ready || now >= self.deadline
    }

    /// The earliest timer deadline ([`Self::next_deadline`], kept up to date), `Tsc::MAX` when
    /// no timer is armed: what the vCPU's preemption timer must not run past.
    #[inline]
    pub fn deadline(&self) -> Tsc {
        self.deadline
    }

    /// Whether an interrupt or NMI waits (what wakes a halted vCPU with RFLAGS.IF = 1).
    pub fn interrupt_waiting(&self) -> bool {
        self.ready
    }

    /// Whether an external interrupt waits for the CPU (not counting NMIs).
    pub fn external_waiting(&self) -> bool {
        self.pending_interrupt().is_some()
    }

    /// Whether an NMI waits or a device could still raise one (an IOAPIC entry in NMI mode):
    /// when neither holds, a vCPU halted with interrupts disabled never runs again (SDM Vol. 2,
    /// HLT: only NMI, SMI, INIT and reset end it, and this platform raises no SMI or INIT).
    pub fn nmi_can_arrive(&self) -> bool {
        self.nmi_waiting() || self.ioapic.sends_nmi()
    }

    /// Whether an NMI waits (what wakes a halted vCPU whatever RFLAGS.IF says).
    pub fn nmi_waiting(&self) -> bool {
        self.nmi
    }

    /// MOV to CR8: the local APIC's TPR bits 7:4 (SDM 10.8.6.1).
    pub fn set_cr8(&mut self, value: u64) -> Result<(), Gp> {
        let r = self.lapic.set_tpr_from_cr8(value);
        self.route();
        r
    }

    /// MOV from CR8.
    pub fn cr8(&self) -> u64 {
        self.lapic.cr8()
    }

    /// Hands what the guest transmitted on COM1 to `f`, oldest first.
    pub fn take_uart_output(&mut self, f: impl FnMut(&[u8])) {
        self.uart.take_output(f);
    }

    /// Room in COM1's receive queue, in bytes.
    pub fn input_room(&self) -> usize {
        self.uart.input_room()
    }

    /// Missed timer periods merged into one interrupt (local APIC, PIT, RTC).
    pub fn coalesced_ticks(&self) -> u64 {
        self.lapic.timer_coalesced() + self.pit.coalesced() + self.rtc.coalesced()
    }

    /// Recomputes what [`Self::needs_attention`] checks.
    fn refresh(&mut self) {
        self.nmi |= self.lapic.take_nmi();
        self.ready = self.nmi || self.pending_interrupt().is_some();
        if core::mem::take(&mut self.timers_dirty) {
            self.deadline = self.next_deadline().unwrap_or(Tsc::MAX);
        }
    }

    /// After an access: routes what moved, and recomputes the deadline and the waiting
    /// interrupt when a timer or an interrupt controller was touched (`timers_or_controllers`)
    /// or an interrupt line changed. An access to the UART alone changes neither unless its
    /// line moves: the common case of a polling console driver stays cheap.
    fn settle(&mut self, timers_or_controllers: bool) {
        if timers_or_controllers {
            self.route();
            return;
        }
        self.lines.set_level(self.uart.irq(), self.uart.irq_level());
        if self.lines.changed() {
            self.route();
        }
    }

    /// Feeds line changes to the controllers and delivers what they send, until nothing moves:
    /// 8259 inputs, IOAPIC pins, IOAPIC messages to the local APIC, EOIs of level-triggered
    /// vectors back to the IOAPIC.
    fn route(&mut self) {
        // The UART's line follows its state, which reads and writes change.
        self.lines.set_level(self.uart.irq(), self.uart.irq_level());
        // Bounded: each pass either consumes a change, a message or an EOI.
        for _ in 0..64 {
            let mut moved = false;
            if self.lines.changed() {
                moved = true;
                let c = self.lines.take_changes();
                self.apply(c);
            }
            while let Some(v) = self.lapic.take_level_eoi() {
                moved = true;
                for m in self.ioapic.eoi(v) {
                    self.deliver(m);
                }
            }
            while let Some(m) = self.ioapic.take_message() {
                moved = true;
                self.deliver(m);
            }
            if !moved {
                self.refresh();
                return;
            }
        }
        log::warn!(target: "platform", "interrupt routing did not settle in 64 passes");
        self.refresh();
    }

    fn apply(&mut self, c: LineChanges) {
        for line in 0..LINES as u8 {
            let bit = 1u32 << line;
            if (c.rose | c.fell) & bit == 0 {
                continue;
            }
            let high = c.level & bit != 0;
            // A pulse (or a fall and rise) is an edge followed by the present level.
            let edges: &[bool] = match (c.rose & bit != 0, c.fell & bit != 0, high) {
                (true, true, false) => &[true, false],
                (true, true, true) => &[false, true],
                (_, _, level) => {
                    if level {
                        &[true]
                    } else {
                        &[false]
                    }
                }
            };
            let pin = if line == 0 { 2 } else { line };
            for &level in edges {
                if line < 16 {
                    self.pic.set_irq(line, level);
                }
                if let Some(m) = self.ioapic.set_irq(pin, level) {
                    self.deliver(m);
                }
            }
        }
    }

    fn deliver(&mut self, m: Message) {
        if !self.lapic.matches_destination(m.physical, m.dest) {
            return;
        }
        match m.delivery_mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                self.lapic.accept_interrupt(m.vector, m.level_triggered)
            }
            DeliveryMode::Nmi => self.lapic.deliver_nmi(),
            // ExtINT through the IOAPIC (pin 0 in virtual-wire-through-IOAPIC mode) asks the
            // 8259 for the vector: the same path as LINT0.
            DeliveryMode::ExtInt | DeliveryMode::Smi | DeliveryMode::Init => {
                log::debug!(target: "platform", "IOAPIC message {m:?} not delivered");
            }
        }
    }
}

#[cfg(test)]
mod tests;
