//! Hypercall decoding and argument checking (the ABI is guest-abi's; docs/hypercalls.md).
//!
//! [`handle`] turns the registers of a `VMCALL` into an [`Outcome`] that the kernel carries out.
//! Every length is checked against its limit first, then every address range against the VM's
//! memory; only then is guest memory read or written, through [`GuestMemory`]. A bad argument
//! costs the guest an error code and nothing else.

use guest_abi::{Hypercall, HypercallError, VmInfo, VmStats, CONSOLE_WRITE_MAX, REPORT_KEY_MAX};

use crate::memory::{AccessError, GuestMemory, PhysMemory};

/// The registers of a hypercall: number and four arguments.
#[derive(Clone, Copy, Debug, Default)]
pub struct Args {
    pub nr: u64,
    pub a0: u64,
    pub a1: u64,
    pub a2: u64,
    pub a3: u64,
}

/// What the kernel must do after a hypercall. Unless noted, it puts `rax` in the guest's RAX and
/// resumes it after the VMCALL.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<'a> {
    Return(u64),
    /// Print these bytes on the VM's console, then return their count.
    Console(&'a [u8]),
    /// Log the report, then return 0.
    Report(&'a str, u64),
    /// Return 0 and end the VM's quantum.
    Yield,
    /// Stop the VM with this exit code; it is never resumed.
    Exit(u64),
    /// Nothing was done: the page at `gpa` must be faulted in (for a write when `write`), then
    /// the same hypercall handled again.
    Unavailable {
        gpa: u64,
        write: bool,
    },
}

/// Scratch space for data copied out of the guest.
pub type Scratch = [u8; CONSOLE_WRITE_MAX as usize];

fn err(e: HypercallError) -> Outcome<'static> {
    Outcome::Return(e.to_rax())
}

/// Copies `value` (a plain `#[repr(C)]` struct) to the guest at `gpa` if `len` can hold it.
fn write_struct<T: Copy>(
    mem: &GuestMemory,
    phys: &mut impl PhysMemory,
    gpa: u64,
    len: u64,
    value: &T,
) -> Outcome<'static> {
    let size = core::mem::size_of::<T>() as u64;
    if len < size {
        return err(HypercallError::BadLength);
    }
    // The whole buffer the guest names must be its own, not just the part we fill.
    if mem.check(gpa, len).is_err() {
        return err(HypercallError::BadAddress);
    }
    // SAFETY: T is one of guest-abi's `#[repr(C)]` structs of integers and byte arrays, with
    // no padding; viewing it as bytes reads only initialized memory.
    let bytes =
        unsafe { core::slice::from_raw_parts((value as *const T).cast::<u8>(), size as usize) };
    match mem.write(phys, gpa, bytes) {
        Ok(()) => Outcome::Return(size),
        Err(e) => refused(e, true),
    }
}

/// The outcome of a copy that [`GuestMemory`] refused.
fn refused(e: AccessError, write: bool) -> Outcome<'static> {
    match e {
        AccessError::OutOfRange(_) => err(HypercallError::BadAddress),
        AccessError::Unavailable { gpa } => Outcome::Unavailable { gpa, write },
    }
}

/// Whether a report key's content is acceptable: non-empty, only `[A-Za-z0-9_.-]` (its length
/// limit is checked before it is read).
fn valid_key(key: &[u8]) -> bool {
    !key.is_empty()
        && key.len() as u64 <= REPORT_KEY_MAX
        && key
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Decodes and checks one hypercall.
///
/// A range that passes every check but touches a page the memory engine holds (taken away, or
/// shared read-only for a result) gives [`Outcome::Unavailable`] before anything was copied or
/// done: the kernel has the engine fault that page in and calls this again with the same
/// registers.
pub fn handle<'s>(
    args: Args,
    mem: &GuestMemory,
    phys: &mut impl PhysMemory,
    info: &VmInfo,
    stats: &VmStats,
    scratch: &'s mut Scratch,
) -> Outcome<'s> {
    let Some(call) = Hypercall::from_raw(args.nr) else {
        return err(HypercallError::UnknownCall);
    };
    match call {
        Hypercall::Nop => Outcome::Return(0),
        Hypercall::Yield => Outcome::Yield,
        Hypercall::Exit => Outcome::Exit(args.a0),
        Hypercall::ConsoleWrite => {
            let (gpa, len) = (args.a0, args.a1);
            if len > CONSOLE_WRITE_MAX {
                return err(HypercallError::BadLength);
            }
            let buf = &mut scratch[..len as usize];
            match mem.read(phys, gpa, buf) {
                Ok(()) => Outcome::Console(buf),
                Err(e) => refused(e, false),
            }
        }
        Hypercall::Report => {
            let (gpa, len, value) = (args.a0, args.a1, args.a2);
            if len > REPORT_KEY_MAX {
                return err(HypercallError::BadLength);
            }
            let buf = &mut scratch[..len as usize];
            if let Err(e) = mem.read(phys, gpa, buf) {
                return refused(e, false);
            }
            if !valid_key(buf) {
                return err(HypercallError::BadArgument);
            }
            // valid_key admits only ASCII.
            match core::str::from_utf8(buf) {
                Ok(key) => Outcome::Report(key, value),
                Err(_) => err(HypercallError::BadArgument),
            }
        }
        Hypercall::VmInfo => write_struct(mem, phys, args.a0, args.a1, info),
        Hypercall::VmStats => write_struct(mem, phys, args.a0, args.a1, stats),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::FRAME_SIZE;
    use crate::memory::tests::scrambled;
    use guest_abi::EXIT_KINDS;

    fn call(nr: Hypercall, a0: u64, a1: u64, a2: u64) -> Args {
        Args {
            nr: nr as u64,
            a0,
            a1,
            a2,
            a3: 0,
        }
    }

    fn run(args: Args) -> (u64, Option<alloc::vec::Vec<u8>>) {
        let (mem, mut phys) = scrambled();
        mem.write(&mut phys, 0x100, b"hello.key").unwrap();
        let info = VmInfo {
            magic: guest_abi::VM_INFO_MAGIC,
            vm_id: 3,
            ..Default::default()
        };
        let stats = VmStats {
            exits: [7; EXIT_KINDS],
            ..Default::default()
        };
        let mut scratch = [0; CONSOLE_WRITE_MAX as usize];
        match handle(args, &mem, &mut phys, &info, &stats, &mut scratch) {
            Outcome::Return(r) => (r, Some(phys.0)),
            Outcome::Console(b) => (b.len() as u64, Some(b.to_vec())),
            Outcome::Report(k, v) => (v, Some(k.as_bytes().to_vec())),
            Outcome::Yield => (0, None),
            Outcome::Exit(c) => (c, None),
            Outcome::Unavailable { .. } => unreachable!("every page here is present and writable"),
        }
    }

    const SIZE: u64 = 3 * 4096;

    #[test]
    fn console_write_checks_length_then_range() {
        assert_eq!(
            run(call(Hypercall::ConsoleWrite, 0x100, 5, 0)).1.unwrap(),
            b"hello"
        );
        let cases = [
            (0x100, CONSOLE_WRITE_MAX + 1, HypercallError::BadLength),
            (u64::MAX, u64::MAX, HypercallError::BadLength),
            (SIZE - 1, 2, HypercallError::BadAddress),
            (u64::MAX - 1, 16, HypercallError::BadAddress),
            (1 << 32, 1, HypercallError::BadAddress),
        ];
        for (gpa, len, e) in cases {
            assert_eq!(
                run(call(Hypercall::ConsoleWrite, gpa, len, 0)).0,
                e.to_rax(),
                "{gpa:#x} {len}"
            );
        }
        // Zero bytes at the very end is fine.
        assert_eq!(run(call(Hypercall::ConsoleWrite, SIZE, 0, 0)).0, 0);
    }

    #[test]
    fn report_keys_are_checked() {
        let (v, key) = run(call(Hypercall::Report, 0x100, 9, 42));
        assert_eq!((v, key.unwrap()), (42, b"hello.key".to_vec()));
        // Empty key: the range is checked first, then the content.
        assert_eq!(
            run(call(Hypercall::Report, 0x100, 0, 1)).0,
            HypercallError::BadArgument.to_rax()
        );
        assert_eq!(
            run(call(Hypercall::Report, SIZE + 1, 0, 1)).0,
            HypercallError::BadAddress.to_rax()
        );
        assert_eq!(
            run(call(Hypercall::Report, 0x100, REPORT_KEY_MAX + 1, 1)).0,
            HypercallError::BadLength.to_rax()
        );
        assert_eq!(
            run(call(Hypercall::Report, SIZE - 4, 8, 1)).0,
            HypercallError::BadAddress.to_rax()
        );
        // Zeroed memory is not a valid key.
        assert_eq!(
            run(call(Hypercall::Report, 0x200, 4, 1)).0,
            HypercallError::BadArgument.to_rax()
        );
    }

    #[test]
    fn structs_need_room_and_a_valid_range() {
        let size = core::mem::size_of::<VmInfo>() as u64;
        let (r, mem) = run(call(Hypercall::VmInfo, 0x2000, size, 0));
        assert_eq!(r, size);
        // Guest page 2 is host frame 1: the magic landed there.
        assert_eq!(
            &mem.unwrap()[4096..4100],
            &guest_abi::VM_INFO_MAGIC.to_le_bytes()
        );
        assert_eq!(
            run(call(Hypercall::VmInfo, 0x2000, size - 1, 0)).0,
            HypercallError::BadLength.to_rax()
        );
        assert_eq!(
            run(call(Hypercall::VmInfo, SIZE - 8, size, 0)).0,
            HypercallError::BadAddress.to_rax()
        );
        // A buffer that runs past the end is refused even if the struct would fit.
        assert_eq!(
            run(call(Hypercall::VmInfo, SIZE - 4096, 4097, 0)).0,
            HypercallError::BadAddress.to_rax()
        );
        assert_eq!(
            run(call(Hypercall::VmInfo, 0, u64::MAX, 0)).0,
            HypercallError::BadAddress.to_rax()
        );
        let ssize = core::mem::size_of::<VmStats>() as u64;
        assert_eq!(run(call(Hypercall::VmStats, 0, ssize, 0)).0, ssize);
        assert_eq!(
            run(call(Hypercall::VmStats, u64::MAX, ssize, 0)).0,
            HypercallError::BadAddress.to_rax()
        );
    }

    #[test]
    fn unknown_numbers_and_simple_calls() {
        for nr in [0, 8, 0xffff, u64::MAX] {
            let a = Args {
                nr,
                ..Default::default()
            };
            assert_eq!(run(a).0, HypercallError::UnknownCall.to_rax());
        }
        assert_eq!(run(call(Hypercall::Nop, 1, 2, 3)).0, 0);
        assert_eq!(run(call(Hypercall::Exit, 7, 0, 0)), (7, None));
        assert_eq!(run(call(Hypercall::Yield, 0, 0, 0)), (0, None));
    }

    #[test]
    fn pages_the_engine_holds_are_asked_for_before_anything_happens() {
        use crate::memory::PageMapping;
        let (mut mem, mut phys) = scrambled();
        mem.write(&mut phys, 0x100, b"hello.key").unwrap();
        let info = VmInfo {
            magic: guest_abi::VM_INFO_MAGIC,
            ..Default::default()
        };
        let stats = VmStats::default();
        let mut scratch = [0; CONSOLE_WRITE_MAX as usize];
        // Page 0 taken away; page 2 (host frame 1) shared read-only.
        mem.set_page(0, None);
        let shared = Some(PageMapping {
            hpa: FRAME_SIZE,
            writable: false,
        });
        mem.set_page(2, shared);
        let mut go = |mem: &GuestMemory, args| match handle(
            args,
            mem,
            &mut phys,
            &info,
            &stats,
            &mut scratch,
        ) {
            Outcome::Unavailable { gpa, write } => Some((gpa, write)),
            _ => None,
        };
        let at0 = Some((0x100, false));
        assert_eq!(go(&mem, call(Hypercall::ConsoleWrite, 0x100, 9, 0)), at0);
        assert_eq!(go(&mem, call(Hypercall::Report, 0x100, 9, 1)), at0);
        // A result into a read-only page asks for a write fault; reading it needs none.
        let at2 = Some((2 * FRAME_SIZE, true));
        assert_eq!(
            go(&mem, call(Hypercall::VmInfo, 2 * FRAME_SIZE, 72, 0)),
            at2
        );
        assert_eq!(
            go(&mem, call(Hypercall::ConsoleWrite, 2 * FRAME_SIZE, 9, 0)),
            None
        );
        // The length and range checks still come first.
        let too_long = call(Hypercall::ConsoleWrite, 0x100, CONSOLE_WRITE_MAX + 1, 0);
        assert_eq!(go(&mem, too_long), None);
        let straddling = call(Hypercall::VmInfo, 2 * FRAME_SIZE, 3 * FRAME_SIZE, 0);
        assert_eq!(go(&mem, straddling), None);
        // Faulted in, the same call goes through.
        mem.set_page(
            2,
            Some(PageMapping {
                hpa: FRAME_SIZE,
                writable: true,
            }),
        );
        assert_eq!(
            go(&mem, call(Hypercall::VmInfo, 2 * FRAME_SIZE, 72, 0)),
            None
        );
        let mut magic = [0u8; 4];
        mem.read(&phys, 2 * FRAME_SIZE, &mut magic).unwrap();
        assert_eq!(u32::from_le_bytes(magic), guest_abi::VM_INFO_MAGIC);
    }
}
