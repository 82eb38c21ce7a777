//! `cpu-policy`: checks what the hypervisor shows of the CPU and what it refuses.
//! - CPUID.1:ECX bit 31 (hypervisor present) set, bit 5 (VMX) clear: no nested VT-x on offer;
//! - CPUID 0x4000_0000: highest hypervisor leaf and the signature (guest_abi::CPUID_SIGNATURE);
//! - CPUID 0x4000_0001: EAX = guest_abi::ABI_VERSION;
//! - RDMSR and WRMSR of MSRs that do not exist raise #GP(0) in the guest (caught by the IDT of
//!   [`test_guests::idt`], which skips the instruction);
//! - instructions of features the CPU it sees lacks fault as on such a CPU: the VMX instructions,
//!   MONITOR/MWAIT, GETSEC, VMFUNC (#UD), RDPMC and MOV to CR4 of VMXE/PKE (#GP); XSETBV is
//!   checked like the CPU checks it; CR8 holds what is written and refuses bits 63:4; INVD runs;
//!   a non-canonical FS base is #GP, not a failed VM entry; CPUID's OSXSAVE follows CR4;
//!   single-stepping over an emulated instruction traps right after it;
//! - port I/O: a 32-bit IN zero-extends into RAX, a 16-bit IN keeps RAX's upper bits; INS and
//!   OUTS with and without REP, backwards (DF), across a page boundary, and #PF on an unmapped
//!   buffer.
//!
//! One line per check, `check NAME: ok` or `check NAME: FAIL (why)`; then the report
//! `cpu_policy_failures=N` and exit 0 only if N = 0.
#![cfg_attr(target_os = "none", no_std, no_main)]

use core::fmt;

use guest_abi::{ABI_VERSION, CPUID_LEAF_BASE, CPUID_LEAF_MAX, CPUID_SIGNATURE};
use test_guests::cpu::cpuid;
use test_guests::idt::{self, Fault, GP};
use test_guests::println;
use test_guests::rt::{self, Boot};

test_guests::entry!(guest_main);

/// MSRs that no CPU implements: one in the Intel range, one in the AMD range.
const UNKNOWN_MSRS: [u32; 2] = [0x1234, 0xC001_1234];

/// The outcome of one check: `Err` carries what was seen instead.
type Outcome = Result<(), Detail>;

/// What a failed check saw.
enum Detail {
    Value(u64),
    Signature([u8; 12]),
    NoFault,
    WrongFault(Fault),
}

impl fmt::Display for Detail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(v) => write!(f, "got {v:#x}"),
            Self::Signature(s) => write!(f, "got signature {:?}", s.escape_ascii()),
            Self::NoFault => f.write_str("no #GP"),
            Self::WrongFault(fault) => write!(
                f,
                "{} error_code={:#x} instead of #GP(0)",
                idt::name(u64::from(fault.vector)),
                fault.error_code
            ),
        }
    }
}

struct Checks {
    failures: u64,
}

impl Checks {
    fn check(&mut self, name: fmt::Arguments<'_>, outcome: Outcome) {
        match outcome {
            Ok(()) => println!("check {name}: ok"),
            Err(detail) => {
                self.failures += 1;
                println!("check {name}: FAIL ({detail})");
            }
        }
    }
}

fn expect(ok: bool, seen: u64) -> Outcome {
    if ok {
        Ok(())
    } else {
        Err(Detail::Value(seen))
    }
}

/// A refused MSR access must raise exactly #GP with error code 0.
fn expect_gp<T>(result: Result<T, Fault>) -> Outcome {
    match result {
        Ok(_) => Err(Detail::NoFault),
        Err(Fault {
            vector: GP,
            error_code: 0,
            ..
        }) => Ok(()),
        Err(fault) => Err(Detail::WrongFault(fault)),
    }
}

fn guest_main(_boot: &Boot) -> u64 {
    let mut checks = Checks { failures: 0 };

    let leaf1 = cpuid(1, 0);
    checks.check(
        format_args!("cpuid_hypervisor_bit"),
        expect(leaf1.ecx & (1 << 31) != 0, leaf1.ecx.into()),
    );
    checks.check(
        format_args!("cpuid_vmx_hidden"),
        expect(leaf1.ecx & (1 << 5) == 0, leaf1.ecx.into()),
    );

    let base = cpuid(CPUID_LEAF_BASE, 0);
    checks.check(
        format_args!("cpuid_hv_max_leaf"),
        expect(base.eax >= CPUID_LEAF_MAX, base.eax.into()),
    );
    let mut signature = [0u8; 12];
    signature[0..4].copy_from_slice(&base.ebx.to_le_bytes());
    signature[4..8].copy_from_slice(&base.ecx.to_le_bytes());
    signature[8..12].copy_from_slice(&base.edx.to_le_bytes());
    checks.check(
        format_args!("cpuid_hv_signature"),
        if &signature == CPUID_SIGNATURE {
            Ok(())
        } else {
            Err(Detail::Signature(signature))
        },
    );

    let version = cpuid(CPUID_LEAF_BASE + 1, 0);
    checks.check(
        format_args!("cpuid_abi_version"),
        expect(version.eax == ABI_VERSION, version.eax.into()),
    );

    for msr in UNKNOWN_MSRS {
        checks.check(
            format_args!("rdmsr_{msr:#x}_gp"),
            expect_gp(idt::rdmsr(msr)),
        );
        // SAFETY: the MSR does not exist, so the write cannot change anything even if it went
        // through; the #GP it must raise is caught.
        let written = unsafe { idt::wrmsr(msr, 0x1234_5678_9abc_def0) };
        checks.check(format_args!("wrmsr_{msr:#x}_gp"), expect_gp(written));
    }

    instructions(&mut checks);
    port_io(&mut checks);

    println!("cpu-policy: {} failures", checks.failures);
    rt::report("cpu_policy_failures", checks.failures);
    u64::from(checks.failures != 0)
}

/// The outcome of one instruction probe: `want` is the exception vector it must raise (with
/// error code 0 for #GP), or `None` for no fault.
fn expect_vector<T>(result: Result<T, Fault>, want: Option<u8>) -> Outcome {
    match (result, want) {
        (Ok(_), None) => Ok(()),
        (Ok(_), Some(_)) => Err(Detail::NoFault),
        (Err(f), Some(v)) if f.vector == v && (v != GP || f.error_code == 0) => Ok(()),
        (Err(f), _) => Err(Detail::WrongFault(f)),
    }
}

/// Runs the bytes of one instruction (`len` bytes, with RAX/RBX/RCX/RDX as given) and returns
/// the fault it raised, if any.
macro_rules! insn {
    ($len:expr, $bytes:literal, $rax:expr, $rcx:expr, $rdx:expr) => {
        // SAFETY: each probed instruction either faults (caught and skipped by the IDT) or only
        // changes this VM's own state as the check intends; RBX points at a scratch buffer.
        idt::fault_of($len, || unsafe {
            let scratch = [0u64; 4];
            core::arch::asm!(
                "push rbx",
                "mov rbx, {s}",
                $bytes,
                "pop rbx",
                s = in(reg) scratch.as_ptr(),
                inout("rax") $rax => _,
                inout("rcx") $rcx => _,
                inout("rdx") $rdx => _,
            )
        })
    };
}

fn instructions(checks: &mut Checks) {
    const UDV: Option<u8> = Some(idt::UD);
    const GPV: Option<u8> = Some(GP);
    let buf = [0u64; 8];
    let p = buf.as_ptr() as u64;
    let ud = [
        (
            "vmxon",
            insn!(4, ".byte 0xf3, 0x0f, 0xc7, 0x30", p, 0u64, 0u64),
        ),
        (
            "vmxoff",
            insn!(3, ".byte 0x0f, 0x01, 0xc4", 0u64, 0u64, 0u64),
        ),
        (
            "vmclear",
            insn!(4, ".byte 0x66, 0x0f, 0xc7, 0x30", p, 0u64, 0u64),
        ),
        ("vmptrld", insn!(3, ".byte 0x0f, 0xc7, 0x30", p, 0u64, 0u64)),
        ("vmptrst", insn!(3, ".byte 0x0f, 0xc7, 0x38", p, 0u64, 0u64)),
        (
            "vmread",
            insn!(3, ".byte 0x0f, 0x78, 0xd8", 0u64, 0u64, 0u64),
        ),
        (
            "vmwrite",
            insn!(3, ".byte 0x0f, 0x79, 0xd8", 0u64, 0u64, 0u64),
        ),
        (
            "vmlaunch",
            insn!(3, ".byte 0x0f, 0x01, 0xc2", 0u64, 0u64, 0u64),
        ),
        (
            "vmresume",
            insn!(3, ".byte 0x0f, 0x01, 0xc3", 0u64, 0u64, 0u64),
        ),
        (
            "invept",
            insn!(5, ".byte 0x66, 0x0f, 0x38, 0x80, 0x03", 1u64, 0u64, 0u64),
        ),
        (
            "invvpid",
            insn!(5, ".byte 0x66, 0x0f, 0x38, 0x81, 0x03", 1u64, 0u64, 0u64),
        ),
        (
            "vmfunc",
            insn!(3, ".byte 0x0f, 0x01, 0xd4", 0u64, 0u64, 0u64),
        ),
        ("getsec", insn!(2, ".byte 0x0f, 0x37", 0u64, 0u64, 0u64)),
        ("monitor", insn!(3, ".byte 0x0f, 0x01, 0xc8", p, 0u64, 0u64)),
        (
            "mwait",
            insn!(3, ".byte 0x0f, 0x01, 0xc9", 0u64, 0u64, 0u64),
        ),
    ];
    for (name, result) in ud {
        checks.check(format_args!("{name}_ud"), expect_vector(result, UDV));
    }
    checks.check(
        format_args!("rdpmc_gp"),
        expect_vector(insn!(2, ".byte 0x0f, 0x33", 0u64, 0u64, 0u64), GPV),
    );
    checks.check(
        format_args!("invd_runs"),
        expect_vector(insn!(2, ".byte 0x0f, 0x08", 0u64, 0u64, 0u64), None),
    );
    let leaf1 = cpuid(1, 0);
    checks.check(
        format_args!("cpuid_monitor_hidden"),
        expect(leaf1.ecx & (1 << 3) == 0, leaf1.ecx.into()),
    );
    checks.check(
        format_args!("cpuid_osxsave_clear_before_cr4"),
        expect(leaf1.ecx & (1 << 27) == 0, leaf1.ecx.into()),
    );

    // MOV to CR4 (0F 22 E0 = mov cr4, rax) of VMXE or PKE: #GP, CR4 unchanged.
    let cr4: u64;
    // SAFETY: reading CR4 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr4", out(reg) cr4) };
    for (name, bit) in [("vmxe", 13), ("pke", 22)] {
        checks.check(
            format_args!("mov_cr4_{name}_gp"),
            expect_vector(
                insn!(3, ".byte 0x0f, 0x22, 0xe0", cr4 | (1u64 << bit), 0u64, 0u64),
                GPV,
            ),
        );
    }
    let after: u64;
    // SAFETY: as above.
    unsafe { core::arch::asm!("mov {}, cr4", out(reg) after) };
    checks.check(format_args!("cr4_unchanged"), expect(after == cr4, after));

    // CR8: 44 0F 22 C0 = mov cr8, rax; 44 0F 20 C0 = mov rax, cr8.
    checks.check(
        format_args!("mov_cr8_reserved_gp"),
        expect_vector(
            insn!(4, ".byte 0x44, 0x0f, 0x22, 0xc0", 16u64, 0u64, 0u64),
            GPV,
        ),
    );
    checks.check(
        format_args!("mov_cr8_5"),
        expect_vector(
            insn!(4, ".byte 0x44, 0x0f, 0x22, 0xc0", 5u64, 0u64, 0u64),
            None,
        ),
    );
    let tpr: u64;
    // SAFETY: reading CR8 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr8", out(reg) tpr) };
    checks.check(format_args!("cr8_reads_back"), expect(tpr == 5, tpr));
    // SAFETY: restores the reset TPR.
    unsafe { core::arch::asm!("mov cr8, {}", in(reg) 0u64) };

    // XSETBV (0F 01 D1) as the CPU checks it, with CR4.OSXSAVE set.
    if leaf1.ecx & (1 << 26) != 0 {
        // SAFETY: sets CR4.OSXSAVE, which CPUID says the CPU has.
        unsafe { core::arch::asm!("mov cr4, {}", in(reg) cr4 | (1 << 18)) };
        let osxsave = cpuid(1, 0).ecx;
        checks.check(
            format_args!("cpuid_osxsave_follows_cr4"),
            expect(osxsave & (1 << 27) != 0, osxsave.into()),
        );
        for (name, value, index, want) in [
            ("xsetbv_no_x87_gp", 2u64, 0u64, GPV),
            ("xsetbv_avx_without_sse_gp", 5, 0, GPV),
            ("xsetbv_xcr1_gp", 1, 1, GPV),
            ("xsetbv_unoffered_bit_gp", 1 | (1 << 9), 0, GPV),
            ("xsetbv_sse_ok", 3, 0, None),
        ] {
            let r = insn!(3, ".byte 0x0f, 0x01, 0xd1", value, index, 0u64);
            checks.check(format_args!("{name}"), expect_vector(r, want));
        }
        let (lo, hi): (u32, u32);
        // SAFETY: XGETBV of XCR0 with CR4.OSXSAVE set.
        unsafe { core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi) };
        let xcr0 = u64::from(lo) | (u64::from(hi) << 32);
        checks.check(format_args!("xgetbv_reads_back"), expect(xcr0 == 3, xcr0));
    }

    // Single-stepping over an instruction the hypervisor emulates (CPUID): the #DB trap comes
    // right after it, as on the CPU.
    let mut after: u64 = 0;
    let trap = idt::trap_of(|| {
        // SAFETY: sets TF for one instruction (CPUID), whose #DB the probe catches and clears.
        unsafe {
            core::arch::asm!(
                "push rbx",
                "pushfq",
                "or qword ptr [rsp], 0x100",
                "popfq",
                "cpuid",
                "2:",
                "lea {after}, [rip + 2b]",
                "pop rbx",
                after = out(reg) after,
                inout("eax") 0u32 => _,
                inout("ecx") 0u32 => _,
                out("edx") _,
            )
        }
    });
    checks.check(
        format_args!("single_step_over_cpuid_db"),
        match trap {
            Err(f) if f.vector == 1 && f.rip == after => Ok(()),
            Err(f) => Err(Detail::WrongFault(f)),
            Ok(()) => Err(Detail::NoFault),
        },
    );

    // A non-canonical FS base: #GP in the guest (a failed VM entry before).
    // SAFETY: the write must fault; if it went through, only this VM's FS base would change.
    let written = unsafe { idt::wrmsr(0xc000_0100, 0x8000_0000_0000) };
    checks.check(
        format_args!("wrmsr_fs_base_noncanonical_gp"),
        expect_gp(written),
    );
}

fn port_io(checks: &mut Checks) {
    // IN EAX, DX (ED) from a port without a device: all ones, zero-extended into RAX.
    let mut rax: u64 = 0xdead_beef_0000_0000;
    // SAFETY: port 0x80 has no device in our VMs; the IN only sets RAX.
    unsafe { core::arch::asm!("in eax, dx", inout("rax") rax, in("dx") 0x80u16) };
    checks.check(
        format_args!("in32_zero_extends"),
        expect(rax == 0xffff_ffff, rax),
    );
    let mut rax: u64 = 0x1111_2222_3333_4444;
    // SAFETY: as above; IN AX keeps RAX's upper 48 bits.
    unsafe { core::arch::asm!("in ax, dx", inout("rax") rax, in("dx") 0x80u16) };
    checks.check(
        format_args!("in16_keeps_upper_bits"),
        expect(rax == 0x1111_2222_3333_ffff, rax),
    );

    // REP INSB of 100 bytes from an empty port: all 0xFF, RCX 0, RDI advanced.
    let mut buf = [0u8; 128];
    let (mut rdi, mut rcx) = (buf.as_mut_ptr() as u64, 100u64);
    // SAFETY: writes 100 bytes into `buf`, which has 128.
    unsafe { core::arch::asm!("rep insb", inout("rdi") rdi, inout("rcx") rcx, in("dx") 0x80u16) };
    let filled = buf[..100].iter().all(|&b| b == 0xff) && buf[100] == 0;
    checks.check(
        format_args!("rep_insb"),
        expect(filled && rcx == 0 && rdi == buf.as_ptr() as u64 + 100, rcx),
    );
    // INSW backwards (DF=1): two bytes at RDI, then RDI moves down by 2.
    let mut words = [0u16; 4];
    let mut rdi = &raw mut words[2] as u64;
    // SAFETY: writes words[2]; DF is cleared again right after.
    unsafe { core::arch::asm!("std", "insw", "cld", inout("rdi") rdi, in("dx") 0x80u16) };
    checks.check(
        format_args!("insw_backwards"),
        expect(
            words == [0, 0, 0xffff, 0] && rdi == &raw const words[1] as u64,
            rdi,
        ),
    );
    // REP INSB across a page boundary (16 bytes on each side).
    #[repr(C, align(4096))]
    struct TwoPages([u8; 8192]);
    let mut pages = TwoPages([0; 8192]);
    let (mut rdi, mut rcx) = (pages.0.as_mut_ptr() as u64 + 4096 - 16, 32u64);
    // SAFETY: writes 32 bytes inside `pages`.
    unsafe { core::arch::asm!("rep insb", inout("rdi") rdi, inout("rcx") rcx, in("dx") 0x80u16) };
    let ok =
        pages.0[4080..4112].iter().all(|&b| b == 0xff) && pages.0[4079] == 0 && pages.0[4112] == 0;
    checks.check(
        format_args!("rep_insb_across_pages"),
        expect(ok && rcx == 0, rdi),
    );
    // INSB into memory the guest's page tables do not map (they map 4 GiB): #PF, write.
    let unmapped = 8u64 << 30;
    let fault = idt::fault_of(1, || {
        // SAFETY: the access must fault (#PF, caught and skipped); nothing is written.
        unsafe { core::arch::asm!("insb", inout("rdi") unmapped => _, in("dx") 0x80u16) }
    });
    checks.check(
        format_args!("insb_unmapped_pf"),
        match fault {
            Err(f) if f.vector == idt::PF && f.error_code & 0b11 == 0b10 => Ok(()),
            Err(f) => Err(Detail::WrongFault(f)),
            Ok(()) => Err(Detail::NoFault),
        },
    );
    // REP OUTSB to the UART's transmit register prints a console line.
    let line = b"cpu-policy: hello through rep outsb\n";
    let (mut rsi, mut rcx) = (line.as_ptr() as u64, line.len() as u64);
    // SAFETY: reads `line`; the port is the VM's emulated UART.
    unsafe { core::arch::asm!("rep outsb", inout("rsi") rsi, inout("rcx") rcx, in("dx") 0x3f8u16) };
    checks.check(
        format_args!("rep_outsb"),
        expect(
            rcx == 0 && rsi == line.as_ptr() as u64 + line.len() as u64,
            rcx,
        ),
    );
}
