//! The seam between the exit policy and the hardware: what the policy may ask of a vCPU.
//!
//! In the spirit of Hypervisor-101-in-Rust's `HardwareVt`, [`Vcpu`] is vendor-neutral: the
//! kernel implements it with VT-x (the VMCS, VMREAD/VMWRITE, the physical CPU's registers);
//! an AMD SVM backend would implement the same trait with a VMCB. The tests implement it with
//! [`fake::FakeVcpu`], a register file in memory, so that every exit policy runs under
//! `cargo test`. Generic code over this trait is monomorphized: the seam costs no indirect call
//! on the exit path.
//!
//! Besides the guest's own state the trait also reaches the few resources of the physical CPU
//! that an exit handles on the guest's behalf (native CPUID, XCR0, the MSRs held in the CPU
//! while the guest runs, CR2, caches, the host's interrupts): they belong to the backend too,
//! because they are hardware.

use hv_vmx::exit::Interruption;

use crate::memory::PhysMemory;
use crate::msr::Msr;
use crate::regs::{GuestRegisters, RSP};

/// Guest state the policy reads or writes besides the general-purpose registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Rsp,
    Rip,
    Rflags,
    /// The control registers as the CPU uses them (not the read shadows).
    Cr0,
    /// What the guest reads for the host-owned CR0 bits ([`crate::cpu_mode::CR0_HOST_OWNED`]).
    Cr0Shadow,
    Cr3,
    Cr4,
    /// The current privilege level (0-3).
    Cpl,
    /// Blocking by STI / MOV SS / NMI (SDM 25.4.2, Table 25-3 bit layout).
    Interruptibility,
    /// CS base and access rights (VMCS format: L bit 13, D/B bit 14), for fetching the
    /// instruction of an MMIO access.
    CsBase,
    CsAccessRights,
    /// The PAE page-directory-pointer-table entries (32-bit PAE paging): the CPU loads them
    /// from here at entry when the guest uses PAE paging outside IA-32e mode.
    Pdpte(u8),
}

/// Interruptibility-state bits (SDM 25.4.2, Table 25-3).
pub mod interruptibility {
    pub const STI: u64 = 1 << 0;
    pub const MOV_SS: u64 = 1 << 1;
    pub const NMI: u64 = 1 << 3;
}

/// RFLAGS bits the policy uses.
pub mod rflags {
    pub const TF: u64 = 1 << 8;
    pub const RF: u64 = 1 << 16;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
}

/// What the policy may ask of the virtual CPU it handles an exit for.
pub trait Vcpu {
    /// Host-physical memory, where the guest's pages are.
    type Phys: PhysMemory;

    /// The general-purpose registers but RSP.
    fn regs(&mut self) -> &mut GuestRegisters;
    fn read(&mut self, reg: Reg) -> u64;
    fn write(&mut self, reg: Reg, value: u64);
    /// The guest's value of an MSR the hardware switches on entry and exit
    /// ([`crate::msr::Home::Vmcs`]).
    fn read_msr(&mut self, msr: Msr) -> u64;
    fn write_msr(&mut self, msr: Msr, value: u64);
    /// Completes the instruction that caused the exit, as the CPU would on retiring it: RIP
    /// moves past it and, under RFLAGS.TF, a single-step trap is pending (SDM 17.3.1.4).
    fn skip_instruction(&mut self);
    /// Like [`Self::skip_instruction`] for an instruction of `len` bytes the hypervisor decoded
    /// itself (an MMIO access: the exit does not report a length).
    fn skip_bytes(&mut self, len: u64);
    /// Whether an instruction was completed (skipped) since the last VM exit: an STI or MOV SS
    /// shadow that covered it has ended (SDM 6.8.3).
    fn instruction_completed(&self) -> bool;
    /// Delivers `event` (with `error_code` when it has one) at the next entry.
    fn inject(&mut self, event: Interruption, error_code: u32);
    /// Whether an event is already set up for delivery at the next entry.
    fn injecting(&self) -> bool;
    /// Exit as soon as the guest can take an external interrupt (interrupt-window exiting,
    /// SDM 26.7.5), or not.
    fn set_interrupt_window(&mut self, on: bool);
    /// Exit as soon as the guest's NMI blocking ends (NMI-window exiting, with virtual NMIs),
    /// or not. Without virtual NMIs this does nothing: the NMI is retried at every entry.
    fn set_nmi_window(&mut self, on: bool);
    /// Host memory, to reach the guest's pages.
    fn phys(&mut self) -> &mut Self::Phys;

    /// CPUID of the physical CPU.
    fn native_cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4];
    /// Loads the guest's (already checked) XCR0 into the CPU.
    fn set_xcr0(&mut self, value: u64);
    /// Writes back and invalidates the caches (WBINVD).
    fn write_back_caches(&mut self);
    /// An MSR held in the physical CPU while the guest runs ([`crate::msr::Home::Switched`]).
    fn read_cpu_msr(&mut self, index: u32) -> u64;
    /// Writes such an MSR; the value passed the CPU's own checks, so it cannot fault.
    fn write_cpu_msr(&mut self, index: u32, value: u64);
    /// Sets the guest's CR2 (before injecting a page fault).
    fn set_cr2(&mut self, value: u64);
    /// The host's time stamp counter.
    fn tsc(&mut self) -> u64;
    /// Makes the guest's RDTSC return its clock plus what it wrote to IA32_TSC: `offset` is
    /// the VMCS TSC offset for that (with the clock's multiplier). A backend that computes the
    /// guest's TSC in software (RDTSC exiting) has nothing to do.
    fn set_tsc_offset(&mut self, offset: u64);
    /// Enters the guest in IA-32e mode from now on, or not (the VM-entry control that follows
    /// EFER.LMA, SDM 25.8.1); [`crate::cpu_mode`] switches it with EFER.LMA.
    fn set_long_mode(&mut self, active: bool);
    /// Drops every translation the CPU caches for the guest (its paging mode changed).
    fn flush_guest_tlb(&mut self);
    /// A host interrupt arrived during the guest: acknowledge it at its controller.
    fn host_interrupt(&mut self, vector: u8);
    /// A host NMI arrived during the guest.
    fn host_nmi(&mut self);

    /// A general-purpose register by its SDM number (RSP from [`Reg::Rsp`]).
    fn gpr(&mut self, n: u8) -> u64 {
        match self.regs().slot(n) {
            Some(r) => *r,
            None => self.read(Reg::Rsp),
        }
    }

    fn set_gpr(&mut self, n: u8, value: u64) {
        match self.regs().slot(n) {
            Some(r) => *r = value,
            None => {
                debug_assert_eq!(n & 0xf, RSP);
                self.write(Reg::Rsp, value);
            }
        }
    }
}

/// A vCPU in memory for host tests: registers, MSRs and a record of what the policy did.
#[cfg(test)]
pub mod fake {
    use alloc::collections::BTreeMap;
    use alloc::vec::Vec;

    use super::*;
    use crate::memory::tests::FlatPhys;

    pub struct FakeVcpu {
        pub regs: GuestRegisters,
        pub state: BTreeMap<&'static str, u64>,
        pub msrs: BTreeMap<u32, u64>,
        pub cpu_msrs: BTreeMap<u32, u64>,
        pub instruction_len: u64,
        pub injected: Vec<(Interruption, u32)>,
        pub phys: FlatPhys,
        pub xcr0: u64,
        pub cr2: u64,
        pub tsc: u64,
        /// The last [`Vcpu::set_tsc_offset`].
        pub tsc_offset: Option<u64>,
        pub caches_written_back: u32,
        pub host_interrupts: Vec<u8>,
        pub host_nmis: u32,
        /// The "IA-32e mode guest" entry control.
        pub long_mode: bool,
        pub tlb_flushes: u32,
        pub single_steps: u32,
        pub interrupt_window: bool,
        pub nmi_window: bool,
        pub completed: bool,
    }

    impl FakeVcpu {
        pub fn new(phys: FlatPhys) -> Self {
            let mut state = BTreeMap::new();
            state.insert("rip", 0x1000);
            state.insert("rflags", 2);
            state.insert("rsp", 0x8000);
            Self {
                regs: GuestRegisters::default(),
                state,
                msrs: BTreeMap::new(),
                cpu_msrs: BTreeMap::new(),
                instruction_len: 2,
                injected: Vec::new(),
                phys,
                xcr0: 1,
                cr2: 0,
                tsc: 1_000_000,
                tsc_offset: None,
                caches_written_back: 0,
                host_interrupts: Vec::new(),
                host_nmis: 0,
                long_mode: true,
                tlb_flushes: 0,
                single_steps: 0,
                interrupt_window: false,
                nmi_window: false,
                completed: false,
            }
        }

        /// A plausible Intel CPU with XSAVE (x87, SSE, AVX) for the leaves the policy reads.
        pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
            match (leaf, subleaf) {
                (0, _) => [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69],
                (1, _) => [0x906ea, 0x0010_0800, 0xffff_ffff, 0xffff_ffff],
                (0xd, 0) => [0b111, 832, 832, 0],
                (0xd, 2) => [256, 576, 0, 0],
                _ => [0, 0, 0, 0],
            }
        }

        pub fn rip(&self) -> u64 {
            self.state["rip"]
        }

        fn key(reg: Reg) -> &'static str {
            match reg {
                Reg::Rsp => "rsp",
                Reg::Rip => "rip",
                Reg::Rflags => "rflags",
                Reg::Cr0 => "cr0",
                Reg::Cr0Shadow => "cr0_shadow",
                Reg::Cr3 => "cr3",
                Reg::Cr4 => "cr4",
                Reg::Cpl => "cpl",
                Reg::Interruptibility => "interruptibility",
                Reg::CsBase => "cs_base",
                Reg::CsAccessRights => "cs_ar",
                Reg::Pdpte(0) => "pdpte0",
                Reg::Pdpte(1) => "pdpte1",
                Reg::Pdpte(2) => "pdpte2",
                Reg::Pdpte(_) => "pdpte3",
            }
        }
    }

    impl Vcpu for FakeVcpu {
        type Phys = FlatPhys;
        fn regs(&mut self) -> &mut GuestRegisters {
            &mut self.regs
        }
        fn read(&mut self, reg: Reg) -> u64 {
            self.state.get(Self::key(reg)).copied().unwrap_or(0)
        }
        fn write(&mut self, reg: Reg, value: u64) {
            self.state.insert(Self::key(reg), value);
        }
        fn read_msr(&mut self, msr: Msr) -> u64 {
            self.msrs.get(&msr.index()).copied().unwrap_or(0)
        }
        fn write_msr(&mut self, msr: Msr, value: u64) {
            self.msrs.insert(msr.index(), value);
        }
        fn skip_instruction(&mut self) {
            self.completed = true;
            let rip = self.rip() + self.instruction_len;
            self.state.insert("rip", rip);
            if self.read(Reg::Rflags) & rflags::TF != 0 {
                self.single_steps += 1;
            }
        }
        fn skip_bytes(&mut self, len: u64) {
            self.completed = true;
            let rip = self.rip() + len;
            self.state.insert("rip", rip);
            if self.read(Reg::Rflags) & rflags::TF != 0 {
                self.single_steps += 1;
            }
        }
        fn inject(&mut self, event: Interruption, error_code: u32) {
            self.injected.push((event, error_code));
        }
        fn injecting(&self) -> bool {
            !self.injected.is_empty()
        }
        fn instruction_completed(&self) -> bool {
            self.completed
        }
        fn set_interrupt_window(&mut self, on: bool) {
            self.interrupt_window = on;
        }
        fn set_nmi_window(&mut self, on: bool) {
            self.nmi_window = on;
        }
        fn phys(&mut self) -> &mut FlatPhys {
            &mut self.phys
        }
        fn native_cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
            Self::cpuid(leaf, subleaf)
        }
        fn set_xcr0(&mut self, value: u64) {
            self.xcr0 = value;
        }
        fn write_back_caches(&mut self) {
            self.caches_written_back += 1;
        }
        fn read_cpu_msr(&mut self, index: u32) -> u64 {
            self.cpu_msrs.get(&index).copied().unwrap_or(0)
        }
        fn write_cpu_msr(&mut self, index: u32, value: u64) {
            self.cpu_msrs.insert(index, value);
        }
        fn set_cr2(&mut self, value: u64) {
            self.cr2 = value;
        }
        fn tsc(&mut self) -> u64 {
            self.tsc
        }
        fn set_tsc_offset(&mut self, offset: u64) {
            self.tsc_offset = Some(offset);
        }
        fn set_long_mode(&mut self, active: bool) {
            self.long_mode = active;
        }
        fn flush_guest_tlb(&mut self) {
            self.tlb_flushes += 1;
        }
        fn host_interrupt(&mut self, vector: u8) {
            self.host_interrupts.push(vector);
        }
        fn host_nmi(&mut self) {
            self.host_nmis += 1;
        }
    }
}
