use alloc::vec::Vec;

use super::*;
use crate::memory::tests::FlatPhys;
use crate::vcpu::fake::FakeVcpu;

const PE_ET: u64 = cr0::PE | (1 << 4);
const CODE32: u64 = 0xc09b;
const CODE64: u64 = 0xa09b;

/// A vCPU in 32-bit protected mode without paging, as a Multiboot kernel starts, with `efer`
/// and `cr4`; 4 pages of memory, identity-mapped to host frames.
fn protected(efer: u64, cr4: u64) -> (FakeVcpu, GuestMemory) {
    let memory = GuestMemory::new((0..4).map(|p| p * 4096).collect());
    let mut cpu = FakeVcpu::new(FlatPhys(alloc::vec![0; 4 * 4096]));
    cpu.state.insert("cr0", PE_ET | cr0::NE);
    cpu.state.insert("cr0_shadow", PE_ET);
    cpu.state.insert("cr4", cr4);
    cpu.state.insert("cs_ar", CODE32);
    cpu.msrs.insert(Msr::Efer.index(), efer);
    cpu.long_mode = false;
    (cpu, memory)
}

fn efer_of(cpu: &mut FakeVcpu) -> u64 {
    cpu.read_msr(Msr::Efer)
}

#[test]
fn paging_with_lme_activates_long_mode() {
    let (mut cpu, memory) = protected(efer::LME, CR4_PAE);
    assert_eq!(mov_to_cr0(&mut cpu, &memory, PE_ET | cr0::PG), Ok(()));
    assert_eq!(efer_of(&mut cpu), efer::LME | efer::LMA);
    assert!(cpu.long_mode);
    assert_eq!(cpu.read(Reg::Cr0), PE_ET | cr0::PG | cr0::NE);
    assert_eq!(cpu.read(Reg::Cr0Shadow), PE_ET | cr0::PG);
    assert_eq!(cpu.tlb_flushes, 1);

    // In compatibility mode (CS.L clear) paging may go off again: back to protected mode.
    assert_eq!(mov_to_cr0(&mut cpu, &memory, PE_ET), Ok(()));
    assert_eq!(efer_of(&mut cpu), efer::LME);
    assert!(!cpu.long_mode);
    assert_eq!(cpu.tlb_flushes, 2);
}

#[test]
fn long_mode_activation_checks() {
    // No PAE: #GP, and nothing changed.
    let (mut cpu, memory) = protected(efer::LME, 0);
    assert_eq!(
        mov_to_cr0(&mut cpu, &memory, PE_ET | cr0::PG),
        Err(Cr0Fault::LongModeActivation)
    );
    assert_eq!(efer_of(&mut cpu), efer::LME);
    assert_eq!(cpu.read(Reg::Cr0Shadow), PE_ET);
    assert_eq!(cpu.tlb_flushes, 0);
    // CS.L set when long mode would start.
    let (mut cpu, memory) = protected(efer::LME, CR4_PAE);
    cpu.state.insert("cs_ar", CODE64);
    assert_eq!(
        mov_to_cr0(&mut cpu, &memory, PE_ET | cr0::PG),
        Err(Cr0Fault::LongModeActivation)
    );
}

#[test]
fn invalid_combinations_fault() {
    let (mut cpu, memory) = protected(0, 0);
    assert_eq!(
        mov_to_cr0(&mut cpu, &memory, cr0::PG),
        Err(Cr0Fault::Invalid)
    );
    assert_eq!(
        mov_to_cr0(&mut cpu, &memory, PE_ET | cr0::NW),
        Err(Cr0Fault::Invalid)
    );
    // Outside 64-bit mode the operand is 32 bits: the upper half is not looked at.
    assert_eq!(mov_to_cr0(&mut cpu, &memory, (1 << 40) | PE_ET), Ok(()));
    assert_eq!(cpu.read(Reg::Cr0Shadow), PE_ET);
    // Real mode: PE off, paging off; ET stays set whatever is written.
    assert_eq!(mov_to_cr0(&mut cpu, &memory, 0), Ok(()));
    assert_eq!(cpu.read(Reg::Cr0), cr0::ET | cr0::NE);
    assert_eq!(cpu.read(Reg::Cr0Shadow), cr0::ET);
}

#[test]
fn sixty_four_bit_mode_rules() {
    let (mut cpu, memory) = protected(efer::LME | efer::LMA, CR4_PAE);
    let paged = PE_ET | cr0::PG;
    cpu.state.insert("cr0", paged | cr0::NE);
    cpu.state.insert("cr0_shadow", paged);
    cpu.state.insert("cs_ar", CODE64);
    cpu.long_mode = true;
    assert_eq!(
        mov_to_cr0(&mut cpu, &memory, paged | (1 << 32)),
        Err(Cr0Fault::Reserved)
    );
    assert_eq!(
        mov_to_cr0(&mut cpu, &memory, PE_ET),
        Err(Cr0Fault::PagingOff)
    );
    // NE may be cleared: the guest reads its value, the CPU keeps it set.
    assert_eq!(mov_to_cr0(&mut cpu, &memory, paged & !cr0::NE), Ok(()));
    assert_eq!(cpu.read(Reg::Cr0Shadow), paged & !cr0::NE);
    assert_eq!(cpu.read(Reg::Cr0), paged | cr0::NE);
    // Other bits change without a mode switch or a flush (WP here).
    assert_eq!(mov_to_cr0(&mut cpu, &memory, paged | (1 << 16)), Ok(()));
    assert_eq!(cpu.tlb_flushes, 0);
    assert!(cpu.long_mode);
    assert_eq!(cpu.read(Reg::Cr0), paged | (1 << 16) | cr0::NE);
    // Paging off in compatibility mode with CR4.PCIDE set faults too.
    cpu.state.insert("cs_ar", CODE32);
    cpu.state.insert("cr4", CR4_PAE | CR4_PCIDE);
    assert_eq!(
        mov_to_cr0(&mut cpu, &memory, PE_ET),
        Err(Cr0Fault::PagingOff)
    );
}

#[test]
fn pae_paging_loads_the_pdptes() {
    let (mut cpu, memory) = protected(0, CR4_PAE);
    cpu.state.insert("cr3", 0x1020);
    let entries = [0x2001u64, 0, 0x3001, 0x4000_0006]; // the last is not present
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    memory.write(&mut cpu.phys, 0x1020, &bytes).unwrap();
    assert_eq!(mov_to_cr0(&mut cpu, &memory, PE_ET | cr0::PG), Ok(()));
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(cpu.read(Reg::Pdpte(i as u8)), *e);
    }
    assert!(!cpu.long_mode);
    assert_eq!(efer_of(&mut cpu), 0);

    // A present entry with a reserved bit: #GP, paging stays off.
    let (mut cpu, memory) = protected(0, CR4_PAE);
    cpu.state.insert("cr3", 0x1000);
    memory
        .write(&mut cpu.phys, 0x1008, &0x2003u64.to_le_bytes())
        .unwrap();
    assert_eq!(
        mov_to_cr0(&mut cpu, &memory, PE_ET | cr0::PG),
        Err(Cr0Fault::Pdpte)
    );
    assert_eq!(cpu.read(Reg::Cr0Shadow), PE_ET);
    // A table outside the VM's memory.
    cpu.state.insert("cr3", 0x10_0000);
    assert_eq!(
        mov_to_cr0(&mut cpu, &memory, PE_ET | cr0::PG),
        Err(Cr0Fault::Pdpte)
    );
}
