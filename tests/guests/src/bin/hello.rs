//! `hello`: the smallest useful guest. One line through the emulated UART (every byte a port-I/O
//! exit), one through the console hypercall, a report, exit 0. The hello scenario runs two VMs of
//! this image and checks that both lines of both arrive with the right `NAME | ` prefix.
#![cfg_attr(target_os = "none", no_std, no_main)]

use test_guests::rt::{self, Boot};
use test_guests::{println, serial_println};

test_guests::entry!(guest_main);

fn guest_main(_boot: &Boot) -> u64 {
    serial_println!("Hello from the serial port");
    println!("Hello from the console hypercall");
    rt::report("hello", 1);
    0
}
