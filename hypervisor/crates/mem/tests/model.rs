//! Model-based property test: any interleaving of guest writes and reads (through the emulated
//! MMU, so writes to non-writable pages fault into the engine first, as on an EPT violation),
//! scans (which share, patch and compress), CoW breaks, fault-ins, touches and frame shortages
//! leaves every page of every VM byte-identical to a plain model that only saw the writes.

mod common;

use common::{random_page, text_page};
use hv_mem::{
    access_read, access_write, Access, Config, DomainId, Engine, Error, Gfn, Page, PlainMemory,
    VmId, PAGE_SIZE,
};
use proptest::prelude::*;

const VMS: [(VmId, DomainId); 3] = [
    (VmId(1), DomainId(0)),
    (VmId(2), DomainId(0)),
    (VmId(3), DomainId(7)),
];
const PAGES: usize = 6;

/// Page contents drawn from a small pool, so that identical, similar, zero and compressible
/// pages are common.
#[derive(Clone, Copy, Debug)]
enum Template {
    Zero,
    Random(u8),
    Text(u8),
    /// Random(base) with a few bytes changed: similar to it.
    Similar(u8, u8),
}

impl Template {
    fn page(self) -> Page {
        match self {
            Template::Zero => [0; PAGE_SIZE],
            Template::Random(s) => random_page(s as u64),
            Template::Text(s) => text_page(s as u64),
            Template::Similar(base, s) => {
                let mut p = random_page(base as u64);
                let at = (s as usize * 97) % (PAGE_SIZE - 16);
                p[at..at + 16].fill(s);
                p
            }
        }
    }
}

fn template() -> impl Strategy<Value = Template> {
    prop_oneof![
        2 => Just(Template::Zero),
        3 => (0u8..3).prop_map(Template::Random),
        2 => (0u8..3).prop_map(Template::Text),
        3 => (0u8..3, any::<u8>()).prop_map(|(b, s)| Template::Similar(b, s)),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    /// A guest write of a few bytes.
    Write {
        vm: usize,
        gfn: usize,
        offset: usize,
        len: usize,
        value: u8,
    },
    /// A guest write of a whole page (makes duplicates and zero pages appear at run time).
    WritePage {
        vm: usize,
        gfn: usize,
        template: Template,
    },
    /// A guest read, compared with the model.
    Read { vm: usize, gfn: usize },
    /// The guest touches a page (sets its accessed bit) without the engine knowing.
    Touch { vm: usize, gfn: usize },
    /// A direct fault call, as a spurious or racing EPT violation would make.
    Fault { vm: usize, gfn: usize, write: bool },
    /// Some scanning.
    Scan { pages: u64 },
    /// VM `vm` runs for `us` microseconds (its own time and host time pass).
    Run { vm: usize, us: u64 },
    /// Host time passes while no VM runs.
    Wait { us: u64 },
    /// Limit frames to what is in use plus `slack`, or lift the limit.
    Budget(Option<usize>),
}

fn op() -> impl Strategy<Value = Op> {
    let vm = 0..VMS.len();
    let gfn = 0..PAGES;
    prop_oneof![
        4 => (vm.clone(), gfn.clone(), 0..PAGE_SIZE, 1usize..64, any::<u8>()).prop_map(
            |(vm, gfn, offset, len, value)| Op::Write {
                vm,
                gfn,
                offset,
                len: len.min(PAGE_SIZE - offset),
                value
            }
        ),
        2 => (vm.clone(), gfn.clone(), template())
            .prop_map(|(vm, gfn, template)| Op::WritePage { vm, gfn, template }),
        3 => (vm.clone(), gfn.clone()).prop_map(|(vm, gfn)| Op::Read { vm, gfn }),
        1 => (vm.clone(), gfn.clone()).prop_map(|(vm, gfn)| Op::Touch { vm, gfn }),
        2 => (vm.clone(), gfn, any::<bool>())
            .prop_map(|(vm, gfn, write)| Op::Fault { vm, gfn, write }),
        6 => (1u64..40).prop_map(|pages| Op::Scan { pages }),
        3 => (vm.clone(), 0u64..3000).prop_map(|(vm, us)| Op::Run { vm, us }),
        1 => (0u64..3000).prop_map(|us| Op::Wait { us }),
        1 => prop::option::of(0usize..3).prop_map(Op::Budget),
    ]
}

fn config() -> impl Strategy<Value = Config> {
    (
        prop::sample::select(vec![
            (1u64, 0u64),
            (1, 1),
            (100, 1000),
            (1000, 100),
            (2000, 2000),
        ]),
        1u8..5,
        prop::sample::select(vec![64usize, 512, 2048, 4096]),
        prop::sample::select(vec![256usize, 2048, 3072, 4096]),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(cold, blocks, patch_cutoff, compress_cutoff, shared, patching, compression)| Config {
                cold_after_us: cold.0,
                cold_after_wall_us: cold.1,
                similarity_blocks: blocks,
                patch_cutoff,
                compress_cutoff,
                compress_shared: shared,
                patching,
                compression,
                ..Config::default()
            },
        )
}

struct World {
    engine: Engine,
    mem: PlainMemory,
    model: Vec<Vec<Page>>,
    /// Each VM's own time and host time, microseconds.
    own: Vec<u64>,
    wall: u64,
}

impl World {
    fn check(&self) -> Result<(), TestCaseError> {
        self.engine
            .check_consistency(&self.mem)
            .map_err(TestCaseError::fail)?;
        let mut buf = [0u8; PAGE_SIZE];
        for (v, (vm, _)) in VMS.iter().enumerate() {
            for gfn in 0..PAGES {
                self.engine
                    .read_page(&self.mem, *vm, Gfn(gfn as u64), &mut buf)
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert!(buf == self.model[v][gfn], "VM {} gfn {}", vm.0, gfn);
            }
        }
        let s = self.engine.stats();
        prop_assert_eq!(s.frames_in_use, self.mem.frames_in_use() as u64);
        prop_assert_eq!(s.frames_saved(), s.pages_total - s.frames_in_use);
        Ok(())
    }

    /// Runs one write through the MMU. Out of frames is allowed (the write did not happen).
    fn write(&mut self, v: usize, gfn: usize, offset: usize, data: &[u8]) -> Result<(), Error> {
        let vm = VMS[v].0;
        match access_write(
            &mut self.engine,
            &mut self.mem,
            vm,
            Gfn(gfn as u64),
            offset,
            data,
        ) {
            Ok(_) => {
                self.model[v][gfn][offset..offset + data.len()].copy_from_slice(data);
                Ok(())
            }
            Err(Error::OutOfFrames) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Runs one case; returns the engine's counters so coverage can be checked.
fn run_case(
    config: Config,
    initial: &[Template],
    ops: &[Op],
) -> Result<hv_mem::Counters, TestCaseError> {
    let mut w = World {
        engine: Engine::new(config).unwrap(),
        mem: PlainMemory::new(),
        model: Vec::new(),
        own: vec![0; VMS.len()],
        wall: 0,
    };
    for (v, (vm, domain)) in VMS.iter().enumerate() {
        let pages: Vec<Page> = initial[v * PAGES..(v + 1) * PAGES]
            .iter()
            .map(|t| t.page())
            .collect();
        w.mem
            .create_vm_with(*vm, PAGES as u64, |g, p| *p = pages[g as usize])
            .unwrap();
        w.engine.add_vm(*vm, *domain, PAGES as u64).unwrap();
        w.model.push(pages);
    }
    // Warm up so that sharing, patching and compression are in place before the guests
    // start writing.
    w.engine.run_until_converged(&mut w.mem, 10);
    w.check()?;
    // That moved the engine's clocks by a threshold per round: go on from beyond that.
    let base = 10 * w.engine.config().cold_span_us();
    w.wall = base;
    w.engine.set_wall_time(base);
    for (v, (vm, _)) in VMS.iter().enumerate() {
        w.own[v] = base;
        w.engine
            .set_vm_time(*vm, base)
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
    }

    let mut budget = None;
    for op in ops.iter().cloned() {
        match op {
            Op::Write {
                vm,
                gfn,
                offset,
                len,
                value,
            } => {
                let data: Vec<u8> = (0..len).map(|i| value.wrapping_add(i as u8)).collect();
                w.write(vm, gfn, offset, &data)
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?;
            }
            Op::WritePage { vm, gfn, template } => {
                let page = template.page();
                w.write(vm, gfn, 0, &page)
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?;
            }
            Op::Read { vm, gfn } => {
                match access_read(&mut w.engine, &mut w.mem, VMS[vm].0, Gfn(gfn as u64)) {
                    Ok(p) => prop_assert!(*p == w.model[vm][gfn]),
                    Err(Error::OutOfFrames) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
                }
            }
            Op::Touch { vm, gfn } => {
                w.mem.touch(VMS[vm].0, Gfn(gfn as u64));
            }
            Op::Fault { vm, gfn, write } => {
                let access = if write { Access::Write } else { Access::Read };
                match w
                    .engine
                    .fault(&mut w.mem, VMS[vm].0, Gfn(gfn as u64), access)
                {
                    Ok(_) | Err(Error::OutOfFrames) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
                }
            }
            Op::Scan { pages } => {
                // Scanning only ever frees frames: it works with no frame to spare.
                let before = w.mem.frames_in_use();
                w.mem.set_frame_budget(Some(before));
                w.engine.scan(&mut w.mem, pages);
                prop_assert!(w.mem.frames_in_use() <= before);
                w.mem.set_frame_budget(budget);
            }
            Op::Run { vm, us } => {
                w.own[vm] += us;
                w.wall += us;
                w.engine
                    .set_vm_time(VMS[vm].0, w.own[vm])
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?;
                w.engine.set_wall_time(w.wall);
            }
            Op::Wait { us } => {
                w.wall += us;
                w.engine.set_wall_time(w.wall);
            }
            Op::Budget(slack) => {
                budget = slack.map(|s| w.mem.frames_in_use() + s);
                w.mem.set_frame_budget(budget);
            }
        }
        w.check()?;
    }

    // Left alone, the engine converges, and everything is still intact.
    w.mem.set_frame_budget(None);
    prop_assert!(w.engine.run_until_converged(&mut w.mem, 30).is_some());
    w.check()?;
    // Every page still reads back right through the MMU (faulting in as needed).
    for (v, (vm, _)) in VMS.iter().enumerate() {
        for gfn in 0..PAGES {
            let p = access_read(&mut w.engine, &mut w.mem, *vm, Gfn(gfn as u64))
                .map_err(|e| TestCaseError::fail(format!("{e}")))?;
            prop_assert!(*p == w.model[v][gfn]);
        }
    }
    // Tearing down returns every frame.
    for (vm, _) in VMS {
        w.engine
            .remove_vm(&mut w.mem, vm)
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        w.mem.destroy_vm(vm);
    }
    prop_assert_eq!(w.mem.frames_in_use(), 0);
    Ok(w.engine.stats().counters)
}

fn case() -> impl Strategy<Value = (Config, Vec<Template>, Vec<Op>)> {
    (
        config(),
        prop::collection::vec(template(), VMS.len() * PAGES),
        prop::collection::vec(op(), 1..100),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn engine_matches_plain_model((config, initial, ops) in case()) {
        run_case(config, &initial, &ops)?;
    }
}

/// The property above is only as good as what its cases exercise: check, over a fixed set of
/// generated cases, that every mechanism and every fault path actually ran.
#[test]
fn model_cases_cover_every_mechanism() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut total = hv_mem::Counters::default();
    for _ in 0..150 {
        let (config, initial, ops) = case().new_tree(&mut runner).unwrap().current();
        let c = run_case(config, &initial, &ops).unwrap();
        total.merges_zero += c.merges_zero;
        total.merges_identical += c.merges_identical;
        total.patches_made += c.patches_made;
        total.pages_compressed += c.pages_compressed;
        total.shared_compressed += c.shared_compressed;
        total.cold_unmaps += c.cold_unmaps;
        total.cow_breaks += c.cow_breaks;
        total.cow_takeovers += c.cow_takeovers;
        total.faults_zero += c.faults_zero;
        total.faults_shared += c.faults_shared;
        total.faults_decompressed += c.faults_decompressed;
        total.faults_patched += c.faults_patched;
        total.faults_spurious += c.faults_spurious;
        total.faults_out_of_frames += c.faults_out_of_frames;
        total.volatile_skips += c.volatile_skips;
    }
    let t = total;
    for (name, n) in [
        ("merges_zero", t.merges_zero),
        ("merges_identical", t.merges_identical),
        ("patches_made", t.patches_made),
        ("pages_compressed", t.pages_compressed),
        ("shared_compressed", t.shared_compressed),
        ("cold_unmaps", t.cold_unmaps),
        ("cow_breaks", t.cow_breaks),
        ("cow_takeovers", t.cow_takeovers),
        ("faults_zero", t.faults_zero),
        ("faults_shared", t.faults_shared),
        ("faults_decompressed", t.faults_decompressed),
        ("faults_patched", t.faults_patched),
        ("faults_spurious", t.faults_spurious),
        ("faults_out_of_frames", t.faults_out_of_frames),
        ("volatile_skips", t.volatile_skips),
    ] {
        assert!(n > 0, "no case exercised {name}: {t:?}");
    }
}
