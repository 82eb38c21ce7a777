//! Negotiation against the capability MSRs that Bochs's CPU models report (the fixture was read
//! by a bare-metal probe kernel with RDMSR; see tests/data/).

use super::*;
use crate::controls::*;

const FIXTURE: &str = include_str!("../../tests/data/bochs-vmx-capability-msrs.txt");

fn parse_u64(s: &str) -> u64 {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).unwrap()
}

/// (model name, capabilities) for every model in the fixture.
fn models() -> impl Iterator<Item = (&'static str, RawCapabilities)> {
    FIXTURE.split("model: ").skip(1).map(|block| {
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
                    _ => panic!("unknown pair {key}"),
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
                _ => {}
            }
        }
        (name, raw)
    })
}

/// Every negotiated word must honour both halves of its capability MSR.
fn assert_legal(cap: ControlCap, word: u32, what: &str) {
    assert_eq!(
        word & cap.must_be_one(),
        cap.must_be_one(),
        "{what}: a forced bit is 0"
    );
    assert_eq!(word & !cap.may_be_one(), 0, "{what}: a disallowed bit is 1");
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
                assert_legal(caps.pin_based(), c.pin, name);
                assert_legal(caps.primary_proc_based(), c.primary, name);
                assert_legal(caps.secondary_proc_based(), c.secondary, name);
                assert_legal(caps.exit(), c.exit, name);
                assert_legal(caps.entry(), c.entry, name);
                assert!(
                    c.pin & PinBased::ACTIVATE_PREEMPTION_TIMER.bits() != 0,
                    "{name}"
                );
                assert!(
                    c.secondary & SecondaryProcBased::ENABLE_EPT.bits() != 0,
                    "{name}"
                );
                assert!(
                    c.entry & EntryControls::IA32E_MODE_GUEST.bits() != 0,
                    "{name}"
                );
                // With TRUE controls, the default-1 CR3 exiting controls can be turned off.
                if caps.has_true_controls() {
                    let cr3 = (PrimaryProcBased::CR3_LOAD_EXITING
                        | PrimaryProcBased::CR3_STORE_EXITING)
                        .bits();
                    assert_eq!(c.primary & cr3, 0, "{name}: CR3 exiting left on");
                }
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
