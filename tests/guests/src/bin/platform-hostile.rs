//! `platform-hostile`: everything a guest can do wrong to the virtual platform, after which it
//! must still be alive, with the platform still working as the SDM and the datasheets say.
//!
//! In order (interrupts off unless said):
//! 1. silences the PIT (control word without a count), masks the 8259s and LINT0, so that junk in
//!    the interrupt controllers finds no source;
//! 2. the xAPIC page: every offset of 0..0x1000 read and written with junk at widths 1, 2, 4
//!    (every offset, misaligned too) and 8 (every 4th), through single MOVs; the ICR's low
//!    dword is only read here (a junk write would send junk IPIs, INIT included);
//! 3. IPIs on purpose: a self-IPI at an illegal vector (3) must set ESR "send illegal vector"
//!    and not be delivered; a legal self-IPI arrives once; a fixed IPI to a destination that
//!    does not exist reaches nobody; an NMI to self arrives as an NMI;
//! 4. vectors 0..15 as external interrupts: the LVT timer at vector 5 and the RTC through
//!    IOAPIC pin 8 at vector 7 must set ESR "receive illegal vector" and never be delivered (an
//!    exception at those vectors would end the guest with exit code 102);
//! 5. the IOAPIC: every register index through IOREGSEL/IOWIN with junk (redirection entries
//!    kept masked with fixed delivery), odd widths on both registers and junk in the EOI
//!    register; then the version register must still say 24 pins;
//! 6. the 8259s, the ELCR, the PIT, port 0x61, every CMOS index and the UART ports with junk;
//!    then each is programmed again and must work (PIT counts, RTC sets PF in register C, the
//!    UART prints `uart still works`);
//! 7. x2APIC: every MSR of 0x800..=0x8FF read and written with junk (the ICR with fixed delivery
//!    to self only), checking the architectural #GP (SDM Vol. 3A 10.12.1.2, Table 10-6): before
//!    x2APIC mode any of them; reserved MSRs; writes of read-only ones; reads of EOI and SELF
//!    IPI; a non-zero EOI write;
//! 8. an interrupt storm: the APIC timer periodic with initial count 1 at divide 1 (one
//!    interrupt per nanosecond asked for); the handler stops it after `storm_ms`; after that no
//!    interrupt may come.
//!
//! Interrupts left pending by the junk (any vector from 16 up) are taken, counted and EOIed.
//! Command line: `mmio_stride=N` (1) multiplies the xAPIC sweep's steps; `storm_ms=N` (20);
//! `tsc_khz=N`. Reports `gp_count`, `stray_irqs`, `nmis`, `storm_irqs`, `storm_main_loops`,
//! `arch_violations`. Exit 0 only if every check passed.
#![cfg_attr(target_os = "none", no_std, no_main)]

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};

use test_guests::checks::Checks;
use test_guests::cpu::{self, rdtsc};
use test_guests::interrupts::{self, Interrupted};
use test_guests::ioapic::{self, Route};
use test_guests::lapic::{self, reg, Delivery, TimerMode};
use test_guests::rt::{self, Boot};
use test_guests::tsc::{self, Clock};
use test_guests::{idt, pic, pit, println, rtc, serial_println};

test_guests::entry!(guest_main);

const V_IPI: u8 = 0x30;
const V_STORM: u8 = 0x60;
const V_ERROR: u8 = 0xE0;
const V_SPURIOUS: u8 = 0xFF;
const PAGE: u64 = 0x1000;

static STORM_END: AtomicU64 = AtomicU64::new(0);
static STORM_STOPPED: AtomicBool = AtomicBool::new(false);

/// Every vector without a handler of its own: counted by the runtime, EOIed here (harmless when
/// nothing is in service, SDM 10.8.5).
fn on_stray(_: &Interrupted) {
    lapic::eoi();
}

fn on_counted(_: &Interrupted) {
    lapic::eoi();
}

fn on_storm(i: &Interrupted) {
    // The main code may never get an instruction in (on real hardware an interrupt per
    // nanosecond leaves none), so the handler itself ends the storm.
    if i.tsc >= STORM_END.load(SeqCst) && !STORM_STOPPED.load(SeqCst) {
        lapic::stop_timer();
        STORM_STOPPED.store(true, SeqCst);
    }
    lapic::eoi();
}

/// xorshift64: deterministic junk.
struct Junk(u64);

impl Junk {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One MOV of `width` bytes from `addr` (any alignment: the SDM leaves such APIC accesses
/// undefined, the hypervisor must survive them).
///
/// # Safety
/// `addr..addr + width` must be in the xAPIC or IOAPIC page (emulated MMIO, identity-mapped).
unsafe fn mmio_read(addr: u64, width: u64) -> u64 {
    let value: u64;
    // SAFETY: per the caller, an emulated MMIO range; each is a single load.
    unsafe {
        match width {
            1 => {
                asm!("movzx {v:e}, byte ptr [{a}]", a = in(reg) addr, v = out(reg) value, options(nostack))
            }
            2 => {
                asm!("movzx {v:e}, word ptr [{a}]", a = in(reg) addr, v = out(reg) value, options(nostack))
            }
            4 => {
                asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) addr, v = out(reg) value, options(nostack))
            }
            _ => {
                asm!("mov {v}, qword ptr [{a}]", a = in(reg) addr, v = out(reg) value, options(nostack))
            }
        }
    }
    value
}

/// One MOV of `width` bytes of `value` to `addr`.
///
/// # Safety
/// As for [`mmio_read`]; the caller knows what the write does to the device.
unsafe fn mmio_write(addr: u64, width: u64, value: u64) {
    // SAFETY: per the caller.
    unsafe {
        match width {
            1 => {
                asm!("mov byte ptr [{a}], {v:l}", a = in(reg) addr, v = in(reg) value, options(nostack))
            }
            2 => {
                asm!("mov word ptr [{a}], {v:x}", a = in(reg) addr, v = in(reg) value, options(nostack))
            }
            4 => {
                asm!("mov dword ptr [{a}], {v:e}", a = in(reg) addr, v = in(reg) value, options(nostack))
            }
            _ => {
                asm!("mov qword ptr [{a}], {v}", a = in(reg) addr, v = in(reg) value, options(nostack))
            }
        }
    }
}

fn outb(port: u16, value: u8) {
    // SAFETY: ports of the VM's own emulated devices; junk there is the point of this guest.
    unsafe { cpu::outb(port, value) }
}

fn inb(port: u16) -> u8 {
    // SAFETY: as for `outb`.
    unsafe { cpu::inb(port) }
}

/// What the SDM says about an x2APIC MSR (Table 10-6).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Access {
    ReadWrite,
    ReadOnly,
    WriteOnly,
    /// CMCI (0x82F) exists only on some processors.
    Optional,
    Reserved,
}

fn x2apic_access(msr: u32) -> Access {
    match msr {
        0x808 | 0x80F | 0x828 | 0x830 | 0x832..=0x838 | 0x83E => Access::ReadWrite,
        0x802 | 0x803 | 0x80A | 0x80D | 0x810..=0x827 | 0x839 => Access::ReadOnly,
        0x80B | 0x83F => Access::WriteOnly,
        0x82F => Access::Optional,
        _ => Access::Reserved,
    }
}

/// Masks every LVT, stops the timer, clears TPR and ESR, re-enables the APIC with our spurious
/// vector, and takes whatever the junk left pending.
fn restore_lapic(clock: Clock) {
    lapic::software_enable(V_SPURIOUS);
    lapic::mask_all_lvts();
    lapic::write(reg::TIMER_INITIAL, 0);
    lapic::write(reg::TIMER_DIVIDE, 0xB);
    lapic::set_tpr(0);
    let _ = lapic::esr();
    drain(clock);
    let _ = lapic::esr();
}

/// Lets pending interrupts in for a moment.
fn drain(clock: Clock) {
    interrupts::enable();
    clock.spin_us(500);
    interrupts::disable();
}

fn guest_main(boot: &Boot) -> u64 {
    let c = &boot.cmdline;
    let (stride, storm_ms) = match (c.u64_or("mmio_stride", 1), c.u64_or("storm_ms", 20)) {
        (Ok(s), Ok(m)) if s >= 1 => (s, m),
        (Err(e), _) | (_, Err(e)) => return rt::usage_error(e),
        _ => return rt::usage_error("mmio_stride must be at least 1"),
    };
    let clock = match tsc::clock(c) {
        Ok(clock) => clock,
        Err(e) => return rt::usage_error(e),
    };
    let mut checks = Checks::new();
    let mut junk = Junk(0x2545_F491_4F6C_DD1D ^ boot.info.memory_bytes);
    let mut violations = 0u64;

    interrupts::install();
    interrupts::claim_reserved();
    for vector in 16..=255u8 {
        interrupts::register(vector, Some(on_stray));
    }
    interrupts::register(V_IPI, Some(on_counted));
    interrupts::register(V_ERROR, Some(on_counted));
    interrupts::register(V_STORM, Some(on_storm));
    idt::count_nmis(true);

    // 1. No sources for the junk to route.
    pit::stop();
    pic::init(0x70, 0x78);
    pic::mask_all();
    lapic::write(reg::LVT_LINT0, lapic::LVT_MASKED | 0x700);
    let apic_id = lapic::read(reg::ID);

    // 2. The xAPIC page.
    let mut accesses = 0u64;
    for (width, step) in [(1u64, 1u64), (2, 1), (4, 1), (8, 4)] {
        let mut offset = 0;
        while offset + width <= PAGE {
            let addr = lapic::XAPIC_BASE + offset;
            // SAFETY: inside the xAPIC page; reads have no side effects on an APIC.
            let _ = unsafe { mmio_read(addr, width) };
            let touches_icr_low = offset < 0x304 && offset + width > 0x300;
            if !touches_icr_low {
                // SAFETY: inside the xAPIC page, not the ICR's low dword; the interrupt sources
                // are silenced and IF = 0, so what the junk unmasks is drained below.
                unsafe { mmio_write(addr, width, junk.next()) };
            }
            accesses += 1;
            offset += step * stride;
        }
    }
    lapic::write(reg::ID, apic_id);
    restore_lapic(clock);
    println!("xapic page: {accesses} junk accesses");
    checks.check(
        "xapic_alive_after_junk",
        lapic::read(reg::ID) == apic_id && lapic::read(reg::SVR) & 0x1FF == 0x1FF,
        format_args!(
            "ID {:#x} (was {apic_id:#x}), SVR {:#x}",
            lapic::read(reg::ID),
            lapic::read(reg::SVR)
        ),
    );

    // 3. IPIs on purpose.
    lapic::self_ipi(3);
    let esr = lapic::esr();
    checks.check(
        "illegal_self_ipi_in_esr",
        esr & lapic::ESR_SEND_ILLEGAL_VECTOR != 0,
        format_args!("ESR {esr:#x} after a self-IPI at vector 3"),
    );
    let before = interrupts::count(V_IPI);
    lapic::self_ipi(V_IPI);
    drain(clock);
    let got = interrupts::count(V_IPI) - before;
    checks.check(
        "legal_self_ipi_once",
        got == 1,
        format_args!("{got} deliveries"),
    );
    let nobody = (0x55u64 << 32) | u64::from(V_IPI) | (1 << 14);
    lapic::write_icr(nobody);
    drain(clock);
    let got = interrupts::count(V_IPI) - before - 1;
    checks.check(
        "ipi_to_nobody_not_delivered",
        got == 0,
        format_args!("{got} deliveries of an IPI to APIC ID 0x55"),
    );
    let nmis = idt::nmis();
    lapic::write_icr(lapic::icr_self(0, Delivery::Nmi));
    drain(clock);
    checks.check(
        "self_nmi",
        idt::nmis() == nmis + 1,
        format_args!("{} NMIs after one NMI to self", idt::nmis() - nmis),
    );

    // 4. Vectors 0..15 as external interrupts.
    lapic::write(reg::LVT_ERROR, u32::from(V_ERROR));
    lapic::start_timer(5, TimerMode::OneShot, tsc::apic_counts_for_us(1).max(1), 1);
    drain(clock);
    let esr = lapic::esr();
    checks.check(
        "lvt_illegal_vector_in_esr",
        esr & lapic::ESR_RECEIVE_ILLEGAL_VECTOR != 0,
        format_args!("ESR {esr:#x} after the timer fired at vector 5"),
    );
    let dest = lapic::id() as u8;
    let rtc_pin = ioapic::isa_pin(8);
    ioapic::route(rtc_pin, Route::isa(7, dest));
    rtc::start_periodic(6);
    drain(clock);
    drain(clock);
    rtc::stop();
    ioapic::mask(rtc_pin);
    let esr = lapic::esr();
    checks.check(
        "ioapic_illegal_vector_in_esr",
        esr & lapic::ESR_RECEIVE_ILLEGAL_VECTOR != 0,
        format_args!("ESR {esr:#x} after RTC interrupts at vector 7"),
    );
    restore_lapic(clock);

    // 5. The IOAPIC.
    let base = ioapic::BASE;
    for index in 0..=255u8 {
        let _ = ioapic::read(index);
        let mut value = junk.next() as u32;
        if (ioapic::REG_REDTBL..ioapic::REG_REDTBL + 48).contains(&index) && index % 2 == 0 {
            // Low half of an entry: fixed delivery, masked (the pins' sources are silent, but a
            // junk NMI or INIT route would be the guest's own undoing, not the platform's).
            value = (value & !0x700) | ioapic::ENTRY_MASKED as u32;
        }
        ioapic::write(index, value);
    }
    for (offset, width) in [
        (0u64, 1u64),
        (0, 2),
        (0, 8),
        (1, 1),
        (3, 1),
        (0x10, 1),
        (0x12, 2),
        (0x10, 8),
        (0x20, 4),
        (0x30, 4),
        (0x40, 4),
        (0x41, 1),
    ] {
        // SAFETY: inside the IOAPIC page. IOREGSEL selects the version register first, so a
        // partial IOWIN write lands in a read-only register.
        unsafe {
            mmio_write(base, 4, u64::from(ioapic::REG_VERSION));
            let _ = mmio_read(base + offset, width);
            mmio_write(base + offset, width, junk.next() & 0xFFFF_FFFF_0000_0001);
        }
    }
    ioapic::mask_all();
    drain(clock);
    let pins = ioapic::pins();
    checks.check(
        "ioapic_alive_after_junk",
        pins == 24,
        format_args!("the version register says {pins} pins"),
    );

    // 6. Port devices.
    for _ in 0..256 {
        for port in [
            0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1, 0x40, 0x41, 0x42, 0x43, 0x61,
        ] {
            let _ = inb(port);
            outb(port, junk.next() as u8);
        }
    }
    for index in 0..128u8 {
        let _ = rtc::read(index);
        rtc::write(index, junk.next() as u8);
        // The NMI-mask bit of the index port too.
        outb(rtc::INDEX, index | 0x80);
        let _ = inb(rtc::DATA);
    }
    for port in 0x3F9..=0x3FF {
        for _ in 0..16 {
            let _ = inb(port);
            outb(port, junk.next() as u8);
        }
    }
    // THR junk (DLAB clear) prints bytes on this VM's console: keep it to printable text.
    outb(0x3FB, 0x03);
    for _ in 0..16 {
        outb(0x3F8, b'a' + (junk.next() % 26) as u8);
    }
    outb(0x3FB, 0x03);
    outb(0x3F9, 0);
    outb(0x3FC, 0);
    outb(0x3FA, 0);
    serial_println!();
    serial_println!("uart still works");
    pic::init(0x70, 0x78);
    pic::mask_all();
    pic::set_all_edge();
    checks.check(
        "pic_reinitialised",
        inb(pic::MASTER_DATA) == 0xFF && inb(pic::SLAVE_DATA) == 0xFF,
        format_args!(
            "IMRs {:#x} {:#x}",
            inb(pic::MASTER_DATA),
            inb(pic::SLAVE_DATA)
        ),
    );
    pit::start_periodic(0);
    let read_count = || {
        outb(pit::COMMAND, 0x00); // latch channel 0
        let low = inb(pit::CHANNEL0);
        u16::from_le_bytes([low, inb(pit::CHANNEL0)])
    };
    let a = read_count();
    clock.spin_us(1000);
    let b = read_count();
    pit::stop();
    checks.check(
        "pit_counts_after_junk",
        a != b,
        format_args!("channel 0 read {a} and {b} 1 ms apart"),
    );
    rtc::write(rtc::REG_B, rtc::B_24H);
    rtc::start_periodic(6);
    let until = rdtsc() + clock.ms_to_ticks(20);
    let mut pf = false;
    while rdtsc() < until && !pf {
        pf = rtc::ack() & rtc::C_PF != 0;
    }
    rtc::stop();
    checks.check(
        "rtc_ticks_after_junk",
        pf,
        format_args!("no PF in register C within 20 ms at 1024 Hz"),
    );
    drain(clock);

    // 7. x2APIC MSRs.
    let gp_before = idt::rdmsr(0x802).is_err();
    checks.check(
        "x2apic_msrs_gp_in_xapic_mode",
        gp_before,
        format_args!("RDMSR 0x802 worked in xAPIC mode"),
    );
    lapic::enable_x2apic();
    let mut gps = 0u64;
    for msr in 0x800..=0x8FFu32 {
        let access = x2apic_access(msr);
        let read_gp = idt::rdmsr(msr).is_err();
        let mut value = junk.next();
        match msr {
            // Fixed delivery, self shorthand: no junk INIT, SMI or NMI.
            0x830 => value = (value & 0xFF) | (0b01 << 18) | (1 << 14),
            // Keep the APIC software-enabled.
            0x80F => value = (value & 0xFF) | 0x100,
            _ => {}
        }
        // SAFETY: an x2APIC MSR; the ICR junk is a fixed self-IPI, the rest only changes this
        // VM's APIC, which is restored below with IF = 0 meanwhile.
        let write_gp = unsafe { idt::wrmsr(msr, value) }.is_err();
        gps += u64::from(read_gp) + u64::from(write_gp);
        let expected = match access {
            Access::Reserved => read_gp && write_gp,
            Access::ReadOnly => !read_gp && write_gp,
            Access::WriteOnly => read_gp,
            Access::ReadWrite => !read_gp,
            Access::Optional => true,
        };
        if !expected {
            violations += 1;
            println!("x2apic MSR {msr:#x} ({access:?}): read #GP {read_gp}, write #GP {write_gp}");
        }
    }
    // SAFETY: the EOI MSR; the write must fault, and a write that did not would only end an
    // interrupt that is not in service.
    let eoi_gp = unsafe { idt::wrmsr(0x80B, 1) }.is_err();
    if !eoi_gp {
        violations += 1;
        println!("x2apic EOI accepted a non-zero value");
    }
    restore_lapic(clock);
    checks.check(
        "x2apic_msr_faults_architectural",
        violations == 0,
        format_args!("{violations} MSRs without the #GP behaviour of SDM Table 10-6"),
    );

    // 8. The storm.
    let storm_before = interrupts::count(V_STORM);
    STORM_END.store(rdtsc() + clock.ms_to_ticks(storm_ms), SeqCst);
    lapic::start_timer(V_STORM, TimerMode::Periodic, 1, 1);
    let give_up = rdtsc() + clock.ms_to_ticks(storm_ms * 10 + 100);
    let mut loops = 0u64;
    interrupts::enable();
    while !STORM_STOPPED.load(SeqCst) && rdtsc() < give_up {
        loops += 1;
    }
    interrupts::disable();
    let stopped = STORM_STOPPED.load(SeqCst);
    if !stopped {
        lapic::stop_timer();
    }
    let storm = interrupts::count(V_STORM) - storm_before;
    drain(clock);
    let after = interrupts::count(V_STORM) - storm_before - storm;
    println!(
        "storm: {storm} interrupts, {loops} main-loop iterations, stopped by handler {stopped}"
    );
    checks.check(
        "storm_delivered_and_stopped",
        storm >= 2 && stopped && after == 0,
        format_args!("{storm} interrupts, stopped {stopped}, {after} after stopping"),
    );

    restore_lapic(clock);
    let stray =
        interrupts::count_range(16..=255) - interrupts::count(V_IPI) - interrupts::count(V_STORM);
    rt::report("gp_count", gps);
    rt::report("stray_irqs", stray);
    rt::report("nmis", idt::nmis());
    rt::report("storm_irqs", storm);
    rt::report("storm_main_loops", loops);
    rt::report("arch_violations", violations);
    println!("platform-hostile: still alive");
    checks.finish("platform-hostile")
}
