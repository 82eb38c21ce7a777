//! The guest side: safe wrappers that issue hypercalls with `VMCALL`.
//!
//! Every wrapper passes the address of a Rust object as a guest-physical address, which holds for
//! guests started by our 64-bit boot protocol ([`crate::boot`]): they run on an identity map.
//! On the host these functions compile (for tests of the types) but must not be called.

use crate::{Hypercall, HypercallError, VmInfo, VmStats};

/// Issues a raw hypercall. Exposed so that tests can pass hostile arguments on purpose.
#[inline(always)]
pub fn hypercall(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> u64 {
    let ret: u64;
    // SAFETY: VMCALL only traps to the hypervisor, which changes no register but RAX and no
    // memory other than the buffers named by the arguments (which the callers below own).
    unsafe {
        core::arch::asm!(
            "vmcall",
            inlateout("rax") nr => ret,
            in("rdi") a0,
            in("rsi") a1,
            in("rdx") a2,
            in("r10") a3,
            options(nostack),
        );
    }
    ret
}

fn call(nr: Hypercall, a0: u64, a1: u64, a2: u64) -> Result<u64, HypercallError> {
    HypercallError::from_rax(hypercall(nr as u64, a0, a1, a2, 0))
}

/// Writes bytes to this VM's console.
pub fn console_write(bytes: &[u8]) -> Result<u64, HypercallError> {
    call(
        Hypercall::ConsoleWrite,
        bytes.as_ptr() as u64,
        bytes.len() as u64,
        0,
    )
}

/// Stops this VM with `code`.
pub fn exit(code: u64) -> ! {
    hypercall(Hypercall::Exit as u64, code, 0, 0, 0);
    // The hypervisor never resumes a VM that called exit; if it did, do not run on.
    loop {
        // SAFETY: HLT has no memory effects.
        unsafe { core::arch::asm!("hlt", options(nomem, nostack)) };
    }
}

/// Asks for this VM's identity and configuration.
pub fn vm_info() -> Result<VmInfo, HypercallError> {
    let mut info = VmInfo::default();
    call(
        Hypercall::VmInfo,
        &mut info as *mut VmInfo as u64,
        core::mem::size_of::<VmInfo>() as u64,
        0,
    )?;
    Ok(info)
}

/// Gives the rest of the quantum away.
pub fn yield_now() {
    let _ = call(Hypercall::Yield, 0, 0, 0);
}

/// Logs `key=value` in the hypervisor's log, for tests and benchmarks.
pub fn report(key: &str, value: u64) -> Result<u64, HypercallError> {
    call(
        Hypercall::Report,
        key.as_ptr() as u64,
        key.len() as u64,
        value,
    )
}

/// Reads this VM's statistics.
pub fn vm_stats() -> Result<VmStats, HypercallError> {
    let mut stats = VmStats::default();
    call(
        Hypercall::VmStats,
        &mut stats as *mut VmStats as u64,
        core::mem::size_of::<VmStats>() as u64,
        0,
    )?;
    Ok(stats)
}

/// Does nothing in the hypervisor: one bare VMCALL round trip.
pub fn nop() {
    let _ = call(Hypercall::Nop, 0, 0, 0);
}
