//! Negotiation against the capability MSRs of real Intel CPUs: a Core 2 X6800 (Merom, 2006: VMX
//! without EPT, secondary controls or TRUE MSRs), a Core i7-2635QM (Sandy Bridge, 2011: EPT
//! without accessed/dirty bits), a Pentium N3530 (Atom Silvermont, 2014) and a Core i7-6700K
//! (Skylake, 2015). The values come from VirtualBox's CPU database, each block from one machine;
//! tests/data/real-cpu-vmx-capability-msrs.txt cites the file of each.
//!
//! The expectations written out below (which features each CPU has, which CR4 bits it allows)
//! were decoded by hand from those values with the SDM (Vol. 3C, Appendix A), independently of
//! the code under test.

use super::*;

const REAL: &str = include_str!("../../../tests/data/real-cpu-vmx-capability-msrs.txt");

const CORE2: &str = "intel_core2_x6800";
const SANDY_BRIDGE: &str = "intel_core_i7_2635qm";
const SILVERMONT: &str = "intel_pentium_n3530";
const SKYLAKE: &str = "intel_core_i7_6700k";

fn cpus() -> impl Iterator<Item = FixtureCpu> {
    parse_fixture(REAL)
}

fn cpu(name: &str) -> FixtureCpu {
    cpus()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("{name} is not in the fixture"))
}

/// The names the fixture format gives the TRUE control MSRs (0x48d-0x490).
const TRUE_MSRS: [&str; 4] = [
    "IA32_VMX_TRUE_PINBASED",
    "IA32_VMX_TRUE_PROCBASED",
    "IA32_VMX_TRUE_EXIT",
    "IA32_VMX_TRUE_ENTRY",
];

#[test]
fn fixture_lists_exactly_the_msrs_each_cpu_has() {
    let mut count = 0;
    for cpu in cpus() {
        count += 1;
        let (name, raw) = (cpu.name, cpu.raw);
        let caps = Capabilities::new(raw);
        assert!(
            cpu.field("source")
                .is_some_and(|s| s.starts_with("https://github.com/VirtualBox/virtualbox/blob/")),
            "{name}: no source"
        );
        assert!(cpu.field("cpu").is_some(), "{name}: no CPU name");
        for msr in [
            "IA32_VMX_BASIC",
            "IA32_VMX_PINBASED_CTLS",
            "IA32_VMX_PROCBASED_CTLS",
            "IA32_VMX_EXIT_CTLS",
            "IA32_VMX_ENTRY_CTLS",
            "IA32_VMX_MISC",
            "IA32_VMX_CR0_FIXED0/1",
            "IA32_VMX_CR4_FIXED0/1",
        ] {
            assert!(cpu.lists(msr), "{name}: {msr} missing");
        }
        // SDM A.1: the TRUE MSRs exist exactly when IA32_VMX_BASIC bit 55 is 1.
        for msr in TRUE_MSRS {
            assert_eq!(cpu.lists(msr), caps.has_true_controls(), "{name}: {msr}");
        }
        // A.3.3: PROCBASED_CTLS2 exists exactly when "activate secondary controls" may be 1.
        let secondary = PrimaryProcBased::ACTIVATE_SECONDARY_CONTROLS.bits();
        assert_eq!(
            cpu.lists("IA32_VMX_PROCBASED_CTLS2"),
            ControlCap(raw.procbased).allows(secondary),
            "{name}: PROCBASED_CTLS2"
        );
        // A.10: EPT_VPID_CAP exists exactly when EPT or VPID may be enabled.
        let ept_or_vpid = (SecondaryProcBased::ENABLE_EPT | SecondaryProcBased::ENABLE_VPID).bits();
        assert_eq!(
            cpu.lists("IA32_VMX_EPT_VPID_CAP"),
            caps.secondary_proc_based().may_be_one() & ept_or_vpid != 0,
            "{name}: EPT_VPID_CAP"
        );
        // A.2: a TRUE MSR refines only the default1 class of its plain twin: the same allowed-1
        // settings, and no control forced that the plain MSR leaves free. (A transcription slip
        // in the fixture would most likely break this.)
        if caps.has_true_controls() {
            for (plain, true_) in [
                (raw.pinbased, raw.true_pinbased),
                (raw.procbased, raw.true_procbased),
                (raw.exit, raw.true_exit),
                (raw.entry, raw.true_entry),
            ] {
                let (plain, true_) = (ControlCap(plain), ControlCap(true_));
                assert_eq!(plain.may_be_one(), true_.may_be_one(), "{name}");
                assert_eq!(true_.must_be_one() & !plain.must_be_one(), 0, "{name}");
            }
        }
        assert_eq!(caps.vmcs_size(), 1024, "{name}");
        assert!(caps.vmcs_memory_type_wb(), "{name}");
    }
    assert_eq!(count, 4);
}

#[test]
fn every_real_cpu_with_ept_negotiates_sound_words() {
    let mut negotiated = 0;
    for cpu in cpus() {
        let caps = Capabilities::new(cpu.raw);
        match VmcsControls::negotiate(&caps) {
            Ok(c) => {
                negotiated += 1;
                assert_negotiation_sound(cpu.name, &caps, &c);
            }
            Err(e) => assert_eq!(cpu.name, CORE2, "{e}"),
        }
    }
    assert_eq!(negotiated, 3);
}

/// What each CPU offers, decoded by hand from its MSR values.
struct Offers {
    name: &'static str,
    vmcs_revision: u32,
    true_controls: bool,
    /// The VMX-preemption timer and its rate (IA32_VMX_MISC bits 4:0).
    preemption_timer: Option<u32>,
    unrestricted_guest: bool,
    ept_ad: bool,
    vpid: bool,
    invpcid: bool,
    xsaves: bool,
    tsc_scaling: bool,
}

const OFFERS: [Offers; 4] = [
    Offers {
        name: CORE2,
        vmcs_revision: 0x7,
        true_controls: false,
        preemption_timer: None,
        unrestricted_guest: false,
        ept_ad: false,
        vpid: false,
        invpcid: false,
        xsaves: false,
        tsc_scaling: false,
    },
    Offers {
        name: SANDY_BRIDGE,
        vmcs_revision: 0x10,
        true_controls: true,
        preemption_timer: Some(5),
        unrestricted_guest: true,
        ept_ad: false,
        vpid: true,
        invpcid: false,
        xsaves: false,
        tsc_scaling: false,
    },
    Offers {
        name: SILVERMONT,
        vmcs_revision: 0x2,
        true_controls: true,
        preemption_timer: Some(6),
        unrestricted_guest: true,
        ept_ad: false,
        vpid: true,
        invpcid: false,
        xsaves: false,
        tsc_scaling: false,
    },
    Offers {
        name: SKYLAKE,
        vmcs_revision: 0x4,
        true_controls: true,
        preemption_timer: Some(7),
        unrestricted_guest: true,
        ept_ad: true,
        vpid: true,
        invpcid: true,
        xsaves: true,
        tsc_scaling: false,
    },
];

#[test]
fn real_cpus_decode_and_negotiate_as_expected() {
    for o in OFFERS {
        let caps = Capabilities::new(cpu(o.name).raw);
        let name = o.name;
        assert_eq!(caps.vmcs_revision(), o.vmcs_revision, "{name}");
        assert_eq!(caps.has_true_controls(), o.true_controls, "{name}");
        assert_eq!(
            caps.preemption_timer(),
            o.preemption_timer.is_some(),
            "{name}"
        );
        if let Some(rate) = o.preemption_timer {
            assert_eq!(caps.preemption_timer_rate(), rate, "{name}");
        }
        assert_eq!(caps.unrestricted_guest(), o.unrestricted_guest, "{name}");
        assert_eq!(caps.ept_ad_bits(), o.ept_ad, "{name}");
        assert_eq!(caps.vpid_usable(), o.vpid, "{name}");
        assert_eq!(caps.tsc_scaling(), o.tsc_scaling, "{name}");
        let Ok(c) = VmcsControls::negotiate(&caps) else {
            assert_eq!(name, CORE2);
            continue;
        };
        // Every CPU with EPT here has all of these; the negotiation must take them.
        assert!(caps.ept_usable() && caps.invept_single_context(), "{name}");
        assert!(c.load_efer && c.save_preemption_timer, "{name}");
        assert_eq!((c.vpid, c.ept_ad), (o.vpid, o.ept_ad), "{name}");
        let on = |bit: SecondaryProcBased| c.secondary & bit.bits() != 0;
        assert!(on(SecondaryProcBased::ENABLE_RDTSCP), "{name}");
        assert_eq!(on(SecondaryProcBased::ENABLE_INVPCID), o.invpcid, "{name}");
        assert_eq!(
            on(SecondaryProcBased::ENABLE_XSAVES_XRSTORS),
            o.xsaves,
            "{name}"
        );
        // Unrestricted guest where the CPU has it (Multiboot guests start with paging off).
        assert_eq!(
            on(SecondaryProcBased::UNRESTRICTED_GUEST),
            o.unrestricted_guest,
            "{name}"
        );
        assert_eq!(c.unrestricted_guest, o.unrestricted_guest, "{name}");
        // Never asked for by the negotiation: TSC scaling is turned on per dilated VM.
        assert!(!on(SecondaryProcBased::USE_TSC_SCALING), "{name}");
    }
}

#[test]
fn core2_without_ept_is_refused_with_a_clear_error() {
    let caps = Capabilities::new(cpu(CORE2).raw);
    let err = VmcsControls::negotiate(&caps).unwrap_err();
    assert_eq!(err, NegotiationError::NoEpt);
    let mut buf = [0u8; 64];
    assert_eq!(
        display(&err, &mut buf),
        "EPT (4-level, write-back) is not supported"
    );
    // No TRUE MSRs: the plain ones rule, and with them CR3-load/store exiting is forced on.
    assert_eq!(caps.primary_proc_based(), ControlCap(caps.raw.procbased));
    let cr3 = (PrimaryProcBased::CR3_LOAD_EXITING | PrimaryProcBased::CR3_STORE_EXITING).bits();
    assert_eq!(caps.primary_proc_based().must_be_one() & cr3, cr3);
    // No secondary controls at all, and no preemption timer either.
    assert_eq!(caps.secondary_proc_based(), ControlCap(0));
    assert!(!caps.preemption_timer());
    assert_eq!(
        caps.pin_based()
            .negotiate(ControlKind::PinBased, PIN_REQUIRED, 0),
        Err(ControlError::Unsupported {
            kind: ControlKind::PinBased,
            missing: PinBased::ACTIVATE_PREEMPTION_TIMER.bits(),
        })
    );
}

/// Formats `value` into `buf` (the crate is `no_std`: no `String` here).
fn display<'a>(value: &dyn core::fmt::Display, buf: &'a mut [u8]) -> &'a str {
    struct Cursor<'b>(&'b mut [u8], usize);
    impl core::fmt::Write for Cursor<'_> {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let end = self.1 + s.len();
            self.0
                .get_mut(self.1..end)
                .ok_or(core::fmt::Error)?
                .copy_from_slice(s.as_bytes());
            self.1 = end;
            Ok(())
        }
    }
    let mut cursor = Cursor(buf, 0);
    core::fmt::write(&mut cursor, format_args!("{value}")).unwrap();
    let len = cursor.1;
    core::str::from_utf8(&buf[..len]).unwrap()
}

/// Takes the 1-setting of control `bit` away from a plain capability MSR and its TRUE twin.
fn forbid(plain: &mut u64, true_: &mut u64, bit: u32) {
    *plain &= !(1 << (32 + bit));
    *true_ &= !(1 << (32 + bit));
}

/// A change to a CPU's capabilities, named for the control it takes away.
type TakeAway = (&'static str, fn(&mut RawCapabilities), NegotiationError);

const fn unsupported(kind: ControlKind, missing: u32) -> NegotiationError {
    NegotiationError::Control(ControlError::Unsupported { kind, missing })
}

#[test]
fn taking_a_required_control_from_a_real_cpu_names_what_is_missing() {
    use ept_vpid_cap::{MEMORY_TYPE_WB, PAGE_WALK_4};
    let base = cpu(SANDY_BRIDGE).raw;
    assert!(VmcsControls::negotiate(&Capabilities::new(base)).is_ok());
    let cases: [TakeAway; 13] = [
        (
            "external-interrupt exiting",
            |r| forbid(&mut r.pinbased, &mut r.true_pinbased, 0),
            unsupported(ControlKind::PinBased, 1 << 0),
        ),
        (
            "NMI exiting",
            |r| forbid(&mut r.pinbased, &mut r.true_pinbased, 3),
            unsupported(ControlKind::PinBased, 1 << 3),
        ),
        (
            "preemption timer",
            |r| forbid(&mut r.pinbased, &mut r.true_pinbased, 6),
            NegotiationError::NoPreemptionTimer,
        ),
        (
            "HLT exiting",
            |r| forbid(&mut r.procbased, &mut r.true_procbased, 7),
            unsupported(ControlKind::PrimaryProcBased, 1 << 7),
        ),
        (
            "I/O bitmaps",
            |r| forbid(&mut r.procbased, &mut r.true_procbased, 25),
            unsupported(ControlKind::PrimaryProcBased, 1 << 25),
        ),
        (
            "MSR bitmaps",
            |r| forbid(&mut r.procbased, &mut r.true_procbased, 28),
            unsupported(ControlKind::PrimaryProcBased, 1 << 28),
        ),
        (
            // Without secondary controls there is no EPT.
            "activate secondary controls",
            |r| forbid(&mut r.procbased, &mut r.true_procbased, 31),
            NegotiationError::NoEpt,
        ),
        (
            "enable EPT",
            |r| r.procbased2 &= !(1 << (32 + 1)),
            NegotiationError::NoEpt,
        ),
        (
            "4-level EPT walk",
            |r| r.ept_vpid &= !PAGE_WALK_4,
            NegotiationError::NoEpt,
        ),
        (
            "write-back EPT tables",
            |r| r.ept_vpid &= !MEMORY_TYPE_WB,
            NegotiationError::NoEpt,
        ),
        (
            "host address-space size",
            |r| forbid(&mut r.exit, &mut r.true_exit, 9),
            unsupported(ControlKind::Exit, 1 << 9),
        ),
        (
            "acknowledge interrupt on exit",
            |r| forbid(&mut r.exit, &mut r.true_exit, 15),
            unsupported(ControlKind::Exit, 1 << 15),
        ),
        (
            "IA-32e mode guest",
            |r| forbid(&mut r.entry, &mut r.true_entry, 9),
            unsupported(ControlKind::Entry, 1 << 9),
        ),
    ];
    for (what, take_away, expected) in cases {
        let mut raw = base;
        take_away(&mut raw);
        assert_eq!(
            VmcsControls::negotiate(&Capabilities::new(raw)),
            Err(expected),
            "{what}"
        );
    }
    let mut raw = base;
    forbid(&mut raw.procbased, &mut raw.true_procbased, 7);
    let err = VmcsControls::negotiate(&Capabilities::new(raw)).unwrap_err();
    let mut buf = [0u8; 80];
    assert_eq!(
        display(&err, &mut buf),
        "PrimaryProcBased controls: required bits 0x80 not supported"
    );
}

#[test]
fn taking_a_wanted_control_from_a_real_cpu_drops_it_cleanly() {
    let base = cpu(SKYLAKE).raw;
    // No INVVPID: VPID stays off although the secondary control itself is allowed.
    let mut raw = base;
    raw.ept_vpid &= !ept_vpid_cap::INVVPID;
    let caps = Capabilities::new(raw);
    let c = VmcsControls::negotiate(&caps).unwrap();
    assert!(!c.vpid);
    assert_negotiation_sound("skylake without INVVPID", &caps, &c);
    // No "load IA32_EFER" on entry: EFER is switched by neither side.
    let mut raw = base;
    forbid(&mut raw.entry, &mut raw.true_entry, 15);
    let caps = Capabilities::new(raw);
    let c = VmcsControls::negotiate(&caps).unwrap();
    assert!(!c.load_efer);
    assert_negotiation_sound("skylake without entry EFER load", &caps, &c);
    // No "save preemption timer": the flag says so, the bit is off.
    let mut raw = base;
    forbid(&mut raw.exit, &mut raw.true_exit, 22);
    let caps = Capabilities::new(raw);
    let c = VmcsControls::negotiate(&caps).unwrap();
    assert!(!c.save_preemption_timer);
    assert_negotiation_sound("skylake without saving the timer", &caps, &c);
}

#[test]
fn cr_fixed_bits_on_real_cpus() {
    const CR0_GUEST: u64 = 0x8001_0031; // PE | ET | NE | WP | PG, as the kernel builds it
    const CR0_NE: u64 = 1 << 5;
    const CR4_VMXE: u64 = 1 << 13;
    const CR4_OSXSAVE: u64 = 1 << 18;
    const CR4_SMEP: u64 = 1 << 20;
    const CR4_PKE: u64 = 1 << 22;
    // Which of OSXSAVE, SMEP and PKE each CPU's IA32_VMX_CR4_FIXED1 allows.
    let cr4_allowed = [
        (CORE2, 0),
        (SANDY_BRIDGE, CR4_OSXSAVE),
        (SILVERMONT, CR4_SMEP),
        (SKYLAKE, CR4_OSXSAVE | CR4_SMEP),
    ];
    for (name, allowed) in cr4_allowed {
        let caps = Capabilities::new(cpu(name).raw);
        assert_cr_fixed_bits(name, &caps);
        assert_eq!(caps.fix_cr0(CR0_GUEST, false), CR0_GUEST, "{name}");
        assert_eq!(caps.fix_cr4(0), CR4_VMXE, "{name}");
        assert_eq!(
            caps.fix_cr4(CR4_OSXSAVE | CR4_SMEP | CR4_PKE),
            CR4_VMXE | allowed,
            "{name}"
        );
        if caps.unrestricted_guest() {
            // Real mode without paging: only NE stays forced.
            assert_eq!(caps.fix_cr0(0, true), CR0_NE, "{name}");
        }
    }
}
