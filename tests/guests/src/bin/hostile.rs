//! `hostile`: attacks the hypercall interface and checks every answer against docs/hypercalls.md.
//!
//! Every hypercall but `exit` is called with addresses outside memory (far away, exactly at the
//! end, straddling the end, at 4 GiB, wrapping around 2^64), lengths over the limits (and with the
//! high 32 bits set, against truncation), result buffers too small, malformed report keys, and
//! call numbers that do not exist (also with the high bits of a valid one). Each call must return
//! exactly the documented `RAX`; a call that fails must not have written anything: its buffers lie
//! in the top page of memory (kept free by the runtime, [`RESERVED_TOP`]), whose contents are
//! compared before and after. Register probes check that `VMCALL` changes no register but `RAX`,
//! including across a `yield` that lets the other VMs run. A few calls that must succeed right at
//! the end of memory check that the bounds are not off by one the other way.
//!
//! Prints one line per unexpected answer, then `hostile: N calls, M unexpected`, reports
//! `hostile_unexpected=M`, prints `hostile: still alive` and exits 0 if M = 0, else 1.
#![cfg_attr(target_os = "none", no_std, no_main)]

use core::fmt;
use core::mem::size_of;

use guest_abi::guest::hypercall;
use guest_abi::{
    ExitKind, Hypercall, HypercallError, VmInfo, VmStats, CONSOLE_WRITE_MAX, REPORT_KEY_MAX,
    VM_INFO_MAGIC,
};
use test_guests::println;
use test_guests::rt::{self, Boot, RESERVED_TOP};

test_guests::entry!(guest_main);

/// A kernel-half address: never guest memory.
const NEG: u64 = 0xFFFF_FFFF_FFFF_F000;
/// 4 GiB: mapped by the boot page tables, outside any VM we run.
const FOUR_GIB: u64 = 1 << 32;
/// High bits that a hypervisor truncating to 32 bits would lose.
const HIGH: u64 = 1 << 32;

const CONSOLE_WRITE: u64 = Hypercall::ConsoleWrite as u64;
const VM_INFO: u64 = Hypercall::VmInfo as u64;
const YIELD: u64 = Hypercall::Yield as u64;
const REPORT: u64 = Hypercall::Report as u64;
const VM_STATS: u64 = Hypercall::VmStats as u64;
const NOP: u64 = Hypercall::Nop as u64;

const INFO_SIZE: u64 = size_of::<VmInfo>() as u64;
const STATS_SIZE: u64 = size_of::<VmStats>() as u64;

/// Text that failing console writes point at: if it shows up in the log, a check failed.
const NEVER_PRINTED: &[u8] = b"hostile: this text must never be printed\n";
/// Written at the very end of memory and printed from there (a write ending exactly at the end).
const END_TEXT: &[u8] = b"hostile: end-of-memory write ok\n";
/// The longest valid key, using every character class allowed.
const MAX_KEY: &str = "hostile.max-len_key_ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789_abcdef";
const _: () = assert!(MAX_KEY.len() as u64 == REPORT_KEY_MAX);
/// A key one byte over the limit, otherwise valid.
const LONG_KEY: &str = "hostile.max-len_key_ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789_abcdefg";
const _: () = assert!(LONG_KEY.len() as u64 == REPORT_KEY_MAX + 1);
/// Fill pattern of the top page.
const FILL: u8 = 0xA5;

/// The `RAX` a call must return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Ok(u64),
    Err(HypercallError),
}

impl Want {
    fn rax(self) -> u64 {
        match self {
            Self::Ok(value) => value,
            Self::Err(e) => e.to_rax(),
        }
    }
}

use HypercallError::{BadAddress, BadArgument, BadLength, UnknownCall};

struct Hostile {
    /// Size of memory.
    end: u64,
    /// The reserved top page: scratch buffers whose every byte is watched.
    top: u64,
    calls: u64,
    unexpected: u64,
}

impl Hostile {
    /// Issues one call and checks `RAX` and, for a call that must fail, that the top page did
    /// not change. Returns `RAX`.
    fn call(&mut self, what: impl fmt::Display, nr: u64, args: [u64; 4], want: Want) -> u64 {
        let before = self.top_digest();
        let rax = hypercall(nr, args[0], args[1], args[2], args[3]);
        self.calls += 1;
        if rax != want.rax() {
            self.unexpected += 1;
            println!(
                "hostile: UNEXPECTED {what}: call {nr:#x}({:#x}, {:#x}, {:#x}, {:#x}) returned {rax:#x} ({:?}), want {:#x} ({want:?})",
                args[0],
                args[1],
                args[2],
                args[3],
                HypercallError::from_rax(rax),
                want.rax(),
            );
        }
        if matches!(want, Want::Err(_)) && self.top_digest() != before {
            self.unexpected += 1;
            println!("hostile: UNEXPECTED {what}: a failing call changed guest memory");
        }
        rax
    }

    /// Checks a condition on a successful call's result.
    fn expect(&mut self, what: &str, ok: bool) {
        if !ok {
            self.unexpected += 1;
            println!("hostile: UNEXPECTED {what}");
        }
    }

    /// FNV-1a over the top page, read with volatile loads (the hypervisor writes behind the
    /// compiler's back).
    fn top_digest(&self) -> u64 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for i in 0..RESERVED_TOP / 8 {
            // SAFETY: the top page is this VM's own memory, reserved by the runtime for this use.
            let word = unsafe { core::ptr::read_volatile((self.top + i * 8) as *const u64) };
            hash = (hash ^ word).wrapping_mul(0x100_0000_01b3);
        }
        hash
    }

    /// Fills the top page with [`FILL`] and puts [`END_TEXT`] in its last bytes.
    fn reset_top(&self) {
        for i in 0..RESERVED_TOP {
            // SAFETY: as in `top_digest`.
            unsafe { core::ptr::write_volatile((self.top + i) as *mut u8, FILL) };
        }
        let text_at = self.end - END_TEXT.len() as u64;
        for (i, &byte) in END_TEXT.iter().enumerate() {
            // SAFETY: as in `top_digest`; the text ends exactly at the end of memory.
            unsafe { core::ptr::write_volatile((text_at + i as u64) as *mut u8, byte) };
        }
    }

    /// Reads a `T` the hypervisor wrote at `gpa` in the top page.
    fn read_top<T: Copy>(&self, gpa: u64) -> T {
        assert!(gpa >= self.top && gpa + size_of::<T>() as u64 <= self.end);
        // SAFETY: inside the top page (checked), any bit pattern is valid for the plain-integer
        // structs read here; unaligned because the hypervisor accepts any alignment.
        unsafe { core::ptr::read_volatile(gpa as *const T) }
    }

    /// Whether the `len` bytes at `gpa` in the top page still hold [`FILL`].
    fn untouched(&self, gpa: u64, len: u64) -> bool {
        (gpa..gpa + len).all(|a| self.read_top::<u8>(a) == FILL)
    }
}

fn unknown_calls(h: &mut Hostile) {
    let text = NEVER_PRINTED.as_ptr() as u64;
    let len = NEVER_PRINTED.len() as u64;
    for nr in [0, 8, 0xFFFF, u64::MAX, 1 << 63] {
        h.call("unknown call number", nr, [0; 4], Want::Err(UnknownCall));
    }
    h.call(
        "unknown call number with valid console_write arguments",
        8,
        [text, len, 0, 0],
        Want::Err(UnknownCall),
    );
    h.call(
        "console_write number with high bits set",
        HIGH | CONSOLE_WRITE,
        [text, len, 0, 0],
        Want::Err(UnknownCall),
    );
    h.call(
        "nop number with high bits set",
        HIGH | NOP,
        [0; 4],
        Want::Err(UnknownCall),
    );
}

fn console_write(h: &mut Hostile) {
    let (end, text) = (h.end, NEVER_PRINTED.as_ptr() as u64);
    let max = CONSOLE_WRITE_MAX;
    let cases: [(&str, u64, u64, HypercallError); 12] = [
        ("console_write at a kernel-half address", NEG, 1, BadAddress),
        ("console_write at the end of memory", end, 1, BadAddress),
        ("console_write straddling the end", end - 1, 2, BadAddress),
        ("console_write at 4 GiB", FOUR_GIB, 1, BadAddress),
        (
            "console_write wrapping around",
            u64::MAX - 1,
            16,
            BadAddress,
        ),
        (
            "console_write of 0 bytes past the end",
            end + 1,
            0,
            BadAddress,
        ),
        (
            "console_write of 0 bytes at 2^64-1",
            u64::MAX,
            0,
            BadAddress,
        ),
        ("console_write of u64::MAX bytes", text, u64::MAX, BadLength),
        ("console_write over the limit", text, max + 1, BadLength),
        (
            "console_write length with high bits",
            text,
            HIGH | 5,
            BadLength,
        ),
        (
            "console_write over the limit at a bad address",
            NEG,
            max + 1,
            BadLength,
        ),
        (
            "console_write over the limit, wrapping",
            u64::MAX,
            max + 1,
            BadLength,
        ),
    ];
    for (what, gpa, len, e) in cases {
        h.call(what, CONSOLE_WRITE, [gpa, len, 0, 0], Want::Err(e));
    }
    h.call(
        "console_write of 0 bytes at the end",
        CONSOLE_WRITE,
        [end, 0, 0, 0],
        Want::Ok(0),
    );
    let len = END_TEXT.len() as u64;
    h.call(
        "console_write of the last bytes of memory",
        CONSOLE_WRITE,
        [end - len, len, 0, 0],
        Want::Ok(len),
    );
}

/// vm_info and vm_stats share their rules: `len` below the struct's size is BadLength, then the
/// whole buffer `[gpa, gpa + len)` must be in memory.
fn result_buffer_errors(h: &mut Hostile, call: &str, nr: u64, size: u64) {
    let (end, top) = (h.end, h.top);
    let cases: [(&str, u64, u64, HypercallError); 11] = [
        ("buffer one byte short", top, size - 1, BadLength),
        ("buffer of 0 bytes", top, 0, BadLength),
        ("buffer short at a bad address", NEG, size - 1, BadLength),
        ("buffer at a kernel-half address", NEG, size, BadAddress),
        (
            "buffer straddling the end",
            end - size / 2,
            size,
            BadAddress,
        ),
        ("buffer at the end of memory", end, size, BadAddress),
        ("buffer at 4 GiB", FOUR_GIB, size, BadAddress),
        ("buffer wrapping around", u64::MAX - 1, size, BadAddress),
        ("buffer of u64::MAX bytes", top, u64::MAX, BadAddress),
        (
            "buffer one byte past the end",
            top,
            RESERVED_TOP + 1,
            BadAddress,
        ),
        (
            "buffer with length high bits past the end",
            top,
            HIGH | size,
            BadAddress,
        ),
    ];
    for (what, gpa, len, e) in cases {
        h.call(
            format_args!("{call}: {what}"),
            nr,
            [gpa, len, 0, 0],
            Want::Err(e),
        );
    }
}

fn vm_info(h: &mut Hostile, boot: &Boot) {
    result_buffer_errors(h, "vm_info", VM_INFO, INFO_SIZE);
    let (end, top) = (h.end, h.top);

    // Exactly at the end of memory.
    let at = end - INFO_SIZE;
    h.call(
        "vm_info ending at the end of memory",
        VM_INFO,
        [at, INFO_SIZE, 0, 0],
        Want::Ok(INFO_SIZE),
    );
    let info: VmInfo = h.read_top(at);
    h.expect("vm_info at the end: magic", info.magic == VM_INFO_MAGIC);

    // A buffer bigger than needed (the whole top page, ending at the end): only the struct is
    // written, at an odd address (no alignment is required).
    h.reset_top();
    let at = top + 1;
    h.call(
        "vm_info into a larger buffer",
        VM_INFO,
        [at, end - at, 0, 0],
        Want::Ok(INFO_SIZE),
    );
    let info: VmInfo = h.read_top(at);
    h.expect(
        "vm_info: nothing written past the struct",
        h.untouched(at + INFO_SIZE, 64),
    );
    h.expect("vm_info: magic", info.magic == VM_INFO_MAGIC);
    h.expect(
        "vm_info: memory_bytes is BootInfo's",
        info.memory_bytes == boot.memory_bytes(),
    );
    h.expect("vm_info: at least one vCPU", info.vcpus >= 1);
    h.expect("vm_info: name_len <= 32", info.name_len <= 32);
    let name = info.name.get(..info.name_len as usize).unwrap_or(&[]);
    let name = core::str::from_utf8(name);
    h.expect("vm_info: name is UTF-8", name.is_ok());
    println!(
        "hostile: vm_info: name={} vm_id={} vcpus={} memory_bytes={:#x} quantum_us={}",
        name.unwrap_or("?"),
        info.vm_id,
        info.vcpus,
        info.memory_bytes,
        info.quantum_us
    );
}

fn vm_stats(h: &mut Hostile) {
    result_buffer_errors(h, "vm_stats", VM_STATS, STATS_SIZE);
    h.reset_top();
    let (end, top) = (h.end, h.top);
    let at = end - STATS_SIZE;
    let vmcalls_before = h.calls;
    h.call(
        "vm_stats ending at the end of memory",
        VM_STATS,
        [at, STATS_SIZE, 0, 0],
        Want::Ok(STATS_SIZE),
    );
    let stats: VmStats = h.read_top(at);
    h.expect(
        "vm_stats: nothing written before the struct",
        h.untouched(top, at - top),
    );
    let vmcalls = stats.exits[ExitKind::Vmcall as usize];
    // Every call so far was a VMCALL exit (and each println! is one more).
    h.expect(
        "vm_stats: VMCALL exits >= hypercalls made",
        vmcalls >= vmcalls_before,
    );
    h.expect("vm_stats: scheduled in at least once", stats.runs >= 1);
    println!(
        "hostile: vm_stats: vmcall={} runs={} cpu_us={}",
        vmcalls, stats.runs, stats.cpu_us
    );
}

fn report(h: &mut Hostile) {
    let end = h.end;
    let key = |k: &'static [u8]| (k.as_ptr() as u64, k.len() as u64);
    let long = key(LONG_KEY.as_bytes());
    let valid = key(b"hostile_probe");
    let cases: [(&str, (u64, u64), HypercallError); 18] = [
        ("report with an empty key", (valid.0, 0), BadArgument),
        (
            "report with an empty key past the end",
            (end + 1, 0),
            BadAddress,
        ),
        ("report with a key over the limit", long, BadLength),
        (
            "report with a key of u64::MAX bytes",
            (valid.0, u64::MAX),
            BadLength,
        ),
        (
            "report key length with high bits",
            (valid.0, HIGH | valid.1),
            BadLength,
        ),
        (
            "report with a long key at a bad address",
            (NEG, long.1),
            BadLength,
        ),
        ("report key at a kernel-half address", (NEG, 4), BadAddress),
        ("report key straddling the end", (end - 2, 4), BadAddress),
        ("report key at 4 GiB", (FOUR_GIB, 4), BadAddress),
        ("report key wrapping around", (u64::MAX - 1, 16), BadAddress),
        ("report key with a space", key(b"bad key"), BadArgument),
        ("report key with '='", key(b"a=b"), BadArgument),
        ("report key with a newline", key(b"key\n"), BadArgument),
        ("report key with '/'", key(b"a/b"), BadArgument),
        ("report key with NUL", key(b"a\0b"), BadArgument),
        ("report key of bad UTF-8", key(&[0xC3, 0x28]), BadArgument),
        (
            "report key of a lone continuation byte",
            key(&[b'k', 0x80]),
            BadArgument,
        ),
        (
            "report key of non-ASCII UTF-8",
            key("clé".as_bytes()),
            BadArgument,
        ),
    ];
    for (what, (gpa, len), e) in cases {
        h.call(what, REPORT, [gpa, len, 1, 0], Want::Err(e));
    }
    let max = key(MAX_KEY.as_bytes());
    h.call(
        "report with the longest key",
        REPORT,
        [max.0, max.1, 64, 0],
        Want::Ok(0),
    );
    h.call(
        "report of u64::MAX",
        REPORT,
        [valid.0, valid.1, u64::MAX, 0],
        Want::Ok(0),
    );
}

fn no_argument_calls(h: &mut Hostile) {
    h.call(
        "yield with junk arguments",
        YIELD,
        [NEG, u64::MAX, NEG, 1],
        Want::Ok(0),
    );
    h.call(
        "nop with junk arguments",
        NOP,
        [NEG, u64::MAX, NEG, 1],
        Want::Ok(0),
    );
}

// Register probe: loads a distinct 64-bit pattern into every general register but RAX and RSP,
// issues VMCALL with RAX = the call number (RDI), and returns in RAX a bit mask of the registers
// whose pattern changed (bit i for REGS[i]) and in RDX the call's RAX. Callee-saved registers are
// restored; RBX and RBP cannot be asm! operands, hence a function of its own.
#[repr(C)]
struct Probe {
    clobbered: u64,
    rax: u64,
}

const REGS: [&str; 14] = [
    "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
];
/// Patterns with high bits set and every byte different, so truncation is noticed too.
const PATTERNS: [u64; 14] = [
    0x8b1b_0000_0000_0001,
    0x8c1c_1111_1111_1102,
    0x8d1d_2222_2222_2203,
    0x8e1e_3333_3333_3304, // RSI: a length far over every limit
    0x8f1f_4444_4444_4405, // RDI: an address far outside memory
    0x9010_5555_5555_5506,
    0x9111_6666_6666_6607,
    0x9212_7777_7777_7708,
    0x9313_8888_8888_8809,
    0x9414_9999_9999_990a,
    0x9515_aaaa_aaaa_aa0b,
    0x9616_bbbb_bbbb_bb0c,
    0x9717_cccc_cccc_cc0d,
    0x9818_dddd_dddd_dd0e,
];

macro_rules! probe_check {
    ($reg:literal, $bit:literal) => {
        concat!(
            "    movabs rax, {p",
            $bit,
            "}\n",
            "    cmp ",
            $reg,
            ", rax\n",
            "    je 7f\n",
            "    or qword ptr [rsp], 1 << ",
            $bit,
            "\n",
            "7:\n",
        )
    };
}

core::arch::global_asm!(
    ".pushsection .text.hostile_regs_probe, \"ax\", %progbits",
    ".globl hostile_regs_probe",
    ".type hostile_regs_probe, %function",
    "hostile_regs_probe:",
    "    push rbx",
    "    push rbp",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    mov rax, rdi",
    "    movabs rbx, {p0}",
    "    movabs rcx, {p1}",
    "    movabs rdx, {p2}",
    "    movabs rsi, {p3}",
    "    movabs rdi, {p4}",
    "    movabs rbp, {p5}",
    "    movabs r8, {p6}",
    "    movabs r9, {p7}",
    "    movabs r10, {p8}",
    "    movabs r11, {p9}",
    "    movabs r12, {p10}",
    "    movabs r13, {p11}",
    "    movabs r14, {p12}",
    "    movabs r15, {p13}",
    "    vmcall",
    "    push rax",
    "    push 0",
    probe_check!("rbx", 0),
    probe_check!("rcx", 1),
    probe_check!("rdx", 2),
    probe_check!("rsi", 3),
    probe_check!("rdi", 4),
    probe_check!("rbp", 5),
    probe_check!("r8", 6),
    probe_check!("r9", 7),
    probe_check!("r10", 8),
    probe_check!("r11", 9),
    probe_check!("r12", 10),
    probe_check!("r13", 11),
    probe_check!("r14", 12),
    probe_check!("r15", 13),
    "    pop rax",
    "    pop rdx",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbp",
    "    pop rbx",
    "    ret",
    ".size hostile_regs_probe, . - hostile_regs_probe",
    ".popsection",
    p0 = const PATTERNS[0],
    p1 = const PATTERNS[1],
    p2 = const PATTERNS[2],
    p3 = const PATTERNS[3],
    p4 = const PATTERNS[4],
    p5 = const PATTERNS[5],
    p6 = const PATTERNS[6],
    p7 = const PATTERNS[7],
    p8 = const PATTERNS[8],
    p9 = const PATTERNS[9],
    p10 = const PATTERNS[10],
    p11 = const PATTERNS[11],
    p12 = const PATTERNS[12],
    p13 = const PATTERNS[13],
);

extern "C" {
    fn hostile_regs_probe(nr: u64) -> Probe;
}

fn register_probes(h: &mut Hostile) {
    // RDI (the address) and RSI (the length) hold PATTERNS[4] and PATTERNS[3]: far outside
    // memory and far over every limit, so each call's answer is known.
    let cases: [(&str, u64, Want); 7] = [
        ("nop", NOP, Want::Ok(0)),
        ("yield", YIELD, Want::Ok(0)),
        ("unknown call", 0xFFFF, Want::Err(UnknownCall)),
        ("console_write", CONSOLE_WRITE, Want::Err(BadLength)),
        ("report", REPORT, Want::Err(BadLength)),
        ("vm_info", VM_INFO, Want::Err(BadAddress)),
        ("vm_stats", VM_STATS, Want::Err(BadAddress)),
    ];
    for (what, nr, want) in cases {
        // SAFETY: the probe follows the C ABI (callee-saved registers restored, stack balanced)
        // and the hypercall it makes touches no memory of ours: its arguments are out of bounds.
        let probe = unsafe { hostile_regs_probe(nr) };
        h.calls += 1;
        if probe.rax != want.rax() {
            h.unexpected += 1;
            println!(
                "hostile: UNEXPECTED register probe {what}: returned {:#x}, want {:#x} ({want:?})",
                probe.rax,
                want.rax()
            );
        }
        if probe.clobbered != 0 {
            h.unexpected += 1;
            println!("hostile: UNEXPECTED register probe {what}: VMCALL changed registers:");
            for (bit, reg) in REGS.iter().enumerate() {
                if probe.clobbered & (1 << bit) != 0 {
                    println!("hostile:   {reg}");
                }
            }
        }
    }
}

fn guest_main(boot: &Boot) -> u64 {
    let mut h = Hostile {
        end: boot.memory_bytes(),
        top: boot.reserved_top(),
        calls: 0,
        unexpected: 0,
    };
    println!(
        "hostile: memory ends at {:#x}, watching {:#x}..{:#x}",
        h.end, h.top, h.end
    );
    h.reset_top();

    unknown_calls(&mut h);
    console_write(&mut h);
    report(&mut h);
    no_argument_calls(&mut h);
    register_probes(&mut h);
    vm_info(&mut h, boot);
    vm_stats(&mut h);

    println!("hostile: {} calls, {} unexpected", h.calls, h.unexpected);
    rt::report("hostile_unexpected", h.unexpected);
    println!("hostile: still alive");
    u64::from(h.unexpected != 0)
}
