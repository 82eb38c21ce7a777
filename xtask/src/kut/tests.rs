use super::*;

#[test]
fn parses_unittests_cfg() {
    let text =
        "# comment\n[x2apic]\nfile = apic.flat\nsmp = 2\nqemu_params = -cpu qemu64,+x2apic\n\
                arch = x86_64\ntimeout = 30\n\n[vmexit_cpuid]\nfile = vmexit.flat\n\
                test_args = 'cpuid'\n[svm]\nfile = svm.flat\n\
                test_args = \"-pause_filter_test -x\"\n[kvmclock]\nfile = k.flat\n\
                extra_params = -append \"10000000 5\"\n";
    let tests = parse_cfg(text).unwrap();
    assert_eq!(tests.len(), 4);
    assert_eq!(
        tests[0],
        CfgTest {
            name: "x2apic".into(),
            file: "apic.flat".into(),
            args: String::new(),
            smp: 2,
            arch: Some("x86_64".into()),
            timeout_s: Some(30),
        }
    );
    assert_eq!(tests[1].args, "cpuid");
    assert_eq!(tests[2].args, "-pause_filter_test -x");
    assert_eq!(tests[3].args, "10000000 5");
    assert!(parse_cfg("file = x.flat\n").is_err());
    assert!(parse_cfg("[a]\nsmp = two\n").is_err());
    assert_eq!(
        parse_cfg("[a]\nsmp = 1\n").unwrap_err(),
        "[a] has no `file`"
    );
}

fn cfg(name: &str) -> CfgTest {
    CfgTest {
        name: name.into(),
        file: "x.flat".into(),
        args: String::new(),
        smp: 1,
        arch: None,
        timeout_s: None,
    }
}

#[test]
fn expectations_are_complete_and_explained() {
    let text = "memory_mib = 32\ntimeout_s = 60\n[test.tsc]\nexpect = \"pass\"\n\
                [test.x2apic]\nexpect = \"excluded\"\nreason = \"needs 2 vCPUs\"\n";
    let e = Expectations::parse(text).unwrap();
    assert_eq!(e.test["tsc"].expect, Expected::Pass);
    assert!(e.check_complete(&[cfg("tsc"), cfg("x2apic")]).is_ok());
    assert_eq!(
        e.check_complete(&[cfg("tsc"), cfg("new")]).unwrap_err(),
        "tests of the suite not in the expectations: new; expectations for tests the suite \
         does not have: x2apic"
    );
    assert!(Expectations::parse(
        "memory_mib = 32\ntimeout_s = 60\n[test.a]\nexpect = \"excluded\"\n"
    )
    .unwrap_err()
    .contains("needs a `reason`"));
    assert!(
        Expectations::parse("memory_mib = 32\ntimeout_s = 60\n[test.a]\nexpect = \"flaky\"\n")
            .is_err()
    );
}

#[test]
fn outcomes_from_the_log() {
    let log = "\
[INFO] vm tsc: created: 32 MiB\n\
tsc | PASS: rdtsc\n\
msr | FAIL: MSR_IA32_TSC\n\
tsc | SKIP: rdpid\n\
tsc | PASS: rdtscp\n\
tsc | SUMMARY: 3 tests, 1 skipped\n\
[ERROR] vm msr: stopped: triple fault at rip=0x400123\n\
[ERROR] hv: vm \"bad\" not started: bad image: no Multiboot header\n\
[INFO] stats vm=tsc state=exited(0) tdf=1 cpu_share=1\n\
[INFO] stats vm=msr state=failed tdf=1\n";
    let tsc = outcome_of(log, "tsc", false);
    assert_eq!((tsc.passes, tsc.failures, tsc.skips), (2, 0, 1));
    assert_eq!(tsc.end, End::Exited(0));
    assert_eq!(tsc.verdict(), Verdict::Pass);
    let msr = outcome_of(log, "msr", false);
    assert_eq!(msr.failures, 1);
    assert_eq!(
        msr.end,
        End::Failed("stopped: triple fault at rip=0x400123".into())
    );
    assert_eq!(msr.verdict(), Verdict::Error);
    assert!(matches!(
        outcome_of(log, "bad", false).end,
        End::NotStarted(_)
    ));
    assert_eq!(outcome_of(log, "gone", true).end, End::TimedOut);
    let skip = Outcome {
        passes: 0,
        failures: 0,
        skips: 3,
        end: End::Exited(EXIT_SKIP),
    };
    assert_eq!(skip.verdict(), Verdict::Skip);
    // Exit code 0 with a FAIL line is no pass.
    let odd = Outcome {
        passes: 1,
        failures: 1,
        skips: 0,
        end: End::Exited(0),
    };
    assert_ne!(odd.verdict(), Verdict::Pass);
}

#[test]
fn the_checked_in_expectations_parse() {
    let e = Expectations::parse(include_str!("../../../tests/kvm-unit-tests.toml")).unwrap();
    assert!(e.test.len() >= 80, "{} tests", e.test.len());
    // Every test CI runs must pass or skip; nothing slow is in it.
    for (name, t) in &e.test {
        if t.ci && t.expect != Expected::Excluded {
            assert!(
                t.timeout_s.unwrap_or(e.timeout_s) <= 600,
                "{name} is in CI with a long budget"
            );
        }
    }
}

#[test]
fn old_run_directories_are_pruned_to_the_newest_and_running_ones_are_kept() {
    let dir = std::env::temp_dir().join(format!("kut-prune-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    // PIDs far above any pid_max: finished invocations. Ours is running.
    for (i, name) in [
        "runs-4000001",
        "runs-tcg-4000002",
        "runs-4000003",
        "runs-4000004",
    ]
    .iter()
    .enumerate()
    {
        fs::create_dir_all(dir.join(name).join("boot-0")).unwrap();
        // Strictly increasing modification times, oldest first.
        let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
        fs::File::open(dir.join(name))
            .unwrap()
            .set_modified(t)
            .unwrap();
    }
    let mine = format!("runs-{}", std::process::id());
    fs::create_dir_all(dir.join(&mine)).unwrap();
    fs::write(dir.join("other-file"), b"kept").unwrap();
    prune_runs(&dir, 2);
    let mut left: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    let mut want = vec![
        "other-file".to_owned(),
        "runs-4000003".into(),
        "runs-4000004".into(),
        mine,
    ];
    want.sort();
    assert_eq!(left, want);
    fs::remove_dir_all(&dir).unwrap();
}
