//! `ept-escape`: reaches outside its own memory. Its page tables map all of the first 4 GiB, so
//! each access gets as far as the EPT. Where the VM has neither memory nor a device the
//! hypervisor must behave as a PC's open bus: the write goes nowhere and reads return all ones
//! (`[WARN] vm NAME: write at gpa=...: no memory or device there`). Jumping there stops the VM
//! (`stopped: EPT violation at gpa=... (fetch)`). Its neighbours must not notice any of it.
#![cfg_attr(target_os = "none", no_std, no_main)]

use test_guests::println;
use test_guests::rt::{Boot, EXIT_USAGE};

test_guests::entry!(guest_main);

/// How far past the end of memory to write: a whole MiB, so that the address is plainly outside
/// (not an off-by-one at the boundary) and easy to recognise in the log (4 MiB VM: 0x500000).
const PAST_END: u64 = 0x10_0000;
/// The boot page tables identity-map this much; beyond it an access would page-fault instead.
const MAPPED: u64 = 1 << 32;
const MARK: u64 = 0x4553_4341_5045_4421;

fn guest_main(boot: &Boot) -> u64 {
    let target = boot.memory_bytes().saturating_add(PAST_END);
    if target.saturating_add(0x1000) > MAPPED {
        println!(
            "memory ends at {:#x}: {target:#x} is not identity-mapped",
            boot.memory_bytes()
        );
        return EXIT_USAGE;
    }
    println!(
        "writing to gpa={target:#x}, {PAST_END:#x} bytes past the end of memory at {:#x}",
        boot.memory_bytes()
    );
    // SAFETY: not safe at all, on purpose: the address is outside this VM's memory. The
    // hypervisor must drop the store (no memory or device is there).
    unsafe { core::ptr::write_volatile(target as *mut u64, MARK) };
    // SAFETY: as above: reads there must return all ones.
    let (back, beside) = unsafe {
        (
            core::ptr::read_volatile(target as *const u64),
            core::ptr::read_volatile((target + 0x800) as *const u32),
        )
    };
    println!("read back {back:#x}, and {beside:#x} beside it");
    if back == MARK {
        println!("ESCAPED: the write landed somewhere");
        return 1;
    }
    if back != u64::MAX || beside != u32::MAX {
        println!("FAILED: open bus reads all ones");
        return 1;
    }
    println!("jumping to gpa={target:#x}");
    // SAFETY: on purpose again: the hypervisor must stop the VM at the instruction fetch.
    let f: extern "C" fn() = unsafe { core::mem::transmute(target as usize) };
    f();
    println!("ESCAPED: executed outside memory");
    1
}
