//! `state-audit`: proves that no piece of CPU state a guest can write passes to another VM, and
//! that a VM's own state survives VM exits and other VMs' quanta (docs/isolation.md).
//!
//! Run two or more VMs of this image side by side. Each one:
//! 1. checks the registers the hypervisor entered it with (saved by its own `_start` before any
//!    code ran): every general register 0 but RDI (the boot information) and RSP (top of memory
//!    less 16), RFLAGS 0x2;
//! 2. reads every piece of state first, before writing anything, and checks that it holds its
//!    architectural reset value (SDM Vol. 3A, Table 10-1): DR0-DR3, DR6, DR7, CR2, CR8, XCR0,
//!    the x87/SSE/AVX/AVX-512 registers, KERNEL_GS_BASE (also through SWAPGS), the SYSCALL,
//!    SYSENTER, FS/GS base, TSC_AUX, PAT, EFER, DEBUGCTL and XSS MSRs, CPUID's OSXSAVE bit. A VM
//!    scheduled after a neighbour that has already written its own values finds those instead
//!    if anything leaks;
//! 3. writes a value unique to this VM into every one of them;
//! 4. yields and causes exits (CPUID) several times, checking after each that all of its values
//!    are still there, unchanged by the exits and by the neighbours' quanta.
//!
//! One line per failed check, then the report `isolation_failures=N`; exit 0 only if N = 0.
#![cfg_attr(target_os = "none", no_std, no_main)]

use core::arch::asm;

use guest_abi::guest;
use test_guests::cpu::cpuid;
use test_guests::idt;
use test_guests::println;
use test_guests::rt::{self, Boot};

#[cfg(target_os = "none")]
core::arch::global_asm!(
    ".pushsection .text._start, \"ax\", %progbits",
    ".globl _start",
    "_start:",
    // Save every register exactly as the hypervisor left it, before anything changes them.
    "    mov [rip + {regs}], rax",
    "    mov [rip + {regs} + 8], rbx",
    "    mov [rip + {regs} + 16], rcx",
    "    mov [rip + {regs} + 24], rdx",
    "    mov [rip + {regs} + 32], rsi",
    "    mov [rip + {regs} + 40], rdi",
    "    mov [rip + {regs} + 48], rbp",
    "    mov [rip + {regs} + 56], rsp",
    "    mov [rip + {regs} + 64], r8",
    "    mov [rip + {regs} + 72], r9",
    "    mov [rip + {regs} + 80], r10",
    "    mov [rip + {regs} + 88], r11",
    "    mov [rip + {regs} + 96], r12",
    "    mov [rip + {regs} + 104], r13",
    "    mov [rip + {regs} + 112], r14",
    "    mov [rip + {regs} + 120], r15",
    "    pushfq",
    "    pop rax",
    "    mov [rip + {regs} + 128], rax",
    // From here on as `test_guests::entry!` does it.
    "    cld",
    "    xor ebp, ebp",
    "    sub rsp, {reserved}",
    "    and rsp, -16",
    "    call {start}",
    "    ud2",
    ".popsection",
    regs = sym ENTRY_REGS,
    reserved = const rt::RESERVED_TOP,
    start = sym start,
);

/// RAX, RBX, RCX, RDX, RSI, RDI, RBP, RSP, R8-R15, RFLAGS at entry.
#[cfg(target_os = "none")]
#[no_mangle]
static mut ENTRY_REGS: [u64; 17] = [0; 17];
const REG_NAMES: [&str; 17] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rflags",
];

#[cfg(target_os = "none")]
extern "C" fn start(boot_info_gpa: u64) -> ! {
    rt::start(boot_info_gpa, guest_main)
}

#[cfg(not(target_os = "none"))]
fn main() {
    panic!("state-audit is a guest image for x86_64-unknown-none; run it under the hypervisor");
}

/// The MSRs audited, with their reset values.
const MSR_TSC_AUX: u32 = 0xc000_0103;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_FS_BASE: u32 = 0xc000_0100;
const MSR_EFER: u32 = 0xc000_0080;
const MSR_PAT: u32 = 0x277;
const PAT_RESET: u64 = 0x0007_0406_0007_0406;
const MSRS: [(&str, u32, u64); 14] = [
    ("SYSENTER_CS", 0x174, 0),
    ("SYSENTER_ESP", 0x175, 0),
    ("SYSENTER_EIP", 0x176, 0),
    ("DEBUGCTL", 0x1d9, 0),
    ("PAT", MSR_PAT, PAT_RESET),
    ("XSS", 0xda0, 0),
    ("EFER", MSR_EFER, 0x500),
    ("STAR", 0xc000_0081, 0),
    ("LSTAR", 0xc000_0082, 0),
    ("CSTAR", 0xc000_0083, 0),
    ("FMASK", 0xc000_0084, 0),
    ("FS_BASE", MSR_FS_BASE, 0),
    ("GS_BASE", MSR_GS_BASE, 0),
    ("KERNEL_GS_BASE", MSR_KERNEL_GS_BASE, 0),
];

/// 64-byte aligned XSAVE areas: the pattern to load and what is saved back.
#[repr(C, align(64))]
struct Area(core::cell::UnsafeCell<[u8; 4096]>);
// SAFETY: one vCPU; each area is used by one function at a time, never across a yield.
unsafe impl Sync for Area {}
static LOAD: Area = Area(core::cell::UnsafeCell::new([0; 4096]));
static SAVED: Area = Area(core::cell::UnsafeCell::new([0; 4096]));

struct Audit {
    failures: u64,
    phase: &'static str,
}

impl Audit {
    fn expect(&mut self, what: &str, got: u64, want: u64) {
        if got != want {
            self.failures += 1;
            println!("FAIL {}: {what} = {got:#x}, want {want:#x}", self.phase);
        }
    }
}

/// The CPU's XSAVE facts: the XCR0 bits offered and each component's (offset, size).
struct Xsave {
    all: u64,
    components: [(u32, u32); 8],
}

fn xsave_facts() -> Option<Xsave> {
    if cpuid(1, 0).ecx & (1 << 26) == 0 {
        return None;
    }
    let d = cpuid(0xd, 0);
    let all = u64::from(d.eax) | (u64::from(d.edx) << 32);
    let mut components = [(0, 0); 8];
    for (i, c) in components.iter_mut().enumerate().skip(2) {
        if all & (1 << i) != 0 {
            let l = cpuid(0xd, i as u32);
            *c = (l.ebx, l.eax);
        }
    }
    Some(Xsave { all, components })
}

// SAFETY (all helpers below): each executes one privileged register access of this guest's own
// (virtual) CPU at CPL 0; none touches memory but the guest's own static XSAVE areas.
fn read_dr(n: u8) -> u64 {
    let v: u64;
    unsafe {
        match n {
            0 => asm!("mov {}, dr0", out(reg) v),
            1 => asm!("mov {}, dr1", out(reg) v),
            2 => asm!("mov {}, dr2", out(reg) v),
            3 => asm!("mov {}, dr3", out(reg) v),
            6 => asm!("mov {}, dr6", out(reg) v),
            _ => asm!("mov {}, dr7", out(reg) v),
        }
    }
    v
}

fn write_dr(n: u8, v: u64) {
    unsafe {
        match n {
            0 => asm!("mov dr0, {}", in(reg) v),
            1 => asm!("mov dr1, {}", in(reg) v),
            2 => asm!("mov dr2, {}", in(reg) v),
            3 => asm!("mov dr3, {}", in(reg) v),
            6 => asm!("mov dr6, {}", in(reg) v),
            _ => asm!("mov dr7, {}", in(reg) v),
        }
    }
}

fn read_cr(n: u8) -> u64 {
    let v: u64;
    unsafe {
        match n {
            2 => asm!("mov {}, cr2", out(reg) v),
            4 => asm!("mov {}, cr4", out(reg) v),
            _ => asm!("mov {}, cr8", out(reg) v),
        }
    }
    v
}

fn write_cr(n: u8, v: u64) {
    unsafe {
        match n {
            2 => asm!("mov cr2, {}", in(reg) v),
            4 => asm!("mov cr4, {}", in(reg) v),
            _ => asm!("mov cr8, {}", in(reg) v),
        }
    }
}

fn xgetbv() -> u64 {
    let (lo, hi): (u32, u32);
    unsafe { asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi) };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn xsetbv(v: u64) {
    unsafe { asm!("xsetbv", in("ecx") 0, in("eax") v as u32, in("edx") (v >> 32) as u32) };
}

fn swapgs() {
    unsafe { asm!("swapgs") };
}

fn msr(index: u32) -> u64 {
    idt::rdmsr(index).unwrap_or(0xbad0_0000_0000_0bad)
}

fn set_msr(audit: &mut Audit, name: &str, index: u32, value: u64) {
    // SAFETY: the values written are legal for these MSRs and change only this VM's state.
    if let Err(f) = unsafe { idt::wrmsr(index, value) } {
        audit.failures += 1;
        println!(
            "FAIL write {name} = {value:#x}: fault {}",
            idt::name(f.vector.into())
        );
    }
}

/// Saves every offered component into `SAVED` (pre-filled with 0xA5) and returns XSTATE_BV.
fn xsave_all(all: u64) -> u64 {
    unsafe {
        let area = &mut *SAVED.0.get();
        area.fill(0xa5);
        asm!("xsave64 [{}]", in(reg) area.as_mut_ptr(), in("eax") all as u32, in("edx") (all >> 32) as u32);
        u64::from_le_bytes(area[512..520].try_into().unwrap())
    }
}

fn xrstor_load(all: u64) {
    unsafe {
        asm!("xrstor64 [{}]", in(reg) LOAD.0.get(), in("eax") all as u32, in("edx") (all >> 32) as u32)
    };
}

/// The bytes of component `i` that hold state (x87: the 8 ST registers' 10 bytes each; SSE: the
/// 16 XMM registers; others: the whole component).
fn component_bytes(x: &Xsave, i: usize, area: &[u8; 4096], mut each: impl FnMut(usize, u8)) {
    match i {
        0 => {
            (0..8).for_each(|r| (0..10).for_each(|b| each(32 + r * 16 + b, area[32 + r * 16 + b])))
        }
        1 => (160..416).for_each(|o| each(o, area[o])),
        _ => {
            let (off, size) = x.components[i];
            (off as usize..(off + size) as usize).for_each(|o| each(o, area[o]));
        }
    }
}

/// This VM's pattern byte at offset `o` of an XSAVE area.
fn pattern(tag: u64, o: usize) -> u8 {
    (tag as u8) ^ (o as u8).wrapping_mul(31) ^ 0x5a
}

fn check_fresh(a: &mut Audit, boot: &Boot) {
    // SAFETY: written once by `_start` before any Rust code ran.
    let regs = unsafe { (&raw const ENTRY_REGS).read() };
    for (&v, name) in regs.iter().zip(REG_NAMES) {
        let want = match name {
            "rdi" => guest_abi::boot::BOOT_INFO_GPA,
            "rsp" => boot.memory_bytes() - 16,
            "rflags" => 2,
            _ => 0,
        };
        a.expect(name, v, want);
    }
    for n in [0u8, 1, 2, 3] {
        a.expect(["dr0", "dr1", "dr2", "dr3"][n as usize], read_dr(n), 0);
    }
    a.expect("dr6", read_dr(6), 0xffff_0ff0);
    a.expect("dr7", read_dr(7), 0x400);
    a.expect("cr2", read_cr(2), 0);
    a.expect("cr8", read_cr(8), 0);
    a.expect(
        "cpuid.1:ecx.osxsave",
        u64::from(cpuid(1, 0).ecx >> 27 & 1),
        0,
    );
    for (name, index, reset) in MSRS {
        a.expect(name, msr(index), reset);
    }
    a.expect("tsc_aux (rdmsr)", msr(MSR_TSC_AUX), 0);
    swapgs();
    let gs_after_swapgs = msr(MSR_GS_BASE);
    swapgs();
    a.expect("gs_base after swapgs", gs_after_swapgs, 0);
    let Some(x) = xsave_facts() else {
        println!("no XSAVE: FPU state checked by the hypervisor's FXSAVE path only");
        return;
    };
    write_cr(4, read_cr(4) | (1 << 18));
    a.expect(
        "cpuid.1:ecx.osxsave after CR4.OSXSAVE",
        u64::from(cpuid(1, 0).ecx >> 27 & 1),
        1,
    );
    a.expect("xcr0", xgetbv(), 1);
    xsetbv(x.all);
    let bv = xsave_all(x.all);
    // SAFETY: SAVED was just written by XSAVE; nothing else uses it now.
    let area = unsafe { &*SAVED.0.get() };
    a.expect(
        "fcw",
        u64::from(u16::from_le_bytes([area[0], area[1]])),
        0x37f,
    );
    a.expect(
        "mxcsr",
        u64::from(u32::from_le_bytes(area[24..28].try_into().unwrap())),
        0x1f80,
    );
    for i in 0..8 {
        if bv & (1 << i) != 0 && (i < 2 || x.components[i].1 != 0) {
            let mut nonzero = 0u64;
            component_bytes(&x, i, area, |_, b| nonzero += u64::from(b != 0));
            a.expect(
                [
                    "x87 registers",
                    "xmm registers",
                    "ymm upper halves",
                    "mpx bnd",
                    "mpx csr",
                    "avx-512 opmask",
                    "zmm upper halves",
                    "zmm16-31",
                ][i],
                nonzero,
                0,
            );
        }
    }
    xsetbv(1);
}

/// Everything this VM writes, derived from its tag.
struct Values {
    dr: [u64; 4],
    dr6: u64,
    dr7: u64,
    cr2: u64,
    cr8: u64,
    msrs: [(&'static str, u32, u64); 12],
    tsc_aux: u64,
    kernel_gs: u64,
    xcr0: u64,
}

fn values(id: u64, x: Option<&Xsave>) -> Values {
    let tag = 0x1111 * (id + 1);
    let canon = |k: u64| 0xffff_8000_0000_0000 | (tag << 16) | (k << 4);
    Values {
        dr: [0, 1, 2, 3].map(|n| 0x7f00_0000_0000 + (tag << 8) + n * 8),
        dr6: 0xffff_0ff0 | ((id + 1) & 0xf),
        // DR0 a 4-byte write watchpoint (never written), enabled globally or locally by VM.
        dr7: 0x400 | 0xd0000 | if id.is_multiple_of(2) { 2 } else { 1 },
        cr2: 0xdead_0000 + tag,
        cr8: id % 14 + 1,
        msrs: [
            ("SYSENTER_CS", 0x174, 0x10 + id),
            ("SYSENTER_ESP", 0x175, canon(1)),
            ("SYSENTER_EIP", 0x176, canon(2)),
            ("DEBUGCTL", 0x1d9, if id.is_multiple_of(2) { 2 } else { 0 }),
            ("PAT", MSR_PAT, PAT_RESET | ((id % 2 * 4 + 1) << 56)),
            (
                "EFER",
                MSR_EFER,
                0x500 | 1 | if id.is_multiple_of(2) { 1 << 11 } else { 0 },
            ),
            ("STAR", 0xc000_0081, (0x0023_0010 << 32) | tag),
            ("LSTAR", 0xc000_0082, canon(3)),
            ("CSTAR", 0xc000_0083, canon(4)),
            ("FMASK", 0xc000_0084, 0x4700 + id),
            ("FS_BASE", MSR_FS_BASE, canon(5)),
            ("GS_BASE", MSR_GS_BASE, canon(6)),
        ],
        tsc_aux: tag,
        kernel_gs: canon(7),
        xcr0: x.map_or(0, |x| if id.is_multiple_of(2) { x.all } else { 3 }),
    }
}

fn write_all(a: &mut Audit, v: &Values, id: u64, x: Option<&Xsave>) {
    for n in 0..4 {
        write_dr(n, v.dr[n as usize]);
    }
    write_dr(6, v.dr6);
    write_dr(7, v.dr7);
    write_cr(2, v.cr2);
    write_cr(8, v.cr8);
    // KERNEL_GS_BASE through SWAPGS, as an OS sets up its per-CPU pointer, then GS_BASE.
    set_msr(a, "GS_BASE", MSR_GS_BASE, v.kernel_gs);
    swapgs();
    for (name, index, value) in v.msrs {
        set_msr(a, name, index, value);
    }
    set_msr(a, "TSC_AUX", MSR_TSC_AUX, v.tsc_aux);
    if x.is_some() {
        let tag = 0x1111 * (id + 1);
        // SAFETY: LOAD is this guest's own area, used only here.
        let load = unsafe { &mut *LOAD.0.get() };
        for (o, b) in load.iter_mut().enumerate() {
            *b = pattern(tag, o);
        }
        load[0..2].copy_from_slice(&0x027fu16.to_le_bytes()); // FCW
        load[2..4].fill(0); // FSW
        load[4] = 0; // abridged FTW: all empty
        load[24..28].copy_from_slice(&0x3f80u32.to_le_bytes()); // MXCSR: round down
        load[28..32].copy_from_slice(&0xffffu32.to_le_bytes()); // MXCSR_MASK (ignored)
        load[512..576].fill(0);
        load[512..520].copy_from_slice(&v.xcr0.to_le_bytes()); // XSTATE_BV
        xsetbv(v.xcr0);
        xrstor_load(v.xcr0);
    }
}

fn verify_all(a: &mut Audit, v: &Values, id: u64, x: Option<&Xsave>) {
    for n in 0..4u8 {
        a.expect(
            ["dr0", "dr1", "dr2", "dr3"][n as usize],
            read_dr(n),
            v.dr[n as usize],
        );
    }
    a.expect("dr6", read_dr(6), v.dr6);
    a.expect("dr7", read_dr(7), v.dr7);
    a.expect("cr2", read_cr(2), v.cr2);
    a.expect("cr8", read_cr(8), v.cr8);
    for (name, index, value) in v.msrs {
        a.expect(name, msr(index), value);
    }
    a.expect("TSC_AUX", msr(MSR_TSC_AUX), v.tsc_aux);
    a.expect("KERNEL_GS_BASE", msr(MSR_KERNEL_GS_BASE), v.kernel_gs);
    if let Some(x) = x {
        a.expect("xcr0", xgetbv(), v.xcr0);
        let tag = 0x1111 * (id + 1);
        xsave_all(v.xcr0);
        // SAFETY: SAVED was just written by XSAVE.
        let area = unsafe { &*SAVED.0.get() };
        a.expect(
            "fcw",
            u64::from(u16::from_le_bytes([area[0], area[1]])),
            0x27f,
        );
        a.expect(
            "mxcsr",
            u64::from(u32::from_le_bytes(area[24..28].try_into().unwrap())),
            0x3f80,
        );
        for i in 0..8 {
            if v.xcr0 & (1 << i) != 0 && (i < 2 || x.components[i].1 != 0) {
                let mut wrong = 0u64;
                component_bytes(x, i, area, |o, b| wrong += u64::from(b != pattern(tag, o)));
                a.expect(
                    [
                        "x87 registers",
                        "xmm registers",
                        "ymm upper halves",
                        "mpx bnd",
                        "mpx csr",
                        "avx-512 opmask",
                        "zmm upper halves",
                        "zmm16-31",
                    ][i],
                    wrong,
                    0,
                );
            }
        }
    }
}

fn guest_main(boot: &Boot) -> u64 {
    idt::install();
    let id = match guest::vm_info() {
        Ok(info) => u64::from(info.vm_id),
        Err(e) => {
            println!("vm_info failed: {e:?}");
            return 1;
        }
    };
    let mut audit = Audit {
        failures: 0,
        phase: "fresh VM",
    };
    check_fresh(&mut audit, boot);
    println!("fresh state checked: {} failures", audit.failures);
    let x = xsave_facts();
    let v = values(id, x.as_ref());
    audit.phase = "own values";
    write_all(&mut audit, &v, id, x.as_ref());
    verify_all(&mut audit, &v, id, x.as_ref());
    for round in 0..4 {
        guest::yield_now();
        cpuid(0, 0);
        audit.phase = [
            "after yield 1",
            "after yield 2",
            "after yield 3",
            "after yield 4",
        ][round];
        verify_all(&mut audit, &v, id, x.as_ref());
    }
    println!("audit done: {} failures", audit.failures);
    rt::report("isolation_failures", audit.failures);
    u64::from(audit.failures != 0)
}
