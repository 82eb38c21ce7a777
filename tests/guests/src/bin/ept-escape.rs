//! `ept-escape`: writes outside its own memory. Its page tables map all of the first 4 GiB, so
//! the write gets as far as the EPT, where the hypervisor must stop the VM
//! (`stopped: EPT violation at gpa=... (write)`); its neighbours must not notice.
#![cfg_attr(target_os = "none", no_std, no_main)]

use test_guests::println;
use test_guests::rt::{Boot, EXIT_USAGE};

test_guests::entry!(guest_main);

/// How far past the end of memory to write: a whole MiB, so that the address is plainly outside
/// (not an off-by-one at the boundary) and easy to recognise in the log (4 MiB VM: 0x500000).
const PAST_END: u64 = 0x10_0000;
/// The boot page tables identity-map this much; beyond it a write would page-fault instead.
const MAPPED: u64 = 1 << 32;

fn guest_main(boot: &Boot) -> u64 {
    let target = boot.memory_bytes().saturating_add(PAST_END);
    if target.saturating_add(8) > MAPPED {
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
    // hypervisor must stop the VM on the EPT violation before the store completes.
    unsafe { core::ptr::write_volatile(target as *mut u64, 0x4553_4341_5045_4421) };
    println!("ESCAPED");
    1
}
