//! Running VMs: creating one from its manifest entry (memory, EPT, image, VMCS), handling its
//! VM exits, and the round-robin loop that runs them all on this CPU.
//!
//! Policy comes from `hv-vm` (hypercalls, CPUID/MSR policy, UART model, scheduling) and VMX rules
//! from `hv-vmx`; this file wires them to the hardware through [`crate::vmx`]. Every failure of
//! one VM (bad image, out of memory, EPT violation, triple fault, failed entry) stops that VM
//! with a report naming it; the others go on.

use alloc::{boxed::Box, format, string::String, vec::Vec};

use guest_abi::{boot as gboot, ExitKind, VmInfo, VM_INFO_MAGIC};
use hv_manifest::VmConfig;
use hv_vm::{
    frames::FrameAllocator,
    hypercall::{self, Args, Outcome, Scratch},
    memory::{GuestMemory, PhysMemory},
    policy::{self, MsrAccess},
    sched::{self, Accounting, VmState},
    uart::{LineBuffer, Uart16550},
};
use hv_vmx::{
    controls::VmcsControls,
    ept::{Ept, EptPerms, FrameSource},
    exit::{self, reason, EptAccess, EptViolation, IoExit},
    fields as f,
};

use crate::memmux::MemMux;
use crate::platform::{cpuid, rdtsc};
use crate::vmx::{self, vmread, vmwrite, GuestRegisters};

/// Host-physical memory through the identity map.
pub struct IdentityPhys;

impl PhysMemory for IdentityPhys {
    fn read(&self, hpa: u64, buf: &mut [u8]) {
        // SAFETY: callers pass frames of a VM's memory (from the frame allocator, below 4 GiB,
        // identity-mapped, owned by the VM), and GuestMemory keeps each copy inside one frame.
        unsafe { core::ptr::copy_nonoverlapping(hpa as *const u8, buf.as_mut_ptr(), buf.len()) };
    }
    fn write(&mut self, hpa: u64, data: &[u8]) {
        // SAFETY: as in `read`.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), hpa as *mut u8, data.len()) };
    }
}

/// Frames for EPT tables, zeroed, from the frame allocator.
pub struct TableFrames<'a>(pub &'a mut FrameAllocator);

impl FrameSource for TableFrames<'_> {
    fn alloc_table(&mut self) -> Option<u64> {
        let frame = self.0.alloc()?;
        zero_frame(frame);
        Some(frame)
    }
    fn table(&mut self, hpa: u64) -> &mut [u64; 512] {
        // SAFETY: `hpa` is a table frame this FrameSource allocated (identity-mapped, 4 KiB
        // aligned, owned by the EPT being built); no other reference to it exists meanwhile.
        unsafe { &mut *(hpa as *mut [u64; 512]) }
    }
}

pub fn zero_frame(frame: u64) {
    // SAFETY: `frame` is a 4 KiB frame just taken from the allocator: ours, identity-mapped.
    unsafe { core::ptr::write_bytes(frame as *mut u8, 0, 4096) };
}

/// The hardware-independent description of a VMCS we build for every VM.
pub struct HostVmx {
    pub caps: hv_vmx::caps::Capabilities,
    pub controls: VmcsControls,
    pub tsc_hz: u64,
    /// Shared by all VMs: every MSR access and every port exits (all bits set).
    pub msr_bitmap: u64,
    pub io_bitmap_a: u64,
    pub io_bitmap_b: u64,
}

/// FXSAVE area: the guest's x87/SSE state while it is off the CPU.
#[repr(C, align(16))]
struct FxArea([u8; 512]);

/// Why a VM was stopped by the hypervisor.
#[derive(Debug)]
pub enum VmError {
    OutOfMemory,
    Image(hv_vm::elf::ElfError),
    Ept(hv_vmx::ept::EptError),
}

impl core::fmt::Display for VmError {
    fn fmt(&self, fmt: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfMemory => fmt.write_str("not enough free host memory"),
            Self::Image(e) => write!(fmt, "bad image: {e}"),
            Self::Ept(e) => write!(fmt, "EPT: {e}"),
        }
    }
}

pub struct Vm {
    pub name: String,
    /// `vm NAME`, the log target.
    target: String,
    pub id: u32,
    config: VmConfig,
    memory: GuestMemory,
    ept: Ept,
    eptp: u64,
    vmcs: u64,
    regs: GuestRegisters,
    launched: bool,
    pub state: VmState,
    pub acct: Accounting,
    uart: Uart16550,
    console: LineBuffer,
    fx: Box<FxArea>,
    cr2: u64,
    /// What the VmInfo hypercall returns; it never changes, so it is built once.
    info: VmInfo,
    /// Where hypercall arguments are copied out of guest memory. Kept per VM and never zeroed
    /// per call: the hypercall layer only hands out the bytes it has just filled, and zeroing
    /// 4 KiB on every VMCALL once cost more than the rest of the exit path together.
    scratch: Box<Scratch>,
}

impl Vm {
    /// Builds a VM: memory, EPT, the image and boot area, and its VMCS.
    pub fn create(
        id: u32,
        config: &VmConfig,
        image: &[u8],
        host: &HostVmx,
        frames: &mut FrameAllocator,
    ) -> Result<Self, VmError> {
        let bytes = config.memory_bytes();
        let pages = bytes / 4096;
        // Refuse early rather than half-build a VM that cannot fit (plus EPT tables: 1/512).
        if frames.free_frames() < pages + pages / 256 + 16 {
            return Err(VmError::OutOfMemory);
        }
        let image_info =
            hv_vm::elf::parse(image, gboot::IMAGE_MIN_GPA, bytes.saturating_sub(64 * 1024))
                .map_err(VmError::Image)?;
        let mut backing = Vec::with_capacity(pages as usize);
        for _ in 0..pages {
            let frame = frames.alloc().ok_or(VmError::OutOfMemory)?;
            zero_frame(frame);
            backing.push(frame);
        }
        let mut tables = TableFrames(frames);
        let mut ept = Ept::new(&mut tables).map_err(VmError::Ept)?;
        for (page, &frame) in backing.iter().enumerate() {
            ept.map(&mut tables, page as u64 * 4096, frame, EptPerms::RWX)
                .map_err(VmError::Ept)?;
        }
        let memory = GuestMemory::new(backing);
        let mut phys = IdentityPhys;
        for seg in &image_info.segments {
            let data = &image[seg.offset as usize..(seg.offset + seg.filesz) as usize];
            // The ELF parser checked the segment against the memory size.
            memory
                .write(&mut phys, seg.gpa, data)
                .map_err(|_| VmError::OutOfMemory)?;
        }
        for (gpa, data) in hv_vm::boot::boot_area(bytes, &config.cmdline) {
            memory
                .write(&mut phys, gpa, &data)
                .map_err(|_| VmError::OutOfMemory)?;
        }
        let vmcs = frames.alloc().ok_or(VmError::OutOfMemory)?;
        zero_frame(vmcs);
        let mut fx = Box::new(FxArea([0; 512]));
        fx.0[0..2].copy_from_slice(&0x037fu16.to_le_bytes()); // FCW: all x87 exceptions masked
        fx.0[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR: all SSE exceptions masked
        let eptp = ept.eptp(host.controls.ept_ad);
        let mut vm = Self {
            name: config.name.clone(),
            target: format!("vm {}", config.name),
            id,
            config: config.clone(),
            memory,
            ept,
            eptp,
            vmcs,
            regs: GuestRegisters {
                rdi: gboot::BOOT_INFO_GPA,
                ..Default::default()
            },
            launched: false,
            state: VmState::Runnable,
            acct: Accounting::default(),
            uart: Uart16550::default(),
            console: LineBuffer::default(),
            fx,
            cr2: 0,
            info: VmInfo::default(),
            scratch: Box::new([0; guest_abi::CONSOLE_WRITE_MAX as usize]),
        };
        vm.info = vm.build_info();
        vm.init_vmcs(host, image_info.entry);
        // The EPT is new, but its root frame may have backed an earlier VM's EPT: drop any
        // translations the CPU still caches for it (SDM 29.4.3.1).
        vmx::invept(vm.eptp, host.caps.invept_single_context());
        log::info!(target: &vm.target, "created: {} MiB, image \"{}\" entry {:#x}, quantum {} us, eptp {:#x}",
            config.memory_mib, config.image, image_info.entry, config.quantum_us, vm.eptp);
        Ok(vm)
    }

    /// Writes every VMCS field (SDM 25.3-25.8; checks in SDM 27.2-27.3).
    fn init_vmcs(&self, host: &HostVmx, entry: u64) {
        let caps = &host.caps;
        // SAFETY: `self.vmcs` is this VM's own zeroed frame; the revision identifier goes first.
        unsafe {
            (self.vmcs as *mut u32).write_volatile(caps.vmcs_revision());
            vmx::vmclear(self.vmcs);
            vmx::vmptrld(self.vmcs);
        }
        let c = &host.controls;
        vmwrite(f::PIN_BASED_CONTROLS, c.pin.into());
        vmwrite(f::PRIMARY_PROC_BASED_CONTROLS, c.primary.into());
        vmwrite(f::SECONDARY_PROC_BASED_CONTROLS, c.secondary.into());
        vmwrite(f::EXIT_CONTROLS, c.exit.into());
        vmwrite(f::ENTRY_CONTROLS, c.entry.into());
        vmwrite(f::EXCEPTION_BITMAP, 0);
        vmwrite(f::CR3_TARGET_COUNT, 0);
        vmwrite(f::EXIT_MSR_STORE_COUNT, 0);
        vmwrite(f::EXIT_MSR_LOAD_COUNT, 0);
        vmwrite(f::ENTRY_MSR_LOAD_COUNT, 0);
        vmwrite(f::ENTRY_INTERRUPTION_INFO, 0);
        vmwrite(f::MSR_BITMAP, host.msr_bitmap);
        vmwrite(f::IO_BITMAP_A, host.io_bitmap_a);
        vmwrite(f::IO_BITMAP_B, host.io_bitmap_b);
        vmwrite(f::EPT_POINTER, self.eptp);
        if c.vpid {
            vmwrite(f::VPID, u64::from(self.id) + 1);
        }
        vmwrite(f::VMCS_LINK_POINTER, u64::MAX);

        // Host state (SDM 25.5, 27.2.2-27.2.4): this CPU as it runs now.
        let (cr0, cr3, cr4): (u64, u64, u64);
        // SAFETY: reading control registers has no side effects.
        unsafe {
            core::arch::asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack));
            core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack));
            core::arch::asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
        }
        vmwrite(f::HOST_CR0, cr0);
        vmwrite(f::HOST_CR3, cr3);
        vmwrite(f::HOST_CR4, cr4);
        vmwrite(f::HOST_CS_SELECTOR, crate::arch::CODE_SELECTOR.into());
        for sel in [
            f::HOST_SS_SELECTOR,
            f::HOST_DS_SELECTOR,
            f::HOST_ES_SELECTOR,
        ] {
            vmwrite(sel, crate::arch::DATA_SELECTOR.into());
        }
        vmwrite(f::HOST_FS_SELECTOR, 0);
        vmwrite(f::HOST_GS_SELECTOR, 0);
        vmwrite(f::HOST_TR_SELECTOR, crate::arch::TSS_SELECTOR.into());
        vmwrite(f::HOST_FS_BASE, 0);
        vmwrite(f::HOST_GS_BASE, 0);
        vmwrite(f::HOST_TR_BASE, crate::arch::tss_base());
        vmwrite(f::HOST_GDTR_BASE, crate::arch::gdt_base());
        vmwrite(f::HOST_IDTR_BASE, crate::arch::idt_base());
        vmwrite(f::HOST_IA32_SYSENTER_CS, 0);
        vmwrite(f::HOST_IA32_SYSENTER_ESP, 0);
        vmwrite(f::HOST_IA32_SYSENTER_EIP, 0);
        if c.load_efer {
            // SAFETY: IA32_EFER exists on every x86_64 CPU.
            vmwrite(f::HOST_IA32_EFER, unsafe {
                crate::platform::rdmsr(0xc000_0080)
            });
        }
        vmwrite(f::HOST_RIP, vmx::vm_exit_landing as *const () as u64);

        // Guest state: the 64-bit boot protocol (guest-abi::boot, SDM 27.3.1).
        const CR0_PE: u64 = 1;
        const CR0_ET: u64 = 1 << 4;
        const CR0_NE: u64 = 1 << 5;
        const CR0_WP: u64 = 1 << 16;
        const CR0_PG: u64 = 1 << 31;
        const CR4_PAE: u64 = 1 << 5;
        const CR4_OSFXSR: u64 = 1 << 9;
        const CR4_OSXMMEXCPT: u64 = 1 << 10;
        const CR4_VMXE: u64 = 1 << 13;
        let guest_cr0 = caps.fix_cr0(CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG, false);
        let cr4_visible = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        vmwrite(f::GUEST_CR0, guest_cr0);
        vmwrite(f::CR0_READ_SHADOW, guest_cr0);
        vmwrite(f::CR0_GUEST_HOST_MASK, 0);
        vmwrite(f::GUEST_CR3, gboot::PML4_GPA);
        vmwrite(f::GUEST_CR4, caps.fix_cr4(cr4_visible));
        // CR4.VMXE must stay set in VMX non-root operation; the guest sees it clear.
        vmwrite(f::CR4_GUEST_HOST_MASK, CR4_VMXE);
        vmwrite(f::CR4_READ_SHADOW, cr4_visible);
        if c.load_efer {
            vmwrite(f::GUEST_IA32_EFER, (1 << 8) | (1 << 10)); // LME | LMA
        }
        let code = u64::from(gboot::CODE_SELECTOR);
        let data = u64::from(gboot::DATA_SELECTOR);
        vmwrite(f::GUEST_CS_SELECTOR, code);
        vmwrite(f::GUEST_CS_BASE, 0);
        vmwrite(f::GUEST_CS_LIMIT, 0xffff_ffff);
        vmwrite(f::GUEST_CS_ACCESS_RIGHTS, 0xa09b); // present, code, L=1, G=1
        for (sel, base, limit, ar) in [
            (
                f::GUEST_SS_SELECTOR,
                f::GUEST_SS_BASE,
                f::GUEST_SS_LIMIT,
                f::GUEST_SS_ACCESS_RIGHTS,
            ),
            (
                f::GUEST_DS_SELECTOR,
                f::GUEST_DS_BASE,
                f::GUEST_DS_LIMIT,
                f::GUEST_DS_ACCESS_RIGHTS,
            ),
            (
                f::GUEST_ES_SELECTOR,
                f::GUEST_ES_BASE,
                f::GUEST_ES_LIMIT,
                f::GUEST_ES_ACCESS_RIGHTS,
            ),
            (
                f::GUEST_FS_SELECTOR,
                f::GUEST_FS_BASE,
                f::GUEST_FS_LIMIT,
                f::GUEST_FS_ACCESS_RIGHTS,
            ),
            (
                f::GUEST_GS_SELECTOR,
                f::GUEST_GS_BASE,
                f::GUEST_GS_LIMIT,
                f::GUEST_GS_ACCESS_RIGHTS,
            ),
        ] {
            vmwrite(sel, data);
            vmwrite(base, 0);
            vmwrite(limit, 0xffff_ffff);
            vmwrite(ar, 0xc093); // present, read/write data, D/B=1, G=1
        }
        vmwrite(f::GUEST_LDTR_SELECTOR, 0);
        vmwrite(f::GUEST_LDTR_BASE, 0);
        vmwrite(f::GUEST_LDTR_LIMIT, 0);
        vmwrite(f::GUEST_LDTR_ACCESS_RIGHTS, 1 << 16); // unusable
        vmwrite(f::GUEST_TR_SELECTOR, 0);
        vmwrite(f::GUEST_TR_BASE, 0);
        vmwrite(f::GUEST_TR_LIMIT, 0x67);
        vmwrite(f::GUEST_TR_ACCESS_RIGHTS, 0x8b); // present, busy 64-bit TSS
        vmwrite(f::GUEST_GDTR_BASE, gboot::GDT_GPA);
        vmwrite(f::GUEST_GDTR_LIMIT, 23);
        vmwrite(f::GUEST_IDTR_BASE, 0);
        vmwrite(f::GUEST_IDTR_LIMIT, 0);
        vmwrite(f::GUEST_DR7, 0x400);
        vmwrite(f::GUEST_IA32_DEBUGCTL, 0);
        vmwrite(f::GUEST_SYSENTER_CS, 0);
        vmwrite(f::GUEST_SYSENTER_ESP, 0);
        vmwrite(f::GUEST_SYSENTER_EIP, 0);
        vmwrite(f::GUEST_RSP, (self.memory.size() - 16) & !0xf);
        vmwrite(f::GUEST_RIP, entry);
        vmwrite(f::GUEST_RFLAGS, 0x2);
        vmwrite(f::GUEST_ACTIVITY_STATE, 0);
        vmwrite(f::GUEST_INTERRUPTIBILITY_STATE, 0);
        vmwrite(f::GUEST_PENDING_DEBUG_EXCEPTIONS, 0);
    }

    /// Frees the VM's memory, EPT tables and VMCS.
    pub fn release(self, frames: &mut FrameAllocator) {
        let mut tables = TableFrames(frames);
        let mut list = Vec::new();
        self.ept.table_frames(&mut tables, &mut |t| list.push(t));
        for t in list {
            frames.free(t);
        }
        // With memory multiplexing, the VM left the engine when it stopped, so every page still
        // present is a private frame of its own; shared and zero frames are the engine's.
        for frame in self.memory.present_frames() {
            frames.free(frame);
        }
        frames.free(self.vmcs);
    }

    pub fn sharing_domain(&self) -> u32 {
        self.config.sharing_domain
    }

    pub fn quantum_us(&self) -> u64 {
        self.config.quantum_us
    }

    pub fn memory_pages(&self) -> u64 {
        self.memory.pages()
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    pub fn memory_mut(&mut self) -> &mut GuestMemory {
        &mut self.memory
    }

    pub fn ept_mut(&mut self) -> &mut Ept {
        &mut self.ept
    }

    pub fn eptp(&self) -> u64 {
        self.eptp
    }

    fn build_info(&self) -> VmInfo {
        let mut info = VmInfo {
            magic: VM_INFO_MAGIC,
            vm_id: self.id,
            vcpus: self.config.vcpus,
            memory_bytes: self.memory.size(),
            quantum_us: self.config.quantum_us,
            ..Default::default()
        };
        let n = self.name.len().min(info.name.len());
        info.name[..n].copy_from_slice(&self.name.as_bytes()[..n]);
        info.name_len = n as u32;
        info
    }

    fn console_bytes(&mut self, bytes: &[u8]) {
        let name = &self.name;
        self.console
            .push(bytes, |line| print_console_line(name, line));
    }

    /// Stops the VM for good, with a report.
    fn fail(&mut self, why: core::fmt::Arguments) {
        log::error!(target: &self.target, "stopped: {why}");
        self.state = VmState::Failed;
        let name = &self.name;
        self.console.flush(|line| print_console_line(name, line));
    }

    fn exit_with(&mut self, code: u64) {
        let name = &self.name;
        self.console.flush(|line| print_console_line(name, line));
        log::info!(target: &self.target, "exited with code {code}");
        self.state = VmState::Exited(code);
    }

    pub fn stats_line(&self) -> String {
        let s = &self.acct.stats;
        let state = match self.state {
            VmState::Exited(c) => format!("exited({c})"),
            VmState::Failed => String::from("failed"),
            VmState::Runnable => String::from("runnable"),
        };
        let mut line = format!(
            "vm={} state={} cpu_us={} runs={} exits={}",
            self.name,
            state,
            s.cpu_us,
            s.runs,
            self.acct.total_exits()
        );
        for kind in ExitKind::ALL {
            line.push_str(&format!(" {}={}", kind.name(), s.exits[kind as usize]));
        }
        line
    }
}

fn print_console_line(name: &str, line: &[u8]) {
    // Guests may write anything: show bytes that are not printable UTF-8 as escapes.
    let text = String::from_utf8_lossy(line);
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    crate::println!("{name} | {clean}");
}

/// What the exit handler decided.
enum Next {
    /// Re-enter the same guest.
    Resume,
    /// End the quantum (preemption timer, HLT, yield) and schedule the next VM.
    Reschedule,
    /// The VM stopped.
    Stopped,
    /// The guest touched a page of its memory that the memory engine has taken away or made
    /// read-only: have the engine fault it in, then re-enter the guest at the same instruction.
    GuestFault { gpa: u64, write: bool },
    /// A hypercall's buffer covers such a page: fault it in, then handle the VMCALL again.
    HypercallFault { gpa: u64, write: bool },
}

fn advance_rip() {
    let rip = vmread(f::GUEST_RIP);
    vmwrite(f::GUEST_RIP, rip + vmread(f::EXIT_INSTRUCTION_LENGTH));
}

fn inject_gp() {
    // Vector 13, type 3 (hardware exception), deliver error code, valid (SDM 25.8.3).
    vmwrite(
        f::ENTRY_INTERRUPTION_INFO,
        13 | (3 << 8) | (1 << 11) | (1 << 31),
    );
    vmwrite(f::ENTRY_EXCEPTION_ERROR_CODE, 0);
}

/// Handles one VM exit of the current VM (its VMCS is current).
///
/// `multiplexed`: the memory engine manages this VM's pages, so an EPT violation inside its
/// memory is the engine's to resolve rather than a fault of the guest.
fn handle_exit(vm: &mut Vm, host: &HostVmx, multiplexed: bool) -> Next {
    let raw_reason = vmread(f::EXIT_REASON) as u32;
    if raw_reason & exit::EXIT_REASON_ENTRY_FAILURE != 0 {
        vm.acct.count_exit(ExitKind::Other);
        vm.fail(format_args!(
            "VM entry failed: exit reason {} qualification {:#x}",
            exit::basic_reason(raw_reason),
            vmread(f::EXIT_QUALIFICATION)
        ));
        return Next::Stopped;
    }
    match exit::basic_reason(raw_reason) {
        reason::CPUID => {
            vm.acct.count_exit(ExitKind::Cpuid);
            let leaf = vm.regs.rax as u32;
            let r = policy::cpuid(leaf, cpuid(leaf, vm.regs.rcx as u32));
            vm.regs.rax = r[0].into();
            vm.regs.rbx = r[1].into();
            vm.regs.rcx = r[2].into();
            vm.regs.rdx = r[3].into();
            advance_rip();
            Next::Resume
        }
        reason::VMCALL => {
            vm.acct.count_exit(ExitKind::Vmcall);
            handle_vmcall(vm)
        }
        reason::IO_INSTRUCTION => {
            vm.acct.count_exit(ExitKind::Io);
            handle_io(vm)
        }
        reason::RDMSR | reason::WRMSR => {
            let write = exit::basic_reason(raw_reason) == reason::WRMSR;
            vm.acct.count_exit(if write {
                ExitKind::MsrWrite
            } else {
                ExitKind::MsrRead
            });
            handle_msr(vm, write);
            Next::Resume
        }
        reason::HLT => {
            vm.acct.count_exit(ExitKind::Hlt);
            advance_rip();
            Next::Reschedule
        }
        reason::PREEMPTION_TIMER => {
            vm.acct.count_exit(ExitKind::PreemptionTimer);
            Next::Reschedule
        }
        reason::EXTERNAL_INTERRUPT => {
            // Acknowledged on exit; the host does not use interrupts, so it is dropped.
            vm.acct.count_exit(ExitKind::ExternalInterrupt);
            Next::Resume
        }
        reason::EPT_VIOLATION => {
            vm.acct.count_exit(ExitKind::EptViolation);
            let gpa = vmread(f::GUEST_PHYSICAL_ADDRESS);
            let v = EptViolation::from_qualification(vmread(f::EXIT_QUALIFICATION));
            let rip = vmread(f::GUEST_RIP);
            let inside = vm.memory.check(gpa, 1).is_ok();
            if multiplexed && inside {
                return Next::GuestFault {
                    gpa,
                    write: v.access == EptAccess::Write,
                };
            }
            if !inside {
                let mib = vm.config.memory_mib;
                vm.fail(format_args!(
                    "EPT violation at gpa={gpa:#x} ({}) rip={rip:#x}: outside the VM's {mib} MiB",
                    v.access.name()
                ));
            } else {
                vm.fail(format_args!(
                    "EPT violation at gpa={gpa:#x} ({}) rip={rip:#x}: permissions {:#b}",
                    v.access.name(),
                    v.present_perms
                ));
            }
            Next::Stopped
        }
        reason::TRIPLE_FAULT => {
            vm.acct.count_exit(ExitKind::Other);
            vm.fail(format_args!(
                "triple fault at rip={:#x}",
                vmread(f::GUEST_RIP)
            ));
            Next::Stopped
        }
        reason::EXCEPTION_OR_NMI => {
            // Only NMIs exit here (the exception bitmap is empty); the host has no NMI work.
            vm.acct.count_exit(ExitKind::Other);
            Next::Resume
        }
        other => {
            vm.acct.count_exit(ExitKind::Other);
            let _ = host;
            vm.fail(format_args!(
                "unhandled VM exit, reason {other} at rip={:#x}",
                vmread(f::GUEST_RIP)
            ));
            Next::Stopped
        }
    }
}

fn handle_vmcall(vm: &mut Vm) -> Next {
    let r = &vm.regs;
    let args = Args {
        nr: r.rax,
        a0: r.rdi,
        a1: r.rsi,
        a2: r.rdx,
        a3: r.r10,
    };
    let mut phys = IdentityPhys;
    // Disjoint field borrows: the outcome may point into `vm.scratch` while the console is fed.
    let (rax, next) = match hypercall::handle(
        args,
        &vm.memory,
        &mut phys,
        &vm.info,
        &vm.acct.stats,
        &mut vm.scratch,
    ) {
        Outcome::Return(v) => (v, Next::Resume),
        Outcome::Console(bytes) => {
            let n = bytes.len() as u64;
            let name = &vm.name;
            vm.console
                .push(bytes, |line| print_console_line(name, line));
            (n, Next::Resume)
        }
        Outcome::Report(key, value) => {
            log::info!(target: &vm.target, "report {key}={value}");
            (0, Next::Resume)
        }
        Outcome::Yield => (0, Next::Reschedule),
        // GuestMemory refused a page the memory engine holds; nothing was done yet.
        Outcome::Unavailable { gpa, write } => return Next::HypercallFault { gpa, write },
        Outcome::Exit(code) => {
            vm.exit_with(code);
            return Next::Stopped;
        }
    };
    vm.regs.rax = rax;
    advance_rip();
    next
}

fn handle_io(vm: &mut Vm) -> Next {
    let io = IoExit::from_qualification(vmread(f::EXIT_QUALIFICATION));
    if io.string {
        vm.fail(format_args!(
            "string I/O (INS/OUTS) to port {:#x} is not supported",
            io.port
        ));
        return Next::Stopped;
    }
    let mask: u64 = match io.size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    };
    if Uart16550::owns(io.port) {
        if io.is_in {
            let v = vm.uart.read(io.port);
            vm.regs.rax = (vm.regs.rax & !mask) | u64::from(v);
        } else if let Some(byte) = vm.uart.write(io.port, vm.regs.rax as u8) {
            vm.console_bytes(&[byte]);
        }
    } else if io.is_in {
        vm.regs.rax = (vm.regs.rax & !mask) | (u64::from(policy::UNKNOWN_PORT_VALUE) & mask);
    }
    advance_rip();
    Next::Resume
}

fn handle_msr(vm: &mut Vm, write: bool) {
    let msr = vm.regs.rcx as u32;
    let value = (vm.regs.rdx << 32) | (vm.regs.rax & 0xffff_ffff);
    match policy::msr_access(msr, write) {
        MsrAccess::Fault => {
            log::debug!(target: &vm.target, "#GP for {} of MSR {msr:#x}", if write { "WRMSR" } else { "RDMSR" });
            inject_gp();
            return;
        }
        MsrAccess::Emulate(m) => {
            let field = match m {
                policy::msr::IA32_FS_BASE => Some(f::GUEST_FS_BASE),
                policy::msr::IA32_GS_BASE => Some(f::GUEST_GS_BASE),
                _ => None,
            };
            if write {
                match (m, field) {
                    (_, Some(field)) => vmwrite(field, value),
                    (policy::msr::IA32_EFER, _) => {
                        let efer = vmread(f::GUEST_IA32_EFER);
                        let w = policy::EFER_GUEST_WRITABLE;
                        if value & !w != efer & !w {
                            inject_gp();
                            return;
                        }
                        vmwrite(f::GUEST_IA32_EFER, (efer & !w) | (value & w));
                    }
                    _ => {
                        inject_gp();
                        return;
                    }
                }
            } else {
                let v = match (m, field) {
                    (_, Some(field)) => vmread(field),
                    (policy::msr::IA32_EFER, _) => vmread(f::GUEST_IA32_EFER),
                    _ => rdtsc(),
                };
                vm.regs.rax = v & 0xffff_ffff;
                vm.regs.rdx = v >> 32;
            }
        }
    }
    advance_rip();
}

/// Saves the x87/SSE state and CR2 of the VM leaving the CPU; loads those of the one coming.
fn switch_cpu_state(out: Option<&mut Vm>, into: &mut Vm) {
    // SAFETY: FXSAVE64/FXRSTOR64 operate on the VMs' own 16-byte aligned 512-byte areas;
    // CR2 is only a register. CR4.OSFXSR is set at boot.
    unsafe {
        if let Some(out) = out {
            core::arch::asm!("fxsave64 [{}]", in(reg) out.fx.0.as_mut_ptr(), options(nostack));
            core::arch::asm!("mov {}, cr2", out(reg) out.cr2, options(nomem, nostack));
        }
        core::arch::asm!("fxrstor64 [{}]", in(reg) into.fx.0.as_ptr(), options(nostack));
        core::arch::asm!("mov cr2, {}", in(reg) into.cr2, options(nomem, nostack));
    }
}

/// Runs all VMs round-robin until every one has stopped. With `mux`, the memory engine scans
/// between quanta and resolves the faults on pages it manages.
pub fn run_all(
    vms: &mut [Vm],
    host: &HostVmx,
    frames: &mut FrameAllocator,
    mut mux: Option<&mut MemMux>,
) {
    let rate = host.caps.preemption_timer_rate();
    let mut current: Option<usize> = None;
    let mut last_on_cpu: Option<usize> = None;
    loop {
        let states: Vec<VmState> = vms.iter().map(|v| v.state).collect();
        let Some(i) = sched::next_runnable(&states, current) else {
            break;
        };
        current = Some(i);
        if let Some(mux) = mux.as_deref_mut() {
            mux.maybe_scan(vms, frames);
        }
        if last_on_cpu != Some(i) {
            let (out, into) = match last_on_cpu {
                Some(j) if j < i => {
                    let (a, b) = vms.split_at_mut(i);
                    (Some(&mut a[j]), &mut b[0])
                }
                Some(j) => {
                    let (a, b) = vms.split_at_mut(j);
                    (Some(&mut b[0]), &mut a[i])
                }
                None => (None, &mut vms[i]),
            };
            switch_cpu_state(out, into);
            last_on_cpu = Some(i);
        }
        // SAFETY: the VMCS belongs to this VM and was initialised by `init_vmcs`.
        unsafe { vmx::vmptrld(vms[i].vmcs) };
        let quantum = sched::us_to_tsc(vms[i].config.quantum_us, host.tsc_hz);
        let start = rdtsc();
        vms[i].acct.schedule_in(start);
        let deadline = start.saturating_add(quantum);
        vmwrite(
            f::PREEMPTION_TIMER_VALUE,
            sched::preemption_timer_value(quantum, rate).into(),
        );
        loop {
            if let Some(mux) = mux.as_deref_mut() {
                mux.before_entry(&vms[i], i);
            }
            let vm = &mut vms[i];
            if !host.controls.save_preemption_timer {
                let left = deadline.saturating_sub(rdtsc());
                vmwrite(
                    f::PREEMPTION_TIMER_VALUE,
                    sched::preemption_timer_value(left, rate).into(),
                );
            }
            // SAFETY: the VM's VMCS is current with complete host state; regs is the VM's own.
            let failed = unsafe { vmx::run_guest(&mut vm.regs, u64::from(vm.launched)) };
            if failed != 0 {
                let err = vmread(f::VM_INSTRUCTION_ERROR);
                vm.fail(format_args!("VM entry failed: VM-instruction error {err}"));
                break;
            }
            vm.launched = true;
            let mut next = handle_exit(vm, host, mux.is_some());
            if let (Some(mux), Next::Resume | Next::Reschedule) = (mux.as_deref_mut(), &next) {
                mux.progressed();
            }
            // A fault on a page the engine holds: resolve it, then go on where the VM was (the
            // faulting instruction runs again; a hypercall is handled again).
            while let Next::GuestFault { gpa, write } | Next::HypercallFault { gpa, write } = next {
                let Some(mux) = mux.as_deref_mut() else {
                    break; // handle_exit only asks for faults when the engine runs
                };
                let hypercall = matches!(next, Next::HypercallFault { .. });
                if let Err(e) = mux.fault(vms, frames, i, gpa, write, hypercall) {
                    vms[i].fail(format_args!(
                        "memory engine could not fault in gpa={gpa:#x} ({}): {e}",
                        if write { "write" } else { "read" }
                    ));
                    next = Next::Stopped;
                    break;
                }
                next = match next {
                    Next::HypercallFault { .. } => handle_vmcall(&mut vms[i]),
                    _ => Next::Resume,
                };
            }
            match next {
                Next::Resume => continue,
                Next::Reschedule | Next::Stopped => break,
                Next::GuestFault { .. } | Next::HypercallFault { .. } => {
                    vms[i].fail(format_args!("memory fault without a memory engine"));
                    break;
                }
            }
        }
        vms[i].acct.schedule_out(rdtsc(), host.tsc_hz);
        if !vms[i].state.is_runnable() {
            if let Some(mux) = mux.as_deref_mut() {
                mux.remove_vm(vms, frames, i);
            }
        }
    }
}
