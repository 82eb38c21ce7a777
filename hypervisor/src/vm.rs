//! Running VMs: creating one from its manifest entry (memory, EPT, image, VMCS), handling its
//! VM exits, and the round-robin loop that runs them all on this CPU.
//!
//! Policy comes from `hv-vm` (hypercalls, CPUID/MSR/XSETBV policy, UART model, console queue,
//! scheduling) and VMX rules from `hv-vmx`; this file wires them to the hardware through
//! [`crate::vmx`] and [`crate::cpu_state`]. Every failure of one VM (bad image, out of memory,
//! EPT violation, triple fault, failed entry) stops that VM with a report naming it; the others
//! go on. Every exit reason has a defined policy in [`handle_exit`] (docs/isolation.md lists
//! them): an instruction the guest may execute is emulated or gets the exception a CPU of the
//! model the guest sees would raise; an exit the negotiated controls rule out stops the VM with
//! a report naming it, as a hypervisor bug.

use alloc::{boxed::Box, format, string::String, vec::Vec};

use guest_abi::{boot as gboot, ExitKind, VmInfo, VM_INFO_MAGIC};
use hv_manifest::VmConfig;
use hv_vm::{
    console::ConsoleOutput,
    frames::FrameAllocator,
    hypercall::{self, Args, Outcome, Scratch},
    memory::{AccessError, GuestMemory, PhysMemory},
    msr::{self, Home, Msr},
    paging,
    policy::{self, CpuPolicy},
    sched::{self, Accounting, VmState},
    uart::{LineBuffer, Uart16550},
};
use hv_vmx::{
    controls::VmcsControls,
    ept::{Ept, EptPerms, FrameSource},
    exit::{self, reason, CrAccess, EptAccess, EptViolation, Interruption, IoExit},
    fields as f,
};

use crate::cpu_state::{self, CpuState};
use crate::memmux::MemMux;
use crate::platform::{cpuid, rdmsr, rdtsc};
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

/// The guest's EFER at entry: long mode enabled and active (guest-abi boot protocol).
const GUEST_EFER_AT_ENTRY: u64 = msr::efer::LME | msr::efer::LMA;

/// The hardware-independent description of a VMCS we build for every VM.
pub struct HostVmx {
    pub caps: hv_vmx::caps::Capabilities,
    pub controls: VmcsControls,
    /// What guests see of CPUID and which XCR0 values they may set.
    pub cpu_policy: CpuPolicy,
    pub tsc_hz: u64,
    /// Shared by all VMs: every MSR access and every port exits (all bits set).
    pub msr_bitmap: u64,
    pub io_bitmap_a: u64,
    pub io_bitmap_b: u64,
}

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
    /// Console lines waiting for room in the serial output (moved there by `run_all`).
    console_out: ConsoleOutput,
    /// x87/SSE/AVX state, XCR0, DR0-DR3, DR6, CR2 and the switched MSRs while off the CPU.
    cpu: CpuState,
    /// The task-priority register (CR8), emulated: MOV to/from CR8 exit.
    tpr: u64,
    /// A frame with the VM-entry MSR-load list (guest EFER and/or PAT) at offset 0 and the
    /// VM-exit MSR-load list (the host's values) at [`EXIT_LIST_OFFSET`], on CPUs without the
    /// VMCS controls that switch them.
    msr_lists: Option<u64>,
    /// An event was written into the VM-entry interruption field during this exit.
    injected: bool,
    /// What the VmInfo hypercall returns; it never changes, so it is built once.
    info: VmInfo,
    /// Where hypercall arguments are copied out of guest memory. Kept per VM and never zeroed
    /// per call: the hypercall layer only hands out the bytes it has just filled, and zeroing
    /// 4 KiB on every VMCALL once cost more than the rest of the exit path together.
    scratch: Box<Scratch>,
}

/// Gives the frames of an EPT's tables back to the allocator.
fn free_ept_tables(ept: &Ept, frames: &mut FrameAllocator) {
    let mut list = Vec::new();
    ept.table_frames(&mut TableFrames(frames), &mut |t| list.push(t));
    for t in list {
        frames.free(t);
    }
}

/// The MSRs a VM-entry or VM-exit MSR-load list may hold here: EFER and PAT.
const LIST_MSRS: usize = 2;
/// Where the VM-exit MSR-load list starts in the lists frame (each list is 16-byte entries,
/// SDM 25.7.2).
const EXIT_LIST_OFFSET: u64 = 2048;

/// Frames a VM takes from the allocator while it is built, given back if building fails.
struct Building<'a> {
    frames: &'a mut FrameAllocator,
    taken: Vec<u64>,
}

impl Building<'_> {
    fn frame(&mut self) -> Result<u64, VmError> {
        let frame = self.frames.alloc().ok_or(VmError::OutOfMemory)?;
        zero_frame(frame);
        self.taken.push(frame);
        Ok(frame)
    }

    fn fail(self, ept: Option<Ept>, e: VmError) -> VmError {
        if let Some(ept) = ept {
            free_ept_tables(&ept, self.frames);
        }
        for frame in self.taken {
            self.frames.free(frame);
        }
        e
    }
}

impl Vm {
    /// Builds a VM: memory, EPT, the image and boot area, its CPU state and its VMCS. On error
    /// every frame taken so far is given back.
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
        let mut building = Building {
            frames,
            taken: Vec::with_capacity(pages as usize + 3),
        };
        for _ in 0..pages {
            if let Err(e) = building.frame() {
                return Err(building.fail(None, e));
            }
        }
        let backing = building.taken.clone();
        let (vmcs, xsave_area) = match (building.frame(), building.frame()) {
            (Ok(v), Ok(x)) => (v, x),
            (Err(e), _) | (_, Err(e)) => return Err(building.fail(None, e)),
        };
        let msr_lists = if host.controls.load_efer && host.controls.load_pat {
            None
        } else {
            match building.frame() {
                Ok(frame) => Some(frame),
                Err(e) => return Err(building.fail(None, e)),
            }
        };
        let mut ept = match Ept::new(&mut TableFrames(building.frames)) {
            Ok(ept) => ept,
            Err(e) => return Err(building.fail(None, VmError::Ept(e))),
        };
        for (page, &frame) in backing.iter().enumerate() {
            let mapped = ept.map(
                &mut TableFrames(building.frames),
                page as u64 * 4096,
                frame,
                EptPerms::RWX,
            );
            if let Err(e) = mapped {
                return Err(building.fail(Some(ept), VmError::Ept(e)));
            }
        }
        let memory = GuestMemory::new(backing);
        let mut phys = IdentityPhys;
        let mut load = || -> Result<(), AccessError> {
            for seg in &image_info.segments {
                let data = &image[seg.offset as usize..(seg.offset + seg.filesz) as usize];
                // The ELF parser checked the segment against the memory size.
                memory.write(&mut phys, seg.gpa, data)?;
            }
            for (gpa, data) in hv_vm::boot::boot_area(bytes, &config.cmdline) {
                memory.write(&mut phys, gpa, &data)?;
            }
            Ok(())
        };
        if load().is_err() {
            return Err(building.fail(Some(ept), VmError::OutOfMemory));
        }
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
            // Every register starts at 0 but RDI, the boot-information pointer (guest-abi boot
            // protocol); RSP and RIP are in the VMCS.
            regs: GuestRegisters {
                rdi: gboot::BOOT_INFO_GPA,
                ..Default::default()
            },
            launched: false,
            state: VmState::Runnable,
            acct: Accounting::default(),
            uart: Uart16550::default(),
            console: LineBuffer::default(),
            console_out: ConsoleOutput::default(),
            cpu: CpuState::new(xsave_area),
            tpr: 0,
            msr_lists,
            injected: false,
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
        self.init_msr_lists(host);
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
            vmwrite(f::HOST_IA32_EFER, unsafe { rdmsr(Msr::Efer.index()) });
        }
        if c.load_pat {
            // SAFETY: IA32_PAT exists on every CPU with VMX's PAT controls.
            vmwrite(f::HOST_IA32_PAT, unsafe { rdmsr(Msr::Pat.index()) });
            vmwrite(f::GUEST_IA32_PAT, msr::PAT_RESET);
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
        let guest_cr0 = caps.fix_cr0(CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG, false);
        let cr4_visible = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        vmwrite(f::GUEST_CR0, guest_cr0);
        vmwrite(f::CR0_READ_SHADOW, guest_cr0);
        vmwrite(f::CR0_GUEST_HOST_MASK, 0);
        vmwrite(f::GUEST_CR3, gboot::PML4_GPA);
        vmwrite(f::GUEST_CR4, caps.fix_cr4(cr4_visible));
        // CR4.VMXE must stay set in VMX non-root operation; the guest sees it clear. The other
        // masked bits enable features the guest does not have: setting any exits, and the
        // guest gets #GP (handle_cr_access). The shadow shows all of them clear.
        vmwrite(f::CR4_GUEST_HOST_MASK, policy::CR4_GUEST_FORBIDDEN);
        vmwrite(f::CR4_READ_SHADOW, cr4_visible);
        if c.load_efer {
            vmwrite(f::GUEST_IA32_EFER, GUEST_EFER_AT_ENTRY);
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

    /// Points the VMCS at the VM-entry and VM-exit MSR-load lists for what the CPU cannot
    /// switch through VMCS fields (EFER, PAT): guest values on entry, host values on exit
    /// (SDM 25.7.2, 25.8.2). Without such a CPU both lists are empty.
    fn init_msr_lists(&self, host: &HostVmx) {
        let Some(frame) = self.msr_lists else {
            vmwrite(f::EXIT_MSR_LOAD_COUNT, 0);
            vmwrite(f::ENTRY_MSR_LOAD_COUNT, 0);
            return;
        };
        let mut n = 0u64;
        for (msr, needed, guest) in [
            (Msr::Efer, !host.controls.load_efer, GUEST_EFER_AT_ENTRY),
            (Msr::Pat, !host.controls.load_pat, msr::PAT_RESET),
        ] {
            if !needed {
                continue;
            }
            // SAFETY: `frame` is this VM's zeroed lists frame; entries are 16 bytes (index,
            // reserved, value) and at most LIST_MSRS of them in each 2 KiB half. The MSRs exist
            // on every x86_64 CPU with VMX.
            unsafe {
                let entry = (frame + n * 16) as *mut u64;
                entry.write(u64::from(msr.index()));
                entry.add(1).write(guest);
                let exit = (frame + EXIT_LIST_OFFSET + n * 16) as *mut u64;
                exit.write(u64::from(msr.index()));
                exit.add(1).write(rdmsr(msr.index()));
            }
            n += 1;
        }
        debug_assert!(n as usize <= LIST_MSRS);
        vmwrite(f::ENTRY_MSR_LOAD_ADDR, frame);
        vmwrite(f::ENTRY_MSR_LOAD_COUNT, n);
        vmwrite(f::EXIT_MSR_LOAD_ADDR, frame + EXIT_LIST_OFFSET);
        vmwrite(f::EXIT_MSR_LOAD_COUNT, n);
    }

    /// Where the guest's EFER or PAT is: its VMCS field or its entry in the MSR-load list.
    fn list_slot(&self, m: Msr) -> Option<*mut u64> {
        let frame = self.msr_lists?;
        (0..LIST_MSRS as u64)
            .map(|n| frame + n * 16)
            // SAFETY: reads this VM's own lists frame (see init_msr_lists).
            .find(|&e| unsafe { (e as *const u64).read() } == u64::from(m.index()))
            .map(|e| (e + 8) as *mut u64)
    }

    /// The VMCS guest field of an MSR kept in the VMCS, or `None` for EFER and PAT when the CPU
    /// switches them through the MSR-load lists instead.
    fn vmcs_field(host: &HostVmx, m: Msr) -> Option<u32> {
        Some(match m {
            Msr::FsBase => f::GUEST_FS_BASE,
            Msr::GsBase => f::GUEST_GS_BASE,
            Msr::SysenterCs => f::GUEST_SYSENTER_CS,
            Msr::SysenterEsp => f::GUEST_SYSENTER_ESP,
            Msr::SysenterEip => f::GUEST_SYSENTER_EIP,
            Msr::DebugCtl => f::GUEST_IA32_DEBUGCTL,
            Msr::Efer if host.controls.load_efer => f::GUEST_IA32_EFER,
            Msr::Pat if host.controls.load_pat => f::GUEST_IA32_PAT,
            _ => return None,
        })
    }

    fn read_switched_by_vmcs(&self, host: &HostVmx, m: Msr) -> u64 {
        match Self::vmcs_field(host, m) {
            Some(field) => vmread(field),
            // SAFETY: the slot is in this VM's lists frame.
            None => self.list_slot(m).map_or(0, |p| unsafe { p.read() }),
        }
    }

    fn write_switched_by_vmcs(&self, host: &HostVmx, m: Msr, value: u64) {
        match Self::vmcs_field(host, m) {
            Some(field) => vmwrite(field, value),
            None => {
                if let Some(p) = self.list_slot(m) {
                    // SAFETY: the slot is in this VM's lists frame.
                    unsafe { p.write(value) };
                }
            }
        }
    }

    /// Frees the VM's memory, EPT tables, VMCS and CPU-state frames.
    pub fn release(self, frames: &mut FrameAllocator) {
        free_ept_tables(&self.ept, frames);
        // With memory multiplexing, the VM left the engine when it stopped, so every page still
        // present is a private frame of its own; shared and zero frames are the engine's.
        for frame in self.memory.present_frames() {
            frames.free(frame);
        }
        frames.free(self.vmcs);
        frames.free(self.cpu.xsave_area);
        if let Some(lists) = self.msr_lists {
            frames.free(lists);
        }
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
        let (name, out) = (&self.name, &mut self.console_out);
        self.console.push(bytes, |line| out.push(name, line));
    }

    /// Prints every queued console line now, at the end of the run, waiting for room in the
    /// output ring if need be.
    fn print_console(&mut self) {
        self.end_console();
        while let Some(line) = self.console_out.pop() {
            crate::serial::print(format_args!("{line}"));
        }
    }

    /// Moves queued console lines into the output ring while they fit, without waiting.
    fn send_console(&mut self) {
        while let Some(line) = self.console_out.front() {
            if !crate::serial::try_print_line(line) {
                break;
            }
            self.console_out.discard_front();
        }
    }

    /// The VM may be entered: it is runnable and not waiting for its console output to drain.
    fn may_run(&self) -> bool {
        self.state.is_runnable() && !self.console_out.must_drain()
    }

    /// Queues the VM's unfinished console line: it stopped, so no newline will end it. What is
    /// queued is still sent as the line drains (run_all), not now: a stopping VM must not hold the
    /// CPU for as long as its output takes.
    fn end_console(&mut self) {
        let (name, out) = (&self.name, &mut self.console_out);
        self.console.flush(|line| out.push(name, line));
        self.send_console();
    }

    /// Stops the VM for good, with a report.
    fn fail(&mut self, why: core::fmt::Arguments) {
        self.end_console();
        log::error!(target: &self.target, "stopped: {why}");
        self.state = VmState::Failed;
    }

    fn exit_with(&mut self, code: u64) {
        self.end_console();
        log::info!(target: &self.target, "exited with code {code}");
        self.state = VmState::Exited(code);
    }

    pub fn stats_line(&self, tsc_hz: u64) -> String {
        let s = &self.acct.stats;
        let state = match self.state {
            VmState::Exited(c) => format!("exited({c})"),
            VmState::Failed => String::from("failed"),
            VmState::Runnable => String::from("runnable"),
        };
        let mut line = format!(
            "vm={} state={} cpu_us={} runs={} max_wait_us={} max_overrun_us={} exits={}",
            self.name,
            state,
            s.cpu_us,
            s.runs,
            sched::tsc_to_us(self.acct.max_wait_tsc, tsc_hz),
            sched::tsc_to_us(self.acct.max_overrun_tsc, tsc_hz),
            self.acct.total_exits()
        );
        for kind in ExitKind::ALL {
            line.push_str(&format!(" {}={}", kind.name(), s.exits[kind as usize]));
        }
        line
    }

    /// Injects `event` at the next VM entry (SDM 27.6), with `error_code` when it has one.
    fn inject(&mut self, event: Interruption, error_code: u32) {
        vmwrite(f::ENTRY_INTERRUPTION_INFO, event.entry_info().into());
        if event.has_error_code {
            vmwrite(f::ENTRY_EXCEPTION_ERROR_CODE, error_code.into());
        }
        self.injected = true;
    }

    /// #UD: what a CPU without the instruction's feature raises.
    fn inject_ud(&mut self) -> Next {
        self.inject(Interruption::exception(6, false), 0);
        Next::Resume
    }

    /// #GP(0).
    fn inject_gp(&mut self) -> Next {
        self.inject(Interruption::exception(13, true), 0);
        Next::Resume
    }

    /// #PF at `linear`: CR2 is the guest's own while it is on the CPU (cpu_state.rs).
    fn inject_pf(&mut self, linear: u64, error_code: u32) -> Next {
        // SAFETY: CR2 belongs to the guest on the CPU; the hypervisor takes no page faults.
        unsafe { core::arch::asm!("mov cr2, {}", in(reg) linear, options(nomem, nostack)) };
        self.inject(Interruption::exception(14, true), error_code);
        Next::Resume
    }
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
    /// read-only (directly, or through an instruction the hypervisor emulates): have the engine
    /// fault it in, then re-enter the guest at the same instruction.
    GuestFault { gpa: u64, write: bool },
    /// A hypercall's buffer covers such a page: fault it in, then handle the VMCALL again.
    HypercallFault { gpa: u64, write: bool },
}

/// Completes an instruction the hypervisor emulated, as the CPU would have on retiring it: RIP
/// moves past it and, with RFLAGS.TF set, a single-step debug exception is pending (SDM
/// 17.3.1.4; delivered at the next entry through the pending-debug-exceptions field, BS bit).
/// The interrupt shadow of a preceding STI or MOV SS is left as it is: it only matters once
/// interrupts are delivered to guests, and each VMREAD costs the exit path several Bochs ticks.
fn advance_rip() {
    const RFLAGS_TF: u64 = 1 << 8;
    let rip = vmread(f::GUEST_RIP);
    vmwrite(f::GUEST_RIP, rip + vmread(f::EXIT_INSTRUCTION_LENGTH));
    if vmread(f::GUEST_RFLAGS) & RFLAGS_TF != 0 {
        single_step_trap();
    }
}

/// The single-step trap after an emulated instruction, out of line (rare): none with
/// DEBUGCTL.BTF, where TF single-steps on branches only and no emulated instruction branches.
#[inline(never)]
fn single_step_trap() {
    const PENDING_BS: u64 = 1 << 14;
    const DEBUGCTL_BTF: u64 = 1 << 1;
    if vmread(f::GUEST_IA32_DEBUGCTL) & DEBUGCTL_BTF == 0 {
        let pending = vmread(f::GUEST_PENDING_DEBUG_EXCEPTIONS);
        vmwrite(f::GUEST_PENDING_DEBUG_EXCEPTIONS, pending | PENDING_BS);
    }
}

/// Handles one VM exit of the current VM (its VMCS is current), whose EXIT_REASON field is
/// `raw_reason`.
///
/// `multiplexed`: the memory engine manages this VM's pages, so an EPT violation inside its
/// memory is the engine's to resolve rather than a fault of the guest.
///
/// The policy of every exit reason (docs/isolation.md, "Exit reasons"):
/// - emulated: CPUID, RDMSR/WRMSR, I/O (string forms too), MOV to/from CR8, XSETBV, VMCALL,
///   INVD (as WBINVD), HLT (yields), EPT violations the memory engine owns;
/// - exception injected as a CPU of the advertised model would raise it: VMX instructions,
///   GETSEC, MONITOR/MWAIT, RSM, VMFUNC, ENCLS, UMWAIT/TPAUSE, LOADIWKEY, INVPCID (#UD), RDPMC
///   and MOV to CR4 of a forbidden bit (#GP);
/// - host events, counted and resumed: external interrupts (acknowledged), NMIs, SMIs,
///   INIT signals, the preemption timer (ends the quantum);
/// - VM stopped with a report: triple fault, EPT violation outside memory, VM-entry failures,
///   and exits that the negotiated controls make impossible (a hypervisor bug if seen).
fn handle_exit(vm: &mut Vm, host: &HostVmx, multiplexed: bool, raw_reason: u32) -> Next {
    if raw_reason & exit::EXIT_REASON_ENTRY_FAILURE != 0 {
        vm.acct.count_exit(ExitKind::Other);
        let basic = exit::basic_reason(raw_reason);
        vm.fail(format_args!(
            "VM entry failed: exit reason {basic} ({}) qualification {:#x}",
            reason::name(basic),
            vmread(f::EXIT_QUALIFICATION)
        ));
        return Next::Stopped;
    }
    match exit::basic_reason(raw_reason) {
        reason::CPUID => {
            vm.acct.count_exit(ExitKind::Cpuid);
            let (leaf, subleaf) = (vm.regs.rax as u32, vm.regs.rcx as u32);
            // Only leaf 1 depends on CR4 (OSXSAVE): spare the other leaves the VMREADs.
            let cr4 = if leaf == 1 { vmread(f::GUEST_CR4) } else { 0 };
            let r = host
                .cpu_policy
                .cpuid(leaf, subleaf, cpuid(leaf, subleaf), cr4);
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
            handle_msr(vm, host, write)
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
            // Acknowledged by the exit ("acknowledge interrupt on exit"); the host has no use
            // for it, but the controller that sent it needs its EOI.
            vm.acct.count_exit(ExitKind::ExternalInterrupt);
            if let Some(event) = Interruption::from_info(vmread(f::EXIT_INTERRUPTION_INFO) as u32) {
                crate::interrupts::acknowledge(event.vector);
            }
            Next::Resume
        }
        reason::EXCEPTION_OR_NMI => {
            // The exception bitmap is empty, so only NMIs exit here: the host's (guests have no
            // virtual NMI source), counted and not injected.
            vm.acct.count_exit(ExitKind::Other);
            crate::interrupts::nmi_exit();
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
        other => {
            vm.acct.count_exit(ExitKind::Other);
            handle_other_exit(vm, host, other)
        }
    }
}

/// The exits that are rare or that a guest causes only by probing: one policy each.
fn handle_other_exit(vm: &mut Vm, host: &HostVmx, basic: u16) -> Next {
    match basic {
        reason::CR_ACCESS => handle_cr_access(vm),
        reason::XSETBV => {
            let value = (vm.regs.rdx << 32) | (vm.regs.rax & 0xffff_ffff);
            if host
                .cpu_policy
                .check_xsetbv(vm.regs.rcx as u32, value)
                .is_err()
            {
                return vm.inject_gp();
            }
            vm.cpu.xcr0 = value;
            // SAFETY: the policy checked the value against what the CPU supports and boot
            // enabled CR4.OSXSAVE; XCR0 holds the running VM's value (cpu_state.rs).
            unsafe { cpu_state::xsetbv(value) };
            advance_rip();
            Next::Resume
        }
        reason::INVD => {
            // Discarding caches without writing them back could expose stale memory of the
            // host or another VM: write back and invalidate instead, as WBINVD does.
            // SAFETY: WBINVD only writes back and invalidates caches.
            unsafe { core::arch::asm!("wbinvd", options(nostack)) };
            advance_rip();
            Next::Resume
        }
        // VMX is hidden from CPUID (and CR4.VMXE cannot be set), so VMX instructions raise #UD
        // like on a CPU without VMX; so do the instructions of other hidden features.
        reason::VMCLEAR
        | reason::VMLAUNCH
        | reason::VMPTRLD
        | reason::VMPTRST
        | reason::VMREAD
        | reason::VMRESUME
        | reason::VMWRITE
        | reason::VMXOFF
        | reason::VMXON
        | reason::INVEPT
        | reason::INVVPID
        | reason::VMFUNC
        | reason::GETSEC
        | reason::MONITOR
        | reason::MWAIT
        | reason::RSM
        | reason::ENCLS
        | reason::UMWAIT
        | reason::TPAUSE
        | reason::LOADIWKEY
        | reason::INVPCID => vm.inject_ud(),
        // No performance counters are offered (CPUID leaf 0xA is empty): every counter index
        // is invalid.
        reason::RDPMC => vm.inject_gp(),
        // Host events: nothing for the guest to see.
        reason::IO_SMI | reason::OTHER_SMI | reason::INIT_SIGNAL | reason::SIPI => {
            log::warn!(target: &vm.target, "host event during the guest: {} (ignored)", reason::name(basic));
            Next::Resume
        }
        other => {
            vm.fail(format_args!(
                "VM exit {other} ({}) at rip={:#x}: the VMCS controls rule it out, so this is a hypervisor bug",
                reason::name(other),
                vmread(f::GUEST_RIP)
            ));
            Next::Stopped
        }
    }
}

/// MOV to/from CR8 (the task-priority register, kept per VM) and MOV to CR4 setting a bit of
/// [`policy::CR4_GUEST_FORBIDDEN`] (#GP). CR0 and CR3 accesses do not exit (empty CR0 mask, no
/// CR3 exiting); CLTS and LMSW only exit for masked CR0 bits.
fn handle_cr_access(vm: &mut Vm) -> Next {
    match CrAccess::from_qualification(vmread(f::EXIT_QUALIFICATION)) {
        CrAccess::MovTo { cr: 8, gpr } => {
            let value = vm.regs.gpr(gpr);
            if value > 0xf {
                return vm.inject_gp(); // CR8 bits 63:4 are reserved
            }
            vm.tpr = value;
        }
        CrAccess::MovFrom { cr: 8, gpr } => vm.regs.set_gpr(gpr, vm.tpr),
        CrAccess::MovTo { cr: 4, .. } => return vm.inject_gp(),
        other => {
            vm.fail(format_args!(
                "unexpected control-register exit {other:?} at rip={:#x}",
                vmread(f::GUEST_RIP)
            ));
            return Next::Stopped;
        }
    }
    advance_rip();
    Next::Resume
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
            // Queued, not printed: the serial line takes it as fast as it drains (run_all).
            let n = bytes.len() as u64;
            let (name, out) = (&vm.name, &mut vm.console_out);
            vm.console.push(bytes, |line| out.push(name, line));
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

/// Reads `size` bytes from `port` as the VM's platform answers: byte lanes go to consecutive
/// ports (a 16-bit IN from 0x3F8 reads 0x3F8 and 0x3F9), the UART's ports to its model, every
/// other port reads as all ones.
fn port_read(vm: &mut Vm, port: u16, size: u8) -> u32 {
    (0..size).fold(0u32, |value, i| {
        let p = port.wrapping_add(i.into());
        let byte = if Uart16550::owns(p) {
            vm.uart.read(p)
        } else {
            policy::UNKNOWN_PORT_VALUE as u8
        };
        value | (u32::from(byte) << (8 * i))
    })
}

/// Writes `size` bytes of `value` to `port` (byte lanes as in [`port_read`]); writes to ports
/// without a device are ignored.
fn port_write(vm: &mut Vm, port: u16, size: u8, value: u32) {
    for i in 0..size {
        let p = port.wrapping_add(i.into());
        if Uart16550::owns(p) {
            if let Some(byte) = vm.uart.write(p, (value >> (8 * i)) as u8) {
                vm.console_bytes(&[byte]);
            }
        }
    }
}

fn handle_io(vm: &mut Vm) -> Next {
    let io = IoExit::from_qualification(vmread(f::EXIT_QUALIFICATION));
    if io.string {
        return handle_string_io(vm, io);
    }
    if io.is_in {
        let value = u64::from(port_read(vm, io.port, io.size));
        vm.regs.rax = match io.size {
            1 => (vm.regs.rax & !0xff) | value,
            2 => (vm.regs.rax & !0xffff) | value,
            // A 32-bit destination is zero-extended into RAX, as every 32-bit register write.
            _ => value,
        };
    } else {
        port_write(vm, io.port, io.size, vm.regs.rax as u32);
    }
    advance_rip();
    Next::Resume
}

/// Iterations of a REP INS/OUTS done per exit: the rest run after re-entering the guest at the
/// same instruction (RCX counts down), so one exit's work stays bounded.
const STRING_IO_BATCH: u64 = 256;

/// INS/OUTS, with or without REP (SDM Vol. 2, INS/OUTS): each element goes between the port and
/// the guest-linear address in RDI (INS, ES) or RSI (OUTS, its segment), translated through the
/// guest's page tables; RSI/RDI step by the size (down when RFLAGS.DF), RCX counts down under
/// REP, all in the instruction's address size. A page fault on the guest's tables is injected
/// as the CPU would, with the iterations done so far kept.
fn handle_string_io(vm: &mut Vm, io: IoExit) -> Next {
    let info = vmread(f::EXIT_INSTRUCTION_INFO);
    let mask = match (info >> 7) & 0b111 {
        0 => 0xffff,
        1 => 0xffff_ffff,
        _ => u64::MAX,
    };
    let step = u64::from(io.size);
    let down = vmread(f::GUEST_RFLAGS) & (1 << 10) != 0;
    let mut linear = vmread(f::GUEST_LINEAR_ADDRESS);
    let mut left = if io.rep { vm.regs.rcx & mask } else { 1 };
    let access = paging::Access {
        write: io.is_in,
        user: (vmread(f::GUEST_SS_ACCESS_RIGHTS) >> 5) & 0b11 == 3,
        write_protect: vmread(f::GUEST_CR0) & (1 << 16) != 0,
    };
    let cr3 = vmread(f::GUEST_CR3);
    let mut phys = IdentityPhys;
    let mut batch = 0;
    while left > 0 && batch < STRING_IO_BATCH {
        // Each byte is translated on its own: an element may straddle two pages.
        let mut gpas = [0u64; 4];
        for (i, gpa) in gpas.iter_mut().enumerate().take(io.size.into()) {
            match paging::translate(
                &vm.memory,
                &phys,
                cr3,
                linear.wrapping_add(i as u64),
                access,
            ) {
                Ok(g) => *gpa = g,
                Err(paging::WalkError::PageFault { error_code }) => {
                    return vm.inject_pf(linear.wrapping_add(i as u64), error_code);
                }
                Err(paging::WalkError::Table(AccessError::Unavailable { gpa })) => {
                    return Next::GuestFault { gpa, write: false };
                }
                Err(paging::WalkError::Table(AccessError::OutOfRange(r))) => {
                    vm.fail(format_args!(
                        "string I/O: the guest's page tables point outside its memory (gpa={:#x})",
                        r.gpa
                    ));
                    return Next::Stopped;
                }
            }
        }
        let gpas = &gpas[..io.size.into()];
        if io.is_in {
            let value = port_read(vm, io.port, io.size).to_le_bytes();
            for (i, &gpa) in gpas.iter().enumerate() {
                match vm.memory.write(&mut phys, gpa, &value[i..=i]) {
                    Ok(()) => {}
                    Err(AccessError::Unavailable { gpa }) => {
                        return Next::GuestFault { gpa, write: true }
                    }
                    Err(AccessError::OutOfRange(_)) => unreachable!("translated inside memory"),
                }
            }
        } else {
            let mut value = [0u8; 4];
            for (i, &gpa) in gpas.iter().enumerate() {
                match vm.memory.read(&phys, gpa, &mut value[i..=i]) {
                    Ok(()) => {}
                    Err(AccessError::Unavailable { gpa }) => {
                        return Next::GuestFault { gpa, write: false }
                    }
                    Err(AccessError::OutOfRange(_)) => unreachable!("translated inside memory"),
                }
            }
            port_write(vm, io.port, io.size, u32::from_le_bytes(value));
        }
        // One element done: commit it to the registers, so that a fault or the batch limit
        // leaves the instruction restartable where it stopped.
        let next = |r: u64| {
            if down {
                r.wrapping_sub(step)
            } else {
                r.wrapping_add(step)
            }
        };
        // RSI/RDI change only in the instruction's address size.
        let bump = |r: u64| (r & !mask) | (next(r) & mask);
        if io.is_in {
            vm.regs.rdi = bump(vm.regs.rdi);
        } else {
            vm.regs.rsi = bump(vm.regs.rsi);
        }
        linear = next(linear);
        left -= 1;
        if io.rep {
            vm.regs.rcx = (vm.regs.rcx & !mask) | (left & mask);
        }
        batch += 1;
    }
    if left == 0 {
        advance_rip();
    }
    Next::Resume
}

fn handle_msr(vm: &mut Vm, host: &HostVmx, write: bool) -> Next {
    let index = vm.regs.rcx as u32;
    let value = (vm.regs.rdx << 32) | (vm.regs.rax & 0xffff_ffff);
    let usable = Msr::from_index(index).filter(|&m| host.cpu_policy.has_msr(m));
    let Some(m) = usable else {
        log::debug!(target: &vm.target, "#GP for {} of MSR {index:#x}", if write { "WRMSR" } else { "RDMSR" });
        return vm.inject_gp();
    };
    if write {
        // Only EFER's check depends on its present value (LME fixed, LMA read-only).
        let current = if m == Msr::Efer {
            vm.read_switched_by_vmcs(host, m)
        } else {
            0
        };
        let Ok(value) = m.check_write(value, current) else {
            log::debug!(target: &vm.target, "#GP for WRMSR {index:#x} = {value:#x}");
            return vm.inject_gp();
        };
        match m.home() {
            Home::Vmcs => vm.write_switched_by_vmcs(host, m, value),
            Home::Switched(slot) => {
                vm.cpu.msrs.values[slot] = value;
                // SAFETY: the running VM's switched MSRs live in the CPU (cpu_state.rs); the
                // value passed the CPU's own checks above, so WRMSR cannot fault.
                unsafe { crate::platform::wrmsr(index, value) };
            }
            Home::Computed => {} // XSS = 0 accepted; nothing to store
        }
    } else {
        let v = match m.home() {
            Home::Vmcs => vm.read_switched_by_vmcs(host, m),
            // SAFETY: as above; SWAPGS changes KERNEL_GS_BASE without an exit, so the CPU's
            // value is the current one.
            Home::Switched(_) => unsafe { rdmsr(index) },
            Home::Computed if m == Msr::Tsc => rdtsc(),
            Home::Computed => 0,
        };
        vm.regs.rax = v & 0xffff_ffff;
        vm.regs.rdx = v >> 32;
    }
    advance_rip();
    Next::Resume
}

/// Re-injects an event whose delivery the exit interrupted (IDT-vectoring information, SDM
/// 28.2.4 and 29.2.1): an exception, interrupt or NMI the guest was receiving when, say, its IDT
/// or stack page had to be faulted in, or a host interrupt arrived. Nothing is re-injected when
/// the exit handler injected an event of its own (the handlers only do that for instructions,
/// which are never exits during delivery).
fn reinject_interrupted_event(vm: &mut Vm) {
    if vm.injected {
        return;
    }
    let info = vmread(f::IDT_VECTORING_INFO) as u32;
    if let Some(event) = Interruption::from_info(info) {
        vmwrite(f::ENTRY_INTERRUPTION_INFO, event.entry_info().into());
        if event.has_error_code {
            vmwrite(
                f::ENTRY_EXCEPTION_ERROR_CODE,
                vmread(f::IDT_VECTORING_ERROR_CODE),
            );
        }
        // Software interrupts and exceptions need the instruction length (SDM 27.6.1.1).
        if event.kind >= 4 {
            vmwrite(
                f::ENTRY_INSTRUCTION_LENGTH,
                vmread(f::EXIT_INSTRUCTION_LENGTH),
            );
        }
    }
}

/// Runs all VMs round-robin until every one has stopped. With `mux`, the memory engine scans
/// between quanta and resolves the faults on pages it manages.
///
/// A quantum is a host-clock deadline: before every VM entry the preemption timer gets the time
/// left, and once it has passed the quantum ends, so the time exits take is the VM's own. The
/// serial output is pumped at every exit and every scheduling decision, and the VMs' queued
/// console lines move into it as room frees up; a VM with more than the limit queued is not
/// scheduled until its queue drains (hv_vm::console), like a process blocked on a slow device.
pub fn run_all(
    vms: &mut [Vm],
    host: &HostVmx,
    frames: &mut FrameAllocator,
    mut mux: Option<&mut MemMux>,
) {
    let rate = host.caps.preemption_timer_rate();
    let mut current: Option<usize> = None;
    let mut last_on_cpu: Option<usize> = None;
    let start = rdtsc();
    for vm in vms.iter_mut() {
        vm.acct.ready(start);
    }
    let mut round: u64 = 0;
    loop {
        for vm in vms.iter_mut() {
            vm.send_console();
        }
        crate::serial::pump();
        let Some(i) = sched::next_runnable(vms.len(), current, |v| vms[v].may_run()) else {
            if vms.iter().any(|v| v.state.is_runnable()) {
                // Every VM that could run waits for the serial line: let it drain.
                core::hint::spin_loop();
                continue;
            }
            break;
        };
        current = Some(i);
        round += 1;
        crate::interrupts::selftest_round(round);
        if let Some(mux) = mux.as_deref_mut() {
            mux.maybe_scan(vms, frames);
        }
        if last_on_cpu != Some(i) {
            let (out, into) = match last_on_cpu {
                Some(j) if j < i => {
                    let (a, b) = vms.split_at_mut(i);
                    (Some(&mut a[j].cpu), &b[0].cpu)
                }
                Some(j) => {
                    let (a, b) = vms.split_at_mut(j);
                    (Some(&mut b[0].cpu), &a[i].cpu)
                }
                None => (None, &vms[i].cpu),
            };
            cpu_state::switch(out, into, &host.cpu_policy);
            last_on_cpu = Some(i);
        }
        // SAFETY: the VMCS belongs to this VM and was initialised by `init_vmcs`.
        unsafe { vmx::vmptrld(vms[i].vmcs) };
        let quantum = sched::us_to_tsc(vms[i].config.quantum_us, host.tsc_hz);
        let start = rdtsc();
        vms[i].acct.schedule_in(start);
        let deadline = start.saturating_add(vms[i].acct.next_quantum(quantum));
        // Past the deadline the guest is still entered twice at most: for its first entry of
        // the quantum, however short (the hypervisor's own work before it may take longer than
        // a small quantum), and once to retry an instruction after the memory engine faulted
        // its page in, so that the instruction completes. Else a fault-in longer than what is
        // left of the quantum, and a scan that takes the page back in between, could keep a VM
        // from ever making progress; and only once, so that a guest faulting on page after
        // page cannot stretch its quantum.
        let mut entries: u32 = 0;
        let mut retry_after_fault = false;
        let mut retried_late = false;
        loop {
            let now = rdtsc();
            if vms[i].console_out.must_drain() {
                break;
            }
            if now >= deadline && entries > 0 {
                if !retry_after_fault || retried_late {
                    break;
                }
                retried_late = true;
            }
            entries += 1;
            retry_after_fault = false;
            crate::serial::pump();
            if let Some(mux) = mux.as_deref_mut() {
                mux.before_entry(&vms[i], i);
            }
            let vm = &mut vms[i];
            vmwrite(
                f::PREEMPTION_TIMER_VALUE,
                sched::preemption_timer_value(deadline.saturating_sub(now), rate).into(),
            );
            // SAFETY: the VM's VMCS is current with complete host state; regs is the VM's own.
            let failed = unsafe { vmx::run_guest(&mut vm.regs, u64::from(vm.launched)) };
            if failed != 0 {
                let err = vmread(f::VM_INSTRUCTION_ERROR);
                vm.fail(format_args!("VM entry failed: VM-instruction error {err}"));
                break;
            }
            vm.launched = true;
            vm.injected = false;
            let raw_reason = vmread(f::EXIT_REASON) as u32;
            let mut next = handle_exit(vm, host, mux.is_some(), raw_reason);
            // Exits that can interrupt the delivery of an event to the guest (SDM 28.2.4): the
            // event is delivered again at the next entry. Instruction exits never do.
            if matches!(
                exit::basic_reason(raw_reason),
                reason::EXCEPTION_OR_NMI
                    | reason::EXTERNAL_INTERRUPT
                    | reason::EPT_VIOLATION
                    | reason::EPT_MISCONFIGURATION
                    | reason::PREEMPTION_TIMER
            ) && !matches!(next, Next::Stopped)
            {
                reinject_interrupted_event(vm);
            }
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
                    _ => {
                        retry_after_fault = true;
                        Next::Resume
                    }
                };
            }
            match next {
                Next::Resume => continue,
                Next::Reschedule => break,
                Next::Stopped => break,
                Next::GuestFault { .. } | Next::HypercallFault { .. } => {
                    vms[i].fail(format_args!("memory fault without a memory engine"));
                    break;
                }
            }
        }
        let ready = vms[i].state.is_runnable();
        vms[i]
            .acct
            .schedule_out(rdtsc(), deadline, host.tsc_hz, ready);
        if !ready {
            if let Some(mux) = mux.as_deref_mut() {
                mux.remove_vm(vms, frames, i);
            }
        }
    }
    for vm in vms.iter_mut() {
        vm.print_console();
    }
}
