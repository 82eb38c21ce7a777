//! The ACPI tables a Linux guest finds in its memory: what firmware would have told it about
//! the VM's platform (ACPI 6.5, chapter 5). Built with rust-vmm's `acpi_tables`; this module
//! only chooses the contents and the layout, from bytes to bytes. The kernel writes the blob at
//! [`TABLES_GPA`] and the Linux boot protocol passes the RSDP's address in the zero page.
//!
//! What the tables describe (hv-platform's devices, docs/platform.md):
//! - MADT: one processor (local APIC ID 0) with its local APIC at 0xFEE00000, the IOAPIC (ID 0,
//!   GSIs 0-23) at 0xFEC00000, the 8259 pair present (PCAT_COMPAT), and the interrupt source
//!   overrides every PC firmware reports: ISA IRQ 0 (the PIT) on GSI 2, and the SCI (IRQ 9)
//!   level-triggered, active high.
//! - FADT: full (not hardware-reduced) ACPI with the PM1a event and control blocks and the PM
//!   timer of `hv_platform::acpi_pm`, SCI on IRQ 9, no SMI command port (always in ACPI mode),
//!   no GPE blocks; the reset register is the reset control register (0xCF9, value 6); boot
//!   flags: legacy devices and an 8042, no VGA. The FACS it points to is empty.
//! - DSDT: only the `\_S5` object (soft off, SLP_TYP [`hv_platform::acpi_pm::S5_SLP_TYP`]), so
//!   that the OS can power the VM off; no devices (the OS finds the PC's legacy devices at their
//!   ISA addresses) and no other sleep state.
//! - XSDT listing the FADT and MADT; RSDP (revision 2) first, at [`TABLES_GPA`], where a BIOS
//!   scan of 0xE0000-0xFFFFF also finds it.

use acpi_tables::aml::{Name, Package, Path};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use alloc::vec::Vec;
use hv_platform::acpi_pm;
use zerocopy::IntoBytes;

/// Where the tables go: the BIOS area's first half, reserved in the e820 map.
pub const TABLES_GPA: u64 = 0xe_0000;
/// The area's size: the tables need under 1 KiB.
pub const TABLES_SIZE: u64 = 0x1_0000;

const OEM_ID: [u8; 6] = *b"MUXVSR";
const OEM_TABLE_ID: [u8; 8] = *b"MUXVISOR";
const OEM_REVISION: u32 = 1;

/// The platform's fixed addresses and lines (hv-platform).
const LOCAL_APIC_GPA: u32 = 0xfee0_0000;
const IOAPIC_GPA: u32 = 0xfec0_0000;
/// The SCI's ISA IRQ (and GSI), as on PIIX4 and ICH chipsets.
const SCI_IRQ: u8 = 9;
/// The reset control register and the value that resets (SYS_RST | RST_CPU).
const RESET_PORT: u16 = hv_platform::reset::RESET_CONTROL;
const RESET_VALUE: u8 = 0x06;

/// FADT IA-PC boot architecture flags (ACPI 6.5, Table 5.11): LEGACY_DEVICES, 8042, VGA Not
/// Present.
const IAPC_BOOT_ARCH: u16 = (1 << 0) | (1 << 1) | (1 << 2);
/// MADT flags: PCAT_COMPAT (a dual 8259 is present).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT revision 5 (ACPI 6.5), DSDT revision 2 (64-bit AML integers).
const MADT_REVISION: u8 = 5;
const DSDT_REVISION: u8 = 2;

/// MADT Interrupt Source Override (ACPI 6.5, 5.2.12.5): type 2, length 10, bus 0 (ISA).
fn interrupt_source_override(irq: u8, gsi: u32, flags: u16) -> [u8; 10] {
    let mut e = [0u8; 10];
    e[0] = 2;
    e[1] = 10;
    e[3] = irq;
    e[4..8].copy_from_slice(&gsi.to_le_bytes());
    e[8..10].copy_from_slice(&flags.to_le_bytes());
    e
}
/// MPS INTI flags: active high (polarity 01), level-triggered (trigger mode 11).
const ACTIVE_HIGH_LEVEL: u16 = 0b01 | (0b11 << 2);

/// The bytes of one Aml object.
fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn io_gas(port: u16, len: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, len * 8, 0, access, u64::from(port))
}

/// The MADT (signature "APIC").
fn madt() -> Vec<u8> {
    let mut t = Sdt::new(
        *b"APIC",
        36,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    t.append_slice(&LOCAL_APIC_GPA.to_le_bytes());
    t.append_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    t.append_slice(ProcessorLocalApic::new(0, 0, EnabledStatus::Enabled).as_bytes());
    t.append_slice(IoApic::new(0, IOAPIC_GPA, 0).as_bytes());
    t.append_slice(&interrupt_source_override(0, 2, 0));
    t.append_slice(&interrupt_source_override(
        SCI_IRQ,
        SCI_IRQ.into(),
        ACTIVE_HIGH_LEVEL,
    ));
    t.as_slice().to_vec()
}

/// The DSDT: `Name (\_S5, Package () { S5_SLP_TYP, 0, 0, 0 })`.
fn dsdt() -> Vec<u8> {
    let mut t = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    let slp_typ = acpi_pm::S5_SLP_TYP as u8;
    let s5 = Name::new(
        Path::new("_S5_"),
        &Package::new(alloc::vec![&slp_typ, &0u8, &0u8, &0u8]),
    );
    t.append_slice(&aml_bytes(&s5));
    t.as_slice().to_vec()
}

/// The FADT (signature "FACP") pointing at the FACS and DSDT at `facs` and `dsdt`.
fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .firmware_ctrl_64(facs)
        .dsdt_64(dsdt)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::TmrValExt)
        .flag(Flags::ResetRegSup);
    f.sci_int = u16::from(SCI_IRQ).into();
    f.pm1a_evt_blk = u32::from(acpi_pm::PM1A_EVT).into();
    f.pm1a_cnt_blk = u32::from(acpi_pm::PM1A_CNT).into();
    f.pm_tmr_blk = u32::from(acpi_pm::PM_TMR).into();
    f.pm1_evt_len = acpi_pm::PM1_EVT_LEN;
    f.pm1_cnt_len = acpi_pm::PM1_CNT_LEN;
    f.pm_tmr_len = acpi_pm::PM_TMR_LEN;
    f.x_pm1a_evt_blk = io_gas(
        acpi_pm::PM1A_EVT,
        acpi_pm::PM1_EVT_LEN,
        AccessSize::WordAccess,
    );
    f.x_pm1a_cnt_blk = io_gas(
        acpi_pm::PM1A_CNT,
        acpi_pm::PM1_CNT_LEN,
        AccessSize::WordAccess,
    );
    f.x_pm_tmr_blk = io_gas(
        acpi_pm::PM_TMR,
        acpi_pm::PM_TMR_LEN,
        AccessSize::DwordAccess,
    );
    f.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    f.reset_reg = io_gas(RESET_PORT, 1, AccessSize::ByteAccess);
    f.reset_value = RESET_VALUE;
    aml_bytes(&f.finalize())
}

/// The tables, laid out from [`TABLES_GPA`]: RSDP, XSDT, FADT, FACS, MADT, DSDT, each aligned
/// to 64 bytes (the FACS must be).
pub fn tables() -> Vec<u8> {
    const ALIGN: usize = 64;
    // Sizes are fixed, so addresses can be computed before the tables that hold them.
    let madt = madt();
    let dsdt = dsdt();
    let lens = [
        Rsdp::len(),
        36 + 2 * 8, // the XSDT: header and two entries
        acpi_tables::fadt::FADT::len(),
        FACS::len(),
        madt.len(),
        dsdt.len(),
    ];
    let mut offsets = [0usize; 6];
    let mut end = 0usize;
    for (offset, len) in offsets.iter_mut().zip(lens) {
        *offset = end.next_multiple_of(ALIGN);
        end = *offset + len;
    }
    let gpa = |i: usize| TABLES_GPA + offsets[i] as u64;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(gpa(2));
    xsdt.add_entry(gpa(4));
    let pieces = [
        aml_bytes(&Rsdp::new(OEM_ID, gpa(1))),
        aml_bytes(&xsdt),
        fadt(gpa(3), gpa(5)),
        FACS::new().as_bytes().to_vec(),
        madt,
        dsdt,
    ];
    let mut blob = alloc::vec![0u8; end];
    for ((piece, offset), len) in pieces.iter().zip(offsets).zip(lens) {
        debug_assert_eq!(piece.len(), len, "a table's planned size");
        blob[offset..offset + piece.len()].copy_from_slice(piece);
    }
    debug_assert!(blob.len() as u64 <= TABLES_SIZE);
    blob
}

#[cfg(test)]
mod tests;
