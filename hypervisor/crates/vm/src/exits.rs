//! The exit policy: what the hypervisor does for every VM exit, against any [`Vcpu`] backend.
//!
//! [`handle_exit`] takes a decoded [`VmExit`] and says what happens next ([`Next`]); the kernel
//! runs the guest, decodes the exit and carries out the decision (the memory engine's fault-ins,
//! scheduling). The policy of every exit reason (docs/isolation.md, "Exit reasons"):
//! - emulated: CPUID, RDMSR/WRMSR, I/O (string forms too), MOV to/from CR8, XSETBV, VMCALL,
//!   INVD (as WBINVD), HLT (yields), EPT violations the memory engine owns;
//! - exception injected as a CPU of the advertised model would raise it: VMX instructions,
//!   GETSEC, MONITOR/MWAIT, RSM, VMFUNC, ENCLS, UMWAIT/TPAUSE, LOADIWKEY, INVPCID (#UD), RDPMC
//!   and MOV to CR4 of a forbidden bit (#GP);
//! - host events, counted and resumed: external interrupts (acknowledged), NMIs, SMIs,
//!   INIT signals, the preemption timer (ends the quantum);
//! - VM stopped with a report: triple fault, EPT violation outside memory, VM-entry failures,
//!   and exits that the negotiated controls make impossible (a hypervisor bug if seen).
//!
//! This module must not touch hardware: everything goes through the [`Vcpu`] trait.

use guest_abi::ExitKind;
use hv_vmx::exit::{reason, CrAccess, EptAccess, InterruptedEvent, Interruption, IoExit, VmExit};

use crate::cpu_mode;
use crate::hypercall::{self, Args, Outcome};
use crate::memory::{AccessError, GuestMemory};
use crate::mmio::{self, DeviceAccess, Gprs, Step};
use crate::msr::{Home, Msr};
use crate::paging;
use crate::policy::CpuPolicy;
use crate::vcpu::{interruptibility, rflags, Reg, Vcpu};
use crate::vm::Vm;

/// IA32_TSC_DEADLINE, the platform's (local APIC) MSR that holds a TSC value.
const MSR_TSC_DEADLINE: u32 = 0x6e0;
const MSR_APIC_BASE: u32 = 0x1b;

/// What the exit handler decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Re-enter the same guest.
    Resume,
    /// Re-enter the same guest at once: the exit changed nothing but the guest's registers and
    /// RIP (no platform, memory or console state), so the checks before the entry have nothing
    /// new to find, like KVM's `EXIT_FASTPATH_REENTER_GUEST`. A run loop may skip them for a
    /// bounded run of such exits (the preemption timer does not count while the exit is
    /// handled, so an unbounded run could stretch the quantum); otherwise it is
    /// [`Next::Resume`].
    Reenter,
    /// End the quantum (yield) and schedule the next VM.
    Reschedule,
    /// The vCPU halted (HLT) until an interrupt: schedule the next VM; this one runs again once
    /// [`Vm::wake`] says so.
    Halt,
    /// The VM stopped.
    Stopped,
    /// The guest touched a page of its memory that the memory engine has taken away or made
    /// read-only (directly, or through an instruction the hypervisor emulates): have the engine
    /// fault it in, then re-enter the guest at the same instruction.
    GuestFault { gpa: u64, write: bool },
    /// A hypercall's buffer covers such a page: fault it in, then handle the VMCALL again.
    HypercallFault { gpa: u64, write: bool },
}

/// What the exit policy needs to know of the machine besides the VM.
pub struct ExitContext<'a> {
    /// What guests see of CPUID and which XCR0 values and MSRs they may use.
    pub cpu_policy: &'a CpuPolicy,
    /// The memory engine manages this VM's pages, so an EPT violation inside its memory is the
    /// engine's to resolve rather than a fault of the guest.
    pub multiplexed: bool,
}

/// Handles one exit of `vm`, whose memory is `memory`, and re-injects the event the exit
/// interrupted (`interrupted`, the IDT-vectoring information, SDM 28.2.4 and 29.2.1): an
/// exception, interrupt or NMI the guest was receiving when, say, its IDT or stack page had to
/// be faulted in, or a host interrupt arrived. The handlers only inject events of their own for
/// instructions, which never exit during a delivery, so the two never meet.
///
/// Inlined into the kernel's run loop with the dispatch of [`handle_exit`], so that the
/// frequent exits (CPUID, VMCALL, I/O) cost no call; the rare ones are out of line.
#[inline(always)]
pub fn handle<V: Vcpu>(
    vm: &mut Vm,
    memory: &GuestMemory,
    cpu: &mut V,
    ctx: &ExitContext,
    exit: VmExit,
    interrupted: Option<InterruptedEvent>,
) -> Next {
    let next = handle_exit(vm, memory, cpu, ctx, exit);
    if let Some(e) = interrupted {
        if next != Next::Stopped {
            cpu.inject(e.event, e.error_code);
        }
    }
    next
}

/// A CPUID exit: the answer of the CPU policy. Public so that a run loop may call it straight
/// from the basic exit reason, without decoding (CPUID is the most frequent exit of many
/// guests, and it never interrupts an event's delivery).
#[inline(always)]
pub fn handle_cpuid<V: Vcpu>(vm: &mut Vm, cpu: &mut V, ctx: &ExitContext) -> Next {
    vm.acct.count_exit(ExitKind::Cpuid);
    let r = cpu.regs();
    let (leaf, subleaf) = (r.rax as u32, r.rcx as u32);
    // Only leaf 1 depends on CR4 (OSXSAVE): spare the other leaves the read.
    let cr4 = if leaf == 1 { cpu.read(Reg::Cr4) } else { 0 };
    let native = cpu.native_cpuid(leaf, subleaf);
    let [mut a, b, c, mut d] = ctx.cpu_policy.cpuid(leaf, subleaf, native, cr4);
    // What the VM's own state changes: IA32_MISC_ENABLE's limit on the basic leaves, and the
    // APIC flag, which follows IA32_APIC_BASE.EN as on a real CPU (SDM 10.4.3).
    if leaf <= 1 {
        if leaf == 0 && vm.msrs.misc_enable & crate::msr::MISC_ENABLE_LIMIT_CPUID != 0 {
            a = a.min(2);
        }
        if leaf == 1 && !vm.platform.lapic_enabled() {
            d &= !crate::policy::EDX_APIC;
        }
    }
    let r = cpu.regs();
    (r.rax, r.rbx, r.rcx, r.rdx) = (a.into(), b.into(), c.into(), d.into());
    cpu.skip_instruction();
    Next::Reenter
}

/// IA32_DEBUGCTL.BTF: TF single-steps on branches only (SDM 17.4.3).
const DEBUGCTL_BTF: u64 = 1 << 1;

/// #UD: what a CPU without the instruction's feature raises.
fn inject_ud(cpu: &mut impl Vcpu) -> Next {
    inject_fault(cpu, 6, false, 0)
}

/// #GP(0).
fn inject_gp(cpu: &mut impl Vcpu) -> Next {
    inject_fault(cpu, 13, true, 0)
}

/// #PF at `linear` with `error_code`.
fn inject_pf(cpu: &mut impl Vcpu, linear: u64, error_code: u32) -> Next {
    cpu.set_cr2(linear);
    inject_fault(cpu, 14, true, error_code)
}

/// A fault on the exiting instruction, delivered at the next entry. A CPU that delivers a
/// fault sets RF in the RFLAGS image it saves, so that an instruction breakpoint does not fire
/// again when the handler returns to the instruction (SDM 17.3.1.1); VM entry pushes the guest
/// RFLAGS field as it is, so RF is set there.
fn inject_fault(cpu: &mut impl Vcpu, vector: u8, has_error_code: bool, error_code: u32) -> Next {
    let flags = cpu.read(Reg::Rflags);
    cpu.write(Reg::Rflags, flags | rflags::RF);
    cpu.inject(Interruption::exception(vector, has_error_code), error_code);
    Next::Resume
}

#[inline(always)]
fn handle_exit<V: Vcpu>(
    vm: &mut Vm,
    memory: &GuestMemory,
    cpu: &mut V,
    ctx: &ExitContext,
    exit: VmExit,
) -> Next {
    match exit {
        VmExit::Cpuid => handle_cpuid(vm, cpu, ctx),
        VmExit::Vmcall => {
            vm.acct.count_exit(ExitKind::Vmcall);
            handle_vmcall(vm, memory, cpu)
        }
        VmExit::Io(io) => {
            vm.acct.count_exit(ExitKind::Io);
            handle_io(vm, cpu, io)
        }
        VmExit::StringIo {
            io,
            linear,
            address_mask,
        } => {
            vm.acct.count_exit(ExitKind::Io);
            handle_string_io(vm, memory, cpu, io, linear, address_mask)
        }
        VmExit::Rdmsr => {
            vm.acct.count_exit(ExitKind::MsrRead);
            handle_msr(vm, cpu, ctx.cpu_policy, false)
        }
        VmExit::Wrmsr => {
            vm.acct.count_exit(ExitKind::MsrWrite);
            handle_msr(vm, cpu, ctx.cpu_policy, true)
        }
        VmExit::Hlt => {
            vm.acct.count_exit(ExitKind::Hlt);
            cpu.skip_instruction();
            handle_hlt(vm, cpu)
        }
        VmExit::PreemptionTimer => {
            // The quantum's end or a timer of the platform: the run loop checks which, and
            // before_entry delivers what is due.
            vm.acct.count_exit(ExitKind::PreemptionTimer);
            Next::Resume
        }
        VmExit::NmiWindow => {
            // The guest's NMI blocking ended (its IRET): before_entry delivers the NMI.
            vm.acct.count_exit(ExitKind::Other);
            cpu.set_nmi_window(false);
            Next::Resume
        }
        VmExit::InterruptWindow => {
            // The guest can take the interrupt before_entry asked the window for.
            vm.acct.count_exit(ExitKind::Other);
            cpu.set_interrupt_window(false);
            Next::Resume
        }
        VmExit::ExternalInterrupt { vector } => {
            // Acknowledged by the exit ("acknowledge interrupt on exit"); the host has no use
            // for it, but the controller that sent it needs its EOI.
            vm.acct.count_exit(ExitKind::ExternalInterrupt);
            if let Some(vector) = vector {
                cpu.host_interrupt(vector);
            }
            Next::Resume
        }
        VmExit::ExceptionOrNmi(event) => {
            // The exception bitmap is empty, so only NMIs exit here: the host's (guests have no
            // virtual NMI source), counted and not injected.
            vm.acct.count_exit(ExitKind::Other);
            if event.kind == Interruption::NMI {
                cpu.host_nmi();
                Next::Resume
            } else {
                let rip = cpu.read(Reg::Rip);
                vm.fail(format_args!(
                    "exception {} exited although the exception bitmap is empty, at rip={rip:#x}: a hypervisor bug",
                    event.vector
                ));
                Next::Stopped
            }
        }
        VmExit::EptViolation { gpa, violation } => {
            vm.acct.count_exit(ExitKind::EptViolation);
            let inside = memory.check(gpa, 1).is_ok();
            // Outside the VM's memory, a data access goes to the platform's devices; where none
            // answers it is open bus, as on a PC (reads all ones, writes dropped), which is what
            // a guest probing for hardware, or touching a disabled APIC's page, must find.
            // Executing from there is never meant: the VM is stopped with a report (below).
            if !inside && violation.access != EptAccess::Fetch {
                if !vm.platform.is_mmio(gpa) {
                    note_open_bus(vm, gpa, violation.access);
                }
                return handle_mmio(vm, memory, cpu, gpa);
            }
            if ctx.multiplexed && inside {
                return Next::GuestFault {
                    gpa,
                    write: violation.access == EptAccess::Write,
                };
            }
            let rip = cpu.read(Reg::Rip);
            if !inside {
                let mib = vm.config.memory_mib;
                vm.fail(format_args!(
                    "EPT violation at gpa={gpa:#x} (fetch) rip={rip:#x}: executing outside the VM's {mib} MiB"
                ));
            } else {
                vm.fail(format_args!(
                    "EPT violation at gpa={gpa:#x} ({}) rip={rip:#x}: permissions {:#b}",
                    violation.access.name(),
                    violation.present_perms
                ));
            }
            Next::Stopped
        }
        VmExit::TripleFault => {
            vm.acct.count_exit(ExitKind::Other);
            let rip = cpu.read(Reg::Rip);
            vm.fail(format_args!("triple fault at rip={rip:#x}"));
            Next::Stopped
        }
        VmExit::EntryFailure {
            reason: basic,
            qualification,
        } => {
            vm.acct.count_exit(ExitKind::Other);
            vm.fail(format_args!(
                "VM entry failed: exit reason {basic} ({}) qualification {qualification:#x}",
                reason::name(basic),
            ));
            Next::Stopped
        }
        other => {
            vm.acct.count_exit(ExitKind::Other);
            handle_other_exit(vm, memory, cpu, ctx, other)
        }
    }
}

/// The exits that are rare or that a guest causes only by probing: one policy each.
#[inline(never)]
fn handle_other_exit<V: Vcpu>(
    vm: &mut Vm,
    memory: &GuestMemory,
    cpu: &mut V,
    ctx: &ExitContext,
    exit: VmExit,
) -> Next {
    match exit {
        VmExit::CrAccess(access) => handle_cr_access(vm, memory, cpu, access),
        VmExit::Xsetbv => {
            let r = cpu.regs();
            let (index, value) = (r.rcx as u32, r.edx_eax());
            if ctx.cpu_policy.check_xsetbv(index, value).is_err() {
                return inject_gp(cpu);
            }
            cpu.set_xcr0(value);
            cpu.skip_instruction();
            Next::Resume
        }
        // RDTSC exiting is on only for a VM whose TSC runs slower than the host's on a CPU
        // without TSC scaling, or that wrote IA32_TSC on a CPU without TSC offsetting: the exit
        // computes what the CPU would (crate::clock). CR4.TSD with CPL > 0 faults before the
        // exit (SDM 26.1.1), so it never gets here.
        VmExit::Rdtsc | VmExit::Rdtscp => {
            let now = vm.tsc_value(cpu.tsc());
            let aux = if exit == VmExit::Rdtscp {
                Some(cpu.read_cpu_msr(Msr::TscAux.index()))
            } else {
                None
            };
            let r = cpu.regs();
            r.set_edx_eax(now);
            if let Some(aux) = aux {
                r.rcx = aux & 0xffff_ffff;
            }
            cpu.skip_instruction();
            Next::Reenter
        }
        VmExit::Invd => {
            // Discarding caches without writing them back could expose stale memory of the
            // host or another VM: write back and invalidate instead, as WBINVD does.
            cpu.write_back_caches();
            cpu.skip_instruction();
            Next::Resume
        }
        // VMX is hidden from CPUID (and CR4.VMXE cannot be set), so VMX instructions raise #UD
        // like on a CPU without VMX; so do the instructions of other hidden features.
        VmExit::Unavailable { .. } => inject_ud(cpu),
        // No performance counters are offered (CPUID leaf 0xA is empty): every counter index
        // is invalid.
        VmExit::Rdpmc => inject_gp(cpu),
        // Host events: nothing for the guest to see.
        VmExit::HostEvent { reason: basic } => {
            log::warn!(target: &vm.target, "host event during the guest: {} (ignored)", reason::name(basic));
            Next::Resume
        }
        other => {
            let rip = cpu.read(Reg::Rip);
            vm.fail(format_args!(
                "VM exit {other:?} at rip={rip:#x}: the VMCS controls rule it out, so this is a hypervisor bug",
            ));
            Next::Stopped
        }
    }
}

/// MOV to CR0 changing PG or NE (the host-owned CR0 bits, [`cpu_mode::CR0_HOST_OWNED`]), MOV
/// to/from CR8 (the task-priority register, kept per VM) and MOV to CR4 setting a bit of
/// [`crate::policy::CR4_GUEST_FORBIDDEN`] (#GP). CR3 accesses do not exit (no CR3 exiting); CLTS
/// and LMSW cannot touch PG, so they do not exit.
fn handle_cr_access<V: Vcpu>(
    vm: &mut Vm,
    memory: &GuestMemory,
    cpu: &mut V,
    access: CrAccess,
) -> Next {
    match access {
        // CR0.PG is host-owned: paging and IA-32e mode switches (cpu_mode.rs).
        CrAccess::MovTo { cr: 0, gpr } => {
            let value = cpu.gpr(gpr);
            if let Err(why) = cpu_mode::mov_to_cr0(cpu, memory, value) {
                log::debug!(target: &vm.target, "#GP for MOV to CR0 of {value:#x}: {why:?}");
                return inject_gp(cpu);
            }
        }
        // CR8 is the local APIC's TPR[7:4] (SDM 10.8.6.1); bits 63:4 are reserved (#GP).
        CrAccess::MovTo { cr: 8, gpr } => {
            let value = cpu.gpr(gpr);
            if vm.platform.set_cr8(value).is_err() {
                return inject_gp(cpu);
            }
        }
        CrAccess::MovFrom { cr: 8, gpr } => cpu.set_gpr(gpr, vm.platform.cr8()),
        CrAccess::MovTo { cr: 4, .. } => return inject_gp(cpu),
        other => {
            let rip = cpu.read(Reg::Rip);
            vm.fail(format_args!(
                "unexpected control-register exit {other:?} at rip={rip:#x}"
            ));
            return Next::Stopped;
        }
    }
    cpu.skip_instruction();
    Next::Resume
}

/// A VMCALL: the hypercall ABI of guest-abi (docs/hypercalls.md).
pub fn handle_vmcall<V: Vcpu>(vm: &mut Vm, memory: &GuestMemory, cpu: &mut V) -> Next {
    let r = cpu.regs();
    let args = Args {
        nr: r.rax,
        a0: r.rdi,
        a1: r.rsi,
        a2: r.rdx,
        a3: r.r10,
    };
    if args.nr == guest_abi::Hypercall::VmStats as u64 {
        let now = cpu.tsc();
        vm.update_idle_stats(now);
    }
    // Disjoint field borrows: the outcome may point into `vm.scratch` while the console is fed.
    let (rax, next) = match hypercall::handle(
        args,
        memory,
        cpu.phys(),
        &vm.info,
        &vm.acct.stats,
        &mut vm.scratch,
    ) {
        Outcome::Return(v) => (v, Next::Resume),
        Outcome::Console(bytes) => {
            // Queued, not printed: the serial line takes it as fast as it drains.
            let n = bytes.len() as u64;
            let (name, out) = (&vm.name, &mut vm.console_out);
            vm.console.push(bytes, |line| out.push(name, line));
            (n, Next::Resume)
        }
        Outcome::Report(key, value) => {
            log::info!(target: &vm.target, "report {key}={value}");
            (0, Next::Resume)
        }
        Outcome::Yield => (0, Next::Reschedule),
        // GuestMemory refused a page the memory engine holds; nothing was done yet.
        Outcome::Unavailable { gpa, write } => return Next::HypercallFault { gpa, write },
        Outcome::Exit(code) => {
            vm.exit_with(code);
            return Next::Stopped;
        }
    };
    cpu.regs().rax = rax;
    cpu.skip_instruction();
    next
}

/// Reads `size` bytes from `port` as the VM's platform answers (byte lanes go to consecutive
/// ports; ports without a device float high).
fn port_read(vm: &mut Vm, port: u16, size: u8, now: u64) -> u32 {
    vm.platform.pio_read(port, size, now)
}

/// Writes `size` bytes of `value` to `port` at guest time `now` (host time `host`); what the
/// guest sent on COM1 goes to its console.
fn port_write(vm: &mut Vm, port: u16, size: u8, value: u32, now: u64, host: u64) {
    vm.platform.pio_write(port, size, value, now);
    vm.collect_uart_output(host);
}

fn handle_io<V: Vcpu>(vm: &mut Vm, cpu: &mut V, io: IoExit) -> Next {
    let host = cpu.tsc();
    let now = vm.guest_tsc(host);
    if io.is_in {
        let value = u64::from(port_read(vm, io.port, io.size, now));
        let r = cpu.regs();
        r.rax = match io.size {
            1 => (r.rax & !0xff) | value,
            2 => (r.rax & !0xffff) | value,
            // A 32-bit destination is zero-extended into RAX, as every 32-bit register write.
            _ => value,
        };
    } else {
        let value = cpu.regs().rax as u32;
        if vm.is_test_exit_port(io.port) {
            cpu.skip_instruction();
            return test_exit(vm, io.size, value);
        }
        port_write(vm, io.port, io.size, value, now, host);
        if let Some(stopped) = power_request(vm) {
            cpu.skip_instruction();
            return stopped;
        }
    }
    cpu.skip_instruction();
    Next::Resume
}

/// After a port write: the guest asked its platform for soft-off (ACPI S5) or a reset (a
/// reboot), either of which stops it.
#[inline]
fn power_request(vm: &mut Vm) -> Option<Next> {
    if vm.platform.take_power_off() {
        vm.power_off();
        return Some(Next::Stopped);
    }
    let cause = vm.platform.take_reset()?;
    vm.reboot(cause);
    Some(Next::Stopped)
}

/// A write to the VM's test-exit device (manifest `debug_exit`, like QEMU's isa-debug-exit):
/// the VM ends with the value written as its exit code.
#[inline(never)]
fn test_exit(vm: &mut Vm, size: u8, value: u32) -> Next {
    let code = match size {
        1 => value & 0xff,
        2 => value & 0xffff,
        _ => value,
    };
    log::info!(target: &vm.target, "wrote {code:#x} to its test-exit device");
    vm.exit_with(code.into());
    Next::Stopped
}

/// Iterations of a REP INS/OUTS done per exit: the rest run after re-entering the guest at the
/// same instruction (RCX counts down), so one exit's work stays bounded.
pub const STRING_IO_BATCH: u64 = 256;

/// INS/OUTS, with or without REP (SDM Vol. 2, INS/OUTS): each element goes between the port and
/// the guest-linear address in RDI (INS, ES) or RSI (OUTS, its segment), translated through the
/// guest's page tables; RSI/RDI step by the size (down when RFLAGS.DF), RCX counts down under
/// REP, all in the instruction's address size (`mask`). A page fault on the guest's tables is
/// injected as the CPU would, with the iterations done so far kept.
#[inline(never)]
fn handle_string_io<V: Vcpu>(
    vm: &mut Vm,
    memory: &GuestMemory,
    cpu: &mut V,
    io: IoExit,
    mut linear: u64,
    mask: u64,
) -> Next {
    let step = u64::from(io.size);
    let down = cpu.read(Reg::Rflags) & rflags::DF != 0;
    let mut left = if io.rep { cpu.regs().rcx & mask } else { 1 };
    let access = paging::Access {
        write: io.is_in,
        user: cpu.read(Reg::Cpl) == 3,
        write_protect: cpu.read(Reg::Cr0) & (1 << 16) != 0,
    };
    let cr3 = cpu.read(Reg::Cr3);
    let mut batch = 0;
    while left > 0 && batch < STRING_IO_BATCH {
        // Each byte is translated on its own: an element may straddle two pages.
        let mut gpas = [0u64; 4];
        for (i, gpa) in gpas.iter_mut().enumerate().take(io.size.into()) {
            let at = linear.wrapping_add(i as u64);
            match paging::translate(memory, cpu.phys(), cr3, at, access) {
                Ok(g) => *gpa = g,
                Err(paging::WalkError::PageFault { error_code }) => {
                    return inject_pf(cpu, at, error_code);
                }
                Err(paging::WalkError::Table(AccessError::Unavailable { gpa })) => {
                    return Next::GuestFault { gpa, write: false };
                }
                Err(paging::WalkError::Table(AccessError::OutOfRange(r))) => {
                    vm.fail(format_args!(
                        "string I/O: the guest's page tables point outside its memory (gpa={:#x})",
                        r.gpa
                    ));
                    return Next::Stopped;
                }
            }
        }
        let gpas = &gpas[..io.size.into()];
        if io.is_in {
            let value = port_read(vm, io.port, io.size, vm.guest_tsc(cpu.tsc())).to_le_bytes();
            for (i, &gpa) in gpas.iter().enumerate() {
                match memory.write(cpu.phys(), gpa, &value[i..=i]) {
                    Ok(()) => {}
                    Err(AccessError::Unavailable { gpa }) => {
                        return Next::GuestFault { gpa, write: true }
                    }
                    Err(AccessError::OutOfRange(_)) => unreachable!("translated inside memory"),
                }
            }
        } else {
            let mut value = [0u8; 4];
            for (i, &gpa) in gpas.iter().enumerate() {
                match memory.read(cpu.phys(), gpa, &mut value[i..=i]) {
                    Ok(()) => {}
                    Err(AccessError::Unavailable { gpa }) => {
                        return Next::GuestFault { gpa, write: false }
                    }
                    Err(AccessError::OutOfRange(_)) => unreachable!("translated inside memory"),
                }
            }
            let value = u32::from_le_bytes(value);
            if vm.is_test_exit_port(io.port) {
                return test_exit(vm, io.size, value);
            }
            let host = cpu.tsc();
            let now = vm.guest_tsc(host);
            port_write(vm, io.port, io.size, value, now, host);
            if let Some(stopped) = power_request(vm) {
                return stopped;
            }
        }
        // One element done: commit it to the registers, so that a fault or the batch limit
        // leaves the instruction restartable where it stopped.
        let next = |r: u64| {
            if down {
                r.wrapping_sub(step)
            } else {
                r.wrapping_add(step)
            }
        };
        // RSI/RDI/RCX change in the instruction's address size: a 32-bit write zero-extends
        // into the 64-bit register, a 16-bit one keeps the bits above (SDM Vol. 1, 3.4.1.1).
        let sized = |old: u64, new: u64| {
            if mask == 0xffff {
                (old & !mask) | (new & mask)
            } else {
                new & mask
            }
        };
        let bump = |r: u64| sized(r, next(r));
        let r = cpu.regs();
        if io.is_in {
            r.rdi = bump(r.rdi);
        } else {
            r.rsi = bump(r.rsi);
        }
        linear = next(linear);
        left -= 1;
        if io.rep {
            r.rcx = sized(r.rcx, left);
        }
        batch += 1;
    }
    if left == 0 {
        cpu.skip_instruction();
    }
    Next::Resume
}

#[inline(never)]
fn handle_msr<V: Vcpu>(vm: &mut Vm, cpu: &mut V, cpu_policy: &CpuPolicy, write: bool) -> Next {
    let r = cpu.regs();
    let (index, value) = (r.rcx as u32, r.edx_eax());
    // The local APIC's MSRs (IA32_APIC_BASE, TSC deadline, x2APIC) are the platform's.
    if hv_platform::Platform::owns_msr(index) {
        let now = vm.guest_tsc(cpu.tsc());
        // The TSC deadline is a TSC value, the platform counts in its own time: they differ by
        // what the guest wrote to IA32_TSC. 0 disarms; a deadline that maps to 0 is past.
        let deadline = index == MSR_TSC_DEADLINE;
        if write {
            let value = if deadline && value != 0 {
                value.wrapping_sub(vm.tsc_adjust).max(1)
            } else {
                value
            };
            // The APIC base must be a physical address of this CPU (the model allows 52 bits).
            if index == MSR_APIC_BASE && cpu_policy.beyond_phys_addr(value) {
                return inject_gp(cpu);
            }
            if vm.platform.msr_write(index, value, now) != Some(Ok(())) {
                return inject_gp(cpu);
            }
        } else {
            match vm.platform.msr_read(index, now) {
                Some(Ok(v)) => {
                    let v = if deadline && v != 0 {
                        v.wrapping_add(vm.tsc_adjust)
                    } else {
                        v
                    };
                    cpu.regs().set_edx_eax(v)
                }
                _ => return inject_gp(cpu),
            }
        }
        cpu.skip_instruction();
        return Next::Resume;
    }
    let usable = Msr::from_index(index).filter(|&m| cpu_policy.has_msr(m));
    let Some(m) = usable else {
        log::debug!(target: &vm.target, "#GP for {} of MSR {index:#x}", if write { "WRMSR" } else { "RDMSR" });
        return inject_gp(cpu);
    };
    if write {
        // Only EFER's check depends on its present value and on paging (LME changes only with
        // paging off, LMA is read-only).
        let (current, paging) = if m == Msr::Efer {
            let paging = cpu.read(Reg::Cr0Shadow) & cpu_mode::cr0::PG != 0;
            (cpu.read_msr(m), paging)
        } else {
            (0, true)
        };
        let Ok(value) = m.check_write(value, current, paging) else {
            log::debug!(target: &vm.target, "#GP for WRMSR {index:#x} = {value:#x}");
            return inject_gp(cpu);
        };
        match m.home() {
            Home::Vmcs => cpu.write_msr(m, value),
            Home::Switched(_) => cpu.write_cpu_msr(index, value),
            Home::Computed if m == Msr::Tsc => {
                // The clock runs on; the TSC reads `value` now (SDM 17.17: a write of IA32_TSC
                // sets the counter).
                vm.tsc_adjust = value.wrapping_sub(vm.guest_tsc(cpu.tsc()));
                cpu.set_tsc_offset(vm.tsc_offset());
            }
            Home::Emulated => vm.msrs.write(m, value),
            // XSS = 0 accepted; BIOS_SIGN_ID: no microcode to load. Nothing to store.
            Home::Computed => {}
        }
    } else {
        let v = match m.home() {
            Home::Vmcs => cpu.read_msr(m),
            // SWAPGS changes KERNEL_GS_BASE without an exit, so the CPU's value is the current
            // one.
            Home::Switched(_) => cpu.read_cpu_msr(index),
            Home::Computed if m == Msr::Tsc => vm.tsc_value(cpu.tsc()),
            Home::Emulated => vm.msrs.read(m),
            Home::Computed if m == Msr::BiosSignId => {
                u64::from(crate::msr::MICROCODE_REVISION) << 32
            }
            // XSS and MCG_CAP (no banks, no MCG_CTL) read 0.
            Home::Computed => 0,
        };
        cpu.regs().set_edx_eax(v);
    }
    cpu.skip_instruction();
    Next::Resume
}

/// HLT (SDM Vol. 2, HLT): the vCPU stops until an interrupt it can take (RFLAGS.IF = 1) or
/// an NMI. The instruction is complete (RIP past it); an interrupt already waiting is taken
/// at once, as after a HLT that an interrupt ends immediately. The STI shadow of `STI; HLT`
/// ends with the HLT, so it is cleared: else the interrupt that wakes the vCPU would wait for
/// a window exit.
fn handle_hlt<V: Vcpu>(vm: &mut Vm, cpu: &mut V) -> Next {
    let blocking = cpu.read(Reg::Interruptibility);
    if blocking & (interruptibility::STI | interruptibility::MOV_SS) != 0 {
        cpu.write(
            Reg::Interruptibility,
            blocking & !(interruptibility::STI | interruptibility::MOV_SS),
        );
    }
    let flags = cpu.read(Reg::Rflags);
    // Single-stepping the HLT: the trap skip_instruction left pending is a debug exception,
    // which ends the HLT state at once (SDM Vol. 2, HLT), so the vCPU does not halt; the #DB
    // is delivered at entry, before any interrupt (SDM 6.9), with RIP after the HLT.
    if flags & rflags::TF != 0 && cpu.read_msr(Msr::DebugCtl) & DEBUGCTL_BTF == 0 {
        return Next::Resume;
    }
    let interruptible = flags & rflags::IF != 0;
    if !interruptible && !vm.platform.nmi_can_arrive() {
        vm.halt_for_good();
        return Next::Stopped;
    }
    vm.halted = Some(interruptible);
    if vm.wake(cpu.tsc()) {
        Next::Resume
    } else {
        Next::Halt
    }
}

/// A snapshot of the general-purpose registers for the MMIO emulation, written back after.
struct Snapshot {
    regs: [u64; 16],
}

impl Gprs for Snapshot {
    fn gpr(&self, n: u8) -> u64 {
        self.regs[usize::from(n & 0xf)]
    }
    fn set_gpr(&mut self, n: u8, v: u64) {
        self.regs[usize::from(n & 0xf)] = v;
    }
}

/// An access to a device page (local APIC, IOAPIC): the instruction is fetched from guest
/// memory, decoded and carried out against the platform (`hv_vm::mmio`). An instruction that
/// cannot be fetched faults as the CPU would (#PF) or is faulted in by the memory engine; one
/// that cannot be decoded or emulated stops the VM with a report naming it.
/// The first access of a VM to an address with neither memory nor a device is logged, the
/// others only counted (the platform's `unclaimed_mmio`, in the stats line): a guest that
/// probes or scribbles there must not flood the log.
#[inline(never)]
fn note_open_bus(vm: &mut Vm, gpa: u64, access: EptAccess) {
    if vm.platform.stats.unclaimed_mmio == 0 {
        log::warn!(target: &vm.target,
            "{} at gpa={gpa:#x}: no memory or device there (open bus: reads all ones, writes are dropped; further accesses only counted)",
            access.name());
    }
}

fn handle_mmio<V: Vcpu>(vm: &mut Vm, memory: &GuestMemory, cpu: &mut V, gpa: u64) -> Next {
    let state = mmio::CpuState {
        rip: cpu.read(Reg::Rip),
        cs_base: cpu.read(Reg::CsBase),
        cs_access_rights: cpu.read(Reg::CsAccessRights) as u32,
        cpl: cpu.read(Reg::Cpl) as u8,
        cr0: cpu.read(Reg::Cr0),
        cr3: cpu.read(Reg::Cr3),
        cr4: cpu.read(Reg::Cr4),
        efer: cpu.read_msr(Msr::Efer),
        pdptes: [0, 1, 2, 3].map(|i| cpu.read(Reg::Pdpte(i))),
    };
    let fetched = match mmio::fetch(memory, cpu.phys(), &state) {
        Ok(f) => f,
        Err(e) => return mmio_fetch_failed(vm, cpu, gpa, state.rip, e),
    };
    let insn = match fetched.decode() {
        Ok(insn) => insn,
        Err(mmio::MmioError::Fetch(e)) => return mmio_fetch_failed(vm, cpu, gpa, state.rip, e),
        Err(error) => {
            vm.fail(format_args!(
                "{}",
                mmio::Report {
                    gpa,
                    rip: state.rip,
                    bytes: fetched.bytes(),
                    error: &error,
                }
            ));
            return Next::Stopped;
        }
    };
    let mut regs = Snapshot { regs: [0; 16] };
    for n in 0..16u8 {
        regs.regs[usize::from(n)] = cpu.gpr(n);
    }
    let before = regs.regs;
    let mut flags = cpu.read(Reg::Rflags);
    let now = vm.guest_tsc(cpu.tsc());
    let platform = &mut vm.platform;
    let step = mmio::emulate(
        &insn,
        &mut regs,
        &mut flags,
        gpa,
        &mut |access| match access {
            DeviceAccess::Read { gpa, size } => {
                let mut b = [0u8; 8];
                platform.mmio_read(gpa, &mut b[..usize::from(size.min(8))], now);
                Ok::<u64, core::convert::Infallible>(u64::from_le_bytes(b))
            }
            DeviceAccess::Write { gpa, size, value } => {
                platform.mmio_write(gpa, &value.to_le_bytes()[..usize::from(size.min(8))], now);
                Ok(0)
            }
        },
    );
    let Ok(step) = step;
    // Only what the instruction changed goes back (RSP is a VMCS field on VT-x).
    for n in 0..16u8 {
        let v = regs.regs[usize::from(n)];
        if v != before[usize::from(n)] {
            cpu.set_gpr(n, v);
        }
    }
    cpu.write(Reg::Rflags, flags);
    if let Step::Done = step {
        cpu.skip_bytes(u64::from(insn.len));
    }
    Next::Resume
}

fn mmio_fetch_failed<V: Vcpu>(
    vm: &mut Vm,
    cpu: &mut V,
    gpa: u64,
    rip: u64,
    e: mmio::FetchError,
) -> Next {
    match e {
        mmio::FetchError::PageFault { linear, error_code } => inject_pf(cpu, linear, error_code),
        mmio::FetchError::Unavailable { gpa } => Next::GuestFault { gpa, write: false },
        other => {
            vm.fail(format_args!(
                "cannot fetch the instruction of an MMIO access to gpa={gpa:#x} at rip={rip:#x}: {other}"
            ));
            Next::Stopped
        }
    }
}

/// Before every VM entry: brings the platform's timers up to now and delivers what waits, as
/// the CPU takes interrupts between instructions (SDM 6.8, 26.6): an NMI unless NMIs are
/// blocked; an external interrupt when RFLAGS.IF = 1 and no STI/MOV-SS shadow holds, else an
/// interrupt-window exit is asked for so it is delivered the moment the guest can take it.
/// Nothing is injected over an event already set up for this entry (a re-injection), and a
/// vector is only taken from the controllers when it is injected, so none is ever lost.
///
/// `now` is the host TSC, which the caller has just read; the platform counts in the guest's.
#[inline(always)]
pub fn before_entry<V: Vcpu>(vm: &mut Vm, cpu: &mut V, now: u64) {
    let now = vm.guest_tsc(now);
    if !vm.platform.needs_attention(now) {
        return;
    }
    deliver_events(vm, cpu, now);
}

#[inline(never)]
fn deliver_events<V: Vcpu>(vm: &mut Vm, cpu: &mut V, now: u64) {
    vm.platform.advance(now);
    if !vm.platform.interrupt_waiting() {
        cpu.set_interrupt_window(false);
        cpu.set_nmi_window(false);
        return;
    }
    if cpu.injecting() {
        // The re-injected event goes first; the window exit brings us back for this one.
        cpu.set_interrupt_window(vm.platform.external_waiting());
        return;
    }
    let mut blocking = cpu.read(Reg::Interruptibility);
    let shadow = interruptibility::STI | interruptibility::MOV_SS;
    if blocking & shadow != 0 && cpu.instruction_completed() {
        // The exit was the instruction in the shadow, and the hypervisor completed it: the
        // shadow is over (SDM 6.8.3), as the CPU would have ended it.
        blocking &= !shadow;
        cpu.write(Reg::Interruptibility, blocking);
    }
    let nmi_blocked = blocking & (interruptibility::NMI | interruptibility::MOV_SS) != 0;
    // An NMI that must wait for the guest's IRET: the NMI window says when.
    cpu.set_nmi_window(vm.platform.nmi_waiting() && nmi_blocked);
    if vm.platform.nmi_waiting() && !nmi_blocked && vm.platform.take_nmi() {
        cpu.inject(
            Interruption {
                vector: 2,
                kind: Interruption::NMI,
                has_error_code: false,
            },
            0,
        );
        cpu.set_interrupt_window(vm.platform.external_waiting());
        return;
    }
    let can_take = cpu.read(Reg::Rflags) & rflags::IF != 0
        && blocking & (interruptibility::STI | interruptibility::MOV_SS) == 0;
    if can_take {
        if let Some(vector) = vm.platform.acknowledge() {
            cpu.inject(Interruption::external(vector), 0);
        }
    }
    // More may wait (or this one could not be taken yet): exit when the guest can take one. An
    // NMI that waits for the guest's NMI blocking to end is not a reason for this window (it
    // would open at once, exit after exit): it is retried at every entry.
    cpu.set_interrupt_window(vm.platform.external_waiting());
}

#[cfg(test)]
mod tests;
