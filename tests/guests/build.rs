//! Passes the guest linker script to the linker when building the guest images.
//!
//! Only for `target_os = "none"` (`x86_64-unknown-none`): on the host the binaries are stubs and
//! link the ordinary way, so that `cargo test -p test-guests` can run the runtime's unit tests.

use std::env;
use std::path::PathBuf;

fn main() {
    let dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let script = dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");

    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        // Static, non-PIE, linked at 1 MiB: the hypervisor loads PT_LOAD segments at their
        // physical addresses and never relocates (guest_abi::boot::IMAGE_MIN_GPA).
        println!("cargo:rustc-link-arg-bins=-T{}", script.display());
        println!("cargo:rustc-link-arg-bins=--no-pie");
        println!("cargo:rustc-link-arg-bins=-static");
    }
}
