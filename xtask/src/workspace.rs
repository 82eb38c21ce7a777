//! Where things live: the workspace root, cargo's target directory, the bare-metal build outputs
//! and the scratch directories of the xtask commands.
//!
//! The target directory follows cargo's own rule (`CARGO_TARGET_DIR`, else `<root>/target`), so
//! the kernel and guests that xtask builds are the ones it puts on the ISO, and a plain
//! `cargo xtask ...` from the repository builds into `target/x86_64-unknown-none/release/`.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Rust target of the kernel and the test guests.
pub const BARE_METAL_TARGET: &str = "x86_64-unknown-none";
/// Cargo package of the kernel; its binary has the same name.
pub const KERNEL_PACKAGE: &str = "hypervisor";
/// Cargo package whose binaries are the guest images.
pub const GUESTS_PACKAGE: &str = "test-guests";

/// Paths of one checkout.
#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
    target_dir: PathBuf,
}

impl Workspace {
    /// The workspace xtask was built from, with cargo's target directory for this process.
    pub fn locate() -> Self {
        // xtask/Cargo.toml sits one level below the workspace root.
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf();
        let cwd = env::current_dir().unwrap_or_else(|_| root.clone());
        let target_dir = target_dir_from(env::var_os("CARGO_TARGET_DIR"), &root, &cwd);
        Workspace { root, target_dir }
    }

    /// The workspace root (where `Cargo.toml` with `[workspace]` is).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Cargo's target directory.
    pub fn target_dir(&self) -> &Path {
        &self.target_dir
    }

    /// Where `cargo build --release --target x86_64-unknown-none` puts binaries.
    pub fn bare_metal_dir(&self) -> PathBuf {
        self.target_dir.join(BARE_METAL_TARGET).join("release")
    }

    /// The kernel ELF.
    pub fn kernel_elf(&self) -> PathBuf {
        self.bare_metal_dir().join(KERNEL_PACKAGE)
    }

    /// The ELF of the guest binary `name` (a `tests/guests/src/bin/<name>.rs`).
    pub fn guest_elf(&self, name: &str) -> PathBuf {
        self.bare_metal_dir().join(name)
    }

    /// A scratch directory of xtask under the target directory (not created).
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.target_dir.join("xtask").join(name)
    }

    /// Where `qemu-test` keeps the files of scenario `name` (its `serial.log` among them).
    pub fn scenario_run_dir(&self, name: &str) -> PathBuf {
        self.target_dir.join("qemu-test").join(name)
    }

    /// The directory of the integration scenarios.
    pub fn scenarios_dir(&self) -> PathBuf {
        self.root.join("tests").join("scenarios")
    }

    /// A `cargo` command running in the workspace root, with the cargo that runs xtask.
    pub fn cargo(&self) -> Command {
        let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
        let mut command = Command::new(cargo);
        command.current_dir(&self.root);
        command
    }
}

/// Cargo's rule for the target directory: `CARGO_TARGET_DIR` (relative to the current
/// directory), else `target` in the workspace root.
fn target_dir_from(env_value: Option<OsString>, root: &Path, cwd: &Path) -> PathBuf {
    match env_value.filter(|value| !value.is_empty()) {
        Some(value) => {
            let path = PathBuf::from(value);
            if path.is_absolute() {
                path
            } else {
                cwd.join(path)
            }
        }
        None => root.join("target"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_dir_defaults_to_root_target() {
        let dir = target_dir_from(None, Path::new("/repo"), Path::new("/repo/xtask"));
        assert_eq!(dir, Path::new("/repo/target"));
        let dir = target_dir_from(Some("".into()), Path::new("/repo"), Path::new("/x"));
        assert_eq!(dir, Path::new("/repo/target"));
    }

    #[test]
    fn target_dir_honours_cargo_target_dir() {
        let dir = target_dir_from(Some("/t/x".into()), Path::new("/repo"), Path::new("/cwd"));
        assert_eq!(dir, Path::new("/t/x"));
        let dir = target_dir_from(Some("out".into()), Path::new("/repo"), Path::new("/cwd"));
        assert_eq!(dir, Path::new("/cwd/out"));
    }

    #[test]
    fn artifact_paths() {
        let ws = Workspace {
            root: "/repo".into(),
            target_dir: "/repo/target".into(),
        };
        assert_eq!(
            ws.kernel_elf(),
            Path::new("/repo/target/x86_64-unknown-none/release/hypervisor")
        );
        assert_eq!(
            ws.guest_elf("hello"),
            Path::new("/repo/target/x86_64-unknown-none/release/hello")
        );
        assert_eq!(
            ws.scenario_run_dir("hello"),
            Path::new("/repo/target/qemu-test/hello")
        );
    }
}
