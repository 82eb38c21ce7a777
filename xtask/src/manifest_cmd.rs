//! `cargo xtask manifest check FILE [--images DIR] [--memory-mib N]`: runs the hypervisor's own
//! manifest parser ([`hv_manifest`]) on the host, so a bad manifest is caught before it is baked
//! into an ISO.
//!
//! The checks are exactly the boot-time ones; the two that depend on the machine are done only
//! when the host side is described: `--images DIR` stands for the boot modules (image `x` exists
//! if `DIR/x` or `DIR/x.elf` is a file), `--memory-mib N` for the memory the hypervisor can give
//! to guests. The output says which checks were skipped.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use hv_manifest::{HostLimits, MEMORY_MIB_MAX};

const USAGE: &str = "usage: cargo xtask manifest check FILE [--images DIR] [--memory-mib N]";

/// Entry point; `args` are the arguments after `manifest check`.
///
/// Prints one line per valid VM and one per error on stdout, and returns `Err` (for a non-zero
/// exit) if the manifest has any error, fatal or not, or the arguments are wrong.
pub fn check(args: &[String]) -> crate::error::Result<()> {
    if crate::cli::help_requested(args) {
        return Err(crate::error::Error::Help(USAGE.to_owned()));
    }
    let options = Options::parse(args).map_err(crate::error::Error::Failed)?;
    let stdout = io::stdout();
    run(&options, &mut stdout.lock()).map_err(crate::error::Error::Failed)
}

#[derive(Debug, PartialEq)]
struct Options {
    file: PathBuf,
    images: Option<PathBuf>,
    memory_mib: Option<u64>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut file = None;
        let mut images = None;
        let mut memory_mib = None;
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            // Both `--flag VALUE` and `--flag=VALUE`.
            let (flag, inline_value) = match arg.split_once('=') {
                Some((flag, value)) if arg.starts_with("--") => (flag, Some(value.to_owned())),
                _ => (arg.as_str(), None),
            };
            let mut value = || {
                inline_value
                    .clone()
                    .or_else(|| args.next().cloned())
                    .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
            };
            match flag {
                "--images" => images = Some(PathBuf::from(value()?)),
                "--memory-mib" => {
                    let v = value()?;
                    let mib = v
                        .parse::<u64>()
                        .ok()
                        .filter(|&mib| mib <= MEMORY_MIB_MAX)
                        .ok_or_else(|| format!("--memory-mib: {v:?} is not a size in MiB"))?;
                    memory_mib = Some(mib);
                }
                _ if flag.starts_with('-') => {
                    return Err(format!("unknown option {flag:?}\n{USAGE}"));
                }
                _ if file.is_some() => {
                    return Err(format!("more than one FILE given ({arg:?})\n{USAGE}"));
                }
                _ => file = Some(PathBuf::from(arg)),
            }
        }
        let file = file.ok_or_else(|| format!("no manifest FILE given\n{USAGE}"))?;
        Ok(Self {
            file,
            images,
            memory_mib,
        })
    }
}

/// Image names that `dir` provides: each regular file `x` provides `x`, and `x.elf` also `x`.
fn image_names(dir: &Path) -> Result<Vec<String>, String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("--images {}: {e}", dir.display()))?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("--images {}: {e}", dir.display()))?;
        // `metadata` follows symlinks: a link to an ELF counts as the ELF.
        if !fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let Ok(name) = entry.file_name().into_string() else {
            continue; // not UTF-8: cannot match any manifest string
        };
        if let Some(stem) = name.strip_suffix(".elf") {
            names.push(stem.to_owned());
        }
        names.push(name);
    }
    names.sort();
    names.dedup();
    Ok(names)
}

fn run(options: &Options, out: &mut dyn Write) -> Result<(), String> {
    let file = options.file.display();
    let text = fs::read(&options.file).map_err(|e| format!("{file}: {e}"))?;
    let images = options.images.as_deref().map(image_names).transpose()?;
    let image_refs: Option<Vec<&str>> = images
        .as_ref()
        .map(|v| v.iter().map(String::as_str).collect());
    let host = HostLimits {
        images: image_refs.as_deref(),
        memory_bytes: options.memory_mib.map(|mib| mib << 20),
    };

    let io_err = |e: io::Error| format!("writing output: {e}");
    match &options.images {
        Some(dir) => writeln!(out, "images: checked against files in {}", dir.display()),
        None => writeln!(out, "images: not checked (no --images DIR)"),
    }
    .map_err(io_err)?;
    match options.memory_mib {
        Some(mib) => writeln!(out, "memory: checked against a host of {mib} MiB"),
        None => writeln!(
            out,
            "memory: not checked against the host (no --memory-mib N)"
        ),
    }
    .map_err(io_err)?;

    let manifest = match hv_manifest::parse_bytes(&text, &host) {
        Ok(m) => m,
        Err(fatal) => {
            writeln!(out, "error: {fatal}").map_err(io_err)?;
            return Err(format!("{file}: no VM can run"));
        }
    };
    for vm in &manifest.vms {
        write!(out, "ok: vm \"{}\"", vm.name).map_err(io_err)?;
        if let Some(line) = vm.line {
            write!(out, " (line {line})").map_err(io_err)?;
        }
        writeln!(
            out,
            ": memory_mib={} image={} quantum_us={} vcpus={} sharing_domain={} \
             time_dilation={} cpu_share={} cmdline={:?}",
            vm.memory_mib,
            vm.image,
            vm.quantum_us,
            vm.vcpus,
            vm.sharing_domain,
            vm.time_dilation_text(),
            vm.cpu_share,
            vm.cmdline
        )
        .map_err(io_err)?;
    }
    let memory = &manifest.memory;
    if memory.multiplex {
        writeln!(
            out,
            "memory multiplexing: on, scan_pages={} scan_interval_us={} cold_after_us={}",
            memory.scan_pages, memory.scan_interval_us, memory.cold_after_us
        )
    } else {
        writeln!(out, "memory multiplexing: off")
    }
    .map_err(io_err)?;
    for error in &manifest.errors {
        writeln!(out, "error: {error}").map_err(io_err)?;
    }
    let (vms, errors) = (manifest.vms.len(), manifest.errors.len());
    writeln!(out, "{file}: {vms} valid VM(s), {errors} error(s)").map_err(io_err)?;
    if errors == 0 {
        Ok(())
    } else {
        Err(format!("{file}: {errors} error(s)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("xtask-manifest-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn run_on(options: &Options) -> (Result<(), String>, String) {
        let mut out = Vec::new();
        let result = run(options, &mut out);
        (result, String::from_utf8(out).unwrap())
    }

    #[test]
    fn parses_arguments() {
        assert_eq!(
            Options::parse(&args(&["m.toml", "--images", "d", "--memory-mib=64"])),
            Ok(Options {
                file: "m.toml".into(),
                images: Some("d".into()),
                memory_mib: Some(64),
            })
        );
        assert!(Options::parse(&args(&[]))
            .unwrap_err()
            .contains("no manifest FILE"));
        assert!(Options::parse(&args(&["a", "b"]))
            .unwrap_err()
            .contains("more than one"));
        assert!(Options::parse(&args(&["a", "--images"]))
            .unwrap_err()
            .contains("needs a value"));
        assert!(Options::parse(&args(&["a", "--memory-mib", "x"])).is_err());
        assert!(Options::parse(&args(&["a", "--bogus"]))
            .unwrap_err()
            .contains("unknown option"));
    }

    #[test]
    fn demo_example_passes_with_and_without_images() {
        let tmp = TempDir::new("demo");
        let file = tmp.0.join("demo.toml");
        fs::write(&file, include_str!("../../examples/demo.toml")).unwrap();
        let images = tmp.0.join("images");
        fs::create_dir(&images).unwrap();
        fs::write(images.join("hello"), b"\x7fELF").unwrap();

        let (result, out) = run_on(&Options {
            file: file.clone(),
            images: None,
            memory_mib: None,
        });
        assert_eq!(result, Ok(()), "{out}");
        assert!(
            out.contains("images: not checked (no --images DIR)"),
            "{out}"
        );
        assert!(out.contains("ok: vm \"hello-a\""), "{out}");
        assert!(out.contains("ok: vm \"hello-b\""), "{out}");
        assert!(out.contains("2 valid VM(s), 0 error(s)"), "{out}");

        let (result, out) = run_on(&Options {
            file,
            images: Some(images),
            memory_mib: Some(64),
        });
        assert_eq!(result, Ok(()), "{out}");
        assert!(out.contains("images: checked against files in"), "{out}");
    }

    #[test]
    fn reports_each_error_and_fails() {
        let tmp = TempDir::new("errors");
        let file = tmp.0.join("m.toml");
        fs::write(
            &file,
            "[[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"hello\"\ncmdline = \"q\"\n\n\
             [[vm]]\nname = \"b\"\nmemory_mib = 128\nimage = \"missing\"\n",
        )
        .unwrap();
        let images = tmp.0.join("images");
        fs::create_dir(&images).unwrap();
        fs::write(images.join("hello.elf"), b"").unwrap();
        fs::create_dir(images.join("missing")).unwrap(); // a directory is not an image

        let (result, out) = run_on(&Options {
            file,
            images: Some(images),
            memory_mib: Some(64),
        });
        assert!(result.unwrap_err().ends_with(": 2 error(s)"));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[2..6],
            [
                "ok: vm \"a\" (line 1): memory_mib=4 image=hello quantum_us=10000 vcpus=1 \
                 sharing_domain=0 time_dilation=1 cpu_share=1 cmdline=\"q\"",
                "memory multiplexing: off",
                "error: vm \"b\" (line 9): key \"memory_mib\": 128 MiB is more than the host's \
                 64 MiB",
                "error: vm \"b\" (line 10): key \"image\": no image named \"missing\" is \
                 available",
            ],
            "{out}"
        );
    }

    #[test]
    fn fatal_errors_fail() {
        let tmp = TempDir::new("fatal");
        let file = tmp.0.join("m.toml");
        fs::write(&file, "[[vm]\n").unwrap();
        let (result, out) = run_on(&Options {
            file: file.clone(),
            images: None,
            memory_mib: None,
        });
        assert!(result.unwrap_err().ends_with(": no VM can run"));
        assert!(out.contains("error: line 1, column "), "{out}");

        let missing = tmp.0.join("nope.toml");
        let (result, _) = run_on(&Options {
            file: missing,
            images: None,
            memory_mib: None,
        });
        assert!(result.is_err());
    }
}
