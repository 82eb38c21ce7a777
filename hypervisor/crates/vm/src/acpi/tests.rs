use super::*;
use ::acpi::fadt::Fadt;
use ::acpi::madt::{Madt, MadtEntry};
use ::acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use alloc::rc::Rc;
use core::ptr::NonNull;

/// Guest memory from [`TABLES_GPA`] holding the tables, as the `acpi` crate's "physical
/// memory".
#[derive(Clone)]
struct GuestMemory(Rc<Vec<u8>>);

impl AcpiHandler for GuestMemory {
    unsafe fn map_physical_region<T>(&self, gpa: usize, size: usize) -> PhysicalMapping<Self, T> {
        let offset = gpa
            .checked_sub(TABLES_GPA as usize)
            .expect("the parser stays in the table area");
        assert!(offset + size <= self.0.len(), "mapping past the tables");
        let ptr = NonNull::new(self.0.as_ptr().add(offset) as *mut T).expect("not null");
        // SAFETY: the range is inside the Vec, which the Rc in the mapping keeps alive; the
        // tables are packed structures, read unaligned by the crate.
        unsafe { PhysicalMapping::new(gpa, ptr, size, size, self.clone()) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}

fn parsed() -> AcpiTables<GuestMemory> {
    let memory = GuestMemory(Rc::new(tables()));
    // SAFETY: the RSDP is at TABLES_GPA in `memory`, and every address in the tables points
    // inside it (checked by the handler).
    unsafe { AcpiTables::from_rsdp(memory, TABLES_GPA as usize) }.expect("the RSDP validates")
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
}

#[test]
fn every_table_has_a_valid_checksum_and_the_rsdp_comes_first() {
    let blob = tables();
    assert!(blob.len() as u64 <= TABLES_SIZE);
    assert_eq!(&blob[..8], b"RSD PTR ");
    assert_eq!(checksum(&blob[..20]), 0, "RSDP, ACPI 1.0 part");
    assert_eq!(checksum(&blob[..36]), 0, "RSDP, extended");
    // Every table with a header (all but the RSDP and the FACS) sums to zero.
    let mut found = Vec::new();
    let mut at = 64;
    while at < blob.len() {
        let signature: [u8; 4] = blob[at..at + 4].try_into().expect("4 bytes");
        let len = u32::from_le_bytes(blob[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
        if signature != *b"FACS" {
            assert_eq!(checksum(&blob[at..at + len]), 0, "{signature:?}");
            found.push(signature);
        }
        at = (at + len).next_multiple_of(64);
    }
    assert_eq!(found, [*b"XSDT", *b"FACP", *b"APIC", *b"DSDT"]);
    // The parser, which validates what it reads, finds what the XSDT lists.
    let tables = parsed();
    let signatures: Vec<alloc::string::String> = tables
        .headers()
        .map(|h| h.signature.as_str().into())
        .collect();
    assert_eq!(signatures, ["FACP", "APIC"]);
}

#[test]
fn the_madt_describes_the_vm_s_interrupt_controllers() {
    let tables = parsed();
    let madt = tables.find_table::<Madt>().expect("a MADT");
    let madt = madt.get();
    assert!(madt.supports_8259(), "PCAT_COMPAT");
    let local_apic = madt.local_apic_address;
    assert_eq!(local_apic, 0xfee0_0000);
    let (mut cpus, mut ioapics, mut overrides) = (Vec::new(), Vec::new(), Vec::new());
    for entry in madt.entries() {
        match entry {
            MadtEntry::LocalApic(e) => cpus.push((e.apic_id, { e.flags } & 1)),
            MadtEntry::IoApic(e) => ioapics.push((e.io_apic_id, { e.io_apic_address }, {
                e.global_system_interrupt_base
            })),
            MadtEntry::InterruptSourceOverride(e) => {
                overrides.push((e.bus, e.irq, { e.global_system_interrupt }, { e.flags }))
            }
            _ => panic!("unexpected MADT entry"),
        }
    }
    assert_eq!(cpus, [(0, 1)], "one enabled CPU, APIC ID 0");
    assert_eq!(ioapics, [(0, 0xfec0_0000, 0)]);
    // The PIT on GSI 2 (bus conforming); the SCI level-triggered, active high.
    assert_eq!(overrides, [(0, 0, 2, 0), (0, 9, 9, 0b1101)]);
}

#[test]
fn the_fadt_points_at_the_platform_s_power_management_ports() {
    let tables = parsed();
    let fadt = tables.find_table::<Fadt>().expect("a FADT");
    let fadt = fadt.get();
    let flags = fadt.flags;
    assert!(!flags.system_is_hw_reduced_acpi());
    assert_eq!({ fadt.sci_interrupt }, 9);
    assert_eq!({ fadt.smi_cmd_port }, 0, "always in ACPI mode");
    let evt = fadt.pm1a_event_block().expect("PM1a event block");
    assert_eq!(evt.address, u64::from(acpi_pm::PM1A_EVT));
    let cnt = fadt.pm1a_control_block().expect("PM1a control block");
    assert_eq!(cnt.address, u64::from(acpi_pm::PM1A_CNT));
    let tmr = fadt.pm_timer_block().expect("valid").expect("a PM timer");
    assert_eq!(tmr.address, u64::from(acpi_pm::PM_TMR));
    assert!(flags.pm_timer_is_32_bit());
    assert!(flags.supports_system_reset_via_fadt());
    let reset = fadt.reset_register().expect("reset register");
    assert_eq!(reset.address, 0xcf9);
    assert_eq!(fadt.reset_value, 6);
    assert!(
        fadt.facs_address().is_ok_and(|a| a % 64 == 0),
        "FACS 64-byte aligned"
    );
}

#[test]
fn the_dsdt_holds_only_the_s5_package() {
    let tables = parsed();
    let dsdt = tables.dsdt().expect("a DSDT");
    let blob = tables_blob();
    let at = dsdt.address - TABLES_GPA as usize;
    let aml = &blob[at..at + dsdt.length as usize];
    // NameOp "_S5_" PackageOp PkgLength(7) NumElements(4) BytePrefix 5, Zero, Zero, Zero
    // (ACPI 6.5, 20.2.5.2 and 20.2.3).
    let slp_typ = acpi_pm::S5_SLP_TYP as u8;
    assert_eq!(
        aml,
        [0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, slp_typ, 0x00, 0x00, 0x00]
    );
}

fn tables_blob() -> Vec<u8> {
    tables()
}
