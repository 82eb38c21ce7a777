//! `cpu-policy`: checks what the hypervisor shows of the CPU and what it refuses.
//! - CPUID.1:ECX bit 31 (hypervisor present) set, bit 5 (VMX) clear: no nested VT-x on offer;
//! - CPUID 0x4000_0000: highest hypervisor leaf and the signature (guest_abi::CPUID_SIGNATURE);
//! - CPUID 0x4000_0001: EAX = guest_abi::ABI_VERSION;
//! - RDMSR and WRMSR of MSRs that do not exist raise #GP(0) in the guest (caught by the IDT of
//!   [`test_guests::idt`], which skips the instruction).
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

    println!("cpu-policy: {} failures", checks.failures);
    rt::report("cpu_policy_failures", checks.failures);
    u64::from(checks.failures != 0)
}
