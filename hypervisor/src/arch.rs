//! Descriptor tables and exception handling of the host (SDM Vol. 3A, 3.4-3.5, 6.10-6.14, 8.2).
//!
//! One GDT (code, data, a 64-bit TSS whose IST1 holds a separate stack for #DF and #MC), one IDT
//! whose exception vectors lead to [`exception`], which prints the full register state and
//! halts: the hypervisor itself must never fault, so any exception is a bug to report. The one
//! exception is vector 2: an NMI is an event of the machine, not a fault of the hypervisor, so
//! its handler counts it (`interrupts::NMIS_ROOT`) and returns.
//! VMX needs the TSS too: the host TR selector in a VMCS must not be 0 (SDM 26.2.3).

use core::mem::size_of;

pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;

#[repr(C, packed(4))]
struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

#[repr(C, align(16))]
struct IstStack([u8; 16 * 1024]);

static mut IST1_STACK: IstStack = IstStack([0; 16 * 1024]);

static mut TSS: Tss = Tss {
    _reserved0: 0,
    rsp: [0; 3],
    _reserved1: 0,
    ist: [0; 7],
    _reserved2: 0,
    _reserved3: 0,
    iomap_base: size_of::<Tss>() as u16,
};

static mut GDT: [u64; 5] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff, 0, 0];

#[derive(Clone, Copy)]
#[repr(C)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    _reserved: u32,
}

/// All 256 vectors: 0-31 exceptions, 32-255 host interrupts, which only arrive while the CPU
/// sleeps in [`crate::interrupts::idle_until`] (the hypervisor runs with RFLAGS.IF = 0).
static mut IDT: [IdtEntry; 256] = [IdtEntry {
    offset_low: 0,
    selector: 0,
    ist: 0,
    attributes: 0,
    offset_mid: 0,
    offset_high: 0,
    _reserved: 0,
}; 256];

#[repr(C, packed(2))]
pub struct DescriptorPointer {
    pub limit: u16,
    pub base: u64,
}

/// Installs the GDT with its TSS, reloads the segment registers, loads TR and the IDT.
pub fn init() {
    // SAFETY: runs once, on the only CPU, before anything reads these tables; the addresses
    // taken are of statics, which live for the whole run at their identity-mapped addresses.
    unsafe {
        let tss = &raw mut TSS;
        (*tss).ist[0] = (&raw const IST1_STACK) as u64 + size_of::<IstStack>() as u64;
        let base = tss as u64;
        let limit = size_of::<Tss>() as u64 - 1;
        // 64-bit available TSS descriptor (type 9, present), 16 bytes (SDM 8.2.3).
        let gdt = &raw mut GDT;
        (*gdt)[3] = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        (*gdt)[4] = base >> 32;
        let ptr = DescriptorPointer {
            limit: (size_of::<[u64; 5]>() - 1) as u16,
            base: gdt as u64,
        };
        core::arch::asm!(
            "lgdt [{ptr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ss, {ds:x}",
            "mov ds, {ds:x}",
            "mov es, {ds:x}",
            "ltr {tr:x}",
            ptr = in(reg) &ptr,
            cs = in(reg) CODE_SELECTOR as u64,
            ds = in(reg) DATA_SELECTOR as u64,
            tr = in(reg) TSS_SELECTOR as u64,
            tmp = out(reg) _,
        );

        let idt = &raw mut IDT;
        for (vector, entry) in (*idt).iter_mut().enumerate() {
            let handler = match vector {
                2 => nmi_entry as *const () as u64,
                0..32 => exception_stub_address(vector),
                _ => host_interrupt_entry as *const () as u64,
            };
            *entry = IdtEntry {
                offset_low: handler as u16,
                selector: CODE_SELECTOR,
                // #DF and #MC run on their own stack: the faulting stack may be the problem.
                ist: if vector == 8 || vector == 18 { 1 } else { 0 },
                attributes: 0x8e, // present, DPL 0, 64-bit interrupt gate
                offset_mid: (handler >> 16) as u16,
                offset_high: (handler >> 32) as u32,
                _reserved: 0,
            };
        }
        let ptr = DescriptorPointer {
            limit: (size_of::<[IdtEntry; 256]>() - 1) as u16,
            base: idt as u64,
        };
        core::arch::asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack));
    }
}

/// Base and limit of the GDT and IDT, for the VMCS host-state area.
pub fn gdt_base() -> u64 {
    (&raw const GDT) as u64
}
pub fn idt_base() -> u64 {
    (&raw const IDT) as u64
}
pub fn tss_base() -> u64 {
    (&raw const TSS) as u64
}

extern "C" {
    fn nmi_entry();
    fn host_interrupt_entry();
}

/// Emits an interrupt entry `$name` that does one locked increment of the counter `$count` and
/// returns with IRETQ. It uses no register but RAX, which it saves, and runs on the interrupted
/// stack: the hypervisor is built without a red zone.
macro_rules! counting_entry {
    ($name:literal, $count:path) => {
        core::arch::global_asm!(
            concat!(
                ".section .text.exceptions, \"ax\"\n",
                ".global ", $name, "\n",
                $name, ":\n",
                "push rax\n",
                "lea rax, [rip + {count}]\n",
                "lock inc qword ptr [rax]\n",
                "pop rax\n",
                "iretq\n",
            ),
            count = sym $count,
        );
    };
}

// A host interrupt taken while the CPU sleeps with interrupts enabled: counted, then IRETQ.
// The EOI is sent after the sleep, with interrupts disabled again (interrupts::idle_until):
// until then the vector stays in service, which holds back only interrupts the sleep has no
// use for anyway.
counting_entry!("host_interrupt_entry", crate::interrupts::IDLE_WAKEUPS);

// The NMI handler: counted, then IRETQ (which also ends the CPU's NMI blocking).
counting_entry!("nmi_entry", crate::interrupts::NMIS_ROOT);

fn exception_stub_address(vector: usize) -> u64 {
    extern "C" {
        static exception_stubs: [u64; 32];
    }
    // SAFETY: `exception_stubs` is the read-only table of 32 addresses emitted below.
    unsafe {
        (&raw const exception_stubs)
            .cast::<u64>()
            .add(vector)
            .read()
    }
}

// Each stub pushes a zero error code where the CPU does not push one (SDM 6.13), then the
// vector, then jumps to the common path, which saves every GPR and calls `exception`.
core::arch::global_asm!(
    r#"
    .altmacro
    .macro stub n
    exception_stub_\n:
    .if \n == 8 || (\n >= 10 && \n <= 14) || \n == 17 || \n == 21 || \n == 29 || \n == 30
    .else
        push 0
    .endif
        push \n
        jmp exception_common
    .endm

    .section .text.exceptions, "ax"
    .set i, 0
    .rept 32
        stub %i
        .set i, i + 1
    .endr

exception_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    and rsp, -16
    call {handler}
    ud2

    .macro stubaddr n
        .quad exception_stub_\n
    .endm
    .section .rodata.exceptions, "a"
    .align 8
    .global exception_stubs
exception_stubs:
    .set i, 0
    .rept 32
        stubaddr %i
        .set i, i + 1
    .endr
    .noaltmacro
    "#,
    handler = sym exception,
);

/// The stack at `exception_common`'s call, lowest address first.
#[repr(C)]
struct ExceptionFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
];

extern "C" fn exception(frame: &ExceptionFrame) -> ! {
    let cr2: u64;
    let cr3: u64;
    // SAFETY: reading control registers has no side effects.
    unsafe {
        core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack));
        core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack));
    }
    let f = frame;
    crate::serial::emergency_print(format_args!(
        "\n[FATAL] exception {} ({}) error_code={:#x} in the hypervisor\n\
         [FATAL] rip={:#018x} cs={:#x} rflags={:#x} rsp={:#018x} ss={:#x} cr2={:#x} cr3={:#x}\n\
         [FATAL] rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n\
         [FATAL] rsi={:#018x} rdi={:#018x} rbp={:#018x} r8={:#018x}\n\
         [FATAL] r9={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}\n\
         [FATAL] r13={:#018x} r14={:#018x} r15={:#018x}\n",
        f.vector,
        EXCEPTION_NAMES[(f.vector & 31) as usize],
        f.error_code,
        f.rip,
        f.cs,
        f.rflags,
        f.rsp,
        f.ss,
        cr2,
        cr3,
        f.rax,
        f.rbx,
        f.rcx,
        f.rdx,
        f.rsi,
        f.rdi,
        f.rbp,
        f.r8,
        f.r9,
        f.r10,
        f.r11,
        f.r12,
        f.r13,
        f.r14,
        f.r15,
    ));
    crate::platform::shutdown()
}
