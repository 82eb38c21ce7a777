//! Emulating a guest's access to an MMIO device page (the local APIC at 0xFEE00000, the IOAPIC
//! at 0xFEC00000). The CPU reports such an access as an EPT violation that names the
//! guest-physical address but not the data, the size or the register: the hypervisor has to read
//! the instruction at the guest's RIP, decode it, and do its memory access against the device.
//!
//! This module owns those three steps, each host-testable:
//! - [`fetch`]: the instruction bytes at CS:RIP, through the guest's own page tables.
//! - [`decode`]: an x86 instruction (decoded by `iced-x86`, never by hand here) turned into a
//!   small [`MmioInsn`] that says which access it makes and what it does with the data.
//! - [`emulate`]: that access done against a device callback, with the instruction's effect on
//!   the guest's general-purpose registers and arithmetic flags.
//!
//! It must not touch anything else: it never writes guest memory (it only reads the instruction
//! and the page tables, through [`GuestMemory`]), never reads or writes the VMCS (the kernel
//! passes in the state in a [`CpuState`] and implements [`Gprs`] over its register file, RSP
//! through the VMCS), never advances RIP (the kernel adds [`MmioInsn::len`] when [`emulate`]
//! says [`Step::Done`]), and never injects an exception (a [`FetchError::PageFault`] says which
//! one to inject). Every failure is a typed error that a per-VM log line can print ([`Report`]):
//! a guest that does something this module cannot emulate gets a clear report, never a panic.
//!
//! Supported modes ([`Mode`]): 64-bit mode with 4-level paging; 32-bit protected mode (CS.D=1)
//! with paging off or with PAE paging. Real mode, 16-bit protected mode, compatibility mode,
//! 32-bit (non-PAE) paging and 5-level paging are [`UnsupportedMode`]. [`decode`] itself takes
//! 16-, 32- or 64-bit code.
//!
//! Supported instructions ([`MmioOp`]), the forms Linux's `readX`/`writeX`, its APIC and IOAPIC
//! code and firmware use on MMIO, at operand sizes 8, 16, 32 and 64 bits:
//! `mov` load and store (register or immediate source, and the `A0`-`A3` moffs forms),
//! `movzx`/`movsx`/`movsxd` loads, `add`/`sub`/`and`/`or`/`xor` with memory as destination or
//! source, `cmp`/`test` against memory, `xchg` with memory, and `stos` with or without REP (one
//! element per call: see [`MmioOp::Stos`]). Everything else that touches memory (`movs`, `lods`,
//! `inc`, `adc`, `bt`, SSE/AVX moves, ...) is [`DecodeError::Unsupported`].

use core::fmt;

use iced_x86::{Decoder, DecoderError, DecoderOptions, MemorySize, Mnemonic, OpKind, Register};

use crate::memory::{AccessError, GuestMemory, PhysMemory};
use crate::paging;

/// The longest x86 instruction (SDM Vol. 2, 2.3.11: longer raises #GP).
pub const MAX_INSN_LEN: usize = 15;

const PAGE_SIZE: u64 = 4096;

/// A guest's general-purpose registers, numbered as in the SDM's register encoding (Vol. 2,
/// Table 2-2 / 3-1): 0 RAX, 1 RCX, 2 RDX, 3 RBX, 4 RSP, 5 RBP, 6 RSI, 7 RDI, 8-15 R8-R15.
/// The kernel implements it for its register file (RSP through the VMCS).
pub trait Gprs {
    fn gpr(&self, n: u8) -> u64;
    fn set_gpr(&mut self, n: u8, v: u64);
}

const RAX: u8 = 0;
const RCX: u8 = 1;
const RDI: u8 = 7;

// ---------------------------------------------------------------------------------------------
// Fetch
// ---------------------------------------------------------------------------------------------

/// The guest state that finding the instruction needs, as the VMCS holds it at the exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    pub rip: u64,
    pub cs_base: u64,
    /// CS access rights in the VMCS's format (SDM Vol. 3C, "Guest Register State", table
    /// "Format of Access Rights"): bit 13 L (64-bit code), bit 14 D/B (32-bit code).
    pub cs_access_rights: u32,
    /// The current privilege level (SS.DPL).
    pub cpl: u8,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// The guest's PDPTEs (VMCS fields GUEST_PDPTE0-3, saved at the exit when EPT is on). Under
    /// PAE paging the CPU translates through these registers, not through the table in memory
    /// at CR3, which the guest may have changed since it loaded CR3 (SDM Vol. 3A, 4.4.1).
    pub pdptes: [u64; 4],
}

const CR0_PE: u64 = 1 << 0;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const CR4_SMEP: u64 = 1 << 20;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const CS_L: u32 = 1 << 13;
const CS_D: u32 = 1 << 14;

/// The execution modes [`fetch`] supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 64-bit mode (EFER.LMA, CS.L) with 4-level paging.
    Long64,
    /// 32-bit protected mode (CS.D) with paging off: linear addresses are physical.
    Protected32,
    /// 32-bit protected mode with PAE paging.
    Protected32Pae,
}

impl Mode {
    /// The code size to decode with.
    pub fn bitness(self) -> u32 {
        match self {
            Mode::Long64 => 64,
            Mode::Protected32 | Mode::Protected32Pae => 32,
        }
    }
}

/// An execution mode that [`fetch`] does not support.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnsupportedMode {
    /// CR0.PE = 0.
    Real,
    /// Protected mode with a 16-bit code segment (CS.D = 0).
    Code16,
    /// IA-32e mode with CS.L = 0.
    Compatibility,
    /// CR0.PG = 1 with CR4.PAE = 0 (2-level 32-bit paging).
    Paging32,
    /// CR4.LA57 (5-level paging): [`paging::translate`] walks 4 levels.
    FiveLevel,
}

impl fmt::Display for UnsupportedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnsupportedMode::Real => "real mode",
            UnsupportedMode::Code16 => "16-bit protected mode",
            UnsupportedMode::Compatibility => "compatibility mode",
            UnsupportedMode::Paging32 => "32-bit paging without PAE",
            UnsupportedMode::FiveLevel => "5-level paging",
        })
    }
}

/// The guest's execution mode, from CR0, CR4, EFER and CS (SDM Vol. 3A, 2.2 and 4.1.1).
pub fn mode(cpu: &CpuState) -> Result<Mode, UnsupportedMode> {
    if cpu.efer & EFER_LMA != 0 {
        if cpu.cr4 & CR4_LA57 != 0 {
            return Err(UnsupportedMode::FiveLevel);
        }
        return if cpu.cs_access_rights & CS_L != 0 {
            Ok(Mode::Long64)
        } else {
            Err(UnsupportedMode::Compatibility)
        };
    }
    if cpu.cr0 & CR0_PE == 0 {
        return Err(UnsupportedMode::Real);
    }
    if cpu.cs_access_rights & CS_D == 0 {
        return Err(UnsupportedMode::Code16);
    }
    match (cpu.cr0 & CR0_PG != 0, cpu.cr4 & CR4_PAE != 0) {
        (false, _) => Ok(Mode::Protected32),
        (true, true) => Ok(Mode::Protected32Pae),
        (true, false) => Err(UnsupportedMode::Paging32),
    }
}

/// Why the instruction bytes could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchError {
    /// The guest's page tables do not map the code: inject #PF with CR2 = `linear` and this
    /// error code (SDM Vol. 3A, 4.7; bit 4, I/D, is set as the CPU sets it for a fetch).
    PageFault { linear: u64, error_code: u32 },
    /// A page (a page table or the code) is held by the memory engine: fault it in and retry.
    Unavailable { gpa: u64 },
    /// A paging-structure entry lies outside the VM's memory.
    TableOutsideMemory { gpa: u64 },
    /// The code itself lies outside the VM's memory (executing from a device page, or a ROM the
    /// VM does not have).
    CodeOutsideMemory { gpa: u64 },
    /// The guest runs in a mode this module does not support.
    Unsupported(UnsupportedMode),
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::PageFault { linear, error_code } => write!(
                f,
                "the code at {linear:#x} is not mapped (#PF, error code {error_code:#x})"
            ),
            FetchError::Unavailable { gpa } => {
                write!(f, "the page at gpa={gpa:#x} is held by the memory engine")
            }
            FetchError::TableOutsideMemory { gpa } => write!(
                f,
                "the guest's page tables point outside its memory (gpa={gpa:#x})"
            ),
            FetchError::CodeOutsideMemory { gpa } => {
                write!(f, "the code lies outside the VM's memory (gpa={gpa:#x})")
            }
            FetchError::Unsupported(m) => write!(f, "{m} is not supported"),
        }
    }
}

/// The bytes at the guest's RIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fetched {
    bytes: [u8; MAX_INSN_LEN],
    len: u8,
    /// The code size to decode with.
    pub bitness: u32,
    /// Why fewer than [`MAX_INSN_LEN`] bytes were read: the code runs up to a page boundary and
    /// the next page could not be read. That matters only if the instruction continues there,
    /// which [`Fetched::decode`] finds out.
    pub stopped: Option<FetchError>,
}

impl Fetched {
    /// The bytes read (1 to 15).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Decodes the bytes; an instruction that runs into the page that could not be read fails
    /// with that page's [`FetchError`] (the caller injects the #PF or faults the page in, as the
    /// CPU's own fetch would have), not with [`DecodeError::Truncated`].
    pub fn decode(&self) -> Result<MmioInsn, MmioError> {
        match (decode(self.bytes(), self.bitness), self.stopped) {
            (Err(DecodeError::Truncated { .. }), Some(stopped)) => Err(MmioError::Fetch(stopped)),
            (result, _) => result.map_err(MmioError::Decode),
        }
    }
}

/// Reads up to [`MAX_INSN_LEN`] bytes of the instruction at CS:RIP, translating the linear
/// address through the guest's page tables as an instruction fetch.
///
/// The bytes may cross into the next page; if that page cannot be read, the bytes up to the
/// boundary are returned with [`Fetched::stopped`] set, because a short instruction decodes
/// from those alone (and the CPU would not have touched the next page for it). A failure on
/// the first byte's page is an error.
///
/// Permissions are checked as for a read by the current privilege level: the XD bit and SMEP
/// are not, because the CPU has just fetched and executed this very instruction up to its data
/// access. (If another vCPU changed the mapping since, this reads what the tables map now, as
/// any re-walk must.) Segment limits are not checked, for the same reason.
pub fn fetch(
    mem: &GuestMemory,
    phys: &impl PhysMemory,
    cpu: &CpuState,
) -> Result<Fetched, FetchError> {
    let mode = mode(cpu).map_err(FetchError::Unsupported)?;
    // In 64-bit mode the CS base is treated as 0 whatever the register holds (SDM Vol. 3A,
    // 3.4.4); outside it the linear address is 32 bits and wraps at 4 GiB.
    let (linear, wrap) = match mode {
        Mode::Long64 => (cpu.rip, u64::MAX),
        Mode::Protected32 | Mode::Protected32Pae => {
            (cpu.cs_base.wrapping_add(cpu.rip) & 0xffff_ffff, 0xffff_ffff)
        }
    };
    let mut out = Fetched {
        bytes: [0; MAX_INSN_LEN],
        len: 0,
        bitness: mode.bitness(),
        stopped: None,
    };
    let mut done = 0;
    while done < MAX_INSN_LEN {
        let at = linear.wrapping_add(done as u64) & wrap;
        let n = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(MAX_INSN_LEN - done);
        let read = translate_fetch(mem, phys, cpu, mode, at).and_then(|gpa| {
            mem.read(phys, gpa, &mut out.bytes[done..done + n])
                .map_err(|e| match e {
                    AccessError::Unavailable { gpa } => FetchError::Unavailable { gpa },
                    AccessError::OutOfRange(r) => FetchError::CodeOutsideMemory { gpa: r.gpa },
                })
        });
        match read {
            Ok(()) => done += n,
            Err(e) if done == 0 => return Err(e),
            Err(e) => {
                out.stopped = Some(e);
                break;
            }
        }
    }
    out.len = done as u8;
    Ok(out)
}

/// The guest-physical address of the code at `linear`.
fn translate_fetch(
    mem: &GuestMemory,
    phys: &impl PhysMemory,
    cpu: &CpuState,
    mode: Mode,
    linear: u64,
) -> Result<u64, FetchError> {
    let user = cpu.cpl == 3;
    let walked = match mode {
        Mode::Protected32 => return Ok(linear),
        Mode::Long64 => paging::translate(
            mem,
            phys,
            cpu.cr3,
            linear,
            paging::Access {
                write: false,
                user,
                write_protect: cpu.cr0 & CR0_WP != 0,
            },
        ),
        Mode::Protected32Pae => translate_pae(mem, phys, &cpu.pdptes, linear, user),
    };
    walked.map_err(|e| match e {
        paging::WalkError::PageFault { error_code } => {
            // I/D (bit 4) is set for a fetch under PAE or 4-level paging when NX or SMEP is
            // enabled, and only then (SDM Vol. 3A, 4.7).
            let id = cpu.efer & EFER_NXE != 0 || cpu.cr4 & CR4_SMEP != 0;
            FetchError::PageFault {
                linear,
                error_code: error_code | (u32::from(id) << 4),
            }
        }
        paging::WalkError::Table(AccessError::Unavailable { gpa }) => {
            FetchError::Unavailable { gpa }
        }
        paging::WalkError::Table(AccessError::OutOfRange(r)) => {
            FetchError::TableOutsideMemory { gpa: r.gpa }
        }
    })
}

/// Translates a read of `linear` under PAE paging (SDM Vol. 3A, 4.4): the PDPTE registers, then
/// the page directory and (unless a 2 MiB page) the page table, each with 64-bit entries.
/// PDPTEs carry no R/W or U/S bits; a read needs U/S at every other level for CPL 3.
fn translate_pae(
    mem: &GuestMemory,
    phys: &impl PhysMemory,
    pdptes: &[u64; 4],
    linear: u64,
    user: bool,
) -> Result<u64, paging::WalkError> {
    const PRESENT: u64 = 1 << 0;
    const USER: u64 = 1 << 2;
    const PAGE_SIZE_BIT: u64 = 1 << 7;
    const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
    let fault = |protection: bool| paging::WalkError::PageFault {
        error_code: u32::from(protection) | (u32::from(user) << 2),
    };
    let entry = |table: u64, index: u64| {
        let mut raw = [0u8; 8];
        mem.read(phys, (table & ADDRESS_MASK) + index * 8, &mut raw)
            .map(|()| u64::from_le_bytes(raw))
            .map_err(paging::WalkError::Table)
    };
    let pdpte = pdptes[((linear >> 30) & 3) as usize];
    if pdpte & PRESENT == 0 {
        return Err(fault(false));
    }
    let pde = entry(pdpte, (linear >> 21) & 0x1ff)?;
    if pde & PRESENT == 0 {
        return Err(fault(false));
    }
    if pde & PAGE_SIZE_BIT != 0 {
        if user && pde & USER == 0 {
            return Err(fault(true));
        }
        return Ok((pde & ADDRESS_MASK & !0x1f_ffff) | (linear & 0x1f_ffff));
    }
    let pte = entry(pde, (linear >> 12) & 0x1ff)?;
    if pte & PRESENT == 0 {
        return Err(fault(false));
    }
    if user && (pde & pte & USER) == 0 {
        return Err(fault(true));
    }
    Ok((pte & ADDRESS_MASK) | (linear & 0xfff))
}

// ---------------------------------------------------------------------------------------------
// Decode
// ---------------------------------------------------------------------------------------------

/// A general-purpose register operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reg {
    /// The register number, as [`Gprs`] numbers them.
    pub num: u8,
    /// The operand size in bytes: 1, 2, 4 or 8.
    pub size: u8,
    /// AH, CH, DH or BH: bits 15:8 of register `num` (0-3). Only encodable without a REX
    /// prefix; with one, the same encodings name SPL, BPL, SIL, DIL (SDM Vol. 2, 2.2.1.2).
    pub high8: bool,
}

/// A source operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    Reg(Reg),
    /// An immediate, already sign-extended to the operand size and truncated to it (SDM
    /// Vol. 2, 2.2.1.5: imm8 and imm32 are sign-extended).
    Imm(u64),
}

/// How a load widens the value read into its destination register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extend {
    /// `mov`: the destination is as wide as the access.
    None,
    /// `movzx`.
    Zero,
    /// `movsx`, `movsxd`.
    Sign,
}

/// The arithmetic or logic operation of an instruction that reads memory and sets flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AluOp {
    Add,
    Sub,
    And,
    Or,
    Xor,
    /// `sub` without writing the result.
    Cmp,
    /// `and` without writing the result.
    Test,
}

impl AluOp {
    /// Whether the result is written to the destination (not for `cmp` and `test`).
    pub fn writes(self) -> bool {
        !matches!(self, AluOp::Cmp | AluOp::Test)
    }
}

/// What an instruction does with its memory operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioOp {
    /// Reads memory into `dst`: `mov r, m`, `movzx`, `movsx`, `movsxd`.
    Load { dst: Reg, extend: Extend },
    /// Writes `src` to memory: `mov m, r` and `mov m, imm`.
    Store { src: Operand },
    /// `op m, src`: reads memory, computes, writes the result back (unless `cmp`/`test`) and
    /// sets the flags.
    AluMem { op: AluOp, src: Operand },
    /// `op r, m`: reads memory as the source, writes `dst` (unless `cmp`) and sets the flags.
    AluReg { op: AluOp, dst: Reg },
    /// `xchg m, r`: reads memory, writes `reg`'s value to it, loads the old value into `reg`.
    Xchg { reg: Reg },
    /// `stos`: writes AL/AX/EAX/RAX to ES:rDI and steps rDI, in an address size of
    /// `addr_size` bytes. With REP, [`emulate`] does one element per call and counts rCX down;
    /// it says [`Step::Again`] while elements are left, and the guest re-executes the
    /// instruction, so that each element reaches whatever is at its own address (the next one
    /// may be RAM, which the CPU then writes itself, or another device).
    Stos { addr_size: u8, rep: bool },
}

/// A decoded instruction that accesses MMIO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioInsn {
    pub op: MmioOp,
    /// The size of the memory access in bytes: 1, 2, 4 or 8.
    pub size: u8,
    /// The instruction's length: the caller adds it to RIP when it is done.
    pub len: u8,
    pub mnemonic: Mnemonic,
}

/// Why bytes could not be decoded into an [`MmioInsn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The code size is not 16, 32 or 64.
    Bitness(u32),
    /// The bytes end inside an instruction (`len` bytes were given).
    Truncated { len: usize },
    /// Not a valid instruction.
    Invalid,
    /// A valid instruction that does not access memory.
    NoMemoryOperand(Mnemonic),
    /// An instruction that accesses memory in a form not emulated here.
    Unsupported(Mnemonic),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Bitness(b) => write!(f, "{b}-bit code is not x86"),
            DecodeError::Truncated { len } => {
                write!(f, "the instruction continues past the {len} bytes read")
            }
            DecodeError::Invalid => f.write_str("not a valid instruction"),
            DecodeError::NoMemoryOperand(m) => match name(*m) {
                Some(n) => write!(f, "`{n}` does not access memory"),
                None => f.write_str("the instruction does not access memory"),
            },
            DecodeError::Unsupported(m) => match name(*m) {
                Some(n) => write!(f, "`{n}` is not emulated on MMIO"),
                None => f.write_str("the instruction is not emulated on MMIO"),
            },
        }
    }
}

/// Decodes the instruction at the start of `bytes` (at most [`MAX_INSN_LEN`] are looked at) as
/// `bitness`-bit code (16, 32 or 64).
/// Decodes one instruction so that iced-x86 builds its decoder tables, which it does lazily on
/// first use: some 650 000 instructions (160 ms under Bochs), which the kernel pays at boot
/// rather than inside the quantum of the first guest that touches a device page.
pub fn warm_up() -> bool {
    decode(&[0x8b, 0x07], 64).is_ok() // mov eax, [rdi]
}

pub fn decode(bytes: &[u8], bitness: u32) -> Result<MmioInsn, DecodeError> {
    let bytes = &bytes[..bytes.len().min(MAX_INSN_LEN)];
    let mut decoder = Decoder::try_new(bitness, bytes, DecoderOptions::NONE)
        .map_err(|_| DecodeError::Bitness(bitness))?;
    let insn = decoder.decode();
    match decoder.last_error() {
        DecoderError::None => {}
        DecoderError::NoMoreBytes => return Err(DecodeError::Truncated { len: bytes.len() }),
        _ => return Err(DecodeError::Invalid),
    }
    let mnemonic = insn.mnemonic();
    let unsupported = DecodeError::Unsupported(mnemonic);
    let kinds = [insn.op0_kind(), insn.op1_kind()];
    let count = (insn.op_count() as usize).min(kinds.len());
    if !(0..insn.op_count()).any(|i| is_memory(insn.op_kind(i))) {
        return Err(DecodeError::NoMemoryOperand(mnemonic));
    }
    // Only the plain integer sizes: this also refuses far pointers, descriptors and vectors.
    let size = match insn.memory_size() {
        MemorySize::UInt8 | MemorySize::Int8 => 1,
        MemorySize::UInt16 | MemorySize::Int16 => 2,
        MemorySize::UInt32 | MemorySize::Int32 => 4,
        MemorySize::UInt64 | MemorySize::Int64 => 8,
        _ => return Err(unsupported),
    };
    let reg = |i: u32| gpr(insn.op_register(i)).ok_or(unsupported);
    // The source operand `i` of an instruction whose other operand is memory of `size` bytes.
    let source = |i: u32| match insn.op_kind(i) {
        OpKind::Register => reg(i).map(Operand::Reg),
        k if is_immediate(k) => insn
            .try_immediate(i)
            .map(|v| Operand::Imm(v & mask(size)))
            .map_err(|_| unsupported),
        _ => Err(unsupported),
    };
    let alu = match mnemonic {
        Mnemonic::Add => Some(AluOp::Add),
        Mnemonic::Sub => Some(AluOp::Sub),
        Mnemonic::And => Some(AluOp::And),
        Mnemonic::Or => Some(AluOp::Or),
        Mnemonic::Xor => Some(AluOp::Xor),
        Mnemonic::Cmp => Some(AluOp::Cmp),
        Mnemonic::Test => Some(AluOp::Test),
        _ => None,
    };
    let kinds = &kinds[..count];
    let op = if let Some(op) = alu {
        match kinds {
            [OpKind::Memory, _] => MmioOp::AluMem {
                op,
                src: source(1)?,
            },
            [OpKind::Register, OpKind::Memory] => MmioOp::AluReg { op, dst: reg(0)? },
            _ => return Err(unsupported),
        }
    } else {
        let load = |extend| reg(0).map(|dst| MmioOp::Load { dst, extend });
        match (mnemonic, kinds) {
            (Mnemonic::Mov, [OpKind::Memory, _]) => MmioOp::Store { src: source(1)? },
            (Mnemonic::Mov, [OpKind::Register, OpKind::Memory]) => load(Extend::None)?,
            (Mnemonic::Movzx, [OpKind::Register, OpKind::Memory]) => load(Extend::Zero)?,
            (Mnemonic::Movsx | Mnemonic::Movsxd, [OpKind::Register, OpKind::Memory]) => {
                load(Extend::Sign)?
            }
            // XCHG with memory is one encoding (86 /r, 87 /r) whichever order it is written in.
            (Mnemonic::Xchg, [OpKind::Memory, OpKind::Register]) => MmioOp::Xchg { reg: reg(1)? },
            (Mnemonic::Xchg, [OpKind::Register, OpKind::Memory]) => MmioOp::Xchg { reg: reg(0)? },
            (Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq, [k, _]) => {
                let addr_size = match k {
                    OpKind::MemoryESDI => 2,
                    OpKind::MemoryESEDI => 4,
                    OpKind::MemoryESRDI => 8,
                    _ => return Err(unsupported),
                };
                // F2 (REPNE) repeats STOS as F3 does.
                let rep = insn.has_rep_prefix() || insn.has_repne_prefix();
                MmioOp::Stos { addr_size, rep }
            }
            _ => return Err(unsupported),
        }
    };
    // Register operands are as wide as the access, except a widening load's destination. iced
    // guarantees it; checked so that a mapping mistake here is a typed error, not a bad access.
    let fits = match op {
        MmioOp::Load {
            dst,
            extend: Extend::None,
        } => dst.size == size,
        MmioOp::Load { dst, .. } => dst.size >= size,
        MmioOp::Store {
            src: Operand::Reg(r),
        }
        | MmioOp::AluMem {
            src: Operand::Reg(r),
            ..
        }
        | MmioOp::AluReg { dst: r, .. }
        | MmioOp::Xchg { reg: r } => r.size == size,
        MmioOp::Store { .. } | MmioOp::AluMem { .. } | MmioOp::Stos { .. } => true,
    };
    if !fits {
        return Err(unsupported);
    }
    Ok(MmioInsn {
        op,
        size,
        len: insn.len() as u8,
        mnemonic,
    })
}

fn is_memory(kind: OpKind) -> bool {
    matches!(
        kind,
        OpKind::Memory
            | OpKind::MemorySegSI
            | OpKind::MemorySegESI
            | OpKind::MemorySegRSI
            | OpKind::MemorySegDI
            | OpKind::MemorySegEDI
            | OpKind::MemorySegRDI
            | OpKind::MemoryESDI
            | OpKind::MemoryESEDI
            | OpKind::MemoryESRDI
    )
}

fn is_immediate(kind: OpKind) -> bool {
    matches!(
        kind,
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

/// The general-purpose register `r` names, or `None` for any other register. iced numbers each
/// size's registers in the SDM's order (RAX, RCX, RDX, RBX, RSP, ...) except the 8-bit ones,
/// which run AL, CL, DL, BL, AH, CH, DH, BH, SPL, BPL, SIL, DIL, R8L...
fn gpr(r: Register) -> Option<Reg> {
    let at = |first: Register| (r as u32).wrapping_sub(first as u32);
    let reg = |num: u32, size: u8, high8: bool| Reg {
        num: num as u8,
        size,
        high8,
    };
    Some(match at(Register::AL) {
        i @ 0..=3 => reg(i, 1, false),
        i @ 4..=7 => reg(i - 4, 1, true),
        i @ 8..=19 => reg(i - 4, 1, false),
        _ => match (at(Register::AX), at(Register::EAX), at(Register::RAX)) {
            (i @ 0..=15, _, _) => reg(i, 2, false),
            (_, i @ 0..=15, _) => reg(i, 4, false),
            (_, _, i @ 0..=15) => reg(i, 8, false),
            _ => return None,
        },
    })
}

// iced's register numbering that `gpr` relies on.
const _: () = {
    assert!(Register::BH as u32 - Register::AL as u32 == 7);
    assert!(Register::R15L as u32 - Register::AL as u32 == 19);
    assert!(Register::R15W as u32 - Register::AX as u32 == 15);
    assert!(Register::R15D as u32 - Register::EAX as u32 == 15);
    assert!(Register::R15 as u32 - Register::RAX as u32 == 15);
};

// ---------------------------------------------------------------------------------------------
// Emulate
// ---------------------------------------------------------------------------------------------

/// One access to the device, at the guest-physical address of the EPT violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceAccess {
    /// Read `size` bytes; the callback returns them in the low bytes of its value.
    Read { gpa: u64, size: u8 },
    /// Write the low `size` bytes of `value` (the rest are zero).
    Write { gpa: u64, size: u8, value: u64 },
}

/// What the caller does with RIP after [`emulate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Step {
    /// The instruction is complete: advance RIP by [`MmioInsn::len`].
    Done,
    /// A REP STOS has elements left: resume the guest at the same RIP.
    Again,
}

// RFLAGS bits (SDM Vol. 1, 3.4.3).
const CF: u64 = 1 << 0;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const DF: u64 = 1 << 10;
const OF: u64 = 1 << 11;
const ARITHMETIC_FLAGS: u64 = CF | PF | AF | ZF | SF | OF;

/// Does `insn`'s access at `gpa` against `device` and applies its effect to the registers and
/// RFLAGS. The device sees at most one read and one write, in the instruction's order; if it
/// fails, its error is returned and the registers and flags are unchanged (a write it refused
/// may follow a read it did). LOCK and XCHG's implicit lock are honoured by the caller holding
/// the device for the whole call, which `&mut` on `device` already gives.
///
/// `gpa` is taken as the first byte of the access: an access that starts in RAM and runs into
/// a device page (which the CPU reports at the page boundary) is the caller's to refuse.
pub fn emulate<E>(
    insn: &MmioInsn,
    regs: &mut impl Gprs,
    rflags: &mut u64,
    gpa: u64,
    device: &mut impl FnMut(DeviceAccess) -> Result<u64, E>,
) -> Result<Step, E> {
    let size = insn.size;
    let mut read = || device(DeviceAccess::Read { gpa, size }).map(|v| v & mask(size));
    match insn.op {
        MmioOp::Load { dst, extend } => {
            let v = read()?;
            let v = match extend {
                Extend::None | Extend::Zero => v,
                Extend::Sign => sign_extend(v, size),
            };
            write_reg(regs, dst, v);
        }
        MmioOp::Store { src } => {
            let value = operand(regs, src, size);
            device(DeviceAccess::Write { gpa, size, value })?;
        }
        MmioOp::AluMem { op, src } => {
            let m = read()?;
            let (result, flags) = alu(op, m, operand(regs, src, size), size);
            if op.writes() {
                device(DeviceAccess::Write {
                    gpa,
                    size,
                    value: result,
                })?;
            }
            *rflags = (*rflags & !ARITHMETIC_FLAGS) | flags;
        }
        MmioOp::AluReg { op, dst } => {
            let m = read()?;
            let (result, flags) = alu(op, read_reg(regs, dst), m, size);
            if op.writes() {
                write_reg(regs, dst, result);
            }
            *rflags = (*rflags & !ARITHMETIC_FLAGS) | flags;
        }
        MmioOp::Xchg { reg } => {
            let old = read()?;
            let value = read_reg(regs, reg);
            device(DeviceAccess::Write { gpa, size, value })?;
            write_reg(regs, reg, old);
        }
        MmioOp::Stos { addr_size, rep } => {
            let count = Reg {
                num: RCX,
                size: addr_size,
                high8: false,
            };
            let dest = Reg { num: RDI, ..count };
            // REP with rCX = 0 does nothing (the CPU would not have exited for it).
            let left = read_reg(regs, count);
            if rep && left == 0 {
                return Ok(Step::Done);
            }
            let value = regs.gpr(RAX) & mask(size);
            device(DeviceAccess::Write { gpa, size, value })?;
            // rDI and rCX change in the address size; a 32-bit one is written as any 32-bit
            // register, zero-extended (SDM Vol. 2, STOS and REP; Vol. 1, 3.4.1.1).
            let rdi = read_reg(regs, dest);
            let step = u64::from(size);
            let rdi = if *rflags & DF != 0 {
                rdi.wrapping_sub(step)
            } else {
                rdi.wrapping_add(step)
            };
            write_reg(regs, dest, rdi & mask(addr_size));
            if rep {
                write_reg(regs, count, left - 1);
                if left > 1 {
                    return Ok(Step::Again);
                }
            }
        }
    }
    Ok(Step::Done)
}

/// All ones in the low `size` bytes.
fn mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

fn sign_extend(v: u64, size: u8) -> u64 {
    match size {
        1 => v as u8 as i8 as u64,
        2 => v as u16 as i16 as u64,
        4 => v as u32 as i32 as u64,
        _ => v,
    }
}

fn read_reg(regs: &impl Gprs, r: Reg) -> u64 {
    let v = regs.gpr(r.num);
    if r.high8 {
        (v >> 8) & 0xff
    } else {
        v & mask(r.size)
    }
}

/// Writes the low `r.size` bytes of `v` to `r` as the CPU writes a register of that size: 8-
/// and 16-bit writes keep the other bits, a 32-bit write zero-extends into the 64-bit register
/// (SDM Vol. 1, 3.4.1.1).
fn write_reg(regs: &mut impl Gprs, r: Reg, v: u64) {
    let old = regs.gpr(r.num);
    let new = match (r.size, r.high8) {
        (1, true) => (old & !0xff00) | ((v & 0xff) << 8),
        (1, false) => (old & !0xff) | (v & 0xff),
        (2, _) => (old & !0xffff) | (v & 0xffff),
        (4, _) => v & 0xffff_ffff,
        _ => v,
    };
    regs.set_gpr(r.num, new);
}

fn operand(regs: &impl Gprs, src: Operand, size: u8) -> u64 {
    match src {
        Operand::Reg(r) => read_reg(regs, r),
        Operand::Imm(v) => v & mask(size),
    }
}

/// `a op b` on `size`-byte operands: the result and the arithmetic flags it sets (SDM Vol. 2,
/// ADD, SUB, CMP, AND, OR, XOR, TEST; Vol. 1, 3.4.3.1 and Appendix A).
///
/// The logic operations clear CF and OF; AF is architecturally undefined after them, and is
/// cleared here, as Intel and AMD processors do.
fn alu(op: AluOp, a: u64, b: u64, size: u8) -> (u64, u64) {
    let m = mask(size);
    let sign = 1u64 << (u32::from(size) * 8 - 1);
    let (a, b) = (a & m, b & m);
    let (r, cf, of) = match op {
        AluOp::Add => {
            let r = a.wrapping_add(b) & m;
            // Carry out of the top bit: the truncated sum is below an addend. Overflow: both
            // operands have the sign the result lacks.
            (r, r < a, (a ^ r) & (b ^ r) & sign != 0)
        }
        AluOp::Sub | AluOp::Cmp => {
            let r = a.wrapping_sub(b) & m;
            // Borrow into the top bit; overflow: the operands' signs differ and the result's
            // sign differs from the minuend's.
            (r, a < b, (a ^ b) & (a ^ r) & sign != 0)
        }
        AluOp::And | AluOp::Test => (a & b, false, false),
        AluOp::Or => (a | b, false, false),
        AluOp::Xor => (a ^ b, false, false),
    };
    let af = match op {
        // Carry or borrow out of bit 3: bit 4 of the result differs from the operands' sum.
        AluOp::Add | AluOp::Sub | AluOp::Cmp => (a ^ b ^ r) & 0x10 != 0,
        _ => false,
    };
    let mut flags = 0;
    let mut set = |bit: u64, on: bool| {
        if on {
            flags |= bit;
        }
    };
    set(CF, cf);
    // PF: an even number of ones in the low byte only.
    set(PF, (r as u8).count_ones() & 1 == 0);
    set(AF, af);
    set(ZF, r == 0);
    set(SF, r & sign != 0);
    set(OF, of);
    (r, flags)
}

// ---------------------------------------------------------------------------------------------
// Reporting
// ---------------------------------------------------------------------------------------------

/// Why an MMIO access could not be emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioError {
    Fetch(FetchError),
    Decode(DecodeError),
}

impl From<FetchError> for MmioError {
    fn from(e: FetchError) -> Self {
        Self::Fetch(e)
    }
}

impl From<DecodeError> for MmioError {
    fn from(e: DecodeError) -> Self {
        Self::Decode(e)
    }
}

impl fmt::Display for MmioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmioError::Fetch(e) => e.fmt(f),
            MmioError::Decode(e) => e.fmt(f),
        }
    }
}

/// A per-VM log line for an access that could not be emulated:
/// "cannot emulate MMIO access to gpa=0xfee000b0 by `movsd` (f3 a5) at rip=0x1000: `movsd` is
/// not emulated on MMIO".
#[derive(Clone, Copy, Debug)]
pub struct Report<'a> {
    pub gpa: u64,
    pub rip: u64,
    /// The instruction bytes fetched, if any.
    pub bytes: &'a [u8],
    pub error: &'a MmioError,
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot emulate MMIO access to gpa={:#x} by ", self.gpa)?;
        let mnemonic = match self.error {
            MmioError::Decode(DecodeError::NoMemoryOperand(m) | DecodeError::Unsupported(m)) => {
                name(*m)
            }
            _ => None,
        };
        match (mnemonic, self.bytes.is_empty()) {
            (Some(m), _) => write!(f, "`{m}` ({})", Hex(self.bytes))?,
            (None, false) => write!(f, "`{}`", Hex(self.bytes))?,
            (None, true) => f.write_str("the instruction")?,
        }
        write!(f, " at rip={:#x}: {}", self.rip, self.error)
    }
}

/// The names of the mnemonics a report is likely to name: the ones decoded here and the
/// memory-accessing ones a driver or firmware might use on MMIO but that are not emulated.
/// iced's own table of names (its `Debug` of [`Mnemonic`]) has all 1894 and would add about
/// 45 KB to the kernel, for log lines that print the instruction's bytes anyway.
const NAMES: &[(Mnemonic, &str)] = &[
    (Mnemonic::Mov, "mov"),
    (Mnemonic::Movzx, "movzx"),
    (Mnemonic::Movsx, "movsx"),
    (Mnemonic::Movsxd, "movsxd"),
    (Mnemonic::Add, "add"),
    (Mnemonic::Sub, "sub"),
    (Mnemonic::And, "and"),
    (Mnemonic::Or, "or"),
    (Mnemonic::Xor, "xor"),
    (Mnemonic::Cmp, "cmp"),
    (Mnemonic::Test, "test"),
    (Mnemonic::Xchg, "xchg"),
    (Mnemonic::Stosb, "stosb"),
    (Mnemonic::Stosw, "stosw"),
    (Mnemonic::Stosd, "stosd"),
    (Mnemonic::Stosq, "stosq"),
    (Mnemonic::Movsb, "movsb"),
    (Mnemonic::Movsw, "movsw"),
    (Mnemonic::Movsd, "movsd"),
    (Mnemonic::Movsq, "movsq"),
    (Mnemonic::Lodsb, "lodsb"),
    (Mnemonic::Lodsw, "lodsw"),
    (Mnemonic::Lodsd, "lodsd"),
    (Mnemonic::Lodsq, "lodsq"),
    (Mnemonic::Scasb, "scasb"),
    (Mnemonic::Scasw, "scasw"),
    (Mnemonic::Scasd, "scasd"),
    (Mnemonic::Scasq, "scasq"),
    (Mnemonic::Cmpsb, "cmpsb"),
    (Mnemonic::Cmpsw, "cmpsw"),
    (Mnemonic::Cmpsd, "cmpsd"),
    (Mnemonic::Cmpsq, "cmpsq"),
    (Mnemonic::Inc, "inc"),
    (Mnemonic::Dec, "dec"),
    (Mnemonic::Neg, "neg"),
    (Mnemonic::Not, "not"),
    (Mnemonic::Adc, "adc"),
    (Mnemonic::Sbb, "sbb"),
    (Mnemonic::Bt, "bt"),
    (Mnemonic::Bts, "bts"),
    (Mnemonic::Btr, "btr"),
    (Mnemonic::Btc, "btc"),
    (Mnemonic::Shl, "shl"),
    (Mnemonic::Shr, "shr"),
    (Mnemonic::Cmpxchg, "cmpxchg"),
    (Mnemonic::Xadd, "xadd"),
    (Mnemonic::Push, "push"),
    (Mnemonic::Pop, "pop"),
    (Mnemonic::Lea, "lea"),
    (Mnemonic::Nop, "nop"),
    (Mnemonic::Movd, "movd"),
    (Mnemonic::Movq, "movq"),
    (Mnemonic::Movnti, "movnti"),
    (Mnemonic::Movups, "movups"),
    (Mnemonic::Movaps, "movaps"),
    (Mnemonic::Movdqu, "movdqu"),
    (Mnemonic::Movdqa, "movdqa"),
    (Mnemonic::Clflush, "clflush"),
];

/// The lower-case name of `m`, if [`NAMES`] has it.
fn name(m: Mnemonic) -> Option<&'static str> {
    NAMES.iter().find(|&&(n, _)| n == m).map(|&(_, s)| s)
}

/// Bytes as space-separated hex pairs.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::tests::FlatPhys;
    use alloc::format;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    // ---- registers and a recording device ----

    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    struct Regs([u64; 16]);

    impl Gprs for Regs {
        fn gpr(&self, n: u8) -> u64 {
            self.0[usize::from(n)]
        }
        fn set_gpr(&mut self, n: u8, v: u64) {
            self.0[usize::from(n)] = v;
        }
    }

    const GPA: u64 = 0xfee0_00b0;
    const RSP: u8 = 4;
    const RBX: u8 = 3;
    const R8: u8 = 8;
    const R15: u8 = 15;

    /// Decodes `bytes` as 64-bit code and emulates it against a device whose reads return
    /// `value`; returns the step and the device's accesses in order.
    fn run(
        bytes: &[u8],
        regs: &mut Regs,
        rflags: &mut u64,
        value: u64,
    ) -> (Step, Vec<DeviceAccess>) {
        let insn = decode(bytes, 64).unwrap();
        let mut log = Vec::new();
        let step = emulate(&insn, regs, rflags, GPA, &mut |a| {
            log.push(a);
            Ok::<u64, ()>(value)
        })
        .unwrap();
        (step, log)
    }

    fn read(size: u8) -> DeviceAccess {
        DeviceAccess::Read { gpa: GPA, size }
    }

    fn write(size: u8, value: u64) -> DeviceAccess {
        DeviceAccess::Write {
            gpa: GPA,
            size,
            value,
        }
    }

    fn r(num: u8, size: u8) -> Reg {
        Reg {
            num,
            size,
            high8: false,
        }
    }

    fn high(num: u8) -> Reg {
        Reg {
            num,
            size: 1,
            high8: true,
        }
    }

    // ---- decode ----

    #[test]
    fn decodes_the_forms_linux_and_firmware_use() {
        use super::Extend::{None as Plain, Sign, Zero};
        use AluOp::*;
        use MmioOp::*;
        let reg = |x| Operand::Reg(x);
        #[rustfmt::skip]
        let table: &[(u32, &[u8], MmioOp, u8)] = &[
            // readb/readw/readl/readq and writeb/writew/writel/writeq.
            (64, &[0x8a, 0x07], Load { dst: r(RAX, 1), extend: Plain }, 1),
            (64, &[0x66, 0x8b, 0x07], Load { dst: r(RAX, 2), extend: Plain }, 2),
            (64, &[0x8b, 0x07], Load { dst: r(RAX, 4), extend: Plain }, 4),
            (64, &[0x48, 0x8b, 0x07], Load { dst: r(RAX, 8), extend: Plain }, 8),
            (64, &[0x88, 0x07], Store { src: reg(r(RAX, 1)) }, 1),
            (64, &[0x66, 0x89, 0x07], Store { src: reg(r(RAX, 2)) }, 2),
            (64, &[0x89, 0x07], Store { src: reg(r(RAX, 4)) }, 4),
            (64, &[0x48, 0x89, 0x07], Store { src: reg(r(RAX, 8)) }, 8),
            (64, &[0x0f, 0xb6, 0x07], Load { dst: r(RAX, 4), extend: Zero }, 1),
            (64, &[0x0f, 0xb7, 0x07], Load { dst: r(RAX, 4), extend: Zero }, 2),
            (64, &[0x66, 0x0f, 0xb6, 0x07], Load { dst: r(RAX, 2), extend: Zero }, 1),
            (64, &[0x0f, 0xbe, 0x07], Load { dst: r(RAX, 4), extend: Sign }, 1),
            (64, &[0x48, 0x0f, 0xbf, 0x07], Load { dst: r(RAX, 8), extend: Sign }, 2),
            (64, &[0x48, 0x63, 0x07], Load { dst: r(RAX, 8), extend: Sign }, 4),
            // Immediates: sign-extended to the operand size.
            (64, &[0xc6, 0x07, 0xab], Store { src: Operand::Imm(0xab) }, 1),
            (64, &[0x66, 0xc7, 0x07, 0x34, 0x12], Store { src: Operand::Imm(0x1234) }, 2),
            (64, &[0xc7, 0x07, 0x78, 0x56, 0x34, 0x12], Store { src: Operand::Imm(0x1234_5678) }, 4),
            (64, &[0x48, 0xc7, 0x07, 0x00, 0x00, 0x00, 0x80],
                Store { src: Operand::Imm(0xffff_ffff_8000_0000) }, 8),
            // REX.R and REX.B registers; the base register does not matter.
            (64, &[0x44, 0x8b, 0x07], Load { dst: r(R8, 4), extend: Plain }, 4),
            (64, &[0x4c, 0x89, 0x3f], Store { src: reg(r(R15, 8)) }, 8),
            (64, &[0x41, 0x8b, 0x00], Load { dst: r(RAX, 4), extend: Plain }, 4),
            (64, &[0x44, 0x88, 0x07], Store { src: reg(r(R8, 1)) }, 1),
            // 8-bit high registers without REX; SPL..DIL with it.
            (64, &[0x8a, 0x27], Load { dst: high(RAX), extend: Plain }, 1),
            (64, &[0x88, 0x3f], Store { src: reg(high(RBX)) }, 1),
            (64, &[0x40, 0x8a, 0x27], Load { dst: r(RSP, 1), extend: Plain }, 1),
            (64, &[0x40, 0x88, 0x3f], Store { src: reg(r(RDI, 1)) }, 1),
            // Read-modify-write, compare and test.
            (64, &[0x83, 0x27, 0xfe], AluMem { op: And, src: Operand::Imm(0xffff_fffe) }, 4),
            (64, &[0x81, 0x0f, 0x00, 0x01, 0x00, 0x00], AluMem { op: Or, src: Operand::Imm(0x100) }, 4),
            (64, &[0x66, 0x83, 0x0f, 0x80], AluMem { op: Or, src: Operand::Imm(0xff80) }, 2),
            (64, &[0x48, 0x83, 0x27, 0xf0], AluMem { op: And, src: Operand::Imm(!0xf) }, 8),
            (64, &[0x80, 0x07, 0x80], AluMem { op: Add, src: Operand::Imm(0x80) }, 1),
            (64, &[0x09, 0x07], AluMem { op: Or, src: reg(r(RAX, 4)) }, 4),
            (64, &[0x31, 0x07], AluMem { op: Xor, src: reg(r(RAX, 4)) }, 4),
            (64, &[0x01, 0x07], AluMem { op: Add, src: reg(r(RAX, 4)) }, 4),
            (64, &[0x29, 0x07], AluMem { op: Sub, src: reg(r(RAX, 4)) }, 4),
            (64, &[0xf0, 0x83, 0x07, 0x01], AluMem { op: Add, src: Operand::Imm(1) }, 4),
            (64, &[0x85, 0x07], AluMem { op: Test, src: reg(r(RAX, 4)) }, 4),
            (64, &[0xf7, 0x07, 0x00, 0x10, 0x00, 0x00], AluMem { op: Test, src: Operand::Imm(0x1000) }, 4),
            (64, &[0xf6, 0x07, 0x01], AluMem { op: Test, src: Operand::Imm(1) }, 1),
            (64, &[0x39, 0x07], AluMem { op: Cmp, src: reg(r(RAX, 4)) }, 4),
            (64, &[0x83, 0x3f, 0x00], AluMem { op: Cmp, src: Operand::Imm(0) }, 4),
            (64, &[0x3b, 0x07], AluReg { op: Cmp, dst: r(RAX, 4) }, 4),
            (64, &[0x03, 0x07], AluReg { op: Add, dst: r(RAX, 4) }, 4),
            (64, &[0x4c, 0x23, 0x07], AluReg { op: And, dst: r(R8, 8) }, 8),
            // XCHG.
            (64, &[0x87, 0x07], Xchg { reg: r(RAX, 4) }, 4),
            (64, &[0x86, 0x27], Xchg { reg: high(RAX) }, 1),
            (64, &[0x48, 0x87, 0x1f], Xchg { reg: r(RBX, 8) }, 8),
            // STOS.
            (64, &[0xf3, 0xab], Stos { addr_size: 8, rep: true }, 4),
            (64, &[0xab], Stos { addr_size: 8, rep: false }, 4),
            (64, &[0xf3, 0x48, 0xab], Stos { addr_size: 8, rep: true }, 8),
            (64, &[0x67, 0xf3, 0xaa], Stos { addr_size: 4, rep: true }, 1),
            (64, &[0xf2, 0xaa], Stos { addr_size: 8, rep: true }, 1),
            // RIP-relative.
            (64, &[0x8b, 0x05, 0xf0, 0x0f, 0x00, 0x00], Load { dst: r(RAX, 4), extend: Plain }, 4),
            // 32-bit code: the moffs forms firmware's `mov eax, [abs]` assembles to.
            (32, &[0xa1, 0xb0, 0x00, 0xe0, 0xfe], Load { dst: r(RAX, 4), extend: Plain }, 4),
            (32, &[0xa3, 0xb0, 0x00, 0xe0, 0xfe], Store { src: reg(r(RAX, 4)) }, 4),
            (32, &[0x8b, 0x07], Load { dst: r(RAX, 4), extend: Plain }, 4),
            (32, &[0xc7, 0x05, 0xb0, 0x00, 0xe0, 0xfe, 0x00, 0x00, 0x00, 0x00],
                Store { src: Operand::Imm(0) }, 4),
            (32, &[0xaa], Stos { addr_size: 4, rep: false }, 1),
            // 16-bit code.
            (16, &[0x8b, 0x05], Load { dst: r(RAX, 2), extend: Plain }, 2),
            (16, &[0x66, 0x8b, 0x05], Load { dst: r(RAX, 4), extend: Plain }, 4),
            (16, &[0xaa], Stos { addr_size: 2, rep: false }, 1),
        ];
        for &(bitness, bytes, op, size) in table {
            let mut padded = Vec::from(bytes);
            // Bytes after the instruction must not matter.
            padded.extend_from_slice(&[0x90; 4]);
            let insn = decode(&padded, bitness)
                .unwrap_or_else(|e| panic!("{bytes:02x?} ({bitness}-bit): {e}"));
            assert_eq!(insn.op, op, "{bytes:02x?}");
            assert_eq!(insn.size, size, "{bytes:02x?}");
            assert_eq!(usize::from(insn.len), bytes.len(), "{bytes:02x?}");
        }
    }

    #[test]
    fn refuses_what_it_does_not_emulate() {
        use DecodeError::*;
        let table: &[(u32, &[u8], DecodeError)] = &[
            (64, &[0xf3, 0xa5], Unsupported(Mnemonic::Movsd)),
            (64, &[0xa4], Unsupported(Mnemonic::Movsb)),
            (64, &[0xac], Unsupported(Mnemonic::Lodsb)),
            (64, &[0xff, 0x07], Unsupported(Mnemonic::Inc)),
            (64, &[0x11, 0x07], Unsupported(Mnemonic::Adc)),
            (64, &[0x8d, 0x07], Unsupported(Mnemonic::Lea)),
            (64, &[0x8c, 0x1f], Unsupported(Mnemonic::Mov)),
            (64, &[0x0f, 0x10, 0x07], Unsupported(Mnemonic::Movups)),
            (64, &[0x90], NoMemoryOperand(Mnemonic::Nop)),
            (64, &[0x89, 0xc0], NoMemoryOperand(Mnemonic::Mov)),
            (64, &[0x0f, 0x0b], NoMemoryOperand(Mnemonic::Ud2)),
            // PUSH ES is not in 64-bit mode; LOCK MOV is #UD.
            (64, &[0x06, 0x90, 0x90], Invalid),
            (64, &[0xf0, 0x8b, 0x07, 0x90], Invalid),
            // VEX is left out of the decoder (no_vex): an AVX load is not a valid instruction.
            (64, &[0xc5, 0xf8, 0x10, 0x07, 0x90], Invalid),
            // Truncated buffers.
            (64, &[], Truncated { len: 0 }),
            (64, &[0x8b], Truncated { len: 1 }),
            (64, &[0x48], Truncated { len: 1 }),
            (64, &[0xc7, 0x07, 0x78, 0x56], Truncated { len: 4 }),
            (32, &[0xa1, 0xb0, 0x00], Truncated { len: 3 }),
            (8, &[0x8b, 0x07], Bitness(8)),
        ];
        for &(bitness, bytes, e) in table {
            assert_eq!(decode(bytes, bitness), Err(e), "{bytes:02x?}");
        }
        // Fifteen prefixes and an opcode are 16 bytes: too long whatever follows.
        let mut long = [0x66u8; 20];
        long[15] = 0x90;
        assert!(decode(&long, 64).is_err());
    }

    // ---- emulate: loads and stores ----

    #[test]
    fn loads_write_the_destination_as_the_cpu_does() {
        const OLD: u64 = 0x1111_2222_3333_4444;
        let cases: &[(&[u8], u64, u8, u64)] = &[
            // mov eax: a 32-bit destination zero-extends into RAX.
            (&[0x8b, 0x07], 0x89ab_cdef, 4, 0x89ab_cdef),
            (
                &[0x48, 0x8b, 0x07],
                0x0123_4567_89ab_cdef,
                8,
                0x0123_4567_89ab_cdef,
            ),
            // mov ax / al / ah keep the other bits.
            (&[0x66, 0x8b, 0x07], 0xbeef, 2, 0x1111_2222_3333_beef),
            (&[0x8a, 0x07], 0xee, 1, 0x1111_2222_3333_44ee),
            (&[0x8a, 0x27], 0xee, 1, 0x1111_2222_3333_ee44),
            // movzx: zero-extended to the destination, then written as that size.
            (&[0x0f, 0xb6, 0x07], 0xff, 1, 0xff),
            (&[0x0f, 0xb7, 0x07], 0xfffe, 2, 0xfffe),
            (&[0x66, 0x0f, 0xb6, 0x07], 0x80, 1, 0x1111_2222_3333_0080),
            // movsx / movsxd.
            (&[0x0f, 0xbe, 0x07], 0x80, 1, 0xffff_ff80),
            (&[0x48, 0x0f, 0xbe, 0x07], 0x80, 1, 0xffff_ffff_ffff_ff80),
            (&[0x48, 0x0f, 0xbf, 0x07], 0x8000, 2, 0xffff_ffff_ffff_8000),
            (&[0x48, 0x63, 0x07], 0x8000_0000, 4, 0xffff_ffff_8000_0000),
            (&[0x0f, 0xbe, 0x07], 0x7f, 1, 0x7f),
        ];
        for &(bytes, value, size, want) in cases {
            let mut regs = Regs::default();
            regs.0[0] = OLD;
            let mut rflags = 0x202;
            // The device's bits beyond the access size are not the guest's.
            let noisy = value | (0xdead_0000_0000_0000 & !mask(size));
            let (step, log) = run(bytes, &mut regs, &mut rflags, noisy);
            assert_eq!(step, Step::Done);
            assert_eq!(log, [read(size)], "{bytes:02x?}");
            assert_eq!(regs.0[0], want, "{bytes:02x?}: {:#x}", regs.0[0]);
            assert_eq!(rflags, 0x202, "loads leave the flags alone");
        }
        // REX.R: the load goes to R8, nothing else changes.
        let mut regs = Regs::default();
        regs.0[8] = u64::MAX;
        let _ = run(&[0x44, 0x8b, 0x07], &mut regs, &mut 0, 5);
        assert_eq!(regs.0[8], 5);
        assert_eq!(regs.0.iter().filter(|&&v| v != 0).count(), 1);
    }

    #[test]
    fn stores_hand_the_device_the_right_bytes() {
        let mut regs = Regs::default();
        regs.0[0] = 0x1111_2222_3333_4444;
        regs.0[3] = 0x5566_7788;
        regs.0[7] = 0x99aa;
        regs.0[15] = 0xfedc_ba98_7654_3210;
        let cases: &[(&[u8], DeviceAccess)] = &[
            (&[0x89, 0x07], write(4, 0x3333_4444)),
            (&[0x48, 0x89, 0x07], write(8, 0x1111_2222_3333_4444)),
            (&[0x66, 0x89, 0x07], write(2, 0x4444)),
            (&[0x88, 0x07], write(1, 0x44)),
            (&[0x88, 0x3f], write(1, 0x77)),       // bh
            (&[0x40, 0x88, 0x3f], write(1, 0xaa)), // dil
            (&[0x4c, 0x89, 0x3f], write(8, 0xfedc_ba98_7654_3210)),
            (&[0xc7, 0x07, 0x78, 0x56, 0x34, 0x12], write(4, 0x1234_5678)),
            (&[0xc6, 0x07, 0xab], write(1, 0xab)),
            (
                &[0x48, 0xc7, 0x07, 0xfe, 0xff, 0xff, 0xff],
                write(8, 0xffff_ffff_ffff_fffe),
            ),
        ];
        for &(bytes, want) in cases {
            let before = regs.clone();
            let (step, log) = run(bytes, &mut regs, &mut 0, 0);
            assert_eq!(step, Step::Done);
            assert_eq!(log, [want], "{bytes:02x?}");
            assert_eq!(regs, before, "stores change no register");
        }
    }

    // ---- emulate: read-modify-write and flags ----

    #[test]
    fn read_modify_write_and_flags() {
        const ALL: u64 = ARITHMETIC_FLAGS;
        /// Bytes, RAX, the memory's value, what is written back, RAX after, flags after.
        type Case = (&'static [u8], u64, u64, Option<DeviceAccess>, u64, u64);
        #[rustfmt::skip]
        let cases: &[Case] = &[
            // and dword [rdi], -2: 0x8000_0001 -> 0x8000_0000: SF, PF (low byte 0).
            (&[0x83, 0x27, 0xfe], 0, 0x8000_0001, Some(write(4, 0x8000_0000)), 0, SF | PF),
            // and to zero: ZF, PF.
            (&[0x83, 0x27, 0xfe], 0, 1, Some(write(4, 0)), 0, ZF | PF),
            // or dword [rdi], 0x100.
            (&[0x81, 0x0f, 0x00, 0x01, 0x00, 0x00], 0, 0x3, Some(write(4, 0x103)), 0, PF),
            // xor [rdi], eax.
            (&[0x31, 0x07], 0xf0, 0xff, Some(write(4, 0x0f)), 0xf0, PF),
            // sub [rdi], eax: 0 - 1 borrows: CF, SF, AF, PF (0xff).
            (&[0x29, 0x07], 1, 0, Some(write(4, 0xffff_ffff)), 1, CF | SF | AF | PF),
            // sub: 0x8000_0000 - 1 overflows.
            (&[0x29, 0x07], 1, 0x8000_0000, Some(write(4, 0x7fff_ffff)), 1, OF | AF | PF),
            // add byte [rdi], 0x80: 0x80 + 0x80 carries and overflows to 0.
            (&[0x80, 0x07, 0x80], 0, 0x80, Some(write(1, 0)), 0, CF | OF | ZF | PF),
            // add [rdi], eax: carry out of bit 3 only.
            (&[0x01, 0x07], 0x08, 0x08, Some(write(4, 0x10)), 0x08, AF),
            // cmp [rdi], eax, equal: flags only.
            (&[0x39, 0x07], 7, 7, None, 7, ZF | PF),
            // cmp dword [rdi], 0.
            (&[0x83, 0x3f, 0x00], 0, 0x8000_0000, None, 0, SF | PF),
            // test dword [rdi], 0x1000.
            (&[0xf7, 0x07, 0x00, 0x10, 0x00, 0x00], 0, 0x1000, None, 0, PF),
            (&[0xf7, 0x07, 0x00, 0x10, 0x00, 0x00], 0, 0x0fff, None, 0, ZF | PF),
            // cmp eax, [rdi]: eax - mem; RAX unchanged (even its upper half).
            (&[0x3b, 0x07], 0xabcd_0000_0000_0001, 2, None, 0xabcd_0000_0000_0001, CF | SF | AF | PF),
            // add eax, [rdi]: a 32-bit register result zero-extends.
            (&[0x03, 0x07], 0xabcd_0000_ffff_ffff, 1, None, 0, CF | ZF | AF | PF),
            // and rax-sized with a REX.W immediate, sign-extended.
            (&[0x48, 0x83, 0x27, 0xf0], 0, u64::MAX, Some(write(8, !0xf)), 0, SF | PF),
        ];
        for &(bytes, rax, memory, written, rax_after, flags) in cases {
            let mut regs = Regs::default();
            regs.0[0] = rax;
            // Flags the instruction sets are cleared first; others (IF, DF, bit 1) survive.
            let mut rflags = ALL | DF | 0x202;
            let (step, log) = run(bytes, &mut regs, &mut rflags, memory);
            assert_eq!(step, Step::Done);
            let size = decode(bytes, 64).unwrap().size;
            let mut want = alloc::vec![read(size)];
            want.extend(written);
            assert_eq!(log, want, "{bytes:02x?}");
            assert_eq!(regs.0[0], rax_after, "{bytes:02x?}");
            assert_eq!(rflags, flags | DF | 0x202, "{bytes:02x?}: {rflags:#x}");
        }
    }

    /// The flags of `a op b`, computed by this CPU: the reference `alu` must match.
    #[cfg(target_arch = "x86_64")]
    fn hardware(op: AluOp, a: u64, b: u64, size: u8) -> (u64, u64) {
        macro_rules! run {
            ($insn:literal, $modifier:literal) => {{
                let mut r = a;
                let flags: u64;
                // SAFETY: register-only arithmetic and a push/pop of RFLAGS on our own stack.
                unsafe {
                    core::arch::asm!(
                        "push 0", "popfq",
                        concat!($insn, " {r", $modifier, "}, {b", $modifier, "}"),
                        "pushfq", "pop {f}",
                        r = inout(reg_abcd) r, b = in(reg_abcd) b, f = out(reg) flags,
                    );
                }
                (r, flags)
            }};
        }
        macro_rules! sized {
            ($insn:literal) => {
                match size {
                    1 => run!($insn, ":l"),
                    2 => run!($insn, ":x"),
                    4 => run!($insn, ":e"),
                    _ => run!($insn, ":r"),
                }
            };
        }
        let (r, flags) = match op {
            AluOp::Add => sized!("add"),
            AluOp::Sub => sized!("sub"),
            AluOp::Cmp => sized!("cmp"),
            AluOp::And => sized!("and"),
            AluOp::Or => sized!("or"),
            AluOp::Xor => sized!("xor"),
            AluOp::Test => sized!("test"),
        };
        (r & mask(size), flags & ARITHMETIC_FLAGS)
    }

    #[cfg(target_arch = "x86_64")]
    proptest! {
        #[test]
        fn flags_match_this_cpu(a: u64, b: u64, op in 0..7usize, size in 0..4u32) {
            let op = [AluOp::Add, AluOp::Sub, AluOp::Cmp, AluOp::And, AluOp::Or, AluOp::Xor,
                AluOp::Test][op];
            let size = 1u8 << size;
            let (hw_result, hw_flags) = hardware(op, a, b, size);
            let (result, flags) = alu(op, a, b, size);
            prop_assert_eq!(flags, hw_flags, "{:?} {:#x}, {:#x} ({} bytes)", op, a, b, size);
            if op.writes() {
                prop_assert_eq!(result, hw_result);
            }
        }

        #[test]
        fn flags_match_this_cpu_near_the_edges(
            a in prop::sample::select(alloc::vec![0u64, 1, 0x7f, 0x80, 0xff, 0x7fff, 0x8000,
                0xffff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, i64::MAX as u64, 1 << 63, u64::MAX]),
            b in prop::sample::select(alloc::vec![0u64, 1, 0x0f, 0x10, 0x7f, 0x80, 0xff, 0x8000,
                0x8000_0000, 1 << 63, u64::MAX]),
            op in 0..7usize, size in 0..4u32,
        ) {
            let op = [AluOp::Add, AluOp::Sub, AluOp::Cmp, AluOp::And, AluOp::Or, AluOp::Xor,
                AluOp::Test][op];
            let size = 1u8 << size;
            let (result, flags) = alu(op, a, b, size);
            let (hw_result, hw_flags) = hardware(op, a, b, size);
            prop_assert_eq!(flags, hw_flags);
            if op.writes() {
                prop_assert_eq!(result, hw_result);
            }
        }
    }

    #[test]
    fn xchg_reads_then_writes() {
        let mut regs = Regs::default();
        regs.0[0] = 0xffff_ffff_0000_0005;
        let (step, log) = run(&[0x87, 0x07], &mut regs, &mut 0, 7);
        assert_eq!(step, Step::Done);
        assert_eq!(log, [read(4), write(4, 5)]);
        assert_eq!(regs.0[0], 7, "the 32-bit load zero-extends");
        // xchg [rdi], ah.
        let mut regs = Regs::default();
        regs.0[0] = 0x1234;
        let (_, log) = run(&[0x86, 0x27], &mut regs, &mut 0, 0xab);
        assert_eq!(log, [read(1), write(1, 0x12)]);
        assert_eq!(regs.0[0], 0xab34);
    }

    // ---- emulate: STOS ----

    #[test]
    fn rep_stos_does_one_element_per_call() {
        let mut regs = Regs::default();
        regs.0[RAX as usize] = 0x1122_3344_aabb_ccdd;
        regs.0[RCX as usize] = 3;
        regs.0[RDI as usize] = 0x1000;
        let mut rflags = 0x2;
        let (step, log) = run(&[0xf3, 0xab], &mut regs, &mut rflags, 0);
        assert_eq!(
            (step, log),
            (Step::Again, alloc::vec![write(4, 0xaabb_ccdd)])
        );
        assert_eq!((regs.0[1], regs.0[7]), (2, 0x1004));
        assert_eq!(run(&[0xf3, 0xab], &mut regs, &mut rflags, 0).0, Step::Again);
        assert_eq!(run(&[0xf3, 0xab], &mut regs, &mut rflags, 0).0, Step::Done);
        assert_eq!((regs.0[1], regs.0[7]), (0, 0x100c));
        // RCX = 0: nothing to do, no access.
        let (step, log) = run(&[0xf3, 0xab], &mut regs, &mut rflags, 0);
        assert_eq!((step, log.len(), regs.0[7]), (Step::Done, 0, 0x100c));

        // DF steps down; a REX.W STOSQ writes 8 bytes.
        regs.0[RCX as usize] = 1;
        let mut rflags = DF;
        let (step, log) = run(&[0xf3, 0x48, 0xab], &mut regs, &mut rflags, 0);
        assert_eq!(
            (step, log),
            (Step::Done, alloc::vec![write(8, 0x1122_3344_aabb_ccdd)])
        );
        assert_eq!((regs.0[1], regs.0[7]), (0, 0x1004));

        // Without REP: RCX untouched.
        regs.0[RCX as usize] = 9;
        let (step, log) = run(&[0xaa], &mut regs, &mut 0, 0);
        assert_eq!((step, log), (Step::Done, alloc::vec![write(1, 0xdd)]));
        assert_eq!((regs.0[1], regs.0[7]), (9, 0x1005));

        // 32-bit address size: EDI and ECX wrap in 32 bits and are written zero-extended.
        regs.0[RCX as usize] = 0x1_0000_0002;
        regs.0[RDI as usize] = 0x1_ffff_fffc;
        let (step, _) = run(&[0x67, 0xf3, 0xab], &mut regs, &mut 0, 0);
        assert_eq!(step, Step::Again);
        assert_eq!((regs.0[1], regs.0[7]), (1, 0));

        // 16-bit address size (16-bit code): DI and CX only.
        let insn = decode(&[0xf3, 0xaa], 16).unwrap();
        regs.0[RCX as usize] = 0xabcd_0000;
        regs.0[RDI as usize] = 0x1234_ffff;
        let step = emulate(&insn, &mut regs, &mut 0, GPA, &mut |_| Ok::<u64, ()>(0));
        // CX = 0 with REP: no element.
        assert_eq!(step, Ok(Step::Done));
        assert_eq!(regs.0[7], 0x1234_ffff);
        regs.0[RCX as usize] = 0xabcd_0001;
        let step = emulate(&insn, &mut regs, &mut 0, GPA, &mut |_| Ok::<u64, ()>(0));
        assert_eq!(step, Ok(Step::Done));
        assert_eq!((regs.0[1], regs.0[7]), (0xabcd_0000, 0x1234_0000));
    }

    #[test]
    fn a_device_error_changes_nothing() {
        for bytes in [
            &[0x87, 0x07][..],
            &[0x29, 0x07],
            &[0x8b, 0x07],
            &[0xf3, 0xab],
        ] {
            let insn = decode(bytes, 64).unwrap();
            let mut regs = Regs([3; 16]);
            let mut rflags = 0x202;
            // Reads succeed, writes fail.
            let result = emulate(&insn, &mut regs, &mut rflags, GPA, &mut |a| match a {
                DeviceAccess::Read { .. } => {
                    if bytes == [0x8b, 0x07] {
                        Err("gone")
                    } else {
                        Ok(0x55)
                    }
                }
                DeviceAccess::Write { .. } => Err("gone"),
            });
            assert_eq!(result, Err("gone"));
            assert_eq!(regs, Regs([3; 16]), "{bytes:02x?}");
            assert_eq!(rflags, 0x202);
        }
    }

    // ---- fetch ----

    /// A 32-page VM whose guest pages live in host frames in reverse order, with 4-level tables
    /// at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD), 0x4000 (PT) mapping linear page n to guest
    /// page n, except: page 0x10 -> guest page 0x14, page 0x11 not present, page 0x13
    /// supervisor-only. PAE tables: PD at 0x5000 (entry 0 -> PT 0x6000, entry 1 a 2 MiB page
    /// at 0), PT 0x6000 mapping linear page n to guest page n + 8 for n < 8, page 3 not present.
    fn vm() -> (GuestMemory, FlatPhys) {
        let frames: Vec<u64> = (0..32).rev().map(|i| i * 4096).collect();
        let mem = GuestMemory::new(frames);
        let mut phys = FlatPhys(alloc::vec![0; 32 * 4096]);
        let mut put = |gpa: u64, v: u64| mem.write(&mut phys, gpa, &v.to_le_bytes()).unwrap();
        put(0x1000, 0x2000 | 7);
        put(0x2000, 0x3000 | 7);
        put(0x3000, 0x4000 | 7);
        for page in 0..32u64 {
            let entry = match page {
                0x10 => 0x14000 | 7,
                0x11 => 0,
                0x13 => 0x13000 | 3,
                _ => (page << 12) | 7,
            };
            put(0x4000 + page * 8, entry);
        }
        put(0x5000, 0x6000 | 7);
        put(0x5008, (1 << 7) | 7);
        for page in 0..8u64 {
            let entry = if page == 3 { 0 } else { ((page + 8) << 12) | 7 };
            put(0x6000 + page * 8, entry);
        }
        (mem, phys)
    }

    fn poke(mem: &GuestMemory, phys: &mut FlatPhys, gpa: u64, bytes: &[u8]) {
        mem.write(phys, gpa, bytes).unwrap();
    }

    fn long_mode(rip: u64) -> CpuState {
        CpuState {
            rip,
            cs_base: 0xdead_0000, // ignored in 64-bit mode
            cs_access_rights: CS_L | 0x9b,
            cr0: CR0_PE | CR0_PG | CR0_WP,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
            ..CpuState::default()
        }
    }

    #[test]
    fn fetches_through_the_guests_tables() {
        let (mem, mut phys) = vm();
        let code: Vec<u8> = (0..15).map(|i| 0xa0 + i).collect();
        // Linear 0xfff9 runs from guest page 0xf into linear page 0x10 = guest page 0x14.
        poke(&mem, &mut phys, 0xfff9, &code[..7]);
        poke(&mem, &mut phys, 0x14000, &code[7..]);
        let f = fetch(&mem, &phys, &long_mode(0xfff9)).unwrap();
        assert_eq!(f.bytes(), &code[..]);
        assert_eq!((f.bitness, f.stopped), (64, None));
    }

    #[test]
    fn fetch_stops_at_an_unmapped_page_and_decoding_may_still_succeed() {
        let (mem, mut phys) = vm();
        // mov eax, [rdi] in the last two bytes of linear page 0x10; page 0x11 is not present.
        poke(&mem, &mut phys, 0x14ffe, &[0x8b, 0x07]);
        let cpu = long_mode(0x10ffe);
        let f = fetch(&mem, &phys, &cpu).unwrap();
        assert_eq!(f.bytes(), [0x8b, 0x07]);
        assert_eq!(
            f.stopped,
            Some(FetchError::PageFault {
                linear: 0x11000,
                error_code: 0
            })
        );
        assert_eq!(f.decode().unwrap().len, 2);
        // mov dword [rdi], imm32 needs the next page: its fault is the answer, with I/D set
        // once NX is on.
        poke(&mem, &mut phys, 0x14ffe, &[0xc7, 0x07]);
        let cpu = CpuState {
            efer: cpu.efer | EFER_NXE,
            ..cpu
        };
        let f = fetch(&mem, &phys, &cpu).unwrap();
        assert_eq!(
            f.decode(),
            Err(MmioError::Fetch(FetchError::PageFault {
                linear: 0x11000,
                error_code: 0x10
            }))
        );
        // Decoding the bytes alone just says they end early.
        assert_eq!(
            decode(f.bytes(), 64),
            Err(DecodeError::Truncated { len: 2 })
        );
    }

    #[test]
    fn fetch_errors_are_typed() {
        let (mut mem, phys) = vm();
        // The first page not mapped: #PF at RIP.
        assert_eq!(
            fetch(&mem, &phys, &long_mode(0x11004)),
            Err(FetchError::PageFault {
                linear: 0x11004,
                error_code: 0
            })
        );
        // CPL 3 on a supervisor page: a protection fault from user mode.
        let user = CpuState {
            cpl: 3,
            ..long_mode(0x13000)
        };
        assert_eq!(
            fetch(&mem, &phys, &user),
            Err(FetchError::PageFault {
                linear: 0x13000,
                error_code: 0b101
            })
        );
        // Tables outside memory.
        let cpu = CpuState {
            cr3: 0x100_0000,
            ..long_mode(0x8000)
        };
        assert!(matches!(
            fetch(&mem, &phys, &cpu),
            Err(FetchError::TableOutsideMemory { .. })
        ));
        // The memory engine holds the code page, or the next one, or a table.
        mem.set_page(0x14, None);
        assert_eq!(
            fetch(&mem, &phys, &long_mode(0x10000)),
            Err(FetchError::Unavailable { gpa: 0x14000 })
        );
        let f = fetch(&mem, &phys, &long_mode(0xfffe)).unwrap();
        assert_eq!(f.bytes().len(), 2);
        assert_eq!(f.stopped, Some(FetchError::Unavailable { gpa: 0x14000 }));
        mem.set_page(4, None);
        assert_eq!(
            fetch(&mem, &phys, &long_mode(0x8000)),
            Err(FetchError::Unavailable {
                gpa: 0x4000 + 8 * 8
            })
        );
    }

    #[test]
    fn protected_mode_without_paging_and_with_pae() {
        let (mem, mut phys) = vm();
        let flat = CpuState {
            rip: 0x234,
            cs_base: 0x9000,
            cs_access_rights: CS_D | 0x9b,
            cr0: CR0_PE,
            ..CpuState::default()
        };
        poke(&mem, &mut phys, 0x9234, &[0xa1, 0xb0, 0x00, 0xe0, 0xfe]);
        let f = fetch(&mem, &phys, &flat).unwrap();
        assert_eq!(f.bitness, 32);
        assert_eq!(&f.bytes()[..5], [0xa1, 0xb0, 0x00, 0xe0, 0xfe]);
        assert_eq!(f.decode().unwrap().len, 5);
        // Executing from outside the VM's memory.
        let rom = CpuState {
            rip: 0xffff_fff0,
            cs_base: 0,
            ..flat
        };
        assert_eq!(
            fetch(&mem, &phys, &rom),
            Err(FetchError::CodeOutsideMemory { gpa: 0xffff_fff0 })
        );

        // PAE: linear page 2 -> guest page 10, through the PDPTE register (the table at CR3 is
        // not read: CR3 points at nothing).
        let pae = CpuState {
            rip: 0x2010,
            cs_base: 0,
            cr0: CR0_PE | CR0_PG,
            cr3: 0x7ff_f000,
            cr4: CR4_PAE,
            pdptes: [0x5000 | 1, 0, 0, 0],
            ..flat
        };
        poke(&mem, &mut phys, 0xa010, &[0x89, 0x07]);
        let f = fetch(&mem, &phys, &pae).unwrap();
        assert_eq!(&f.bytes()[..2], [0x89, 0x07]);
        // A 2 MiB page (PD entry 1 maps guest 0).
        poke(&mem, &mut phys, 0x1234, &[0x8b, 0x07]);
        let big = CpuState {
            rip: 0x20_1234,
            ..pae
        };
        assert_eq!(
            &fetch(&mem, &phys, &big).unwrap().bytes()[..2],
            [0x8b, 0x07]
        );
        // Not present in the PT, and in the PDPTE.
        let missing = CpuState { rip: 0x3000, ..pae };
        assert_eq!(
            fetch(&mem, &phys, &missing),
            Err(FetchError::PageFault {
                linear: 0x3000,
                error_code: 0
            })
        );
        let missing = CpuState {
            rip: 0x4000_0000,
            ..pae
        };
        assert!(matches!(
            fetch(&mem, &phys, &missing),
            Err(FetchError::PageFault { .. })
        ));
        // Crossing from linear page 2 into the missing page 3 stops at the boundary.
        let edge = CpuState { rip: 0x2ffe, ..pae };
        let f = fetch(&mem, &phys, &edge).unwrap();
        assert_eq!(f.bytes().len(), 2);
        assert!(f.stopped.is_some());
    }

    #[test]
    fn unsupported_modes_are_typed_errors() {
        let (mem, phys) = vm();
        let base = long_mode(0x8000);
        let cases = [
            (
                CpuState {
                    cr4: CR4_PAE | CR4_LA57,
                    ..base
                },
                UnsupportedMode::FiveLevel,
            ),
            (
                CpuState {
                    cs_access_rights: CS_D,
                    ..base
                },
                UnsupportedMode::Compatibility,
            ),
            (
                CpuState {
                    efer: 0,
                    cr0: 0,
                    ..base
                },
                UnsupportedMode::Real,
            ),
            (
                CpuState {
                    efer: 0,
                    cr0: CR0_PE,
                    cs_access_rights: 0,
                    ..base
                },
                UnsupportedMode::Code16,
            ),
            (
                CpuState {
                    efer: 0,
                    cr0: CR0_PE | CR0_PG,
                    cr4: 0,
                    cs_access_rights: CS_D,
                    ..base
                },
                UnsupportedMode::Paging32,
            ),
        ];
        for (cpu, want) in cases {
            assert_eq!(mode(&cpu), Err(want));
            assert_eq!(fetch(&mem, &phys, &cpu), Err(FetchError::Unsupported(want)));
        }
    }

    // ---- reports ----

    #[test]
    fn reports_name_the_instruction() {
        let bytes = [0xf3, 0xa5];
        let error = MmioError::Decode(decode(&bytes, 64).unwrap_err());
        let line = format!(
            "{}",
            Report {
                gpa: GPA,
                rip: 0x1000,
                bytes: &bytes,
                error: &error
            }
        );
        assert_eq!(
            line,
            "cannot emulate MMIO access to gpa=0xfee000b0 by `movsd` (f3 a5) at rip=0x1000: \
             `movsd` is not emulated on MMIO"
        );
        let error = MmioError::Decode(DecodeError::Invalid);
        let line = format!(
            "{}",
            Report {
                gpa: GPA,
                rip: 0x1000,
                bytes: &[0x06],
                error: &error
            }
        );
        assert_eq!(
            line,
            "cannot emulate MMIO access to gpa=0xfee000b0 by `06` at rip=0x1000: \
             not a valid instruction"
        );
        let error = MmioError::Fetch(FetchError::Unsupported(UnsupportedMode::Real));
        let line = format!(
            "{}",
            Report {
                gpa: GPA,
                rip: 0xfff0,
                bytes: &[],
                error: &error
            }
        );
        assert_eq!(
            line,
            "cannot emulate MMIO access to gpa=0xfee000b0 by the instruction at rip=0xfff0: \
             real mode is not supported"
        );
    }

    #[test]
    fn names_are_iceds_in_lower_case() {
        for &(m, n) in NAMES {
            assert_eq!(format!("{m:?}").to_ascii_lowercase(), n);
        }
        assert_eq!(name(Mnemonic::Vmovups), None);
        assert_eq!(
            format!("{}", DecodeError::Unsupported(Mnemonic::Fld)),
            "the instruction is not emulated on MMIO"
        );
    }

    // ---- junk ----

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Any bytes, any code size: decoding and emulating never panic, and what decodes is
        /// consistent.
        #[test]
        fn junk_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..20),
            bitness in prop::sample::select(alloc::vec![8u32, 16, 32, 64]),
            value: u64,
            regs: [u64; 16],
            rflags: u64,
        ) {
            let Ok(insn) = decode(&bytes, bitness) else { return Ok(()) };
            prop_assert!(usize::from(insn.len) <= bytes.len().min(MAX_INSN_LEN));
            prop_assert!(matches!(insn.size, 1 | 2 | 4 | 8));
            let mut regs = Regs(regs);
            let before = rflags;
            let mut rflags = rflags;
            let mut accesses = 0;
            let _ = emulate(&insn, &mut regs, &mut rflags, GPA, &mut |a| {
                accesses += 1;
                match a {
                    DeviceAccess::Read { size, .. } => assert_eq!(size, insn.size),
                    DeviceAccess::Write { size, value, .. } => {
                        assert_eq!(size, insn.size);
                        assert_eq!(value & !mask(size), 0);
                    }
                }
                Ok::<u64, ()>(value)
            });
            prop_assert!(accesses <= 2);
            // Flags outside the arithmetic ones never change.
            prop_assert_eq!(rflags & !ARITHMETIC_FLAGS, before & !ARITHMETIC_FLAGS);
        }
    }
}
