//! `multiboot`: a Multiboot (version 1) kernel, as GRUB, QEMU's `-kernel` and muxvisor boot
//! them (hv_vm::multiboot). It starts in 32-bit protected mode with paging off, checks what the
//! specification promises there (EAX magic, flat segments), turns on long mode itself (PAE page
//! tables, EFER.LME, CR0.PG: the switch muxvisor emulates in hv_vm::cpu_mode), then in 64-bit
//! mode checks the boot information (memory sizes, memory map, command line, modules) and ends
//! through the test-exit device (manifest `debug_exit`) with the number of failed checks.
//!
//! Command line (after the image name the hypervisor puts first): `memory_mib=N` (the VM's
//! memory, to check the memory information against) and `module_magic=HEX` (the first four
//! bytes of the one module, little-endian).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(not(target_os = "none"))]
fn main() {
    panic!("multiboot is a guest image for x86_64-unknown-none; run it under the hypervisor");
}

#[cfg(target_os = "none")]
mod kernel {
    use test_guests::cmdline::Cmdline;
    use test_guests::{cpu, println, rt};

    /// What EAX holds at entry (Multiboot specification 3.2).
    const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
    /// The test-exit device's port (manifest `debug_exit_port`, default).
    const TEST_EXIT_PORT: u16 = 0xf4;

    // The header (section 3.1.1): magic, flags (page-aligned modules, memory information),
    // checksum. Its own section comes first in .text (link.ld), well inside the first 8 KiB.
    //
    // Then the 32-bit entry: save EAX/EBX, a stack, identity-map the first GiB with 2 MiB
    // pages, PAE, EFER.LME, CR0.PG (long mode, compatibility), a 64-bit GDT and a far return
    // into 64-bit code. CR0 is written without NE, which a VMX guest cannot clear for real:
    // the guest must still read back what it wrote.
    core::arch::global_asm!(
        ".pushsection .text._start, \"ax\", %progbits",
        ".balign 4",
        "mb_header:",
        ".long 0x1BADB002",
        ".long 0x3",
        ".long -(0x1BADB002 + 0x3)",
        ".code32",
        ".globl _start",
        "_start:",
        "    mov [{magic}], eax",
        "    mov [{info}], ebx",
        // Paging is off and CS is a flat 32-bit code segment (D=1): record CR0 and CS.
        "    mov eax, cr0",
        "    mov [{cr0_entry}], eax",
        "    mov ax, cs",
        "    mov [{cs_entry}], ax",
        "    mov esp, offset {stack} + 16384",
        // PD: 512 entries of 2 MiB (present, writable, PS).
        "    mov edi, offset {pd}",
        "    mov eax, 0x83",
        "    mov ecx, 512",
        "2:  mov [edi], eax",
        "    add eax, 0x200000",
        "    add edi, 8",
        "    loop 2b",
        "    mov eax, offset {pd}",
        "    or eax, 3",
        "    mov [{pdpt}], eax",
        "    mov eax, offset {pdpt}",
        "    or eax, 3",
        "    mov [{pml4}], eax",
        "    mov eax, offset {pml4}",
        "    mov cr3, eax",
        "    mov eax, cr4",
        "    or eax, 0x20",           // PAE
        "    mov cr4, eax",
        "    mov ecx, 0xC0000080",    // IA32_EFER
        "    rdmsr",
        "    or eax, 0x100",          // LME
        "    wrmsr",
        "    mov eax, 0x80010001",    // PG | WP | PE, NE clear
        "    mov cr0, eax",
        "    mov eax, cr0",
        "    mov [{cr0_paged}], eax",
        "    lgdt [mb_gdtr]",
        "    push 0x08",
        "    mov eax, offset {start64}",
        "    push eax",
        "    retf",
        ".code64",
        ".balign 8",
        "mb_gdt:",
        ".quad 0",
        ".quad 0x00af9b000000ffff",   // 64-bit code
        ".quad 0x00cf93000000ffff",   // data
        "mb_gdtr:",
        ".short 23",
        ".quad mb_gdt",
        ".popsection",
        magic = sym ENTRY_EAX,
        info = sym ENTRY_EBX,
        cr0_entry = sym CR0_AT_ENTRY,
        cs_entry = sym CS_AT_ENTRY,
        cr0_paged = sym CR0_PAGED,
        stack = sym STACK,
        pd = sym PD,
        pdpt = sym PDPT,
        pml4 = sym PML4,
        start64 = sym start64,
    );

    #[repr(C, align(4096))]
    struct Table([u64; 512]);

    #[no_mangle]
    static mut PML4: Table = Table([0; 512]);
    #[no_mangle]
    static mut PDPT: Table = Table([0; 512]);
    #[no_mangle]
    static mut PD: Table = Table([0; 512]);
    #[no_mangle]
    static mut ENTRY_EAX: u32 = 0;
    #[no_mangle]
    static mut ENTRY_EBX: u32 = 0;
    #[no_mangle]
    static mut CR0_AT_ENTRY: u32 = 0;
    #[no_mangle]
    static mut CS_AT_ENTRY: u16 = 0;
    #[no_mangle]
    static mut CR0_PAGED: u32 = 0;

    #[repr(C, align(16))]
    struct Stack([u8; 16384]);
    #[no_mangle]
    static mut STACK: Stack = Stack([0; 16384]);

    /// 64-bit code, from the far return: data segments, then Rust.
    #[unsafe(naked)]
    unsafe extern "C" fn start64() -> ! {
        core::arch::naked_asm!(
            "mov ax, 0x10",
            "mov ds, ax",
            "mov es, ax",
            "mov ss, ax",
            "and rsp, -16",
            "call {main}",
            "ud2",
            main = sym mb_main,
        )
    }

    /// Multiboot information fields used here (section 3.3).
    struct Info {
        flags: u32,
        mem_lower: u32,
        mem_upper: u32,
        cmdline: u32,
        mods_count: u32,
        mods_addr: u32,
        mmap_length: u32,
        mmap_addr: u32,
        loader_name: u32,
    }

    /// # Safety
    /// `addr` must point at readable memory (identity-mapped below 1 GiB) for `len` bytes.
    unsafe fn bytes(addr: u64, len: usize) -> &'static [u8] {
        // SAFETY: the caller's promise.
        unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    }

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from(u32_at(b, o)) | (u64::from(u32_at(b, o + 4)) << 32)
    }

    /// A NUL-terminated string at `addr` (at most 4 KiB).
    fn c_str(addr: u32) -> &'static str {
        // SAFETY: the boot information lies in the VM's memory, identity-mapped.
        let b = unsafe { bytes(addr.into(), 4096) };
        let end = b.iter().position(|&c| c == 0).unwrap_or(0);
        core::str::from_utf8(&b[..end]).unwrap_or("<not UTF-8>")
    }

    extern "C" fn mb_main() -> ! {
        let mut failed = 0u64;
        let mut check = |ok: bool, what: &str| {
            println!("{}: {what}", if ok { "ok" } else { "FAILED" });
            if !ok {
                failed += 1;
            }
        };
        // SAFETY: written once by the 32-bit entry, before this runs; single-threaded.
        let (magic, info_addr, cr0_entry, cs_entry, cr0_paged) =
            unsafe { (ENTRY_EAX, ENTRY_EBX, CR0_AT_ENTRY, CS_AT_ENTRY, CR0_PAGED) };
        check(magic == BOOTLOADER_MAGIC, "EAX holds the boot loader magic");
        check(
            cr0_entry & 1 == 1 && cr0_entry >> 31 == 0,
            "entered in protected mode with paging off",
        );
        check(cs_entry == 0x08, "CS is selector 0x08");
        check(
            cr0_paged == 0x8001_0011,
            "CR0 reads back as written (PG, WP, PE; NE clear) with ET, which is hardwired",
        );
        let efer = rdmsr(0xC000_0080);
        check(
            efer & (1 << 10) != 0,
            "EFER.LMA is set: long mode is active",
        );
        rt::report("mb_cr0_entry", cr0_entry.into());
        rt::report("mb_cr0", cr0_paged.into());
        rt::report("mb_efer", efer);

        // SAFETY: the boot information (88 bytes) is in the VM's memory.
        let raw = unsafe { bytes(info_addr.into(), 88) };
        let info = Info {
            flags: u32_at(raw, 0),
            mem_lower: u32_at(raw, 4),
            mem_upper: u32_at(raw, 8),
            cmdline: u32_at(raw, 16),
            mods_count: u32_at(raw, 20),
            mods_addr: u32_at(raw, 24),
            mmap_length: u32_at(raw, 44),
            mmap_addr: u32_at(raw, 48),
            loader_name: u32_at(raw, 64),
        };
        let wanted = 1 | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9);
        check(
            info.flags & wanted == wanted,
            "memory, cmdline, mods, mmap, loader name given",
        );
        let cmdline = c_str(info.cmdline);
        println!("command line: {cmdline}");
        println!("boot loader: {}", c_str(info.loader_name));
        check(
            cmdline.split(' ').next() == Some("multiboot"),
            "the command line starts with the image's name",
        );
        let args = Cmdline::new(cmdline.split_once(' ').map_or("", |(_, rest)| rest));
        let memory_mib = args.u64("memory_mib").ok().flatten().unwrap_or(0);
        check(info.mem_lower == 639, "mem_lower is 639 KiB");
        rt::report("mb_mem_upper_kib", info.mem_upper.into());
        check(
            u64::from(info.mem_upper) + 1024 == memory_mib * 1024,
            "mem_upper is the VM's memory above 1 MiB",
        );

        // The memory map: RAM entries add up to the VM's memory less the PC's holes.
        // SAFETY: in the boot information's area.
        let map = unsafe { bytes(info.mmap_addr.into(), info.mmap_length as usize) };
        let (mut at, mut ram, mut top) = (0usize, 0u64, 0u64);
        while at + 24 <= map.len() {
            let (size, base, len, kind) = (
                u32_at(map, at),
                u64_at(map, at + 4),
                u64_at(map, at + 12),
                u32_at(map, at + 20),
            );
            println!("map: {base:#x}+{len:#x} type {kind}");
            if kind == 1 {
                ram += len;
                top = top.max(base + len);
            }
            at += size as usize + 4;
        }
        check(
            top == memory_mib << 20,
            "the map's RAM ends at the VM's memory size",
        );
        rt::report("mb_ram_kib", ram / 1024);

        check(info.mods_count == 1, "one module");
        if info.mods_count >= 1 {
            // SAFETY: the module list is in the boot information's area.
            let m = unsafe { bytes(info.mods_addr.into(), 16) };
            let (start, end) = (u32_at(m, 0), u32_at(m, 4));
            println!("module \"{}\": {start:#x}..{end:#x}", c_str(u32_at(m, 8)));
            check(start % 4096 == 0, "the module is page-aligned");
            let want = args.u64("module_magic").ok().flatten().unwrap_or(0);
            // SAFETY: the module lies in the VM's memory.
            let first = unsafe { bytes(start.into(), 4) };
            check(
                u64::from(u32_at(first, 0)) == want,
                "the module's first bytes are the file's",
            );
            rt::report("mb_module_len", (end - start).into());
        }

        // What the BIOS leaves for a boot loader's kernel: the 8259s at their BIOS vector
        // bases with only the timer and the cascade unmasked, the PIT ticking, and a real-mode
        // vector table whose IRQ 0 handler acknowledges the 8259.
        // SAFETY: port I/O to the VM's own 8259s and PIT (interrupts are off).
        let (master_mask, slave_mask) = unsafe { (cpu::inb(0x21), cpu::inb(0xa1)) };
        check(
            (master_mask, slave_mask) == (0xfa, 0xff),
            "the 8259s mask everything but IRQ 0 and the cascade",
        );
        let pit_count = || {
            // SAFETY: latch and read PIT channel 0's count.
            unsafe {
                cpu::outb(0x43, 0x00);
                u16::from(cpu::inb(0x40)) | u16::from(cpu::inb(0x40)) << 8
            }
        };
        let first = pit_count();
        let mut moved = false;
        for _ in 0..1000 {
            if pit_count() != first {
                moved = true;
                break;
            }
        }
        check(moved, "PIT channel 0 is counting");
        // SAFETY: the vector table at 0 and the BIOS area are in the VM's memory, identity-mapped.
        let far = u32_at(unsafe { bytes(8 * 4, 4) }, 0);
        let handler = u64::from(far >> 16) * 16 + u64::from(far & 0xffff);
        // SAFETY: as above.
        let code = unsafe { bytes(handler, 7) };
        check(
            far >> 16 == 0xf000 && code == [0x50, 0xb0, 0x20, 0xe6, 0x20, 0x58, 0xcf],
            "vector 8 points into the BIOS area at a handler that sends the 8259 an EOI",
        );
        println!("{failed} checks failed");
        // The test-exit device ends the VM with the value written.
        // SAFETY: port I/O to the VM's own test-exit device.
        unsafe {
            core::arch::asm!("out dx, eax", in("dx") TEST_EXIT_PORT, in("eax") failed as u32)
        };
        loop {
            // SAFETY: only reached if the device is missing: wait for nothing.
            unsafe { core::arch::asm!("cli; hlt") };
        }
    }

    fn rdmsr(index: u32) -> u64 {
        let (lo, hi): (u32, u32);
        // SAFETY: RDMSR of an MSR every x86-64 CPU has.
        unsafe { core::arch::asm!("rdmsr", in("ecx") index, out("eax") lo, out("edx") hi) };
        u64::from(lo) | (u64::from(hi) << 32)
    }
}
