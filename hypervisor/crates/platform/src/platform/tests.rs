//! The platform as a guest uses it: devices programmed through ports, MMIO and MSRs, interrupts
//! taken through `pending_interrupt`/`acknowledge` and ended with EOIs, over simulated time.

use super::*;

const HZ: u64 = 2_000_000_003; // does not divide evenly by any device clock
const APIC: u64 = 0xfee0_0000;

fn boot() -> DateTime {
    DateTime {
        year: 2026,
        month: 12,
        day: 2,
        hour: 19,
        minute: 0,
        second: 0,
    }
}

fn platform() -> Platform {
    Platform::new(Timebase::new(HZ), 0, boot()).unwrap()
}

fn w32(p: &mut Platform, gpa: u64, v: u32, now: Tsc) {
    p.mmio_write(gpa, &v.to_le_bytes(), now);
}

fn r32(p: &mut Platform, gpa: u64, now: Tsc) -> u32 {
    let mut b = [0; 4];
    p.mmio_read(gpa, &mut b, now);
    u32::from_le_bytes(b)
}

/// Routes IOAPIC `pin` to `vector` (physical destination APIC 0), unmasked.
fn route_pin(p: &mut Platform, pin: u32, vector: u8, level: bool, now: Tsc) {
    let low = u32::from(vector) | (u32::from(level) << 15);
    w32(p, IOAPIC_BASE, 0x10 + 2 * pin, now);
    w32(p, IOAPIC_BASE + 0x10, low, now);
    w32(p, IOAPIC_BASE, 0x11 + 2 * pin, now);
    w32(p, IOAPIC_BASE + 0x10, 0, now);
}

/// Takes every interrupt due up to `until` in steps of `step`, EOI-ing each at the local APIC
/// (or the 8259 for ExtINT vectors): returns the vectors taken.
fn run(p: &mut Platform, from: Tsc, until: Tsc, step: u64) -> Vec<u8> {
    let mut taken = Vec::new();
    let mut now = from;
    while now < until {
        p.advance(now);
        while let Some(pending) = p.pending_interrupt() {
            let v = p.acknowledge().unwrap();
            taken.push(v);
            match pending {
                Pending::Apic(_) => w32(p, APIC + 0xb0, 0, now),
                Pending::ExtInt => p.pio_write(0x20, 1, 0x20, now),
            }
        }
        now += step;
    }
    taken
}

use alloc::vec::Vec;

#[test]
fn firmware_state_delivers_nothing_and_unclaimed_accesses_float() {
    let mut p = platform();
    assert_eq!(p.pending_interrupt(), None);
    assert_eq!(p.next_deadline(), None, "no timer armed at power-on");
    assert_eq!(p.pio_read(0x80, 1, 0), 0xff);
    assert_eq!(p.pio_read(0x1234, 4, 0), 0xffff_ffff);
    let mut b = [0; 4];
    p.mmio_read(0xfed0_0000, &mut b, 0);
    assert_eq!(b, [0xff; 4]);
    assert_eq!(p.stats.unclaimed_mmio, 1);
    // The local APIC is enabled (virtual wire) at its default base, ID 0, version 0x14.
    assert_eq!(r32(&mut p, APIC + 0xf0, 0), 0x1ff);
    assert_eq!(r32(&mut p, APIC + 0x30, 0) & 0xff, 0x14);
    assert!(p.is_mmio(APIC + 0x300) && p.is_mmio(IOAPIC_BASE + 0x10));
    assert!(!p.is_mmio(0x1000));
    // A 16-bit IN spans two ports: COM1's LSR and MSR.
    assert_eq!(p.pio_read(0x3fd, 2, 0) & 0xff, 0x60);
}

#[test]
fn pit_at_100_hz_through_ioapic_pin_2() {
    let mut p = platform();
    route_pin(&mut p, 2, 0x30, false, 0);
    // Mode 2, lsb/msb, divisor 11932 (Linux's LATCH for HZ=100).
    p.pio_write(0x43, 1, 0x34, 0);
    p.pio_write(0x40, 1, 11932 & 0xff, 0);
    p.pio_write(0x40, 1, 11932 >> 8, 0);
    let taken = run(&mut p, 0, HZ, HZ / 5000);
    assert!(taken.iter().all(|&v| v == 0x30));
    // 1_193_182 / 11932 = 99.998 Hz: 99 or 100 edges in one second.
    assert!(
        (99..=100).contains(&taken.len()),
        "{} interrupts",
        taken.len()
    );
}

#[test]
fn pit_through_the_8259_and_lint0_extint() {
    let mut p = platform();
    // init_8259A: ICW1 0x11, ICW2 0x20/0x28, ICW3 4/2, ICW4 1; unmask IRQ 0 only.
    for (port, v) in [
        (0x20, 0x11),
        (0x21, 0x20),
        (0x21, 4),
        (0x21, 1),
        (0xa0, 0x11),
        (0xa1, 0x28),
        (0xa1, 2),
        (0xa1, 1),
        (0x21, 0xfe),
        (0xa1, 0xff),
    ] {
        p.pio_write(port, 1, v, 0);
    }
    p.pio_write(0x43, 1, 0x34, 0);
    p.pio_write(0x40, 1, 0x9c, 0);
    p.pio_write(0x40, 1, 0x2e, 0); // 11932
    let taken = run(&mut p, 0, HZ / 10, HZ / 5000);
    assert!(
        (9..=10).contains(&taken.len()),
        "{} interrupts",
        taken.len()
    );
    assert!(
        taken.iter().all(|&v| v == 0x20),
        "IRQ 0 at the master's base"
    );
    // Masking LINT0 cuts the 8259 off the CPU.
    w32(&mut p, APIC + 0x350, 1 << 16, HZ / 10);
    assert!(run(&mut p, HZ / 10, HZ / 5, HZ / 5000).is_empty());
}

#[test]
fn lapic_timer_periodic_through_mmio_and_priorities() {
    let mut p = platform();
    // Divide by 1 (TDCR 0xB), periodic, vector 0x40, 1 ms at the 1 GHz bus.
    w32(&mut p, APIC + 0x3e0, 0xb, 0);
    w32(&mut p, APIC + 0x320, (1 << 17) | 0x40, 0);
    w32(&mut p, APIC + 0x380, 1_000_000, 0);
    // Expiries at 1, 2, ... 100 ms (rounded up to a tick): run a step past 100 ms.
    let taken = run(&mut p, 0, HZ / 10 + 2 * (HZ / 100_000), HZ / 100_000);
    assert_eq!(taken.len(), 100, "1 kHz over 100 ms");
    // TPR class 4 blocks vector 0x40; lowering it lets the pending one in.
    w32(&mut p, APIC + 0x80, 0x40, HZ / 10);
    p.advance(HZ / 10 + HZ / 500);
    assert_eq!(p.pending_interrupt(), None);
    w32(&mut p, APIC + 0x80, 0, HZ / 10 + HZ / 500);
    assert_eq!(p.pending_interrupt(), Some(Pending::Apic(0x40)));
}

#[test]
fn x2apic_and_tsc_deadline_msrs_belong_to_the_platform() {
    let mut p = platform();
    assert_eq!(p.msr_read(0x10, 0), None, "the TSC is not the platform's");
    assert_eq!(p.msr_read(MSR_APIC_BASE, 0), Some(Ok(0xfee0_0900)));
    assert_eq!(
        p.msr_read(0x802, 0),
        Some(Err(Gp)),
        "x2APIC MSRs #GP in xAPIC mode"
    );
    assert_eq!(p.msr_write(MSR_APIC_BASE, 0xfee0_0d00, 0), Some(Ok(())));
    assert_eq!(p.msr_read(0x802, 0), Some(Ok(0)));
    // TSC-deadline mode, vector 0x50, deadline 1000 ticks from now.
    assert_eq!(p.msr_write(0x832, (2 << 17) | 0x50, 0), Some(Ok(())));
    assert_eq!(p.msr_write(MSR_TSC_DEADLINE, 1000, 0), Some(Ok(())));
    assert_eq!(p.next_deadline(), Some(1000));
    p.advance(999);
    assert_eq!(p.pending_interrupt(), None);
    p.advance(1000);
    assert_eq!(p.acknowledge(), Some(0x50));
    assert_eq!(p.msr_write(0x80b, 0, 1000), Some(Ok(())), "EOI");
    assert_eq!(p.msr_write(0x80b, 1, 1000), Some(Err(Gp)), "non-zero EOI");
    assert_eq!(p.next_deadline(), None, "one shot");
}

#[test]
fn serial_input_raises_irq_4_until_read() {
    let mut p = platform();
    route_pin(&mut p, 4, 0x24, false, 0);
    // RX interrupts on, OUT2 on (it gates the IRQ on PCs).
    p.pio_write(0x3f9, 1, 1, 0);
    p.pio_write(0x3fc, 1, 0x08, 0);
    assert_eq!(p.pending_interrupt(), None);
    assert_eq!(p.push_input(b"hi\r", 10), 3);
    assert_eq!(p.acknowledge(), Some(0x24));
    w32(&mut p, APIC + 0xb0, 0, 10);
    let mut got = Vec::new();
    while p.pio_read(0x3fd, 1, 20) & 1 != 0 {
        got.push(p.pio_read(0x3f8, 1, 20) as u8);
    }
    assert_eq!(got, b"hi\r");
    assert_eq!(p.pending_interrupt(), None, "drained: no new edge");
    p.push_input(b"x", 30);
    assert_eq!(p.acknowledge(), Some(0x24), "a new byte, a new interrupt");
}

#[test]
fn rtc_periodic_on_a_level_triggered_pin_needs_reg_c_and_eoi() {
    let mut p = platform();
    route_pin(&mut p, 8, 0x28, true, 0);
    // 1024 Hz (RS = 6), PIE.
    p.pio_write(0x70, 1, 0x0a, 0);
    p.pio_write(0x71, 1, 0x26, 0);
    p.pio_write(0x70, 1, 0x0b, 0);
    p.pio_write(0x71, 1, 0x42, 0);
    let mut now = 0;
    let mut count = 0;
    while now < HZ / 4 {
        p.advance(now);
        if p.pending_interrupt().is_some() {
            assert_eq!(p.acknowledge(), Some(0x28));
            count += 1;
            // Without reading C the line stays high: the EOI alone would re-deliver.
            p.pio_write(0x70, 1, 0x0c, now);
            assert_ne!(p.pio_read(0x71, 1, now) & 0x40, 0, "PF set");
            w32(&mut p, APIC + 0xb0, 0, now);
            assert_eq!(p.pending_interrupt(), None);
        }
        now += HZ / 20_000;
    }
    assert!(
        (255..=257).contains(&count),
        "{count} periodic interrupts in 250 ms"
    );
}

#[test]
fn junk_at_every_port_and_register_does_not_panic() {
    let mut p = platform();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut now = 0;
    for _ in 0..50_000 {
        let r = next();
        now += r % 10_000;
        let size = [1u8, 2, 4][(r >> 20) as usize % 3];
        match r % 5 {
            0 => p.pio_write((r >> 32) as u16 % 0x500, size, (r >> 8) as u32, now),
            1 => {
                p.pio_read((r >> 32) as u16 % 0x500, size, now);
            }
            2 => {
                let base = if r & (1 << 40) != 0 {
                    APIC
                } else {
                    IOAPIC_BASE
                };
                let len = [1usize, 2, 4, 8][(r >> 41) as usize % 4];
                let data = next().to_le_bytes();
                p.mmio_write(base + (r >> 44) % 0x1000, &data[..len], now);
            }
            3 => {
                p.msr_write(0x800 + (r >> 32) as u32 % 0x100, next(), now);
            }
            _ => {
                p.advance(now);
                if p.pending_interrupt().is_some() {
                    p.acknowledge();
                }
            }
        }
    }
}

#[test]
fn rtc_started_behind_a_masked_pin_interrupts_once_unmasked() {
    let mut p = platform();
    route_pin(&mut p, 8, 0x58, false, 0);
    // Mask (read-modify-write of the low dword, as a driver does), start, acknowledge, unmask.
    let mask = |p: &mut Platform, masked: bool| {
        w32(p, IOAPIC_BASE, 0x10 + 2 * 8, 0);
        let low = r32(p, IOAPIC_BASE + 0x10, 0);
        let low = if masked {
            low | (1 << 16)
        } else {
            low & !(1 << 16)
        };
        w32(p, IOAPIC_BASE, 0x10 + 2 * 8, 0);
        w32(p, IOAPIC_BASE + 0x10, low, 0);
    };
    mask(&mut p, true);
    p.pio_write(0x70, 1, 0x0a, 0);
    p.pio_write(0x71, 1, 0x28, 0); // 256 Hz
    p.pio_write(0x70, 1, 0x0b, 0);
    p.pio_write(0x71, 1, 0x42, 0);
    p.pio_write(0x70, 1, 0x0c, 0);
    p.pio_read(0x71, 1, 0);
    mask(&mut p, false);
    let mut now = 0;
    let mut count = 0;
    while now < HZ / 10 {
        p.advance(now);
        if p.pending_interrupt().is_some() {
            assert_eq!(p.acknowledge(), Some(0x58));
            count += 1;
            p.pio_write(0x70, 1, 0x0c, now);
            p.pio_read(0x71, 1, now);
            w32(&mut p, APIC + 0xb0, 0, now);
        }
        now += HZ / 20_000;
    }
    assert!(
        (25..=26).contains(&count),
        "{count} interrupts in 100 ms at 256 Hz"
    );
}

#[test]
fn periodic_after_tsc_deadline_mode_through_mmio() {
    let mut p = platform();
    // TSC-deadline mode (xAPIC LVT write, then the MSR), fired and taken.
    w32(&mut p, APIC + 0x320, (2 << 17) | 0x50, 0);
    assert_eq!(p.msr_write(MSR_TSC_DEADLINE, 1000, 0), Some(Ok(())));
    p.advance(2000);
    assert_eq!(p.acknowledge(), Some(0x50));
    w32(&mut p, APIC + 0xb0, 0, 2000);
    // Then periodic at 2 ms, divide by 1, as a round of the irqwin guest starts it.
    let t = 10_000;
    w32(&mut p, APIC + 0x320, (1 << 17) | 0x50, t);
    w32(&mut p, APIC + 0x3e0, 0xb, t);
    w32(&mut p, APIC + 0x380, 2_000_000, t);
    let period = HZ / 500;
    assert!(p
        .next_deadline()
        .is_some_and(|d| d > t && d <= t + period + 1));
    p.advance(t + period + 1);
    assert_eq!(
        p.pending_interrupt(),
        Some(Pending::Apic(0x50)),
        "{:?}",
        p.next_deadline()
    );
}

#[test]
fn the_test_device_is_absent_until_attached_then_drives_lines_and_keeps_its_ram() {
    use crate::testdev::{IRQ_PORT_BASE, RAM_BASE};
    let mut p = platform();
    // An ordinary PC: the ports float and the RAM is not a device.
    assert_eq!(p.pio_read(0xe0, 4, 0), 0xffff_ffff);
    assert!(!p.is_mmio(RAM_BASE));
    p.pio_write(IRQ_PORT_BASE + 14, 1, 1, 0);
    assert_eq!(p.pending_interrupt(), None);

    p.attach_test_device().unwrap();
    assert!(p.attach_test_device().is_err(), "only one");
    p.pio_write(0xe0, 4, 0xdead_beef, 0);
    assert_eq!(p.pio_read(0xe0, 4, 0), 0xdead_beef);
    assert_eq!(p.pio_read(0xe8, 2, 0), 0xbeef);
    w32(&mut p, RAM_BASE + 0xfffc, 0x1234_5678, 0);
    assert_eq!(r32(&mut p, RAM_BASE + 0xfffc, 0), 0x1234_5678);
    assert!(p.is_mmio(RAM_BASE) && !p.is_mmio(RAM_BASE + 0x1_0000));

    // Level-triggered pin 14: the line held high delivers once per EOI while it stays high.
    route_pin(&mut p, 14, 0x77, true, 0);
    p.pio_write(IRQ_PORT_BASE + 14, 1, 1, 0);
    assert_eq!(p.acknowledge(), Some(0x77));
    p.pio_write(IRQ_PORT_BASE + 14, 1, 0, 0);
    w32(&mut p, APIC + 0xb0, 0, 0);
    assert_eq!(p.pending_interrupt(), None);
    // Edge-triggered pin 15: a pulse by two writes is one interrupt.
    route_pin(&mut p, 15, 0x66, false, 0);
    p.pio_write(IRQ_PORT_BASE + 15, 1, 1, 0);
    p.pio_write(IRQ_PORT_BASE + 15, 1, 0, 0);
    assert_eq!(run(&mut p, 0, 10, 1), [0x66]);
    // A 4-byte write to the line ports does nothing (QEMU takes only bytes there).
    p.pio_write(IRQ_PORT_BASE + 15, 4, 1, 0);
    assert_eq!(p.pending_interrupt(), None);
    assert_eq!(p.pio_read(IRQ_PORT_BASE + 15, 1, 0), 0);
}

#[test]
fn bios_setup_leaves_the_pit_ticking_at_18_2_hz_on_vector_8_through_the_8259() {
    let mut p = platform();
    p.bios_setup(0);
    // 1_193_182 / 65536 = 18.2 Hz: 18 or 19 ticks in a second, each vector 8 through ExtINT.
    let taken = run(&mut p, 0, HZ, HZ / 1000);
    assert!((18..=19).contains(&taken.len()), "{} ticks", taken.len());
    assert!(taken.iter().all(|&v| v == 8));
    // The other inputs are masked, and so is every IOAPIC pin.
    p.pio_write(0x70, 1, 0x0b, 0);
    p.pio_write(0x71, 1, 0x40, 0); // RTC periodic interrupt on IRQ 8
    assert!(run(&mut p, HZ, 2 * HZ, HZ / 1000).iter().all(|&v| v == 8));
    assert_eq!(p.pio_read(0x21, 1, 0), 0xfa);
    assert_eq!(p.pio_read(0xa1, 1, 0), 0xff);
}

#[test]
fn only_self_repeating_timers_count_as_periodic() {
    let mut p = platform();
    assert!(!p.periodic_timer_armed(), "nothing armed at power-on");
    // x2APIC TSC-deadline: one-shot, the guest arms each next deadline itself.
    p.msr_write(MSR_APIC_BASE, 0xfee0_0d00, 0);
    p.msr_write(0x832, (2 << 17) | 0x50, 0);
    p.msr_write(MSR_TSC_DEADLINE, 1000, 0);
    assert!(!p.periodic_timer_armed());
    // LAPIC periodic mode with a count: periodic; masked-count zero stops it.
    p.msr_write(0x832, (1 << 17) | 0x50, 0);
    p.msr_write(0x838, 5000, 0);
    assert!(p.periodic_timer_armed());
    p.msr_write(0x838, 0, 0);
    assert!(!p.periodic_timer_armed());
    // PIT mode 0 (one-shot), then mode 2 (rate generator).
    p.pio_write(0x43, 1, 0x30, 0);
    p.pio_write(0x40, 1, 0x00, 0);
    p.pio_write(0x40, 1, 0x10, 0);
    assert!(!p.periodic_timer_armed(), "mode 0 fires once");
    p.pio_write(0x43, 1, 0x34, 0);
    p.pio_write(0x40, 1, 11932 & 0xff, 0);
    p.pio_write(0x40, 1, 11932 >> 8, 0);
    assert!(p.periodic_timer_armed(), "mode 2 repeats");
    // Back to mode 0, then the RTC's periodic interrupt.
    p.pio_write(0x43, 1, 0x30, 0);
    assert!(!p.periodic_timer_armed());
    p.pio_write(0x70, 1, 0x0b, 0);
    p.pio_write(0x71, 1, 0x42, 0);
    assert!(p.periodic_timer_armed(), "RTC PIE");
}
