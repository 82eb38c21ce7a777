use super::*;
use alloc::vec;

fn put(f: &mut [u8], at: usize, v: u32) {
    f[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// An ELF32 i386 kernel like kvm-unit-tests': one PT_LOAD of 0x40 file bytes at 4 MiB with
/// 0x3000 bytes in memory, a Multiboot header (flags 0) at file offset 0x60, entry 0x400010.
fn elf32_kernel() -> Vec<u8> {
    let mut f = vec![0u8; 0xa0];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 1; // ELFCLASS32
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&3u16.to_le_bytes());
    put(&mut f, 24, 0x40_0010);
    put(&mut f, 28, 52); // e_phoff
    f[42..44].copy_from_slice(&32u16.to_le_bytes());
    f[44..46].copy_from_slice(&1u16.to_le_bytes());
    let ph = 52;
    put(&mut f, ph, 1); // PT_LOAD
    put(&mut f, ph + 4, 0x60); // p_offset
    put(&mut f, ph + 8, 0x40_0000);
    put(&mut f, ph + 12, 0x40_0000);
    put(&mut f, ph + 16, 0x40);
    put(&mut f, ph + 20, 0x3000);
    put(&mut f, 0x60, HEADER_MAGIC);
    put(&mut f, 0x64, 0);
    put(&mut f, 0x68, 0u32.wrapping_sub(HEADER_MAGIC));
    f
}

/// A raw binary with the address fields (flag 16): header at file offset 0x20 for address
/// 0x100020, the file loads at 1 MiB, 0x1000 bytes of BSS after it, entry 0x100040.
fn raw_kernel() -> Vec<u8> {
    let mut f = vec![0x90u8; 0x80];
    let flags = ADDRESSES | PAGE_ALIGN | MEMORY_INFO;
    for (i, v) in [
        HEADER_MAGIC,
        flags,
        0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags)),
        0x10_0020,
        0x10_0000,
        0,
        0x10_2000,
        0x10_0040,
    ]
    .into_iter()
    .enumerate()
    {
        put(&mut f, 0x20 + 4 * i, v);
    }
    f
}

#[test]
fn finds_and_loads_an_elf32_kernel() {
    let f = elf32_kernel();
    assert!(has_header(&f));
    let k = load(&f, 64 << 20).unwrap();
    assert_eq!(k.entry, 0x40_0010);
    assert_eq!(
        k.segments,
        [Segment {
            gpa: 0x40_0000,
            offset: 0x60,
            filesz: 0x40,
            memsz: 0x3000
        }]
    );
    assert_eq!(k.end(), 0x40_3000);
    // Too small a VM for it.
    assert!(matches!(
        load(&f, 0x40_1000),
        Err(MultibootError::Elf(ElfError::SegmentOutOfRange { .. }))
    ));
}

#[test]
fn loads_by_the_address_fields() {
    let k = load(&raw_kernel(), 4 << 20).unwrap();
    assert_eq!(k.entry, 0x10_0040);
    assert_eq!(
        k.segments,
        [Segment {
            gpa: 0x10_0000,
            offset: 0,
            filesz: 0x80,
            memsz: 0x2000
        }]
    );
}

#[test]
fn bad_headers_are_errors() {
    assert_eq!(load(&[0u8; 100], 4 << 20), Err(MultibootError::NoHeader));
    assert!(!has_header(&[0u8; 100]));
    // The header past the first 8 KiB is not found.
    let mut late = vec![0u8; 8192];
    late.extend_from_slice(&elf32_kernel()[0x60..0x6c]);
    assert_eq!(load(&late, 4 << 20), Err(MultibootError::NoHeader));

    let mut f = elf32_kernel();
    put(&mut f, 0x68, 0);
    assert_eq!(load(&f, 64 << 20), Err(MultibootError::BadChecksum));
    // Cut off right after the magic.
    assert_eq!(load(&f[..0x66], 64 << 20), Err(MultibootError::BadChecksum));

    let with_flags = |flags: u32| {
        let mut f = elf32_kernel();
        put(&mut f, 0x64, flags);
        put(
            &mut f,
            0x68,
            0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags)),
        );
        load(&f, 64 << 20)
    };
    assert!(matches!(
        with_flags(VIDEO_MODE),
        Err(MultibootError::Requires(_))
    ));
    assert_eq!(
        with_flags(1 << 5),
        Err(MultibootError::UnknownRequirements(1 << 5))
    );
    // Optional bits the loader does not know are fine.
    assert!(with_flags(1 << 20).is_ok());

    // Fields: header_addr 0x2c, load_addr 0x30, load_end_addr 0x34, bss_end_addr 0x38,
    // entry_addr 0x3c (the checksum covers only magic and flags).
    let mut f = raw_kernel();
    put(&mut f, 0x30, 0x10_0030); // load_addr above header_addr
    assert!(matches!(
        load(&f, 4 << 20),
        Err(MultibootError::BadAddresses(_))
    ));
    let mut f = raw_kernel();
    put(&mut f, 0x34, 0x10_1000); // load_end past the file
    assert!(matches!(
        load(&f, 4 << 20),
        Err(MultibootError::BadAddresses(_))
    ));
    let mut f = raw_kernel();
    put(&mut f, 0x38, 0x10_0010); // bss_end inside the file's bytes
    assert!(matches!(
        load(&f, 4 << 20),
        Err(MultibootError::BadAddresses(_))
    ));
    let mut f = raw_kernel();
    put(&mut f, 0x3c, 0x20_0000); // entry outside
    assert!(matches!(
        load(&f, 4 << 20),
        Err(MultibootError::BadAddresses(_))
    ));
    let mut f = raw_kernel();
    put(&mut f, 0x38, 0x50_0000); // BSS past the VM's 4 MiB
    assert!(matches!(
        load(&f, 4 << 20),
        Err(MultibootError::Elf(ElfError::SegmentOutOfRange { .. }))
    ));
    // Low memory is fine (kvm-unit-tests' realmode test loads at 0x8000).
    let mut f = raw_kernel();
    put(&mut f, 0x2c, 0x8020);
    put(&mut f, 0x30, 0x8000);
    put(&mut f, 0x38, 0x9000);
    put(&mut f, 0x3c, 0x8040);
    assert_eq!(load(&f, 4 << 20).unwrap().segments[0].gpa, 0x8000);
}

/// Reads a NUL-terminated string at `gpa` from the plan's pieces.
fn string_at(plan: &BootPlan, gpa: u32) -> String {
    let (at, bytes) = plan
        .pieces
        .iter()
        .find(|(at, b)| u64::from(gpa) >= *at && u64::from(gpa) < at + b.len() as u64)
        .unwrap();
    let tail = &bytes[(u64::from(gpa) - at) as usize..];
    String::from_utf8(tail[..tail.iter().position(|&b| b == 0).unwrap()].to_vec()).unwrap()
}

#[test]
fn boot_information_is_what_the_specification_says() {
    let modules = [
        Module {
            string: "env",
            len: 100,
        },
        Module {
            string: "data x=1",
            len: 0x1001,
        },
    ];
    let plan = boot_plan(64 << 20, "kernel.flat -v", 0x40_3001, &modules).unwrap();
    assert_eq!(plan.modules, [0x40_4000, 0x40_5000]);
    let (gdt_at, gdt) = &plan.pieces[0];
    // GDT and information after the last module, on a new page.
    assert_eq!((*gdt_at, plan.gdt), (0x40_7000, 0x40_7000));
    assert_eq!(&gdt[8..16], &0x00cf_9b00_0000_ffffu64.to_le_bytes());
    let (info_at, info) = &plan.pieces[1];
    assert_eq!((*info_at, plan.info), (0x40_7040, 0x40_7040));
    let info_gpa = plan.info;
    let flags = get(info, 0);
    assert_eq!(flags, 1 | 4 | 8 | 64 | 512);
    assert_eq!(get(info, 4), 639);
    assert_eq!(get(info, 8), 63 * 1024);
    assert_eq!(string_at(&plan, get(info, 16)), "kernel.flat -v");
    assert_eq!(get(info, 20), 2);
    let mods = (get(info, 24) as u64 - info_gpa) as usize;
    assert_eq!(get(info, mods), 0x40_4000);
    assert_eq!(get(info, mods + 4), 0x40_4000 + 100);
    assert_eq!(string_at(&plan, get(info, mods + 8)), "env");
    assert_eq!(get(info, mods + 16), 0x40_5000);
    assert_eq!(get(info, mods + 20), 0x40_6001);
    assert_eq!(string_at(&plan, get(info, mods + 24)), "data x=1");
    assert_eq!(string_at(&plan, get(info, 64)), "muxvisor");
    // The memory map: entries of size 20 (the size field excluded), RAM from 1 MiB to the end.
    let (len, at) = (
        get(info, 44) as usize,
        (get(info, 48) as u64 - info_gpa) as usize,
    );
    assert_eq!(len, 4 * 24);
    let entry = |i: usize| {
        let e = &info[at + 24 * i..];
        (
            get(e, 0),
            u64::from_le_bytes(e[4..12].try_into().unwrap()),
            u64::from_le_bytes(e[12..20].try_into().unwrap()),
            get(e, 20),
        )
    };
    assert_eq!(entry(0), (20, 0, 0x9_fc00, 1));
    assert_eq!(entry(3), (20, 0x10_0000, 63 << 20, 1));
    assert_eq!(entry(1).3, 2);
}

#[test]
fn modules_that_do_not_fit_are_an_error() {
    let big = [Module {
        string: "m",
        len: 1 << 20,
    }];
    assert!(boot_plan(6 << 20, "k", 0x40_0000, &big).is_ok());
    assert_eq!(
        boot_plan(5 << 20, "k", 0x40_0001, &big),
        Err(MultibootError::TooLarge {
            needed: 0x50_1000,
            memory: 5 << 20
        })
    );
    // The module fits, the boot information after it does not.
    assert!(boot_plan(0x50_1000, "k", 0x40_0000, &big).is_ok());
    assert!(matches!(
        boot_plan(0x50_0080, "k", 0x40_0000, &big),
        Err(MultibootError::TooLarge { .. })
    ));
    let huge = [Module {
        string: "m",
        len: u64::MAX,
    }];
    assert!(boot_plan(5 << 20, "k", 0x40_0000, &huge).is_err());
    // A command line that does not fit.
    let long = "x".repeat(2 << 20);
    assert!(boot_plan(5 << 20, &long, 0x40_0000, &[]).is_err());
}

#[test]
fn arbitrary_bytes_never_panic() {
    for good in [elf32_kernel(), raw_kernel()] {
        for n in 0..good.len() {
            let _ = load(&good[..n], 64 << 20);
        }
        let mut x = 0x9e37_79b9u32;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let mut f = good.clone();
            let i = (x as usize) % f.len();
            f[i] ^= (x >> 24) as u8 | 1;
            let _ = load(&f, u64::MAX);
            let _ = load(&f, 0);
        }
    }
}

#[test]
fn firmware_pieces_are_a_vector_table_and_handlers_that_acknowledge_the_8259s() {
    let pieces = firmware_pieces(&[]);
    let (ivt_at, ivt) = &pieces[0];
    let (stubs_at, stubs) = &pieces[1];
    assert_eq!((*ivt_at, ivt.len(), *stubs_at), (0, 1024, 0xf_0000));
    let vector = |v: usize| {
        let far = get(ivt, v * 4);
        ((far >> 16) as u64) * 16 + u64::from(far & 0xffff)
    };
    let code = |v: usize| &stubs[(vector(v) - 0xf_0000) as usize..];
    // A software interrupt returns at once.
    assert_eq!(code(0x10)[0], 0xcf);
    assert_eq!(code(0x21)[0], 0xcf);
    // IRQ 0 (vector 8): EOI to the master, then IRET.
    assert_eq!(code(0x08)[..7], [0x50, 0xb0, 0x20, 0xe6, 0x20, 0x58, 0xcf]);
    assert_eq!(vector(0x0f), vector(0x08));
    // IRQ 11 (vector 0x73): EOI to the slave and the master.
    assert_eq!(
        code(0x73)[..9],
        [0x50, 0xb0, 0x20, 0xe6, 0xa0, 0xe6, 0x20, 0x58, 0xcf]
    );
    assert_eq!(vector(0x70), vector(0x77));
    // Nothing the reserved ROM range does not hold, and no piece over the kernel.
    assert!(stubs.len() <= 0x1_0000);
    let low_kernel = Segment {
        gpa: 0x200,
        offset: 0,
        filesz: 0x100,
        memsz: 0x100,
    };
    let kept = firmware_pieces(&[low_kernel]);
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].0, 0xf_0000);
}
