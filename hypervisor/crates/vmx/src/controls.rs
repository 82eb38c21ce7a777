//! The VMX control bits this hypervisor asks for, by name (SDM Vol. 3C, 25.6 and 25.7-25.8).

use bitflags::bitflags;

bitflags! {
    /// Pin-based VM-execution controls (SDM 25.6.1, Table 25-5).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PinBased: u32 {
        const EXTERNAL_INTERRUPT_EXITING = 1 << 0;
        const NMI_EXITING = 1 << 3;
        const VIRTUAL_NMIS = 1 << 5;
        const ACTIVATE_PREEMPTION_TIMER = 1 << 6;
    }

    /// Primary processor-based VM-execution controls (SDM 25.6.2, Table 25-6).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PrimaryProcBased: u32 {
        const INTERRUPT_WINDOW_EXITING = 1 << 2;
        const NMI_WINDOW_EXITING = 1 << 22;
        const USE_TSC_OFFSETTING = 1 << 3;
        const HLT_EXITING = 1 << 7;
        const INVLPG_EXITING = 1 << 9;
        const MWAIT_EXITING = 1 << 10;
        const RDPMC_EXITING = 1 << 11;
        const RDTSC_EXITING = 1 << 12;
        const CR3_LOAD_EXITING = 1 << 15;
        const CR3_STORE_EXITING = 1 << 16;
        const CR8_LOAD_EXITING = 1 << 19;
        const CR8_STORE_EXITING = 1 << 20;
        const USE_TPR_SHADOW = 1 << 21;
        const MOV_DR_EXITING = 1 << 23;
        const UNCONDITIONAL_IO_EXITING = 1 << 24;
        const USE_IO_BITMAPS = 1 << 25;
        const MONITOR_TRAP_FLAG = 1 << 27;
        const USE_MSR_BITMAPS = 1 << 28;
        const MONITOR_EXITING = 1 << 29;
        const PAUSE_EXITING = 1 << 30;
        const ACTIVATE_SECONDARY_CONTROLS = 1 << 31;
    }

    /// Secondary processor-based VM-execution controls (SDM 25.6.2, Table 25-7).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SecondaryProcBased: u32 {
        const VIRTUALIZE_APIC_ACCESSES = 1 << 0;
        const ENABLE_EPT = 1 << 1;
        const DESCRIPTOR_TABLE_EXITING = 1 << 2;
        const ENABLE_RDTSCP = 1 << 3;
        const ENABLE_VPID = 1 << 5;
        const WBINVD_EXITING = 1 << 6;
        const UNRESTRICTED_GUEST = 1 << 7;
        const ENABLE_INVPCID = 1 << 12;
        const ENABLE_XSAVES_XRSTORS = 1 << 20;
        const USE_TSC_SCALING = 1 << 25;
    }

    /// Primary VM-exit controls (SDM 25.7.1, Table 25-13).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ExitControls: u32 {
        const SAVE_DEBUG_CONTROLS = 1 << 2;
        const HOST_ADDRESS_SPACE_SIZE = 1 << 9;
        const ACK_INTERRUPT_ON_EXIT = 1 << 15;
        const SAVE_IA32_PAT = 1 << 18;
        const LOAD_IA32_PAT = 1 << 19;
        const SAVE_IA32_EFER = 1 << 20;
        const LOAD_IA32_EFER = 1 << 21;
        const SAVE_PREEMPTION_TIMER = 1 << 22;
    }

    /// VM-entry controls (SDM 25.8.1, Table 25-15).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct EntryControls: u32 {
        const LOAD_DEBUG_CONTROLS = 1 << 2;
        const IA32E_MODE_GUEST = 1 << 9;
        const LOAD_IA32_PAT = 1 << 14;
        const LOAD_IA32_EFER = 1 << 15;
    }
}

use crate::caps::{Capabilities, ControlError, ControlKind};

/// The negotiated control words of every VMCS this hypervisor builds, plus the optional
/// features they turned on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmcsControls {
    pub pin: u32,
    pub primary: u32,
    pub secondary: u32,
    pub exit: u32,
    pub entry: u32,
    /// EPT accessed/dirty flags are enabled in the EPTP.
    pub ept_ad: bool,
    /// VPIDs tag the guests' TLB entries.
    pub vpid: bool,
    /// Guests may run with paging off or in real mode (SDM 26.6): Multiboot kernels start in
    /// 32-bit protected mode without paging.
    pub unrestricted_guest: bool,
    /// The CPU saves the remaining preemption-timer count on exit. The scheduler does not rely
    /// on it: it reloads the timer from the quantum's host-clock deadline before every entry but
    /// a bounded run of fast re-entries (so exit handling is charged to the quantum); it is
    /// reported at boot.
    pub save_preemption_timer: bool,
    /// "Use TSC offsetting" and "use TSC scaling" may both be set (SDM 25.6.5, 26.3): a VM's
    /// TSC can run slower than the host's in hardware.
    pub tsc_scaling: bool,
    /// "RDTSC exiting" may be set (every VMX CPU has it).
    pub rdtsc_exiting: bool,
    /// "Use TSC offsetting" may be set (so may a guest's WRMSR of IA32_TSC be carried out in
    /// hardware).
    pub tsc_offsetting: bool,
    /// IA32_EFER is switched by the VM-entry/VM-exit load controls (else by the VMCS MSR-load
    /// lists, see the kernel's `vm.rs`).
    pub load_efer: bool,
    /// IA32_PAT is switched by the VM-entry/VM-exit load controls (else by the MSR-load lists).
    pub load_pat: bool,
    /// Virtual NMIs (SDM 25.6.1): an injected NMI blocks further NMIs until the guest's IRET,
    /// and NMI-window exiting (which needs it) tells when that happened. Without them the CPU
    /// keeps NMIs blocked after the first injected one (IRET does not unblock NMIs while NMI
    /// exiting is on, SDM 26.3), so a guest gets one NMI.
    pub virtual_nmis: bool,
}

/// How a VM whose TSC is not the host's reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TscMode {
    /// The CPU computes it: TSC offsetting and scaling (SDM 26.3, 27.6.5), RDTSC runs natively.
    Scaling,
    /// RDTSC and RDTSCP exit (RDTSC exiting) and the hypervisor computes the same value.
    Exiting,
}

impl VmcsControls {
    /// The primary and secondary controls of a VM whose TSC is scaled and offset from the
    /// host's, and how it gets it: in hardware where the CPU can (`prefer_scaling`), else by
    /// RDTSC exiting; `None` when the CPU has neither.
    pub fn with_guest_tsc(&self, prefer_scaling: bool) -> Option<(TscMode, u32, u32)> {
        if prefer_scaling && self.tsc_scaling {
            Some((
                TscMode::Scaling,
                self.primary | PrimaryProcBased::USE_TSC_OFFSETTING.bits(),
                self.secondary | SecondaryProcBased::USE_TSC_SCALING.bits(),
            ))
        } else if self.rdtsc_exiting {
            Some((
                TscMode::Exiting,
                self.primary | PrimaryProcBased::RDTSC_EXITING.bits(),
                self.secondary,
            ))
        } else {
            None
        }
    }
}

/// Primary controls that keep guest-writable CPU state per VM or hide host state (docs/isolation.md):
/// MOV to/from CR8 exit (the task-priority register is the host's local APIC's otherwise), RDPMC
/// exits (the performance counters are the host's), MONITOR/MWAIT exit (they are hidden from
/// CPUID and raise #UD; an MWAIT could park the only CPU in a deep C-state). Every VMX CPU with
/// 64-bit support offers them.
pub const ISOLATION_EXITING: PrimaryProcBased = PrimaryProcBased::CR8_LOAD_EXITING
    .union(PrimaryProcBased::CR8_STORE_EXITING)
    .union(PrimaryProcBased::RDPMC_EXITING)
    .union(PrimaryProcBased::MONITOR_EXITING)
    .union(PrimaryProcBased::MWAIT_EXITING);

/// Why VMX cannot be used the way this hypervisor needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NegotiationError {
    Control(ControlError),
    /// EPT with a 4-level walk and write-back tables is required for guest memory isolation.
    NoEpt,
    /// The VMX-preemption timer is required to preempt guests.
    NoPreemptionTimer,
}

impl From<ControlError> for NegotiationError {
    fn from(e: ControlError) -> Self {
        Self::Control(e)
    }
}

impl core::fmt::Display for NegotiationError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Control(e) => e.fmt(f),
            Self::NoEpt => f.write_str("EPT (4-level, write-back) is not supported"),
            Self::NoPreemptionTimer => f.write_str("the VMX-preemption timer is not supported"),
        }
    }
}

/// Keeps the exit bits `exit_bits` and entry bits `entry_bits` of an MSR's save/load controls
/// only if all of them were granted: half a switch is worse than none. Bits the CPU forces stay.
/// Returns the words and whether the switch is on.
fn all_or_none(
    caps: &Capabilities,
    exit: u32,
    entry: u32,
    exit_bits: u32,
    entry_bits: u32,
) -> (u32, u32, bool) {
    if exit & exit_bits == exit_bits && entry & entry_bits == entry_bits {
        (exit, entry, true)
    } else {
        (
            exit & !(exit_bits & !caps.exit().must_be_one()),
            entry & !(entry_bits & !caps.entry().must_be_one()),
            false,
        )
    }
}

impl VmcsControls {
    /// Chooses every control word from the capability MSRs.
    ///
    /// Required: external-interrupt and NMI exiting and the preemption timer (the hypervisor
    /// must get the CPU back), HLT exiting, I/O and MSR bitmaps (the device and MSR policies),
    /// EPT, a 64-bit host and a 64-bit (IA-32e mode) guest. Wanted when offered: VPID, EPT A/D
    /// bits, RDTSCP/INVPCID/XSAVES pass-through (so those instructions do not #UD in guests),
    /// saving the preemption timer, and switching IA32_EFER through the VMCS.
    pub fn negotiate(caps: &Capabilities) -> Result<Self, NegotiationError> {
        if !caps.ept_usable() {
            return Err(NegotiationError::NoEpt);
        }
        if !caps.preemption_timer() {
            return Err(NegotiationError::NoPreemptionTimer);
        }
        let pin = caps.pin_based().negotiate(
            ControlKind::PinBased,
            (PinBased::EXTERNAL_INTERRUPT_EXITING
                | PinBased::NMI_EXITING
                | PinBased::ACTIVATE_PREEMPTION_TIMER)
                .bits(),
            PinBased::VIRTUAL_NMIS.bits(),
        )?;
        // NMI-window exiting is only allowed with virtual NMIs (SDM 26.2.1.1); it is set and
        // cleared at run time, so only its availability is checked here.
        let virtual_nmis = pin & PinBased::VIRTUAL_NMIS.bits() != 0
            && caps.primary_proc_based().may_be_one() & PrimaryProcBased::NMI_WINDOW_EXITING.bits()
                != 0;
        let pin = if virtual_nmis {
            pin
        } else {
            pin & !PinBased::VIRTUAL_NMIS.bits()
        };
        let primary = caps.primary_proc_based().negotiate(
            ControlKind::PrimaryProcBased,
            (PrimaryProcBased::HLT_EXITING
                | PrimaryProcBased::USE_IO_BITMAPS
                | PrimaryProcBased::USE_MSR_BITMAPS
                | PrimaryProcBased::ACTIVATE_SECONDARY_CONTROLS
                | ISOLATION_EXITING)
                .bits(),
            0,
        )?;
        let wanted2 = SecondaryProcBased::ENABLE_VPID
            | SecondaryProcBased::UNRESTRICTED_GUEST
            | SecondaryProcBased::ENABLE_RDTSCP
            | SecondaryProcBased::ENABLE_INVPCID
            | SecondaryProcBased::ENABLE_XSAVES_XRSTORS;
        let secondary = caps.secondary_proc_based().negotiate(
            ControlKind::SecondaryProcBased,
            SecondaryProcBased::ENABLE_EPT.bits(),
            wanted2.bits(),
        )?;
        let vpid = secondary & SecondaryProcBased::ENABLE_VPID.bits() != 0 && caps.vpid_usable();
        let secondary = if vpid {
            secondary
        } else {
            secondary & !SecondaryProcBased::ENABLE_VPID.bits()
        };
        let exit = caps.exit().negotiate(
            ControlKind::Exit,
            (ExitControls::HOST_ADDRESS_SPACE_SIZE
                | ExitControls::ACK_INTERRUPT_ON_EXIT
                | ExitControls::SAVE_DEBUG_CONTROLS)
                .bits(),
            (ExitControls::SAVE_IA32_EFER
                | ExitControls::LOAD_IA32_EFER
                | ExitControls::SAVE_IA32_PAT
                | ExitControls::LOAD_IA32_PAT
                | ExitControls::SAVE_PREEMPTION_TIMER)
                .bits(),
        )?;
        let entry = caps.entry().negotiate(
            ControlKind::Entry,
            (EntryControls::IA32E_MODE_GUEST | EntryControls::LOAD_DEBUG_CONTROLS).bits(),
            (EntryControls::LOAD_IA32_EFER | EntryControls::LOAD_IA32_PAT).bits(),
        )?;
        // EFER is switched by the VMCS only when all three controls are on; otherwise none is
        // used, and IA-32e mode guest sets the guest's LMA/LME on entry (SDM 27.3.2.1). PAT
        // likewise; without its controls the MSR-load lists switch it.
        let (exit, entry, load_efer) = all_or_none(
            caps,
            exit,
            entry,
            (ExitControls::SAVE_IA32_EFER | ExitControls::LOAD_IA32_EFER).bits(),
            EntryControls::LOAD_IA32_EFER.bits(),
        );
        let (exit, entry, load_pat) = all_or_none(
            caps,
            exit,
            entry,
            (ExitControls::SAVE_IA32_PAT | ExitControls::LOAD_IA32_PAT).bits(),
            EntryControls::LOAD_IA32_PAT.bits(),
        );
        Ok(Self {
            pin,
            primary,
            secondary,
            exit,
            entry,
            ept_ad: caps.ept_ad_bits(),
            vpid,
            unrestricted_guest: secondary & SecondaryProcBased::UNRESTRICTED_GUEST.bits() != 0,
            save_preemption_timer: exit & ExitControls::SAVE_PREEMPTION_TIMER.bits() != 0,
            tsc_scaling: caps.primary_proc_based().may_be_one()
                & PrimaryProcBased::USE_TSC_OFFSETTING.bits()
                != 0
                && caps.secondary_proc_based().may_be_one()
                    & SecondaryProcBased::USE_TSC_SCALING.bits()
                    != 0,
            rdtsc_exiting: caps.primary_proc_based().may_be_one()
                & PrimaryProcBased::RDTSC_EXITING.bits()
                != 0,
            tsc_offsetting: caps.primary_proc_based().may_be_one()
                & PrimaryProcBased::USE_TSC_OFFSETTING.bits()
                != 0,
            load_efer,
            load_pat,
            virtual_nmis,
        })
    }
}
