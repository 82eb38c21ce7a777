//! External interrupts: IDT gates 32..=255 routed to handlers registered per vector.
//!
//! [`install`] loads the exception IDT of [`crate::idt`] and points every vector from 32 up at a
//! stub of this module; [`claim_reserved`] does the same for 16..=31, which the local APIC can
//! deliver (only 0..=15 are illegal for it, SDM Vol. 3A 11.5.2 "Valid Interrupt Vectors") but
//! which this runtime otherwise treats as exceptions. Each stub pushes its vector and enters one
//! common path that saves every general register and calls [`dispatch`], which:
//! - reads the TSC first (so that latency measurements start as close to delivery as possible),
//! - counts the interrupt per vector ([`count`]),
//! - calls the handler registered with [`register`], if any, with an [`Interrupted`] that says
//!   what was interrupted (RIP, RFLAGS) and when (TSC); vectors without a handler are counted in
//!   [`unhandled`] too.
//!
//! Nothing here sends an EOI: which controller needs one (local APIC, 8259, none for ExtINT) is
//! the handler's business ([`crate::lapic::eoi`], [`crate::pic::eoi`]). A handler runs with
//! IF = 0 (interrupt gates, SDM Vol. 3A 7.12.1.3); it may execute STI to let a higher-priority
//! vector nest over it (the stack is the interrupted one: no IST, CPL 0 throughout).
//!
//! The guests have no SSE state (soft-float target) and the target has no red zone, so saving the
//! general registers is all an interrupt needs. One vCPU: atomics only for the compiler's sake.

use core::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use crate::cpu;
use crate::idt;

/// First vector the stubs cover (the first one the local APIC accepts).
const FIRST_STUB: usize = 16;
/// First vector that is not an exception.
pub const FIRST_EXTERNAL: u8 = 32;
/// Bytes between two stubs (each is aligned to 16; a push and a jmp take at most 10).
const STUB_STRIDE: u64 = 16;

/// What an interrupt interrupted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interrupted {
    /// The vector delivered.
    pub vector: u8,
    /// TSC when the common path started (a few dozen instructions after delivery).
    pub tsc: u64,
    /// The RIP the interrupt will return to: the instruction that had not executed yet.
    pub rip: u64,
    /// The interrupted RFLAGS (IF was 1, or this is not a maskable interrupt).
    pub rflags: u64,
}

/// A handler: runs with interrupts off unless it enables them itself.
pub type Handler = fn(&Interrupted);

static COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
static HANDLERS: [AtomicPtr<()>; 256] = [const { AtomicPtr::new(core::ptr::null_mut()) }; 256];
static UNHANDLED: AtomicU64 = AtomicU64::new(0);
static INSTALLED: AtomicU64 = AtomicU64::new(0);

/// The stack as the common path leaves it for [`dispatch`]: the general registers it pushed,
/// the vector the stub pushed, then the frame the CPU pushed (no error code for interrupts).
#[repr(C)]
struct Frame {
    regs: [u64; 15],
    vector: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

// The stubs, 16 bytes apart from `test_guests_irq_stubs`, vector 16 first. AT&T syntax: `pushq
// $sym` of an absolute symbol is an immediate (in Intel syntax a bare symbol is a memory operand).
core::arch::global_asm!(
    ".pushsection .text.test_guests_irq, \"ax\", %progbits",
    ".p2align 4",
    ".globl test_guests_irq_stubs",
    "test_guests_irq_stubs:",
    ".set test_guests_irq_vec, 16",
    ".rept 240",
    ".p2align 4",
    "    pushq $test_guests_irq_vec",
    "    jmp test_guests_irq_common",
    ".set test_guests_irq_vec, test_guests_irq_vec + 1",
    ".endr",
    "test_guests_irq_common:",
    "    pushq %rax",
    "    pushq %rbx",
    "    pushq %rcx",
    "    pushq %rdx",
    "    pushq %rsi",
    "    pushq %rdi",
    "    pushq %rbp",
    "    pushq %r8",
    "    pushq %r9",
    "    pushq %r10",
    "    pushq %r11",
    "    pushq %r12",
    "    pushq %r13",
    "    pushq %r14",
    "    pushq %r15",
    "    movq %rsp, %rdi",
    // RBX is callee-saved: it survives the call and brings the unaligned RSP back.
    "    movq %rsp, %rbx",
    "    andq $-16, %rsp",
    "    cld",
    "    call {dispatch}",
    "    movq %rbx, %rsp",
    "    popq %r15",
    "    popq %r14",
    "    popq %r13",
    "    popq %r12",
    "    popq %r11",
    "    popq %r10",
    "    popq %r9",
    "    popq %r8",
    "    popq %rbp",
    "    popq %rdi",
    "    popq %rsi",
    "    popq %rdx",
    "    popq %rcx",
    "    popq %rbx",
    "    popq %rax",
    "    addq $8, %rsp",
    "    iretq",
    ".popsection",
    dispatch = sym dispatch,
    options(att_syntax),
);

extern "C" {
    /// The first stub (vector 16); the stub of vector v is `16 * (v - 16)` bytes further.
    static test_guests_irq_stubs: [u8; 0];
}

fn stub(vector: u8) -> u64 {
    // Only the label's address is taken (no unsafe needed); nothing is read through it.
    let base = core::ptr::addr_of!(test_guests_irq_stubs) as u64;
    base + (u64::from(vector) - FIRST_STUB as u64) * STUB_STRIDE
}

fn set_gates(vectors: core::ops::RangeInclusive<u8>) {
    disable();
    for vector in vectors {
        // SAFETY: the stubs above save every register and return with IRETQ; interrupts are
        // off while the gates change.
        unsafe { idt::set_gate(vector, stub(vector)) };
    }
}

/// Loads the IDT with the exception gates and gates 32..=255 to this module (idempotent).
/// Leaves interrupts disabled.
pub fn install() {
    if INSTALLED.swap(1, Ordering::SeqCst) == 0 {
        set_gates(FIRST_EXTERNAL..=255);
    }
    disable();
}

/// Also routes vectors 16..=31 here instead of to the exception handler. For guests that expect
/// the local APIC to deliver such vectors (a real CPU delivers them through the IDT as
/// interrupts). The exceptions of those vectors (#MF, #AC, #MC, #XM, #VE, #CP, ...) cannot occur
/// in the test guests, which use no x87 state, no alignment checking and no CET.
pub fn claim_reserved() {
    install();
    set_gates(FIRST_STUB as u8..=FIRST_EXTERNAL - 1);
}

/// Sets (or with `None` removes) the handler of `vector`.
pub fn register(vector: u8, handler: Option<Handler>) {
    let ptr = handler.map_or(core::ptr::null_mut(), |h| h as *mut ());
    HANDLERS[usize::from(vector)].store(ptr, Ordering::SeqCst);
}

/// Interrupts delivered at `vector` so far.
pub fn count(vector: u8) -> u64 {
    COUNTS[usize::from(vector)].load(Ordering::SeqCst)
}

/// Interrupts delivered at any vector in `vectors` so far.
pub fn count_range(vectors: core::ops::RangeInclusive<u8>) -> u64 {
    vectors.map(count).sum()
}

/// Interrupts delivered at vectors without a handler.
pub fn unhandled() -> u64 {
    UNHANDLED.load(Ordering::SeqCst)
}

/// Entered from the common path with the saved state.
extern "C" fn dispatch(frame: &mut Frame) {
    let tsc = cpu::rdtsc();
    let vector = (frame.vector & 0xFF) as u8;
    COUNTS[usize::from(vector)].fetch_add(1, Ordering::SeqCst);
    let handler = HANDLERS[usize::from(vector)].load(Ordering::SeqCst);
    if handler.is_null() {
        UNHANDLED.fetch_add(1, Ordering::SeqCst);
        return;
    }
    // SAFETY: the only non-null values stored are `Handler`s cast to pointers in `register`.
    let handler: Handler = unsafe { core::mem::transmute::<*mut (), Handler>(handler) };
    handler(&Interrupted {
        vector,
        tsc,
        rip: frame.rip,
        rflags: frame.rflags,
    });
}

/// STI: maskable interrupts are taken from the instruction after the next one on (the STI
/// shadow, SDM Vol. 2B "STI").
#[inline(always)]
pub fn enable() {
    // SAFETY: changes RFLAGS.IF only; the handlers are installed by whoever enables.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
}

/// CLI.
#[inline(always)]
pub fn disable() {
    // SAFETY: changes RFLAGS.IF only.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
}

/// Whether RFLAGS.IF is set.
#[inline(always)]
pub fn enabled() -> bool {
    let flags: u64;
    // SAFETY: reads RFLAGS through the stack.
    unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) flags, options(nomem)) };
    flags & (1 << 9) != 0
}

/// `STI; HLT`: waits for the next interrupt with no window for it to be missed between the two
/// (the STI shadow covers the HLT, SDM Vol. 2B "STI"), then returns with interrupts enabled.
#[inline(always)]
pub fn enable_and_wait() {
    // SAFETY: changes RFLAGS.IF and waits; the handlers are installed by whoever calls this.
    unsafe { core::arch::asm!("sti", "hlt", options(nomem, nostack)) };
}

/// Waits in HLT (with interrupts enabled in between) until `done()` holds, checked with
/// interrupts off so that no interrupt between the check and the HLT is missed. Returns with
/// interrupts disabled.
pub fn wait_until(mut done: impl FnMut() -> bool) {
    loop {
        disable();
        if done() {
            return;
        }
        enable_and_wait();
    }
}

/// Runs `f` with interrupts disabled, restoring IF afterwards.
pub fn without<R>(f: impl FnOnce() -> R) -> R {
    let was = enabled();
    disable();
    let result = f();
    if was {
        enable();
    }
    result
}
