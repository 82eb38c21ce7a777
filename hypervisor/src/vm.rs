//! Running VMs on VT-x: creating one from its manifest entry (memory, EPT, image, VMCS), the
//! VT-x implementation of the vCPU backend ([`hv_vm::vcpu::Vcpu`]), and the round-robin loop
//! that runs them all on this CPU.
//!
//! What happens on each exit is policy, and lives in `hv_vm::exits` (host-tested against a fake
//! vCPU); this file enters the guest, decodes the exit ([`VmExit::decode`]) and carries out what
//! the policy decided (the memory engine's fault-ins, scheduling). Every failure of one VM (bad
//! image, out of memory, EPT violation, triple fault, failed entry) stops that VM with a report
//! naming it; the others go on.

use alloc::vec::Vec;
use core::sync::atomic::AtomicBool;

use guest_abi::boot as gboot;
use hv_manifest::VmConfig;
use hv_platform::{rtc::DateTime, Platform, Timebase};
use hv_vm::{
    boot::Kernel,
    clock::GuestClock,
    console::{InputLine, InputRouter},
    cpu_mode,
    elf::Segment,
    exits::{self, ExitContext, Next},
    frames::FrameAllocator,
    linux,
    memory::{AccessError, GuestMemory},
    msr::{self, Msr},
    multiboot,
    policy::CpuPolicy,
    pressure::{Action, PressurePolicy, ROUNDS_BEFORE_STOP},
    regs::GuestRegisters,
    runqueue::{Rank, RunQueue, Sleepers},
    sched,
    vcpu::{rflags, Reg, Vcpu},
};
use hv_vmx::{
    controls::{EntryControls, PrimaryProcBased, SecondaryProcBased, TscMode, VmcsControls},
    ept::{Ept, EptPerms},
    exit::{reason, Interruption, VmExit},
    fields as f,
};

use crate::cpu_state::{self, CpuState};
use crate::guest_phys::{
    free_ept_tables, zero_frame, GuestPhys, HasGuestPhys, IdentityPhys, TableFrames,
};
use crate::memmux::MemMux;
use crate::platform::{cpuid, rdmsr, rdtsc};
use crate::vmx::{self, vmread, vmwrite};
use hv_vm::idle::RunEnd;

/// How the guest starts: the CPU mode and registers its boot protocol gives it.
struct Entry {
    rip: u64,
    /// The GDT the entry segments come from.
    gdt: u64,
    /// Its length in bytes, less one (GDTR.limit).
    gdt_limit: u16,
    /// The code and data selectors, into that GDT.
    selectors: (u16, u16),
    /// 64-bit mode (muxvisor's protocol, Linux's 64-bit boot protocol), or 32-bit protected
    /// mode with paging off (Multiboot, section 3.2 of its specification).
    long_mode: bool,
    regs: GuestRegisters,
    /// The boot protocol, for the log: "" (muxvisor's), " (Multiboot, 32-bit)", ...
    protocol: &'static str,
}

impl Entry {
    /// The guest's EFER at entry: long mode enabled and active, or all clear.
    fn efer(&self) -> u64 {
        if self.long_mode {
            msr::efer::LME | msr::efer::LMA
        } else {
            0
        }
    }
}

/// The hardware-independent description of a VMCS we build for every VM.
pub struct HostVmx {
    /// The host's wall clock at boot: each VM's RTC starts there.
    pub boot_time: DateTime,
    pub caps: hv_vmx::caps::Capabilities,
    pub controls: VmcsControls,
    /// What guests see of CPUID and which XCR0 values they may set.
    pub cpu_policy: CpuPolicy,
    pub tsc_hz: u64,
    /// Dilated VMs get their TSC from VMX TSC scaling where the CPU has it (else, or with the
    /// command-line word `tsc=exiting`, by RDTSC exiting).
    pub prefer_tsc_scaling: bool,
    /// Shared by all VMs: every MSR access and every port exits (all bits set).
    pub msr_bitmap: u64,
    pub io_bitmap_a: u64,
    pub io_bitmap_b: u64,
}

/// How many exits in a row may re-enter the guest without the checks before an entry
/// (`Next::Reenter`): a bound on how far such exits can stretch a quantum.
const FAST_REENTRIES: u32 = 16;

/// Whether dilated VMs use VMX TSC scaling where the CPU has it (the default), or RDTSC exiting
/// (command-line word `tsc=exiting`, to compare the two on one CPU).
pub static PREFER_TSC_SCALING: AtomicBool = AtomicBool::new(true);

/// Why a VM was stopped by the hypervisor.
#[derive(Debug)]
pub enum VmError {
    OutOfMemory,
    Image(hv_vm::boot::ImageError),
    /// The image is a Multiboot kernel, which starts with paging off: that needs VMX's
    /// "unrestricted guest", and this CPU does not have it.
    NoUnrestrictedGuest,
    /// `modules` for a kernel of muxvisor's own protocol, which has no way to receive them.
    ModulesNeedMultiboot,
    Ept(hv_vmx::ept::EptError),
    Platform(hv_platform::rtc::RtcError),
    /// The VM asks for time dilation and the CPU has neither TSC scaling nor RDTSC exiting.
    NoTimeDilation,
}

impl core::fmt::Display for VmError {
    fn fmt(&self, fmt: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfMemory => fmt.write_str("not enough free host memory"),
            Self::Image(e) => write!(fmt, "bad image: {e}"),
            Self::NoUnrestrictedGuest => fmt.write_str(
                "the image is a Multiboot kernel, which needs VMX unrestricted guest, and this CPU does not have it",
            ),
            Self::ModulesNeedMultiboot => fmt.write_str(
                "modules are given to Multiboot kernels only, and the image is a 64-bit ELF of muxvisor's boot protocol",
            ),
            Self::Ept(e) => write!(fmt, "EPT: {e}"),
            Self::Platform(e) => write!(fmt, "platform: {e:?}"),
            Self::NoTimeDilation => fmt.write_str(
                "time_dilation needs TSC scaling or RDTSC exiting, and this CPU has neither",
            ),
        }
    }
}

/// A VM on this machine: its policy state (host-tested, `hv_vm::Vm`), its guest-physical
/// memory, and its VT-x state.
pub struct Vm {
    pub core: hv_vm::Vm,
    pub phys: GuestPhys,
    vmcs: u64,
    launched: bool,
    hw: VcpuHw,
}

/// The vCPU's state the VT-x backend works on besides the VMCS (one struct, so that the
/// backend is two pointers to build on the exit path).
struct VcpuHw {
    regs: GuestRegisters,
    /// The VM's primary processor-based controls without the window bits: the host's, plus
    /// TSC offsetting or RDTSC exiting for a dilated VM (or one that wrote IA32_TSC).
    primary: u32,
    /// x87/SSE/AVX state, XCR0, DR0-DR3, DR6, CR2 and the switched MSRs while off the CPU.
    cpu: CpuState,
    /// A frame with the VM-entry MSR-load list (guest EFER and/or PAT) at offset 0 and the
    /// VM-exit MSR-load list (the host's values) at [`EXIT_LIST_OFFSET`], on CPUs without the
    /// VMCS controls that switch them.
    msr_lists: Option<u64>,
    /// An event is set up in the VM-entry interruption-information field for the next entry
    /// (cleared at every exit: the CPU clears the field's valid bit on entry).
    injected: bool,
    /// Interrupt-window and NMI-window exiting are on in the VMCS.
    window: bool,
    nmi_window: bool,
    /// The exit's instruction was completed by the hypervisor (cleared at every exit).
    completed: bool,
}

impl HasGuestPhys for Vm {
    fn vm(&self) -> &hv_vm::Vm {
        &self.core
    }
    fn guest_phys(&self) -> &GuestPhys {
        &self.phys
    }
    fn guest_phys_mut(&mut self) -> &mut GuestPhys {
        &mut self.phys
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

/// What [`Vm::create`] writes into a new VM's memory and how it enters: the kernel's segments
/// (offsets into its image), the boot pieces, the entry state, and boot modules (address, bytes).
type BootLayout<'m> = (
    Vec<Segment>,
    Vec<(u64, Vec<u8>)>,
    Entry,
    Vec<(u64, &'m [u8])>,
);

impl Vm {
    /// The layout of a Linux bzImage (manifest `kernel`) booted by the 64-bit boot protocol
    /// (hv_vm::linux): page tables identity-mapping 4 GiB, the GDT, zero page and command line,
    /// the protected-mode kernel, and the initrd (the one module, from manifest `initrd`).
    fn plan_linux<'m>(
        config: &VmConfig,
        image: &[u8],
        modules: &[(&str, &'m [u8])],
        bytes: u64,
    ) -> Result<BootLayout<'m>, VmError> {
        let bad = |e| VmError::Image(hv_vm::boot::ImageError::Linux(e));
        let k = linux::parse(image).map_err(bad)?;
        let initrd = modules.first().map(|(_, data)| *data);
        let plan =
            linux::plan(&k, bytes, &config.cmdline, initrd.map(|d| d.len() as u64)).map_err(bad)?;
        let mut pieces = hv_vm::boot::identity_page_tables();
        pieces.extend(plan.pieces);
        let len = k.kernel.len() as u64;
        let kernel = Segment {
            gpa: plan.kernel,
            offset: image.len() as u64 - len,
            filesz: len,
            memsz: len,
        };
        let entry = Entry {
            rip: plan.entry,
            gdt: linux::GDT_GPA,
            gdt_limit: (linux::GDT.len() * 8 - 1) as u16,
            selectors: (linux::BOOT_CS, linux::BOOT_DS),
            long_mode: true,
            // RSI: the zero page (boot.rst, 64-bit boot protocol); every other register 0.
            regs: GuestRegisters {
                rsi: plan.zero_page,
                ..Default::default()
            },
            protocol: " (Linux bzImage, 64-bit boot protocol)",
        };
        let at = plan.initrd.zip(initrd).into_iter().collect();
        Ok((alloc::vec![kernel], pieces, entry, at))
    }

    /// Builds a VM: memory, EPT, the image and boot area, its CPU state and its VMCS. On error
    /// every frame taken so far is given back.
    /// `modules` are the VM's boot modules (manifest `modules`) by name, in order.
    ///
    /// `on_demand`: only the pages the loader writes get frames; the others are left absent for
    /// the memory engine, which registers them as zero pages and gives each a frame on the
    /// guest's first write (`hv_mem::Engine::add_vm_on_demand`).
    pub fn create(
        id: u32,
        config: &VmConfig,
        image: &[u8],
        modules: &[(&str, &[u8])],
        host: &HostVmx,
        frames: &mut FrameAllocator,
        on_demand: bool,
    ) -> Result<Self, VmError> {
        let bytes = config.memory_bytes();
        let pages = bytes / 4096;
        // What goes into memory besides the kernel's segments, and how the guest starts.
        let (segments, pieces, entry, mb_modules) = if config.linux {
            Self::plan_linux(config, image, modules, bytes)?
        } else {
            match hv_vm::boot::kernel(image, bytes).map_err(VmError::Image)? {
                Kernel::Native(elf) => {
                    if !modules.is_empty() {
                        return Err(VmError::ModulesNeedMultiboot);
                    }
                    let entry = Entry {
                        rip: elf.entry,
                        gdt: gboot::GDT_GPA,
                        gdt_limit: 23,
                        selectors: (gboot::CODE_SELECTOR, gboot::DATA_SELECTOR),
                        long_mode: true,
                        protocol: "",
                        // Every register starts at 0 but RDI, the boot-information pointer
                        // (guest-abi boot protocol); RSP and RIP are in the VMCS.
                        regs: GuestRegisters {
                            rdi: gboot::BOOT_INFO_GPA,
                            ..Default::default()
                        },
                    };
                    let pieces = hv_vm::boot::boot_area(bytes, &config.cmdline);
                    (elf.segments, pieces, entry, Vec::new())
                }
                Kernel::Multiboot(k) => {
                    if !host.controls.unrestricted_guest {
                        return Err(VmError::NoUnrestrictedGuest);
                    }
                    let list: Vec<multiboot::Module> = modules
                        .iter()
                        .map(|(name, data)| multiboot::Module {
                            string: name,
                            len: data.len() as u64,
                        })
                        .collect();
                    // The kernel's command line starts with its own name, as GRUB and QEMU give it.
                    let cmdline = if config.cmdline.is_empty() {
                        config.image.clone()
                    } else {
                        alloc::format!("{} {}", config.image, config.cmdline)
                    };
                    let plan = multiboot::boot_plan(bytes, &cmdline, k.end(), &list)
                        .map_err(|e| VmError::Image(hv_vm::boot::ImageError::Multiboot(e)))?;
                    let entry = Entry {
                        rip: k.entry,
                        gdt: plan.gdt,
                        gdt_limit: 23,
                        selectors: (multiboot::CODE_SELECTOR, multiboot::DATA_SELECTOR),
                        long_mode: false,
                        protocol: " (Multiboot, 32-bit)",
                        regs: GuestRegisters {
                            rax: multiboot::BOOTLOADER_MAGIC.into(),
                            rbx: plan.info,
                            ..Default::default()
                        },
                    };
                    let at: Vec<(u64, &[u8])> = plan
                        .modules
                        .iter()
                        .zip(modules)
                        .map(|(&gpa, (_, data))| (gpa, *data))
                        .collect();
                    // A Multiboot loader runs after the BIOS: what the BIOS leaves in low memory
                    // comes with it (the 8259s and PIT below, once the platform exists).
                    let mut pieces = plan.pieces;
                    pieces.extend(multiboot::firmware_pieces(&k.segments));
                    (k.segments, pieces, entry, at)
                }
            }
        };
        // The pages that get a frame now: all of them, or on demand those the loader writes.
        let mut backed = alloc::vec![!on_demand; pages as usize];
        if on_demand {
            let writes = segments
                .iter()
                .map(|seg| (seg.gpa, seg.filesz))
                .chain(pieces.iter().map(|(gpa, d)| (*gpa, d.len() as u64)))
                .chain(mb_modules.iter().map(|(gpa, d)| (*gpa, d.len() as u64)));
            for (gpa, len) in writes.filter(|&(_, len)| len > 0) {
                // The plans checked every piece against the memory size.
                let (first, last) = (gpa / 4096, (gpa + len - 1) / 4096);
                for page in first..=last.min(pages - 1) {
                    backed[page as usize] = true;
                }
            }
        }
        let framed = backed.iter().filter(|&&b| b).count() as u64;
        // Refuse early rather than half-build a VM that cannot fit (plus EPT tables: 1/512).
        if frames.free_frames() < framed + pages / 256 + 16 {
            return Err(VmError::OutOfMemory);
        }
        let mut building = Building {
            frames,
            taken: Vec::with_capacity(framed as usize + 3),
        };
        let mut backing = Vec::with_capacity(pages as usize);
        for &b in &backed {
            if !b {
                backing.push(None);
                continue;
            }
            match building.frame() {
                Ok(frame) => backing.push(Some(frame)),
                Err(e) => return Err(building.fail(None, e)),
            }
        }
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
            let tables = &mut TableFrames(building.frames);
            let gpa = page as u64 * 4096;
            // An absent page gets its leaf table now, so that mapping it later (the engine,
            // on the guest's first touch) never needs a frame.
            let mapped = match frame {
                Some(frame) => ept.map(tables, gpa, frame, EptPerms::RWX),
                None => ept.prepare(tables, gpa),
            };
            if let Err(e) = mapped {
                return Err(building.fail(Some(ept), VmError::Ept(e)));
            }
        }
        let memory = GuestMemory::sparse(backing);
        let mut phys = IdentityPhys;
        let mut load = || -> Result<(), AccessError> {
            for seg in &segments {
                let data = &image[seg.offset as usize..(seg.offset + seg.filesz) as usize];
                // The image's parser checked the segment against the memory size.
                memory.write(&mut phys, seg.gpa, data)?;
            }
            for (gpa, data) in &pieces {
                memory.write(&mut phys, *gpa, data)?;
            }
            for (gpa, data) in &mb_modules {
                memory.write(&mut phys, *gpa, data)?;
            }
            Ok(())
        };
        if load().is_err() {
            return Err(building.fail(Some(ept), VmError::OutOfMemory));
        }
        let eptp = ept.eptp(host.controls.ept_ad);
        // A dilated VM's TSC starts where the host's is and runs slower from there; the
        // platform's timers count in it (hv_vm::clock).
        let created = rdtsc();
        let clock = GuestClock::dilated(config.time_dilation_milli, created);
        let tsc = if clock.is_host() {
            None
        } else {
            match host.controls.with_guest_tsc(host.prefer_tsc_scaling) {
                Some(tsc) => Some(tsc),
                None => return Err(building.fail(Some(ept), VmError::NoTimeDilation)),
            }
        };
        let (primary, secondary) = tsc
            .map_or((host.controls.primary, host.controls.secondary), |t| {
                (t.1, t.2)
            });
        let mut platform = Platform::new(Timebase::new(host.tsc_hz), created, host.boot_time)
            .map_err(VmError::Platform)?;
        // A Multiboot kernel (the one kind entered outside long mode) finds the 8259s and the
        // PIT as the BIOS before its boot loader left them.
        if !entry.long_mode {
            platform.bios_setup(created);
        }
        if config.test_device {
            // A new platform has only the PC's own devices, whose ranges the test device's
            // avoid (the manifest keeps the test-exit port off them too).
            platform
                .attach_test_device()
                .expect("the test device fits a new platform");
        }
        if config.linux {
            // A Linux VM gets ACPI tables (hv_vm::acpi), whose FADT points at these ports.
            platform
                .attach_acpi_pm()
                .expect("the ACPI PM ports fit a new platform");
        }
        let vm = Self {
            core: hv_vm::Vm::new(id, config, bytes, platform, clock),
            phys: GuestPhys {
                memory,
                ept,
                eptp,
                stale: false,
                released: false,
            },
            vmcs,
            launched: false,
            hw: VcpuHw {
                regs: entry.regs,
                cpu: CpuState::new(xsave_area),
                primary,
                msr_lists,
                injected: false,
                window: false,
                nmi_window: false,
                completed: false,
            },
        };
        vm.init_vmcs(host, &entry, secondary);
        // The EPT is new, but its root frame may have backed an earlier VM's EPT: drop any
        // translations the CPU still caches for it (SDM 29.4.3.1).
        vmx::invept(vm.phys.eptp, host.caps.invept_single_context());
        let kind = entry.protocol;
        let demand = if on_demand {
            alloc::format!(" ({} KiB loaded, the rest on demand)", framed * 4)
        } else {
            alloc::string::String::new()
        };
        log::info!(target: &vm.core.target, "created: {} MiB{demand}, image \"{}\"{kind} entry {:#x}, quantum {} us (cpu_share {}), eptp {:#x}",
            config.memory_mib, config.image, entry.rip, config.weighted_quantum_us(),
            config.cpu_share, vm.phys.eptp);
        for (name, (gpa, data)) in modules.iter().zip(&mb_modules) {
            log::info!(target: &vm.core.target, "module \"{}\": {} bytes at {gpa:#x}", name.0, data.len());
        }
        if config.test_device {
            log::info!(target: &vm.core.target, "has the test device (QEMU's pc-testdev): ports 0xe0-0xeb and 0x2000-0x2017, 64 KiB MMIO RAM at 0xff000000");
        }
        if let Some((mode, ..)) = tsc {
            let how = match mode {
                TscMode::Scaling => "VMX TSC scaling",
                TscMode::Exiting => "RDTSC exiting",
            };
            log::info!(target: &vm.core.target, "runs dilated by {how}: its clocks run {} times slower than the host's (TSC multiplier {:#x}, offset {:#x})",
                config.time_dilation_text(), clock.multiplier(), clock.offset());
        }
        Ok(vm)
    }

    /// Writes every VMCS field (SDM 25.3-25.8; checks in SDM 27.2-27.3); `secondary` is the
    /// VM's secondary processor-based controls.
    fn init_vmcs(&self, host: &HostVmx, entry: &Entry, secondary: u32) {
        let caps = &host.caps;
        // SAFETY: `self.vmcs` is this VM's own zeroed frame; the revision identifier goes first.
        unsafe {
            (self.vmcs as *mut u32).write_volatile(caps.vmcs_revision());
            vmx::vmclear(self.vmcs);
            vmx::vmptrld(self.vmcs);
        }
        let c = &host.controls;
        vmwrite(f::PIN_BASED_CONTROLS, c.pin.into());
        vmwrite(f::PRIMARY_PROC_BASED_CONTROLS, self.hw.primary.into());
        vmwrite(f::SECONDARY_PROC_BASED_CONTROLS, secondary.into());
        // Read only with TSC offsetting and scaling on (a dilated VM on a CPU that has them):
        // the guest's RDTSC then returns ((host TSC * multiplier) >> 48) + offset (SDM 27.6.5),
        // the formula hv_vm::clock computes for everything else.
        let clock = self.core.clock();
        vmwrite(f::TSC_OFFSET, clock.offset());
        if secondary & SecondaryProcBased::USE_TSC_SCALING.bits() != 0 {
            vmwrite(f::TSC_MULTIPLIER, clock.multiplier());
        }
        vmwrite(f::EXIT_CONTROLS, c.exit.into());
        let entry_controls = if entry.long_mode {
            c.entry
        } else {
            c.entry & !EntryControls::IA32E_MODE_GUEST.bits()
        };
        vmwrite(f::ENTRY_CONTROLS, entry_controls.into());
        vmwrite(f::EXCEPTION_BITMAP, 0);
        vmwrite(f::CR3_TARGET_COUNT, 0);
        vmwrite(f::EXIT_MSR_STORE_COUNT, 0);
        self.init_msr_lists(host, entry.efer());
        vmwrite(f::ENTRY_INTERRUPTION_INFO, 0);
        vmwrite(f::MSR_BITMAP, host.msr_bitmap);
        vmwrite(f::IO_BITMAP_A, host.io_bitmap_a);
        vmwrite(f::IO_BITMAP_B, host.io_bitmap_b);
        vmwrite(f::EPT_POINTER, self.phys.eptp);
        if c.vpid {
            vmwrite(f::VPID, u64::from(self.core.id) + 1);
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

        // Guest state (SDM 27.3.1): the 64-bit boot protocol (guest-abi::boot), or Multiboot's
        // 32-bit protected mode without paging (hv_vm::multiboot).
        const CR0_PE: u64 = 1;
        const CR0_ET: u64 = 1 << 4;
        const CR0_NE: u64 = 1 << 5;
        const CR0_WP: u64 = 1 << 16;
        const CR0_PG: u64 = 1 << 31;
        const CR4_PAE: u64 = 1 << 5;
        const CR4_OSFXSR: u64 = 1 << 9;
        const CR4_OSXMMEXCPT: u64 = 1 << 10;
        let (cr0_visible, cr3, cr4_visible) = if entry.long_mode {
            (
                CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
                gboot::PML4_GPA,
                CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
            )
        } else {
            (CR0_PE | CR0_ET, 0, 0)
        };
        vmwrite(
            f::GUEST_CR0,
            caps.fix_cr0(cr0_visible, c.unrestricted_guest),
        );
        // CR0.PG is host-owned (hv_vm::cpu_mode): paging switches exit, so that IA-32e mode
        // follows EFER.LME. The guest reads its own value of it.
        vmwrite(f::CR0_READ_SHADOW, cr0_visible);
        vmwrite(f::CR0_GUEST_HOST_MASK, cpu_mode::CR0_HOST_OWNED);
        vmwrite(f::GUEST_CR3, cr3);
        vmwrite(f::GUEST_CR4, caps.fix_cr4(cr4_visible));
        // CR4.VMXE must stay set in VMX non-root operation; the guest sees it clear. The other
        // masked bits enable features the guest does not have: setting any exits, and the
        // guest gets #GP (handle_cr_access). The shadow shows all of them clear.
        vmwrite(f::CR4_GUEST_HOST_MASK, host.cpu_policy.cr4_forbidden());
        vmwrite(f::CR4_READ_SHADOW, cr4_visible);
        if c.load_efer {
            vmwrite(f::GUEST_IA32_EFER, entry.efer());
        }
        let cs_rights = if entry.long_mode {
            0xa09b // present, code, L=1, G=1
        } else {
            0xc09b // present, code, D=1, G=1
        };
        let (code, data) = (u64::from(entry.selectors.0), u64::from(entry.selectors.1));
        vmwrite(f::GUEST_CS_SELECTOR, code);
        vmwrite(f::GUEST_CS_BASE, 0);
        vmwrite(f::GUEST_CS_LIMIT, 0xffff_ffff);
        vmwrite(f::GUEST_CS_ACCESS_RIGHTS, cs_rights);
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
        vmwrite(f::GUEST_GDTR_BASE, entry.gdt);
        vmwrite(f::GUEST_GDTR_LIMIT, entry.gdt_limit.into());
        vmwrite(f::GUEST_IDTR_BASE, 0);
        vmwrite(f::GUEST_IDTR_LIMIT, 0);
        vmwrite(f::GUEST_DR7, 0x400);
        vmwrite(f::GUEST_IA32_DEBUGCTL, 0);
        vmwrite(f::GUEST_SYSENTER_CS, 0);
        vmwrite(f::GUEST_SYSENTER_ESP, 0);
        vmwrite(f::GUEST_SYSENTER_EIP, 0);
        // Multiboot leaves ESP undefined (the kernel sets up its own stack): 0 then.
        let rsp = if entry.long_mode {
            (self.phys.memory.size() - 16) & !0xf
        } else {
            0
        };
        vmwrite(f::GUEST_RSP, rsp);
        vmwrite(f::GUEST_RIP, entry.rip);
        vmwrite(f::GUEST_RFLAGS, 0x2);
        vmwrite(f::GUEST_ACTIVITY_STATE, 0);
        vmwrite(f::GUEST_INTERRUPTIBILITY_STATE, 0);
        vmwrite(f::GUEST_PENDING_DEBUG_EXCEPTIONS, 0);
    }

    /// Points the VMCS at the VM-entry and VM-exit MSR-load lists for what the CPU cannot
    /// switch through VMCS fields (EFER, PAT): guest values on entry, host values on exit
    /// (SDM 25.7.2, 25.8.2). Without such a CPU both lists are empty.
    fn init_msr_lists(&self, host: &HostVmx, guest_efer: u64) {
        let Some(frame) = self.hw.msr_lists else {
            vmwrite(f::EXIT_MSR_LOAD_COUNT, 0);
            vmwrite(f::ENTRY_MSR_LOAD_COUNT, 0);
            return;
        };
        let mut n = 0u64;
        for (msr, needed, guest) in [
            (Msr::Efer, !host.controls.load_efer, guest_efer),
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

    /// Frees the VM's memory, EPT tables, VMCS and CPU-state frames.
    pub fn release(self, frames: &mut FrameAllocator) {
        self.phys.release(frames);
        frames.free(self.vmcs);
        frames.free(self.hw.cpu.xsave_area);
        if let Some(lists) = self.hw.msr_lists {
            frames.free(lists);
        }
    }
}

/// The vCPU backend on VT-x: the current VMCS, the registers the entry code saved, and the
/// physical CPU's own state that holds the guest's values while it runs (cpu_state.rs).
struct VmxVcpu<'a> {
    hw: &'a mut VcpuHw,
    controls: &'a VmcsControls,
    phys: IdentityPhys,
    /// The VM's EPT pointer, and whether the CPU has single-context INVEPT (for
    /// `flush_guest_tlb`).
    eptp: u64,
    invept_single: bool,
}

impl VmxVcpu<'_> {
    /// Where the guest's EFER or PAT is in the VM-entry MSR-load list, when the CPU switches
    /// them through the list rather than VMCS fields.
    fn list_slot(&self, m: Msr) -> Option<*mut u64> {
        let frame = self.hw.msr_lists?;
        (0..LIST_MSRS as u64)
            .map(|n| frame + n * 16)
            // SAFETY: reads this VM's own lists frame (see init_msr_lists).
            .find(|&e| unsafe { (e as *const u64).read() } == u64::from(m.index()))
            .map(|e| (e + 8) as *mut u64)
    }

    /// The VMCS guest field of an MSR kept in the VMCS, or `None` for EFER and PAT when the CPU
    /// switches them through the MSR-load lists instead.
    fn vmcs_field(&self, m: Msr) -> Option<u32> {
        Some(match m {
            Msr::FsBase => f::GUEST_FS_BASE,
            Msr::GsBase => f::GUEST_GS_BASE,
            Msr::SysenterCs => f::GUEST_SYSENTER_CS,
            Msr::SysenterEsp => f::GUEST_SYSENTER_ESP,
            Msr::SysenterEip => f::GUEST_SYSENTER_EIP,
            Msr::DebugCtl => f::GUEST_IA32_DEBUGCTL,
            Msr::Efer if self.controls.load_efer => f::GUEST_IA32_EFER,
            Msr::Pat if self.controls.load_pat => f::GUEST_IA32_PAT,
            _ => return None,
        })
    }
}

/// The single-step trap after an emulated instruction, out of line (rare): none with
/// DEBUGCTL.BTF, where TF single-steps on branches only and no emulated instruction branches.
/// Delivered at the next entry through the pending-debug-exceptions field, BS bit (SDM 17.3.1.4,
/// 27.3.1.5).
#[inline(never)]
fn single_step_trap() {
    const PENDING_BS: u64 = 1 << 14;
    const DEBUGCTL_BTF: u64 = 1 << 1;
    if vmread(f::GUEST_IA32_DEBUGCTL) & DEBUGCTL_BTF == 0 {
        let pending = vmread(f::GUEST_PENDING_DEBUG_EXCEPTIONS);
        vmwrite(f::GUEST_PENDING_DEBUG_EXCEPTIONS, pending | PENDING_BS);
    }
}

impl VmxVcpu<'_> {
    fn write_windows(&mut self) {
        let mut primary = self.hw.primary;
        if self.hw.window {
            primary |= PrimaryProcBased::INTERRUPT_WINDOW_EXITING.bits();
        }
        if self.hw.nmi_window {
            primary |= PrimaryProcBased::NMI_WINDOW_EXITING.bits();
        }
        vmwrite(f::PRIMARY_PROC_BASED_CONTROLS, primary.into());
    }
}

impl Vcpu for VmxVcpu<'_> {
    type Phys = IdentityPhys;

    #[inline(always)]
    fn regs(&mut self) -> &mut GuestRegisters {
        &mut self.hw.regs
    }

    fn read(&mut self, reg: Reg) -> u64 {
        match reg {
            Reg::Rsp => vmread(f::GUEST_RSP),
            Reg::Rip => vmread(f::GUEST_RIP),
            Reg::Rflags => vmread(f::GUEST_RFLAGS),
            Reg::Cr0 => vmread(f::GUEST_CR0),
            Reg::Cr0Shadow => vmread(f::CR0_READ_SHADOW),
            Reg::Cr3 => vmread(f::GUEST_CR3),
            Reg::Cr4 => vmread(f::GUEST_CR4),
            // SS.DPL is the CPL (SDM 5.5): access-rights bits 6:5.
            Reg::Cpl => (vmread(f::GUEST_SS_ACCESS_RIGHTS) >> 5) & 0b11,
            Reg::Interruptibility => vmread(f::GUEST_INTERRUPTIBILITY_STATE),
            Reg::CsBase => vmread(f::GUEST_CS_BASE),
            Reg::CsAccessRights => vmread(f::GUEST_CS_ACCESS_RIGHTS),
            Reg::Pdpte(n) => vmread(f::GUEST_PDPTE0 + 2 * u32::from(n & 3)),
        }
    }

    fn write(&mut self, reg: Reg, value: u64) {
        let field = match reg {
            Reg::Rsp => f::GUEST_RSP,
            Reg::Rip => f::GUEST_RIP,
            Reg::Rflags => f::GUEST_RFLAGS,
            Reg::Cr0 => f::GUEST_CR0,
            Reg::Cr0Shadow => f::CR0_READ_SHADOW,
            Reg::Cr3 => f::GUEST_CR3,
            Reg::Cr4 => f::GUEST_CR4,
            Reg::Interruptibility => f::GUEST_INTERRUPTIBILITY_STATE,
            Reg::Pdpte(n) => f::GUEST_PDPTE0 + 2 * u32::from(n & 3),
            // Read-only to the policy: CPL follows SS, CS is the guest's.
            Reg::Cpl | Reg::CsBase | Reg::CsAccessRights => return,
        };
        vmwrite(field, value);
    }

    fn read_msr(&mut self, m: Msr) -> u64 {
        match self.vmcs_field(m) {
            Some(field) => vmread(field),
            // SAFETY: the slot is in this VM's lists frame.
            None => self.list_slot(m).map_or(0, |p| unsafe { p.read() }),
        }
    }

    fn write_msr(&mut self, m: Msr, value: u64) {
        match self.vmcs_field(m) {
            Some(field) => vmwrite(field, value),
            None => {
                if let Some(p) = self.list_slot(m) {
                    // SAFETY: the slot is in this VM's lists frame.
                    unsafe { p.write(value) };
                }
            }
        }
    }

    /// RIP moves past the instruction and, with RFLAGS.TF set, a single-step trap is pending.
    /// The interrupt shadow of a preceding STI or MOV SS is left as it is: each VMREAD costs
    /// the exit path several Bochs ticks.
    #[inline(always)]
    fn skip_instruction(&mut self) {
        self.skip_bytes(vmread(f::EXIT_INSTRUCTION_LENGTH));
    }

    #[inline(always)]
    fn skip_bytes(&mut self, len: u64) {
        self.hw.completed = true;
        let rip = vmread(f::GUEST_RIP);
        vmwrite(f::GUEST_RIP, rip + len);
        if vmread(f::GUEST_RFLAGS) & rflags::TF != 0 {
            single_step_trap();
        }
    }

    /// Injects `event` at the next VM entry (SDM 27.6), with `error_code` when it has one;
    /// software events need the instruction length (SDM 27.6.1.1).
    fn inject(&mut self, event: Interruption, error_code: u32) {
        vmwrite(f::ENTRY_INTERRUPTION_INFO, event.entry_info().into());
        if event.has_error_code {
            vmwrite(f::ENTRY_EXCEPTION_ERROR_CODE, error_code.into());
        }
        if event.kind >= Interruption::SOFTWARE_INTERRUPT {
            vmwrite(
                f::ENTRY_INSTRUCTION_LENGTH,
                vmread(f::EXIT_INSTRUCTION_LENGTH),
            );
        }
        self.hw.injected = true;
    }

    fn injecting(&self) -> bool {
        self.hw.injected
    }

    fn instruction_completed(&self) -> bool {
        self.hw.completed
    }

    /// Interrupt-window exiting (primary processor-based control bit 2, SDM 25.6.2): written
    /// only when it changes.
    fn set_interrupt_window(&mut self, on: bool) {
        if self.hw.window != on {
            self.hw.window = on;
            self.write_windows();
        }
    }

    /// NMI-window exiting (bit 22), only with virtual NMIs (SDM 26.2.1.1).
    fn set_nmi_window(&mut self, on: bool) {
        let on = on && self.controls.virtual_nmis;
        if self.hw.nmi_window != on {
            self.hw.nmi_window = on;
            self.write_windows();
        }
    }

    fn phys(&mut self) -> &mut IdentityPhys {
        &mut self.phys
    }

    #[inline(always)]
    fn native_cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        cpuid(leaf, subleaf)
    }

    fn set_xcr0(&mut self, value: u64) {
        self.hw.cpu.xcr0 = value;
        // SAFETY: the policy checked the value against what the CPU supports and boot enabled
        // CR4.OSXSAVE; XCR0 holds the running VM's value (cpu_state.rs).
        unsafe { cpu_state::xsetbv(value) };
    }

    fn write_back_caches(&mut self) {
        // SAFETY: WBINVD only writes back and invalidates caches.
        unsafe { core::arch::asm!("wbinvd", options(nostack)) };
    }

    fn read_cpu_msr(&mut self, index: u32) -> u64 {
        // SAFETY: the policy only passes MSRs the CPU has (CpuPolicy::has_msr); the running
        // VM's switched MSRs live in the CPU (cpu_state.rs).
        unsafe { rdmsr(index) }
    }

    fn write_cpu_msr(&mut self, index: u32, value: u64) {
        // SAFETY: as in `read_cpu_msr`; the value passed the CPU's own checks, so WRMSR cannot
        // fault.
        unsafe { crate::platform::wrmsr(index, value) };
    }

    fn set_cr2(&mut self, value: u64) {
        // SAFETY: CR2 belongs to the guest on the CPU; the hypervisor takes no page faults.
        unsafe { core::arch::asm!("mov cr2, {}", in(reg) value, options(nomem, nostack)) };
    }

    fn tsc(&mut self) -> u64 {
        rdtsc()
    }

    /// With RDTSC exiting the exit policy computes the TSC itself; otherwise the VMCS offset
    /// carries the guest's write, with TSC offsetting turned on for an undilated VM that had
    /// none (or RDTSC exiting, on a CPU without offsetting).
    fn set_tsc_offset(&mut self, offset: u64) {
        let exiting = PrimaryProcBased::RDTSC_EXITING.bits();
        let offsetting = PrimaryProcBased::USE_TSC_OFFSETTING.bits();
        if self.hw.primary & exiting != 0 {
            return;
        }
        if self.hw.primary & offsetting == 0 {
            self.hw.primary |= if self.controls.tsc_offsetting {
                offsetting
            } else {
                exiting
            };
            self.write_windows();
        }
        vmwrite(f::TSC_OFFSET, offset);
    }

    fn set_long_mode(&mut self, active: bool) {
        let bit = u64::from(EntryControls::IA32E_MODE_GUEST.bits());
        let controls = vmread(f::ENTRY_CONTROLS);
        vmwrite(
            f::ENTRY_CONTROLS,
            if active {
                controls | bit
            } else {
                controls & !bit
            },
        );
    }

    /// INVEPT of the VM's EPT drops the combined (linear and guest-physical) translations
    /// tagged with it, which are all the CPU caches for a guest under EPT (SDM 29.4.3.1).
    fn flush_guest_tlb(&mut self) {
        vmx::invept(self.eptp, self.invept_single);
    }

    fn host_interrupt(&mut self, vector: u8) {
        crate::interrupts::acknowledge(vector);
    }

    fn host_nmi(&mut self) {
        crate::interrupts::nmi_exit();
    }
}

/// Splits a VM into what the exit policy works on: its policy state, its memory and its vCPU.
fn parts<'a>(
    vm: &'a mut Vm,
    host: &'a HostVmx,
) -> (&'a mut hv_vm::Vm, &'a GuestMemory, VmxVcpu<'a>) {
    (
        &mut vm.core,
        &vm.phys.memory,
        VmxVcpu {
            hw: &mut vm.hw,
            controls: &host.controls,
            phys: IdentityPhys,
            eptp: vm.phys.eptp,
            invept_single: host.caps.invept_single_context(),
        },
    )
}

/// The least time a guest runs per entry when one of its timers is already due (see run_all).
const MIN_SLICE_US: u64 = 10;

/// The longest the CPU sleeps while every VM waits: typed input is read, and the serial output
/// moves on, between sleeps.
const IDLE_MAX_US: u64 = 10_000;
/// The same while output waits for the UART (a 16-byte FIFO drains in 1.4 ms at 115200 baud).
const IDLE_MAX_US_OUTPUT: u64 = 1_000;

/// Reads what was typed on the host console and hands each `NAME: text` line to that VM's COM1
/// (docs/platform.md, "Serial input").
fn route_input(vms: &mut [Vm], queues: &mut Queues, router: &mut InputRouter) {
    crate::serial::read_input(|byte| {
        router.push(byte, |line| match line {
            InputLine::ForVm { name, text } => {
                let Some((j, vm)) = vms
                    .iter_mut()
                    .enumerate()
                    .find(|(_, v)| v.core.name == name && v.core.state.is_runnable())
                else {
                    log::warn!(target: "hv", "input for \"{name}\", which is not a running VM, dropped");
                    return;
                };
                let now = rdtsc();
                vm.core.input_arrived(now);
                let platform = &mut vm.core.platform;
                let taken = platform.push_input(text, now) + platform.push_input(b"\r", now);
                if taken < text.len() + 1 {
                    log::warn!(target: &vm.core.target, "input: {} of {} bytes did not fit in COM1's receive queue and were dropped",
                        text.len() + 1 - taken, text.len() + 1);
                }
                // Its interrupt may wake it: look at the next decision.
                if vm.core.halted.is_some() {
                    queues.sleepers.set(j, 0);
                }
                queues.place(j, &vm.core);
            }
            InputLine::Unaddressed => {
                log::warn!(target: "hv", "input line without a VM name dropped (type `NAME: text`)");
            }
        });
    });
}

/// What the scheduler keeps between decisions, so that a decision looks only at the VMs that
/// want something (those ready to run, those whose timer is due, those with console lines to
/// send) rather than at every VM: with a hundred VMs asleep, looking at each at every decision
/// would cost more than running the one that works (docs/benchmarks.md).
///
/// A VM's entries change only when the VM runs, wakes, gets input or prints, and when memory
/// pressure pauses or resumes VMs; [`Queues::place`] brings them up to date after each.
struct Queues {
    /// Per VM: [`Queues::MAY_RUN`], [`Queues::OUTPUT`], [`Queues::WAITS_FOR_MEMORY`].
    flags: Vec<u8>,
    ready: RunQueue,
    /// Halted VMs, by when to look whether they woke: their earliest platform timer (after the
    /// dormant timer slack), 0 to look at the next decision (input arrived).
    sleepers: Sleepers,
    /// VMs with console lines queued.
    printing: Vec<usize>,
    /// VMs paused for want of a host frame.
    memory_waiters: usize,
    /// Sleeps of dormant VMs whose timer was deferred to the slack grid.
    deferred_wakes: u64,
}

impl Queues {
    /// `hv_vm::Vm::may_run`.
    const MAY_RUN: u8 = 1;
    /// Console lines wait to be sent.
    const OUTPUT: u8 = 2;
    /// Runnable, but paused until a host frame is free.
    const WAITS_FOR_MEMORY: u8 = 4;

    fn new(vms: &[Vm]) -> Self {
        let n = vms.len();
        let mut q = Queues {
            flags: alloc::vec![0; n],
            ready: RunQueue::new(n),
            sleepers: Sleepers::new(n),
            printing: Vec::new(),
            memory_waiters: 0,
            deferred_wakes: 0,
        };
        for (j, v) in vms.iter().enumerate() {
            q.place(j, &v.core);
        }
        q
    }

    /// Files VM `j` anew after its state changed: in the run queue if it may run, among the
    /// sleepers if it halted, among the printers if it has console lines.
    fn place(&mut self, j: usize, core: &hv_vm::Vm) {
        let old = self.flags[j];
        let runnable = core.state.is_runnable();
        let flag = |on: bool, flag: u8| if on { flag } else { 0 };
        let new = flag(core.may_run(), Self::MAY_RUN)
            | flag(core.has_console_output(), Self::OUTPUT)
            | flag(
                runnable && core.waiting_for_memory.is_some(),
                Self::WAITS_FOR_MEMORY,
            );
        self.flags[j] = new;
        if new & Self::MAY_RUN != 0 {
            self.ready.push(j);
        }
        if runnable && core.halted.is_some() {
            if self.sleepers.at(j) == u64::MAX {
                // It halted (the HLT exit found no interrupt it could take): asleep until its
                // timer, not looked at before.
                self.sleep(j, core);
            }
        } else {
            self.sleepers.set(j, u64::MAX);
        }
        if new & Self::OUTPUT != 0 && old & Self::OUTPUT == 0 {
            self.printing.push(j);
        }
        let waits = |f: u8| usize::from(f & Self::WAITS_FOR_MEMORY != 0);
        self.memory_waiters = self.memory_waiters + waits(new) - waits(old);
    }

    /// Files halted VM `j` among the sleepers at the time its timers call for (after the
    /// dormant timer slack: `hv_vm::Vm::sleep_until`), never if none is armed (only input wakes
    /// it then).
    fn sleep(&mut self, j: usize, core: &hv_vm::Vm) {
        let sleep = core.sleep_until();
        self.deferred_wakes += u64::from(sleep.is_some_and(|s| s.deadline < s.wake));
        self.sleepers.set(j, sleep.map_or(u64::MAX, |s| s.wake));
    }
}

/// Where the host CPU's time went while [`run_all`] ran, in TSC ticks, for the closing
/// `hv: host time:` line: what the scheduler itself costs beside the guests.
#[derive(Default)]
struct HostTime {
    /// In VMX non-root operation: from the VM entry to the VM exit, transitions included.
    guest: u64,
    /// Handling exits within a quantum: decoding, the policy, fault-ins, the checks and timer
    /// setup before the next entry.
    exits: u64,
    /// From picking a VM to its first entry: saving and loading CPU state, the VMCS load, the
    /// checks before the entry (the memory engine's scan step is counted apart).
    switch: u64,
    /// The memory engine's scan steps between quanta.
    scan: u64,
    /// Deciding: input routing, memory pressure, wake-ups, console lines, picking the next VM,
    /// and the accounting after a quantum.
    sched: u64,
    /// Asleep, every VM waiting for an interrupt.
    idle: u64,
    /// Of `sched`: the memory-pressure policy and giving stopped VMs' memory back.
    pressure: u64,
    /// Of `sched`: the idle detector's look, waking sleepers and sending console lines.
    sleepers: u64,
    /// Scheduling decisions that picked a VM.
    decisions: u64,
    /// VM entries.
    entries: u64,
    /// Halted VMs looked at because their timer was due or input arrived, and of those, the
    /// ones that woke.
    wake_checks: u64,
    wakeups: u64,
}

impl HostTime {
    /// Logs the totals so far at `level`, at host TSC `now`, with the sleeps deferred to the
    /// slack grid (`deferred_wakes`, kept by [`Queues`]) (a benchmark takes the difference of
    /// two debug-level snapshots to see one phase of a run).
    fn log(&self, level: log::Level, now: u64, tsc_hz: u64, deferred_wakes: u64) {
        let us = |t: u64| sched::tsc_to_us(t, tsc_hz);
        let per = |t: u64, n: u64| t.checked_div(n).unwrap_or(0);
        log::log!(target: "hv", level,
            "host time: at_tsc={now} guest_us={} exit_us={} switch_us={} scan_us={} sched_us={} \
             idle_us={} pressure_us={} sleepers_us={} decisions={} entries={} \
             sched_tsc_per_decision={} switch_tsc_per_decision={} exit_tsc_per_entry={} \
             wake_checks={} wakeups={} deferred_wakes={}",
            us(self.guest), us(self.exits), us(self.switch), us(self.scan), us(self.sched),
            us(self.idle), us(self.pressure), us(self.sleepers), self.decisions, self.entries,
            per(self.sched, self.decisions), per(self.switch, self.decisions),
            per(self.exits, self.entries), self.wake_checks, self.wakeups, deferred_wakes);
    }
}

/// How often `run_all` logs its host-time totals at debug level.
const HOST_TIME_SNAPSHOT_US: u64 = 1_000_000;

/// Carries out the memory-pressure policy (`hv_vm::pressure`) for this decision: returns
/// whether memory is short, and the index of a VM it stopped (nothing more could be reclaimed
/// and no VM could compute), for the caller to take it out of the engine and free its memory.
fn memory_pressure(
    vms: &mut [Vm],
    any_waiting: bool,
    frames: &FrameAllocator,
    mux: &MemMux,
    policy: &mut PressurePolicy,
) -> (bool, Option<usize>) {
    let free = frames.free_frames();
    let waiting = |v: &Vm| v.core.state.is_runnable() && v.core.waiting_for_memory.is_some();
    // No VM walked at all unless one waits: this runs at every scheduling decision.
    let candidates = if any_waiting { vms.len() } else { 0 };
    let waiters = (0..candidates).filter(|&j| waiting(&vms[j]));
    let frames_of = |j: usize| vms[j].phys.memory.present_frames().count() as u64;
    let can_compute = || vms.iter().any(|v| v.core.may_run() || v.core.must_drain());
    let decision = policy.decide(
        free,
        mux.low_watermark_frames,
        waiters,
        frames_of,
        can_compute,
        mux.rounds(),
    );
    match decision.action {
        Action::None => (decision.pressure, None),
        Action::ResumeAll => {
            for v in vms.iter_mut() {
                v.core.memory_available(free);
            }
            (decision.pressure, None)
        }
        Action::Stop(j) => {
            let core = &mut vms[j].core;
            let gpa = core.waiting_for_memory.take().unwrap_or(0);
            core.fail(format_args!(
                "out of memory: no host frame for its page at {gpa:#x}, and {ROUNDS_BEFORE_STOP} \
                 scan rounds reclaimed none ({free} frames free)"
            ));
            (true, Some(j))
        }
    }
}

/// Runs all VMs round-robin until every one has stopped. With `mux`, the memory engine scans
/// between quanta and resolves the faults on pages it manages.
///
/// A quantum is a host-clock deadline: before every VM entry the preemption timer gets the time
/// left (or less, up to the VM's next platform timer, so that its interrupt is delivered on
/// time), and once the deadline has passed the quantum ends, so the time exits take is the VM's
/// own. A VM halted in HLT is not scheduled until an interrupt wakes it; when every VM waits,
/// the CPU sleeps until the earliest of their timers. The serial output is pumped at every exit
/// and every scheduling decision, and the VMs' queued console lines move into it as room frees
/// up; a VM with more than the limit queued is not scheduled until its queue drains
/// (hv_vm::console), like a process blocked on a slow device.
pub fn run_all(
    vms: &mut [Vm],
    host: &HostVmx,
    frames: &mut FrameAllocator,
    mut mux: Option<&mut MemMux>,
    idle: &hv_manifest::IdleConfig,
) {
    let rate = host.caps.preemption_timer_rate();
    let min_slice = sched::us_to_tsc(MIN_SLICE_US, host.tsc_hz).max(1);
    let invept_single = host.caps.invept_single_context();
    let ctx = ExitContext {
        cpu_policy: &host.cpu_policy,
        multiplexed: mux.is_some(),
    };
    let mut input = InputRouter::default();
    let mut last_on_cpu: Option<usize> = None;
    let start = rdtsc();
    let idle_policy = hv_vm::idle::IdlePolicy::new(idle, host.tsc_hz);
    for vm in vms.iter_mut() {
        vm.core.acct.ready(start);
        vm.core.start_idle_detection(idle_policy, start);
    }
    if idle.detect && idle.timer_slack_us > 0 {
        log::info!(target: "hv", "idle: a dormant VM whose timers are all one-shot gets their \
            interrupts up to {} us late, together with the other dormant VMs", idle.timer_slack_us);
    }
    let mut queues = Queues::new(vms);
    // VMs that stopped and whose memory has not been given back yet.
    let mut unreleased = false;
    let mut due: Vec<usize> = Vec::new();
    // The VM that ran since the memory engine last accounted for the VMs' time.
    let mut ran: Option<usize> = None;
    let mut round: u64 = 0;
    let mut next_idle_tick = start;
    let mut pressure_policy = PressurePolicy::default();
    let mut time = HostTime::default();
    // The end of the last interval charged to `time`.
    let mut mark = start;
    let snapshot_tsc = sched::us_to_tsc(HOST_TIME_SNAPSHOT_US, host.tsc_hz);
    let tsc_per_us = (host.tsc_hz / 1_000_000).max(1);
    // No VM's quantum is ever shorter: the idle detector shrinks none below its floor (or the
    // VM's own quantum when that is shorter), and manifest quanta do not change.
    let min_quantum_tsc = vms
        .iter()
        .map(|v| v.core.quantum_us().min(hv_vm::idle::QUANTUM_FLOOR_US))
        .min()
        .unwrap_or(0)
        .saturating_mul(tsc_per_us);
    let mut next_snapshot = start.saturating_add(snapshot_tsc);
    loop {
        let top = rdtsc();
        route_input(vms, &mut queues, &mut input);
        let mut pressure = false;
        if let Some(mux) = mux.as_deref_mut() {
            let waited = queues.memory_waiters > 0;
            let stopped;
            (pressure, stopped) = memory_pressure(vms, waited, frames, mux, &mut pressure_policy);
            if let Some(j) = stopped {
                mux.remove_vm(vms, frames, j);
                unreleased = true;
            }
            if waited {
                // VMs may have resumed, or one was stopped (a rare path: only while VMs wait).
                for (j, v) in vms.iter().enumerate() {
                    queues.place(j, &v.core);
                }
            }
            if pressure && core::mem::take(&mut unreleased) {
                // The memory of VMs that stopped goes back to the pool when it is wanted (not
                // at once: on a slow CPU giving back a large VM's frames takes a while).
                for v in vms.iter_mut().filter(|v| !v.core.state.is_runnable()) {
                    v.phys.release_memory(frames);
                }
            }
        }
        let now = rdtsc();
        time.pressure += now.wrapping_sub(top);
        // The idle detector judges whole intervals: a look every eighth of one is enough, and
        // keeps its cost out of every scheduling decision.
        if now >= next_idle_tick {
            next_idle_tick = now.saturating_add(idle_policy.interval_tsc / 8);
            if now >= next_snapshot && log::log_enabled!(target: "hv", log::Level::Debug) {
                next_snapshot = now.saturating_add(snapshot_tsc);
                time.log(log::Level::Debug, now, host.tsc_hz, queues.deferred_wakes);
            }
            for vm in vms.iter_mut().filter(|v| v.core.state.is_runnable()) {
                vm.core.idle_tick(now);
            }
        }
        // Wake the sleepers whose timer is due (or that got input), and send what the VMs
        // printed.
        queues.sleepers.take_due(now, &mut due);
        for j in due.drain(..) {
            let core = &mut vms[j].core;
            if !core.state.is_runnable() {
                continue;
            }
            time.wake_checks += 1;
            if core.wake(now) {
                time.wakeups += 1;
                core.acct.ready(now);
                queues.place(j, core);
            } else {
                queues.sleep(j, core);
            }
        }
        let mut k = 0;
        while let Some(&j) = queues.printing.get(k) {
            let core = &mut vms[j].core;
            core.send_console(crate::serial::try_print_line);
            if core.has_console_output() {
                k += 1;
            } else {
                queues.printing.swap_remove(k);
            }
            // Sending may have let a VM blocked on its output run again.
            queues.place(j, core);
        }
        let first_wake = queues.sleepers.first();
        time.sleepers += rdtsc().wrapping_sub(now);
        crate::serial::pump();
        let ready_vms = queues.ready.len() as u64;
        // Whoever has waited less than this cannot be starving (below): most queued VMs, spared
        // computing their own quantum at every pick.
        let starving_floor = min_quantum_tsc.saturating_mul(ready_vms.max(1));
        let flags = &queues.flags;
        let Some(i) = queues.ready.pop(
            |v| flags[v] & Queues::MAY_RUN != 0,
            |v| {
                let core = &vms[v].core;
                // Longer than a whole round of the VMs that want the CPU: round robin alone
                // would have run it by then, so only boosted sleepers can have kept it waiting.
                // (Asked of every queued VM at every decision: integer microseconds times the
                // TSC's whole megahertz is close enough, and cheap.)
                let round = || {
                    let quantum = core.current_quantum_us().saturating_mul(tsc_per_us);
                    quantum.saturating_mul(ready_vms.max(1))
                };
                if core.acct.waited(now, starving_floor) && core.acct.waited(now, round()) {
                    Rank::Starving
                } else {
                    core.wake_rank()
                }
            },
        ) else {
            let alive = || vms.iter().filter(|v| v.core.state.is_runnable());
            if alive().next().is_none() {
                break;
            }
            if pressure && queues.memory_waiters > 0 {
                // Every VM that could run waits for a frame: reclaim.
                if let Some(mux) = mux.as_deref_mut() {
                    let t = rdtsc();
                    time.sched += t.wrapping_sub(mark);
                    mux.maybe_scan(vms, frames, ran.take(), true);
                    mark = rdtsc();
                    time.scan += mark.wrapping_sub(t);
                }
                continue;
            }
            if alive().all(|v| v.core.halted.is_some()) {
                // Every VM waits for an interrupt: sleep until the first timer is due.
                let cap = if crate::serial::output_pending() {
                    IDLE_MAX_US_OUTPUT
                } else {
                    IDLE_MAX_US
                };
                let wake = first_wake.min(now.saturating_add(sched::us_to_tsc(cap, host.tsc_hz)));
                let t = rdtsc();
                time.sched += t.wrapping_sub(mark);
                crate::interrupts::idle_until(wake, host.tsc_hz);
                mark = rdtsc();
                time.idle += mark.wrapping_sub(t);
            } else {
                // Every VM that could run waits for the serial line: let it drain.
                core::hint::spin_loop();
            }
            continue;
        };
        round += 1;
        time.decisions += 1;
        let t = rdtsc();
        time.sched += t.wrapping_sub(mark);
        mark = t;
        crate::interrupts::selftest_round(round);
        if let Some(mux) = mux.as_deref_mut() {
            mux.maybe_scan(vms, frames, ran.take(), pressure);
            let t = rdtsc();
            time.scan += t.wrapping_sub(mark);
            mark = t;
        }
        let mut time_switching = true;
        if last_on_cpu != Some(i) {
            let (out, into) = match last_on_cpu {
                Some(j) if j < i => {
                    let (a, b) = vms.split_at_mut(i);
                    (Some(&mut a[j].hw.cpu), &b[0].hw.cpu)
                }
                Some(j) => {
                    let (a, b) = vms.split_at_mut(j);
                    (Some(&mut b[0].hw.cpu), &a[i].hw.cpu)
                }
                None => (None, &vms[i].hw.cpu),
            };
            cpu_state::switch(out, into, &host.cpu_policy);
            last_on_cpu = Some(i);
        }
        // SAFETY: the VMCS belongs to this VM and was initialised by `init_vmcs`.
        unsafe { vmx::vmptrld(vms[i].vmcs) };
        let quantum = sched::us_to_tsc(vms[i].core.current_quantum_us(), host.tsc_hz);
        let start = rdtsc();
        vms[i].core.acct.schedule_in(start);
        let slice = vms[i].core.acct.next_quantum(quantum);
        let mut deadline = start.saturating_add(slice);
        vms[i].core.picked();
        // A halted VM's timer ends this quantum when it is due, so that the sleeper answers it
        // without waiting for the quantum's end (it runs next: boosted). Dormant VMs' ticks too:
        // deferring them would lose ticks of guests that count them (docs/platform.md).
        // (The VM picked is not asleep: its own wake time is u64::MAX.)
        let others_wake = first_wake;
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
        // The last exit changed only the guest's registers (Next::Reenter) and nothing waits
        // for delivery: enter again without the checks and the timer setup below, at most
        // FAST_REENTRIES times in a row. The preemption timer does not count while the
        // hypervisor handles an exit, so a guest exiting in a tight loop would otherwise run
        // past its quantum on the hypervisor's time; this way the overrun is at most that
        // many exits' handling, which the next quantum pays back (sched::Accounting).
        let mut reenter = false;
        let mut fast_left = 0u32;
        // The run ended by the guest's yield rather than by preemption.
        let mut yielded = false;
        loop {
            if !reenter {
                fast_left = FAST_REENTRIES;
                let now = rdtsc();
                if vms[i].core.must_drain() || (now >= others_wake && entries > 0) {
                    break;
                }
                if now >= deadline && entries > 0 {
                    if !retry_after_fault || retried_late {
                        break;
                    }
                    retried_late = true;
                }
                entries += 1;
                if entries == 1 {
                    // The quantum counts from the first entry: what the hypervisor did since the
                    // VM was picked (the switch, the checks before it) is not the VM's time.
                    // Under a short quantum it could otherwise take all of it.
                    deadline = now.saturating_add(slice);
                }
                retry_after_fault = false;
                crate::serial::pump();
                let vm = &mut vms[i];
                vm.phys.sync(invept_single);
                {
                    let (core, _, mut vcpu) = parts(vm, host);
                    exits::before_entry(core, &mut vcpu, now);
                }
                // The preemption timer stops the guest at the quantum's end or at its next
                // platform timer, whichever comes first; but a timer due now (a periodic timer
                // at its fastest, an expiry whose interrupt the guest cannot take yet) still
                // leaves it MIN_SLICE_US to run, so that it always makes progress (its handler
                // can stop a storm) instead of exiting before its first instruction, entry
                // after entry. Likewise the first entry of a quantum runs MIN_SLICE_US at least:
                // the hypervisor's own work before it (a scan step, switching VMs) can take
                // longer than a short quantum, and the guest must still get somewhere.
                let first = if entries == 1 { now + min_slice } else { 0 };
                let stop = deadline
                    .min(others_wake)
                    .min(vm.core.platform_deadline().max(now + min_slice))
                    .max(first);
                vmwrite(
                    f::PREEMPTION_TIMER_VALUE,
                    sched::preemption_timer_value(stop.saturating_sub(now), rate).into(),
                );
            }
            reenter = false;
            let vm = &mut vms[i];
            let entered = rdtsc();
            let prep = entered.wrapping_sub(mark);
            if time_switching {
                time.switch += prep;
                time_switching = false;
            } else {
                time.exits += prep;
            }
            time.entries += 1;
            // SAFETY: the VM's VMCS is current with complete host state; regs is the VM's own.
            let failed = unsafe { vmx::run_guest(&mut vm.hw.regs, u64::from(vm.launched)) };
            mark = rdtsc();
            time.guest += mark.wrapping_sub(entered);
            if failed != 0 {
                let err = vmread(f::VM_INSTRUCTION_ERROR);
                vm.core
                    .fail(format_args!("VM entry failed: VM-instruction error {err}"));
                break;
            }
            vm.launched = true;
            // The CPU clears the valid bit of the entry's event on every VM exit.
            vm.hw.injected = false;
            vm.hw.completed = false;
            let raw_reason = vmread(f::EXIT_REASON) as u32;
            let mut next = if raw_reason == u32::from(reason::CPUID) {
                // The most frequent exit, straight to its handler: nothing to decode.
                let (core, _, mut vcpu) = parts(vm, host);
                exits::handle_cpuid(core, &mut vcpu, &ctx)
            } else {
                let exit = VmExit::decode(raw_reason, vmread);
                // Instruction exits never interrupt a delivery: spare them the call.
                let interrupted = if exit.may_interrupt_delivery() {
                    exit.interrupted_event(vmread)
                } else {
                    None
                };
                let (core, memory, mut vcpu) = parts(vm, host);
                exits::handle(core, memory, &mut vcpu, &ctx, exit, interrupted)
            };
            if let (Some(mux), Next::Resume | Next::Reenter | Next::Reschedule | Next::Halt) =
                (mux.as_deref_mut(), &next)
            {
                mux.progressed();
            }
            // A fault on a page the engine holds: resolve it, then go on where the VM was (the
            // faulting instruction runs again; a hypercall is handled again).
            while let Next::GuestFault { gpa, write } | Next::HypercallFault { gpa, write } = next {
                let Some(mux) = mux.as_deref_mut() else {
                    break; // the policy only asks for faults when the engine runs
                };
                let hypercall = matches!(next, Next::HypercallFault { .. });
                match mux.fault(vms, frames, i, gpa, write, hypercall) {
                    Ok(()) => {}
                    // The access is retried when it resumes (RIP still points at it).
                    Err(e) if e.out_of_frames() => {
                        vms[i].core.wait_for_memory(gpa);
                        next = Next::Halt;
                        break;
                    }
                    Err(e) => {
                        vms[i].core.fail(format_args!(
                            "memory engine could not fault in gpa={gpa:#x} ({}): {e}",
                            if write { "write" } else { "read" }
                        ));
                        next = Next::Stopped;
                        break;
                    }
                }
                next = match next {
                    Next::HypercallFault { .. } => {
                        let (core, memory, mut vcpu) = parts(&mut vms[i], host);
                        exits::handle_vmcall(core, memory, &mut vcpu)
                    }
                    _ => {
                        retry_after_fault = true;
                        Next::Resume
                    }
                };
            }
            match next {
                Next::Reenter if fast_left > 0 && !vms[i].core.platform.interrupt_waiting() => {
                    fast_left -= 1;
                    reenter = true;
                }
                Next::Resume | Next::Reenter => continue,
                Next::Reschedule => {
                    yielded = true;
                    break;
                }
                Next::Halt | Next::Stopped => break,
                Next::GuestFault { .. } | Next::HypercallFault { .. } => {
                    vms[i]
                        .core
                        .fail(format_args!("memory fault without a memory engine"));
                    break;
                }
            }
        }
        let end = rdtsc();
        time.exits += end.wrapping_sub(mark);
        mark = end;
        let core = &mut vms[i].core;
        let ready =
            core.state.is_runnable() && core.halted.is_none() && core.waiting_for_memory.is_none();
        core.acct.schedule_out(end, deadline, host.tsc_hz, ready);
        let how = if !ready || yielded {
            RunEnd::GaveBack
        } else if end >= deadline {
            RunEnd::QuantumOver
        } else {
            RunEnd::CutShort
        };
        core.run_ended(core.acct.last_run_tsc, how, end);
        queues.place(i, core);
        ran = Some(i);
        if !core.state.is_runnable() {
            unreleased = true;
            core.acct.stop(end);
            if let Some(mux) = mux.as_deref_mut() {
                mux.remove_vm(vms, frames, i);
            }
        }
    }
    let end = rdtsc();
    time.sched += end.wrapping_sub(mark);
    time.log(log::Level::Info, end, host.tsc_hz, queues.deferred_wakes);
    for vm in vms.iter_mut() {
        vm.core
            .drain_console(|line| crate::serial::print(format_args!("{line}")));
    }
}
