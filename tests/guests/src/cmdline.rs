//! The guest command line: space-separated words, each `key=value` or a bare `flag`.
//!
//! The hypervisor copies the manifest's `cmdline` string after the [`guest_abi::boot::BootInfo`]
//! (see [`crate::rt::Boot`]). Words are separated by ASCII whitespace; a word splits at its first
//! `=`. When a key appears more than once the last word wins, as on the Linux command line.
//! Numbers are decimal or `0x` hexadecimal, with optional `_` separators (`work=2_000_000`).

use core::fmt;

/// A parsed view of a command line; borrowing, never allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cmdline<'a> {
    text: &'a str,
}

/// Why a command-line value could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    /// `key` was given without `=value`.
    MissingValue { key: &'a str },
    /// The value of `key` is not a number (or does not fit in a `u64`).
    NotANumber { key: &'a str, value: &'a str },
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingValue { key } => write!(f, "command line: `{key}` needs a value"),
            Self::NotANumber { key, value } => {
                write!(f, "command line: `{key}={value}` is not a 64-bit number")
            }
        }
    }
}

impl<'a> Cmdline<'a> {
    /// Wraps a command line.
    pub const fn new(text: &'a str) -> Self {
        Self { text }
    }

    /// The whole command line as given.
    pub const fn as_str(&self) -> &'a str {
        self.text
    }

    /// The words in order, as `(key, value)`; `value` is `None` for a bare flag.
    pub fn words(&self) -> impl Iterator<Item = (&'a str, Option<&'a str>)> + 'a {
        self.text
            .split_ascii_whitespace()
            .map(|word| match word.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (word, None),
            })
    }

    /// Finds the last word with `key`: `Some(Some(value))`, `Some(None)` for a bare flag, `None`
    /// when the key is absent.
    pub fn lookup(&self, key: &str) -> Option<(&'a str, Option<&'a str>)> {
        self.words().filter(|(k, _)| *k == key).last()
    }

    /// The value of `key`, if it is given with one.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.lookup(key).and_then(|(_, value)| value)
    }

    /// Whether `key` appears at all (as a flag or with a value).
    pub fn has(&self, key: &str) -> bool {
        self.lookup(key).is_some()
    }

    /// The numeric value of `key`, `Ok(None)` when the key is absent.
    pub fn u64(&self, key: &str) -> Result<Option<u64>, CmdlineError<'a>> {
        match self.lookup(key) {
            None => Ok(None),
            Some((key, None)) => Err(CmdlineError::MissingValue { key }),
            Some((key, Some(value))) => parse_u64(value)
                .map(Some)
                .ok_or(CmdlineError::NotANumber { key, value }),
        }
    }

    /// The numeric value of `key`, or `default` when the key is absent.
    pub fn u64_or(&self, key: &str, default: u64) -> Result<u64, CmdlineError<'a>> {
        Ok(self.u64(key)?.unwrap_or(default))
    }
}

/// Parses a decimal or `0x`-prefixed hexadecimal number with optional `_` between digits.
/// Returns `None` for an empty string, a stray character or an overflow.
pub fn parse_u64(text: &str) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    if digits.is_empty() || digits.starts_with('_') || digits.ends_with('_') {
        return None;
    }
    let mut value: u64 = 0;
    for c in digits.chars() {
        if c == '_' {
            continue;
        }
        let digit = c.to_digit(radix)?;
        value = value.checked_mul(radix as u64)?.checked_add(digit as u64)?;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_u64("0"), Some(0));
        assert_eq!(parse_u64("2_000_000"), Some(2_000_000));
        assert_eq!(parse_u64("0x10_0000"), Some(0x10_0000));
        assert_eq!(parse_u64("0XfF"), Some(255));
        assert_eq!(parse_u64("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64("18446744073709551616"), None);
        assert_eq!(parse_u64("0x1_0000_0000_0000_0000"), None);
        for bad in [
            "", "_1", "1_", "0x", "0x_1", "12a", "-1", "+1", " 1", "1.0", "0b1",
        ] {
            assert_eq!(parse_u64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn words_and_lookup() {
        let c = Cmdline::new("  work=10 verbose n=0x20\twork=30 empty= ");
        let words: Vec<_> = c.words().collect();
        assert_eq!(
            words,
            [
                ("work", Some("10")),
                ("verbose", None),
                ("n", Some("0x20")),
                ("work", Some("30")),
                ("empty", Some("")),
            ]
        );
        assert_eq!(c.get("work"), Some("30"), "the last word wins");
        assert_eq!(c.get("verbose"), None);
        assert!(c.has("verbose"));
        assert!(!c.has("missing"));
        assert_eq!(c.u64("n"), Ok(Some(0x20)));
        assert_eq!(c.u64("missing"), Ok(None));
        assert_eq!(c.u64_or("missing", 7), Ok(7));
        assert_eq!(c.u64_or("work", 7), Ok(30));
        assert_eq!(
            c.u64("verbose"),
            Err(CmdlineError::MissingValue { key: "verbose" })
        );
        assert_eq!(
            c.u64("empty"),
            Err(CmdlineError::NotANumber {
                key: "empty",
                value: ""
            })
        );
    }

    #[test]
    fn value_may_contain_equals() {
        let c = Cmdline::new("a=b=c");
        assert_eq!(c.get("a"), Some("b=c"));
    }

    #[test]
    fn empty_command_line() {
        let c = Cmdline::new("");
        assert_eq!(c.words().count(), 0);
        assert_eq!(c.u64_or("work", 5), Ok(5));
    }

    #[test]
    fn error_messages_name_the_word() {
        let e = CmdlineError::NotANumber {
            key: "work",
            value: "lots",
        };
        assert_eq!(
            e.to_string(),
            "command line: `work=lots` is not a 64-bit number"
        );
    }
}
