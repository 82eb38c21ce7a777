//! The Linux guest images that manifests name beside the test guests: Debian's cloud kernel and
//! busybox initramfs images, made on demand and cached under the target directory.
//!
//! - `vmlinuz`: the bzImage of Debian's `linux-image-cloud-amd64` (the versioned package the
//!   metapackage depends on), fetched with `apt-get download` and unpacked with `dpkg-deb -x`
//!   into `target/linux/`: nothing is installed into the host's /boot. `MUXVISOR_LINUX_KERNEL`
//!   names another bzImage to use instead.
//! - `initramfs-NAME`: a `newc` cpio archive with a static busybox (Debian's `busybox-static`)
//!   and `tests/linux/NAME.sh` as its `/init`, rebuilt whenever the script changes.
//!
//! Nothing large is committed: a fresh clone fetches the kernel once (about 10 MB).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::corpus;
use crate::error::{Error, IoContext, Result};
use crate::workspace::Workspace;

/// The module name of the Debian cloud kernel in manifests.
pub const KERNEL_IMAGE: &str = "vmlinuz";
/// The prefix of the initramfs images' module names: `initramfs-NAME` has `tests/linux/NAME.sh`
/// as its `/init`.
pub const INITRAMFS_PREFIX: &str = "initramfs-";
/// The Debian metapackage whose dependency is the kernel package.
const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
/// A bzImage to use instead of Debian's.
const KERNEL_ENV: &str = "MUXVISOR_LINUX_KERNEL";

/// Whether `name` is one of the Linux images this module makes.
pub fn is_linux_image(name: &str) -> bool {
    name == KERNEL_IMAGE || name.starts_with(INITRAMFS_PREFIX)
}

/// The file for the Linux image `name` (see the module doc), made if needed.
pub fn image(ws: &Workspace, name: &str) -> Result<PathBuf> {
    if name == KERNEL_IMAGE {
        return kernel(ws);
    }
    match name.strip_prefix(INITRAMFS_PREFIX) {
        Some(script) => initramfs(ws, script),
        None => Err(Error::Failed(format!(
            "linux: `{name}` is not a Linux image"
        ))),
    }
}

fn cache_dir(ws: &Workspace) -> PathBuf {
    ws.target_dir().join("linux")
}

/// The kernel: `$MUXVISOR_LINUX_KERNEL`, else Debian's cloud kernel from the cache, fetched the
/// first time.
pub fn kernel(ws: &Workspace) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(KERNEL_ENV) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(Error::Failed(format!(
                "linux: {KERNEL_ENV}={} is not a file",
                path.display()
            )));
        }
        return Ok(path);
    }
    let dir = cache_dir(ws);
    let cached = dir.join(KERNEL_IMAGE);
    if cached.is_file() {
        return Ok(cached);
    }
    fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
    let package = kernel_package()?;
    eprintln!(
        "linux: fetching {package} (apt-get download) into {}",
        dir.display()
    );
    let download = dir.join("download");
    if download.exists() {
        fs::remove_dir_all(&download).context(|| format!("emptying {}", download.display()))?;
    }
    fs::create_dir_all(&download).context(|| format!("creating {}", download.display()))?;
    let fetched = || {
        Command::new("apt-get")
            // As root, apt's download sandbox user cannot write into the cache: do without.
            .args(["-o", "APT::Sandbox::User=root", "download", &package])
            .current_dir(&download)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    // Once more after refreshing the package lists, which a fresh machine may lack.
    let ok = fetched() || (corpus::apt_update() && fetched());
    if !ok {
        return Err(Error::Deps(format!(
            "linux: `apt-get download {package}` failed (needs Debian's package lists); or set \
             {KERNEL_ENV} to a bzImage"
        )));
    }
    let deb = find_file(&download, |name| name.ends_with(".deb"))?
        .ok_or_else(|| Error::Failed(format!("linux: no .deb in {}", download.display())))?;
    let unpacked = download.join("root");
    let ok = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&unpacked)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err(Error::Deps(format!(
            "linux: dpkg-deb -x {} failed",
            deb.display()
        )));
    }
    let boot = unpacked.join("boot");
    let vmlinuz = find_file(&boot, |name| name.starts_with("vmlinuz-"))?
        .ok_or_else(|| Error::Failed(format!("linux: {package} has no boot/vmlinuz-*")))?;
    // Copied, then renamed: an interrupted fetch never leaves a truncated kernel in the cache.
    let partial = dir.join("vmlinuz.partial");
    fs::copy(&vmlinuz, &partial).context(|| format!("copying {}", vmlinuz.display()))?;
    let version = format!("{package} ({})\n", file_name(&vmlinuz));
    fs::write(dir.join("vmlinuz.version"), version).context(|| "writing vmlinuz.version".into())?;
    fs::rename(&partial, &cached).context(|| format!("writing {}", cached.display()))?;
    let _ = fs::remove_dir_all(&download);
    eprintln!(
        "linux: kernel {} cached at {}",
        file_name(&vmlinuz),
        cached.display()
    );
    Ok(cached)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The first entry of `dir` whose file name satisfies `wanted`.
fn find_file(dir: &Path, wanted: impl Fn(&str) -> bool) -> Result<Option<PathBuf>> {
    Ok(fs::read_dir(dir)
        .context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&wanted)))
}

/// The versioned kernel package the metapackage depends on (`linux-image-6.1.0-N-cloud-amd64`).
fn kernel_package() -> Result<String> {
    let depends = || -> Option<String> {
        let out = Command::new("apt-cache")
            .args(["depends", KERNEL_METAPACKAGE])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        parse_depends(&String::from_utf8_lossy(&out.stdout))
    };
    depends()
        .or_else(|| corpus::apt_update().then(depends).flatten())
        .ok_or_else(|| {
            Error::Deps(format!(
                "linux: apt-cache knows no {KERNEL_METAPACKAGE} (needs Debian's package lists); \
                 or set {KERNEL_ENV} to a bzImage"
            ))
        })
}

/// The first `Depends: linux-image-...` of `apt-cache depends` output.
fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.contains(['<', ' ']))
        .map(str::to_owned)
}

/// The initramfs with `tests/linux/NAME.sh` as `/init`, in the cache; rebuilt when the script
/// differs from the one it was built from.
pub fn initramfs(ws: &Workspace, name: &str) -> Result<PathBuf> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(Error::Usage(format!(
            "linux: `{INITRAMFS_PREFIX}{name}`: the name after the prefix must be letters, digits \
             and `-`"
        )));
    }
    let script_path = ws
        .root()
        .join("tests")
        .join("linux")
        .join(format!("{name}.sh"));
    let script = fs::read(&script_path).map_err(|e| {
        Error::Failed(format!(
            "linux: image `{INITRAMFS_PREFIX}{name}` needs {}: {e}",
            script_path.display()
        ))
    })?;
    let dir = cache_dir(ws);
    fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
    let out = dir.join(format!("{INITRAMFS_PREFIX}{name}.cpio"));
    let stamp = dir.join(format!("{INITRAMFS_PREFIX}{name}.init"));
    if out.is_file() && fs::read(&stamp).is_ok_and(|s| s == script) {
        return Ok(out);
    }
    let busybox = corpus::ensure_busybox().map_err(|e| Error::Deps(format!("linux: {e}")))?;
    let busybox = fs::read(&busybox).context(|| format!("reading {}", busybox.display()))?;
    let cpio = corpus::build_initramfs(&busybox, &script);
    fs::write(&out, cpio).context(|| format!("writing {}", out.display()))?;
    fs::write(&stamp, &script).context(|| format!("writing {}", stamp.display()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_versioned_package_is_found_in_apt_cache_output() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-57-cloud-amd64\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64")
        );
        // A virtual package (`<...>`) or nothing: none.
        assert_eq!(parse_depends("x\n  Depends: <linux-image-x>\n"), None);
        assert_eq!(parse_depends(""), None);
    }

    #[test]
    fn linux_image_names() {
        assert!(is_linux_image("vmlinuz"));
        assert!(is_linux_image("initramfs-boot"));
        assert!(!is_linux_image("hello"));
        let ws = Workspace::locate();
        for bad in ["", "../x", "a b", "a/b"] {
            assert!(
                matches!(initramfs(&ws, bad), Err(Error::Usage(_))),
                "{bad:?}"
            );
        }
    }
}
