//! The guest's general-purpose registers as the kernel's entry/exit code saves them.
//!
//! The layout is fixed (`#[repr(C)]`, offsets used by the kernel's VM-entry assembly); RSP and
//! RIP are not here: the hardware keeps them (the VMCS on VT-x), so they are read through the
//! vCPU backend ([`crate::vcpu::Vcpu`]).

/// RAX..R15 without RSP, in the order the kernel's entry code stores them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

/// The number of RSP in the SDM's register encoding: it is not in [`GuestRegisters`].
pub const RSP: u8 = 4;

impl GuestRegisters {
    /// The register numbered as in exit qualifications and instruction encodings (SDM Table
    /// 28-3: 0 RAX, 1 RCX, 2 RDX, 3 RBX, 4 RSP, 5 RBP, 6 RSI, 7 RDI, 8-15 R8-R15), or `None`
    /// for RSP.
    pub fn slot(&mut self, n: u8) -> Option<&mut u64> {
        Some(match n & 0xf {
            0 => &mut self.rax,
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            RSP => return None,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            _ => &mut self.r15,
        })
    }

    /// EDX:EAX as one 64-bit value (RDMSR/WRMSR/XSETBV operands).
    pub fn edx_eax(&self) -> u64 {
        (self.rdx << 32) | (self.rax & 0xffff_ffff)
    }

    /// Sets EDX:EAX to `value`, zero-extending both halves as 32-bit writes do.
    pub fn set_edx_eax(&mut self, value: u64) {
        self.rax = value & 0xffff_ffff;
        self.rdx = value >> 32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_follows_the_sdm() {
        let mut r = GuestRegisters::default();
        for n in 0..16u8 {
            if let Some(slot) = r.slot(n) {
                *slot = u64::from(n) + 100;
            }
        }
        assert_eq!((r.rax, r.rcx, r.rdx, r.rbx), (100, 101, 102, 103));
        assert_eq!(
            (r.rbp, r.rsi, r.rdi, r.r8, r.r15),
            (105, 106, 107, 108, 115)
        );
        assert!(r.slot(RSP).is_none());
        r.set_edx_eax(0x1234_5678_9abc_def0);
        assert_eq!((r.rdx, r.rax), (0x1234_5678, 0x9abc_def0));
        r.rax |= 0xffff_ffff_0000_0000;
        assert_eq!(r.edx_eax(), 0x1234_5678_9abc_def0);
    }
}
