//! A small command-line parser for the xtask subcommands: `--flag VALUE`, `--flag=VALUE` and
//! positional arguments, with errors that name the offending argument.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Whether `args` ask for help (`-h` or `--help` anywhere): for commands with a parser of their
/// own, which then return [`Error::Help`] with their usage before doing anything.
pub fn help_requested(args: &[String]) -> bool {
    args.iter().any(|a| a == "-h" || a == "--help")
}

/// For a command that takes no arguments: `-h`/`--help` is a request for `usage` (printed on
/// standard output by `main`, success), anything else a usage error.
pub fn no_arguments(command: &str, usage: &str, args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        None => Ok(()),
        Some("-h" | "--help") => Err(Error::Help(usage.to_owned())),
        Some(arg) => Err(Error::Usage(format!(
            "{command} takes no arguments (got `{arg}`)\n{usage}"
        ))),
    }
}

/// Parsed arguments of one subcommand.
#[derive(Debug, Default)]
pub struct Args {
    values: BTreeMap<String, String>,
    positional: Vec<String>,
}

/// What a subcommand accepts.
pub struct Spec<'a> {
    /// The usage text, shown in errors.
    pub usage: &'a str,
    /// Flags that take a value (`-o` style short names included, e.g. `"-o"`).
    pub with_value: &'a [&'a str],
    /// Whether positional arguments are allowed.
    pub positional: bool,
}

impl Args {
    /// Parses `args` against `spec`.
    pub fn parse(args: &[String], spec: &Spec<'_>) -> Result<Self> {
        let usage = |message: String| Error::Usage(format!("{message}\nusage: {}", spec.usage));
        let mut parsed = Args::default();
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            if arg == "-h" || arg == "--help" {
                return Err(Error::Help(format!("usage: {}", spec.usage)));
            }
            if !arg.starts_with('-') || arg == "-" {
                if !spec.positional {
                    return Err(usage(format!("unexpected argument `{arg}`")));
                }
                parsed.positional.push(arg.clone());
                continue;
            }
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if arg.starts_with("--") => (flag, Some(value)),
                _ => (arg.as_str(), None),
            };
            if spec.with_value.contains(&flag) {
                let value = match inline {
                    Some(value) => value.to_owned(),
                    None => iter
                        .next()
                        .cloned()
                        .ok_or_else(|| usage(format!("`{flag}` needs a value")))?,
                };
                if parsed.values.insert(flag.to_owned(), value).is_some() {
                    return Err(usage(format!("`{flag}` given twice")));
                }
            } else {
                return Err(usage(format!("unknown option `{arg}`")));
            }
        }
        Ok(parsed)
    }

    /// The value of `flag`, if given.
    pub fn value(&self, flag: &str) -> Option<&str> {
        self.values.get(flag).map(String::as_str)
    }

    /// The positional arguments, in order.
    pub fn positional(&self) -> &[String] {
        &self.positional
    }
}

/// Parses a positive integer option value.
pub fn parse_positive(flag: &str, value: &str) -> Result<u64> {
    let cleaned = value.replace('_', "");
    match cleaned.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Error::Usage(format!(
            "`{flag}` needs a positive integer, got `{value}`"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: Spec<'static> = Spec {
        usage: "x [--n N] [-o OUT] [ARGS...]",
        with_value: &["--n", "-o"],
        positional: true,
    };

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn values_and_positional() {
        let args = Args::parse(&strings(&["a", "--n", "5", "-o", "x.iso", "b"]), &SPEC).unwrap();
        assert_eq!(args.value("--n"), Some("5"));
        assert_eq!(args.value("-o"), Some("x.iso"));
        assert_eq!(args.value("--m"), None);
        assert_eq!(args.positional(), ["a", "b"]);
    }

    #[test]
    fn asking_for_help_is_not_an_error_but_a_request_for_the_usage() {
        for args in [&["--help"][..], &["a", "-h"], &["--n", "5", "--help"]] {
            match Args::parse(&strings(args), &SPEC) {
                Err(Error::Help(text)) => assert_eq!(text, "usage: x [--n N] [-o OUT] [ARGS...]"),
                other => panic!("{args:?}: {other:?}"),
            }
        }
        assert!(matches!(
            no_arguments("build", "usage: build", &strings(&["--help"])),
            Err(Error::Help(u)) if u == "usage: build"
        ));
        assert!(matches!(
            no_arguments("build", "usage: build", &strings(&["x"])),
            Err(Error::Usage(_))
        ));
        assert!(no_arguments("build", "usage: build", &[]).is_ok());
        assert!(help_requested(&strings(&["--images", "d", "-h"])));
        assert!(!help_requested(&strings(&["--images", "d"])));
    }

    #[test]
    fn inline_values() {
        let args = Args::parse(&strings(&["--n=7"]), &SPEC).unwrap();
        assert_eq!(args.value("--n"), Some("7"));
    }

    #[test]
    fn errors_name_the_argument() {
        let err = Args::parse(&strings(&["--bogus"]), &SPEC)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--bogus") && err.contains("usage:"), "{err}");
        let err = Args::parse(&strings(&["--n"]), &SPEC)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a value"), "{err}");
        let err = Args::parse(&strings(&["--n", "1", "--n", "2"]), &SPEC).unwrap_err();
        assert!(err.to_string().contains("twice"));
        let err = Args::parse(&strings(&["-o=x"]), &SPEC).unwrap_err();
        assert!(err.to_string().contains("unknown option"));
        let no_positional = Spec {
            positional: false,
            ..SPEC
        };
        assert!(Args::parse(&strings(&["a"]), &no_positional).is_err());
    }

    #[test]
    fn positive_integers() {
        assert_eq!(parse_positive("--n", "100_000").unwrap(), 100_000);
        assert!(parse_positive("--n", "0").is_err());
        assert!(parse_positive("--n", "-3").is_err());
        assert!(parse_positive("--n", "ten").is_err());
    }
}
