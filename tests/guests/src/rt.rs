//! Entry, boot information, exit and panics: the life cycle of a guest.
//!
//! The hypervisor enters `_start` (emitted by [`entry!`](crate::entry) in the binary) in 64-bit
//! mode on an identity map, with `RSP` at the top of the VM's memory and `RDI` pointing at the
//! [`BootInfo`] (guest_abi::boot). `_start` leaves the highest [`RESERVED_TOP`] bytes of memory
//! alone, aligns the stack and calls [`start`], which validates the boot information, hands a
//! [`Boot`] to the guest's main function and turns its return value into the exit hypercall.

use guest_abi::boot::{BootInfo, BOOT_INFO_MAGIC, CMDLINE_MAX};
use guest_abi::guest;

use crate::cmdline::Cmdline;
use crate::println;

/// Exit code after a panic (as Rust's test harness uses).
pub const EXIT_PANIC: u64 = 101;
/// Exit code after an exception nobody expected (see [`crate::idt`]).
pub const EXIT_EXCEPTION: u64 = 102;
/// Exit code when the boot information is not what guest_abi::boot promises.
pub const EXIT_BAD_BOOT: u64 = 103;
/// Exit code for a command line the guest cannot use.
pub const EXIT_USAGE: u64 = 2;

/// Bytes at the top of memory that `_start` keeps out of the stack. The stack starts below them,
/// so that a guest can probe the very end of its memory (the `hostile` guest checks that a
/// hypercall that straddles the end writes nothing) without destroying its own frames.
pub const RESERVED_TOP: u64 = 4096;

/// What a guest knows about itself at start.
#[derive(Clone, Copy, Debug)]
pub struct Boot {
    /// The boot information as the hypervisor wrote it.
    pub info: BootInfo,
    /// The command line from the manifest.
    pub cmdline: Cmdline<'static>,
}

impl Boot {
    /// Size of the VM's memory: guest-physical `0..memory_bytes()` is RAM.
    pub fn memory_bytes(&self) -> u64 {
        self.info.memory_bytes
    }

    /// Guest-physical address of the [`RESERVED_TOP`] bytes at the end of memory.
    pub fn reserved_top(&self) -> u64 {
        self.info.memory_bytes - RESERVED_TOP
    }
}

/// Why the boot information was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BootError {
    BadMagic(u64),
    CmdlineOutsideMemory { gpa: u64, len: u64 },
    CmdlineTooLong(u64),
    CmdlineNotUtf8,
    MemoryTooSmall(u64),
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Self::BadMagic(m) => write!(f, "BootInfo magic is {m:#x}, want {BOOT_INFO_MAGIC:#x}"),
            Self::CmdlineOutsideMemory { gpa, len } => {
                write!(f, "command line at {gpa:#x} (+{len}) is outside memory")
            }
            Self::CmdlineTooLong(len) => {
                write!(f, "command line of {len} bytes is over {CMDLINE_MAX}")
            }
            Self::CmdlineNotUtf8 => f.write_str("command line is not UTF-8"),
            Self::MemoryTooSmall(bytes) => write!(f, "memory_bytes = {bytes:#x} is too small"),
        }
    }
}

/// Reads and checks the boot information at `gpa`.
///
/// # Safety
/// `gpa` must be the address the hypervisor passed in `RDI` under the boot protocol.
unsafe fn read_boot_info(gpa: u64) -> Result<Boot, BootError> {
    // SAFETY: the boot protocol puts a BootInfo at `gpa`, identity mapped; volatile because the
    // compiler cannot know that anybody wrote it.
    let info = unsafe { core::ptr::read_volatile(gpa as *const BootInfo) };
    if info.magic != BOOT_INFO_MAGIC {
        return Err(BootError::BadMagic(info.magic));
    }
    if info.memory_bytes < guest_abi::boot::MIN_MEMORY_BYTES {
        return Err(BootError::MemoryTooSmall(info.memory_bytes));
    }
    let (cmdline_gpa, cmdline_len) = (info.cmdline_gpa, info.cmdline_len);
    if cmdline_len > CMDLINE_MAX as u64 {
        return Err(BootError::CmdlineTooLong(cmdline_len));
    }
    let in_memory = cmdline_gpa
        .checked_add(cmdline_len)
        .is_some_and(|end| end <= info.memory_bytes);
    if !in_memory {
        return Err(BootError::CmdlineOutsideMemory {
            gpa: cmdline_gpa,
            len: cmdline_len,
        });
    }
    let bytes: &'static [u8] = if cmdline_len == 0 {
        &[]
    } else {
        // SAFETY: checked above to lie inside the VM's memory, which is identity mapped. The
        // boot area below IMAGE_MIN_GPA is never written by the runtime (the image starts at
        // 1 MiB, the stack grows down from the top), so the bytes stay valid and unchanged for
        // the guest's whole life.
        unsafe { core::slice::from_raw_parts(cmdline_gpa as *const u8, cmdline_len as usize) }
    };
    let text = core::str::from_utf8(bytes).map_err(|_| BootError::CmdlineNotUtf8)?;
    Ok(Boot {
        info,
        cmdline: Cmdline::new(text),
    })
}

/// Called by `_start` with the `RDI` the hypervisor set: runs `main` and exits with its result.
pub fn start(boot_info_gpa: u64, main: fn(&Boot) -> u64) -> ! {
    // SAFETY: only `_start` calls this, with the RDI of the boot protocol.
    match unsafe { read_boot_info(boot_info_gpa) } {
        Ok(boot) => guest::exit(main(&boot)),
        Err(e) => {
            println!("bad boot information at {boot_info_gpa:#x}: {e}");
            guest::exit(EXIT_BAD_BOOT)
        }
    }
}

/// Reports `key=value` through the hypercall, printing (not failing) if the hypervisor refuses.
pub fn report(key: &str, value: u64) {
    if let Err(e) = guest::report(key, value) {
        println!("report {key}={value} refused: {e:?}");
    }
}

/// Prints `error` and returns [`EXIT_USAGE`], for guests that cannot use their command line.
pub fn usage_error(error: impl core::fmt::Display) -> u64 {
    println!("{error}");
    EXIT_USAGE
}

/// Defines the guest's entry point: `_start`, and the glue that calls the guest's main function
/// (`fn(&Boot) -> u64`, conventionally `guest_main`) and exits with its result. Use once per
/// binary:
///
/// ```text
/// #![cfg_attr(target_os = "none", no_std, no_main)]
/// test_guests::entry!(guest_main);
/// fn guest_main(boot: &test_guests::rt::Boot) -> u64 { 0 }
/// ```
///
/// `_start` drops `RSP` below [`RESERVED_TOP`], aligns it to 16 bytes and calls the glue, so the
/// glue starts with the alignment the System V ABI promises after a `call`. On the host, where the
/// images are meaningless, the macro defines a `main` that says so (which is why the guest's
/// function must not be called `main`).
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[cfg(target_os = "none")]
        ::core::arch::global_asm!(
            ".pushsection .text._start, \"ax\", %progbits",
            ".globl _start",
            ".type _start, %function",
            "_start:",
            // RFLAGS is 0x2 at entry, but the ABI wants DF clear: say so rather than assume.
            "    cld",
            // A zero frame pointer ends backtraces.
            "    xor ebp, ebp",
            "    sub rsp, {reserved}",
            "    and rsp, -16",
            // RDI = &BootInfo is already the first argument.
            "    call {start}",
            "    ud2",
            ".size _start, . - _start",
            ".popsection",
            reserved = const $crate::rt::RESERVED_TOP,
            start = sym __test_guests_start,
        );

        #[cfg(target_os = "none")]
        extern "C" fn __test_guests_start(boot_info_gpa: u64) -> ! {
            $crate::rt::start(boot_info_gpa, $main)
        }

        #[cfg(not(target_os = "none"))]
        fn main() {
            let _: fn(&$crate::rt::Boot) -> u64 = $main;
            panic!(
                "{} is a guest image for x86_64-unknown-none; run it under the hypervisor",
                env!("CARGO_BIN_NAME")
            );
        }
    };
}

#[cfg(target_os = "none")]
mod panic {
    use core::panic::PanicInfo;
    use core::sync::atomic::{AtomicBool, Ordering};

    use guest_abi::guest;

    use super::EXIT_PANIC;
    use crate::println;

    /// Prints the panic through the console hypercall and exits with [`EXIT_PANIC`].
    #[panic_handler]
    fn panic(info: &PanicInfo<'_>) -> ! {
        static PANICKING: AtomicBool = AtomicBool::new(false);
        // A panic while printing a panic: leave without another word.
        if PANICKING.swap(true, Ordering::Relaxed) {
            guest::exit(EXIT_PANIC);
        }
        match info.location() {
            Some(at) => println!("panic at {}:{}: {}", at.file(), at.line(), info.message()),
            None => println!("panic: {}", info.message()),
        }
        guest::exit(EXIT_PANIC)
    }
}
