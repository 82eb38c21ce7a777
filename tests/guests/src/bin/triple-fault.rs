//! `triple-fault`: brings the VM down the hard way. With an IDT of limit 0, `ud2` raises #UD,
//! whose delivery fails (#GP), whose delivery fails again (#DF), whose delivery fails: a triple
//! fault, which must stop this VM (`stopped: triple fault ...`) and nothing else.
#![cfg_attr(target_os = "none", no_std, no_main)]

use test_guests::rt::Boot;
use test_guests::{idt, println};

test_guests::entry!(guest_main);

fn guest_main(_boot: &Boot) -> u64 {
    println!("about to triple fault");
    idt::load_null();
    // SAFETY: deliberately undefined instruction; with no IDT the CPU cannot deliver the #UD and
    // shuts down, which under VMX is a triple-fault VM exit. Nothing here touches memory.
    unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    println!("SURVIVED");
    1
}
