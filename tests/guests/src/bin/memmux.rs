//! `memmux`: checks that memory multiplexing is invisible to a guest, and that it happened.
//!
//! Fills `pages=N` pages (default 256) from 2 MiB up with five kinds of content, in turn: zero
//! pages; pages identical in every VM; pages identical in every VM but for 16 bytes that depend
//! on `seed=S` (similar: patch material); text that names the VM and the page (unique to this VM
//! but compressible); and pseudo-random bytes unique to this VM. With `mix=random` every page
//! is of the last kind: memory the engine cannot reclaim. With `delay=D` it first yields D
//! times (default 0), so that VMs given different delays fill their memory in turns. Then it
//! leaves them alone for
//! `wait=W` yields (default 40) while the hypervisor's memory engine scans, reads everything back
//! and compares a checksum with the one taken after filling, writes one byte in every page and
//! checks again. The EPT-violation counter of `vm_stats` shows whether the engine had taken
//! pages away (read faults: patched or compressed pages) and shared them (write faults: zero and
//! identical pages made read-only). Reports `memmux_read_faults`, `memmux_write_faults` and
//! `memmux_ok` (1 when both checksums matched), and exits with 0 only when both matched.
//!
//! The guest cannot tell *how* a page was kept; the scenario checks the engine's own counters
//! in the hypervisor's `[INFO] mem:` line for that.
#![cfg_attr(target_os = "none", no_std, no_main)]

use guest_abi::{guest, ExitKind};
use test_guests::pages::{expected, fill, region_checksum, Mix, PAGE};
use test_guests::println;
use test_guests::rt::{self, Boot, EXIT_USAGE};

test_guests::entry!(guest_main);

/// First byte of the region: above the image (linked at 1 MiB) and below the stack (at the top).
const REGION: u64 = 2 << 20;
/// Room left for the stack under the top of memory.
const STACK_ROOM: u64 = 256 << 10;

fn ept_exits() -> u64 {
    guest::vm_stats().map_or(0, |s| s.exits[ExitKind::EptViolation as usize])
}

fn guest_main(boot: &Boot) -> u64 {
    let (pages, seed, wait, delay) = match (
        boot.cmdline.u64_or("pages", 256),
        boot.cmdline.u64_or("seed", 1),
        boot.cmdline.u64_or("wait", 40),
        boot.cmdline.u64_or("delay", 0),
    ) {
        (Ok(p), Ok(s), Ok(w), Ok(d)) => (p, s, w, d),
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (.., Err(e)) => {
            return rt::usage_error(e)
        }
    };
    let Some(mix) = Mix::parse(boot.cmdline.get("mix").unwrap_or("guest")) else {
        return rt::usage_error("mix must be guest, random or linux");
    };
    let end = REGION + pages * PAGE as u64;
    if pages == 0 || seed > 9999 || end + STACK_ROOM > boot.memory_bytes() {
        println!(
            "memmux: pages={pages} seed={seed} do not fit (memory {:#x}, seed <= 9999)",
            boot.memory_bytes()
        );
        return EXIT_USAGE;
    }
    // SAFETY: REGION..end is this VM's own RAM (checked above against its size), identity-mapped
    // by the boot page tables, and used by nothing else: the image lies below 2 MiB and the
    // stack in the top STACK_ROOM bytes.
    let region =
        unsafe { core::slice::from_raw_parts_mut(REGION as *mut u8, (pages as usize) * PAGE) };
    for _ in 0..delay {
        guest::yield_now();
    }
    for (k, page) in region.chunks_exact_mut(PAGE).enumerate() {
        let page: &mut [u8; PAGE] = page.try_into().unwrap_or_else(|_| unreachable!());
        fill(page, k as u64, seed, false, mix);
    }
    let filled = region_checksum(region);
    println!(
        "memmux: {pages} pages filled (seed {seed}), checksum {filled:#x}; waiting {wait} yields"
    );
    for _ in 0..wait {
        guest::yield_now();
    }

    let before = ept_exits();
    let read_back = region_checksum(core::hint::black_box(&*region));
    let read_faults = ept_exits() - before;
    let read_ok = read_back == filled && filled == expected(pages, seed, false, mix);

    let before = ept_exits();
    for (k, page) in region.chunks_exact_mut(PAGE).enumerate() {
        let at = (k * 7) % PAGE;
        // Volatile: every page really is written, in order.
        // SAFETY: `at` is inside the page.
        unsafe {
            let p = page.as_mut_ptr().add(at);
            core::ptr::write_volatile(p, core::ptr::read_volatile(p) ^ 0x5a);
        }
    }
    let write_faults = ept_exits() - before;
    let written_ok = region_checksum(region) == expected(pages, seed, true, mix);

    println!(
        "memmux: read back {} ({read_faults} EPT faults), written {} ({write_faults} EPT faults)",
        if read_ok { "intact" } else { "CORRUPTED" },
        if written_ok { "intact" } else { "CORRUPTED" }
    );
    rt::report("memmux_read_faults", read_faults);
    rt::report("memmux_write_faults", write_faults);
    let ok = read_ok && written_ok;
    rt::report("memmux_ok", u64::from(ok));
    u64::from(!ok)
}
