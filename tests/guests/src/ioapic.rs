//! The IOAPIC at [`BASE`] (Intel 82093AA I/O APIC datasheet; ICH/PCH datasheets for the EOI
//! register at offset 0x40 of version 0x20 IOAPICs).
//!
//! Owns: indirect register access through IOREGSEL/IOWIN ([`read`], [`write`]), redirection
//! entries ([`Route`], [`entry`], [`route`], [`mask`], [`unmask`]) and the ISA IRQ to pin map of
//! a PC ([`isa_pin`]). Entry encoding is pure and unit-tested.

/// Physical (= identity-mapped) address of the IOAPIC.
pub const BASE: u64 = 0xFEC0_0000;
/// Register select (offset 0x00), 8 bits.
pub const IOREGSEL: u64 = 0x00;
/// Register window (offset 0x10), 32 bits.
pub const IOWIN: u64 = 0x10;
/// EOI register (offset 0x40): writing a vector clears remote IRR of the level entries with it.
pub const EOI: u64 = 0x40;
/// Register indices (datasheet 3.2): ID, version (max redirection entry in bits 23:16),
/// arbitration, and the redirection table (two registers per pin from 0x10).
pub const REG_ID: u8 = 0x00;
pub const REG_VERSION: u8 = 0x01;
pub const REG_ARBITRATION: u8 = 0x02;
pub const REG_REDTBL: u8 = 0x10;

/// Redirection entry bits (datasheet 3.2.4).
pub const ENTRY_MASKED: u64 = 1 << 16;
const ENTRY_LEVEL: u64 = 1 << 15;
const ENTRY_ACTIVE_LOW: u64 = 1 << 13;
/// Remote IRR (read-only): a level interrupt was accepted and not yet EOIed.
pub const ENTRY_REMOTE_IRR: u64 = 1 << 14;

/// Edge or level triggered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Edge,
    Level,
}

/// Active-high or active-low input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Polarity {
    High,
    Low,
}

/// One redirection entry: fixed delivery, physical destination mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub vector: u8,
    pub trigger: Trigger,
    pub polarity: Polarity,
    /// Local APIC ID of the destination (bits 63:56).
    pub dest: u8,
    pub masked: bool,
}

impl Route {
    /// How ISA interrupts are wired on a PC: edge-triggered, active high.
    pub const fn isa(vector: u8, dest: u8) -> Self {
        Self {
            vector,
            trigger: Trigger::Edge,
            polarity: Polarity::High,
            dest,
            masked: false,
        }
    }
}

/// The 64-bit redirection entry for `route` (delivery mode 000 fixed, destination mode 0
/// physical).
pub const fn entry(route: Route) -> u64 {
    let mut e = route.vector as u64 | ((route.dest as u64) << 56);
    if matches!(route.trigger, Trigger::Level) {
        e |= ENTRY_LEVEL;
    }
    if matches!(route.polarity, Polarity::Low) {
        e |= ENTRY_ACTIVE_LOW;
    }
    if route.masked {
        e |= ENTRY_MASKED;
    }
    e
}

/// The IOAPIC pin of ISA IRQ `irq` on a PC: identity, except that the PIT's IRQ 0 is wired to
/// pin 2 (the MP table / ACPI MADT interrupt source override every PC firmware reports).
pub const fn isa_pin(irq: u8) -> u8 {
    if irq == 0 {
        2
    } else {
        irq
    }
}

fn reg_ptr<T>(offset: u64) -> *mut T {
    (BASE + offset) as *mut T
}

/// Reads register `index`.
pub fn read(index: u8) -> u32 {
    // SAFETY: the IOAPIC page is identity-mapped; IOREGSEL is an 8-bit register and IOWIN a
    // 32-bit one (datasheet 3.1), accessed at their widths, volatile.
    unsafe {
        core::ptr::write_volatile(reg_ptr::<u32>(IOREGSEL), u32::from(index));
        core::ptr::read_volatile(reg_ptr::<u32>(IOWIN))
    }
}

/// Writes register `index`.
pub fn write(index: u8, value: u32) {
    // SAFETY: as in `read`.
    unsafe {
        core::ptr::write_volatile(reg_ptr::<u32>(IOREGSEL), u32::from(index));
        core::ptr::write_volatile(reg_ptr::<u32>(IOWIN), value);
    }
}

/// Number of pins: the version register's maximum redirection entry plus one.
pub fn pins() -> u32 {
    ((read(REG_VERSION) >> 16) & 0xFF) + 1
}

/// The redirection entry of `pin`.
pub fn get_entry(pin: u8) -> u64 {
    let low = read(REG_REDTBL + 2 * pin);
    let high = read(REG_REDTBL + 2 * pin + 1);
    (u64::from(high) << 32) | u64::from(low)
}

/// Writes the redirection entry of `pin`: masked while it changes (low half masked first, then the
/// high half, then the low half as wanted), so that no half-written entry can deliver.
pub fn set_entry(pin: u8, value: u64) {
    write(REG_REDTBL + 2 * pin, ENTRY_MASKED as u32);
    write(REG_REDTBL + 2 * pin + 1, (value >> 32) as u32);
    write(REG_REDTBL + 2 * pin, value as u32);
}

/// Routes `pin` as `route` says.
pub fn route(pin: u8, route: Route) {
    set_entry(pin, entry(route));
}

/// Masks `pin`.
pub fn mask(pin: u8) {
    let low = read(REG_REDTBL + 2 * pin);
    write(REG_REDTBL + 2 * pin, low | ENTRY_MASKED as u32);
}

/// Unmasks `pin`.
pub fn unmask(pin: u8) {
    let low = read(REG_REDTBL + 2 * pin);
    write(REG_REDTBL + 2 * pin, low & !(ENTRY_MASKED as u32));
}

/// Masks every pin.
pub fn mask_all() {
    for pin in 0..pins().min(256) as u8 {
        mask(pin);
    }
}

/// Writes the EOI register (level-triggered entries with `vector` drop their remote IRR).
pub fn eoi(vector: u8) {
    // SAFETY: the EOI register of the identity-mapped IOAPIC page, a 32-bit register.
    unsafe { core::ptr::write_volatile(reg_ptr::<u32>(EOI), u32::from(vector)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries() {
        assert_eq!(entry(Route::isa(0x30, 0)), 0x30);
        let level = Route {
            vector: 0x41,
            trigger: Trigger::Level,
            polarity: Polarity::Low,
            dest: 3,
            masked: true,
        };
        assert_eq!(entry(level), 0x0300_0000_0001_A041);
    }

    #[test]
    fn isa_pins() {
        assert_eq!(isa_pin(0), 2);
        assert_eq!(isa_pin(4), 4);
        assert_eq!(isa_pin(8), 8);
    }
}
