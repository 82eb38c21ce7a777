//! Exception handling for guests that fault on purpose.
//!
//! The boot protocol gives a guest no IDT (IDTR limit 0), so any exception ends in a triple fault.
//! [`install`] loads a 64-bit IDT of our own whose 32 exception vectors enter one handler:
//! - a #GP raised by RDMSR (`0F 32`) or WRMSR (`0F 30`) while a probe of this module
//!   ([`rdmsr`], [`wrmsr`]) is in progress is recorded and skipped: the saved RIP moves past the
//!   two-byte instruction and the handler returns with IRETQ;
//! - any exception raised by the one instruction of a [`fault_of`] probe is recorded and that
//!   instruction (of the length the probe gives) skipped the same way; in a [`trap_of`] probe
//!   the first exception is recorded and the trap flag cleared, nothing skipped;
//! - anything else prints the exception with the saved registers through the console hypercall
//!   and exits with [`EXIT_EXCEPTION`](crate::rt::EXIT_EXCEPTION).
//!
//! - an NMI (vector 2) while [`count_nmis`] is on is counted and returned from (the
//!   `platform-hostile` guest sends itself NMIs through the local APIC).
//!
//! The table has all 256 gates; this module fills the 32 exception gates and leaves the others
//! not present until [`crate::interrupts`] installs its stubs with [`set_gate`].
//!
//! The gates use the boot GDT's 64-bit code selector ([`guest_abi::boot::CODE_SELECTOR`]); no IST,
//! so exceptions run on the current stack (fine at CPL 0 with the stack we have). Only one vCPU
//! runs a test guest, so the state below needs no locks, only atomics for the compiler's sake.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use guest_abi::boot::CODE_SELECTOR;
use guest_abi::guest;

use crate::cpu::{self, DescriptorTablePointer};
use crate::println;
use crate::rt::EXIT_EXCEPTION;

/// Number of exception vectors (0..32) this module handles.
const VECTORS: usize = 32;
/// Number of gates in the table: every vector, so that [`crate::interrupts`] can add its own.
const GATES: usize = 256;
/// Vector of the non-maskable interrupt.
pub const NMI: u8 = 2;
/// Vector of the general-protection exception.
pub const GP: u8 = 13;
/// Vector of the invalid-opcode exception.
pub const UD: u8 = 6;
/// Vector of the page-fault exception.
pub const PF: u8 = 14;

/// A recorded exception: vector, error code (0 for vectors without one) and faulting RIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub vector: u8,
    pub error_code: u64,
    pub rip: u64,
}

/// A 64-bit interrupt gate.
#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    /// Bits 0..3: IST index (0: none).
    ist: u8,
    /// Present, DPL 0, type 0xE (64-bit interrupt gate: IF is cleared on entry, already 0).
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const MISSING: Self = Self {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    const fn interrupt(handler: u64) -> Self {
        Self {
            offset_low: handler as u16,
            selector: CODE_SELECTOR,
            ist: 0,
            type_attr: 0x8E,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

const _: () = assert!(core::mem::size_of::<Gate>() == 16);

#[repr(C, align(16))]
struct Table(UnsafeCell<[Gate; GATES]>);

// SAFETY: written only by `install` (before the table is loaded) and by `set_gate` (with
// interrupts off, for a vector nothing raises yet), on the guest's single vCPU.
unsafe impl Sync for Table {}

static IDT: Table = Table(UnsafeCell::new([Gate::MISSING; GATES]));
/// Whether NMIs are counted and returned from (else they are fatal, as any exception).
static COUNT_NMIS: AtomicBool = AtomicBool::new(false);
static NMIS: AtomicU64 = AtomicU64::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Set while a probe expects its RDMSR/WRMSR to fault.
static PROBING: AtomicBool = AtomicBool::new(false);
/// While a [`fault_of`] probe runs: the length of its one instruction, which any exception it
/// raises skips; 0 otherwise.
static SKIP_LEN: AtomicU64 = AtomicU64::new(0);
/// The last recorded fault; `NO_FAULT` in the vector when none.
static FAULT_VECTOR: AtomicU64 = AtomicU64::new(NO_FAULT);
static FAULT_ERROR_CODE: AtomicU64 = AtomicU64::new(0);
static FAULT_RIP: AtomicU64 = AtomicU64::new(0);
const NO_FAULT: u64 = u64::MAX;

/// The stack as the common stub leaves it for [`dispatch`], lowest address first: the general
/// registers the stub pushed, the vector and error code (the stub pushes 0 for vectors without
/// one), then the frame the CPU pushed.
#[repr(C)]
#[derive(Debug)]
struct Frame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

// One stub per vector pushes a zero error code where the CPU pushes none, then the vector, so that
// every exception reaches the common code with the same frame. The common code saves all general
// registers (the handler in Rust may clobber the caller-saved ones; there is no SSE state on this
// soft-float target), calls `dispatch` with RSP 16-byte aligned and DF clear, restores, drops
// vector and error code and returns with IRETQ to the (possibly advanced) saved RIP.
//
// Vectors with an error code: 8 (#DF), 10 (#TS), 11 (#NP), 12 (#SS), 13 (#GP), 14 (#PF),
// 17 (#AC), 21 (#CP), 29 (#VC), 30 (#SX).
core::arch::global_asm!(
    r".macro TEST_GUESTS_EXC_NOERR vec",
    r"test_guests_exc_\vec:",
    r"    push 0",
    r"    push \vec",
    r"    jmp test_guests_exc_common",
    r".endm",
    r".macro TEST_GUESTS_EXC_ERR vec",
    r"test_guests_exc_\vec:",
    r"    push \vec",
    r"    jmp test_guests_exc_common",
    r".endm",
    ".pushsection .text.test_guests_exc, \"ax\", %progbits",
    ".p2align 4",
    "TEST_GUESTS_EXC_NOERR 0",
    "TEST_GUESTS_EXC_NOERR 1",
    "TEST_GUESTS_EXC_NOERR 2",
    "TEST_GUESTS_EXC_NOERR 3",
    "TEST_GUESTS_EXC_NOERR 4",
    "TEST_GUESTS_EXC_NOERR 5",
    "TEST_GUESTS_EXC_NOERR 6",
    "TEST_GUESTS_EXC_NOERR 7",
    "TEST_GUESTS_EXC_ERR 8",
    "TEST_GUESTS_EXC_NOERR 9",
    "TEST_GUESTS_EXC_ERR 10",
    "TEST_GUESTS_EXC_ERR 11",
    "TEST_GUESTS_EXC_ERR 12",
    "TEST_GUESTS_EXC_ERR 13",
    "TEST_GUESTS_EXC_ERR 14",
    "TEST_GUESTS_EXC_NOERR 15",
    "TEST_GUESTS_EXC_NOERR 16",
    "TEST_GUESTS_EXC_ERR 17",
    "TEST_GUESTS_EXC_NOERR 18",
    "TEST_GUESTS_EXC_NOERR 19",
    "TEST_GUESTS_EXC_NOERR 20",
    "TEST_GUESTS_EXC_ERR 21",
    "TEST_GUESTS_EXC_NOERR 22",
    "TEST_GUESTS_EXC_NOERR 23",
    "TEST_GUESTS_EXC_NOERR 24",
    "TEST_GUESTS_EXC_NOERR 25",
    "TEST_GUESTS_EXC_NOERR 26",
    "TEST_GUESTS_EXC_NOERR 27",
    "TEST_GUESTS_EXC_NOERR 28",
    "TEST_GUESTS_EXC_ERR 29",
    "TEST_GUESTS_EXC_ERR 30",
    "TEST_GUESTS_EXC_NOERR 31",
    ".purgem TEST_GUESTS_EXC_NOERR",
    ".purgem TEST_GUESTS_EXC_ERR",
    "",
    "test_guests_exc_common:",
    "    push rax",
    "    push rbx",
    "    push rcx",
    "    push rdx",
    "    push rsi",
    "    push rdi",
    "    push rbp",
    "    push r8",
    "    push r9",
    "    push r10",
    "    push r11",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    mov rdi, rsp",
    // RBX is callee-saved: it survives the call and brings the unaligned RSP back.
    "    mov rbx, rsp",
    "    and rsp, -16",
    "    cld",
    "    call {dispatch}",
    "    mov rsp, rbx",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop r11",
    "    pop r10",
    "    pop r9",
    "    pop r8",
    "    pop rbp",
    "    pop rdi",
    "    pop rsi",
    "    pop rdx",
    "    pop rcx",
    "    pop rbx",
    "    pop rax",
    "    add rsp, 16",
    "    iretq",
    "",
    // The stubs' addresses, in vector order, for `install` (global: Rust code in another codegen
    // unit refers to it). `.data.rel.ro`: absolute addresses, which a host (PIE) build of this
    // crate must be able to relocate.
    ".pushsection .data.rel.ro.test_guests_exc_table, \"aw\", %progbits",
    ".p2align 3",
    ".globl test_guests_exc_table",
    "test_guests_exc_table:",
    ".quad test_guests_exc_0, test_guests_exc_1, test_guests_exc_2, test_guests_exc_3",
    ".quad test_guests_exc_4, test_guests_exc_5, test_guests_exc_6, test_guests_exc_7",
    ".quad test_guests_exc_8, test_guests_exc_9, test_guests_exc_10, test_guests_exc_11",
    ".quad test_guests_exc_12, test_guests_exc_13, test_guests_exc_14, test_guests_exc_15",
    ".quad test_guests_exc_16, test_guests_exc_17, test_guests_exc_18, test_guests_exc_19",
    ".quad test_guests_exc_20, test_guests_exc_21, test_guests_exc_22, test_guests_exc_23",
    ".quad test_guests_exc_24, test_guests_exc_25, test_guests_exc_26, test_guests_exc_27",
    ".quad test_guests_exc_28, test_guests_exc_29, test_guests_exc_30, test_guests_exc_31",
    ".popsection",
    ".popsection",
    dispatch = sym dispatch,
);

extern "C" {
    /// Addresses of the 32 stubs above.
    static test_guests_exc_table: [u64; VECTORS];
}

/// Loads the exception IDT (idempotent).
pub fn install() {
    if INSTALLED.load(Ordering::Relaxed) {
        return;
    }
    // SAFETY: the table is defined in the global_asm above, 32 absolute addresses, read-only.
    let handlers = unsafe { &test_guests_exc_table };
    // SAFETY: the IDT is not loaded (INSTALLED is false), so nothing reads it while it changes;
    // the single vCPU means nobody else writes it.
    let gates = unsafe { &mut *IDT.0.get() };
    for (gate, &handler) in gates.iter_mut().zip(handlers) {
        *gate = Gate::interrupt(handler);
    }
    let idtr = DescriptorTablePointer {
        limit: (core::mem::size_of::<[Gate; GATES]>() - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: a static table of 64-bit interrupt gates to the stubs above, which preserve every
    // register and return with IRETQ (or exit the VM).
    unsafe { cpu::lidt(&idtr) };
    INSTALLED.store(true, Ordering::Relaxed);
}

/// Points gate `vector` at `handler` (an interrupt gate: IF is cleared on entry). For
/// [`crate::interrupts`]; loads the exception table first if needed.
///
/// # Safety
/// `handler` must be an entry stub that preserves every register and returns with IRETQ, and
/// interrupts must be off (RFLAGS.IF = 0) or `vector` not raised by anything until the gate is
/// written (the 16-byte write is not atomic).
pub(crate) unsafe fn set_gate(vector: u8, handler: u64) {
    install();
    // SAFETY: single vCPU, and the caller guarantees the CPU does not read this gate meanwhile.
    let gates = unsafe { &mut *IDT.0.get() };
    gates[usize::from(vector)] = Gate::interrupt(handler);
}

/// Whether NMIs are counted and returned from (`true`) or fatal like any other unexpected
/// exception (`false`, the default).
pub fn count_nmis(on: bool) {
    install();
    COUNT_NMIS.store(on, Ordering::SeqCst);
}

/// NMIs counted while [`count_nmis`] was on.
pub fn nmis() -> u64 {
    NMIS.load(Ordering::SeqCst)
}

/// Loads an IDT with limit 0: from now on any exception escalates to #DF and then to a triple
/// fault, which the hypervisor must catch. (The boot state is the same; this makes it certain.)
pub fn load_null() {
    let idtr = DescriptorTablePointer { limit: 0, base: 0 };
    // SAFETY: an empty table is what the boot protocol starts with; the CPU never reads it.
    unsafe { cpu::lidt(&idtr) };
    INSTALLED.store(false, Ordering::Relaxed);
}

/// Runs `op` (one RDMSR or WRMSR) with the #GP skip armed; returns the fault it raised, if any.
fn probe<T>(op: impl FnOnce() -> T) -> Result<T, Fault> {
    install();
    FAULT_VECTOR.store(NO_FAULT, Ordering::SeqCst);
    PROBING.store(true, Ordering::SeqCst);
    let value = op();
    PROBING.store(false, Ordering::SeqCst);
    match FAULT_VECTOR.load(Ordering::SeqCst) {
        NO_FAULT => Ok(value),
        vector => Err(Fault {
            vector: vector as u8,
            error_code: FAULT_ERROR_CODE.load(Ordering::SeqCst),
            rip: FAULT_RIP.load(Ordering::SeqCst),
        }),
    }
}

/// Reads an MSR; `Err` with the #GP if the hypervisor refuses it.
pub fn rdmsr(msr: u32) -> Result<u64, Fault> {
    // SAFETY: a #GP is caught and skipped by the handler armed by `probe`; reading an MSR the
    // hypervisor allows has no side effects on memory.
    probe(|| unsafe { cpu::rdmsr(msr) })
}

/// Writes an MSR; `Err` with the #GP if the hypervisor refuses it.
///
/// # Safety
/// If the hypervisor lets the write through, it changes the CPU state of this VM: the caller must
/// pick an MSR and value that cannot hurt (the tests write MSRs that do not exist).
pub unsafe fn wrmsr(msr: u32, value: u64) -> Result<(), Fault> {
    // SAFETY: the caller vouches for the MSR; a #GP is caught as for `rdmsr`.
    probe(|| unsafe { cpu::wrmsr(msr, value) })
}

/// Runs `op`, which must execute exactly one instruction of `len` bytes that may fault (with
/// any vector), and returns the fault it raised, if any; the handler skips the instruction. For
/// checks that an instruction raises what a real CPU would (#UD, #GP, #PF).
pub fn fault_of<T>(len: u8, op: impl FnOnce() -> T) -> Result<T, Fault> {
    install();
    SKIP_LEN.store(len.into(), Ordering::SeqCst);
    let result = probe(op);
    SKIP_LEN.store(0, Ordering::SeqCst);
    result
}

/// [`SKIP_LEN`] for a [`trap_of`] probe: record the exception, skip nothing.
const TRAP_PROBE: u64 = u64::MAX;

/// Runs `op` with single-step traps expected: the first exception it raises is recorded (for a
/// trap, its RIP is the instruction after the one that trapped) and RFLAGS.TF is cleared in the
/// interrupted context, so that the rest of `op` runs on; returns it, if any.
pub fn trap_of<T>(op: impl FnOnce() -> T) -> Result<T, Fault> {
    install();
    SKIP_LEN.store(TRAP_PROBE, Ordering::SeqCst);
    let result = probe(op);
    SKIP_LEN.store(0, Ordering::SeqCst);
    result
}

/// Entered from the common stub with the saved state; returns to IRETQ or exits the VM.
extern "C" fn dispatch(frame: &mut Frame) {
    if frame.vector == u64::from(NMI) && COUNT_NMIS.load(Ordering::SeqCst) {
        // An NMI pushes no error code and is not a fault: nothing to skip, just return.
        NMIS.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let skip = SKIP_LEN.load(Ordering::SeqCst);
    if skip != 0 && PROBING.load(Ordering::SeqCst) && frame.vector < VECTORS as u64 {
        if FAULT_VECTOR.load(Ordering::SeqCst) == NO_FAULT {
            FAULT_ERROR_CODE.store(frame.error_code, Ordering::SeqCst);
            FAULT_RIP.store(frame.rip, Ordering::SeqCst);
            FAULT_VECTOR.store(frame.vector, Ordering::SeqCst);
        }
        if skip == TRAP_PROBE {
            frame.rflags &= !(1 << 8);
        } else {
            frame.rip += skip;
        }
        return;
    }
    if frame.vector == u64::from(GP) && PROBING.load(Ordering::SeqCst) {
        // SAFETY: RIP is the faulting instruction of this guest, fetched a moment ago through the
        // identity map, so its first two bytes are readable.
        let opcode = unsafe { core::ptr::read_unaligned(frame.rip as *const [u8; 2]) };
        if opcode == [0x0F, 0x32] || opcode == [0x0F, 0x30] {
            FAULT_ERROR_CODE.store(frame.error_code, Ordering::SeqCst);
            FAULT_RIP.store(frame.rip, Ordering::SeqCst);
            FAULT_VECTOR.store(frame.vector, Ordering::SeqCst);
            frame.rip += 2;
            return;
        }
    }
    fatal(frame)
}

fn fatal(frame: &Frame) -> ! {
    println!(
        "unexpected exception {} (vector {}) error_code={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x}",
        name(frame.vector),
        frame.vector,
        frame.error_code,
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.rsp,
    );
    println!(
        "  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi, frame.rbp
    );
    println!(
        "  r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}",
        frame.r8, frame.r9, frame.r10, frame.r11, frame.r12, frame.r13, frame.r14, frame.r15
    );
    guest::exit(EXIT_EXCEPTION)
}

/// The mnemonic of an exception vector.
pub fn name(vector: u64) -> &'static str {
    const NAMES: [&str; VECTORS] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23", "#24", "#25",
        "#26", "#27", "#HV", "#VC", "#SX", "#31",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("?")
}
