//! The schema check: walks the spanned TOML tree, turns each `[[vm]]` into a [`VmConfig`] or a
//! list of errors, and maps byte offsets to lines.
//!
//! Every table is walked key by key against a fixed list of known keys, so unknown keys are
//! caught at every level and all problems of a VM are reported together (not just the first).

use alloc::borrow::ToOwned;
use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::{
    ErrorKind, FatalError, HostLimits, IdleConfig, Manifest, ManifestError, MemoryConfig, Scope,
    VmConfig, BUSY_CPU_PERCENT_RANGE, CMDLINE_MAX, COLD_AFTER_US_RANGE, CPU_SHARE_RANGE,
    DEBUG_EXIT_PORT_DEFAULT, DEFAULT_QUANTUM_US, DORMANT_AFTER_RANGE, IDLE_AFTER_RANGE,
    IDLE_INTERVAL_US_RANGE, LOW_WATERMARK_MIB_RANGE, MEMORY_MIB_MAX, MEMORY_MIB_MIN, MODULES_MAX,
    NAME_MAX, PLATFORM_PORTS, QUANTUM_SHRINK_RANGE, QUANTUM_US_RANGE, SCAN_CPU_PERCENT_RANGE,
    SCAN_INTERVAL_US_RANGE, SCAN_PAGES_RANGE, SHARING_DOMAIN_MAX, TEST_DEVICE_PORTS,
    TEST_DEVICE_RAM_BASE, TIMER_SLACK_US_RANGE, TIME_DILATION_MAX, TIME_DILATION_SCALE,
};

const TOP_KEYS: &[&str] = &["defaults", "memory", "idle", "vm"];
const DEFAULTS_KEYS: &[&str] = &["quantum_us"];
const MEMORY_KEYS: &[&str] = &[
    "multiplex",
    "scan_pages",
    "scan_interval_us",
    "cold_after_us",
    "scan_cpu_percent",
    "low_watermark_mib",
];
const IDLE_KEYS: &[&str] = &[
    "detect",
    "interval_us",
    "idle_after",
    "dormant_after",
    "busy_cpu_percent",
    "quantum_shrink",
    "timer_slack_us",
];
const VM_KEYS: &[&str] = &[
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
    "idle_reclaim",
];
/// Required keys; one of `image` and `kernel` is too (checked on its own).
const VM_REQUIRED: &[&str] = &["name", "memory_mib"];

type Value<'i> = Spanned<DeValue<'i>>;

/// Maps byte offsets of a text to 1-based lines and columns.
pub(crate) struct Lines<'a> {
    text: &'a str,
    /// Byte offset of the start of each line.
    starts: Vec<usize>,
}

impl<'a> Lines<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        let starts = core::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { text, starts }
    }

    pub(crate) fn line(&self, offset: usize) -> usize {
        // `starts[0] == 0`, so at least one start is <= any offset.
        self.starts.partition_point(|&start| start <= offset)
    }

    /// Line and column (in characters, as editors count) of `offset`.
    pub(crate) fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line(offset);
        let start = self.starts[line - 1];
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        (line, column + 1)
    }
}

/// Errors gathered during the walk, with the byte offset they are reported in order of.
struct Errors<'a> {
    lines: &'a Lines<'a>,
    list: Vec<(usize, ManifestError)>,
}

impl Errors<'_> {
    fn push(&mut self, offset: usize, scope: Scope, key: Option<&str>, kind: ErrorKind) {
        let error = ManifestError {
            scope,
            key: key.map(ToOwned::to_owned),
            line: Some(self.lines.line(offset)),
            kind,
        };
        self.list.push((offset, error));
    }

    /// The errors in file order (stable: errors at the same place keep the order found).
    fn into_sorted(mut self) -> Vec<ManifestError> {
        self.list.sort_by_key(|(offset, _)| *offset);
        self.list.into_iter().map(|(_, e)| e).collect()
    }
}

/// The `quantum_us` a VM gets when it does not set one.
#[derive(Clone, Copy)]
enum Inherited {
    Value(u64),
    /// `[defaults]` tried to set it but the value (at this line) is unusable.
    Invalid(Option<usize>),
}

pub(crate) fn parse(text: &str, host: &HostLimits<'_>) -> Result<Manifest, FatalError> {
    let lines = Lines::new(text);
    let doc = DeTable::parse(text).map_err(|e| {
        let (line, column) = match e.span() {
            Some(span) => {
                let (l, c) = lines.line_col(span.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        FatalError::Syntax {
            line,
            column,
            message: e.message().to_owned(),
        }
    })?;

    let mut vm = None;
    let mut defaults = None;
    let mut memory = None;
    let mut idle = None;
    let mut unknown = Vec::new();
    for (key, value) in doc.get_ref().iter() {
        match key.get_ref().as_ref() {
            "vm" => vm = Some(value),
            "defaults" => defaults = Some(value),
            "memory" => memory = Some(value),
            "idle" => idle = Some(value),
            _ => unknown.push(key),
        }
    }
    unknown.sort_by_key(|key| key.span().start);

    let entries = match vm.map(|v| (v, v.get_ref())) {
        Some((_, DeValue::Array(entries))) if !entries.is_empty() => entries,
        Some((v, other)) if !matches!(other, DeValue::Array(_)) => {
            return Err(FatalError::VmNotArray {
                line: Some(lines.line(v.span().start)),
                found: other.type_str(),
            })
        }
        _ => {
            let unknown_keys = unknown
                .iter()
                .map(|k| (k.get_ref().to_string(), Some(lines.line(k.span().start))))
                .collect();
            return Err(FatalError::NoVms { unknown_keys });
        }
    };

    let mut errors = Errors {
        lines: &lines,
        list: Vec::new(),
    };
    for key in unknown {
        errors.push(
            key.span().start,
            Scope::TopLevel,
            Some(key.get_ref()),
            ErrorKind::UnknownKey { known: TOP_KEYS },
        );
    }
    let inherited = match defaults {
        Some(value) => check_defaults(value, &mut errors),
        None => Inherited::Value(DEFAULT_QUANTUM_US),
    };
    let memory = match memory {
        Some(value) => check_memory(value, &mut errors),
        None => MemoryConfig::default(),
    };
    let idle = match idle {
        Some(value) => check_idle(value, &mut errors),
        None => IdleConfig::default(),
    };

    // Name -> line of the `name` key of the first VM that uses it.
    let mut names = BTreeMap::new();
    let vms = entries
        .iter()
        .enumerate()
        .filter_map(|(i, entry)| check_vm(i + 1, entry, inherited, host, &mut names, &mut errors))
        .collect();
    Ok(Manifest {
        vms,
        memory,
        idle,
        errors: errors.into_sorted(),
    })
}

/// `[memory]`. Any error turns multiplexing off (the VMs then run with plain memory, which is
/// always correct), after reporting every problem of the table.
fn check_memory(value: &Value<'_>, errors: &mut Errors<'_>) -> MemoryConfig {
    let mut config = MemoryConfig::default();
    let c = &mut config;
    let bad = settings_table(
        value,
        errors,
        "memory",
        Scope::Memory,
        MEMORY_KEYS,
        |name, v| {
            Some(match name {
                "multiplex" => boolean(v).map(|b| c.multiplex = b),
                "scan_pages" => in_range(v, &SCAN_PAGES_RANGE).map(|n| c.scan_pages = n),
                "scan_interval_us" => {
                    in_range(v, &SCAN_INTERVAL_US_RANGE).map(|n| c.scan_interval_us = n)
                }
                "cold_after_us" => in_range(v, &COLD_AFTER_US_RANGE).map(|n| c.cold_after_us = n),
                "scan_cpu_percent" => {
                    in_range(v, &SCAN_CPU_PERCENT_RANGE).map(|n| c.scan_cpu_percent = n)
                }
                "low_watermark_mib" => {
                    in_range(v, &LOW_WATERMARK_MIB_RANGE).map(|n| c.low_watermark_mib = n)
                }
                _ => return None,
            })
        },
    );
    match bad {
        None => MemoryConfig::default(),
        Some(bad) => {
            config.multiplex &= !bad;
            config
        }
    }
}

/// `[idle]`. Any error turns detection off (every VM then stays active, which is how the
/// hypervisor ran before it had a detector), after reporting every problem of the table.
fn check_idle(value: &Value<'_>, errors: &mut Errors<'_>) -> IdleConfig {
    let mut config = IdleConfig::default();
    let c = &mut config;
    let bad = settings_table(value, errors, "idle", Scope::Idle, IDLE_KEYS, |name, v| {
        Some(match name {
            "detect" => boolean(v).map(|b| c.detect = b),
            "interval_us" => in_range(v, &IDLE_INTERVAL_US_RANGE).map(|n| c.interval_us = n),
            "idle_after" => in_range(v, &IDLE_AFTER_RANGE).map(|n| c.idle_after = n),
            "dormant_after" => in_range(v, &DORMANT_AFTER_RANGE).map(|n| c.dormant_after = n),
            "busy_cpu_percent" => {
                in_range(v, &BUSY_CPU_PERCENT_RANGE).map(|n| c.busy_cpu_percent = n)
            }
            "quantum_shrink" => in_range(v, &QUANTUM_SHRINK_RANGE).map(|n| c.quantum_shrink = n),
            "timer_slack_us" => in_range(v, &TIMER_SLACK_US_RANGE).map(|n| c.timer_slack_us = n),
            _ => return None,
        })
    });
    match bad {
        None => IdleConfig::default(),
        Some(bad) => {
            config.detect &= !bad;
            config
        }
    }
}

/// Walks a settings table (`[memory]`, `[idle]`) key by key: `set` applies a key's value and
/// says whether it fits, or returns `None` for a key it does not know. Every problem is
/// recorded under `scope`. Returns whether the table had any problem, or `None` when `value`
/// is not a table (also recorded).
fn settings_table(
    value: &Value<'_>,
    errors: &mut Errors<'_>,
    name: &str,
    scope: Scope,
    known: &'static [&'static str],
    mut set: impl FnMut(&str, &Value<'_>) -> Option<Result<(), ErrorKind>>,
) -> Option<bool> {
    let table = table_or_error(value, errors, Scope::TopLevel, Some(name))?;
    let mut bad = false;
    for (key, value) in table.iter() {
        let key_name: &str = key.get_ref();
        let (at, problem) = match set(key_name, value) {
            Some(Ok(())) => continue,
            Some(Err(kind)) => (value.span().start, kind),
            None => (key.span().start, ErrorKind::UnknownKey { known }),
        };
        errors.push(at, scope.clone(), Some(key_name), problem);
        bad = true;
    }
    Some(bad)
}

/// An integer within `range`.
fn in_range(value: &Value<'_>, range: &core::ops::RangeInclusive<u64>) -> Result<u64, ErrorKind> {
    integer_in(value, *range.start(), *range.end())
}

fn check_defaults(value: &Value<'_>, errors: &mut Errors<'_>) -> Inherited {
    let Some(table) = table_or_error(value, errors, Scope::TopLevel, Some("defaults")) else {
        return Inherited::Invalid(Some(errors.lines.line(value.span().start)));
    };
    let mut quantum = Inherited::Value(DEFAULT_QUANTUM_US);
    for (key, value) in table.iter() {
        let name: &str = key.get_ref();
        match name {
            "quantum_us" => {
                match integer_in(value, *QUANTUM_US_RANGE.start(), *QUANTUM_US_RANGE.end()) {
                    Ok(q) => quantum = Inherited::Value(q),
                    Err(kind) => {
                        let at = value.span().start;
                        errors.push(at, Scope::Defaults, Some(name), kind);
                        quantum = Inherited::Invalid(Some(errors.lines.line(at)));
                    }
                }
            }
            _ => errors.push(
                key.span().start,
                Scope::Defaults,
                Some(name),
                ErrorKind::UnknownKey {
                    known: DEFAULTS_KEYS,
                },
            ),
        }
    }
    quantum
}

/// Checks the `index`-th `[[vm]]` (1-based). Returns the VM if it has no problem; otherwise
/// records its problems and returns `None`.
fn check_vm(
    index: usize,
    entry: &Value<'_>,
    inherited: Inherited,
    host: &HostLimits<'_>,
    names: &mut BTreeMap<String, usize>,
    errors: &mut Errors<'_>,
) -> Option<VmConfig> {
    let header = entry.span().start;
    let table = table_or_error(entry, errors, Scope::Vm { index, name: None }, None)?;

    // (offset, key, problem); the scope is only known once the name is settled.
    let mut problems: Vec<(usize, String, ErrorKind)> = Vec::new();
    let mut name: Option<(&str, usize)> = None;
    let mut memory_mib = None;
    let mut image = None;
    let mut kernel = None;
    let mut initrd = None;
    let mut cmdline = "";
    let mut modules = Vec::new();
    let mut debug_exit = false;
    let mut debug_exit_port = None;
    let mut test_device = false;
    let mut quantum_us = None;
    let vcpus = 1;
    let mut sharing_domain = 0;
    let mut time_dilation_milli = TIME_DILATION_SCALE;
    let mut cpu_share = 1;
    let mut idle_reclaim = true;

    for (spanned_key, value) in table.iter() {
        let key: &str = spanned_key.get_ref();
        let at = value.span().start;
        let result = match key {
            "name" => string(value).and_then(|s| {
                check_name(s, Some(NAME_MAX))?;
                name = Some((s, at));
                Ok(())
            }),
            "memory_mib" => integer_in(value, MEMORY_MIB_MIN, MEMORY_MIB_MAX).and_then(|mib| {
                memory_mib = Some(mib);
                match host.memory_bytes {
                    Some(host_bytes) if mib << 20 > host_bytes => {
                        Err(ErrorKind::MemoryExceedsHost {
                            memory_mib: mib,
                            host_mib: host_bytes >> 20,
                        })
                    }
                    _ => Ok(()),
                }
            }),
            "image" => boot_module(value, host).map(|s| image = Some(s)),
            "kernel" => boot_module(value, host).map(|s| kernel = Some(s)),
            "initrd" => boot_module(value, host).map(|s| initrd = Some(s)),
            "cmdline" => string(value).and_then(|s| {
                cmdline = s;
                if s.len() > CMDLINE_MAX {
                    Err(ErrorKind::TooLong {
                        len: s.len(),
                        max: CMDLINE_MAX,
                    })
                } else {
                    Ok(())
                }
            }),
            "modules" => module_list(value, host).map(|m| modules = m),
            "debug_exit" => boolean(value).map(|b| debug_exit = b),
            "test_device" => boolean(value).map(|b| test_device = b),
            // The device takes 4 ports, as QEMU's isa-debug-exit with iosize=4.
            "debug_exit_port" => {
                integer_in(value, 0, 0xfffc).and_then(|port| {
                    match first_overlapped(PLATFORM_PORTS, port) {
                        Some(taken) => Err(ErrorKind::PortTaken {
                            port,
                            taken,
                            owner: "the virtual PC",
                        }),
                        None => {
                            debug_exit_port = Some(port as u16);
                            Ok(())
                        }
                    }
                })
            }
            "quantum_us" => integer_in(value, *QUANTUM_US_RANGE.start(), *QUANTUM_US_RANGE.end())
                .map(|q| quantum_us = Some(q)),
            // The range keeps the value within u32.
            "sharing_domain" => {
                integer_in(value, 0, SHARING_DOMAIN_MAX).map(|d| sharing_domain = d as u32)
            }
            "time_dilation" => time_dilation(value).map(|t| time_dilation_milli = t),
            // The range keeps the value within u32.
            "cpu_share" => integer_in(value, *CPU_SHARE_RANGE.start(), *CPU_SHARE_RANGE.end())
                .map(|w| cpu_share = w as u32),
            "idle_reclaim" => boolean(value).map(|b| idle_reclaim = b),
            "vcpus" => match value.get_ref() {
                // Any other integer, even one that overflows, gets the "not supported"
                // message rather than a range error: that is what the user needs to know.
                DeValue::Integer(n) if i128::from_str_radix(n.as_str(), n.radix()) == Ok(1) => {
                    Ok(())
                }
                DeValue::Integer(n) => Err(ErrorKind::VcpusUnsupported {
                    value: n.to_string(),
                }),
                other => Err(ErrorKind::WrongType {
                    expected: "integer",
                    found: other.type_str(),
                }),
            },
            _ => {
                let kind = ErrorKind::UnknownKey { known: VM_KEYS };
                problems.push((spanned_key.span().start, key.to_owned(), kind));
                Ok(())
            }
        };
        if let Err(kind) = result {
            problems.push((at, key.to_owned(), kind));
        }
    }

    if !debug_exit {
        if let Some(value) = table.get("debug_exit_port") {
            let at = value.span().start;
            problems.push((at, "debug_exit_port".to_owned(), ErrorKind::DebugExitOff));
        }
    }
    let debug_exit_port = debug_exit.then(|| debug_exit_port.unwrap_or(DEBUG_EXIT_PORT_DEFAULT));
    if test_device {
        check_test_device(table, debug_exit_port, memory_mib, &mut problems);
    }
    for key in VM_REQUIRED {
        if !table.contains_key(*key) {
            problems.push((header, (*key).to_owned(), ErrorKind::MissingKey));
        }
    }
    // The guest kernel: `image` (an ELF or Multiboot kernel) or `kernel` (a Linux bzImage),
    // exactly one; `initrd` and `modules` go with one kind each.
    let at = |key: &str| table.get(key).map_or(header, |v| v.span().start);
    match (table.contains_key("image"), table.contains_key("kernel")) {
        (false, false) => problems.push((header, "image".to_owned(), ErrorKind::MissingKernel)),
        (true, true) => problems.push((at("kernel"), "kernel".to_owned(), ErrorKind::TwoKernels)),
        _ => {}
    }
    if table.contains_key("initrd") && !table.contains_key("kernel") {
        problems.push((
            at("initrd"),
            "initrd".to_owned(),
            ErrorKind::NeedsLinuxKernel,
        ));
    }
    if table.contains_key("modules") && table.contains_key("kernel") {
        problems.push((
            at("modules"),
            "modules".to_owned(),
            ErrorKind::ModulesWithLinux,
        ));
    }
    let linux = kernel.is_some();
    let image = image.or(kernel);
    let quantum_us = match (quantum_us, inherited) {
        (Some(q), _) => Some(q),
        (None, _) if table.contains_key("quantum_us") => None, // invalid, already reported
        (None, Inherited::Value(q)) => Some(q),
        (None, Inherited::Invalid(defaults_line)) => {
            let kind = ErrorKind::InvalidDefault { defaults_line };
            problems.push((header, "quantum_us".to_owned(), kind));
            None
        }
    };

    // A VM is called by its name only if the name is valid and not taken by an earlier VM.
    let mut scope_name = None;
    if let Some((n, at)) = name {
        let line = errors.lines.line(at);
        match names.get(n) {
            Some(&first_line) => problems.push((
                at,
                "name".to_owned(),
                ErrorKind::DuplicateName {
                    name: n.to_owned(),
                    first_line: Some(first_line),
                },
            )),
            None => {
                names.insert(n.to_owned(), line);
                scope_name = Some(n.to_owned());
            }
        }
    }

    if let (true, Some((name, _)), Some(memory_mib), Some(image), Some(quantum_us)) =
        (problems.is_empty(), name, memory_mib, image, quantum_us)
    {
        return Some(VmConfig {
            name: name.to_owned(),
            memory_mib,
            image: image.to_owned(),
            cmdline: cmdline.to_owned(),
            modules,
            linux,
            initrd: initrd.map(ToOwned::to_owned),
            debug_exit_port,
            test_device,
            quantum_us,
            vcpus,
            sharing_domain,
            time_dilation_milli,
            cpu_share,
            idle_reclaim,
            line: Some(errors.lines.line(header)),
        });
    }
    debug_assert!(!problems.is_empty(), "a rejected VM must have a reason");
    for (at, key, kind) in problems {
        let scope = Scope::Vm {
            index,
            name: scope_name.clone(),
        };
        errors.push(at, scope, Some(&key), kind);
    }
    None
}

/// `modules`: an array of at most [`MODULES_MAX`] image names, each available on the host.
fn module_list(value: &Value<'_>, host: &HostLimits<'_>) -> Result<Vec<String>, ErrorKind> {
    let DeValue::Array(items) = value.get_ref() else {
        return Err(ErrorKind::WrongType {
            expected: "array of strings",
            found: value.get_ref().type_str(),
        });
    };
    if items.len() > MODULES_MAX {
        return Err(ErrorKind::TooMany {
            count: items.len(),
            max: MODULES_MAX,
        });
    }
    items
        .iter()
        .map(|item| boot_module(item, host).map(ToOwned::to_owned))
        .collect()
}

/// Whether the host has an image (boot module) called `name`, when it says which it has.
fn available(name: &str, host: &HostLimits<'_>) -> Result<(), ErrorKind> {
    match host.images {
        Some(images) if !images.contains(&name) => Err(ErrorKind::ImageNotFound {
            image: name.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// The value as a table; otherwise a "expected table" error at the value, in `scope`.
fn table_or_error<'v, 'i>(
    value: &'v Value<'i>,
    errors: &mut Errors<'_>,
    scope: Scope,
    key: Option<&str>,
) -> Option<&'v DeTable<'i>> {
    match value.get_ref() {
        DeValue::Table(table) => Some(table),
        other => {
            let kind = ErrorKind::WrongType {
                expected: "table",
                found: other.type_str(),
            };
            errors.push(value.span().start, scope, key, kind);
            None
        }
    }
}

/// The first port of the range in `ranges` (first, count) that the test-exit device's 4 ports
/// from `port` overlap, if any.
fn first_overlapped(ranges: &[(u16, u16)], port: u64) -> Option<u16> {
    let end = port + 4;
    ranges
        .iter()
        .find(|(first, count)| u64::from(*first) < end && port < u64::from(first + count))
        .map(|&(first, _)| first)
}

/// A boot module's name (`image`, `kernel`, `initrd`, each of `modules`): a valid name the host
/// has.
fn boot_module<'v>(value: &'v Value<'_>, host: &HostLimits<'_>) -> Result<&'v str, ErrorKind> {
    let s = string(value)?;
    check_name(s, None)?;
    available(s, host)?;
    Ok(s)
}

fn boolean(value: &Value<'_>) -> Result<bool, ErrorKind> {
    match value.get_ref() {
        DeValue::Boolean(b) => Ok(*b),
        other => Err(ErrorKind::WrongType {
            expected: "boolean",
            found: other.type_str(),
        }),
    }
}

/// A VM with the test device: its ports must not meet the test-exit device's, and its MMIO RAM
/// must lie above the VM's memory (guest RAM would hide it).
fn check_test_device(
    table: &DeTable<'_>,
    debug_exit_port: Option<u16>,
    memory_mib: Option<u64>,
    problems: &mut Vec<(usize, String, ErrorKind)>,
) {
    let at = |key: &str| table.get(key).map_or(0, |v| v.span().start);
    if let Some(port) = debug_exit_port.map(u64::from) {
        if let Some(taken) = first_overlapped(TEST_DEVICE_PORTS, port) {
            // Without `debug_exit_port` the clash is with the default: report it at `debug_exit`.
            let key = if table.contains_key("debug_exit_port") {
                "debug_exit_port"
            } else {
                "debug_exit"
            };
            let kind = ErrorKind::PortTaken {
                port,
                taken,
                owner: "the test device",
            };
            problems.push((at(key), key.to_owned(), kind));
        }
    }
    if let Some(memory_mib) = memory_mib.filter(|mib| mib << 20 > TEST_DEVICE_RAM_BASE) {
        let kind = ErrorKind::HidesTestDevice { memory_mib };
        problems.push((at("test_device"), "test_device".to_owned(), kind));
    }
}

fn string<'v>(value: &'v Value<'_>) -> Result<&'v str, ErrorKind> {
    match value.get_ref() {
        DeValue::String(s) => Ok(s),
        other => Err(ErrorKind::WrongType {
            expected: "string",
            found: other.type_str(),
        }),
    }
}

/// An integer within `min..=max`.
fn integer_in(value: &Value<'_>, min: u64, max: u64) -> Result<u64, ErrorKind> {
    let DeValue::Integer(int) = value.get_ref() else {
        return Err(ErrorKind::WrongType {
            expected: "integer",
            found: value.get_ref().type_str(),
        });
    };
    // TOML integers are i64, but the parser keeps the literal: parse wide so that anything
    // that does not fit is simply out of range.
    i128::from_str_radix(int.as_str(), int.radix())
        .ok()
        .filter(|n| (i128::from(min)..=i128::from(max)).contains(n))
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| ErrorKind::OutOfRange {
            value: int.to_string(),
            min,
            max,
        })
}

/// `time_dilation`: an integer or a float from 1 to [`TIME_DILATION_MAX`] with at most three
/// decimals, in thousandths. NaN, the infinities, negative numbers, zero and strings are all
/// refused with the same message, which says what is allowed.
fn time_dilation(value: &Value<'_>) -> Result<u32, ErrorKind> {
    let max = u64::from(TIME_DILATION_MAX) * u64::from(TIME_DILATION_SCALE);
    let scale = u64::from(TIME_DILATION_SCALE);
    let milli = match value.get_ref() {
        DeValue::Integer(int) => i128::from_str_radix(int.as_str(), int.radix())
            .ok()
            .and_then(|n| u64::try_from(n).ok())
            .and_then(|n| n.checked_mul(scale)),
        DeValue::Float(float) => float
            .as_str()
            .parse::<f64>()
            .ok()
            // Also refuses NaN and the infinities (every comparison with NaN is false).
            .filter(|f| *f >= 1.0 && *f <= f64::from(TIME_DILATION_MAX))
            .and_then(|f| {
                let thousandths = f * f64::from(TIME_DILATION_SCALE);
                // In range, so the cast is exact after rounding to the nearest thousandth.
                let rounded = (thousandths + 0.5) as u64;
                let off = thousandths - rounded as f64;
                (-1e-6..=1e-6).contains(&off).then_some(rounded)
            }),
        DeValue::String(_) | DeValue::Boolean(_) | DeValue::Datetime(_) => None,
        other => {
            return Err(ErrorKind::WrongType {
                expected: "number",
                found: other.type_str(),
            })
        }
    };
    milli
        .filter(|m| (scale..=max).contains(m))
        // Within u32: max is 1_000_000.
        .map(|m| m as u32)
        .ok_or_else(|| ErrorKind::BadTimeDilation {
            value: literal(value),
        })
}

/// A scalar value as the user wrote it, for messages (strings quoted).
fn literal(value: &Value<'_>) -> String {
    match value.get_ref() {
        DeValue::Integer(int) => int.to_string(),
        DeValue::Float(float) => float.as_str().to_owned(),
        DeValue::String(s) => alloc::format!("{:?}", s.as_ref() as &str),
        DeValue::Boolean(b) => b.to_string(),
        other => other.type_str().to_owned(),
    }
}

/// VM and image names: non-empty, at most `max` bytes, only [`crate::NAME_CHARS`]. Images are
/// held to the same alphabet because an image name is both a GRUB module name (split on
/// whitespace) and a file name under `boot/guests/` on the host.
fn check_name(s: &str, max: Option<usize>) -> Result<(), ErrorKind> {
    if s.is_empty() {
        return Err(ErrorKind::Empty);
    }
    if let Some(max) = max.filter(|&max| s.len() > max) {
        return Err(ErrorKind::TooLong { len: s.len(), max });
    }
    match s
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        Some(ch) => Err(ErrorKind::BadChar {
            value: s.to_owned(),
            ch,
        }),
        None => Ok(()),
    }
}
