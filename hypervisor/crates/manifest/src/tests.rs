//! Host tests: every rule of the schema, accepted and rejected, with the exact messages.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::*;

const NO_HOST: HostLimits<'static> = HostLimits {
    images: None,
    memory_bytes: None,
};

fn ok(text: &str) -> Manifest {
    parse(text, &NO_HOST).unwrap_or_else(|e| panic!("fatal: {e}"))
}

fn fatal(text: &str) -> String {
    match parse(text, &NO_HOST) {
        Ok(m) => panic!("expected a fatal error, got {m:?}"),
        Err(e) => e.to_string(),
    }
}

/// The Display texts of all errors.
fn messages(m: &Manifest) -> Vec<String> {
    m.errors.iter().map(ToString::to_string).collect()
}

fn names(m: &Manifest) -> Vec<&str> {
    m.vms.iter().map(|vm| vm.name.as_str()).collect()
}

/// A manifest with one VM whose body is `extra` added to valid required keys.
fn one_vm(extra: &str) -> Manifest {
    ok(&alloc::format!(
        "[[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"hello\"\n{extra}\n"
    ))
}

const DEMO: &str = r#"# Two small VMs.
[defaults]
quantum_us = 5000

[[vm]]
name = "hello-a"
memory_mib = 4
image = "hello"

[[vm]]
name = "hello-b"
memory_mib = 0x10
image = "hello.v2"
cmdline = "verbose=1 answer=42"
quantum_us = 1_000
vcpus = 1
"#;

#[test]
fn good_manifest() {
    let m = ok(DEMO);
    assert_eq!(m.errors, []);
    assert_eq!(
        m.vms,
        [
            VmConfig {
                name: "hello-a".into(),
                memory_mib: 4,
                image: "hello".into(),
                cmdline: "".into(),
                modules: Vec::new(),
                linux: false,
                initrd: None,
                debug_exit_port: None,
                test_device: false,
                quantum_us: 5000,
                vcpus: 1,
                sharing_domain: 0,
                time_dilation_milli: 1000,
                cpu_share: 1,
                idle_reclaim: true,
                line: Some(5),
            },
            VmConfig {
                name: "hello-b".into(),
                memory_mib: 16,
                image: "hello.v2".into(),
                cmdline: "verbose=1 answer=42".into(),
                modules: Vec::new(),
                linux: false,
                initrd: None,
                debug_exit_port: None,
                test_device: false,
                quantum_us: 1000,
                vcpus: 1,
                sharing_domain: 0,
                time_dilation_milli: 1000,
                cpu_share: 1,
                idle_reclaim: true,
                line: Some(10),
            },
        ]
    );
    assert_eq!(m.vms[1].memory_bytes(), 16 << 20);
}

#[test]
fn defaults_apply_when_no_defaults_table() {
    let m = one_vm("");
    assert_eq!(m.errors, []);
    assert_eq!(m.vms[0].quantum_us, DEFAULT_QUANTUM_US);
    assert_eq!(m.vms[0].vcpus, 1);
    assert_eq!(m.vms[0].cmdline, "");
}

#[test]
fn inline_array_of_tables_is_accepted() {
    let m = ok(r#"vm = [{ name = "x", memory_mib = 2, image = "i" }]"#);
    assert_eq!(names(&m), ["x"]);
    assert_eq!(m.vms[0].line, Some(1));
}

#[test]
fn host_within_limits_passes() {
    let images = ["hello", "hello.v2"];
    let host = HostLimits {
        images: Some(&images),
        memory_bytes: Some(16 << 20),
    };
    let m = parse(DEMO, &host).unwrap();
    assert_eq!(m.errors, []);
    assert_eq!(names(&m), ["hello-a", "hello-b"]);
}

#[test]
fn parse_bytes_accepts_utf8_and_locates_bad_bytes() {
    let m = parse_bytes(DEMO.as_bytes(), &NO_HOST).unwrap();
    assert_eq!(m.vms.len(), 2);

    let mut bytes = b"[[vm]]\nname = \"\xc3\xa9t".to_vec();
    bytes.extend_from_slice(b"\xff\"\n");
    let e = parse_bytes(&bytes, &NO_HOST).unwrap_err();
    assert_eq!(
        e,
        FatalError::NotUtf8 {
            line: 2,
            column: 11
        }
    );
    assert_eq!(e.to_string(), "line 2, column 11: not valid UTF-8");
}

// ---- Fatal errors -------------------------------------------------------------------------

#[test]
fn empty_file_is_fatal() {
    assert_eq!(fatal(""), "manifest declares no [[vm]]");
    assert_eq!(fatal("# only a comment\n\n"), "manifest declares no [[vm]]");
    assert_eq!(fatal("vm = []"), "manifest declares no [[vm]]");
}

#[test]
fn no_vm_lists_unknown_top_level_keys() {
    let e = parse(
        "[defaults]\nquantum_us = 500\n\n[[vms]]\nname = \"a\"\n",
        &NO_HOST,
    )
    .unwrap_err();
    assert_eq!(
        e,
        FatalError::NoVms {
            unknown_keys: alloc::vec![("vms".into(), Some(4))]
        }
    );
    assert_eq!(
        e.to_string(),
        "manifest declares no [[vm]]; unknown top-level key \"vms\" (line 4)"
    );
}

#[test]
fn invalid_toml_is_fatal_with_position() {
    assert_eq!(
        fatal("[[vm]]\nname = \"a\nmemory_mib = 4\n"),
        "line 2, column 10: invalid TOML: invalid basic string, expected `\"`"
    );
    assert_eq!(
        fatal("[[vm]]\nname = \"a\"\nname = \"b\"\n"),
        "line 3, column 1: invalid TOML: duplicate key"
    );
    // Columns count characters, not bytes (the message itself is toml's).
    let e = fatal("[[vm]]\ncmdline = \"é\" x\n");
    assert!(e.starts_with("line 2, column 15: invalid TOML: "), "{e}");
}

#[test]
fn vm_that_is_not_an_array_is_fatal() {
    assert_eq!(
        fatal("x = 1\n[vm]\nname = \"a\"\n"),
        "line 2: key \"vm\": expected an array of tables ([[vm]]), found table"
    );
    assert_eq!(
        fatal("vm = \"a\""),
        "line 1: key \"vm\": expected an array of tables ([[vm]]), found string"
    );
}

// ---- Unknown keys at each level ------------------------------------------------------------

#[test]
fn unknown_key_in_vm() {
    let m = ok("[[vm]]\nname = \"web-1\"\nmemry_mib = 4\nimage = \"i\"\n");
    assert_eq!(
        messages(&m),
        [
            "vm \"web-1\" (line 1): missing required key \"memory_mib\"",
            "vm \"web-1\" (line 3): unknown key \"memry_mib\" (known keys: name, memory_mib, \
             image, kernel, initrd, cmdline, modules, debug_exit, debug_exit_port, test_device, quantum_us, \
             vcpus, \
             sharing_domain, time_dilation, cpu_share, idle_reclaim)",
        ]
    );
    assert_eq!(m.vms, []);
    assert_eq!(m.errors[1].key.as_deref(), Some("memry_mib"));
    assert_eq!(
        m.errors[1].kind,
        ErrorKind::UnknownKey {
            known: &[
                "name",
                "memory_mib",
                "image",
                "kernel",
                "initrd",
                "cmdline",
                "modules",
                "debug_exit",
                "debug_exit_port",
                "test_device",
                "quantum_us",
                "vcpus",
                "sharing_domain",
                "time_dilation",
                "cpu_share",
                "idle_reclaim"
            ]
        }
    );
}

#[test]
fn unknown_subtable_in_vm() {
    let m = ok("[[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"i\"\n[vm.tdf]\nx = 1\n");
    assert_eq!(m.vms, []);
    assert_eq!(m.errors.len(), 1);
    assert_eq!(m.errors[0].key.as_deref(), Some("tdf"));
    assert_eq!(m.errors[0].line, Some(5));
}

#[test]
fn unknown_key_in_defaults_leaves_vms_alone() {
    let m = ok(
        "[defaults]\nquantum_us = 200\nquantum = 5\n\n[[vm]]\nname = \"a\"\n\
                memory_mib = 4\nimage = \"i\"\n",
    );
    assert_eq!(
        messages(&m),
        ["[defaults] (line 3): unknown key \"quantum\" (known keys: quantum_us)"]
    );
    assert_eq!(names(&m), ["a"]);
    assert_eq!(m.vms[0].quantum_us, 200);
}

#[test]
fn unknown_top_level_key() {
    let m = ok("title = \"x\"\n[[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"i\"\n");
    assert_eq!(
        messages(&m),
        ["top level (line 1): unknown key \"title\" (known keys: defaults, memory, idle, vm)"]
    );
    assert_eq!(m.errors[0].scope, Scope::TopLevel);
    assert_eq!(names(&m), ["a"]);
}

// ---- Required keys, types, ranges ----------------------------------------------------------

#[test]
fn missing_keys_are_all_reported_on_the_header_line() {
    let m = ok("[[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"i\"\n\n[[vm]]\ncmdline = \"x\"\n");
    assert_eq!(names(&m), ["a"]);
    assert_eq!(
        messages(&m),
        [
            "vm #2 (line 6): missing required key \"name\"",
            "vm #2 (line 6): missing required key \"memory_mib\"",
            "vm #2 (line 6): missing required key \"image\" (or \"kernel\", for a Linux bzImage)",
        ]
    );
    assert_eq!(m.errors[0].kind, ErrorKind::MissingKey);
    assert_eq!(m.errors[2].kind, ErrorKind::MissingKernel);
}

#[test]
fn wrong_types() {
    let m = ok(
        "[[vm]]\nname = 7\nmemory_mib = \"4\"\nimage = [\"i\"]\ncmdline = 1\n\
                quantum_us = 1.5\nvcpus = true\n",
    );
    assert_eq!(
        messages(&m),
        [
            "vm #1 (line 2): key \"name\": expected string, found integer",
            "vm #1 (line 3): key \"memory_mib\": expected integer, found string",
            "vm #1 (line 4): key \"image\": expected string, found array",
            "vm #1 (line 5): key \"cmdline\": expected string, found integer",
            "vm #1 (line 6): key \"quantum_us\": expected integer, found float",
            "vm #1 (line 7): key \"vcpus\": expected integer, found boolean",
        ]
    );
    assert_eq!(
        m.errors[0].kind,
        ErrorKind::WrongType {
            expected: "string",
            found: "integer"
        }
    );
}

#[test]
fn vm_entry_that_is_not_a_table() {
    let m = ok("vm = [3, { name = \"b\", memory_mib = 2, image = \"i\" }]");
    assert_eq!(
        messages(&m),
        ["vm #1 (line 1): expected table, found integer"]
    );
    assert_eq!(names(&m), ["b"]);
}

#[test]
fn memory_range() {
    let m = one_vm("").vms;
    assert_eq!(m[0].memory_mib, 4);
    for (value, shown) in [
        ("1", "1"),
        ("0", "0"),
        ("-4", "-4"),
        ("0x100000000000", "0x100000000000"),
    ] {
        let m = ok(&alloc::format!(
            "[[vm]]\nname = \"a\"\nimage = \"i\"\nmemory_mib = {value}\n"
        ));
        assert_eq!(
            messages(&m),
            [alloc::format!(
                "vm \"a\" (line 4): key \"memory_mib\": {shown} is out of range 2..=17592186044415"
            )]
        );
    }
    let m = ok("[[vm]]\nname = \"a\"\nimage = \"i\"\nmemory_mib = 2\n");
    assert_eq!(m.vms[0].memory_mib, MEMORY_MIB_MIN);
    let m = ok("[[vm]]\nname = \"a\"\nimage = \"i\"\nmemory_mib = 17592186044415\n");
    assert_eq!(m.vms[0].memory_bytes(), !0xf_ffff);
}

#[test]
fn integers_beyond_i64_are_out_of_range_not_fatal() {
    let m = one_vm("quantum_us = 99999999999999999999999999999999999999999");
    assert_eq!(
        messages(&m),
        [
            "vm \"a\" (line 5): key \"quantum_us\": 99999999999999999999999999999999999999999 is \
          out of range 100..=1000000"
        ]
    );
}

#[test]
fn quantum_range() {
    for (q, good) in [
        ("99", false),
        ("100", true),
        ("1000000", true),
        ("1000001", false),
        ("0", false),
        ("-100", false),
    ] {
        let m = one_vm(&alloc::format!("quantum_us = {q}"));
        assert_eq!(m.vms.len(), usize::from(good), "quantum_us = {q}");
        if !good {
            assert_eq!(
                messages(&m),
                [alloc::format!(
                    "vm \"a\" (line 5): key \"quantum_us\": {q} is out of range 100..=1000000"
                )]
            );
        }
    }
}

#[test]
fn invalid_default_quantum_fails_only_the_vms_that_inherit_it() {
    let m = ok(
        "[defaults]\nquantum_us = 50\n\n[[vm]]\nname = \"inherits\"\nmemory_mib = 4\n\
                image = \"i\"\n\n[[vm]]\nname = \"own\"\nmemory_mib = 4\nimage = \"i\"\n\
                quantum_us = 300\n",
    );
    assert_eq!(names(&m), ["own"]);
    assert_eq!(m.vms[0].quantum_us, 300);
    assert_eq!(
        messages(&m),
        [
            "[defaults] (line 2): key \"quantum_us\": 50 is out of range 100..=1000000",
            "vm \"inherits\" (line 4): key \"quantum_us\": not set, and the [defaults] value it \
             would inherit (line 2) is invalid",
        ]
    );
}

#[test]
fn defaults_of_wrong_type() {
    let m = ok("defaults = 5\n[[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"i\"\n");
    assert_eq!(names(&m), Vec::<&str>::new());
    assert_eq!(
        messages(&m),
        [
            "top level (line 1): key \"defaults\": expected table, found integer",
            "vm \"a\" (line 2): key \"quantum_us\": not set, and the [defaults] value it would \
             inherit (line 1) is invalid",
        ]
    );
}

#[test]
fn vcpus_other_than_one() {
    assert_eq!(one_vm("vcpus = 1").vms[0].vcpus, 1);
    assert_eq!(one_vm("vcpus = 0x1").vms.len(), 1);
    for v in ["2", "0", "-1", "99999999999999999999999"] {
        let m = one_vm(&alloc::format!("vcpus = {v}"));
        assert_eq!(m.vms, []);
        assert_eq!(
            messages(&m),
            [alloc::format!(
                "vm \"a\" (line 5): key \"vcpus\": {v} vCPUs requested, but only 1 vCPU per VM \
                 is supported for now"
            )]
        );
    }
}

#[test]
fn cmdline_length() {
    let max = "x".repeat(CMDLINE_MAX);
    let m = one_vm(&alloc::format!("cmdline = \"{max}\""));
    assert_eq!(m.vms[0].cmdline.len(), CMDLINE_MAX);
    let m = one_vm(&alloc::format!("cmdline = \"{max}y\""));
    assert_eq!(
        messages(&m),
        ["vm \"a\" (line 5): key \"cmdline\": 2049 bytes is longer than the maximum of 2048"]
    );
}

// ---- Names -------------------------------------------------------------------------------

fn named(name: &str) -> Manifest {
    ok(&alloc::format!(
        "[[vm]]\nname = \"{name}\"\nmemory_mib = 4\nimage = \"i\"\n"
    ))
}

#[test]
fn name_rules() {
    assert_eq!(names(&named("A-z_0.9")), ["A-z_0.9"]);
    let longest = "n".repeat(NAME_MAX);
    assert_eq!(names(&named(&longest)), [longest.as_str()]);
    assert_eq!(
        messages(&named(&"n".repeat(NAME_MAX + 1))),
        ["vm #1 (line 2): key \"name\": 32 bytes is longer than the maximum of 31"]
    );
    assert_eq!(
        messages(&named("")),
        ["vm #1 (line 2): key \"name\": must not be empty"]
    );
    assert_eq!(
        messages(&named("web 1")),
        ["vm #1 (line 2): key \"name\": \"web 1\" contains ' '; only A-Z a-z 0-9 _ . - are allowed"]
    );
    assert_eq!(
        messages(&named("caf\\u00e9")),
        ["vm #1 (line 2): key \"name\": \"café\" contains 'é'; only A-Z a-z 0-9 _ . - are allowed"]
    );
    assert_eq!(
        messages(&named("a\\nb")),
        [
            "vm #1 (line 2): key \"name\": \"a\\nb\" contains '\\n'; only A-Z a-z 0-9 _ . - are \
          allowed"
        ]
    );
}

#[test]
fn image_rules() {
    assert_eq!(
        messages(&ok("[[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"\"\n")),
        ["vm \"a\" (line 4): key \"image\": must not be empty"]
    );
    assert_eq!(
        messages(&ok(
            "[[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"../x\"\n"
        )),
        [
            "vm \"a\" (line 4): key \"image\": \"../x\" contains '/'; only A-Z a-z 0-9 _ . - are \
          allowed"
        ]
    );
}

#[test]
fn duplicate_names_reject_the_later_vms() {
    let m = ok("[[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"i\"\n\n\
                [[vm]]\nmemory_mib = 4\nname = \"a\"\nimage = \"i\"\n\n\
                [[vm]]\nname = \"b\"\nmemory_mib = 4\nimage = \"i\"\n\n\
                [[vm]]\nname = \"a\"\nmemory_mib = 1\nimage = \"i\"\n");
    assert_eq!(names(&m), ["a", "b"]);
    assert_eq!(
        messages(&m),
        [
            "vm #2 (line 8): key \"name\": duplicate name \"a\", first used on line 2",
            "vm #4 (line 17): key \"name\": duplicate name \"a\", first used on line 2",
            "vm #4 (line 18): key \"memory_mib\": 1 is out of range 2..=17592186044415",
        ]
    );
    assert_eq!(
        m.errors[0].kind,
        ErrorKind::DuplicateName {
            name: "a".into(),
            first_line: Some(2)
        }
    );
}

#[test]
fn a_name_counts_as_taken_even_if_its_vm_is_invalid() {
    let m = ok("[[vm]]\nname = \"a\"\nmemory_mib = 1\nimage = \"i\"\n\n\
                [[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"i\"\n");
    assert_eq!(m.vms, []);
    assert_eq!(
        messages(&m),
        [
            "vm \"a\" (line 3): key \"memory_mib\": 1 is out of range 2..=17592186044415",
            "vm #2 (line 7): key \"name\": duplicate name \"a\", first used on line 2",
        ]
    );
}

// ---- Host limits ---------------------------------------------------------------------------

#[test]
fn missing_image() {
    let images = ["hello"];
    let host = HostLimits {
        images: Some(&images),
        memory_bytes: None,
    };
    let m = parse(DEMO, &host).unwrap();
    assert_eq!(names(&m), ["hello-a"]);
    assert_eq!(
        messages(&m),
        ["vm \"hello-b\" (line 13): key \"image\": no image named \"hello.v2\" is available"]
    );
    assert_eq!(
        m.errors[0].kind,
        ErrorKind::ImageNotFound {
            image: "hello.v2".into()
        }
    );
    // An empty module list rejects every VM.
    let host = HostLimits {
        images: Some(&[]),
        memory_bytes: None,
    };
    assert_eq!(parse(DEMO, &host).unwrap().vms, []);
}

#[test]
fn memory_larger_than_host() {
    let host = HostLimits {
        images: None,
        // 15.5 MiB: the 16 MiB VM does not fit, the 4 MiB one does.
        memory_bytes: Some((16 << 20) - (512 << 10)),
    };
    let m = parse(DEMO, &host).unwrap();
    assert_eq!(names(&m), ["hello-a"]);
    assert_eq!(
        messages(&m),
        ["vm \"hello-b\" (line 12): key \"memory_mib\": 16 MiB is more than the host's 15 MiB"]
    );

    let host = HostLimits {
        images: None,
        memory_bytes: Some(240 << 20),
    };
    let m = parse(
        "[[vm]]\nname = \"a\"\nimage = \"i\"\nmemory_mib = 8192\n",
        &host,
    )
    .unwrap();
    assert_eq!(
        messages(&m),
        ["vm \"a\" (line 4): key \"memory_mib\": 8192 MiB is more than the host's 240 MiB"]
    );
}

#[test]
fn memory_is_checked_per_vm_not_summed() {
    // Overcommit is the point of the hypervisor: two 4 MiB VMs on a 4 MiB host are fine here.
    let host = HostLimits {
        images: None,
        memory_bytes: Some(4 << 20),
    };
    let text = "[[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"i\"\n\
                [[vm]]\nname = \"b\"\nmemory_mib = 4\nimage = \"i\"\n";
    assert_eq!(names(&parse(text, &host).unwrap()), ["a", "b"]);
}

// ---- Mixed: valid VMs survive, all errors of a VM at once, file order ----------------------

#[test]
fn valid_vms_survive_next_to_bad_ones_and_errors_are_in_file_order() {
    let text = r#"title = "lab"

[[vm]]
name = "good-1"
memory_mib = 4
image = "hello"

[[vm]]
name = "bad one"
memory_mib = 1
image = "nope"
vcpus = 4

[[vm]]
name = "good-2"
memory_mib = 8
image = "hello"
cmdline = "x"

[[vm]]
name = "too-big"
memory_mib = 64
image = "hello"
color = "red"
"#;
    let images = ["hello"];
    let host = HostLimits {
        images: Some(&images),
        memory_bytes: Some(32 << 20),
    };
    let m = parse(text, &host).unwrap();
    assert_eq!(names(&m), ["good-1", "good-2"]);
    assert_eq!(m.vms[1].line, Some(14));
    assert_eq!(
        messages(&m),
        [
            "top level (line 1): unknown key \"title\" (known keys: defaults, memory, idle, vm)",
            "vm #2 (line 9): key \"name\": \"bad one\" contains ' '; only A-Z a-z 0-9 _ . - are \
             allowed",
            "vm #2 (line 10): key \"memory_mib\": 1 is out of range 2..=17592186044415",
            "vm #2 (line 11): key \"image\": no image named \"nope\" is available",
            "vm #2 (line 12): key \"vcpus\": 4 vCPUs requested, but only 1 vCPU per VM is \
             supported for now",
            "vm \"too-big\" (line 22): key \"memory_mib\": 64 MiB is more than the host's 32 MiB",
            "vm \"too-big\" (line 24): unknown key \"color\" (known keys: name, memory_mib, \
             image, kernel, initrd, cmdline, modules, debug_exit, debug_exit_port, test_device, quantum_us, \
             vcpus, \
             sharing_domain, time_dilation, cpu_share, idle_reclaim)",
        ]
    );
    assert_eq!(
        m.errors[5].scope,
        Scope::Vm {
            index: 4,
            name: Some("too-big".into())
        }
    );
}

#[test]
fn crlf_line_endings_count_lines_the_same() {
    let m = ok("[[vm]]\r\nname = \"a\"\r\nmemory_mib = 4\r\nimage = \"i\"\r\nvcpus = 2\r\n");
    assert_eq!(m.errors[0].line, Some(5));
}

#[test]
fn lines_helper() {
    let l = validate::Lines::new("ab\ncdé\n\nx");
    assert_eq!(l.line_col(0), (1, 1));
    assert_eq!(l.line_col(2), (1, 3));
    assert_eq!(l.line_col(3), (2, 1));
    assert_eq!(l.line_col(7), (2, 4)); // after the two-byte 'é'
    assert_eq!(l.line_col(8), (3, 1));
    assert_eq!(l.line_col(9), (4, 1));
    assert_eq!(l.line_col(100), (4, 2)); // clamped to the end
}

#[test]
fn fatal_display_without_position() {
    let e = FatalError::Syntax {
        line: None,
        column: None,
        message: "boom".into(),
    };
    assert_eq!(e.to_string(), "invalid TOML: boom");
}

// ---- Properties ----------------------------------------------------------------------------

mod properties {
    use super::*;
    use proptest::collection::{btree_set, vec};
    use proptest::prelude::*;

    /// A TOML basic string holding `s`.
    fn toml_string(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&alloc::format!("\\u{:04x}", u32::from(c))),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    fn check_lines(text: &str, m: &Manifest) {
        let last = text.split('\n').count();
        for e in &m.errors {
            let line = e.line.expect("every error has a line");
            assert!((1..=last).contains(&line), "{e} outside 1..={last}");
        }
    }

    proptest! {
        /// The hypervisor parses whatever module it is given: no input may panic it.
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,400}") {
            if let Ok(m) = parse(&text, &NO_HOST) {
                check_lines(&text, &m);
            }
        }

        /// Near-valid input reaches the schema checks (unlike random text, which rarely parses).
        #[test]
        fn mutated_demo_never_panics(
            edits in vec((0..DEMO.len(), "[\\[\\]\"=#\n a-z0-9._-]{0,3}"), 1..4),
        ) {
            let mut text = String::from(DEMO);
            for (at, insert) in edits {
                let at = (0..=at.min(text.len())).rev().find(|&i| text.is_char_boundary(i)).unwrap();
                text.insert_str(at, &insert);
            }
            let images = ["hello"];
            let host = HostLimits { images: Some(&images), memory_bytes: Some(8 << 20) };
            if let Ok(m) = parse(&text, &host) {
                check_lines(&text, &m);
                prop_assert!(m.vms.len() <= 2 || text.matches("[[vm]]").count() > 2);
            }
        }

        /// Valid VMs come back exactly as written, in order, with their header lines.
        #[test]
        fn valid_vms_round_trip(
            names in btree_set("[A-Za-z0-9_.-]{1,31}", 1..6),
            memory in vec(MEMORY_MIB_MIN..1u64 << 20, 6),
            quantum in vec(proptest::option::of(QUANTUM_US_RANGE), 6),
            cmdline in vec(proptest::option::of("\\PC{0,40}"), 6),
            default_quantum in proptest::option::of(QUANTUM_US_RANGE),
        ) {
            let mut text = String::new();
            if let Some(q) = default_quantum {
                text += &alloc::format!("[defaults]\nquantum_us = {q}\n\n");
            }
            let mut expected = Vec::new();
            for (i, name) in names.iter().enumerate() {
                let line = text.matches('\n').count() + 1;
                text += &alloc::format!(
                    "[[vm]]\nname = {}\nmemory_mib = {}\nimage = \"img\"\n",
                    toml_string(name),
                    memory[i]
                );
                if let Some(q) = quantum[i] {
                    text += &alloc::format!("quantum_us = {q}\n");
                }
                if let Some(c) = &cmdline[i] {
                    text += &alloc::format!("cmdline = {}\n", toml_string(c));
                }
                text += "\n";
                expected.push(VmConfig {
                    name: name.clone(),
                    memory_mib: memory[i],
                    image: "img".into(),
                    cmdline: cmdline[i].clone().unwrap_or_default(),
                    modules: Vec::new(),
                    linux: false,
                    initrd: None,
                    debug_exit_port: None,
                    test_device: false,
                    quantum_us: quantum[i].or(default_quantum).unwrap_or(DEFAULT_QUANTUM_US),
                    vcpus: 1,
                    sharing_domain: 0,
                    time_dilation_milli: 1000,
                    cpu_share: 1,
                    idle_reclaim: true,
                    line: Some(line),
                });
            }
            let m = parse(&text, &NO_HOST).unwrap();
            prop_assert_eq!(m.errors, []);
            prop_assert_eq!(m.vms, expected);
        }
    }
}

#[test]
fn memory_multiplexing_is_off_by_default() {
    let m = one_vm("");
    assert_eq!(m.memory, MemoryConfig::default());
    assert!(!m.memory.multiplex);
    assert_eq!(m.memory.scan_pages, DEFAULT_SCAN_PAGES);
    assert_eq!(m.memory.scan_interval_us, DEFAULT_SCAN_INTERVAL_US);
    assert_eq!(m.memory.cold_after_us, DEFAULT_COLD_AFTER_US);
    assert_eq!(m.vms[0].sharing_domain, 0);
}

#[test]
fn memory_table_and_sharing_domains() {
    let m = ok(
        "[memory]\nmultiplex = true\nscan_pages = 256\nscan_interval_us = 500\n\
                cold_after_us = 20_000\nscan_cpu_percent = 12\nlow_watermark_mib = 0\n\n\
                [[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"i\"\nsharing_domain = 7\n\n\
                [[vm]]\nname = \"b\"\nmemory_mib = 4\nimage = \"i\"\n",
    );
    assert_eq!(messages(&m), Vec::<String>::new());
    assert_eq!(
        m.memory,
        MemoryConfig {
            multiplex: true,
            scan_pages: 256,
            scan_interval_us: 500,
            cold_after_us: 20_000,
            scan_cpu_percent: 12,
            low_watermark_mib: 0,
        }
    );
    assert_eq!(m.vms[0].sharing_domain, 7);
    assert_eq!(m.vms[1].sharing_domain, 0);
}

#[test]
fn bad_memory_table_turns_multiplexing_off_and_keeps_the_vms() {
    let m = ok(
        "[memory]\nmultiplex = \"yes\"\nscan_pages = 0\nscan_rate = 5\n\n\
                [[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"i\"\n",
    );
    assert_eq!(
        messages(&m),
        [
            "[memory] (line 2): key \"multiplex\": expected boolean, found string",
            "[memory] (line 3): key \"scan_pages\": 0 is out of range 1..=1048576",
            "[memory] (line 4): unknown key \"scan_rate\" (known keys: multiplex, scan_pages, \
             scan_interval_us, cold_after_us, scan_cpu_percent, low_watermark_mib)",
        ]
    );
    assert!(!m.memory.multiplex);
    assert_eq!(names(&m), ["a"]);
    // Valid values before an error do not leave multiplexing on either.
    let m = ok("[memory]\nmultiplex = true\nscan_interval_us = 5\n\n\
                [[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"i\"\n");
    assert_eq!(
        messages(&m),
        ["[memory] (line 3): key \"scan_interval_us\": 5 is out of range 100..=10000000"]
    );
    assert!(!m.memory.multiplex);
    let m = ok("[memory]\nmultiplex = true\ncold_after_us = 99\n\n\
                [[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"i\"\n");
    assert_eq!(
        messages(&m),
        ["[memory] (line 3): key \"cold_after_us\": 99 is out of range 100..=3600000000"]
    );
    assert!(!m.memory.multiplex);
    let m = ok("memory = 1\n[[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"i\"\n");
    assert_eq!(
        messages(&m),
        ["top level (line 1): key \"memory\": expected table, found integer"]
    );
}

#[test]
fn bad_sharing_domain_rejects_the_vm() {
    let m = one_vm("sharing_domain = -1");
    assert_eq!(
        messages(&m),
        ["vm \"a\" (line 5): key \"sharing_domain\": -1 is out of range 0..=4294967295"]
    );
    assert_eq!(m.vms, []);
    let m = one_vm("sharing_domain = \"tenant-a\"");
    assert_eq!(
        messages(&m),
        ["vm \"a\" (line 5): key \"sharing_domain\": expected integer, found string"]
    );
}

#[test]
fn time_dilation_and_cpu_share() {
    let m = one_vm("");
    assert_eq!(m.vms[0].time_dilation_milli, 1000);
    assert_eq!(m.vms[0].cpu_share, 1);
    assert!(!m.vms[0].is_dilated());
    for (text, milli) in [
        ("1", 1000),
        ("1.0", 1000),
        ("2.5", 2500),
        ("7.125", 7125),
        ("10", 10_000),
        ("1e3", 1_000_000),
        ("1000", 1_000_000),
        ("999.999", 999_999),
    ] {
        let m = one_vm(&alloc::format!("time_dilation = {text}"));
        assert_eq!(m.errors, [], "{text}");
        assert_eq!(m.vms[0].time_dilation_milli, milli, "{text}");
        let shown = m.vms[0].time_dilation_text();
        assert_eq!(
            one_vm(&alloc::format!("time_dilation = {shown}")).vms[0].time_dilation_milli,
            milli
        );
        assert_eq!(m.vms[0].is_dilated(), milli != 1000);
    }
    assert_eq!(
        one_vm("time_dilation = 7.125").vms[0].time_dilation_text(),
        "7.125"
    );
    assert_eq!(
        one_vm("time_dilation = 2.50").vms[0].time_dilation_text(),
        "2.5"
    );
    assert_eq!(
        one_vm("time_dilation = 100").vms[0].time_dilation_text(),
        "100"
    );
    let m = one_vm("cpu_share = 4\nquantum_us = 2000");
    assert_eq!(m.vms[0].cpu_share, 4);
    assert_eq!(m.vms[0].weighted_quantum_us(), 8000);
}

#[test]
fn bad_time_dilation_and_cpu_share_are_reported_by_vm_and_key() {
    for (text, shown) in [
        ("0", "0"),
        ("-2", "-2"),
        ("0.5", "0.5"),
        ("nan", "nan"),
        ("inf", "inf"),
        ("-inf", "-inf"),
        ("1000.001", "1000.001"),
        ("1001", "1001"),
        ("1.0001", "1.0001"),
        ("99999999999999999999999", "99999999999999999999999"),
        ("\"fast\"", "\"fast\""),
        ("\"NaN\"", "\"NaN\""),
        ("true", "true"),
    ] {
        let m = one_vm(&alloc::format!("time_dilation = {text}"));
        assert_eq!(
            messages(&m),
            [alloc::format!(
                "vm \"a\" (line 5): key \"time_dilation\": {shown} is not a time-dilation \
                 factor: a number from 1 to 1000 with at most three decimals"
            )],
            "{text}"
        );
        assert!(m.vms.is_empty());
    }
    let m = one_vm("time_dilation = [2]");
    assert_eq!(
        messages(&m),
        ["vm \"a\" (line 5): key \"time_dilation\": expected number, found array"]
    );
    for text in ["0", "1001", "-1"] {
        let m = one_vm(&alloc::format!("cpu_share = {text}"));
        assert_eq!(
            messages(&m),
            [alloc::format!(
                "vm \"a\" (line 5): key \"cpu_share\": {text} is out of range 1..=1000"
            )]
        );
    }
    let m = one_vm("cpu_share = 1.5");
    assert_eq!(
        messages(&m),
        ["vm \"a\" (line 5): key \"cpu_share\": expected integer, found float"]
    );
    // The other VMs still run.
    let m = ok(
        "[[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"i\"\ntime_dilation = 0\n\n\
                [[vm]]\nname = \"b\"\nmemory_mib = 4\nimage = \"i\"\ntime_dilation = 10\n",
    );
    assert_eq!(m.vms.len(), 1);
    assert_eq!(m.vms[0].name, "b");
    assert_eq!(m.vms[0].time_dilation_milli, 10_000);
}

#[test]
fn modules_and_the_test_exit_device() {
    let images = ["kut", "env", "other"];
    let host = HostLimits {
        images: Some(&images),
        memory_bytes: None,
    };
    let vm = |extra: &str| {
        parse(
            &alloc::format!("[[vm]]\nname = \"t\"\nmemory_mib = 64\nimage = \"kut\"\n{extra}\n"),
            &host,
        )
        .unwrap()
    };
    let m = vm("modules = [\"env\", \"other\"]\ndebug_exit = true");
    assert_eq!(m.errors, []);
    assert_eq!(m.vms[0].modules, ["env", "other"]);
    assert_eq!(m.vms[0].debug_exit_port, Some(0xf4));
    let m = vm("debug_exit = true\ndebug_exit_port = 0x501");
    assert_eq!(m.vms[0].debug_exit_port, Some(0x501));
    // Off unless asked for.
    assert_eq!(vm("").vms[0].debug_exit_port, None);
    assert_eq!(vm("debug_exit = false").vms[0].debug_exit_port, None);
    assert!(!vm("").vms[0].test_device);
    let m = vm("test_device = true\ndebug_exit = true");
    assert!(m.vms[0].test_device);
    assert_eq!(
        m.vms[0].debug_exit_port,
        Some(0xf4),
        "the default port is free of it"
    );
    // Guest RAM up to the device's MMIO RAM, and not one MiB more.
    let big = |mib: u64| {
        let text = alloc::format!(
            "[[vm]]\nname = \"t\"\nmemory_mib = {mib}\nimage = \"kut\"\ntest_device = true\n"
        );
        parse(&text, &host).unwrap()
    };
    assert_eq!(big(4080).errors, []);
    assert_eq!(
        messages(&big(4081)),
        [
            "vm \"t\" (line 5): key \"test_device\": the test device's RAM at 0xff000000 lies \
          inside the VM's 4081 MiB (memory_mib may be at most 4080 with the test device)"
        ]
    );

    let cases = [
        (
            "modules = [\"nope\"]",
            "vm \"t\" (line 5): key \"modules\": no image named \"nope\" is available",
        ),
        (
            "modules = \"env\"",
            "vm \"t\" (line 5): key \"modules\": expected array of strings, found string",
        ),
        (
            "modules = [1]",
            "vm \"t\" (line 5): key \"modules\": expected string, found integer",
        ),
        (
            "modules = [\"env\", \"env\", \"env\", \"env\", \"env\", \"env\", \"env\", \"env\", \
             \"env\", \"env\", \"env\", \"env\", \"env\", \"env\", \"env\", \"env\", \"env\"]",
            "vm \"t\" (line 5): key \"modules\": 17 items, at most 16 are allowed",
        ),
        (
            "debug_exit_port = 0xf4",
            "vm \"t\" (line 5): key \"debug_exit_port\": is set, but the test-exit device is off \
             (add `debug_exit = true`)",
        ),
        (
            "debug_exit = true\ndebug_exit_port = 0x3fc",
            "vm \"t\" (line 6): key \"debug_exit_port\": ports 0x3fc..=0x3ff overlap port 0x3f8 \
             of the virtual PC",
        ),
        (
            "debug_exit = true\ndebug_exit_port = 0x1e",
            "vm \"t\" (line 6): key \"debug_exit_port\": ports 0x1e..=0x21 overlap port 0x20 of \
             the virtual PC",
        ),
        (
            "debug_exit = true\ndebug_exit_port = 0xfffd",
            "vm \"t\" (line 6): key \"debug_exit_port\": 0xfffd is out of range 0..=65532",
        ),
        (
            "debug_exit = 1",
            "vm \"t\" (line 5): key \"debug_exit\": expected boolean, found integer",
        ),
        (
            "test_device = \"yes\"",
            "vm \"t\" (line 5): key \"test_device\": expected boolean, found string",
        ),
        (
            "test_device = true\ndebug_exit = true\ndebug_exit_port = 0xe8",
            "vm \"t\" (line 7): key \"debug_exit_port\": ports 0xe8..=0xeb overlap port 0xe0 \
             of the test device",
        ),
        (
            "test_device = true\ndebug_exit = true\ndebug_exit_port = 0x1ffe",
            "vm \"t\" (line 7): key \"debug_exit_port\": ports 0x1ffe..=0x2001 overlap port \
             0x2000 of the test device",
        ),
    ];
    for (extra, message) in cases {
        let m = vm(extra);
        assert!(m.vms.is_empty(), "{extra}");
        assert_eq!(messages(&m), [message], "{extra}");
    }
}

#[test]
fn a_linux_kernel_with_its_initrd_instead_of_an_image() {
    let images = ["vmlinuz", "initramfs", "hello"];
    let host = HostLimits {
        images: Some(&images),
        memory_bytes: None,
    };
    let vm = |keys: &str| {
        parse(
            &alloc::format!("[[vm]]\nname = \"l\"\nmemory_mib = 256\n{keys}\n"),
            &host,
        )
        .unwrap()
    };
    let m = vm("kernel = \"vmlinuz\"\ninitrd = \"initramfs\"\ncmdline = \"console=ttyS0\"");
    assert_eq!(m.errors, []);
    let v = &m.vms[0];
    assert!(v.linux);
    assert_eq!(v.image, "vmlinuz");
    assert_eq!(v.initrd.as_deref(), Some("initramfs"));
    let m = vm("kernel = \"vmlinuz\"");
    assert_eq!((m.vms[0].linux, m.vms[0].initrd.clone()), (true, None));
    assert!(!vm("image = \"hello\"").vms[0].linux);

    let cases = [
        (
            "cmdline = \"x\"",
            "vm \"l\" (line 1): missing required key \"image\" (or \"kernel\", for a Linux bzImage)",
        ),
        (
            "image = \"hello\"\nkernel = \"vmlinuz\"",
            "vm \"l\" (line 5): key \"kernel\": `image` and `kernel` both given: a VM boots one \
             kernel, take one away",
        ),
        (
            "image = \"hello\"\ninitrd = \"initramfs\"",
            "vm \"l\" (line 5): key \"initrd\": an initrd goes with a Linux kernel (`kernel = ...`), \
             not with `image`",
        ),
        (
            "kernel = \"vmlinuz\"\nmodules = [\"hello\"]",
            "vm \"l\" (line 5): key \"modules\": modules are Multiboot's; a Linux kernel (`kernel = \
             ...`) takes an `initrd`",
        ),
        (
            "kernel = \"nope\"",
            "vm \"l\" (line 4): key \"kernel\": no image named \"nope\" is available",
        ),
        (
            "kernel = \"vmlinuz\"\ninitrd = \"nope\"",
            "vm \"l\" (line 5): key \"initrd\": no image named \"nope\" is available",
        ),
    ];
    for (keys, message) in cases {
        let m = vm(keys);
        assert!(m.vms.is_empty(), "{keys}");
        assert_eq!(messages(&m), [message], "{keys}");
    }
}

#[test]
fn idle_table_and_per_vm_opt_out() {
    let m = ok("[[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"i\"\n");
    assert_eq!(m.idle, IdleConfig::default());
    assert!(m.idle.detect, "detection is on by default");
    assert!(m.vms[0].idle_reclaim);
    let m = ok(
        "[idle]\ndetect = true\ninterval_us = 50_000\nidle_after = 2\n\
                dormant_after = 10\nbusy_cpu_percent = 20\nquantum_shrink = 8\n\
                timer_slack_us = 0\n\n\
                [[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"i\"\nidle_reclaim = false\n",
    );
    assert_eq!(messages(&m), Vec::<String>::new());
    assert_eq!(
        m.idle,
        IdleConfig {
            detect: true,
            interval_us: 50_000,
            idle_after: 2,
            dormant_after: 10,
            busy_cpu_percent: 20,
            quantum_shrink: 8,
            timer_slack_us: 0,
        }
    );
    assert!(!m.vms[0].idle_reclaim);
}

#[test]
fn bad_idle_table_turns_detection_off_and_keeps_the_vms() {
    let m = ok(
        "[idle]\ninterval_us = 10\nquantum_shrink = 0\nbusy = 5\nidle_after = \"3\"\n\n\
                [[vm]]\nname = \"a\"\nmemory_mib = 4\nimage = \"i\"\nidle_reclaim = 1\n\n\
                [[vm]]\nname = \"b\"\nmemory_mib = 4\nimage = \"i\"\n",
    );
    assert_eq!(
        messages(&m),
        [
            "[idle] (line 2): key \"interval_us\": 10 is out of range 1000..=10000000",
            "[idle] (line 3): key \"quantum_shrink\": 0 is out of range 1..=64",
            "[idle] (line 4): unknown key \"busy\" (known keys: detect, interval_us, idle_after, \
             dormant_after, busy_cpu_percent, quantum_shrink, timer_slack_us)",
            "[idle] (line 5): key \"idle_after\": expected integer, found string",
            "vm \"a\" (line 11): key \"idle_reclaim\": expected boolean, found integer",
        ]
    );
    assert!(!m.idle.detect);
    assert_eq!(names(&m), ["b"]);
}
