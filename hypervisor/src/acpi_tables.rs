//! ACPI: the MADT, to know the machine's processors and I/O APICs (ACPI 6.5, 5.2.12).
//!
//! The hypervisor runs on one CPU for now; the MADT is read to report what the machine has and
//! to prove the tables are reachable. The `acpi` crate parses; this file only maps.

use acpi::{madt::Madt, madt::MadtEntry, AcpiHandler, AcpiTables, PhysicalMapping};
use core::ptr::NonNull;

/// Physical memory is identity-mapped below 4 GiB, so a "mapping" is the address itself.
#[derive(Clone, Copy)]
struct IdentityHandler;

impl AcpiHandler for IdentityHandler {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        // SAFETY: the boot page tables identity-map the first 4 GiB, where firmware places the
        // ACPI tables; the caller (the acpi crate) guarantees a T lives there.
        unsafe {
            PhysicalMapping::new(
                physical_address,
                NonNull::new(physical_address as *mut T).expect("ACPI table at address 0"),
                size,
                size,
                *self,
            )
        }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

/// What the MADT says about the machine.
#[derive(Debug, Default)]
pub struct MadtSummary {
    pub processors: usize,
    pub enabled_processors: usize,
    pub io_apics: usize,
    pub local_apic_address: u32,
}

/// Parses the tables from the RSDP at `rsdp` and summarises the MADT.
pub fn read_madt(rsdp: usize) -> Result<MadtSummary, acpi::AcpiError> {
    if rsdp >= 1 << 32 {
        return Err(acpi::AcpiError::NoValidRsdp);
    }
    // SAFETY: `rsdp` comes from the bootloader's RSDP tag (a copy inside the boot information,
    // which is identity-mapped and kept intact).
    let tables = unsafe { AcpiTables::from_rsdp(IdentityHandler, rsdp)? };
    let madt = tables.find_table::<Madt>()?;
    let mut summary = MadtSummary {
        local_apic_address: madt.get().local_apic_address,
        ..Default::default()
    };
    for entry in madt.get().entries() {
        match entry {
            MadtEntry::LocalApic(e) => {
                summary.processors += 1;
                if e.flags & 1 != 0 {
                    summary.enabled_processors += 1;
                }
            }
            MadtEntry::LocalX2Apic(e) => {
                summary.processors += 1;
                if e.flags & 1 != 0 {
                    summary.enabled_processors += 1;
                }
            }
            MadtEntry::IoApic(_) => summary.io_apics += 1,
            _ => {}
        }
    }
    Ok(summary)
}
