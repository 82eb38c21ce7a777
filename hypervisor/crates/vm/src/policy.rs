//! What a guest sees of the CPU: CPUID answers, which XCR0 values XSETBV takes, which CR4 bits
//! a guest may not set.
//!
//! CPUID is the host's, except that the hypervisor-present bit is set, leaves
//! 0x4000_0000.. answer with our signature (guest-abi) and the timing leaf 0x4000_0010, the
//! local APIC, x2APIC and TSC-deadline timer are the emulated ones of the platform (APIC ID 0),
//! and every feature is hidden whose state
//! the hypervisor does not keep per VM or whose instructions it does not emulate, so that a
//! guest sees a coherent CPU that simply lacks them (docs/isolation.md): VMX, SMX, MONITOR/MWAIT,
//! MTRRs,
//! machine-check architecture, thermal and power MSRs, performance monitoring, supervisor
//! protection keys (PKS), CET, MPX, AMX, WAITPKG, SGX, Processor Trace, resource-director
//! technology, IA32_TSC_ADJUST and the speculation-control MSRs (IBRS, STIBP, SSBD, ...). XSAVE
//! components other than x87, SSE, AVX, AVX-512 and PKRU are hidden too. User protection keys
//! (PKU) are offered where the CPU has them with their XSAVE component, as the PKRU register
//! is then switched per VM with the rest of the XSAVE state. CPUID.1:ECX.OSXSAVE and
//! CPUID.7.0:ECX.OSPKE show the guest's own CR4.OSXSAVE and CR4.PKE. MSRs are in
//! [`crate::msr`].

use guest_abi::{ABI_VERSION, CPUID_LEAF_BASE, CPUID_LEAF_MAX, CPUID_SIGNATURE};

/// CPUID.1:ECX bits hidden from guests: 64-bit debug store (2), MONITOR (3), CPL-qualified debug
/// store (4), VMX (5), SMX (6), EST (7), TM2 (8), PDCM (15), DCA (18); OSXSAVE (27) is the
/// guest's own.
const LEAF1_ECX_HIDDEN: u32 = (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 15)
    | (1 << 18);
/// CPUID.1:ECX bits of the emulated local APIC, set whatever the host has: x2APIC (21) and the
/// TSC-deadline timer (24).
const LEAF1_ECX_EMULATED: u32 = (1 << 21) | (1 << 24);
/// CPUID.1:EDX bit 9: an on-chip local APIC (the emulated one), clear while the guest has it
/// disabled in IA32_APIC_BASE (exits.rs).
pub const EDX_APIC: u32 = 1 << 9;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bits hidden: MTRR (12), debug store (21: IA32_DS_AREA is not offered), ACPI
/// thermal MSRs (22), TM (29). MCE (7) and MCA (14) stay: IA32_MCG_CAP reports no
/// error-reporting banks (msr.rs).
const LEAF1_EDX_HIDDEN: u32 = (1 << 12) | (1 << 21) | (1 << 22) | (1 << 29);
/// The timing leaf (as VMware and KVM define it): EAX the guest TSC's frequency in kHz, EBX
/// the local APIC timer's (bus) frequency in kHz.
pub const CPUID_LEAF_TIMING: u32 = 0x4000_0010;
/// CPUID.7.0:EBX bits hidden: IA32_TSC_ADJUST (1), SGX (2), RDT-M (12), MPX (14), RDT-A (15),
/// Processor Trace (25).
const LEAF7_EBX_HIDDEN: u32 = (1 << 1) | (1 << 2) | (1 << 12) | (1 << 14) | (1 << 15) | (1 << 25);
/// CPUID.7.0:ECX bits hidden: WAITPKG (5), CET shadow stacks (7), SGX launch control (30), PKS
/// (31); PKU (3) unless offered ([`CpuPolicy::pku`]), and OSPKE (4), which is the guest's own.
const LEAF7_ECX_HIDDEN: u32 = (1 << 5) | (1 << 7) | (1 << 30) | (1 << 31);
const LEAF7_ECX_PKU: u32 = 1 << 3;
const LEAF7_ECX_OSPKE: u32 = 1 << 4;
/// CR4.PKE: protection keys for user pages.
pub const CR4_PKE: u64 = 1 << 22;
/// The PKRU state component of XCR0 (9).
const XCR0_PKRU: u64 = 1 << 9;
/// CPUID.7.0:EDX bits hidden: PCONFIG (18), architectural LBR (19), CET IBT (20), AMX (22, 24,
/// 25), and the MSRs of speculation control whose state is not kept per VM: IBRS/IBPB (26),
/// STIBP (27), L1D_FLUSH (28), ARCH_CAPABILITIES (29), CORE_CAPABILITIES (30), SSBD (31).
const LEAF7_EDX_HIDDEN: u32 =
    (1 << 18) | (1 << 19) | (1 << 20) | (1 << 22) | (1 << 24) | (1 << 25) | (0b11_1111 << 26);
/// Whether `leaf` describes hidden features and is answered with zeros: thermal/power (6),
/// performance monitoring (0xA), RDT monitoring/allocation (0xF, 0x10), SGX (0x12), Processor
/// Trace (0x14), architectural LBR (0x1C), AMX (0x1D, 0x1E).
const fn hidden_leaf(leaf: u32) -> bool {
    matches!(leaf, 6 | 0xa | 0xf | 0x10 | 0x12 | 0x14 | 0x1c..=0x1e)
}

/// The TSC/crystal ratio of CPUID leaf 0x15 (EBX numerator / EAX denominator) for a TSC of
/// `tsc_khz` and a crystal of `crystal_khz`, exact where it can be and otherwise the closest
/// fraction whose numerator keeps `crystal_khz x numerator` within 32 bits: Linux computes the
/// TSC rate as that product over the denominator in 32-bit arithmetic (`native_calibrate_tsc`),
/// so the kHz values themselves as the fraction would overflow it. Real CPUs report small
/// ratios (e.g. 176/2 over a 24 MHz crystal).
pub fn tsc_crystal_ratio(tsc_khz: u32, crystal_khz: u32) -> (u32, u32) {
    if tsc_khz == 0 || crystal_khz == 0 {
        return (1, 1);
    }
    let gcd = |mut a: u64, mut b: u64| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let (t, c) = (u64::from(tsc_khz), u64::from(crystal_khz));
    let g = gcd(t, c);
    let (num, den) = (t / g, c / g);
    let max_num = u64::from(u32::MAX) / c;
    if num <= max_num {
        return (den as u32, num as u32);
    }
    // The best approximation t/c with a numerator at most `max_num`: the last convergent of
    // its continued fraction within the bound, or the best semiconvergent after it.
    let (mut p0, mut q0, mut p1, mut q1) = (0u64, 1u64, 1u64, 0u64);
    let (mut a, mut b) = (num, den);
    while b != 0 {
        let k = a / b;
        let (p2, q2) = (k * p1 + p0, k * q1 + q0);
        if p2 > max_num {
            // Semiconvergent: the largest j with j*p1 + p0 within the bound, if it is closer.
            let j = (max_num - p0) / p1;
            let (ps, qs) = (j * p1 + p0, j * q1 + q0);
            // |p/q - t/c| = |p c - t q| / (q c): compare across the common factor c.
            let off = |p: u64, q: u64| u128::from((p * c).abs_diff(t * q));
            if qs != 0 && off(ps, qs) * u128::from(q1) < off(p1, q1) * u128::from(qs) {
                return (qs as u32, ps as u32);
            }
            break;
        }
        (p0, q0, p1, q1) = (p1, q1, p2, q2);
        (a, b) = (b, a - k * b);
    }
    (q1.max(1) as u32, p1.max(1) as u32)
}

/// XCR0 components a guest may enable, when the CPU has them: x87 (0), SSE (1), AVX (2),
/// AVX-512 opmask, ZMM_Hi256 and Hi16_ZMM (5-7), PKRU (9). The hypervisor saves and restores
/// exactly these with XSAVE when it switches VMs. MPX (3-4), CET and AMX are not offered.
pub const XCR0_GUEST_COMPONENTS: u64 = 0b10_1110_0111;

/// CR4 bits a guest may never set (in the CR4 guest/host mask; setting one raises #GP as on a
/// CPU without the feature): VMXE (13), SMXE (14), CET (23), PKS (24), UINTR (25); PKE (22)
/// joins them where PKU is not offered ([`CpuPolicy::cr4_forbidden`]). CR4.VMXE is set in the
/// real CR4 while the guest runs, and the read shadow shows it clear.
pub const CR4_GUEST_FORBIDDEN: u64 = (1 << 13) | (1 << 14) | (1 << 23) | (1 << 24) | (1 << 25);
pub const CR4_OSXSAVE: u64 = 1 << 18;

/// The CPU-wide facts the CPUID and XSETBV answers depend on, read once at boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuPolicy {
    /// XCR0 bits guests may set: the CPU's (CPUID.0xD.0 EDX:EAX) within
    /// [`XCR0_GUEST_COMPONENTS`]; 0 when the CPU has no XSAVE.
    pub xcr0_allowed: u64,
    /// Bytes of an XSAVE area holding every allowed component (CPUID.0xD.0:ECX for guests).
    pub xsave_size: u32,
    /// The CPU has IA32_TSC_AUX (RDTSCP, CPUID.80000001H:EDX[27]).
    pub tsc_aux: bool,
    /// The guest TSC's frequency in kHz, for the timing leaf (0 until measured).
    pub tsc_khz: u32,
    /// User protection keys are offered: the CPU has PKU and XSAVE's PKRU component, which
    /// the hypervisor then switches per VM.
    pub pku: bool,
    /// The CPU's highest basic CPUID leaf (CPUID.0:EAX); 0 in a policy not derived from a CPU.
    pub max_basic_leaf: u32,
    /// MAXPHYADDR, the physical-address width CPUID.80000008H:EAX[7:0] reports (36 where the
    /// leaf is missing, SDM Vol. 3A 4.1.4); 0 in a policy not derived from a CPU (no check).
    pub phys_addr_bits: u8,
}

impl CpuPolicy {
    /// Derives the policy from the host's CPUID (`cpuid(leaf, subleaf)`).
    pub fn from_host(cpuid: impl Fn(u32, u32) -> [u32; 4]) -> Self {
        let tsc_aux =
            cpuid(0x8000_0000, 0)[0] >= 0x8000_0001 && cpuid(0x8000_0001, 0)[3] & (1 << 27) != 0;
        let phys_addr_bits = if cpuid(0x8000_0000, 0)[0] >= 0x8000_0008 {
            cpuid(0x8000_0008, 0)[0] as u8
        } else {
            36
        };
        let max_leaf = cpuid(0, 0)[0];
        let has_xsave = cpuid(1, 0)[2] & (1 << 26) != 0;
        if max_leaf < 0xd || !has_xsave {
            return Self {
                tsc_aux,
                phys_addr_bits,
                max_basic_leaf: max_leaf,
                ..Self::default()
            };
        }
        let d = cpuid(0xd, 0);
        let supported = u64::from(d[0]) | (u64::from(d[3]) << 32);
        // PKRU's state only with PKU itself (a CPU has both or neither).
        let pku = max_leaf >= 7 && cpuid(7, 0)[2] & LEAF7_ECX_PKU != 0;
        let mut allowed = supported & XCR0_GUEST_COMPONENTS;
        if !pku {
            allowed &= !XCR0_PKRU;
        }
        // The legacy region and header are 576 bytes; each further component sits at its
        // standard-format offset (CPUID.0xD.i: EAX size, EBX offset).
        let mut size = 576u32;
        for i in 2..64u32 {
            if allowed & (1 << i) != 0 {
                let c = cpuid(0xd, i);
                size = size.max(c[1] + c[0]);
            }
        }
        Self {
            xcr0_allowed: allowed,
            xsave_size: size,
            tsc_aux,
            tsc_khz: 0,
            pku: allowed & XCR0_PKRU != 0,
            max_basic_leaf: max_leaf,
            phys_addr_bits,
        }
    }

    /// The local APIC timer's rate in kHz at this TSC rate (hv_platform's `apic_bus_hz`).
    fn apic_bus_khz(&self) -> u32 {
        (hv_platform::lapic::apic_bus_hz(u64::from(self.tsc_khz) * 1000) / 1000) as u32
    }

    /// The CR4 bits a guest may not set on this CPU: the CR4 guest/host mask.
    pub fn cr4_forbidden(&self) -> u64 {
        if self.pku {
            CR4_GUEST_FORBIDDEN
        } else {
            CR4_GUEST_FORBIDDEN | CR4_PKE
        }
    }

    /// Whether `address` has a bit set at or above MAXPHYADDR, which registers holding a
    /// physical address (IA32_APIC_BASE) refuse with #GP.
    pub fn beyond_phys_addr(&self, address: u64) -> bool {
        (1..64).contains(&self.phys_addr_bits) && address >> self.phys_addr_bits != 0
    }

    /// The policy with the guest TSC frequency `tsc_hz` for the timing leaf.
    pub fn with_tsc_hz(self, tsc_hz: u64) -> Self {
        Self {
            tsc_khz: u32::try_from(tsc_hz / 1000).unwrap_or(u32::MAX),
            ..self
        }
    }

    /// Whether this CPU has `msr`, so that a guest may use it: all of [`crate::msr::Msr`] but
    /// TSC_AUX, which needs RDTSCP. An MSR it lacks gets #GP, as on the CPU.
    pub fn has_msr(&self, msr: crate::msr::Msr) -> bool {
        msr != crate::msr::Msr::TscAux || self.tsc_aux
    }

    /// Checks an XSETBV of `value` into XCR`index` as the CPU would (SDM Vol. 2, XSETBV):
    /// #GP(0) unless XCR0, x87 set, AVX only with SSE, AVX-512's three bits together and only
    /// with AVX, MPX's two bits together, and nothing outside what is offered.
    pub fn check_xsetbv(
        &self,
        index: u32,
        value: u64,
    ) -> Result<(), crate::msr::GeneralProtection> {
        let avx512 = 0b1110_0000;
        let ok = index == 0
            && value & 1 != 0
            && value & !self.xcr0_allowed == 0
            && (value & 0b100 == 0 || value & 0b10 != 0)
            && (value & avx512 == 0 || (value & avx512 == avx512 && value & 0b100 != 0))
            && (value >> 3) & 1 == (value >> 4) & 1;
        if ok {
            Ok(())
        } else {
            Err(crate::msr::GeneralProtection)
        }
    }

    /// The guest's CPUID result for `leaf`/`subleaf`, given the host's answer `native` and the
    /// guest's CR4.
    #[inline]
    pub fn cpuid(&self, leaf: u32, subleaf: u32, native: [u32; 4], guest_cr4: u64) -> [u32; 4] {
        let [eax, ebx, ecx, edx] = native;
        // The TSC and crystal leaves (below) exist whatever the CPU's highest leaf: Linux reads
        // them only when CPUID.0:EAX reaches them. Leaves that become valid that way and that
        // the CPU lacks say nothing (zeros), not the highest leaf's data a CPU returns for
        // leaves beyond its range.
        let timing = self.tsc_khz != 0;
        match leaf {
            0 if timing => [eax.max(0x16), ebx, ecx, edx],
            l if timing && self.max_basic_leaf != 0 && l > self.max_basic_leaf && l < 0x15 => {
                [0; 4]
            }
            1 => {
                let mut ecx =
                    (ecx & !LEAF1_ECX_HIDDEN & !ECX_OSXSAVE) | ECX_HYPERVISOR | LEAF1_ECX_EMULATED;
                if self.xcr0_allowed == 0 {
                    ecx &= !((1 << 26) | (1 << 28)); // XSAVE, AVX
                } else if guest_cr4 & CR4_OSXSAVE != 0 {
                    ecx |= ECX_OSXSAVE;
                }
                // EBX[31:24]: the initial APIC ID, the emulated APIC's (0).
                [
                    eax,
                    ebx & 0x00ff_ffff,
                    ecx,
                    (edx & !LEAF1_EDX_HIDDEN) | EDX_APIC,
                ]
            }
            // Extended topology: the x2APIC ID (EDX) is the emulated APIC's (0).
            0xb | 0x1f => [eax, ebx, ecx, 0],
            7 if subleaf == 0 => {
                let mut ecx = ecx & !LEAF7_ECX_HIDDEN & !LEAF7_ECX_OSPKE;
                if !self.pku {
                    ecx &= !LEAF7_ECX_PKU;
                } else if guest_cr4 & CR4_PKE != 0 {
                    ecx |= LEAF7_ECX_OSPKE;
                }
                [eax, ebx & !LEAF7_EBX_HIDDEN, ecx, edx & !LEAF7_EDX_HIDDEN]
            }
            0xd if self.xcr0_allowed == 0 => [0; 4],
            0xd if subleaf == 0 => [
                self.xcr0_allowed as u32,
                // EBX: the size for the XCR0 in force, which is the guest's while it runs.
                ebx,
                self.xsave_size,
                (self.xcr0_allowed >> 32) as u32,
            ],
            // XSAVEOPT/XSAVEC/XGETBV1/XSAVES as the CPU has them, no XFD; no supervisor
            // components (IA32_XSS stays 0).
            0xd if subleaf == 1 => [eax & 0b1111, ebx, 0, 0],
            0xd if subleaf < 64 && self.xcr0_allowed & (1 << subleaf) == 0 => [0; 4],
            l if hidden_leaf(l) => [0; 4],
            CPUID_LEAF_BASE => {
                let s = CPUID_SIGNATURE;
                let word = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
                [CPUID_LEAF_MAX, word(0), word(4), word(8)]
            }
            l if l == CPUID_LEAF_BASE + 1 => [ABI_VERSION, 0, 0, 0],
            // The TSC and crystal leaves say the guest's real rates (the host's may describe a
            // TSC an emulator does not run at): TSC = ECX x EBX / EAX, with the crystal being
            // the APIC timer's clock, which Linux assumes it is.
            0x15 if self.tsc_khz != 0 => {
                let bus_khz = self.apic_bus_khz();
                let (denominator, numerator) = tsc_crystal_ratio(self.tsc_khz, bus_khz);
                [denominator, numerator, bus_khz.saturating_mul(1000), 0]
            }
            0x16 if self.tsc_khz != 0 => {
                let mhz = (self.tsc_khz / 1000).max(1);
                [mhz, mhz, (self.apic_bus_khz() / 1000).max(1), 0]
            }
            CPUID_LEAF_TIMING => [self.tsc_khz, self.apic_bus_khz(), 0, 0],
            l if l > CPUID_LEAF_BASE && l <= 0x4000_00ff => [0; 4],
            _ => native,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host with XSAVE, AVX and AVX-512 (components 0-2, 5-7) plus MPX and PKRU.
    fn host(leaf: u32, sub: u32) -> [u32; 4] {
        match (leaf, sub) {
            (0, _) => [0x1f, 0, 0, 0],
            (1, _) => [
                0x50654,
                0,
                (1 << 26) | (1 << 28) | (1 << 5) | (1 << 3) | ECX_OSXSAVE,
                0xffff_ffff,
            ],
            (0xd, 0) => [0x2ff, 0xa88, 0xa88, 0],
            (0xd, 2) => [256, 576, 0, 0],
            (0xd, 3) => [64, 960, 0, 0],
            (0xd, 4) => [64, 1024, 0, 0],
            (0xd, 5) => [64, 1088, 0, 0],
            (0xd, 6) => [512, 1152, 0, 0],
            (0xd, 7) => [1024, 1664, 0, 0],
            (0xd, 9) => [8, 2688, 0, 0],
            _ => [0; 4],
        }
    }

    #[test]
    fn the_tsc_crystal_ratio_stays_within_linux_s_32_bit_arithmetic() {
        // What Linux's native_calibrate_tsc computes, in 32 bits as it does.
        let linux_khz = |tsc_khz: u32, crystal_khz: u32| {
            let (den, num) = tsc_crystal_ratio(tsc_khz, crystal_khz);
            crystal_khz.checked_mul(num).expect("no 32-bit overflow") / den
        };
        // Bochs at 100 MHz (TSC and APIC clock equal, measured 1 kHz apart); a 4 MHz one.
        assert_eq!(tsc_crystal_ratio(100_000, 100_000), (1, 1));
        assert_eq!(linux_khz(100_001, 100_001), 100_001);
        assert_eq!(linux_khz(4_000, 4_000), 4_000);
        // Fast TSCs over the 1 GHz APIC clock: exact when the fraction is small, else within
        // a part per million.
        assert_eq!(tsc_crystal_ratio(2_100_000, 1_000_000), (10, 21));
        for tsc_khz in [2_893_456u32, 3_499_999, 1_000_001, 4_712_013, 5_999_999] {
            let got = linux_khz(tsc_khz, 1_000_000);
            let error = (f64::from(got) - f64::from(tsc_khz)).abs() / f64::from(tsc_khz);
            assert!(error < 1e-6, "{tsc_khz} kHz read as {got} kHz");
        }
    }

    #[test]
    fn xsave_components_offered_and_sized() {
        let p = CpuPolicy::from_host(host);
        assert_eq!(p.xcr0_allowed, 0xe7);
        assert_eq!(p.xsave_size, 1664 + 1024);
        let none = CpuPolicy::from_host(|l, s| if l == 1 { [0; 4] } else { host(l, s) });
        assert_eq!(
            none,
            CpuPolicy {
                phys_addr_bits: 36,
                max_basic_leaf: 0x1f,
                ..CpuPolicy::default()
            },
            "nothing but MAXPHYADDR, 36 without leaf 0x80000008"
        );
    }

    #[test]
    fn maxphyaddr_comes_from_leaf_0x80000008_and_bounds_physical_addresses() {
        let wide = |l: u32, s: u32| match l {
            0x8000_0000 => [0x8000_0008, 0, 0, 0],
            0x8000_0008 => [0x3027, 0, 0, 0], // 39 physical, 48 linear bits
            _ => host(l, s),
        };
        let p = CpuPolicy::from_host(wide);
        assert_eq!(p.phys_addr_bits, 39);
        assert!(!p.beyond_phys_addr(0x7f_ffff_f000 | 0x900));
        assert!(p.beyond_phys_addr(1 << 39));
        assert!(
            !CpuPolicy::default().beyond_phys_addr(u64::MAX),
            "unknown: no check"
        );
    }

    #[test]
    fn tsc_aux_only_with_rdtscp() {
        use crate::msr::Msr;
        let rdtscp = |l: u32, s: u32| match l {
            0x8000_0000 => [0x8000_0008, 0, 0, 0],
            0x8000_0001 => [0, 0, 0, 1 << 27],
            _ => host(l, s),
        };
        let p = CpuPolicy::from_host(rdtscp);
        assert!(p.tsc_aux && p.has_msr(Msr::TscAux) && p.has_msr(Msr::Lstar));
        // `host` has no extended leaves: no RDTSCP, so no TSC_AUX.
        let p = CpuPolicy::from_host(host);
        assert!(!p.has_msr(Msr::TscAux) && p.has_msr(Msr::KernelGsBase));
    }

    #[test]
    fn protection_keys_with_pku_and_its_xsave_component_only() {
        let with_pku = |l: u32, s: u32| match (l, s) {
            (7, 0) => [0, 0, LEAF7_ECX_PKU | LEAF7_ECX_OSPKE, 0],
            _ => host(l, s),
        };
        let p = CpuPolicy::from_host(with_pku);
        assert!(p.pku);
        assert_eq!(p.xcr0_allowed, 0x2e7);
        assert_eq!(p.xsave_size, 2688 + 8, "PKRU's 8 bytes at 2688");
        assert_eq!(p.check_xsetbv(0, 0x207), Ok(()));
        assert_eq!(p.cr4_forbidden() & CR4_PKE, 0, "the guest may set CR4.PKE");
        // OSPKE is the guest's CR4.PKE, not the host's.
        assert_eq!(p.cpuid(7, 0, with_pku(7, 0), 0)[2], LEAF7_ECX_PKU);
        assert_eq!(
            p.cpuid(7, 0, with_pku(7, 0), CR4_PKE)[2],
            LEAF7_ECX_PKU | LEAF7_ECX_OSPKE
        );
        assert_eq!(p.cpuid(0xd, 9, host(0xd, 9), 0), [8, 2688, 0, 0]);
        // Without PKU (`host`), none of it: the component, the bits, CR4.PKE.
        let q = CpuPolicy::from_host(host);
        assert!(!q.pku);
        assert_eq!(q.xcr0_allowed & XCR0_PKRU, 0);
        assert_ne!(q.cr4_forbidden() & CR4_PKE, 0);
        assert_eq!(q.cpuid(7, 0, with_pku(7, 0), CR4_PKE)[2], 0);
    }

    #[test]
    fn xsetbv_follows_the_sdm() {
        let p = CpuPolicy::from_host(host);
        for good in [1u64, 3, 7, 0xe7] {
            assert_eq!(p.check_xsetbv(0, good), Ok(()), "{good:#x}");
        }
        // No x87; AVX without SSE; AVX-512 partly or without AVX; MPX, PKRU (not offered);
        // XCR1 or another index.
        for bad in [0u64, 2, 5, 0x27, 0x63, 0xe3, 0x1f, 0x207] {
            assert!(p.check_xsetbv(0, bad).is_err(), "{bad:#x}");
        }
        assert!(p.check_xsetbv(1, 1).is_err());
        assert!(CpuPolicy::default().check_xsetbv(0, 1).is_err());
    }

    #[test]
    fn leaf1_sets_hypervisor_hides_vmx_and_shows_the_guests_osxsave() {
        let p = CpuPolicy::from_host(host);
        let r = p.cpuid(1, 0, host(1, 0), 0);
        assert_eq!(r[2] & ECX_HYPERVISOR, ECX_HYPERVISOR);
        assert_eq!(r[2] & LEAF1_ECX_HIDDEN, 0);
        assert_eq!(r[2] & ECX_OSXSAVE, 0, "the host's CR4.OSXSAVE leaked");
        assert_eq!(r[3] & EDX_APIC, EDX_APIC, "the emulated APIC");
        assert_eq!(r[2] & LEAF1_ECX_EMULATED, LEAF1_ECX_EMULATED);
        assert_eq!(r[1] >> 24, 0, "APIC ID 0");
        let p = p.with_tsc_hz(2_100_000_000);
        assert_eq!(
            p.cpuid(CPUID_LEAF_TIMING, 0, [9; 4], 0),
            [2_100_000, 1_000_000, 0, 0]
        );
        // Leaves 0x15 and 0x16 say the same rates: TSC = 1 GHz crystal x 21 / 10.
        assert_eq!(p.cpuid(0x15, 0, [9; 4], 0), [10, 21, 1_000_000_000, 0]);
        assert_eq!(p.cpuid(0x16, 0, [9; 4], 0), [2100, 2100, 1000, 0]);
        // Unmeasured: the host's.
        assert_eq!(CpuPolicy::from_host(host).cpuid(0x15, 0, [9; 4], 0), [9; 4]);
        // A CPU whose basic leaves end below them (Bochs's Skylake-X ends at 0xd): leaf 0 now
        // reaches 0x16, and the leaves in between that the CPU lacks read as zeros.
        let short = CpuPolicy {
            max_basic_leaf: 0xd,
            ..p
        };
        assert_eq!(short.cpuid(0, 0, [0xd, 1, 2, 3], 0), [0x16, 1, 2, 3]);
        assert_eq!(short.cpuid(0x13, 0, [9; 4], 0), [0; 4]);
        assert_eq!(short.cpuid(0x15, 0, [9; 4], 0), p.cpuid(0x15, 0, [9; 4], 0));
        assert_eq!(
            p.cpuid(0, 0, [0x1f, 1, 2, 3], 0),
            [0x1f, 1, 2, 3],
            "higher stays"
        );
        // A TSC slower than 1 GHz (Bochs's 4 MHz): the APIC timer counts no faster.
        assert_eq!(
            p.with_tsc_hz(4_000_000)
                .cpuid(CPUID_LEAF_TIMING, 0, [9; 4], 0),
            [4_000, 4_000, 0, 0]
        );
        assert_eq!(
            p.cpuid(1, 0, host(1, 0), CR4_OSXSAVE)[2] & ECX_OSXSAVE,
            ECX_OSXSAVE
        );
        // Without XSAVE support, XSAVE and AVX are hidden and leaf 0xD is empty.
        let none = CpuPolicy::default();
        assert_eq!(none.cpuid(1, 0, host(1, 0), CR4_OSXSAVE)[2] & (1 << 26), 0);
        assert_eq!(none.cpuid(0xd, 0, host(0xd, 0), 0), [0; 4]);
    }

    #[test]
    fn xsave_leaf_lists_only_offered_components() {
        let p = CpuPolicy::from_host(host);
        assert_eq!(p.cpuid(0xd, 0, host(0xd, 0), 0), [0xe7, 0xa88, 2688, 0]);
        assert_eq!(p.cpuid(0xd, 3, host(0xd, 3), 0), [0; 4], "MPX");
        assert_eq!(p.cpuid(0xd, 9, host(0xd, 9), 0), [0; 4], "PKRU");
        assert_eq!(p.cpuid(0xd, 2, host(0xd, 2), 0), host(0xd, 2));
        assert_eq!(p.cpuid(0xd, 1, [0x1f, 9, 0x100, 0], 0), [0xf, 9, 0, 0]);
    }

    #[test]
    fn hidden_features_and_leaves() {
        let p = CpuPolicy::from_host(host);
        let r = p.cpuid(7, 0, [0, u32::MAX, u32::MAX, u32::MAX], 0);
        assert_eq!(r[2] & (1 << 3), 0, "PKU");
        assert_eq!(r[1] & (1 << 14), 0, "MPX");
        assert_eq!(r[1] & 1, 1, "FSGSBASE stays");
        assert_eq!(r[1] & 2, 0, "TSC_ADJUST");
        assert_eq!(r[3] >> 26, 0, "speculation-control MSRs");
        assert_eq!(p.cpuid(0xa, 0, [7; 4], 0), [0; 4], "PMU");
        assert_eq!(p.cpuid(7, 1, [7; 4], 0), [7; 4]);
    }

    #[test]
    fn signature_leaves() {
        let p = CpuPolicy::default();
        let r = p.cpuid(0x4000_0000, 0, [9; 4], 0);
        assert_eq!(r[0], CPUID_LEAF_MAX);
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&r[1].to_le_bytes());
        sig[4..8].copy_from_slice(&r[2].to_le_bytes());
        sig[8..].copy_from_slice(&r[3].to_le_bytes());
        assert_eq!(&sig, CPUID_SIGNATURE);
        assert_eq!(p.cpuid(0x4000_0001, 0, [9; 4], 0)[0], ABI_VERSION);
        assert_eq!(
            p.cpuid(0x4000_0002, 0, [9; 4], 0),
            [0; 4],
            "a leaf in between"
        );
        assert_eq!(
            p.cpuid(0x4000_0011, 0, [9; 4], 0),
            [0; 4],
            "past the highest"
        );
        assert_eq!(p.cpuid(0, 0, [9, 8, 7, 6], 0), [9, 8, 7, 6]);
    }
}
