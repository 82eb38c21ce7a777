//! The virtual platform each VM sees: the devices of a PC that a guest programs directly, as
//! models that know nothing of VMX, of the host's hardware or of other VMs.
//!
//! - [`time`]: the VM's clock. Every model counts in guest TSC ticks ([`Tsc`]) and converts
//!   with a [`Timebase`] in exact integer arithmetic, so time dilation (a property of how the
//!   kernel computes the guest TSC) reaches every device at once.
//! - [`irq`]: interrupt lines (GSIs). A device sets a line's level or pulses it; the platform
//!   routes line changes into the interrupt-controller models.
//! - [`bus`]: port-I/O and MMIO buses: address ranges mapped to device identifiers, and the
//!   [`bus::PioDevice`] / [`bus::MmioDevice`] traits every model implements.
//! - [`pit`]: the Intel 8254 PIT (ports 0x40-0x43) and its bits of port 0x61 (channel 2's gate
//!   and OUT, the refresh toggle); channel 0 pulses IRQ 0.
//! - [`rtc`]: the MC146818A RTC and CMOS RAM (ports 0x70-0x71): the wall clock from a boot
//!   time plus guest time, periodic, update and alarm interrupts on IRQ 8.
//! - [`uart`]: a 16550A UART (COM1 at 0x3F8, IRQ 4 by default) with FIFOs, interrupts and
//!   loopback; the platform drains its output and pushes its input.
//! - [`lapic`]: the local APIC of the single vCPU (xAPIC page, x2APIC MSRs, timer with
//!   one-shot, periodic and TSC-deadline modes, IRR/ISR priority logic); the platform injects
//!   what it reports.
//! - [`ioapic`]: the 24-pin IOAPIC at 0xFEC00000, which turns line levels into messages for
//!   the local APIC (edge and level, remote IRR, masking).
//! - [`pic`]: the two cascaded 8259A PICs and the PIIX's ELCR, whose INTR reaches the CPU
//!   through LINT0 in ExtINT mode (or directly while the local APIC is disabled).
//! - [`reset`]: the PC's reset ports: the 8042's reset command (0x64) and the reset control
//!   register (0xCF9), which guests use to reboot.
//! - [`testdev`]: QEMU's pc-testdev for test suites (opt-in): a scratch port, one port per
//!   interrupt line, and 64 KiB of MMIO RAM at 0xFF000000.
//! - [`platform`]: one VM's platform: the devices above on their buses, the interrupt lines
//!   wired as on a PC, and the interface the exit policy uses.
//!
//! Nothing here executes a privileged instruction or touches host memory: all of it runs under
//! `cargo test` on the host.
#![no_std]

extern crate alloc;

pub mod acpi_pm;
pub mod bus;
pub mod ioapic;
pub mod irq;
pub mod lapic;
pub mod pic;
pub mod pit;
pub mod platform;
mod regs;
pub mod reset;
pub mod rtc;
pub mod testdev;
pub mod time;
pub mod uart;

pub use platform::{Pending, Platform};
pub use time::{Timebase, Tsc};
