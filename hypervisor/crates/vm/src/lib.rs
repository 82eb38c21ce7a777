//! The VM model: everything about a VM that is policy or bookkeeping, not hardware.
//!
//! - [`elf`], [`boot`], [`multiboot`]: loading a guest kernel (ELF64 or ELF32), telling which
//!   boot protocol it uses, muxvisor's 64-bit boot area, and a Multiboot kernel's layout and
//!   boot information.
//! - [`linux`]: the Linux/x86 boot protocol: a bzImage's setup header, where its kernel, initrd and
//!   zero page go, the zero page and its e820 map (not wired to the manifest yet).
//! - [`cpu_mode`]: the guest's paging-mode switches (MOV to CR0 with PG or NE, EFER.LMA).
//! - [`frames`]: the physical frame allocator over the boot memory map.
//! - [`memory`]: a VM's guest-physical memory (which frame backs which page) and checked copies
//!   in and out of it.
//! - [`hypercall`]: decoding and checking of every hypercall (guest-abi's ABI).
//! - [`console`]: a VM's console lines, sanitized and queued for the serial log.
//! - [`lines`]: the buffer that turns a VM's console bytes into lines.
//! - [`policy`]: what the guest sees for CPUID and XSETBV, which CR4 bits it may not set.
//! - [`paging`]: walks a guest's page tables for instructions emulated on its behalf.
//! - [`mmio`]: emulation of a guest's access to an MMIO device page (local APIC, IOAPIC): the
//!   instruction fetched at RIP, decoded (with `iced-x86`) and done against the device.
//! - [`msr`]: the MSRs a guest may touch, the checks on their values, and where each is kept.
//! - [`sched`]: round-robin scheduling with quanta, and per-VM statistics.
//! - [`runqueue`]: the VMs ready to run and the sleeping VMs by wake time, so that a scheduling
//!   decision does not look at every VM.
//! - [`idle`]: the idle-VM detector (active, idle, dormant) and the quantum it calls for.
//! - [`pressure`]: the memory-pressure policy: when VMs paused for want of a frame resume, and
//!   which one is stopped when nothing more can be reclaimed.
//! - [`regs`]: the guest's general-purpose registers as the kernel saves them.
//! - [`vcpu`]: the vendor-neutral vCPU backend trait the exit policy works through.
//! - [`vm`]: a VM's policy state (name, configuration, run state, console, devices).
//! - [`exits`]: the exit policy: what happens on every VM exit, host-tested against a fake vCPU.
//!
//! This crate never executes a privileged instruction and never dereferences a physical
//! address: the kernel passes it a [`memory::PhysMemory`] that does. So all of it runs under
//! `cargo test` on the host.
#![no_std]

extern crate alloc;

pub mod acpi;
pub mod boot;
pub mod clock;
pub mod console;
pub mod cpu_mode;
pub mod elf;
pub mod exits;
pub mod frames;
pub mod hypercall;
pub mod idle;
pub mod lines;
pub mod linux;
pub mod memory;
pub mod mmio;
pub mod msr;
pub mod multiboot;
pub mod paging;
pub mod policy;
pub mod pressure;
pub mod regs;
pub mod runqueue;
pub mod sched;
pub mod vcpu;
pub mod vm;

pub use vm::Vm;
