//! The guest's switches between paging modes: MOV to CR0 that turns paging on or off, and
//! with it IA-32e mode (SDM Vol. 3A, 9.8.5 "Initializing IA-32e Mode" and 4.1.2 "Paging-Mode
//! Enabling").
//!
//! A guest that starts in 32-bit protected mode (a Multiboot kernel) enables long mode itself:
//! CR4.PAE, then EFER.LME, then CR0.PG, at which the CPU sets EFER.LMA. In VMX non-root
//! operation the CPU does that too, but the VM-entry control "IA-32e mode guest" and a guest
//! EFER held in a VM-entry MSR-load list do not follow (SDM 27.3.1.1, 28.3.1): so CR0.PG is
//! host-owned ([`CR0_HOST_OWNED`], in the CR0 guest/host mask), every write of it exits, and
//! [`mov_to_cr0`] does what the CPU would: the checks of MOV to CR0 (SDM Vol. 2B), EFER.LMA, the
//! entry control, the PAE page-directory-pointer entries for PAE paging outside long mode
//! (SDM 4.4.1) and the TLB flush. CR0.NE is host-owned too: VMX operation requires it set (SDM
//! A.7), so a guest that clears it (kvm-unit-tests do) would get #GP from the CPU itself; here
//! it reads back what it wrote while the CPU keeps running with NE set (x87 errors are then
//! reported as #MF, never through the legacy FERR# pin). The other CR0 bits are the guest's own
//! and never exit.
//!
//! This module owns those rules; it must not decide CR4 (policy.rs) or EFER writes other than
//! LMA (msr.rs checks WRMSR EFER, LME included).

use crate::memory::GuestMemory;
use crate::msr::{efer, Msr};
use crate::vcpu::{Reg, Vcpu};

/// CR0 bits (SDM 2.5).
pub mod cr0 {
    pub const PE: u64 = 1 << 0;
    pub const ET: u64 = 1 << 4;
    pub const NE: u64 = 1 << 5;
    pub const NW: u64 = 1 << 29;
    pub const CD: u64 = 1 << 30;
    pub const PG: u64 = 1 << 31;
}

const CR4_PAE: u64 = 1 << 5;
const CR4_PCIDE: u64 = 1 << 17;
/// CS access rights, VMCS format: the L bit (SDM 25.4.1).
const CS_L: u64 = 1 << 13;

/// The CR0 bits the hypervisor owns: their writes exit, their reads come from the read shadow.
pub const CR0_HOST_OWNED: u64 = cr0::PG | cr0::NE;

/// Why a MOV to CR0 faults: the guest gets #GP(0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cr0Fault {
    /// Bits 63:32 set in 64-bit mode.
    Reserved,
    /// PG without PE, or NW without CD.
    Invalid,
    /// Paging on with EFER.LME but without CR4.PAE, or with CS.L set.
    LongModeActivation,
    /// Paging off in 64-bit mode, or with CR4.PCIDE set.
    PagingOff,
    /// PAE paging on with a reserved bit set in a present PDPTE.
    Pdpte,
}

/// Emulates MOV to CR0 with `value` (the source register) for a vCPU whose CR0.PG and CR0.NE
/// are host-owned.
pub fn mov_to_cr0<V: Vcpu>(cpu: &mut V, memory: &GuestMemory, value: u64) -> Result<(), Cr0Fault> {
    let efer_now = cpu.read_msr(Msr::Efer);
    let cs_l = cpu.read(Reg::CsAccessRights) & CS_L != 0;
    let in_64bit_mode = efer_now & efer::LMA != 0 && cs_l;
    // Outside 64-bit mode the operand is 32 bits wide (SDM Vol. 2B, MOV—Move to/from Control
    // Registers: "#GP(0) if an attempt is made to write a 1 to any reserved bit" in 64-bit mode).
    let value = if in_64bit_mode {
        if value >> 32 != 0 {
            return Err(Cr0Fault::Reserved);
        }
        value
    } else {
        value & 0xffff_ffff
    };
    if (value & cr0::PG != 0 && value & cr0::PE == 0)
        || (value & cr0::NW != 0 && value & cr0::CD == 0)
    {
        return Err(Cr0Fault::Invalid);
    }
    // The shadow holds the guest's PG and NE; the CPU's CR0 the rest.
    let was_paging = cpu.read(Reg::Cr0Shadow) & cr0::PG != 0;
    let paging = value & cr0::PG != 0;
    let cr4 = cpu.read(Reg::Cr4);
    let mut efer_new = efer_now;
    if paging && !was_paging {
        if efer_now & efer::LME != 0 {
            // SDM 9.8.5: IA-32e mode needs PAE, and CS.L clear when it starts.
            if cr4 & CR4_PAE == 0 || cs_l {
                return Err(Cr0Fault::LongModeActivation);
            }
            efer_new |= efer::LMA;
        } else if cr4 & CR4_PAE != 0 {
            load_pdptes(cpu, memory)?;
        }
    } else if !paging && was_paging {
        if in_64bit_mode || cr4 & CR4_PCIDE != 0 {
            return Err(Cr0Fault::PagingOff);
        }
        efer_new &= !efer::LMA;
    }
    if efer_new != efer_now {
        cpu.write_msr(Msr::Efer, efer_new);
        cpu.set_long_mode(efer_new & efer::LMA != 0);
    }
    // CR0.NE is fixed to 1 in VMX operation (SDM A.7); PE and PG may be 0 with unrestricted
    // guest, which every VM that can clear them runs with. ET is hardwired to 1 since the P6
    // (SDM 2.5): writes do not clear it.
    cpu.write(Reg::Cr0, value | cr0::NE | cr0::ET);
    cpu.write(Reg::Cr0Shadow, value | cr0::ET);
    if paging != was_paging {
        // The translations cached under the old mode are stale: a real MOV to CR0 that
        // changes PG flushes them (SDM 4.10.4.1).
        cpu.flush_guest_tlb();
    }
    Ok(())
}

/// PAE paging outside IA-32e mode reads its four PDPTEs from CR3 when it is turned on (SDM
/// 4.4.1); with EPT the CPU takes them from the VMCS at entry (SDM 27.3.2.4), so they go there.
fn load_pdptes<V: Vcpu>(cpu: &mut V, memory: &GuestMemory) -> Result<(), Cr0Fault> {
    // Reserved in a present PDPTE: bits 2:1, 8:5 and those above MAXPHYADDR (52 here, the
    // architectural limit; SDM Table 4-8).
    const RESERVED: u64 = 0b1_1110_0110 | (0xfff << 52);
    let table = cpu.read(Reg::Cr3) & 0xffff_ffe0;
    let mut bytes = [0u8; 32];
    // A table outside the VM's memory reads as all ones, as unbacked memory does: reserved
    // bits set, so #GP.
    if memory.read(cpu.phys(), table, &mut bytes).is_err() {
        return Err(Cr0Fault::Pdpte);
    }
    let mut entries = [0u64; 4];
    for (i, e) in entries.iter_mut().enumerate() {
        *e = u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        if *e & 1 != 0 && *e & RESERVED != 0 {
            return Err(Cr0Fault::Pdpte);
        }
    }
    for (i, e) in entries.into_iter().enumerate() {
        cpu.write(Reg::Pdpte(i as u8), e);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
