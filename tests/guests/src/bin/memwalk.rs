//! `memwalk`: a guest that keeps using its memory, read byte by byte across many quanta; the
//! memory engine must not take away the pages it is using.
//!
//! Fills `pages=N` pages (default 8) just below its stack with text that names the VM
//! (`seed=S`) and the page (compressible, unique to the VM), then reads the whole region `passes=P`
//! times (default 3), one byte at a time with volatile loads, so a pass spans thousands of short
//! quanta. Each pass must give the checksum of the content written. The EPT-violation counter
//! of `vm_stats`, taken around the passes, counts the pages the engine took away (or made
//! read-only) and the guest touched again: pages the walker left behind may go cold and come
//! back once per pass, but its code, stack and the page it is reading must stay put. With
//! `max_ept=M` the guest fails when the passes took more than M EPT violations.
//!
//! Prints a line per pass, reports `memwalk_ept` (the EPT violations of all passes) and
//! `memwalk_ok` (1 when every checksum matched and the bound held) and exits with 0 only then.
#![cfg_attr(target_os = "none", no_std, no_main)]

use guest_abi::{guest, ExitKind};
use test_guests::println;
use test_guests::rt::{self, Boot, EXIT_USAGE};

test_guests::entry!(guest_main);

const PAGE: usize = 4096;
/// Room left for the stack under the top of memory.
const STACK_ROOM: u64 = 64 << 10;
/// The region must start above this: the image is linked at 1 MiB and is far smaller than this.
const IMAGE_ROOM_END: u64 = 0x18_0000;

/// The 32-byte line that fills page `k` of VM `seed`, repeated: compressible, and naming the VM
/// and the page, so that no two pages (and no two VMs) are alike.
fn line(seed: u64, k: u64) -> [u8; 32] {
    let mut line = *b"memwalk seed=0000 page=0000 ok. ";
    for (at, mut v) in [(13, seed), (23, k)] {
        for d in line[at..at + 4].iter_mut().rev() {
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    line
}

/// One step of the checksum: order-sensitive (a multiply-xor per byte).
fn mix(h: u64, byte: u8) -> u64 {
    (h ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
}

/// Reads the region byte by byte with volatile loads (every byte really is read, in order).
fn walk(region: &[u8]) -> u64 {
    region.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        // SAFETY: `b` is a reference into the region.
        mix(h, unsafe { core::ptr::read_volatile(b) })
    })
}

/// The checksum a pass must give, from the lines alone (no memory read).
fn expected(seed: u64, pages: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325;
    for k in 0..pages {
        let line = line(seed, k);
        for i in 0..PAGE {
            h = mix(h, line[i % 32]);
        }
    }
    h
}

fn ept_exits() -> u64 {
    guest::vm_stats().map_or(0, |s| s.exits[ExitKind::EptViolation as usize])
}

fn guest_main(boot: &Boot) -> u64 {
    let args = (
        boot.cmdline.u64_or("pages", 8),
        boot.cmdline.u64_or("passes", 3),
        boot.cmdline.u64_or("seed", 1),
        boot.cmdline.u64_or("max_ept", u64::MAX),
    );
    let (pages, passes, seed, max_ept) = match args {
        (Ok(p), Ok(n), Ok(s), Ok(m)) => (p, n, s, m),
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (.., Err(e)) => {
            return rt::usage_error(e)
        }
    };
    let end = boot.memory_bytes().saturating_sub(STACK_ROOM);
    let start = end.saturating_sub(pages.saturating_mul(PAGE as u64));
    if pages == 0 || pages > 9999 || seed > 9999 || start < IMAGE_ROOM_END {
        println!(
            "memwalk: pages={pages} seed={seed} do not fit (memory {:#x}, seed and pages <= 9999)",
            boot.memory_bytes()
        );
        return EXIT_USAGE;
    }
    // SAFETY: start..end is this VM's own RAM (checked above against its size), identity-mapped
    // by the boot page tables, and used by nothing else: the image lies below IMAGE_ROOM_END and
    // the stack in the top STACK_ROOM bytes.
    let region =
        unsafe { core::slice::from_raw_parts_mut(start as *mut u8, (end - start) as usize) };
    for (k, page) in region.chunks_exact_mut(PAGE).enumerate() {
        let line = line(seed, k as u64);
        for chunk in page.chunks_exact_mut(32) {
            chunk.copy_from_slice(&line);
        }
    }
    let want = expected(seed, pages);
    println!(
        "memwalk: {pages} pages filled (seed {seed}); reading them {passes} times, byte by byte"
    );
    let mut ok = true;
    let mut total = 0;
    for pass in 1..=passes {
        let before = ept_exits();
        let got = walk(core::hint::black_box(&*region));
        let faults = ept_exits() - before;
        total += faults;
        let intact = got == want;
        ok &= intact;
        println!(
            "memwalk: pass {pass} of {passes}: {} ({faults} EPT faults)",
            if intact { "intact" } else { "CORRUPTED" }
        );
    }
    if total > max_ept {
        println!("memwalk: TOO MANY EPT faults: {total} in {passes} passes, at most {max_ept}");
        ok = false;
    }
    rt::report("memwalk_ept", total);
    rt::report("memwalk_ok", u64::from(ok));
    u64::from(!ok)
}
