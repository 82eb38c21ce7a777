//! Negotiation against the capability MSRs of Bochs's CPU models (read by a bare-metal probe
//! kernel with RDMSR) and of real Intel CPUs (VirtualBox's CPU database, see [`real_cpus`]). The
//! fixtures are in tests/data/; the helpers here parse them and check a negotiation against the
//! SDM's rules, for both sets.

use super::*;
use crate::controls::*;

mod real_cpus;

const FIXTURE: &str = include_str!("../../tests/data/bochs-vmx-capability-msrs.txt");

fn parse_u64(s: &str) -> u64 {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).unwrap()
}

/// One CPU of a fixture file.
struct FixtureCpu {
    name: &'static str,
    /// Its lines, for checks on which MSRs the fixture lists.
    block: &'static str,
    raw: RawCapabilities,
}

impl FixtureCpu {
    /// Whether the block has a line `MSR <msr> = ...`.
    fn lists(&self, msr: &str) -> bool {
        self.block
            .lines()
            .filter_map(|l| l.strip_prefix("MSR "))
            .any(|l| l.split_once('=').is_some_and(|(key, _)| key.trim() == msr))
    }

    /// The value of a `<key>: value` line of the block.
    fn field(&self, key: &str) -> Option<&'static str> {
        self.block
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .map(str::trim)
    }
}

/// Every CPU of a fixture file: blocks start with `model: NAME`, MSR lines read
/// `MSR NAME = value` (or `= value0 / value1` for the CR fixed pairs); other lines are notes. An
/// MSR name the parser does not know is an error, so a typo cannot silently leave a value at 0.
fn parse_fixture(text: &'static str) -> impl Iterator<Item = FixtureCpu> {
    text.split("model: ").skip(1).map(|block| {
        let name = block.lines().next().unwrap().trim();
        let mut raw = RawCapabilities::default();
        for line in block.lines().filter_map(|l| l.strip_prefix("MSR ")) {
            let (key, value) = line.split_once('=').unwrap();
            let key = key.trim();
            if let Some((a, b)) = value.split_once('/') {
                let (a, b) = (parse_u64(a), parse_u64(b));
                match key {
                    "IA32_VMX_CR0_FIXED0/1" => (raw.cr0_fixed0, raw.cr0_fixed1) = (a, b),
                    "IA32_VMX_CR4_FIXED0/1" => (raw.cr4_fixed0, raw.cr4_fixed1) = (a, b),
                    _ => panic!("{name}: unknown pair {key}"),
                }
                continue;
            }
            let v = parse_u64(value);
            match key {
                "IA32_VMX_BASIC" => raw.basic = v,
                "IA32_VMX_PINBASED_CTLS" => raw.pinbased = v,
                "IA32_VMX_PROCBASED_CTLS" => raw.procbased = v,
                "IA32_VMX_EXIT_CTLS" => raw.exit = v,
                "IA32_VMX_ENTRY_CTLS" => raw.entry = v,
                "IA32_VMX_TRUE_PINBASED" => raw.true_pinbased = v,
                "IA32_VMX_TRUE_PROCBASED" => raw.true_procbased = v,
                "IA32_VMX_TRUE_EXIT" => raw.true_exit = v,
                "IA32_VMX_TRUE_ENTRY" => raw.true_entry = v,
                "IA32_VMX_PROCBASED_CTLS2" => raw.procbased2 = v,
                "IA32_VMX_EPT_VPID_CAP" => raw.ept_vpid = v,
                "IA32_VMX_MISC" => raw.misc = v,
                // Recorded for completeness; nothing negotiates with them.
                "IA32_VMX_VMFUNC" | "IA32_VMX_VMCS_ENUM" => {}
                _ => panic!("{name}: unknown MSR {key}"),
            }
        }
        FixtureCpu { name, block, raw }
    })
}

/// (model name, capabilities) for every Bochs model in the fixture.
fn models() -> impl Iterator<Item = (&'static str, RawCapabilities)> {
    parse_fixture(FIXTURE).map(|cpu| (cpu.name, cpu.raw))
}

/// Every negotiated word must honour both halves of its capability MSR.
fn assert_legal(cap: ControlCap, word: u32, name: &str, what: &str) {
    assert_eq!(
        word & cap.must_be_one(),
        cap.must_be_one(),
        "{name} {what}: a forced bit is 0"
    );
    assert_eq!(
        word & !cap.may_be_one(),
        0,
        "{name} {what}: a disallowed bit is 1"
    );
}

/// The bits `VmcsControls::negotiate` requires and wants, per word, written out again here as the
/// test's own statement of the policy (`controls.rs` documents it).
const PIN_REQUIRED: u32 = PinBased::EXTERNAL_INTERRUPT_EXITING
    .union(PinBased::NMI_EXITING)
    .union(PinBased::ACTIVATE_PREEMPTION_TIMER)
    .bits();
const PRIMARY_REQUIRED: u32 = PrimaryProcBased::HLT_EXITING
    .union(PrimaryProcBased::USE_IO_BITMAPS)
    .union(PrimaryProcBased::USE_MSR_BITMAPS)
    .union(PrimaryProcBased::ACTIVATE_SECONDARY_CONTROLS)
    .union(PrimaryProcBased::CR8_LOAD_EXITING)
    .union(PrimaryProcBased::CR8_STORE_EXITING)
    .union(PrimaryProcBased::RDPMC_EXITING)
    .union(PrimaryProcBased::MONITOR_EXITING)
    .union(PrimaryProcBased::MWAIT_EXITING)
    .bits();
const SECONDARY_REQUIRED: u32 = SecondaryProcBased::ENABLE_EPT.bits();
/// Wanted secondary controls that need nothing beyond their allowed-1 bit.
const SECONDARY_WANTED_PLAIN: [SecondaryProcBased; 4] = [
    SecondaryProcBased::UNRESTRICTED_GUEST,
    SecondaryProcBased::ENABLE_RDTSCP,
    SecondaryProcBased::ENABLE_INVPCID,
    SecondaryProcBased::ENABLE_XSAVES_XRSTORS,
];
const EXIT_REQUIRED: u32 = ExitControls::HOST_ADDRESS_SPACE_SIZE
    .union(ExitControls::ACK_INTERRUPT_ON_EXIT)
    .union(ExitControls::SAVE_DEBUG_CONTROLS)
    .bits();
const EXIT_WANTED: u32 = ExitControls::SAVE_IA32_EFER
    .union(ExitControls::LOAD_IA32_EFER)
    .union(ExitControls::SAVE_IA32_PAT)
    .union(ExitControls::LOAD_IA32_PAT)
    .union(ExitControls::SAVE_PREEMPTION_TIMER)
    .bits();
const ENTRY_REQUIRED: u32 = EntryControls::IA32E_MODE_GUEST
    .union(EntryControls::LOAD_DEBUG_CONTROLS)
    .bits();
const ENTRY_WANTED: u32 = EntryControls::LOAD_IA32_EFER
    .union(EntryControls::LOAD_IA32_PAT)
    .bits();

/// Checks a successful negotiation against the CPU's capabilities: every word is legal (forced
/// bits set, disallowed bits clear), every required control is on, every wanted control is on
/// exactly when the CPU offers it, and no other control is on unless the CPU forces it.
fn assert_negotiation_sound(name: &str, caps: &Capabilities, c: &VmcsControls) {
    let words = [
        (
            "pin",
            caps.pin_based(),
            c.pin,
            PIN_REQUIRED,
            PinBased::VIRTUAL_NMIS.bits(),
        ),
        (
            "primary",
            caps.primary_proc_based(),
            c.primary,
            PRIMARY_REQUIRED,
            0,
        ),
        (
            "secondary",
            caps.secondary_proc_based(),
            c.secondary,
            SECONDARY_REQUIRED,
            SecondaryProcBased::ENABLE_VPID.bits()
                | SECONDARY_WANTED_PLAIN.iter().fold(0, |a, b| a | b.bits()),
        ),
        ("exit", caps.exit(), c.exit, EXIT_REQUIRED, EXIT_WANTED),
        ("entry", caps.entry(), c.entry, ENTRY_REQUIRED, ENTRY_WANTED),
    ];
    for (what, cap, word, required, wanted) in words {
        assert_legal(cap, word, name, what);
        assert_eq!(
            word & required,
            required,
            "{name} {what}: a required bit is 0"
        );
        assert_eq!(
            word & !(cap.must_be_one() | required | wanted),
            0,
            "{name} {what}: a control nobody asked for is on ({word:#x})"
        );
    }

    // Wanted controls: on exactly when offered.
    for bit in SECONDARY_WANTED_PLAIN {
        assert_eq!(
            c.secondary & bit.bits() != 0,
            caps.secondary_proc_based().allows(bit.bits()),
            "{name}: {bit:?}"
        );
    }
    let vpid_bit = SecondaryProcBased::ENABLE_VPID.bits();
    assert_eq!(c.vpid, caps.vpid_usable(), "{name}: VPID");
    assert_eq!(
        c.secondary & vpid_bit != 0,
        c.vpid,
        "{name}: VPID bit vs flag"
    );
    assert_eq!(c.ept_ad, caps.ept_ad_bits(), "{name}: EPT A/D");
    // Virtual NMIs: on exactly when the CPU offers them and NMI-window exiting.
    let vnmi = caps.pin_based().allows(PinBased::VIRTUAL_NMIS.bits())
        && caps
            .primary_proc_based()
            .allows(PrimaryProcBased::NMI_WINDOW_EXITING.bits());
    assert_eq!(c.virtual_nmis, vnmi, "{name}: virtual NMIs");
    assert_eq!(
        c.pin & PinBased::VIRTUAL_NMIS.bits() != 0,
        vnmi || caps.pin_based().must_be_one() & PinBased::VIRTUAL_NMIS.bits() != 0,
        "{name}: virtual-NMI bit vs flag"
    );
    let timer = ExitControls::SAVE_PREEMPTION_TIMER.bits();
    assert_eq!(
        c.save_preemption_timer,
        caps.exit().allows(timer),
        "{name}: save preemption timer"
    );
    assert_eq!(c.exit & timer != 0, c.save_preemption_timer, "{name}");
    let exit_efer = (ExitControls::SAVE_IA32_EFER | ExitControls::LOAD_IA32_EFER).bits();
    let entry_efer = EntryControls::LOAD_IA32_EFER.bits();
    assert_eq!(
        c.load_efer,
        caps.exit().allows(exit_efer) && caps.entry().allows(entry_efer),
        "{name}: EFER switching"
    );
    let exit_pat = (ExitControls::SAVE_IA32_PAT | ExitControls::LOAD_IA32_PAT).bits();
    let entry_pat = EntryControls::LOAD_IA32_PAT.bits();
    assert_eq!(
        c.load_pat,
        caps.exit().allows(exit_pat) && caps.entry().allows(entry_pat),
        "{name}: PAT switching"
    );
    if !c.load_pat {
        assert_eq!(c.exit & exit_pat & !caps.exit().must_be_one(), 0, "{name}");
        assert_eq!(
            c.entry & entry_pat & !caps.entry().must_be_one(),
            0,
            "{name}"
        );
    }
    if c.load_efer {
        assert_eq!(c.exit & exit_efer, exit_efer, "{name}");
        assert_eq!(c.entry & entry_efer, entry_efer, "{name}");
    } else {
        // Half an EFER switch is worse than none: only forced bits may remain.
        assert_eq!(c.exit & exit_efer & !caps.exit().must_be_one(), 0, "{name}");
        assert_eq!(
            c.entry & entry_efer & !caps.entry().must_be_one(),
            0,
            "{name}"
        );
    }
    // With TRUE controls, the default-1 CR3 exiting controls can be turned off.
    if caps.has_true_controls() {
        let cr3 = (PrimaryProcBased::CR3_LOAD_EXITING | PrimaryProcBased::CR3_STORE_EXITING).bits();
        assert_eq!(c.primary & cr3, 0, "{name}: CR3 exiting left on");
    }
}

/// CR0/CR4 with the fixed bits applied (SDM A.7-A.8): every FIXED0 bit set, every bit outside
/// FIXED1 clear, every flexible bit as given. With unrestricted guest, PE and PG are flexible.
fn assert_cr_fixed_bits(name: &str, caps: &Capabilities) {
    const PE_PG: u64 = (1 << 0) | (1 << 31);
    let raw = &caps.raw;
    // The guest CR0 the kernel builds (PE, ET, NE, WP, PG) and CR4 (PAE, OSFXSR, OSXMMEXCPT).
    let samples = [0, u64::MAX, 0x8001_0031, 0x620, 0x5555_5555_5555_5555];
    for v in samples {
        let check = |what: &str, fixed: u64, fixed0: u64, fixed1: u64| {
            assert_eq!(
                fixed & fixed0,
                fixed0,
                "{name} {what}({v:#x}): FIXED0 bit clear"
            );
            assert_eq!(
                fixed & !fixed1,
                0,
                "{name} {what}({v:#x}): bit outside FIXED1"
            );
            let flexible = fixed1 & !fixed0;
            assert_eq!(
                (fixed ^ v) & flexible,
                0,
                "{name} {what}({v:#x}): flexible bit changed"
            );
        };
        check(
            "cr0",
            caps.fix_cr0(v, false),
            raw.cr0_fixed0,
            raw.cr0_fixed1,
        );
        check(
            "cr0 unrestricted",
            caps.fix_cr0(v, true),
            raw.cr0_fixed0 & !PE_PG,
            raw.cr0_fixed1,
        );
        check("cr4", caps.fix_cr4(v), raw.cr4_fixed0, raw.cr4_fixed1);
    }
}

#[test]
fn fixture_has_all_models() {
    assert_eq!(models().count(), 12);
    for (name, raw) in models() {
        let caps = Capabilities::new(raw);
        assert_ne!(caps.vmcs_revision(), 0, "{name}");
        assert!(caps.vmcs_size() > 0 && caps.vmcs_size() <= 4096, "{name}");
    }
}

#[test]
fn every_model_with_ept_negotiates_legal_words() {
    let mut negotiated = 0;
    for (name, raw) in models() {
        let caps = Capabilities::new(raw);
        match VmcsControls::negotiate(&caps) {
            Ok(c) => {
                negotiated += 1;
                assert_negotiation_sound(name, &caps, &c);
            }
            Err(e) => {
                assert!(
                    !caps.ept_usable() || !caps.preemption_timer(),
                    "{name}: {e}"
                );
            }
        }
    }
    assert!(negotiated >= 10, "only {negotiated} models negotiated");
}

#[test]
fn penryn_has_no_ept_and_says_so() {
    let (_, raw) = models().find(|(n, _)| n.contains("penryn")).unwrap();
    let caps = Capabilities::new(raw);
    assert_eq!(VmcsControls::negotiate(&caps), Err(NegotiationError::NoEpt));
    assert!(!caps.unrestricted_guest());
}

#[test]
fn skylake_x_offers_everything_we_use() {
    let (_, raw) = models().find(|(n, _)| *n == "corei7_skylake_x").unwrap();
    let caps = Capabilities::new(raw);
    let c = VmcsControls::negotiate(&caps).unwrap();
    assert!(c.vpid && c.ept_ad && c.load_efer && c.save_preemption_timer);
    assert!(caps.tsc_scaling() && caps.unrestricted_guest());
}

#[test]
fn required_bit_not_allowed_is_an_error() {
    let cap = ControlCap(0x0000_00ff_0000_0016);
    assert_eq!(
        cap.negotiate(ControlKind::PinBased, 1 << 8, 0),
        Err(ControlError::Unsupported {
            kind: ControlKind::PinBased,
            missing: 1 << 8
        })
    );
    // Wanted bits are dropped silently; forced bits always appear.
    assert_eq!(cap.negotiate(ControlKind::PinBased, 1, 1 << 9), Ok(0x17));
}

#[test]
fn cr_fixed_bits_are_applied() {
    let (_, raw) = models().find(|(n, _)| *n == "corei7_skylake_x").unwrap();
    let caps = Capabilities::new(raw);
    // PE, NE, PG forced on; VMXE forced on in CR4.
    assert_eq!(caps.fix_cr0(0, false) & 0x8000_0021, 0x8000_0021);
    assert_eq!(caps.fix_cr0(0, true) & 0x8000_0001, 0);
    assert_eq!(caps.fix_cr4(0) & (1 << 13), 1 << 13);
}

#[test]
fn cr_fixed_bits_hold_for_every_model() {
    for (name, raw) in models() {
        assert_cr_fixed_bits(name, &Capabilities::new(raw));
    }
}
