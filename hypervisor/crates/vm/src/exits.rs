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

use crate::hypercall::{self, Args, Outcome};
use crate::memory::{AccessError, GuestMemory};
use crate::msr::{Home, Msr};
use crate::paging;
use crate::policy::{self, CpuPolicy};
use crate::uart::Uart16550;
use crate::vcpu::{rflags, Reg, Vcpu};
use crate::vm::Vm;

/// What the exit handler decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Re-enter the same guest.
    Resume,
    /// End the quantum (preemption timer, HLT, yield) and schedule the next VM.
    Reschedule,
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

/// #UD: what a CPU without the instruction's feature raises.
fn inject_ud(cpu: &mut impl Vcpu) -> Next {
    cpu.inject(Interruption::exception(6, false), 0);
    Next::Resume
}

/// #GP(0).
fn inject_gp(cpu: &mut impl Vcpu) -> Next {
    cpu.inject(Interruption::exception(13, true), 0);
    Next::Resume
}

/// #PF at `linear` with `error_code`.
fn inject_pf(cpu: &mut impl Vcpu, linear: u64, error_code: u32) -> Next {
    cpu.set_cr2(linear);
    cpu.inject(Interruption::exception(14, true), error_code);
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
        VmExit::Cpuid => {
            vm.acct.count_exit(ExitKind::Cpuid);
            let r = cpu.regs();
            let (leaf, subleaf) = (r.rax as u32, r.rcx as u32);
            // Only leaf 1 depends on CR4 (OSXSAVE): spare the other leaves the read.
            let cr4 = if leaf == 1 { cpu.read(Reg::Cr4) } else { 0 };
            let native = cpu.native_cpuid(leaf, subleaf);
            let [a, b, c, d] = ctx.cpu_policy.cpuid(leaf, subleaf, native, cr4);
            let r = cpu.regs();
            (r.rax, r.rbx, r.rcx, r.rdx) = (a.into(), b.into(), c.into(), d.into());
            cpu.skip_instruction();
            Next::Resume
        }
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
            Next::Reschedule
        }
        VmExit::PreemptionTimer => {
            vm.acct.count_exit(ExitKind::PreemptionTimer);
            Next::Reschedule
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
                    "EPT violation at gpa={gpa:#x} ({}) rip={rip:#x}: outside the VM's {mib} MiB",
                    violation.access.name()
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
            handle_other_exit(vm, cpu, ctx, other)
        }
    }
}

/// The exits that are rare or that a guest causes only by probing: one policy each.
#[inline(never)]
fn handle_other_exit<V: Vcpu>(vm: &mut Vm, cpu: &mut V, ctx: &ExitContext, exit: VmExit) -> Next {
    match exit {
        VmExit::CrAccess(access) => handle_cr_access(vm, cpu, access),
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

/// MOV to/from CR8 (the task-priority register, kept per VM) and MOV to CR4 setting a bit of
/// [`policy::CR4_GUEST_FORBIDDEN`] (#GP). CR0 and CR3 accesses do not exit (empty CR0 mask, no
/// CR3 exiting); CLTS and LMSW only exit for masked CR0 bits.
fn handle_cr_access<V: Vcpu>(vm: &mut Vm, cpu: &mut V, access: CrAccess) -> Next {
    match access {
        CrAccess::MovTo { cr: 8, gpr } => {
            let value = cpu.gpr(gpr);
            if value > 0xf {
                return inject_gp(cpu); // CR8 bits 63:4 are reserved
            }
            vm.tpr = value;
        }
        CrAccess::MovFrom { cr: 8, gpr } => cpu.set_gpr(gpr, vm.tpr),
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

/// Reads `size` bytes from `port` as the VM's platform answers: byte lanes go to consecutive
/// ports (a 16-bit IN from 0x3F8 reads 0x3F8 and 0x3F9), the UART's ports to its model, every
/// other port reads as all ones.
fn port_read(vm: &mut Vm, port: u16, size: u8) -> u32 {
    (0..size).fold(0u32, |value, i| {
        let p = port.wrapping_add(i.into());
        let byte = if Uart16550::owns(p) {
            vm.uart.read(p)
        } else {
            policy::UNKNOWN_PORT_VALUE as u8
        };
        value | (u32::from(byte) << (8 * i))
    })
}

/// Writes `size` bytes of `value` to `port` (byte lanes as in [`port_read`]); writes to ports
/// without a device are ignored.
fn port_write(vm: &mut Vm, port: u16, size: u8, value: u32) {
    for i in 0..size {
        let p = port.wrapping_add(i.into());
        if Uart16550::owns(p) {
            if let Some(byte) = vm.uart.write(p, (value >> (8 * i)) as u8) {
                vm.console_bytes(&[byte]);
            }
        }
    }
}

fn handle_io<V: Vcpu>(vm: &mut Vm, cpu: &mut V, io: IoExit) -> Next {
    if io.is_in {
        let value = u64::from(port_read(vm, io.port, io.size));
        let r = cpu.regs();
        r.rax = match io.size {
            1 => (r.rax & !0xff) | value,
            2 => (r.rax & !0xffff) | value,
            // A 32-bit destination is zero-extended into RAX, as every 32-bit register write.
            _ => value,
        };
    } else {
        let value = cpu.regs().rax as u32;
        port_write(vm, io.port, io.size, value);
    }
    cpu.skip_instruction();
    Next::Resume
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
            let value = port_read(vm, io.port, io.size).to_le_bytes();
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
            port_write(vm, io.port, io.size, u32::from_le_bytes(value));
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
    let usable = Msr::from_index(index).filter(|&m| cpu_policy.has_msr(m));
    let Some(m) = usable else {
        log::debug!(target: &vm.target, "#GP for {} of MSR {index:#x}", if write { "WRMSR" } else { "RDMSR" });
        return inject_gp(cpu);
    };
    if write {
        // Only EFER's check depends on its present value (LME fixed, LMA read-only).
        let current = if m == Msr::Efer { cpu.read_msr(m) } else { 0 };
        let Ok(value) = m.check_write(value, current) else {
            log::debug!(target: &vm.target, "#GP for WRMSR {index:#x} = {value:#x}");
            return inject_gp(cpu);
        };
        match m.home() {
            Home::Vmcs => cpu.write_msr(m, value),
            Home::Switched(_) => cpu.write_cpu_msr(index, value),
            Home::Computed => {} // XSS = 0 accepted; nothing to store
        }
    } else {
        let v = match m.home() {
            Home::Vmcs => cpu.read_msr(m),
            // SWAPGS changes KERNEL_GS_BASE without an exit, so the CPU's value is the current
            // one.
            Home::Switched(_) => cpu.read_cpu_msr(index),
            Home::Computed if m == Msr::Tsc => cpu.tsc(),
            Home::Computed => 0,
        };
        cpu.regs().set_edx_eax(v);
    }
    cpu.skip_instruction();
    Next::Resume
}

#[cfg(test)]
mod tests;
