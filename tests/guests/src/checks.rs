//! `PASS name` / `FAIL name: why` lines and the tally behind a guest's exit code.

use core::fmt;

use crate::println;

/// Counts the checks of a guest and prints one line per check.
#[derive(Debug, Default)]
pub struct Checks {
    pub passed: u32,
    pub failed: u32,
}

impl Checks {
    pub const fn new() -> Self {
        Self {
            passed: 0,
            failed: 0,
        }
    }

    /// Prints `PASS name` when `ok`, else `FAIL name: why`; returns `ok`.
    pub fn check(&mut self, name: &str, ok: bool, why: fmt::Arguments<'_>) -> bool {
        if ok {
            self.passed += 1;
            println!("PASS {name}");
        } else {
            self.failed += 1;
            println!("FAIL {name}: {why}");
        }
        ok
    }

    /// A failure on its own (something that cannot be checked any further).
    pub fn fail(&mut self, name: &str, why: fmt::Arguments<'_>) {
        self.check(name, false, why);
    }

    /// Prints the summary and returns the exit code: 0 only when every check passed (and there
    /// was at least one).
    pub fn finish(&self, guest: &str) -> u64 {
        println!("{guest}: {} passed, {} failed", self.passed, self.failed);
        u64::from(self.failed != 0 || self.passed == 0)
    }
}
