//! The hypervisor kernel: boots from GRUB (Multiboot2), reads the boot manifest, creates the VMs
//! it declares and runs them under VT-x with EPT until they have all stopped.
//!
//! Flow: `boot.rs` (32-bit entry, long mode) -> [`kmain`]: serial log, descriptor tables, boot
//! information, frame allocator and heap, CPU and ACPI facts, TSC calibration, VMX checks and
//! VMXON, manifest, VM creation, round-robin run loop ([`vm::run_all`]), statistics, shutdown.
//! See docs/architecture.md.
#![no_std]
#![no_main]

extern crate alloc;

mod acpi_tables;
mod arch;
mod boot;
mod cpu_state;
mod guest_phys;
mod host_clock;
mod interrupts;
mod memmux;
mod platform;
mod serial;
mod vm;
mod vmx;

use alloc::{string::String, vec::Vec};
use core::ops::Range;
use core::sync::atomic::Ordering;

use hv_vm::frames::FrameAllocator;
use linked_list_allocator::LockedHeap;
use multiboot2::{BootInformation, BootInformationHeader, MemoryAreaType};

const MULTIBOOT2_MAGIC: u32 = 0x36d7_6289;
/// Most memory-map areas and boot-time reserved ranges considered (fixed arrays: the heap is
/// placed before it exists).
const MAX_RANGES: usize = 64;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    serial::emergency_print(format_args!("\n[PANIC] {info}\n"));
    platform::shutdown()
}

/// Command-line settings of the hypervisor (`multiboot2 /boot/hypervisor.elf KEY=VALUE ...`).
fn apply_cmdline(cmdline: &str) {
    for word in cmdline.split_whitespace() {
        match word.split_once('=') {
            Some(("log", level)) => match level.parse::<log::LevelFilter>() {
                Ok(l) => log::set_max_level(l),
                Err(_) => log::warn!(target: "hv", "ignoring unknown log level \"{level}\""),
            },
            Some(("exit", "emulator")) => platform::EXIT_EMULATOR.store(true, Ordering::Relaxed),
            Some(("exit", "halt")) => platform::EXIT_EMULATOR.store(false, Ordering::Relaxed),
            Some(("selftest", "interrupts")) => interrupts::SELFTEST.store(true, Ordering::Relaxed),
            Some(("tsc", "exiting")) => vm::PREFER_TSC_SCALING.store(false, Ordering::Relaxed),
            Some(("tsc", "scaling")) => vm::PREFER_TSC_SCALING.store(true, Ordering::Relaxed),
            _ => log::warn!(target: "hv", "ignoring unknown command-line word \"{word}\""),
        }
    }
}

/// Entered from `boot.rs` in 64-bit mode on the boot stack.
#[no_mangle]
extern "C" fn kmain(magic: u32, info_addr: u32) -> ! {
    serial::init();
    arch::init();
    interrupts::remap_and_mask_pic();
    if magic != MULTIBOOT2_MAGIC {
        log::error!(target: "hv", "not started by a Multiboot2 loader (magic {magic:#x})");
        platform::halt_forever();
    }
    // SAFETY: GRUB passed this address with the Multiboot2 magic; the structure is in memory
    // we never hand out (reserved below) and identity-mapped.
    let mbi = match unsafe { BootInformation::load(info_addr as *const BootInformationHeader) } {
        Ok(m) => m,
        Err(e) => {
            log::error!(target: "hv", "bad Multiboot2 boot information: {e:?}");
            platform::halt_forever();
        }
    };
    let cmdline = mbi
        .command_line_tag()
        .and_then(|t| t.cmdline().ok())
        .unwrap_or("");
    apply_cmdline(cmdline);

    let mut available: [Range<u64>; MAX_RANGES] = core::array::from_fn(|_| 0..0);
    let mut reserved: [Range<u64>; MAX_RANGES] = core::array::from_fn(|_| 0..0);
    let available = available_ram(&mbi, &mut available);
    let reserved = boot_reserved(&mbi, &mut reserved);
    let heap = place_heap(available, reserved);
    // SAFETY: `place_heap` chose RAM from the memory map, below the identity-mapped limit, that
    // holds nothing (outside the kernel, the boot information and the modules); the frame
    // allocator below leaves it out, so only the allocator ever uses it. Initialised once.
    unsafe {
        HEAP.lock()
            .init(heap.start as *mut u8, (heap.end - heap.start) as usize)
    };

    // Frames are touched through the identity map: map RAM above 4 GiB first.
    let ram_end = available.iter().map(|r| r.end).max().unwrap_or(0);
    let mapped = boot::extend_identity_map(ram_end);
    let mut frames = FrameAllocator::new(
        available,
        &[reserved, core::slice::from_ref(&heap)].concat(),
        mapped,
    );
    if mapped > boot::BOOT_IDENTITY_MAPPED {
        log::info!(target: "hv", "RAM above 4 GiB: identity-mapped up to {} MiB", mapped >> 20);
    }
    if ram_end > mapped {
        log::warn!(target: "hv", "RAM above {} GiB is not used (the identity map ends there)", mapped >> 30);
    }
    log::info!(target: "hv", "muxvisor {} booting; command line \"{cmdline}\"; heap {} MiB at {:#x}; {} MiB free for VMs",
        env!("CARGO_PKG_VERSION"), (heap.end - heap.start) >> 20, heap.start, frames.free_bytes() >> 20);
    report_cpu_and_acpi(&mbi);
    let cpu_policy = hv_vm::policy::CpuPolicy::from_host(platform::cpuid);
    // Let the VMs use SSE and, where the CPU has XSAVE, AVX and AVX-512: the host never does
    // (soft-float target), but switching VMs saves and restores that state (cpu_state.rs), which
    // needs CR4.OSFXSR and CR4.OSXSAVE with every offered component enabled in XCR0.
    // SAFETY: setting CR4.OSFXSR/OSXMMEXCPT/OSXSAVE only enables instructions; OSXSAVE only when
    // CPUID reports XSAVE (xcr0_allowed != 0), and XCR0 then gets components the CPU supports
    // (CpuPolicy::from_host), x87 and SSE included. IA32_XSS exists when CPUID reports XSAVES.
    unsafe {
        let mut cr4: u64;
        core::arch::asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
        cr4 |= (1 << 9) | (1 << 10);
        if cpu_policy.xcr0_allowed != 0 {
            cr4 |= hv_vm::policy::CR4_OSXSAVE;
        }
        core::arch::asm!("mov cr4, {}", in(reg) cr4, options(nomem, nostack));
        if cpu_policy.xcr0_allowed != 0 {
            cpu_state::xsetbv(cpu_policy.xcr0_allowed);
        }
        // Guests may execute XSAVES/XRSTORS (the secondary control is on so that they do not
        // #UD), which act on XCR0 | IA32_XSS: with a supervisor component left enabled by the
        // firmware, a guest could save or load host state through them. The hypervisor uses
        // none, and guests may only write 0 to their (emulated) XSS.
        if cpu_policy.xcr0_allowed != 0 && platform::cpuid(0xd, 1)[0] & (1 << 3) != 0 {
            platform::wrmsr(0xda0, 0);
        }
    }
    log::info!(target: "hv", "guest FPU state: XCR0 components {:#x}, XSAVE area {} bytes{}",
        cpu_policy.xcr0_allowed, cpu_policy.xsave_size,
        if cpu_policy.xcr0_allowed == 0 { " (no XSAVE: FXSAVE)" } else { "" });

    let host = match start_vmx(&mut frames, cpu_policy) {
        Ok(h) => {
            let guest = h.cpu_policy.cpuid(0, 0, platform::cpuid(0, 0), 0)[0];
            log::info!(target: "hv", "guest CPUID: basic leaves to {guest:#x} (the CPU's to {:#x}); \
                leaves 0x15/0x16 give the TSC as {} kHz", cpu_policy.max_basic_leaf, h.cpu_policy.tsc_khz);
            h
        }
        Err(e) => {
            log::error!(target: "hv", "VT-x not available: {e}");
            log::info!(target: "hv", "halting");
            platform::shutdown();
        }
    };

    // The MMIO instruction decoder builds its tables on first use: here, not in a guest's time.
    let t = platform::rdtsc();
    let decoder_ok = hv_vm::mmio::warm_up();
    log::info!(target: "hv", "MMIO instruction decoder ready{} in {} us",
        if decoder_ok { "" } else { " (its self-check FAILED)" },
        hv_vm::sched::tsc_to_us(platform::rdtsc() - t, host.tsc_hz));
    let (mut vms, memory, idle, on_demand) = create_vms(&mbi, &host, &mut frames);
    if vms.is_empty() {
        log::error!(target: "hv", "no VMs to run");
        platform::shutdown();
    }
    // Its own statement: the heap's lock guard must be gone before the engine allocates.
    let heap_free = HEAP.lock().free();
    let mut mux = if on_demand {
        memmux::MemMux::new(
            &memory,
            &idle,
            &mut vms,
            &mut frames,
            host.tsc_hz,
            host.controls.ept_ad,
            heap_free,
        )
    } else {
        None
    };
    log::info!(target: "hv", "{} VMs created; running them round-robin", vms.len());
    if interrupts::SELFTEST.load(Ordering::Relaxed) {
        interrupts::start_selftest();
    }
    vm::run_all(&mut vms, &host, &mut frames, mux.as_mut(), &idle);
    interrupts::finish(host.tsc_hz);

    // How the VMs ended: "N exited", then the other ends that occurred, then "N failed".
    let mut ends = [
        ("exited", 0),
        ("powered off", 0),
        ("halted", 0),
        ("rebooted", 0),
    ];
    let now = platform::rdtsc();
    for v in &mut vms {
        v.core.update_idle_stats(now);
        println!("[INFO] stats {}", v.core.stats_line(now, host.tsc_hz));
        let end = match v.core.state {
            hv_vm::sched::VmState::Exited(_) => 0,
            hv_vm::sched::VmState::PoweredOff => 1,
            hv_vm::sched::VmState::Halted => 2,
            hv_vm::sched::VmState::Rebooted => 3,
            _ => continue,
        };
        ends[end].1 += 1;
    }
    if let Some(mux) = &mux {
        mux.report(&vms, vms.iter().map(|v| v.core.acct.stats.cpu_tsc).sum());
    }
    let ended: usize = ends.iter().map(|(_, n)| n).sum();
    let mut summary = String::new();
    for (i, (what, n)) in ends.iter().enumerate() {
        if i == 0 || *n > 0 {
            summary.push_str(&alloc::format!("{n} {what}, "));
        }
    }
    log::info!(target: "hv", "all VMs stopped: {summary}{} failed", vms.len() - ended);
    for v in vms {
        v.release(&mut frames);
    }
    platform::shutdown()
}

/// The RAM areas of the memory map, into `out` (at most [`MAX_RANGES`]).
fn available_ram<'a>(mbi: &BootInformation, out: &'a mut [Range<u64>]) -> &'a [Range<u64>] {
    let mut n = 0;
    if let Some(map) = mbi.memory_map_tag() {
        for area in map.memory_areas() {
            if MemoryAreaType::from(area.typ()) == MemoryAreaType::Available && n < out.len() {
                out[n] = area.start_address()..area.end_address();
                n += 1;
            }
        }
    }
    &out[..n]
}

/// What boot left in RAM that must not be handed out, into `out`: the low 1 MiB, the kernel
/// image, the boot information and the modules.
fn boot_reserved<'a>(mbi: &BootInformation, out: &'a mut [Range<u64>]) -> &'a [Range<u64>] {
    // Only the addresses of the linker symbols are taken.
    let kernel = (&raw const __kernel_start) as u64..(&raw const __kernel_end) as u64;
    let fixed = [
        0..0x10_0000, // real-mode area, BIOS data, ROMs
        kernel,
        mbi.start_address() as u64..mbi.end_address() as u64,
    ];
    let mut n = 0;
    for r in fixed.into_iter().chain(
        mbi.module_tags()
            .map(|m| u64::from(m.start_address())..u64::from(m.end_address())),
    ) {
        if n == out.len() {
            log::error!(target: "hv", "more than {MAX_RANGES} boot modules and reserved ranges");
            platform::halt_forever();
        }
        out[n] = r;
        n += 1;
    }
    &out[..n]
}

/// The heap's place: a sixteenth of RAM (`heap_bytes_for`), as high as it fits below 4 GiB
/// (what the boot page tables map: the heap holds the directories that map the rest); if that
/// much does not fit there, the 16 MiB minimum.
fn place_heap(available: &[Range<u64>], reserved: &[Range<u64>]) -> Range<u64> {
    let ram: u64 = available
        .iter()
        .map(|r| r.end.min(boot::MAX_IDENTITY_MAPPED).saturating_sub(r.start))
        .sum();
    let wanted = hv_vm::frames::heap_bytes_for(ram);
    let minimum = hv_vm::frames::heap_bytes_for(0);
    for size in [wanted, minimum] {
        if let Some(heap) = hv_vm::frames::place_region(
            available,
            reserved,
            size,
            2 << 20,
            boot::BOOT_IDENTITY_MAPPED,
        ) {
            return heap;
        }
    }
    log::error!(target: "hv", "no room for a {} MiB heap in the memory map", minimum >> 20);
    platform::halt_forever();
}

fn report_cpu_and_acpi(mbi: &BootInformation) {
    let cpuid = raw_cpuid::CpuId::new();
    let vendor = cpuid.get_vendor_info();
    let brand = cpuid.get_processor_brand_string();
    log::info!(target: "hv", "CPU: {} \"{}\"",
        vendor.as_ref().map_or("unknown", |v| v.as_str()),
        brand.as_ref().map_or("", |b| b.as_str().trim()));
    let rsdp = mbi
        .rsdp_v2_tag()
        .map(|t| t as *const _ as *const u8 as usize + 8)
        .or_else(|| {
            mbi.rsdp_v1_tag()
                .map(|t| t as *const _ as *const u8 as usize + 8)
        });
    match rsdp.map(acpi_tables::read_madt) {
        Some(Ok(m)) => {
            log::info!(target: "hv", "ACPI MADT: {} processors ({} enabled), {} I/O APICs, local APIC at {:#x}",
            m.processors, m.enabled_processors, m.io_apics, m.local_apic_address)
        }
        Some(Err(e)) => log::warn!(target: "hv", "ACPI tables unreadable: {e:?}"),
        None => log::warn!(target: "hv", "no ACPI RSDP from the bootloader"),
    }
}

fn alloc_filled(frames: &mut FrameAllocator, byte: u8) -> Option<u64> {
    let frame = frames.alloc()?;
    // SAFETY: a fresh 4 KiB frame from the allocator, identity-mapped and ours.
    unsafe { core::ptr::write_bytes(frame as *mut u8, byte, 4096) };
    Some(frame)
}

fn start_vmx(
    frames: &mut FrameAllocator,
    cpu_policy: hv_vm::policy::CpuPolicy,
) -> Result<vm::HostVmx, vmx::VmxUnavailable> {
    if !vmx::cpu_has_vmx() {
        return Err(vmx::VmxUnavailable::NotIntelVmx);
    }
    let caps = vmx::read_capabilities();
    let controls =
        hv_vmx::controls::VmcsControls::negotiate(&caps).map_err(vmx::VmxUnavailable::Unusable)?;
    log::info!(target: "hv", "VMX: EPT yes (A/D bits {}), VPID {}, unrestricted guest {}, TSC scaling {}, preemption timer rate 2^{}",
        yes(controls.ept_ad), yes(controls.vpid), yes(caps.unrestricted_guest()), yes(caps.tsc_scaling()),
        caps.preemption_timer_rate());
    log::debug!(target: "hv", "VMX controls: pin {:#x} proc {:#x} proc2 {:#x} exit {:#x} entry {:#x}",
        controls.pin, controls.primary, controls.secondary, controls.exit, controls.entry);
    let oom = vmx::VmxUnavailable::VmxonFailed;
    let region = alloc_filled(frames, 0).ok_or(oom)?;
    vmx::enable(&caps, region)?;
    // In whole kHz: what CPUID leaf 0x4000_0010 tells guests (in kHz) must be the exact rate
    // their devices count at against the TSC, or a guest that converts TSC ticks with it finds
    // its timers off by up to the calibration's sub-kHz part (109 ppm once under Bochs).
    let tsc_hz = platform::calibrate_tsc_hz() / 1000 * 1000;
    log::info!(target: "hv", "VMXON done; TSC {} kHz", tsc_hz / 1000);
    let (msr_bitmap, io_bitmap_a, io_bitmap_b) = match (
        alloc_filled(frames, 0xff),
        alloc_filled(frames, 0xff),
        alloc_filled(frames, 0xff),
    ) {
        (Some(a), Some(b), Some(c)) => (a, b, c),
        _ => return Err(vmx::VmxUnavailable::VmxonFailed),
    };
    let boot_time = host_clock::now().unwrap_or_else(|| {
        log::warn!(target: "hv", "the host's RTC reads as no valid date: VMs' clocks start at 2000-01-01");
        hv_platform::rtc::DateTime {
            year: 2000,
            month: 1,
            day: 1,
            hour: 0,
            minute: 0,
            second: 0,
        }
    });
    Ok(vm::HostVmx {
        boot_time,
        caps,
        controls,
        cpu_policy: cpu_policy.with_tsc_hz(tsc_hz),
        tsc_hz,
        prefer_tsc_scaling: vm::PREFER_TSC_SCALING.load(Ordering::Relaxed),
        msr_bitmap,
        io_bitmap_a,
        io_bitmap_b,
    })
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn module_bytes(m: &multiboot2::ModuleTag) -> &'static [u8] {
    // SAFETY: GRUB loaded the module at start..end; that memory is reserved from the frame
    // allocator, identity-mapped, and never written.
    unsafe {
        core::slice::from_raw_parts(
            m.start_address() as usize as *const u8,
            m.module_size() as usize,
        )
    }
}

/// Builds the VMs of the manifest; also returns its `[memory]` and `[idle]` settings, and
/// whether the VMs' memory is allocated on demand: when multiplexing is asked for and the
/// engine's metadata for all of it fits on the heap, since the engine must then run.
fn create_vms(
    mbi: &BootInformation,
    host: &vm::HostVmx,
    frames: &mut FrameAllocator,
) -> (
    Vec<vm::Vm>,
    hv_manifest::MemoryConfig,
    hv_manifest::IdleConfig,
    bool,
) {
    let mut images: Vec<(String, &'static [u8])> = Vec::new();
    let mut manifest: Option<&'static [u8]> = None;
    for m in mbi.module_tags() {
        let name = m.cmdline().unwrap_or("").trim();
        let name = name.rsplit('/').next().unwrap_or(name);
        if name == "manifest" {
            manifest = Some(module_bytes(m));
        } else {
            images.push((String::from(name), module_bytes(m)));
        }
    }
    let Some(text) = manifest else {
        log::error!(target: "manifest", "no module named \"manifest\" (add `module2 /boot/manifest.toml manifest` to the GRUB entry)");
        return (Vec::new(), Default::default(), Default::default(), false);
    };
    let names: Vec<&str> = images.iter().map(|(n, _)| n.as_str()).collect();
    let limits = hv_manifest::HostLimits {
        images: Some(&names),
        memory_bytes: Some(frames.free_bytes()),
    };
    let manifest = match hv_manifest::parse_bytes(text, &limits) {
        Ok(m) => m,
        Err(e) => {
            log::error!(target: "manifest", "{e}");
            return (Vec::new(), Default::default(), Default::default(), false);
        }
    };
    for e in &manifest.errors {
        log::error!(target: "manifest", "{e}");
    }
    let declared: u64 = manifest.vms.iter().map(|c| c.memory_bytes()).sum();
    let free = frames.free_bytes();
    let on_demand = manifest.memory.multiplex && {
        let heap_free = HEAP.lock().free();
        memmux::MemMux::admits(declared / 4096, heap_free)
    };
    log::info!(target: "hv", "guest memory: {} MiB declared by {} VMs against {} MiB free for VMs{}",
        declared >> 20, manifest.vms.len(), free >> 20,
        if on_demand { " (allocated on demand: a page gets a frame on its first write)" } else { "" });
    let mut vms = Vec::new();
    for config in &manifest.vms {
        // The manifest checked that every name is a boot module.
        let find = |name: &str| {
            images
                .iter()
                .find(|(n, _)| n == name)
                .map_or(&[][..], |(_, b)| *b)
        };
        let image = find(&config.image);
        // A Linux kernel's one module is its initrd.
        let modules: Vec<(&str, &[u8])> = config
            .modules
            .iter()
            .chain(config.initrd.iter())
            .map(|m| (m.as_str(), find(m)))
            .collect();
        match vm::Vm::create(
            vms.len() as u32,
            config,
            image,
            &modules,
            host,
            frames,
            on_demand,
        ) {
            Ok(v) => vms.push(v),
            Err(e) => log::error!(target: "hv", "vm \"{}\" not started: {e}", config.name),
        }
    }
    (vms, manifest.memory, manifest.idle, on_demand)
}
