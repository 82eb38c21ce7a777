//! Every exit reason against the fake vCPU: what the guest sees afterwards (registers, RIP,
//! injected events, its console) and what the kernel is told to do.

use alloc::{string::String, vec::Vec};

use guest_abi::{ExitKind, Hypercall, HypercallError};
use hv_manifest::VmConfig;
use hv_vmx::exit::{
    reason, CrAccess, EptViolation, InterruptedEvent, Interruption, IoExit, VmExit,
};

use super::*;
use crate::clock::GuestClock;
use crate::memory::tests::FlatPhys;
use crate::sched::VmState;
use crate::vcpu::fake::FakeVcpu;
use hv_platform::rtc::DateTime;
use hv_platform::{Platform, Timebase};

const PAGES: u64 = 4;
const TSC_HZ: u64 = 1_000_000_000;
const BOOT: DateTime = DateTime {
    year: 2026,
    month: 12,
    day: 2,
    hour: 12,
    minute: 0,
    second: 0,
};

struct Rig {
    vm: Vm,
    memory: GuestMemory,
    cpu: FakeVcpu,
    policy: CpuPolicy,
    multiplexed: bool,
}

impl Rig {
    fn new() -> Self {
        let config = VmConfig {
            name: String::from("alpha"),
            memory_mib: 1,
            image: String::from("img"),
            cmdline: String::new(),
            modules: Vec::new(),
            linux: false,
            initrd: None,
            debug_exit_port: Some(0x500),
            test_device: false,
            quantum_us: 1000,
            vcpus: 1,
            sharing_domain: 0,
            time_dilation_milli: 1000,
            cpu_share: 1,
            idle_reclaim: true,
            line: None,
        };
        // Guest page n is host frame n: identity, for readable tests.
        let memory = GuestMemory::new((0..PAGES).map(|p| p * 4096).collect());
        let mut cpu = FakeVcpu::new(FlatPhys(alloc::vec![0; (PAGES * 4096) as usize]));
        cpu.state.insert("cr0", 0x8001_0033);
        cpu.state.insert("cr0_shadow", 0x8001_0033);
        let policy = CpuPolicy::from_host(FakeVcpu::cpuid);
        Self {
            vm: Vm::new(
                7,
                &config,
                PAGES * 4096,
                Platform::new(Timebase::new(TSC_HZ), 0, BOOT).unwrap(),
                GuestClock::host(),
            ),
            memory,
            cpu,
            policy,
            multiplexed: false,
        }
    }

    fn exit(&mut self, exit: VmExit) -> Next {
        self.exit_during(exit, None)
    }

    fn exit_during(&mut self, exit: VmExit, interrupted: Option<InterruptedEvent>) -> Next {
        let ctx = ExitContext {
            cpu_policy: &self.policy,
            multiplexed: self.multiplexed,
        };
        handle(
            &mut self.vm,
            &self.memory,
            &mut self.cpu,
            &ctx,
            exit,
            interrupted,
        )
    }

    /// WRMSR of `value` to `index`.
    fn wrmsr(&mut self, index: u32, value: u64) -> Next {
        self.cpu.regs.rcx = index.into();
        self.cpu.regs.set_edx_eax(value);
        self.exit(VmExit::Wrmsr)
    }

    /// RDMSR of `index`: EDX:EAX after it.
    fn rdmsr(&mut self, index: u32) -> u64 {
        self.cpu.regs.rcx = index.into();
        self.exit(VmExit::Rdmsr);
        self.cpu.regs.edx_eax()
    }

    /// The check before a VM entry, at the fake vCPU's TSC.
    fn before_entry(&mut self) {
        let now = self.cpu.tsc;
        before_entry(&mut self.vm, &mut self.cpu, now);
    }

    fn console(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        self.vm.drain_console(|l| lines.push(String::from(l)));
        lines
    }

    fn count(&self, kind: ExitKind) -> u64 {
        self.vm.acct.stats.exits[kind as usize]
    }
}

const GP: (Interruption, u32) = (
    Interruption {
        vector: 13,
        kind: Interruption::HARDWARE_EXCEPTION,
        has_error_code: true,
    },
    0,
);
const UD: (Interruption, u32) = (
    Interruption {
        vector: 6,
        kind: Interruption::HARDWARE_EXCEPTION,
        has_error_code: false,
    },
    0,
);

#[test]
fn cpuid_is_answered_by_the_policy_and_completes() {
    let mut r = Rig::new();
    r.cpu.regs.rax = 1;
    r.cpu.regs.rcx = 0;
    r.cpu.state.insert("cr4", crate::policy::CR4_OSXSAVE);
    assert_eq!(r.exit(VmExit::Cpuid), Next::Reenter);
    assert_eq!(r.cpu.rip(), 0x1002);
    // ECX bit 5 (VMX) hidden, bit 27 (OSXSAVE) follows the guest's CR4.
    assert_eq!(r.cpu.regs.rcx & (1 << 5), 0);
    assert_ne!(r.cpu.regs.rcx & (1 << 27), 0);
    r.cpu.regs.rax = 1;
    r.cpu.state.insert("cr4", 0);
    r.exit(VmExit::Cpuid);
    assert_eq!(r.cpu.regs.rcx & (1 << 27), 0);
    assert_eq!(r.count(ExitKind::Cpuid), 2);
    assert!(r.cpu.injected.is_empty());
}

#[test]
fn an_emulated_instruction_under_tf_single_steps() {
    let mut r = Rig::new();
    r.cpu.state.insert("rflags", 2 | rflags::TF);
    r.exit(VmExit::Cpuid);
    assert_eq!(r.cpu.single_steps, 1);
}

#[test]
fn hypercalls_print_exit_and_fail_cleanly() {
    let mut r = Rig::new();
    r.cpu.phys.0[0x500..0x506].copy_from_slice(b"hello\n");
    r.cpu.regs.rax = Hypercall::ConsoleWrite as u64;
    (r.cpu.regs.rdi, r.cpu.regs.rsi) = (0x500, 6);
    assert_eq!(r.exit(VmExit::Vmcall), Next::Resume);
    assert_eq!(r.cpu.regs.rax, 6);
    assert_eq!(r.console(), ["alpha | hello\n"]);
    // A buffer outside memory: an error code, nothing else.
    r.cpu.regs.rax = Hypercall::ConsoleWrite as u64;
    (r.cpu.regs.rdi, r.cpu.regs.rsi) = (PAGES * 4096 - 2, 6);
    assert_eq!(r.exit(VmExit::Vmcall), Next::Resume);
    assert_eq!(r.cpu.regs.rax, HypercallError::BadAddress.to_rax());
    r.cpu.regs.rax = 999;
    r.exit(VmExit::Vmcall);
    assert_eq!(r.cpu.regs.rax, HypercallError::UnknownCall.to_rax());
    r.cpu.regs.rax = Hypercall::Yield as u64;
    assert_eq!(r.exit(VmExit::Vmcall), Next::Reschedule);
    r.cpu.regs.rax = Hypercall::Exit as u64;
    r.cpu.regs.rdi = 3;
    let rip = r.cpu.rip();
    assert_eq!(r.exit(VmExit::Vmcall), Next::Stopped);
    assert_eq!(r.vm.state, VmState::Exited(3));
    assert_eq!(r.cpu.rip(), rip, "an exit does not return");
    assert_eq!(r.count(ExitKind::Vmcall), 5);
}

#[test]
fn a_hypercall_buffer_the_engine_holds_is_faulted_in_first() {
    let mut r = Rig::new();
    r.memory.set_page(1, None);
    r.cpu.regs.rax = Hypercall::ConsoleWrite as u64;
    (r.cpu.regs.rdi, r.cpu.regs.rsi) = (0xff0, 0x20);
    let rip = r.cpu.rip();
    assert_eq!(
        r.exit(VmExit::Vmcall),
        Next::HypercallFault {
            gpa: 0x1000,
            write: false
        }
    );
    assert_eq!(r.cpu.rip(), rip, "nothing done yet");
    assert!(r.console().is_empty());
}

fn io(port: u16, size: u8, is_in: bool) -> VmExit {
    VmExit::Io(IoExit {
        size,
        is_in,
        string: false,
        rep: false,
        port,
    })
}

#[test]
fn port_io_reaches_the_uart_and_unknown_ports_float() {
    let mut r = Rig::new();
    r.cpu.regs.rax = 0xdead_beef_0000_0000 | u64::from(b'x');
    assert_eq!(r.exit(io(0x3f8, 1, false)), Next::Resume);
    r.cpu.regs.rax = u64::from(b'\n');
    r.exit(io(0x3f8, 1, false));
    assert_eq!(r.console(), ["alpha | x\n"]);
    // IN AL keeps the rest of RAX; IN AX from the UART's LSR+MSR lanes.
    r.cpu.regs.rax = 0x1234_5678_9abc_def0;
    r.exit(io(0x80, 1, true));
    assert_eq!(r.cpu.regs.rax, 0x1234_5678_9abc_deff);
    r.exit(io(0x3fd, 2, true));
    assert_eq!(r.cpu.regs.rax, 0x1234_5678_9abc_b060);
    // IN EAX zero-extends into RAX.
    r.exit(io(0x80, 4, true));
    assert_eq!(r.cpu.regs.rax, 0xffff_ffff);
    assert_eq!(r.count(ExitKind::Io), 5);
    assert_eq!(r.cpu.rip(), 0x1000 + 5 * 2);
}

#[test]
fn the_test_exit_device_ends_the_vm_with_the_value_written() {
    // The rig's VM has it at 0x500..=0x503; reads there float like any unclaimed port.
    let mut r = Rig::new();
    r.cpu.regs.rax = 0x1234;
    assert_eq!(r.exit(io(0x500, 1, true)), Next::Resume);
    assert_eq!(r.cpu.regs.rax, 0x12ff);
    r.cpu.regs.rax = 0xffff_ff03;
    assert_eq!(r.exit(io(0x502, 1, false)), Next::Stopped);
    assert_eq!(r.vm.state, VmState::Exited(3));
    let mut r = Rig::new();
    r.cpu.regs.rax = 0x1_0000_0001;
    assert_eq!(r.exit(io(0x500, 4, false)), Next::Stopped);
    assert_eq!(r.vm.state, VmState::Exited(1));
    // Next door is an ordinary (unclaimed) port.
    let mut r = Rig::new();
    assert_eq!(r.exit(io(0x504, 4, false)), Next::Resume);
    assert_eq!(r.vm.state, VmState::Runnable);
}

#[test]
fn string_io_faults_like_the_cpu_on_an_unmapped_address() {
    let mut r = Rig::new();
    // CR3 = page 0, all zero: nothing is mapped.
    r.cpu.state.insert("cr3", 0);
    r.cpu.regs.rcx = 5;
    let ins = VmExit::StringIo {
        io: IoExit {
            size: 1,
            is_in: true,
            string: true,
            rep: true,
            port: 0x3f8,
        },
        linear: 0x40_0000,
        address_mask: u64::MAX,
    };
    assert_eq!(r.exit(ins), Next::Resume);
    let (event, code) = r.cpu.injected[0];
    assert_eq!((event.vector, code), (14, 2), "#PF, write, not present");
    assert_eq!(r.cpu.cr2, 0x40_0000);
    assert_eq!(r.cpu.regs.rcx, 5, "no iteration done");
    assert_eq!(r.cpu.rip(), 0x1000, "the instruction restarts");
}

#[test]
fn rep_ins_with_32_bit_addresses_zero_extends_rdi_and_rcx() {
    let mut r = Rig::new();
    // PML4 at 0, PDPT at 0x1000, PD at 0x2000 with one 2 MiB page at 0: identity.
    let put = |r: &mut Rig, gpa: u64, v: u64| {
        r.memory
            .write(&mut r.cpu.phys, gpa, &v.to_le_bytes())
            .unwrap()
    };
    put(&mut r, 0, 0x1000 | 3);
    put(&mut r, 0x1000, 0x2000 | 3);
    put(&mut r, 0x2000, (1 << 7) | 3);
    r.cpu.state.insert("cr3", 0);
    r.cpu.regs.rdi = 0xffff_ffff_0000_3000;
    r.cpu.regs.rcx = 0x1_0000_0002;
    let ins = VmExit::StringIo {
        io: IoExit {
            size: 1,
            is_in: true,
            string: true,
            rep: true,
            port: 0x80,
        },
        linear: 0x3000,
        address_mask: 0xffff_ffff,
    };
    assert_eq!(r.exit(ins), Next::Resume);
    assert!(r.cpu.injected.is_empty());
    assert_eq!(r.cpu.phys.0[0x3000..0x3003], [0xff, 0xff, 0]);
    assert_eq!(r.cpu.regs.rdi, 0x3002, "EDI written: bits 63:32 cleared");
    assert_eq!(r.cpu.regs.rcx, 0, "ECX counted to 0: bits 63:32 cleared");
    assert_eq!(r.cpu.rip(), 0x1002);
}

#[test]
fn msrs_follow_their_home_and_the_cpus_checks() {
    let mut r = Rig::new();
    const STAR: u32 = 0xc000_0081;
    const LSTAR: u32 = 0xc000_0082;
    const EFER: u32 = 0xc000_0080;
    r.cpu.regs.rcx = STAR.into();
    r.cpu.regs.set_edx_eax(0x0023_0010_0000_0000);
    assert_eq!(r.exit(VmExit::Wrmsr), Next::Resume);
    assert_eq!(r.cpu.cpu_msrs[&STAR], 0x0023_0010_0000_0000);
    r.cpu.regs.set_edx_eax(0);
    r.exit(VmExit::Rdmsr);
    assert_eq!(r.cpu.regs.edx_eax(), 0x0023_0010_0000_0000);
    // A non-canonical LSTAR: #GP, nothing written.
    r.cpu.regs.rcx = LSTAR.into();
    r.cpu.regs.set_edx_eax(0x8000_0000_0000_0000);
    let rip = r.cpu.rip();
    r.exit(VmExit::Wrmsr);
    assert_eq!(r.cpu.injected.pop(), Some(GP));
    assert!(!r.cpu.cpu_msrs.contains_key(&LSTAR));
    assert_eq!(r.cpu.rip(), rip);
    // EFER lives in the vCPU's hardware state.
    r.cpu.msrs.insert(EFER, 0x500);
    r.cpu.regs.rcx = EFER.into();
    r.exit(VmExit::Rdmsr);
    assert_eq!(r.cpu.regs.edx_eax(), 0x500);
    r.cpu.regs.set_edx_eax(0x501);
    r.exit(VmExit::Wrmsr);
    assert_eq!(r.cpu.msrs[&EFER], 0x501, "SCE set");
    // An MSR the CPU model does not have.
    r.cpu.regs.rcx = 0x1234;
    r.exit(VmExit::Rdmsr);
    assert_eq!(r.cpu.injected.pop(), Some(GP));
    // The TSC.
    r.cpu.regs.rcx = 0x10;
    r.exit(VmExit::Rdmsr);
    assert_eq!(r.cpu.regs.edx_eax(), r.cpu.tsc);
    assert_eq!(r.count(ExitKind::MsrRead), 4);
    assert_eq!(r.count(ExitKind::MsrWrite), 3);
}

#[test]
fn control_register_exits() {
    let mut r = Rig::new();
    r.cpu.regs.r9 = 0xa;
    assert_eq!(
        r.exit(VmExit::CrAccess(CrAccess::MovTo { cr: 8, gpr: 9 })),
        Next::Resume
    );
    r.exit(VmExit::CrAccess(CrAccess::MovFrom { cr: 8, gpr: 4 }));
    assert_eq!(r.cpu.state["rsp"], 0xa, "RSP is the vCPU's");
    r.cpu.regs.rax = 0x10;
    r.exit(VmExit::CrAccess(CrAccess::MovTo { cr: 8, gpr: 0 }));
    assert_eq!(r.cpu.injected.pop(), Some(GP), "CR8 bits 63:4 are reserved");
    r.cpu.state.insert("rflags", 0x2);
    r.exit(VmExit::CrAccess(CrAccess::MovTo { cr: 4, gpr: 0 }));
    assert_eq!(r.cpu.injected.pop(), Some(GP));
    // A fault's saved RFLAGS has RF set (kvm-unit-tests' idt_test checks it).
    assert_eq!(r.cpu.read(Reg::Rflags), 0x2 | rflags::RF);
    // MOV to CR0 reaches cpu_mode (cpu_mode/tests.rs has the rules): PG without PE faults.
    r.cpu.regs.rax = 1 << 31;
    r.exit(VmExit::CrAccess(CrAccess::MovTo { cr: 0, gpr: 0 }));
    assert_eq!(r.cpu.injected.pop(), Some(GP));
    assert_eq!(
        r.exit(VmExit::CrAccess(CrAccess::Clts)),
        Next::Stopped,
        "CLTS cannot touch the host-owned CR0 bits: a hypervisor bug"
    );
    assert_eq!(r.vm.state, VmState::Failed);
}

#[test]
fn xsetbv_is_checked_and_loaded() {
    let mut r = Rig::new();
    r.cpu.regs.rcx = 0;
    r.cpu.regs.set_edx_eax(0b111);
    assert_eq!(r.exit(VmExit::Xsetbv), Next::Resume);
    assert_eq!(r.cpu.xcr0, 0b111);
    // x87 cleared: #GP, XCR0 unchanged.
    r.cpu.regs.set_edx_eax(0b110);
    r.exit(VmExit::Xsetbv);
    assert_eq!(r.cpu.injected.pop(), Some(GP));
    assert_eq!(r.cpu.xcr0, 0b111);
    r.cpu.regs.rcx = 1;
    r.cpu.regs.set_edx_eax(1);
    r.exit(VmExit::Xsetbv);
    assert_eq!(r.cpu.injected.pop(), Some(GP), "XCR1 does not exist");
}

#[test]
fn instructions_of_hidden_features_raise_what_the_cpu_model_would() {
    for raw in [
        reason::VMXON,
        reason::VMCLEAR,
        reason::INVEPT,
        reason::MONITOR,
        reason::MWAIT,
        reason::GETSEC,
        reason::RSM,
        reason::ENCLS,
        reason::INVPCID,
        reason::TPAUSE,
    ] {
        let mut r = Rig::new();
        assert_eq!(r.exit(VmExit::Unavailable { reason: raw }), Next::Resume);
        assert_eq!(r.cpu.injected, [UD], "reason {raw}");
        assert_eq!(
            r.cpu.rip(),
            0x1000,
            "a fault does not complete the instruction"
        );
    }
    let mut r = Rig::new();
    r.exit(VmExit::Rdpmc);
    assert_eq!(r.cpu.injected, [GP]);
    let mut r = Rig::new();
    r.exit(VmExit::Invd);
    assert_eq!(r.cpu.caches_written_back, 1, "INVD writes back, as WBINVD");
    assert_eq!(r.cpu.rip(), 0x1002);
}

#[test]
fn host_events_are_acknowledged_and_the_guest_resumes() {
    let mut r = Rig::new();
    assert_eq!(
        r.exit(VmExit::ExternalInterrupt { vector: Some(0x30) }),
        Next::Resume
    );
    assert_eq!(r.cpu.host_interrupts, [0x30]);
    let nmi = Interruption {
        vector: 2,
        kind: Interruption::NMI,
        has_error_code: false,
    };
    assert_eq!(r.exit(VmExit::ExceptionOrNmi(nmi)), Next::Resume);
    assert_eq!(r.cpu.host_nmis, 1);
    assert_eq!(
        r.exit(VmExit::HostEvent {
            reason: reason::INIT_SIGNAL
        }),
        Next::Resume
    );
    assert_eq!(
        r.exit(VmExit::PreemptionTimer),
        Next::Resume,
        "the run loop ends the quantum by its deadline"
    );
    assert!(r.cpu.injected.is_empty(), "nothing reaches the guest");
    assert_eq!(r.cpu.rip(), 0x1000);
    assert_eq!(r.count(ExitKind::ExternalInterrupt), 1);
    assert_eq!(r.count(ExitKind::PreemptionTimer), 1);
}

#[test]
fn an_event_whose_delivery_was_interrupted_is_delivered_again() {
    let mut r = Rig::new();
    let pf = InterruptedEvent {
        event: Interruption::exception(14, true),
        error_code: 6,
        instruction_len: 0,
    };
    assert_eq!(
        r.exit_during(VmExit::ExternalInterrupt { vector: Some(0x30) }, Some(pf)),
        Next::Resume
    );
    assert_eq!(r.cpu.injected, [(Interruption::exception(14, true), 6)]);
    // Not when the VM stops.
    let mut r = Rig::new();
    let ept = VmExit::EptViolation {
        gpa: 1 << 40,
        violation: EptViolation::from_qualification(2),
    };
    assert_eq!(r.exit_during(ept, Some(pf)), Next::Stopped);
    assert!(r.cpu.injected.is_empty());
}

#[test]
fn ept_violations_are_the_engines_inside_memory_and_stop_where_nothing_can_be_emulated() {
    let mut r = Rig::new();
    r.multiplexed = true;
    let write = EptViolation::from_qualification(0b10);
    assert_eq!(
        r.exit(VmExit::EptViolation {
            gpa: 0x2010,
            violation: write
        }),
        Next::GuestFault {
            gpa: 0x2010,
            write: true
        }
    );
    assert_eq!(r.vm.state, VmState::Runnable);
    // Outside memory, the instruction must be emulated: RIP 0 holds no page tables' worth of
    // code here, so the fetch fails and the VM stops with a report.
    assert_eq!(
        r.exit(VmExit::EptViolation {
            gpa: 0xfee0_0000,
            violation: write
        }),
        Next::Stopped
    );
    assert_eq!(r.vm.state, VmState::Failed);
    // Without the engine, a violation inside memory is a stop too.
    let mut r = Rig::new();
    assert_eq!(
        r.exit(VmExit::EptViolation {
            gpa: 0x2010,
            violation: write
        }),
        Next::Stopped
    );
}

#[test]
fn fatal_exits_stop_the_vm_with_a_report() {
    for exit in [
        VmExit::TripleFault,
        VmExit::EntryFailure {
            reason: reason::ENTRY_FAIL_GUEST_STATE,
            qualification: 0,
        },
        VmExit::Other {
            reason: reason::APIC_WRITE,
        },
        VmExit::EptMisconfiguration { gpa: 0 },
        VmExit::ExceptionOrNmi(Interruption::exception(14, true)),
    ] {
        let mut r = Rig::new();
        assert_eq!(r.exit(exit), Next::Stopped, "{exit:?}");
        assert_eq!(r.vm.state, VmState::Failed, "{exit:?}");
        assert_eq!(r.count(ExitKind::Other), 1);
    }
}

#[test]
fn hlt_completes_and_blocks_until_an_interrupt_it_can_take() {
    let mut r = Rig::new();
    r.cpu.tsc = 0;
    r.cpu.state.insert("rflags", 2 | rflags::IF);
    r.cpu
        .state
        .insert("interruptibility", interruptibility::STI);
    assert_eq!(r.exit(VmExit::Hlt), Next::Halt);
    assert_eq!(r.cpu.rip(), 0x1002);
    assert_eq!(
        r.cpu.state["interruptibility"], 0,
        "the STI shadow ends with HLT"
    );
    assert_eq!(r.count(ExitKind::Hlt), 1);
    assert!(!r.vm.may_run());
    // A TSC-deadline timer 1 ms ahead (x2APIC mode, vector 0x40) wakes it when due.
    arm_deadline_timer(&mut r, 0x40, 1_000_000);
    assert_eq!(r.vm.wake_deadline(), Some(1_000_000));
    assert!(!r.vm.wake(999_999));
    assert!(r.vm.wake(1_000_000));
    assert!(r.vm.may_run());
    r.cpu.tsc = 1_000_000;
    r.before_entry();
    assert_eq!(r.cpu.injected, [(Interruption::external(0x40), 0)]);
}

#[test]
fn single_stepping_hlt_delivers_the_trap_instead_of_halting() {
    // kvm-unit-tests' debug test: TF set, STI; HLT. The #DB after the HLT wakes it at once.
    let mut r = Rig::new();
    r.cpu.state.insert("rflags", 2 | rflags::IF | rflags::TF);
    assert_eq!(r.exit(VmExit::Hlt), Next::Resume);
    assert_eq!(r.cpu.single_steps, 1, "the trap is pending");
    assert_eq!(r.cpu.rip(), 0x1002);
    assert!(r.vm.halted.is_none());
    assert!(r.vm.may_run());
    // With DEBUGCTL.BTF, TF traps only branches: HLT halts as usual.
    let mut r = Rig::new();
    r.cpu.state.insert("rflags", 2 | rflags::IF | rflags::TF);
    r.cpu.msrs.insert(Msr::DebugCtl.index(), 2);
    assert_eq!(r.exit(VmExit::Hlt), Next::Halt);
}

#[test]
fn hlt_with_interrupts_disabled_is_not_woken_by_one() {
    let mut r = Rig::new();
    r.cpu.tsc = 0;
    arm_deadline_timer(&mut r, 0x40, 10);
    // IOAPIC pin 0 in NMI mode, unmasked: an NMI could still end the HLT.
    r.vm.platform.mmio_write(0xfec0_0000, &[0x10, 0, 0, 0], 0);
    r.vm.platform
        .mmio_write(0xfec0_0010, &0x400u32.to_le_bytes(), 0);
    r.cpu.state.insert("rflags", 2);
    r.cpu.tsc = 5;
    assert_eq!(r.exit(VmExit::Hlt), Next::Halt);
    assert!(
        !r.vm.wake(100),
        "RFLAGS.IF = 0: the interrupt stays pending"
    );
}

#[test]
fn hlt_with_interrupts_disabled_and_no_nmi_source_stops_the_vm() {
    // Linux's `halt` (and `poweroff` without ACPI) ends in CLI; HLT: nothing can end that, so
    // the VM is stopped rather than kept waiting, even with a timer armed.
    let mut r = Rig::new();
    r.cpu.tsc = 0;
    arm_deadline_timer(&mut r, 0x40, 10);
    r.cpu.state.insert("rflags", 2);
    assert_eq!(r.exit(VmExit::Hlt), Next::Stopped);
    assert_eq!(r.vm.state, VmState::Halted);
    assert!(r.vm.stats_line(0, TSC_HZ).contains(" state=halted "));
}

#[test]
fn hlt_with_an_interrupt_already_waiting_goes_on() {
    let mut r = Rig::new();
    r.cpu.tsc = 0;
    arm_deadline_timer(&mut r, 0x40, 10);
    r.cpu.state.insert("rflags", 2 | rflags::IF);
    r.cpu.tsc = 50;
    assert_eq!(r.exit(VmExit::Hlt), Next::Resume);
    assert!(r.vm.halted.is_none());
}

/// x2APIC mode, LVT timer in TSC-deadline mode with `vector`, deadline `at`, through WRMSR
/// exits as a guest would.
fn arm_deadline_timer(r: &mut Rig, vector: u64, at: u64) {
    for (msr, value) in [
        (0x1b, 0xfee0_0d00),
        (0x832, (2 << 17) | vector),
        (0x6e0, at),
    ] {
        assert_eq!(r.wrmsr(msr, value), Next::Resume);
        assert!(r.cpu.injected.is_empty(), "WRMSR {msr:#x} = {value:#x}");
    }
}

#[test]
fn interrupts_wait_for_rflags_if_and_the_sti_shadow() {
    let mut r = Rig::new();
    r.cpu.tsc = 0;
    arm_deadline_timer(&mut r, 0x41, 100);
    r.cpu.tsc = 100;
    // IF = 0: nothing injected, an interrupt window asked for.
    r.cpu.state.insert("rflags", 2);
    r.before_entry();
    assert!(r.cpu.injected.is_empty());
    assert!(r.cpu.interrupt_window);
    // IF = 1 but in an STI shadow (no instruction completed since): still the window.
    r.cpu.completed = false;
    r.cpu.state.insert("rflags", 2 | rflags::IF);
    r.cpu
        .state
        .insert("interruptibility", interruptibility::STI);
    r.before_entry();
    assert!(r.cpu.injected.is_empty());
    // The window exit comes; now it can be taken: exactly once.
    r.cpu.state.insert("interruptibility", 0);
    assert_eq!(r.exit(VmExit::InterruptWindow), Next::Resume);
    r.before_entry();
    assert_eq!(r.cpu.injected, [(Interruption::external(0x41), 0)]);
    assert!(!r.cpu.interrupt_window);
    r.cpu.injected.clear();
    r.before_entry();
    assert!(r.cpu.injected.is_empty(), "in service now, not pending");
    assert_eq!(r.vm.platform.stats.interrupts, 1);
}

#[test]
fn a_dilated_vm_counts_its_timers_and_tsc_in_its_own_time() {
    let mut r = Rig::new();
    // TDF 4 from host time 1000: the guest's TSC reads 1000 then, and 1000 + n at 1000 + 4n.
    r.vm.set_clock(GuestClock::dilated(4000, 1000));
    r.cpu.tsc = 1000;
    arm_deadline_timer(&mut r, 0x41, 1100);
    // The preemption timer and a halted VM's wake-up come at host 1400, not at 1100.
    assert_eq!(r.vm.platform_deadline(), 1400);
    r.vm.halted = Some(true);
    assert_eq!(r.vm.wake_deadline(), Some(1400));
    assert!(!r.vm.wake(1399), "guest time 1099: not due");
    assert!(r.vm.wake(1400), "guest time 1100: due");
    // IA32_TSC reads the guest's time.
    r.cpu.tsc = 2000;
    r.cpu.regs.rcx = 0x10;
    assert_eq!(r.exit(VmExit::Rdmsr), Next::Resume);
    assert_eq!(r.cpu.regs.edx_eax(), 1250);
    // The interrupt is delivered at the entry after host 1400.
    r.cpu.state.insert("rflags", 2 | rflags::IF);
    r.before_entry();
    assert_eq!(r.cpu.injected, [(Interruption::external(0x41), 0)]);
}

#[test]
fn writing_the_tsc_moves_rdtsc_and_the_deadline_but_not_the_platform() {
    let mut r = Rig::new();
    r.vm.set_clock(GuestClock::dilated(2000, 1_000_000));
    r.cpu.tsc = 1_000_000;
    // WRMSR IA32_TSC = 5_000_000 at guest time 1_000_000.
    assert_eq!(r.wrmsr(0x10, 5_000_000), Next::Resume);
    assert!(r.cpu.injected.is_empty());
    assert_eq!(r.vm.tsc_adjust, 4_000_000);
    assert_eq!(
        r.cpu.tsc_offset,
        Some(r.vm.clock().offset().wrapping_add(4_000_000))
    );
    // 200 host ticks later the guest's TSC has moved 100 (factor 2): by RDMSR and RDTSC exit.
    r.cpu.tsc = 1_000_200;
    assert_eq!(r.rdmsr(0x10), 5_000_100);
    r.exit(VmExit::Rdtsc);
    assert_eq!(r.cpu.regs.edx_eax(), 5_000_100);
    // A TSC deadline 100 ticks ahead in the written TSC's space fires 100 guest ticks on:
    // host 1_000_400. It reads back as written.
    arm_deadline_timer(&mut r, 0x41, 5_000_200);
    assert_eq!(r.vm.platform_deadline(), 1_000_400);
    assert_eq!(r.rdmsr(0x6e0), 5_000_200);
    // A deadline written as 0 disarms; one that maps to the platform's 0 is past, not 0.
    r.wrmsr(0x6e0, 4_000_000);
    assert!(
        r.vm.platform.interrupt_waiting(),
        "due at once: its interrupt waits"
    );
    r.wrmsr(0x6e0, 0);
    assert_eq!(r.rdmsr(0x6e0), 0);
}

#[test]
fn rdtsc_exits_compute_the_dilated_tsc() {
    let mut r = Rig::new();
    r.vm.set_clock(GuestClock::dilated(2500, 1_000_000));
    r.cpu.tsc = 1_000_000 + 25_000;
    r.cpu.state.insert("rip", 0x1000);
    r.cpu.instruction_len = 2;
    assert_eq!(r.exit(VmExit::Rdtsc), Next::Reenter);
    assert_eq!(r.cpu.regs.edx_eax(), 1_010_000);
    assert_eq!(r.cpu.read(Reg::Rip), 0x1002);
    r.cpu.write_cpu_msr(0xc000_0103, 7);
    r.cpu.regs.rcx = u64::MAX;
    r.cpu.tsc = 1_000_000 + (1 << 40);
    r.cpu.instruction_len = 3;
    assert_eq!(r.exit(VmExit::Rdtscp), Next::Reenter);
    assert_eq!(r.cpu.regs.edx_eax(), 1_000_000 + (1 << 40) * 2 / 5);
    assert_eq!(r.cpu.regs.rcx, 7);
    assert_eq!(r.cpu.read(Reg::Rip), 0x1005);
}

#[test]
fn an_emulated_instruction_in_the_sti_shadow_ends_it() {
    let mut r = Rig::new();
    r.cpu.tsc = 0;
    arm_deadline_timer(&mut r, 0x41, 100);
    r.cpu.tsc = 100;
    r.cpu.completed = false;
    // STI; CPUID: the CPUID exits in the STI shadow, the hypervisor completes it.
    r.cpu.state.insert("rflags", 2 | rflags::IF);
    r.cpu
        .state
        .insert("interruptibility", interruptibility::STI);
    r.exit(VmExit::Cpuid);
    r.before_entry();
    assert_eq!(r.cpu.injected, [(Interruption::external(0x41), 0)]);
    assert_eq!(r.cpu.state["interruptibility"], 0);
}

#[test]
fn a_reinjected_event_goes_first_and_the_interrupt_waits() {
    let mut r = Rig::new();
    r.cpu.tsc = 0;
    arm_deadline_timer(&mut r, 0x42, 100);
    r.cpu.tsc = 200;
    r.cpu.state.insert("rflags", 2 | rflags::IF);
    let pf = InterruptedEvent {
        event: Interruption::exception(14, true),
        error_code: 2,
        instruction_len: 0,
    };
    r.multiplexed = true;
    let ept = VmExit::EptViolation {
        gpa: 0x1000,
        violation: EptViolation::from_qualification(1),
    };
    assert_eq!(
        r.exit_during(ept, Some(pf)),
        Next::GuestFault {
            gpa: 0x1000,
            write: false
        }
    );
    r.before_entry();
    assert_eq!(r.cpu.injected, [(Interruption::exception(14, true), 2)]);
    assert!(
        r.cpu.interrupt_window,
        "the timer's vector comes after, not lost"
    );
    assert!(r.vm.platform.interrupt_waiting());
}

#[test]
fn mmio_to_the_local_apic_is_decoded_and_emulated() {
    let mut r = Rig::new();
    // mov dword [rdi], eax with RDI = 0xfee00080 (TPR); paging off in 32-bit mode would do,
    // but the guest is in 64-bit mode: identity page tables as in the string I/O test.
    identity_map(&mut r);
    r.cpu.state.insert("cs_ar", 1 << 13);
    r.cpu.state.insert("cr0", 0x8000_0011);
    r.cpu.state.insert("cr4", 1 << 5);
    r.cpu.msrs.insert(0xc000_0080, 0x500);
    r.cpu.state.insert("rip", 0x3000);
    r.cpu.phys.0[0x3000..0x3002].copy_from_slice(&[0x89, 0x07]);
    r.cpu.regs.rdi = 0xfee0_0080;
    r.cpu.regs.rax = 0x50;
    let write = EptViolation::from_qualification(0b10);
    assert_eq!(
        r.exit(VmExit::EptViolation {
            gpa: 0xfee0_0080,
            violation: write
        }),
        Next::Resume
    );
    assert_eq!(r.cpu.rip(), 0x3002, "RIP past the decoded instruction");
    assert_eq!(r.vm.platform.cr8(), 5, "TPR 0x50 is CR8 5");
    // movzx eax, byte [rdi] reads it back, zero-extending.
    r.cpu.phys.0[0x3002..0x3005].copy_from_slice(&[0x0f, 0xb6, 0x07]);
    r.cpu.regs.rax = u64::MAX;
    r.exit(VmExit::EptViolation {
        gpa: 0xfee0_0080,
        violation: EptViolation::from_qualification(1),
    });
    assert_eq!(r.cpu.regs.rax, 0x50);
    // An instruction that cannot be emulated stops the VM with a report.
    r.cpu.phys.0[0x3005..0x3007].copy_from_slice(&[0xf3, 0xa5]); // rep movsd
    assert_eq!(
        r.exit(VmExit::EptViolation {
            gpa: 0xfee0_0080,
            violation: write
        }),
        Next::Stopped
    );
    assert_eq!(r.vm.state, VmState::Failed);
}

/// PML4 at 0, PDPT at 0x1000, PD at 0x2000: 2 MiB pages identity-mapping the first 1 GiB and,
/// through PDPT entry 3, the GiB holding the local APIC and IOAPIC pages.
fn identity_map(r: &mut Rig) {
    let put = |r: &mut Rig, gpa: u64, v: u64| {
        r.memory
            .write(&mut r.cpu.phys, gpa, &v.to_le_bytes())
            .unwrap()
    };
    put(r, 0, 0x1000 | 3);
    put(r, 0x1000, 0x2000 | 3);
    put(r, 0x1018, (3 << 30) | (1 << 7) | 3); // a 1 GiB page at 3 GiB
    put(r, 0x2000, (1 << 7) | 3);
    r.cpu.state.insert("cr3", 0);
}

#[test]
fn cr8_is_the_local_apics_task_priority() {
    let mut r = Rig::new();
    r.cpu.regs.r9 = 0xa;
    r.exit(VmExit::CrAccess(CrAccess::MovTo { cr: 8, gpr: 9 }));
    assert_eq!(r.vm.platform.cr8(), 0xa);
    // The TPR read through the x2APIC MSR after enabling x2APIC: CR8 in bits 7:4.
    r.wrmsr(0x1b, 0xfee0_0d00);
    assert_eq!(r.rdmsr(0x808), 0xa0);
    assert!(r.cpu.injected.is_empty());
}

#[test]
fn a_blocked_nmi_waits_without_an_interrupt_window_storm() {
    let mut r = Rig::new();
    r.cpu.tsc = 0;
    // x2APIC mode, then a self-NMI through the ICR (delivery mode NMI, shorthand self).
    for (msr, value) in [(0x1b, 0xfee0_0d00u64), (0x830, (0b01 << 18) | (4 << 8))] {
        r.wrmsr(msr, value);
    }
    assert!(r.vm.platform.nmi_waiting());
    r.cpu.state.insert("rflags", 2 | rflags::IF);
    r.cpu
        .state
        .insert("interruptibility", interruptibility::NMI);
    r.before_entry();
    assert!(r.cpu.injected.is_empty(), "NMIs are blocked");
    assert!(
        !r.cpu.interrupt_window,
        "an interrupt window would open at once and exit forever"
    );
    assert!(
        r.cpu.nmi_window,
        "the NMI window says when the guest's IRET came"
    );
    assert_eq!(r.exit(VmExit::NmiWindow), Next::Resume);
    assert!(!r.cpu.nmi_window);
    r.cpu.state.insert("interruptibility", 0);
    r.before_entry();
    assert_eq!(r.cpu.injected[0].0.kind, Interruption::NMI);
}

/// In 64-bit mode with [`identity_map`]'s tables (its 1 GiB page at 3 GiB reaches the device
/// ranges), runs `mov qword [rdi], rax; mov rbx, qword [rdi]` against `gpa` outside the VM's
/// memory, one EPT violation each: returns what RBX read back.
fn store_then_load_outside_memory(r: &mut Rig, gpa: u64, value: u64) -> u64 {
    identity_map(r);
    r.cpu.state.insert("cs_ar", 1 << 13);
    r.cpu.state.insert("cr0", 0x8000_0011);
    r.cpu.state.insert("cr4", 1 << 5);
    r.cpu.msrs.insert(0xc000_0080, 0x500);
    r.cpu.state.insert("rip", 0x3000);
    r.cpu.phys.0[0x3000..0x3006].copy_from_slice(&[0x48, 0x89, 0x07, 0x48, 0x8b, 0x1f]);
    r.cpu.regs.rdi = gpa;
    r.cpu.regs.rax = value;
    for qualification in [0b10, 0b1] {
        let violation = EptViolation::from_qualification(qualification);
        assert_eq!(
            r.exit(VmExit::EptViolation { gpa, violation }),
            Next::Resume
        );
    }
    assert_eq!(r.cpu.rip(), 0x3006, "both instructions emulated");
    r.cpu.regs.rbx
}

#[test]
fn the_test_device_is_where_the_manifest_says_and_its_ram_goes_through_the_emulator() {
    use hv_platform::testdev;
    // The manifest checks ports and memory against these; the platform places the device here.
    assert_eq!(
        hv_manifest::TEST_DEVICE_PORTS,
        [
            (testdev::PORT_BASE, testdev::PORTS),
            (testdev::IRQ_PORT_BASE, testdev::IRQ_PORTS)
        ]
    );
    assert_eq!(hv_manifest::TEST_DEVICE_RAM_BASE, testdev::RAM_BASE);

    let mut r = Rig::new();
    r.vm.platform.attach_test_device().unwrap();
    let value = 0x1122_3344_5566_7788;
    assert_eq!(
        store_then_load_outside_memory(&mut r, 0xff00_0100, value),
        value
    );
}

#[test]
fn outside_memory_without_a_device_is_open_bus_and_executing_there_stops_the_vm() {
    // 1 GiB past the VM's memory, no device: the write goes nowhere, reads float high.
    let mut r = Rig::new();
    let gpa = 0xc000_0000;
    assert_eq!(
        store_then_load_outside_memory(&mut r, gpa, 0x1122),
        u64::MAX
    );
    assert_eq!(r.vm.platform.stats.unclaimed_mmio, 2);
    assert_eq!(r.vm.state, VmState::Runnable);
    assert!(r.vm.stats_line(0, TSC_HZ).contains(" unclaimed_mmio=2 "));
    // An instruction fetch there stops the VM.
    r.cpu.state.insert("rip", gpa);
    let fetch = EptViolation::from_qualification(0b100);
    assert_eq!(
        r.exit(VmExit::EptViolation {
            gpa,
            violation: fetch
        }),
        Next::Stopped
    );
    assert_eq!(r.vm.state, VmState::Failed);
}

#[test]
fn the_microcode_signature_msr_reads_a_revision_and_takes_writes() {
    // Linux writes 0 to IA32_BIOS_SIGN_ID, executes CPUID and reads the revision back.
    let mut r = Rig::new();
    assert_eq!(r.wrmsr(0x8b, 0), Next::Resume);
    assert!(r.cpu.injected.is_empty(), "no #GP");
    assert_eq!(r.rdmsr(0x8b), 1 << 32);
}

#[test]
fn a_guest_that_resets_its_pc_is_stopped_as_rebooted() {
    // The 8042's pulse-reset command, as Linux's reboot=k writes it.
    let mut r = Rig::new();
    r.cpu.regs.rax = 0x04;
    assert_eq!(r.exit(io(0x64, 1, true)), Next::Resume);
    assert_eq!(r.cpu.regs.rax & 0xff, 0x04, "status: buffers empty");
    r.cpu.regs.rax = 0xfe;
    assert_eq!(r.exit(io(0x64, 1, false)), Next::Stopped);
    assert_eq!(r.vm.state, VmState::Rebooted);
    assert!(r.vm.stats_line(0, TSC_HZ).contains(" state=rebooted "));
    // The reset control register: a byte with RST_CPU; a dword at 0xCF8 is a PCI address.
    let mut r = Rig::new();
    r.cpu.regs.rax = 0x8000_0400;
    assert_eq!(r.exit(io(0xcf8, 4, false)), Next::Resume);
    r.cpu.regs.rax = 0x06;
    assert_eq!(r.exit(io(0xcf9, 1, false)), Next::Stopped);
    assert_eq!(r.vm.state, VmState::Rebooted);
}

#[test]
fn the_line_after_input_is_its_answer_and_its_delay_is_measured() {
    let mut r = Rig::new();
    r.vm.start_idle_detection(
        crate::idle::IdlePolicy::new(&hv_manifest::IdleConfig::default(), TSC_HZ),
        0,
    );
    let say = |r: &mut Rig, at: u64, text: &[u8]| {
        r.cpu.tsc = at;
        for &b in text {
            r.cpu.regs.rax = u64::from(b);
            r.exit(io(0x3f8, 1, false));
        }
    };
    // A line with no input before it answers nothing.
    say(&mut r, 1_000, b"hello\n");
    // Input at 10 us (in TSC ticks at TSC_HZ), then the answer is finished at 2.5 ms; the
    // second input waits 40 ms, and only its first line counts.
    let us = |t: u64| t * TSC_HZ / 1_000_000;
    r.vm.input_arrived(us(10));
    say(&mut r, us(2_510), b"pong alpha\n");
    r.vm.input_arrived(us(100_000));
    r.vm.input_arrived(us(100_500)); // still unanswered: the delay runs from the first
    say(&mut r, us(140_000), b"pong again\n");
    say(&mut r, us(150_000), b"more\n");
    assert_eq!(r.vm.answer_percentiles(), (2_500, 40_000, 40_000));
    let line = r.vm.stats_line(0, TSC_HZ);
    assert!(
        line.contains(" input_answers=2 input_p50_us=2500 input_p99_us=40000 input_max_us=40000 "),
        "{line}"
    );
}
