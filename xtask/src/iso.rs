//! `cargo xtask iso`: a bootable ISO holding the hypervisor, the manifest and the guest images.
//!
//! The tree is staged as
//!
//! ```text
//! boot/hypervisor.elf          the kernel (Multiboot2), without debug information
//! boot/manifest.toml           GRUB module named `manifest`
//! boot/guests/<image>.elf      GRUB module named `<image>`, one per image (also stripped)
//! boot/grub/grub.cfg           rendered from boot/grub.cfg.in
//! ```
//!
//! and turned into an ISO by `grub-mkrescue`, which makes it hybrid (BIOS and UEFI) when GRUB's
//! x86_64-efi platform files (grub-efi-amd64-bin) are installed next to the i386-pc ones.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::build;
use crate::cli::{Args, Spec};
use crate::deps;
use crate::elf;
use crate::error::{Error, IoContext, Result};
use crate::linux;
use crate::process;
use crate::workspace::Workspace;

const USAGE: &str =
    "cargo xtask iso --manifest FILE --images a,b,... [--cmdline \"WORDS\"] -o OUT.iso";

/// Placeholder in boot/grub.cfg.in for the hypervisor's command line.
const CMDLINE_PLACEHOLDER: &str = "@KERNEL_CMDLINE@";
/// Placeholder in boot/grub.cfg.in for the guest `module2` lines.
const MODULES_PLACEHOLDER: &str = "@GUEST_MODULES@";

/// GRUB's platform directories: BIOS (needed, Bochs and QEMU boot it) and UEFI (optional).
const GRUB_BIOS_DIR: &str = "/usr/lib/grub/i386-pc";
const GRUB_EFI_DIR: &str = "/usr/lib/grub/x86_64-efi";

/// What goes on an ISO.
#[derive(Debug, Clone)]
pub struct IsoSpec {
    /// The kernel ELF.
    pub kernel: PathBuf,
    /// The boot manifest (TOML).
    pub manifest: PathBuf,
    /// Guest images: (module name, ELF path).
    pub images: Vec<(String, PathBuf)>,
    /// The hypervisor's command line (space-separated `key=value` words).
    pub cmdline: String,
}

impl IsoSpec {
    /// The spec for the built kernel and the built guest binaries named `images`.
    pub fn from_build(
        ws: &Workspace,
        manifest: &Path,
        images: &[String],
        cmdline: &str,
    ) -> Result<Self> {
        let mut resolved = Vec::with_capacity(images.len());
        for name in images {
            validate_image_name(name)?;
            // The Linux kernel and initramfs images are made on demand (crate::linux).
            let elf = if linux::is_linux_image(name) {
                linux::image(ws, name)?
            } else {
                ws.guest_elf(name)
            };
            if !elf.is_file() {
                return Err(Error::Failed(format!(
                    "iso: no guest binary `{name}` at {} (the guests are \
                     tests/guests/src/bin/<name>.rs)",
                    elf.display()
                )));
            }
            if resolved.iter().any(|(seen, _)| seen == name) {
                return Err(Error::Usage(format!("iso: image `{name}` listed twice")));
            }
            resolved.push((name.clone(), elf));
        }
        Ok(IsoSpec {
            kernel: ws.kernel_elf(),
            manifest: manifest.to_path_buf(),
            images: resolved,
            cmdline: cmdline.to_owned(),
        })
    }
}

/// `cargo xtask iso`.
pub fn run(ws: &Workspace, args: &[String]) -> Result<()> {
    let args = Args::parse(
        args,
        &Spec {
            usage: USAGE,
            with_value: &["--manifest", "--images", "--cmdline", "-o"],
            positional: false,
        },
    )?;
    let missing = |flag: &str| Error::Usage(format!("iso: `{flag}` is required\nusage: {USAGE}"));
    let manifest = PathBuf::from(
        args.value("--manifest")
            .ok_or_else(|| missing("--manifest"))?,
    );
    let images: Vec<String> = args
        .value("--images")
        .ok_or_else(|| missing("--images"))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let out = PathBuf::from(args.value("-o").ok_or_else(|| missing("-o"))?);
    let cmdline = args.value("--cmdline").unwrap_or("");
    if !manifest.is_file() {
        return Err(Error::config(&manifest, "no such file"));
    }
    validate_cmdline(cmdline)?;
    for image in &images {
        validate_image_name(image)?;
    }
    deps::ensure_packages()?;
    build::build_all(ws)?;
    let spec = IsoSpec::from_build(ws, &manifest, &images, cmdline)?;
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned());
    let staging = ws.scratch("iso").join(stem.as_deref().unwrap_or("image"));
    make_iso(ws, &spec, &staging, &out)?;
    println!("iso: {} ({})", out.display(), platforms());
    Ok(())
}

/// Which firmware the ISOs boot on, from the installed GRUB platforms.
pub fn platforms() -> &'static str {
    if Path::new(GRUB_EFI_DIR).is_dir() {
        "BIOS+UEFI"
    } else {
        "BIOS only"
    }
}

/// Stages `spec` in `staging` (emptied first) and writes the ISO to `out`.
pub fn make_iso(ws: &Workspace, spec: &IsoSpec, staging: &Path, out: &Path) -> Result<()> {
    validate_cmdline(&spec.cmdline)?;
    let template_path = ws.root().join("boot").join("grub.cfg.in");
    let template = fs::read_to_string(&template_path)
        .context(|| format!("reading {}", template_path.display()))?;
    let names: Vec<String> = spec.images.iter().map(|(name, _)| name.clone()).collect();
    let grub_cfg = render_grub_cfg(&template, &spec.cmdline, &names)
        .map_err(|message| Error::config(&template_path, message))?;

    if staging.exists() {
        fs::remove_dir_all(staging).context(|| format!("emptying {}", staging.display()))?;
    }
    let boot = staging.join("boot");
    for dir in [boot.join("grub"), boot.join("guests")] {
        fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
    }
    copy_elf(&spec.kernel, &boot.join("hypervisor.elf"))?;
    copy(&spec.manifest, &boot.join("manifest.toml"))?;
    for (name, elf) in &spec.images {
        copy_elf(elf, &boot.join("guests").join(format!("{name}.elf")))?;
    }
    let cfg_path = boot.join("grub").join("grub.cfg");
    fs::write(&cfg_path, grub_cfg).context(|| format!("writing {}", cfg_path.display()))?;

    mkrescue(staging, out)
}

/// Turns a staged tree (`boot/grub/grub.cfg` and what it loads) into a bootable ISO at `out`.
pub fn mkrescue(staging: &Path, out: &Path) -> Result<()> {
    if !Path::new(GRUB_BIOS_DIR).is_dir() {
        return Err(Error::Deps(format!(
            "iso: {GRUB_BIOS_DIR} is missing (package grub-pc-bin); run `cargo xtask deps`"
        )));
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
    }
    // Without locales, themes and fonts the image is less than half the size and builds faster;
    // the menu is never shown (timeout 0) and the kernel logs to the serial port.
    let mut mkrescue = Command::new("grub-mkrescue");
    mkrescue
        .args(["--locales=", "--themes=", "--fonts=", "-o"])
        .arg(out)
        .arg(staging);
    process::run_captured(&mut mkrescue)?;
    Ok(())
}

/// Copies an ELF64 without what no loader reads (see [`elf::boot_copy`]); any other file (a
/// 32-bit Multiboot kernel, a module's data) as it is: the hypervisor judges it.
fn copy_elf(from: &Path, to: &Path) -> Result<()> {
    let bytes = fs::read(from).context(|| format!("reading {}", from.display()))?;
    let copy = match elf::boot_copy(&bytes) {
        Ok(copy) => copy,
        Err(elf::ElfError::NotElf64) => bytes,
        Err(e) => return Err(Error::config(from, e.to_string())),
    };
    fs::write(to, copy).context(|| format!("writing {}", to.display()))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(drop)
        .context(|| format!("copying {} to {}", from.display(), to.display()))
}

/// Renders the GRUB template: the command line and one `module2` line per image.
pub fn render_grub_cfg(template: &str, cmdline: &str, images: &[String]) -> Result<String, String> {
    for placeholder in [CMDLINE_PLACEHOLDER, MODULES_PLACEHOLDER] {
        if !template.contains(placeholder) {
            return Err(format!("the template has no {placeholder}"));
        }
    }
    let modules: Vec<String> = images
        .iter()
        .map(|name| format!("    module2 /boot/guests/{name}.elf {name}"))
        .collect();
    // The kernel line keeps no trailing blank when the command line is empty.
    let mut rendered = template.replace(&format!(" {CMDLINE_PLACEHOLDER}"), &prefixed(cmdline));
    rendered = rendered.replace(CMDLINE_PLACEHOLDER, cmdline.trim());
    rendered = if modules.is_empty() {
        rendered.replace(&format!("{MODULES_PLACEHOLDER}\n"), "")
    } else {
        rendered.replace(MODULES_PLACEHOLDER, &modules.join("\n"))
    };
    if let Some(leftover) = find_placeholder(&rendered) {
        return Err(format!("unknown placeholder {leftover} in the template"));
    }
    Ok(rendered)
}

/// `" words"`, or nothing for an empty command line.
fn prefixed(cmdline: &str) -> String {
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    if words.is_empty() {
        String::new()
    } else {
        format!(" {}", words.join(" "))
    }
}

/// An `@NAME@` token (upper case, digits, `_`) left in `text`.
fn find_placeholder(text: &str) -> Option<&str> {
    let bytes = text.as_bytes();
    let mut start = None;
    for (i, &b) in bytes.iter().enumerate() {
        match (start, b) {
            (None, b'@') => start = Some(i),
            (Some(s), b'@') if i > s + 1 => return Some(&text[s..=i]),
            (Some(_), b'@') => start = Some(i),
            (Some(_), b) if b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' => {}
            (Some(_), _) => start = None,
            (None, _) => {}
        }
    }
    None
}

/// Image names become file names and GRUB module names: the manifest's rule for `image`
/// (`A-Z a-z 0-9 _ . -`), and not starting with a dot.
pub fn validate_image_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "invalid image name `{name}`: use A-Z a-z 0-9 _ . - (not starting with .)"
        )))
    }
}

/// The command line goes into grub.cfg unquoted, where GRUB's shell would interpret quotes, `$`,
/// `;`, braces and the like: allow only characters that are plain words there.
pub fn validate_cmdline(cmdline: &str) -> Result<()> {
    match cmdline
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || " _-.,=:/+%@".contains(c)))
    {
        None => Ok(()),
        Some(bad) => Err(Error::Usage(format!(
            "hypervisor command line `{cmdline}`: character {bad:?} is not allowed \
             (use A-Z a-z 0-9 space _ - . , = : / + % @)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = "set timeout=0\nmenuentry \"x\" {\n    multiboot2 /boot/hypervisor.elf \
                            @KERNEL_CMDLINE@\n    module2 /boot/manifest.toml manifest\n\
                            @GUEST_MODULES@\n    boot\n}\n";

    #[test]
    fn renders_kernel_line_and_modules() {
        let cfg = render_grub_cfg(
            TEMPLATE,
            "exit=emulator  log=info",
            &["hello".into(), "busy".into()],
        )
        .unwrap();
        assert_eq!(
            cfg,
            "set timeout=0\nmenuentry \"x\" {\n    multiboot2 /boot/hypervisor.elf exit=emulator \
             log=info\n    module2 /boot/manifest.toml manifest\n    module2 \
             /boot/guests/hello.elf hello\n    module2 /boot/guests/busy.elf busy\n    boot\n}\n"
        );
    }

    #[test]
    fn empty_cmdline_and_no_images() {
        let cfg = render_grub_cfg(TEMPLATE, "", &[]).unwrap();
        assert!(cfg.contains("multiboot2 /boot/hypervisor.elf\n"), "{cfg}");
        assert!(cfg.contains("manifest\n    boot\n"), "{cfg}");
    }

    #[test]
    fn template_errors() {
        assert!(render_grub_cfg("multiboot2 x\n", "", &[])
            .unwrap_err()
            .contains("no @KERNEL"));
        let typo = format!("{TEMPLATE}@KERNEL_CMDLIN@\n");
        let err = render_grub_cfg(&typo, "", &[]).unwrap_err();
        assert!(err.contains("@KERNEL_CMDLIN@"), "{err}");
    }

    #[test]
    fn the_real_template_renders() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../boot/grub.cfg.in");
        let template = fs::read_to_string(path).unwrap();
        let cfg = render_grub_cfg(&template, "exit=emulator log=info", &["hello".into()]).unwrap();
        assert!(cfg.contains("set timeout=0"));
        assert!(cfg.contains("    multiboot2 /boot/hypervisor.elf exit=emulator log=info\n"));
        assert!(cfg.contains("    module2 /boot/manifest.toml manifest\n"));
        assert!(cfg.contains("    module2 /boot/guests/hello.elf hello\n"));
        // GRUB must not write to the serial port, which carries the hypervisor's log.
        let commands: Vec<&str> = cfg
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .collect();
        assert!(!commands
            .iter()
            .any(|l| l.starts_with("terminal_output") || l.starts_with("serial")));
    }

    #[test]
    fn finds_leftover_placeholders_only() {
        assert_eq!(find_placeholder("a @X_1@ b"), Some("@X_1@"));
        assert_eq!(find_placeholder("mail me@host.org or @@"), None);
        assert_eq!(find_placeholder("a@b@"), None);
    }

    #[test]
    fn image_names() {
        for good in ["hello", "exit-bench", "a_b.c"] {
            assert!(validate_image_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "a b", "x;y"] {
            assert!(validate_image_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cmdlines() {
        assert!(validate_cmdline("exit=emulator log=debug").is_ok());
        assert!(validate_cmdline("").is_ok());
        for bad in ["a;b", "x=$y", "q=\"1\"", "{", "a\\b", "t\tab"] {
            assert!(validate_cmdline(bad).is_err(), "{bad}");
        }
    }
}
