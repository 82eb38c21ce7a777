use super::*;
use alloc::vec;

/// The setup header of Debian's `linux-image-6.1.0-57-cloud-amd64` (6.1.192), bytes
/// 0x1F1..0x270 of its vmlinuz: protocol 2.15, 39 setup sectors, 2 MiB alignment, relocatable,
/// xloadflags 0x7f, pref_address 16 MiB, init_size 0x3378000.
const DEBIAN_CLOUD_HEADER: &str = "27010020830d000000ffff000055aaeb6a486472530f02000000000010c0\
420001008000001000000000000000000000000000e05b000000000000ffffff7f0000200001157f00ff0700000000\
00000000000000000000cc020000779dd6000000000000000000000000010000000000803703c035d700bcffd7008c\
d88ec0";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A bzImage with that header and `kernel_len` bytes of protected-mode kernel.
fn image(kernel_len: usize) -> Vec<u8> {
    let header = hex(DEBIAN_CLOUD_HEADER);
    let mut img = vec![0u8; 40 * 512 + kernel_len];
    img[0x1f1..0x1f1 + header.len()].copy_from_slice(&header);
    for (i, b) in img[40 * 512..].iter_mut().enumerate() {
        *b = i as u8;
    }
    img
}

const MIB: u64 = 1 << 20;

#[test]
fn a_distribution_kernels_header_parses() {
    let img = image(0x1000);
    let k = parse(&img).unwrap();
    assert_eq!(k.version, 0x020f);
    assert_eq!(
        k.kernel.len(),
        0x1000,
        "after the boot sector and 39 setup sectors"
    );
    assert_eq!(k.kernel[1], 1);
    assert_eq!(k.kernel_alignment, 2 * MIB);
    assert_eq!(k.pref_address, 16 * MIB);
    assert_eq!(k.init_size, 0x337_8000);
    assert_eq!(k.cmdline_size, 0x7ff);
    assert_eq!(k.initrd_addr_max, 0x8000_0000);
    // The header ends at 0x202 + 0x6a.
    assert_eq!(k.header.len(), 0x26c - 0x1f1);
}

/// The bytes the plan puts at `gpa`.
fn piece(plan: &LinuxPlan, gpa: u64) -> &[u8] {
    let found = plan.pieces.iter().find(|(at, _)| *at == gpa);
    &found.unwrap_or_else(|| panic!("no piece at {gpa:#x}")).1
}

#[test]
fn plan_and_zero_page_follow_the_boot_protocol() {
    let img = image(0x1000);
    let k = parse(&img).unwrap();
    let p = plan(&k, 256 * MIB, "console=ttyS0 acpi=off", Some(3 * MIB + 5)).unwrap();
    assert_eq!(p.kernel, 16 * MIB, "the preferred address");
    assert_eq!(p.entry, 16 * MIB + 0x200);
    assert_eq!(p.zero_page, ZERO_PAGE_GPA);
    let initrd = p.initrd.unwrap();
    assert_eq!(initrd % 4096, 0);
    assert!(initrd + 3 * MIB + 5 <= 256 * MIB && initrd >= p.kernel + k.init_size);
    assert_eq!(p.end, initrd + 3 * MIB + 5, "the initrd ends highest");
    let zp = piece(&p, ZERO_PAGE_GPA);
    assert_eq!(zp.len(), 4096);
    let u32_at = |at: usize| u32::from_le_bytes(zp[at..at + 4].try_into().unwrap());
    // The header copied, then the loader's fields.
    assert_eq!(&zp[0x202..0x206], b"HdrS");
    assert_eq!(zp[0x210], 0xff, "type_of_loader: undefined");
    assert_eq!(zp[0x211] & 1, 1, "LOADED_HIGH");
    assert_eq!(u32_at(0x228), CMDLINE_GPA as u32);
    assert_eq!(u32_at(0x218), initrd as u32);
    assert_eq!(u32_at(0x21c), (3 * MIB + 5) as u32);
    // The e820 map: RAM below 639 KiB and from 1 MiB to the end, the rest reserved.
    assert_eq!(zp[0x1e8], 6);
    let e = |i: usize| {
        let at = 0x2d0 + i * 20;
        (
            u64::from_le_bytes(zp[at..at + 8].try_into().unwrap()),
            u64::from_le_bytes(zp[at + 8..at + 16].try_into().unwrap()),
            u32_at(at + 16),
        )
    };
    assert_eq!(e(0), (0, 0x9_fc00, E820_RAM));
    assert_eq!(e(3), (MIB, 255 * MIB, E820_RAM));
    assert_eq!(
        e(2),
        (0xe_0000, 0x2_0000, E820_RESERVED),
        "the BIOS area, ACPI tables"
    );
    assert_eq!(e(4), (0xfec0_0000, 0x1000, E820_RESERVED));
    // The ACPI tables at 0xE0000, RSDP first, and the zero page's acpi_rsdp_addr.
    let tables = piece(&p, crate::acpi::TABLES_GPA);
    assert_eq!(&tables[..8], b"RSD PTR ");
    assert_eq!(zp[0x70..0x78], 0xe_0000u64.to_le_bytes());
    let cmd = piece(&p, CMDLINE_GPA);
    assert_eq!(cmd, b"console=ttyS0 acpi=off\0");
    let gdt = piece(&p, GDT_GPA);
    assert_eq!(
        gdt[usize::from(BOOT_CS)..usize::from(BOOT_CS) + 8],
        0x00af_9b00_0000_ffffu64.to_le_bytes()
    );
}

#[test]
fn a_small_vm_loads_the_kernel_low_and_refuses_what_does_not_fit() {
    let img = image(0x1000);
    let k = parse(&img).unwrap();
    // 40 MiB: 16 MiB + init_size (51.5 MiB) does not fit; 2 MiB (aligned from 1 MiB) does not
    // either, 64 MiB would.
    assert!(matches!(
        plan(&k, 40 * MIB, "", None),
        Err(BzImageError::TooLarge { .. })
    ));
    let p = plan(&k, 64 * MIB, "", None).unwrap();
    assert_eq!(
        p.kernel,
        2 * MIB,
        "the lowest 2 MiB-aligned address from 1 MiB"
    );
    assert!(p.initrd.is_none());
    // An initrd with no room above the kernel.
    assert!(matches!(
        plan(&k, 64 * MIB, "", Some(20 * MIB)),
        Err(BzImageError::TooLarge { .. })
    ));
    let long = "x".repeat(0x800);
    assert_eq!(
        plan(&k, 256 * MIB, &long, None),
        Err(BzImageError::CmdlineTooLong {
            len: 0x800,
            max: 0x7ff
        })
    );
}

#[test]
fn images_that_are_not_bootable_bzimages_are_errors() {
    let good = image(0x1000);
    let with = |at: usize, bytes: &[u8]| {
        let mut img = good.clone();
        img[at..at + bytes.len()].copy_from_slice(bytes);
        img
    };
    assert!(matches!(
        parse(&good[..0x200]),
        Err(BzImageError::Truncated { .. })
    ));
    assert!(matches!(
        parse(&good[..40 * 512]),
        Err(BzImageError::Truncated { .. })
    ));
    assert_eq!(parse(&with(0x1fe, &[0, 0])), Err(BzImageError::NotBzImage));
    assert_eq!(parse(&with(0x202, b"HdrX")), Err(BzImageError::NotBzImage));
    assert_eq!(
        parse(&with(0x206, &[0x0b, 0x02])),
        Err(BzImageError::OldProtocol { version: 0x020b })
    );
    assert_eq!(parse(&with(0x211, &[0])), Err(BzImageError::NotRelocatable));
    assert_eq!(parse(&with(0x234, &[0])), Err(BzImageError::NotRelocatable));
    assert_eq!(
        parse(&with(0x236, &[0x7e, 0])),
        Err(BzImageError::No64BitEntry)
    );
    assert_eq!(
        parse(&with(0x230, &0x1800u32.to_le_bytes())),
        Err(BzImageError::BadAlignment { alignment: 0x1800 })
    );
    assert_eq!(
        parse(&with(0x230, &0x800u32.to_le_bytes())),
        Err(BzImageError::BadAlignment { alignment: 0x800 })
    );
}

#[test]
fn damaged_images_never_panic() {
    // Every byte of the header flipped in turn, and every truncation of it, with a plan for
    // each image that parses.
    let good = image(0x400);
    for at in 0x1f1..0x270 {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut img = good.clone();
            img[at] ^= flip;
            if let Ok(k) = parse(&img) {
                let _ = plan(&k, 128 * MIB, "console=ttyS0", Some(MIB));
                let _ = plan(&k, MIB, "", Some(u64::MAX));
            }
        }
    }
    for len in 0..0x300 {
        let _ = parse(&good[..len]);
    }
}
