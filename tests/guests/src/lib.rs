//! The runtime of the test guests: what every guest image needs around its `main`.
//!
//! The test guests are freestanding 64-bit programs that the hypervisor loads as VMs (one image per
//! binary in `src/bin/`). This library owns:
//! - the entry point ([`entry!`]): `_start` as the hypervisor enters it under the 64-bit boot
//!   protocol of [`guest_abi::boot`], the checks of the [`guest_abi::boot::BootInfo`], the call
//!   into the guest's `main` and the exit hypercall with its result ([`rt`]);
//! - the command line ([`cmdline`]): space-separated `key=value` words;
//! - output ([`console`]): a line-buffered writer over the console hypercall, a polling writer over
//!   the emulated 16550 UART, and the [`println!`] / [`serial_println!`] macros;
//! - the panic handler: prints the panic through the console hypercall and exits with
//!   [`rt::EXIT_PANIC`];
//! - exception handling ([`idt`]): an IDT of its own so that a guest can provoke #GP on purpose
//!   (RDMSR/WRMSR of MSRs the hypervisor does not allow) and carry on;
//! - external interrupts ([`interrupts`]): gates 32..=255 to per-vector counters and handlers;
//! - drivers for the PC platform the hypervisor emulates, each small and programmed as on real
//!   hardware: [`lapic`] (xAPIC/x2APIC, timer, EOI, TPR, self-IPIs), [`ioapic`], [`pic`] (8259),
//!   [`pit`] (8254), [`rtc`] (MC146818), [`uart`] (16550 interrupt-driven receive), and [`tsc`]
//!   (TSC rate from CPUID leaf 0x4000_0010, time conversions); [`checks`] prints PASS/FAIL lines;
//! - thin wrappers over the instructions the guests use to poke the hypervisor ([`cpu`]) and the
//!   deterministic CPU-bound kernel of the `busy` guest ([`work`]).
//!
//! The hypercalls themselves are [`guest_abi::guest`]'s; docs/hypercalls.md describes the ABI and
//! how to write a guest with this runtime.
//!
//! The images only make sense for `x86_64-unknown-none`. On the host the pure parts of this crate
//! (command-line parsing, the busy-work kernel, register encodings, rings and time arithmetic)
//! are unit-tested with `cargo test -p test-guests`.
#![cfg_attr(not(test), no_std)]

#[cfg(not(target_arch = "x86_64"))]
compile_error!("the test guests are x86_64 programs");

pub mod checks;
pub mod cmdline;
pub mod console;
pub mod cpu;
pub mod idt;
pub mod interrupts;
pub mod ioapic;
pub mod lapic;
pub mod pages;
pub mod pic;
pub mod pit;
pub mod rt;
pub mod rtc;
pub mod tsc;
pub mod uart;
pub mod work;

pub use guest_abi;
