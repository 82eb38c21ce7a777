//! The Multiboot2 entry: header, 32-bit entry, switch to long mode (SDM Vol. 3A, 10.8.5).
//!
//! GRUB enters `_start32` in 32-bit protected mode with paging off, EAX = the Multiboot2 magic,
//! EBX = the physical address of the boot information (Multiboot2 spec, 3.3). This file builds
//! an identity map of the first 4 GiB with 2 MiB pages, enables PAE and IA32_EFER.LME, turns
//! paging on, loads a 64-bit GDT and jumps to `kmain(magic, info)` on the boot stack. Once the
//! heap is up, [`extend_identity_map`] maps the RAM above 4 GiB the same way. It owns nothing
//! else: the Rust side installs its own GDT, TSS and IDT.

/// Size of the boot stack, also the hypervisor's only stack (one physical CPU).
pub const STACK_SIZE: usize = 256 * 1024;

/// What `_start32` identity-maps: the first 4 GiB.
pub const BOOT_IDENTITY_MAPPED: u64 = 4 << 30;

/// The most the identity map can reach: what PML4 entry 0 (one PDPT) covers.
pub const MAX_IDENTITY_MAPPED: u64 = 512 << 30;

const PAGE_2M: u64 = 2 << 20;
/// Present, writable, 2 MiB page (SDM Vol. 3A, 4.5.4, Table 4-17); the directory entries are
/// present and writable (Table 4-16).
const PDE_2M_FLAGS: u64 = 0x83;
const TABLE_FLAGS: u64 = 0x3;

/// Identity-maps physical memory from 4 GiB up to `end` (rounded up to 2 MiB, at most
/// [`MAX_IDENTITY_MAPPED`]) with 2 MiB pages, as `_start32` mapped the first 4 GiB, so that
/// frames up there can be handed out and touched like those below. The page directories come
/// from the heap (identity-mapped, below 4 GiB) and are never freed. Returns the new limit of
/// the identity map. Call once, before anything uses memory above 4 GiB.
pub fn extend_identity_map(end: u64) -> u64 {
    let end = end.min(MAX_IDENTITY_MAPPED).next_multiple_of(PAGE_2M);
    if end <= BOOT_IDENTITY_MAPPED {
        return BOOT_IDENTITY_MAPPED;
    }
    let first_dir = (BOOT_IDENTITY_MAPPED >> 30) as usize;
    let dirs = end.div_ceil(1 << 30) as usize;
    for d in first_dir..dirs {
        let mut pd = alloc::boxed::Box::new(PageTable([0; 512]));
        for (i, entry) in pd.0.iter_mut().enumerate() {
            let page = ((d as u64) << 30) + (i as u64) * PAGE_2M;
            if page < end {
                *entry = page | PDE_2M_FLAGS;
            }
        }
        // The heap is identity-mapped, so the box's address is the directory's physical
        // address; `PageTable` is 4 KiB aligned, as a paging structure must be.
        let pd_phys = alloc::boxed::Box::into_raw(pd) as u64;
        // SAFETY: BOOT_PDPT is the live PDPT of PML4[0]; entry `d` (4..512) is not present
        // (only `_start32` wrote entries 0..4), so nothing maps through it yet and no TLB or
        // paging-structure cache holds it (SDM Vol. 3A, 4.10.2.3: not-present entries are not
        // cached). One CPU runs; the write is a plain aligned u64 store.
        unsafe {
            BOOT_PDPT.0[d] = pd_phys | TABLE_FLAGS;
        }
    }
    end
}

core::arch::global_asm!(
    r#"
    .section .multiboot2, "a"
    .align 8
mb2_header:
    .long 0xe85250d6                      /* magic */
    .long 0                               /* architecture: i386 protected mode */
    .long mb2_header_end - mb2_header
    .long 0x100000000 - (0xe85250d6 + (mb2_header_end - mb2_header))
    /* Module alignment tag (type 6): modules start on page boundaries. */
    .align 8
    .short 6, 0
    .long 8
    /* End tag. */
    .align 8
    .short 0, 0
    .long 8
mb2_header_end:

    .section .boot.text, "ax"
    .code32
    .global _start32
_start32:
    cli
    cld
    mov esp, offset {stack} + {stack_size}
    mov edi, eax                          /* magic: 1st argument of kmain */
    mov esi, ebx                          /* boot information: 2nd argument */

    /* PML4[0] -> PDPT; PDPT[0..4] -> PD0..PD3; PDn[i] -> 2 MiB page (n * 512 + i). */
    mov eax, offset {pdpt}
    or eax, 0x3
    mov [{pml4}], eax
    xor ecx, ecx
1:
    mov eax, ecx
    shl eax, 12
    add eax, offset {pd}
    or eax, 0x3
    mov [{pdpt} + ecx * 8], eax
    inc ecx
    cmp ecx, 4
    jne 1b
    xor ecx, ecx
2:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83                          /* present, writable, 2 MiB page */
    mov [{pd} + ecx * 8], eax
    inc ecx
    cmp ecx, 2048
    jne 2b

    mov eax, offset {pml4}
    mov cr3, eax
    mov eax, cr4
    or eax, (1 << 5)                      /* CR4.PAE */
    mov cr4, eax
    mov ecx, 0xc0000080                   /* IA32_EFER */
    rdmsr
    or eax, (1 << 8)                      /* LME */
    wrmsr
    mov eax, cr0
    or eax, 0x80010001                    /* PG | WP | PE */
    /* Caches on: CD and NW cleared (the Multiboot specification leaves them undefined, and
       Bochs's BIOS leaves them set). VM entry never loads them from the guest CR0 field (SDM
       27.3.2.1), so every guest would otherwise run uncached too. */
    and eax, 0x9fffffff
    mov cr0, eax
    wbinvd

    lgdt [boot_gdt_ptr]
    push 0x08
    mov eax, offset long_mode_entry
    push eax
    retf

    .code64
long_mode_entry:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov edi, edi
    mov esi, esi
    mov rsp, offset {stack} + {stack_size}
    xor ebp, ebp
    call {kmain}
4:
    hlt
    jmp 4b

    .section .rodata
    .align 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff              /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff              /* 0x10: data */
boot_gdt_end:
    .align 4
    .global boot_gdt_ptr
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt
    "#,
    stack = sym BOOT_STACK,
    stack_size = const STACK_SIZE,
    pml4 = sym BOOT_PML4,
    pdpt = sym BOOT_PDPT,
    pd = sym BOOT_PD,
    kmain = sym crate::kmain,
);

#[repr(C, align(4096))]
struct PageTable([u64; 512]);

#[repr(C, align(16))]
struct Stack([u8; STACK_SIZE]);

/// Boot page tables: in .bss, zero-filled by GRUB's ELF loader. Written only by `_start32`.
#[no_mangle]
static mut BOOT_PML4: PageTable = PageTable([0; 512]);
#[no_mangle]
static mut BOOT_PDPT: PageTable = PageTable([0; 512]);
#[no_mangle]
static mut BOOT_PD: [PageTable; 4] = [const { PageTable([0; 512]) }; 4];
#[no_mangle]
static mut BOOT_STACK: Stack = Stack([0; STACK_SIZE]);
