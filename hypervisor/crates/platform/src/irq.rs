//! Interrupt lines between devices and the interrupt controllers.
//!
//! Lines are global system interrupts (GSIs) 0-23, numbered as IOAPIC pins; ISA IRQ n is GSI n,
//! except that the PIT's IRQ 0 reaches the IOAPIC on pin 2 (the override every PC firmware
//! reports, and which the platform applies when routing). A device only ever sets the level of
//! its line ([`IrqLines::set_level`]) or pulses it ([`IrqLines::pulse`], an edge for
//! edge-triggered inputs); it never calls a controller. The platform takes the changes
//! ([`IrqLines::take_changes`]) after each device access or timer step and feeds them to the
//! 8259 PICs and the IOAPIC, so devices and delivery stay separate.

/// Number of interrupt lines (IOAPIC pins).
pub const LINES: usize = 24;

/// The level of every line, and which lines changed (or were pulsed) since the platform last
/// looked.
#[derive(Clone, Debug, Default)]
pub struct IrqLines {
    level: u32,
    /// Lines whose level rose since the last [`Self::take_changes`]: a pulse counts as a rise
    /// even though the line is low again.
    rose: u32,
    fell: u32,
}

/// What happened to the lines since the platform last looked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LineChanges {
    /// Present level of every line (bit n = line n).
    pub level: u32,
    /// Lines that went high at least once (a rising edge; pulses included).
    pub rose: u32,
    /// Lines that went low at least once.
    pub fell: u32,
}

impl IrqLines {
    /// Sets line `line` to `high`. Lines outside 0-23 are ignored.
    pub fn set_level(&mut self, line: u8, high: bool) {
        let Some(bit) = Self::bit(line) else { return };
        let was = self.level & bit != 0;
        if high && !was {
            self.level |= bit;
            self.rose |= bit;
        } else if !high && was {
            self.level &= !bit;
            self.fell |= bit;
        }
    }

    /// Raises and lowers line `line` at once: an edge for an edge-triggered input, nothing for a
    /// level-triggered one that samples the level.
    pub fn pulse(&mut self, line: u8) {
        let Some(bit) = Self::bit(line) else { return };
        if self.level & bit == 0 {
            self.rose |= bit;
            self.fell |= bit;
        }
    }

    pub fn level(&self, line: u8) -> bool {
        Self::bit(line).is_some_and(|bit| self.level & bit != 0)
    }

    /// Whether any line changed since the last [`Self::take_changes`].
    pub fn changed(&self) -> bool {
        self.rose | self.fell != 0
    }

    /// The changes since the last call, which then start over.
    pub fn take_changes(&mut self) -> LineChanges {
        let c = LineChanges {
            level: self.level,
            rose: self.rose,
            fell: self.fell,
        };
        self.rose = 0;
        self.fell = 0;
        c
    }

    fn bit(line: u8) -> Option<u32> {
        (usize::from(line) < LINES).then(|| 1 << line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_edges_and_pulses() {
        let mut l = IrqLines::default();
        l.set_level(4, true);
        l.set_level(4, true);
        l.pulse(0);
        l.set_level(99, true); // ignored
        let c = l.take_changes();
        assert_eq!(c.level, 1 << 4);
        assert_eq!(c.rose, 1 << 4 | 1);
        assert_eq!(c.fell, 1);
        assert!(!l.changed());
        l.pulse(4); // already high: no new edge
        assert!(!l.changed());
        l.set_level(4, false);
        assert_eq!(l.take_changes().fell, 1 << 4);
    }
}
