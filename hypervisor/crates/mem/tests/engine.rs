//! Behaviour of the engine through its public API, over `PlainMemory`.

mod common;

use common::{assert_vm, random_page, text_page};
use hv_mem::{
    access_read, access_write, Config, DomainId, Engine, Error, FaultResolution, Frame, Gfn,
    Mapping, MemoryBackend, OutOfFrames, Page, PlainMemory, VmId, PAGE_SIZE,
};
use std::cell::RefCell;
use std::collections::BTreeMap;

const D0: DomainId = DomainId(0);
const D1: DomainId = DomainId(1);

fn setup(config: Config, vms: &[(VmId, DomainId, &[Page])]) -> (Engine, PlainMemory) {
    let mut engine = Engine::new(config).unwrap();
    let mut mem = PlainMemory::new();
    for (vm, domain, pages) in vms {
        mem.create_vm_with(*vm, pages.len() as u64, |gfn, p| *p = pages[gfn as usize])
            .unwrap();
        engine.add_vm(*vm, *domain, pages.len() as u64).unwrap();
    }
    (engine, mem)
}

fn converge(engine: &mut Engine, mem: &mut PlainMemory) {
    let rounds = engine.run_until_converged(mem, 20);
    assert!(rounds.is_some(), "did not converge");
    engine.check_consistency(mem).unwrap();
}

/// One scan round a coldness threshold after the previous one, as if the VMs had run that long:
/// a page untouched since its previous visit is cold on its second.
fn round_later(engine: &mut Engine, mem: &mut impl MemoryBackend) {
    engine.advance_time(engine.config().cold_span_us());
    engine.scan_round(mem);
}

fn only_sharing() -> Config {
    Config {
        patching: false,
        compression: false,
        ..Config::default()
    }
}

#[test]
fn zero_pages_map_to_one_frame_and_break_on_write() {
    let vm = VmId(1);
    let mut pages: Vec<Page> = (0..16).map(|i| random_page(i + 100)).collect();
    for p in pages.iter_mut().step_by(2) {
        *p = [0; PAGE_SIZE];
    }
    let (mut engine, mut mem) = setup(Config::default(), &[(vm, D0, &pages)]);
    converge(&mut engine, &mut mem);
    let s = engine.stats();
    assert_eq!(s.pages_zero, 8);
    assert_eq!(s.frames_saved_zero, 7);
    // 8 random pages stay private (incompressible, nothing similar) + one zero frame.
    assert_eq!(s.pages_private, 8);
    assert_eq!(mem.frames_in_use(), 9);
    assert_eq!(s.frames_in_use, 9);
    assert_vm(&engine, &mem, vm, &pages);

    // Reads of a zero page need no fault: it is mapped read-only.
    assert_eq!(mem.guest_read(vm, Gfn(4)).unwrap(), &[0u8; PAGE_SIZE]);
    // A write breaks it out with a fresh zeroed frame.
    let r = access_write(&mut engine, &mut mem, vm, Gfn(4), 100, b"hello").unwrap();
    assert_eq!(r, Some(FaultResolution::ZeroFilled));
    pages[4][100..105].copy_from_slice(b"hello");
    assert_vm(&engine, &mem, vm, &pages);
    assert_eq!(engine.stats().counters.faults_zero, 1);
    engine.check_consistency(&mem).unwrap();
}

#[test]
fn identical_pages_are_shared_and_copy_on_write_restores_them() {
    let (a, b) = (VmId(1), VmId(2));
    let common: Vec<Page> = (0..4).map(random_page).collect();
    let mut pa = common.clone();
    pa.push(random_page(50));
    let mut pb = common.clone();
    pb.push(random_page(51));
    let (mut engine, mut mem) = setup(only_sharing(), &[(a, D0, &pa), (b, D0, &pb)]);
    assert_eq!(mem.frames_in_use(), 10);
    converge(&mut engine, &mut mem);
    let s = engine.stats();
    assert_eq!(s.pages_shared, 8);
    assert_eq!(s.objects_resident, 4);
    assert_eq!(s.frames_saved_shared, 4);
    assert_eq!(mem.frames_in_use(), 6);
    assert_eq!(s.counters.merges_identical, 4);
    // Shared pages are mapped read-only onto the same frame.
    let (ma, mb) = (
        mem.mapping(a, Gfn(2)).unwrap(),
        mem.mapping(b, Gfn(2)).unwrap(),
    );
    assert_eq!(ma.frame, mb.frame);
    assert!(!ma.writable && !mb.writable);

    // A write by A copies; B keeps the original bytes.
    let r = access_write(&mut engine, &mut mem, a, Gfn(2), 4000, &[9; 96]).unwrap();
    assert_eq!(r, Some(FaultResolution::CopiedOnWrite));
    pa[2][4000..].fill(9);
    // Now B is the only user: its write takes the frame over without a copy.
    let r = access_write(&mut engine, &mut mem, b, Gfn(2), 0, &[1]).unwrap();
    assert_eq!(r, Some(FaultResolution::TookOver));
    pb[2][0] = 1;
    assert_vm(&engine, &mem, a, &pa);
    assert_vm(&engine, &mem, b, &pb);
    let s = engine.stats();
    assert_eq!(s.counters.cow_breaks, 2);
    assert_eq!(s.counters.cow_takeovers, 1);
    assert_eq!(mem.frames_in_use(), 7);
    engine.check_consistency(&mem).unwrap();
}

#[test]
fn volatile_pages_are_skipped() {
    let (a, b) = (VmId(1), VmId(2));
    let pages: Vec<Page> = (0..4).map(random_page).collect();
    let (mut engine, mut mem) = setup(only_sharing(), &[(a, D0, &pages), (b, D0, &pages)]);
    for round in 0..8u64 {
        // Both VMs rewrite page 0 with the same new bytes before every round: identical at
        // every scan, but its hash never holds still for two visits.
        for vm in [a, b] {
            access_write(&mut engine, &mut mem, vm, Gfn(0), 0, &round.to_le_bytes()).unwrap();
        }
        engine.scan_round(&mut mem);
        for vm in [a, b] {
            assert!(mem.mapping(vm, Gfn(0)).unwrap().writable, "round {round}");
        }
    }
    let s = engine.stats();
    assert_eq!(s.pages_shared, 6, "the three stable pages are shared");
    assert!(s.counters.volatile_skips >= 12, "{:?}", s.counters);
    assert!(!engine.converged());
    engine.check_consistency(&mem).unwrap();
}

#[test]
fn untouched_pages_merge_on_their_first_visit_before_any_cold_work() {
    let (a, b) = (VmId(1), VmId(2));
    let common: Vec<Page> = (0..4).map(|i| text_page(i + 300)).collect();
    let mut pa = common.clone();
    pa.extend((0..4).map(|_| [0u8; PAGE_SIZE]));
    let mut pb = common.clone();
    pb.extend((0..4).map(|i| text_page(i + 400)));
    let (mut engine, mut mem) = setup(Config::default(), &[(a, D0, &pa), (b, D0, &pb)]);
    let rep = engine.scan_round(&mut mem);
    assert_eq!(rep.rounds_completed, 1);
    let s = engine.stats();
    // One round: every zero page and every identical pair is merged...
    assert_eq!(s.pages_zero, 4, "{s:?}");
    assert_eq!(s.pages_shared, 8, "{s:?}");
    assert_eq!(s.frames_saved_shared, 4);
    // ...and nothing is patched or compressed yet: the other pages are not cold, and sit in
    // the unstable index for twins still to come.
    assert_eq!(s.pages_patched + s.objects_compressed, 0, "{s:?}");
    assert_eq!(s.pages_private, 4);
    assert_vm(&engine, &mem, a, &pa);
    assert_vm(&engine, &mem, b, &pb);
    engine.check_consistency(&mem).unwrap();
    converge(&mut engine, &mut mem);
    // Text pages compress once cold.
    assert_eq!(engine.stats().pages_private, 0);
    assert_vm(&engine, &mem, b, &pb);
}

#[test]
fn a_page_touched_before_its_first_visit_waits_for_a_second_one() {
    let (a, b) = (VmId(1), VmId(2));
    let pages: Vec<Page> = (0..2).map(random_page).collect();
    let (mut engine, mut mem) = setup(only_sharing(), &[(a, D0, &pages), (b, D0, &pages)]);
    // The guest reads page 0 of both VMs before the scanner first sees them.
    assert!(mem.touch(a, Gfn(0)) && mem.touch(b, Gfn(0)));
    engine.scan_round(&mut mem);
    let s = engine.stats();
    assert_eq!(s.pages_shared, 2, "only the untouched pair: {s:?}");
    assert!(mem.mapping(a, Gfn(0)).unwrap().writable);
    // A second visit right away (the VMs did not run) proves nothing.
    engine.scan_round(&mut mem);
    assert_eq!(engine.stats().pages_shared, 2);
    round_later(&mut engine, &mut mem);
    assert_eq!(
        engine.stats().pages_shared,
        4,
        "same hash on a visit a while later"
    );
    converge(&mut engine, &mut mem);
    assert_vm(&engine, &mem, a, &pages);
}

#[test]
fn a_page_whose_share_a_write_broke_must_hold_still_before_it_merges_again() {
    let (a, b) = (VmId(1), VmId(2));
    let pages: Vec<Page> = (0..4).map(random_page).collect();
    let (mut engine, mut mem) = setup(only_sharing(), &[(a, D0, &pages), (b, D0, &pages)]);
    converge(&mut engine, &mut mem);
    assert_eq!(engine.stats().pages_shared, 8);
    // A rewrites page 1 with the bytes it already holds: a CoW break, same content as B's.
    let r = access_write(&mut engine, &mut mem, a, Gfn(1), 0, &pages[1][..8]).unwrap();
    assert_eq!(r, Some(FaultResolution::CopiedOnWrite));
    // The next visit only takes its hash (the page has a write history now)...
    engine.scan_round(&mut mem);
    assert!(mem.mapping(a, Gfn(1)).unwrap().writable);
    assert_eq!(engine.stats().pages_shared, 7);
    // ...the one after, a while later, finds the same hash and merges it back.
    round_later(&mut engine, &mut mem);
    assert!(!mem.mapping(a, Gfn(1)).unwrap().writable);
    assert_eq!(engine.stats().pages_shared, 8);
    assert_eq!(engine.stats().counters.cow_breaks, 1);
    converge(&mut engine, &mut mem);
    assert_vm(&engine, &mem, a, &pages);
}

#[test]
fn the_unstable_index_is_dropped_at_convergence_and_rebuilt_from_changed_pages() {
    let vm = VmId(1);
    let mut pages: Vec<Page> = (0..200).map(|i| random_page(i + 900)).collect();
    let (mut engine, mut mem) = setup(only_sharing(), &[(vm, D0, &pages)]);
    engine.scan_round(&mut mem);
    // 200 unique pages wait in the unstable index for twins.
    let with_index = engine.stats().bytes_metadata;
    converge(&mut engine, &mut mem);
    let converged = engine.stats().bytes_metadata;
    assert!(
        converged + 200 * 8 <= with_index,
        "{converged} vs {with_index}"
    );
    // Unchanged pages do not enter it again.
    engine.scan_round(&mut mem);
    assert_eq!(engine.stats().bytes_metadata, converged);
    assert!(engine.converged());
    // Two pages change to the same new content: they are new, hold still, and find each other.
    let fresh = random_page(5);
    for g in [3u64, 7] {
        access_write(&mut engine, &mut mem, vm, Gfn(g), 0, &fresh).unwrap();
        pages[g as usize] = fresh;
    }
    converge(&mut engine, &mut mem);
    let s = engine.stats();
    assert_eq!(s.pages_shared, 2, "{s:?}");
    assert_vm(&engine, &mem, vm, &pages);
}

/// Returns `page` with a few bytes changed at `n` places.
fn mutate(mut page: Page, seed: u64, n: usize) -> Page {
    let mut r = common::Rng(seed | 1);
    for _ in 0..n {
        let at = (r.next() % (PAGE_SIZE as u64 - 8)) as usize;
        page[at..at + 8].copy_from_slice(&r.next().to_le_bytes());
    }
    page
}

#[test]
fn similar_pages_are_patched_against_an_immutable_reference() {
    let (a, b) = (VmId(1), VmId(2));
    let mut pa: Vec<Page> = (0..8).map(|i| random_page(i + 7)).collect();
    let mut pb: Vec<Page> = pa
        .iter()
        .enumerate()
        .map(|(i, p)| mutate(*p, i as u64 + 1000, 3))
        .collect();
    let (mut engine, mut mem) = setup(Config::default(), &[(a, D0, &pa), (b, D0, &pb)]);
    converge(&mut engine, &mut mem);
    let s = engine.stats();
    assert_eq!(s.pages_patched, 8, "{s:?}");
    assert_eq!(s.objects_resident, 8);
    assert_eq!(mem.frames_in_use(), 8);
    assert!(s.bytes_patches <= 8 * 64, "{}", s.bytes_patches);
    assert_eq!(s.frames_saved_patched, 8);
    assert_vm(&engine, &mem, a, &pa);
    assert_vm(&engine, &mem, b, &pb);

    // Fault-in of a patched page gives back its bytes in a private frame.
    let got = *access_read(&mut engine, &mut mem, b, Gfn(3)).unwrap();
    assert_eq!(got, pb[3]);
    assert!(mem.mapping(b, Gfn(3)).unwrap().writable);

    // Writing a reference page copies it: the patches against it stay valid.
    let r = access_write(&mut engine, &mut mem, a, Gfn(2), 0, &[0xee; 64]).unwrap();
    assert_eq!(r, Some(FaultResolution::CopiedOnWrite));
    pa[2][..64].fill(0xee);
    assert_vm(&engine, &mem, a, &pa);
    assert_vm(&engine, &mem, b, &pb);
    let s = engine.stats();
    assert_eq!(s.objects_reference_only, 1);
    // Once its last patch is faulted in, the reference-only frame is freed.
    access_write(&mut engine, &mut mem, b, Gfn(2), 10, b"x").unwrap();
    pb[2][10] = b'x';
    assert_eq!(engine.stats().objects_reference_only, 0);
    assert_vm(&engine, &mem, b, &pb);
    assert_eq!(engine.stats().counters.faults_patched, 2);
    engine.check_consistency(&mem).unwrap();
}

/// A page of 64-byte records as a guest kernel lays them out: two pointers to the record
/// itself (an empty list head) at `base`, a flags word, a counter, a per-record value.
fn kernel_records(base: u64, seed: u64) -> Page {
    let mut r = common::Rng(seed | 1);
    let mut page = [0u8; PAGE_SIZE];
    for (k, rec) in page.chunks_exact_mut(64).enumerate() {
        let at = base + 64 * k as u64;
        let words = [
            0x0017_ffff_c000_0200,
            at + 8,
            at + 8,
            1,
            r.next() & 0xff,
            0,
            0,
            0,
        ];
        for (w, v) in rec.chunks_exact_mut(8).zip(words) {
            w.copy_from_slice(&v.to_le_bytes());
        }
    }
    page
}

#[test]
fn pages_that_differ_by_a_kernel_layout_are_xor_patched() {
    // Three guests whose kernels put the same records at other addresses (KASLR): no 64-byte
    // block is equal between them, so only the pointer-normalized index finds the pairs.
    let vms = [VmId(1), VmId(2), VmId(3)];
    let bases = [
        0xffff_ea00_0004_0000u64,
        0xffff_f77f_c00c_9000,
        0xffff_d3c0_0123_4000,
    ];
    let contents: Vec<Vec<Page>> = bases
        .iter()
        .map(|&b| {
            (0..6)
                .map(|i| kernel_records(b + i * 4096, 40 + i))
                .collect()
        })
        .collect();
    let specs: Vec<(VmId, DomainId, &[Page])> = vms
        .iter()
        .zip(&contents)
        .map(|(&vm, pages)| (vm, D0, pages.as_slice()))
        .collect();
    let (mut engine, mut mem) = setup(Config::default(), &specs);
    converge(&mut engine, &mut mem);
    let s = engine.stats();
    assert!(s.counters.patches_xor >= 6, "{:?}", s.counters);
    assert!(s.pages_patched >= 6, "{s:?}");
    for (vm, pages) in vms.iter().zip(&contents) {
        assert_vm(&engine, &mem, *vm, pages);
    }
    // Without normalization the same pages are only compressed.
    let (mut raw, mut raw_mem) = setup(
        Config {
            similarity_normalize_pointers: false,
            ..Config::default()
        },
        &specs,
    );
    converge(&mut raw, &mut raw_mem);
    assert_eq!(raw.stats().counters.patches_xor, 0);
    assert!(raw.stats().footprint_bytes() > s.footprint_bytes());

    // Reading and writing an XOR-patched page gives back its exact bytes.
    let b = &contents[1];
    for g in 0..6 {
        assert_eq!(
            *access_read(&mut engine, &mut mem, vms[1], Gfn(g)).unwrap(),
            b[g as usize]
        );
    }
    access_write(&mut engine, &mut mem, vms[2], Gfn(4), 100, b"hi").unwrap();
    let mut c = contents[2].clone();
    c[4][100..102].copy_from_slice(b"hi");
    assert_vm(&engine, &mem, vms[2], &c);
    assert_vm(&engine, &mem, vms[1], b);
    engine.check_consistency(&mem).unwrap();
}

#[test]
fn cold_pages_are_compressed_and_hot_ones_are_not() {
    let vm = VmId(3);
    let mut pages: Vec<Page> = (0..8).map(|i| text_page(i * 77 + 1)).collect();
    pages.push(random_page(5));
    let config = Config {
        patching: false,
        ..Config::default()
    };
    let (mut engine, mut mem) = setup(config, &[(vm, D0, &pages)]);
    for _ in 0..6 {
        for gfn in 0..4 {
            assert!(mem.touch(vm, Gfn(gfn)));
        }
        round_later(&mut engine, &mut mem);
    }
    let s = engine.stats();
    assert_eq!(s.objects_compressed, 4, "{s:?}");
    assert_eq!(s.counters.pages_compressed, 4);
    assert!(s.bytes_compressed < 4 * PAGE_SIZE as u64 / 2);
    for gfn in 0..4 {
        assert!(
            mem.mapping(vm, Gfn(gfn)).unwrap().writable,
            "hot page {gfn}"
        );
    }
    for gfn in 4..8 {
        assert!(mem.mapping(vm, Gfn(gfn)).is_none(), "cold page {gfn}");
    }
    assert!(
        mem.mapping(vm, Gfn(8)).unwrap().writable,
        "incompressible stays"
    );
    assert_vm(&engine, &mem, vm, &pages);
    assert_eq!(mem.frames_in_use(), 5);

    let r = engine
        .fault(&mut mem, vm, Gfn(5), hv_mem::Access::Read)
        .unwrap();
    assert_eq!(r, FaultResolution::Decompressed);
    assert!(mem.mapping(vm, Gfn(5)).unwrap().writable);
    access_write(&mut engine, &mut mem, vm, Gfn(6), 7, b"new").unwrap();
    pages[6][7..10].copy_from_slice(b"new");
    assert_vm(&engine, &mem, vm, &pages);
    let s = engine.stats();
    assert_eq!(s.counters.faults_decompressed, 2);
    assert_eq!(s.objects_compressed, 2);
    engine.check_consistency(&mem).unwrap();
}

#[test]
fn cold_shared_frames_are_compressed_and_fault_back_shared() {
    let (a, b, c) = (VmId(1), VmId(2), VmId(3));
    let pages: Vec<Page> = (0..4).map(|i| text_page(i + 40)).collect();
    let (mut engine, mut mem) = setup(
        Config {
            patching: false,
            ..Config::default()
        },
        &[(a, D0, &pages), (b, D0, &pages), (c, D0, &pages)],
    );
    converge(&mut engine, &mut mem);
    let s = engine.stats();
    assert_eq!(s.objects_compressed, 4, "{s:?}");
    assert_eq!(s.pages_shared, 12);
    assert_eq!(s.frames_saved_shared, 8);
    assert_eq!(s.frames_saved_compressed, 4);
    assert_eq!(mem.frames_in_use(), 0);
    // A read decompresses once into a shared frame; the next VM's read just maps it.
    let r = engine
        .fault(&mut mem, a, Gfn(1), hv_mem::Access::Read)
        .unwrap();
    assert_eq!(r, FaultResolution::DecompressedShared);
    let r = engine
        .fault(&mut mem, b, Gfn(1), hv_mem::Access::Read)
        .unwrap();
    assert_eq!(r, FaultResolution::MappedShared);
    assert_eq!(mem.frames_in_use(), 1);
    let r = access_write(&mut engine, &mut mem, c, Gfn(1), 0, b"c").unwrap();
    assert_eq!(r, Some(FaultResolution::CopiedOnWrite));
    let mut pc = pages.clone();
    pc[1][0] = b'c';
    assert_vm(&engine, &mem, a, &pages);
    assert_vm(&engine, &mem, b, &pages);
    assert_vm(&engine, &mem, c, &pc);
    engine.check_consistency(&mem).unwrap();
    // Left alone, everything goes cold and compressed again.
    converge(&mut engine, &mut mem);
    assert_eq!(engine.stats().objects_compressed, 5);
    assert_vm(&engine, &mem, c, &pc);
}

type VmSpec = (VmId, DomainId, Vec<Page>);

/// A VM with every kind of page: zero, shared (twice), similar, compressible, unique.
#[test]
fn the_heap_limit_bounds_the_store_and_tables_and_pages_past_it_stay_intact() {
    // 1200 distinct compressible pages, each ~1 KiB compressed: about 1.2 MiB of store and
    // 40 KiB of tables if nothing stopped it.
    let vm = VmId(1);
    let pages: Vec<Page> = (0..1200).map(|i| text_page(i * 13 + 5)).collect();
    let limit = 256 << 10;
    let config = Config {
        patching: false,
        heap_limit_bytes: limit,
        ..Config::default()
    };
    let (mut engine, mut mem) = setup(config, &[(vm, D0, &pages)]);
    for _ in 0..4 {
        round_later(&mut engine, &mut mem);
        assert!(engine.stats().bytes_heap_limited <= limit as u64);
    }
    let s = engine.stats();
    assert!(s.counters.heap_limited > 0, "{s:?}");
    assert!(s.objects_compressed > 50, "{s:?}");
    assert!(s.pages_private > 200, "the rest stays private: {s:?}");
    assert_eq!(s.frames_in_use, mem.frames_in_use() as u64);
    engine.check_consistency(&mem).unwrap();
    assert_vm(&engine, &mem, vm, &pages);
    // Faulting compressed pages back frees store room; later visits use it.
    for gfn in 0..1200 {
        if mem.mapping(vm, Gfn(gfn)).is_none() {
            access_read(&mut engine, &mut mem, vm, Gfn(gfn)).unwrap();
        }
    }
    round_later(&mut engine, &mut mem);
    round_later(&mut engine, &mut mem);
    let after = engine.stats();
    assert!(after.bytes_heap_limited <= limit as u64);
    assert!(after.objects_compressed > 50, "{after:?}");
    engine.check_consistency(&mem).unwrap();
    assert_vm(&engine, &mem, vm, &pages);
}

fn mixed_vms() -> Vec<VmSpec> {
    let base: Vec<Page> = (0..4).map(|i| random_page(i + 300)).collect();
    let mut vms = Vec::new();
    for v in 0..2u64 {
        let mut pages = vec![[0u8; PAGE_SIZE]; 2];
        pages.extend(base.iter().copied()); // identical across the VMs
        pages.push(mutate(base[0], 9 + v, 2)); // similar to a shared page
        pages.push(text_page(v + 900)); // compressible
        pages.push(random_page(v + 500)); // unique, incompressible
        vms.push((VmId(v as u32 + 1), D0, pages));
    }
    vms
}

fn setup_mixed(config: Config) -> (Engine, PlainMemory, Vec<VmSpec>) {
    let vms = mixed_vms();
    let refs: Vec<(VmId, DomainId, &[Page])> =
        vms.iter().map(|(v, d, p)| (*v, *d, p.as_slice())).collect();
    let (engine, mem) = setup(config, &refs);
    (engine, mem, vms)
}

#[test]
fn accounting_adds_up() {
    let (mut engine, mut mem, vms) = setup_mixed(Config::default());
    converge(&mut engine, &mut mem);
    let s = engine.stats();
    assert_eq!(s.vms, 2);
    assert_eq!(s.pages_total, 18);
    assert_eq!(
        s.pages_total,
        s.pages_private + s.pages_zero + s.pages_shared + s.pages_patched
    );
    assert_eq!(s.frames_in_use, mem.frames_in_use() as u64);
    assert_eq!(s.frames_saved(), s.pages_total - s.frames_in_use);
    assert_eq!(s.pages_zero, 4);
    assert_eq!(s.frames_saved_zero, 3);
    assert!(s.pages_patched >= 1, "{s:?}");
    assert!(s.objects_compressed >= 2, "{s:?}");
    assert!(s.bytes_patches > 0 && s.bytes_compressed > 0);
    assert!(s.bytes_blob_heap >= s.bytes_patches + s.bytes_compressed);
    assert!(s.bytes_metadata > 0);
    assert!(s.footprint_bytes() > s.frames_in_use * PAGE_SIZE as u64);
    let c = s.counters;
    assert_eq!(c.rounds, engine.rounds());
    assert!(c.pages_scanned >= c.rounds * 18);
    assert!(c.pages_hashed >= 18);
    assert_eq!(c.merges_zero, 4);
    for (vm, _, pages) in &vms {
        assert_vm(&engine, &mem, *vm, pages);
    }
}

#[test]
fn running_out_of_frames_leaves_every_page_intact() {
    let (mut engine, mut mem, mut vms) = setup_mixed(Config::default());
    converge(&mut engine, &mut mem);
    let before = engine.stats();
    assert!(before.pages_zero > 0 && before.pages_shared > 0 && before.pages_patched > 0);
    mem.set_frame_budget(Some(mem.frames_in_use()));
    let (mut read_failed, mut write_failed) = (0, 0);
    for (vm, _, pages) in &vms {
        for gfn in 0..pages.len() as u64 {
            // Reads of patched/compressed pages need a frame; reads of zero/shared frames that
            // are resident do not.
            match access_read(&mut engine, &mut mem, *vm, Gfn(gfn)) {
                Ok(p) => assert!(p == &pages[gfn as usize]),
                Err(Error::OutOfFrames) => read_failed += 1,
                Err(e) => panic!("{e}"),
            }
            let private = mem.mapping(*vm, Gfn(gfn)).is_some_and(|m| m.writable);
            match access_write(
                &mut engine,
                &mut mem,
                *vm,
                Gfn(gfn),
                0,
                &[pages[gfn as usize][0]],
            ) {
                Ok(_) => assert!(private, "write to {gfn} needed no frame"),
                Err(Error::OutOfFrames) => {
                    assert!(!private);
                    write_failed += 1
                }
                Err(e) => panic!("{e}"),
            }
            engine.check_consistency(&mem).unwrap();
        }
    }
    // Only the private (unique, incompressible) pages could be written; patched and compressed
    // pages could not even be read.
    assert_eq!(write_failed, before.pages_total - before.pages_private);
    assert!(read_failed >= 2, "{read_failed}");
    assert_eq!(
        engine.stats().counters.faults_out_of_frames,
        read_failed + write_failed
    );
    for (vm, _, pages) in &vms {
        assert_vm(&engine, &mem, *vm, pages);
    }
    // With frames again, every fault-in succeeds and gives back the exact bytes.
    mem.set_frame_budget(None);
    for (vm, _, pages) in vms.iter_mut() {
        for (gfn, page) in pages.iter_mut().enumerate() {
            access_write(&mut engine, &mut mem, *vm, Gfn(gfn as u64), 0, &[0xab]).unwrap();
            page[0] = 0xab;
        }
        assert_vm(&engine, &mem, *vm, pages);
    }
    engine.check_consistency(&mem).unwrap();
}

#[test]
fn out_of_frames_in_the_middle_of_a_mixed_run() {
    // Budget exactly one frame above what is in use: the first fault-in that needs a frame
    // succeeds, the next one fails, and the failure changes nothing.
    let (mut engine, mut mem, vms) = setup_mixed(Config::default());
    converge(&mut engine, &mut mem);
    mem.set_frame_budget(Some(mem.frames_in_use() + 1));
    let (vm, _, pages) = &vms[0];
    let mut outcomes = Vec::new();
    for gfn in 0..pages.len() as u64 {
        outcomes.push(engine.fault(&mut mem, *vm, Gfn(gfn), hv_mem::Access::Write));
    }
    assert!(outcomes.iter().any(|o| o.is_ok()));
    assert!(outcomes.contains(&Err(Error::OutOfFrames)));
    engine.check_consistency(&mem).unwrap();
    for (vm, _, pages) in &vms {
        assert_vm(&engine, &mem, *vm, pages);
    }
}

/// `PlainMemory` with two instruments: it records which frames the engine reads (to prove
/// what it compares), and it can make a guest write land on one page just before the engine
/// write-protects it (after the scanner read the page, before the protection took hold:
/// another vCPU, a DMA).
struct Instrumented {
    inner: PlainMemory,
    reads: RefCell<Vec<Frame>>,
    /// The page a write races the protection of, until it happened once.
    race: Option<(VmId, Gfn)>,
}

impl Instrumented {
    fn new(inner: PlainMemory) -> Self {
        Instrumented {
            inner,
            reads: RefCell::new(Vec::new()),
            race: None,
        }
    }
}

impl MemoryBackend for Instrumented {
    fn mapping(&self, vm: VmId, gfn: Gfn) -> Option<Mapping> {
        self.inner.mapping(vm, gfn)
    }
    fn map(&mut self, vm: VmId, gfn: Gfn, frame: Frame, writable: bool) {
        if !writable && self.race == Some((vm, gfn)) {
            self.race = None;
            self.inner.guest_write(vm, gfn, 123, &[7]).unwrap();
        }
        self.inner.map(vm, gfn, frame, writable)
    }
    fn unmap(&mut self, vm: VmId, gfn: Gfn) {
        self.inner.unmap(vm, gfn)
    }
    fn frame(&self, frame: Frame) -> &Page {
        self.reads.borrow_mut().push(frame);
        self.inner.frame(frame)
    }
    fn frame_mut(&mut self, frame: Frame) -> &mut Page {
        self.inner.frame_mut(frame)
    }
    fn copy_frame(&mut self, src: Frame, dst: Frame) {
        self.reads.borrow_mut().push(src);
        self.inner.copy_frame(src, dst)
    }
    fn alloc_frame(&mut self) -> Result<Frame, OutOfFrames> {
        self.inner.alloc_frame()
    }
    fn free_frame(&mut self, frame: Frame) {
        self.inner.free_frame(frame)
    }
    fn test_and_clear_accessed(&mut self, vm: VmId, gfn: Gfn) -> bool {
        self.inner.test_and_clear_accessed(vm, gfn)
    }
    fn test_and_clear_dirty(&mut self, vm: VmId, gfn: Gfn) -> bool {
        self.inner.test_and_clear_dirty(vm, gfn)
    }
}

#[test]
fn a_write_racing_the_zero_merge_is_kept() {
    // Two zero pages; a write lands on the second one between its zero test and its
    // protection. The engine must notice (the dirty flag, or a second read) and keep the byte.
    let vm = VmId(1);
    let (mut engine, mem) = setup(Config::default(), &[(vm, D0, &[[0; PAGE_SIZE]; 2])]);
    let mut racer = Instrumented::new(mem);
    racer.race = Some((vm, Gfn(1)));
    engine.scan_round(&mut racer);
    assert_eq!(racer.race, None, "the race happened");
    let mut expected = [[0u8; PAGE_SIZE]; 2];
    expected[1][123] = 7;
    assert_vm(&engine, &racer.inner, vm, &expected);
    assert_eq!(engine.stats().pages_zero, 1);
    assert!(engine.stats().counters.compare_mismatches >= 1);
    engine.check_consistency(&racer).unwrap();
}

#[test]
fn different_domains_are_never_shared_patched_or_compared() {
    // Four VMs: 1 and 2 in domain 0, 3 and 4 in domain 1, all with the same identical and
    // similar pages, plus zero pages.
    let base: Vec<Page> = (0..6).map(|i| random_page(i + 60)).collect();
    let mut pages = base.clone();
    pages.push(mutate(base[1], 3, 2));
    pages.push([0; PAGE_SIZE]);
    let vms = [(VmId(1), D0), (VmId(2), D0), (VmId(3), D1), (VmId(4), D1)];
    let mut engine = Engine::new(Config::default()).unwrap();
    let mut mem = Instrumented::new(PlainMemory::new());
    let mut owner: BTreeMap<Frame, DomainId> = BTreeMap::new();
    for (vm, d) in vms {
        mem.inner
            .create_vm_with(vm, pages.len() as u64, |g, p| *p = pages[g as usize])
            .unwrap();
        engine.add_vm(vm, d, pages.len() as u64).unwrap();
        for g in 0..pages.len() as u64 {
            owner.insert(mem.inner.mapping(vm, Gfn(g)).unwrap().frame, d);
        }
    }
    // One page per call: every frame read during a call must belong to the scanned page's
    // domain. The engine never allocates while scanning, so frame ownership never changes.
    let span = engine.config().cold_span_us();
    engine.advance_time(span);
    for _ in 0..12 * 4 * pages.len() {
        mem.reads.borrow_mut().clear();
        if engine.scan(&mut mem, 1).rounds_completed > 0 {
            engine.advance_time(span);
        }
        let reads = mem.reads.borrow();
        let domains: std::collections::BTreeSet<DomainId> =
            reads.iter().map(|f| owner[f]).collect();
        assert!(
            domains.len() <= 1,
            "one scan step read frames of {domains:?}"
        );
    }
    assert!(engine.converged());
    engine.check_consistency(&mem).unwrap();
    let s = engine.stats();
    // Per domain: 6 objects shared by 2 pages, 1 zero frame; the similar pages are patched
    // (or identical across the pair): the domains mirror each other exactly.
    assert_eq!(s.pages_zero, 4);
    assert_eq!(s.frames_saved_zero, 2, "one zero frame per domain");
    assert_eq!(s.frames_saved_shared % 2, 0);
    // Every shared frame's mappers are in one domain.
    for (vm, _) in vms {
        for g in 0..pages.len() as u64 {
            if let Some(m) = mem.inner.mapping(vm, Gfn(g)) {
                assert_eq!(
                    owner[&m.frame],
                    vms[(vm.0 - 1) as usize].1,
                    "VM {} gfn {g}",
                    vm.0
                );
            }
        }
    }
}

#[test]
fn domain_isolation_with_nothing_else_to_gain() {
    // Two VMs with identical content in different domains: nothing may be saved at all.
    let pages: Vec<Page> = (0..6).map(|i| random_page(i + 1)).collect();
    let (mut engine, mut mem) = setup(
        Config::default(),
        &[(VmId(1), D0, &pages), (VmId(2), D1, &pages)],
    );
    converge(&mut engine, &mut mem);
    let s = engine.stats();
    assert_eq!(s.frames_saved(), 0, "{s:?}");
    assert_eq!(mem.frames_in_use(), 12);
    assert_eq!(s.counters.compare_mismatches, 0);
    // Same content in one domain: all shared.
    let (mut engine, mut mem) = setup(
        Config::default(),
        &[(VmId(1), D0, &pages), (VmId(2), D0, &pages)],
    );
    converge(&mut engine, &mut mem);
    assert_eq!(engine.stats().frames_saved_shared, 6);
}

#[test]
fn remove_vm_releases_every_reference() {
    let (mut engine, mut mem, vms) = setup_mixed(Config::default());
    converge(&mut engine, &mut mem);
    // Fault a few pages in so there is a mix of states.
    access_read(&mut engine, &mut mem, VmId(1), Gfn(7)).unwrap();
    access_write(&mut engine, &mut mem, VmId(2), Gfn(3), 0, b"z").unwrap();
    let mut second = vms[1].2.clone();
    second[3][0] = b'z';
    engine.remove_vm(&mut mem, VmId(1)).unwrap();
    mem.destroy_vm(VmId(1));
    engine.check_consistency(&mem).unwrap();
    assert_vm(&engine, &mem, VmId(2), &second);
    assert_eq!(
        engine.fault(&mut mem, VmId(1), Gfn(0), hv_mem::Access::Read),
        Err(Error::UnknownVm(VmId(1)))
    );
    assert_eq!(engine.stats().frames_in_use, mem.frames_in_use() as u64);
    converge(&mut engine, &mut mem);
    engine.remove_vm(&mut mem, VmId(2)).unwrap();
    mem.destroy_vm(VmId(2));
    assert_eq!(mem.frames_in_use(), 0, "no frame leaked");
    let s = engine.stats();
    assert_eq!((s.vms, s.pages_total, s.frames_in_use), (0, 0, 0));
    assert_eq!(s.bytes_patches + s.bytes_compressed, 0);
}

#[test]
fn api_errors_are_typed() {
    let (mut engine, mut mem) = setup(Config::default(), &[(VmId(1), D0, &[[0; PAGE_SIZE]])]);
    assert_eq!(
        engine.add_vm(VmId(1), D0, 1),
        Err(Error::DuplicateVm(VmId(1)))
    );
    assert_eq!(
        engine.fault(&mut mem, VmId(1), Gfn(1), hv_mem::Access::Read),
        Err(Error::GfnOutOfRange {
            vm: VmId(1),
            gfn: Gfn(1)
        })
    );
    assert_eq!(
        engine.fault(&mut mem, VmId(1), Gfn(0), hv_mem::Access::Write),
        Ok(FaultResolution::Spurious)
    );
    let bad = [
        Config {
            similarity_blocks: 0,
            ..Config::default()
        },
        Config {
            similarity_blocks: 9,
            ..Config::default()
        },
        Config {
            patch_cutoff: 5000,
            ..Config::default()
        },
        Config {
            compress_cutoff: 0,
            ..Config::default()
        },
        Config {
            pages_per_scan: 0,
            ..Config::default()
        },
        Config {
            similarity_candidates: 0,
            ..Config::default()
        },
    ];
    for c in bad {
        assert!(matches!(Engine::new(c), Err(Error::InvalidConfig(_))));
    }
}

#[test]
fn scan_step_respects_the_page_budget_and_rounds_wrap() {
    let pages: Vec<Page> = (0..10).map(random_page).collect();
    let (mut engine, mut mem) = setup(
        Config {
            pages_per_scan: 3,
            ..Config::default()
        },
        &[(VmId(1), D0, &pages), (VmId(2), D0, &pages[..5])],
    );
    let mut total = 0;
    let mut rounds = 0;
    for _ in 0..10 {
        let r = engine.scan_step(&mut mem);
        assert_eq!(r.pages, 3);
        total += r.pages;
        rounds += r.rounds_completed;
    }
    assert_eq!(total, 30);
    assert_eq!(rounds, 2, "15 pages per round");
    assert_eq!(engine.rounds(), 2);
}

#[test]
fn patches_against_compressed_references() {
    let (a, b) = (VmId(1), VmId(2));
    let mut pa: Vec<Page> = (0..4).map(|i| text_page(i + 70)).collect();
    let pb: Vec<Page> = pa
        .iter()
        .enumerate()
        .map(|(i, p)| mutate(*p, i as u64 + 99, 2))
        .collect();
    let (mut engine, mut mem) = setup(Config::default(), &[(a, D0, &pa), (b, D0, &pb)]);
    converge(&mut engine, &mut mem);
    let s = engine.stats();
    // A's pages compress first (nothing similar yet); B's pages are then patched against
    // those compressed objects, which beats compressing them on their own.
    assert_eq!(s.objects_compressed, 4, "{s:?}");
    assert_eq!(s.pages_patched, 4, "{s:?}");
    assert_eq!(mem.frames_in_use(), 0);
    assert!(s.bytes_patches < 4 * 100, "{}", s.bytes_patches);
    assert_vm(&engine, &mem, b, &pb);

    // Writing a reference decompresses a private copy; the compressed reference stays for the
    // patch, which still decodes.
    let r = access_write(&mut engine, &mut mem, a, Gfn(1), 0, b"A").unwrap();
    assert_eq!(r, Some(FaultResolution::CopiedOnWrite));
    pa[1][0] = b'A';
    assert_eq!(engine.stats().objects_reference_only, 1);
    assert_vm(&engine, &mem, a, &pa);
    assert_vm(&engine, &mem, b, &pb);
    let got = *access_read(&mut engine, &mut mem, b, Gfn(1)).unwrap();
    assert_eq!(got, pb[1]);
    // The last patch gone, the reference-only object is freed.
    assert_eq!(engine.stats().objects_reference_only, 0);
    engine.check_consistency(&mem).unwrap();
}

#[test]
fn orphaned_resident_references_are_compressed() {
    let (a, b) = (VmId(1), VmId(2));
    let mut pa: Vec<Page> = (0..2).map(|i| text_page(i + 500)).collect();
    let pb: Vec<Page> = pa.iter().map(|p| mutate(*p, 5, 1)).collect();
    let (mut engine, mut mem) = setup(Config::default(), &[(a, D0, &pa), (b, D0, &pb)]);
    // A keeps using its pages, so they stay resident; B's go cold and are patched against
    // them, which turns A's pages into read-only reference frames.
    for _ in 0..4 {
        for g in 0..2 {
            assert!(mem.touch(a, Gfn(g)));
        }
        round_later(&mut engine, &mut mem);
    }
    let s = engine.stats();
    assert_eq!(s.pages_patched, 2, "{s:?}");
    assert_eq!(s.objects_resident, 2);
    assert!(!mem.mapping(a, Gfn(0)).unwrap().writable);
    // A writes page 0: it gets a copy; the frame it leaves behind only serves B's patch...
    let r = access_write(&mut engine, &mut mem, a, Gfn(0), 9, b"hot").unwrap();
    assert_eq!(r, Some(FaultResolution::CopiedOnWrite));
    pa[0][9..12].copy_from_slice(b"hot");
    assert_eq!(engine.stats().objects_reference_only, 1);
    let frames = mem.frames_in_use();
    // ...so the next scan compresses it.
    let rep = engine.scan(&mut mem, 1);
    assert!(rep.changes >= 1);
    let s = engine.stats();
    assert_eq!(s.objects_compressed, 1, "{s:?}");
    assert_eq!(s.counters.shared_compressed, 1);
    assert_eq!(mem.frames_in_use(), frames - 1);
    assert_vm(&engine, &mem, a, &pa);
    assert_vm(&engine, &mem, b, &pb);
    let got = *access_read(&mut engine, &mut mem, b, Gfn(0)).unwrap();
    assert_eq!(got, pb[0]);
    engine.check_consistency(&mem).unwrap();
}

#[test]
fn works_through_a_trait_object() {
    // The hypervisor may hold its EPT backend as `dyn MemoryBackend`.
    let pages: Vec<Page> = (0..4).map(|i| text_page(i % 2)).collect();
    let (mut engine, mut mem) = setup(Config::default(), &[(VmId(9), D0, &pages)]);
    let backend: &mut dyn MemoryBackend = &mut mem;
    assert!(engine.run_until_converged(backend, 10).is_some());
    let r = engine.fault(backend, VmId(9), Gfn(0), hv_mem::Access::Read);
    assert!(r.is_ok());
    engine.check_consistency(backend).unwrap();
    assert_vm(&engine, &mem, VmId(9), &pages);
}

/// The thrash a hostile guest found when time was counted in scan passes: the scanner made a
/// full pass before every 100 us quantum of three VMs, so a VM's pages saw two passes between
/// two of its quanta, during which it did not run. Pages it used in every quantum were taken
/// away anyway: those it only read went "cold" after two passes without access, and those it
/// wrote with the same bytes (its stack, or its page tables, which the CPU's page walks count as
/// written with EPT A/D flags) looked stable after a pass without a write and were shared, to be
/// copied back on the next write. Every quantum began with faults. Coldness and stability are
/// measured in its VM's own time now: passes in between change nothing.
#[test]
fn pages_in_use_are_never_taken_away_however_often_the_scanner_passes() {
    let vms = [VmId(1), VmId(2), VmId(3)];
    // Page 0: unique to its VM, read in every quantum. Page 1: the same in every VM, rewritten
    // with the same bytes in every quantum. Page 2: the same in every VM, read in every
    // quantum. Pages 3 and 4: unique, never touched.
    let pages: Vec<Vec<Page>> = (0..3)
        .map(|v| {
            let mut p: Vec<Page> = (0..5).map(|i| text_page(700 + 10 * v + i)).collect();
            p[1] = text_page(1);
            p[2] = random_page(2);
            p
        })
        .collect();
    let config = Config {
        cold_after_us: 5_000,
        cold_after_wall_us: 5_000,
        ..Config::default()
    };
    let setup_vms: Vec<(VmId, DomainId, &[Page])> = vms
        .iter()
        .zip(&pages)
        .map(|(&v, p)| (v, D0, &p[..]))
        .collect();
    let (mut engine, mut mem) = setup(config, &setup_vms);
    let quantum = 100;
    let mut own = [0u64; 3];
    let mut wall = 0;
    // 1200 quanta, 400 per VM: 40 ms of each VM's own time, eight thresholds.
    for q in 0..1200 {
        let v = q % 3;
        let vm = vms[v];
        // The VM's quantum.
        assert!(mem.touch(vm, Gfn(0)), "quantum {q}: vm {v} lost page 0");
        let r = access_write(&mut engine, &mut mem, vm, Gfn(1), 64, &pages[v][1][64..72]);
        assert_eq!(r, Ok(None), "quantum {q}: vm {v} faulted on page 1");
        assert!(
            mem.guest_read(vm, Gfn(2)).is_ok(),
            "quantum {q}: vm {v} lost page 2"
        );
        own[v] += quantum;
        wall += quantum;
        engine.set_vm_time(vm, own[v]).unwrap();
        engine.set_wall_time(wall);
        // Between quanta: a full pass over every VM, once every VM has run (as the hypervisor
        // does: before a VM has run, every page of it looks untouched).
        if q >= 2 {
            engine.scan_round(&mut mem);
        }
    }
    let s = engine.stats();
    assert_eq!(s.counters.cow_breaks, 0, "{s:?}");
    assert_eq!(
        s.counters.faults_decompressed + s.counters.faults_patched,
        0
    );
    for (&vm, pages) in vms.iter().zip(&pages) {
        for gfn in [0, 1] {
            let m = mem.mapping(vm, Gfn(gfn)).expect("mapped");
            assert!(m.writable, "page {gfn} of vm {} is its own", vm.0);
        }
        // The page read by all is shared (reads of a shared page do not fault).
        assert!(!mem.mapping(vm, Gfn(2)).unwrap().writable);
        // The pages nobody touched went cold and were taken away all the same.
        for gfn in 3..5 {
            assert!(mem.mapping(vm, Gfn(gfn)).is_none(), "vm {} gfn {gfn}", vm.0);
        }
        assert_vm(&engine, &mem, vm, pages);
    }
    assert_eq!(s.frames_saved_shared, 2, "{s:?}");
    assert!(
        s.counters.pages_compressed + s.counters.patches_made >= 6,
        "{s:?}"
    );
    engine.check_consistency(&mem).unwrap();
}

/// A VM that waits for the CPU does not age: host time passing, and scan passes, while it does
/// not run leave its pages alone. Once it runs a threshold of its own time without touching a
/// page, that page is cold.
#[test]
fn waiting_for_the_cpu_does_not_age_pages() {
    let vm = VmId(1);
    let pages: Vec<Page> = (0..2).map(|i| text_page(i + 800)).collect();
    let config = Config {
        cold_after_us: 5_000,
        cold_after_wall_us: 5_000,
        patching: false,
        ..Config::default()
    };
    let (mut engine, mut mem) = setup(config, &[(vm, D0, &pages)]);
    assert!(mem.touch(vm, Gfn(0)) && mem.touch(vm, Gfn(1)));
    engine.set_vm_time(vm, 100).unwrap();
    engine.set_wall_time(100);
    engine.scan_round(&mut mem);
    // A second of host time (200 thresholds) and 1000 passes while the VM waits.
    for t in 1..=1000 {
        engine.set_wall_time(100 + t * 1000);
        engine.scan_round(&mut mem);
    }
    for gfn in 0..2 {
        assert!(mem.mapping(vm, Gfn(gfn)).unwrap().writable, "gfn {gfn}");
    }
    assert_eq!(engine.stats().counters.pages_compressed, 0);
    // Now it runs, touching page 0 only, for just under a threshold: nothing is cold yet...
    let mut own = 100;
    let mut wall = 100 + 1000 * 1000;
    let mut run = |engine: &mut Engine, mem: &mut PlainMemory, us: u64| {
        assert!(mem.touch(vm, Gfn(0)));
        own += us;
        wall += us;
        engine.set_vm_time(vm, own).unwrap();
        engine.set_wall_time(wall);
        engine.scan_round(mem);
    };
    for _ in 0..45 {
        run(&mut engine, &mut mem, 100);
    }
    assert!(mem.mapping(vm, Gfn(1)).is_some(), "4.5 ms is not cold");
    // ...and a threshold later (plus the clock's resolution), page 1 is.
    for _ in 0..10 {
        run(&mut engine, &mut mem, 100);
    }
    assert!(mem.mapping(vm, Gfn(1)).is_none(), "5.5 ms is cold");
    assert!(mem.mapping(vm, Gfn(0)).unwrap().writable);
    assert_eq!(engine.stats().counters.pages_compressed, 1);
    assert_vm(&engine, &mem, vm, &pages);
    engine.check_consistency(&mem).unwrap();
}

/// Two VMs of 8 compressible pages each, different in every page, and a configuration
/// without patching: what happens to one VM's pages and not the other's shows plainly.
fn idle_and_busy() -> (VmId, VmId, Vec<Page>, Vec<Page>, Config) {
    let a = (0..8).map(|i| text_page(i * 31 + 3)).collect();
    let b = (0..8).map(|i| text_page(i * 53 + 1000)).collect();
    let config = Config {
        patching: false,
        ..Config::default()
    };
    (VmId(1), VmId(2), a, b, config)
}

#[test]
fn a_vm_with_shorter_cold_thresholds_loses_its_untouched_pages_first() {
    let (idle, busy, a, b, config) = idle_and_busy();
    let tenth = config.cold_span_us() / 10;
    let (mut engine, mut mem) = setup(config, &[(idle, D0, &a), (busy, D0, &b)]);
    engine
        .set_vm_cold_after(idle, Some((tenth, tenth)))
        .unwrap();
    assert!(matches!(
        engine.set_vm_cold_after(VmId(9), None),
        Err(Error::UnknownVm(_))
    ));
    // Three rounds a tenth of the configured threshold apart; both VMs touch pages 0 and 1.
    for _ in 0..3 {
        for vm in [idle, busy] {
            assert!(mem.touch(vm, Gfn(0)));
            assert!(mem.touch(vm, Gfn(1)));
        }
        engine.advance_time(tenth + 1);
        engine.scan_round(&mut mem);
    }
    for gfn in 2..8 {
        assert!(
            mem.mapping(idle, Gfn(gfn)).is_none(),
            "idle VM's page {gfn}"
        );
        assert!(
            mem.mapping(busy, Gfn(gfn)).is_some(),
            "busy VM's page {gfn}"
        );
    }
    for gfn in 0..2 {
        assert!(
            mem.mapping(idle, Gfn(gfn)).is_some(),
            "working-set page {gfn}"
        );
    }
    assert_vm(&engine, &mem, idle, &a);
    assert_vm(&engine, &mem, busy, &b);
    // Back to the configured thresholds: nothing more goes at the short pace.
    engine.set_vm_cold_after(idle, None).unwrap();
    assert!(engine
        .fault(&mut mem, idle, Gfn(2), hv_mem::Access::Read)
        .is_ok());
    for _ in 0..3 {
        engine.advance_time(tenth + 1);
        engine.scan_round(&mut mem);
    }
    assert!(
        mem.mapping(idle, Gfn(2)).is_some(),
        "warm again, cold only after a whole threshold"
    );
    engine.check_consistency(&mem).unwrap();
}

#[test]
fn memory_on_demand_starts_as_zero_pages_and_gets_frames_on_first_write() {
    let (a, b) = (VmId(1), VmId(2));
    let mut engine = Engine::new(Config::default()).unwrap();
    let mut mem = PlainMemory::new();
    // VM a: 16 pages of which only 0 and 5 were loaded; VM b: all 4 present.
    mem.create_vm_with(a, 16, |gfn, p| p[0] = gfn as u8 + 1)
        .unwrap();
    for gfn in (0..16).filter(|g| *g != 0 && *g != 5) {
        let f = mem.mapping(a, Gfn(gfn)).unwrap().frame;
        mem.unmap(a, Gfn(gfn));
        mem.free_frame(f);
    }
    mem.create_vm_with(b, 4, |_, p| p[1] = 9).unwrap();
    let in_use = mem.frames_in_use();
    assert_eq!(engine.add_vm_on_demand(&mut mem, a, D0, 16).unwrap(), 14);
    assert_eq!(
        mem.frames_in_use(),
        in_use + 1,
        "one zero frame for the domain"
    );
    assert_eq!(engine.add_vm_on_demand(&mut mem, b, D0, 4).unwrap(), 0);
    assert!(engine.is_zero_page(a, Gfn(3)).unwrap());
    assert!(!engine.is_zero_page(a, Gfn(5)).unwrap());
    assert!(engine.is_zero_page(a, Gfn(16)).is_err());
    assert_eq!(engine.vm_private_pages(a).unwrap(), 2);
    let s = engine.stats();
    assert_eq!((s.pages_zero, s.pages_private), (14, 6));
    engine.check_consistency(&mem).unwrap();
    // Reads see zeros without a frame; the first write takes one.
    assert!(access_read(&mut engine, &mut mem, a, Gfn(3))
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert_eq!(mem.frames_in_use(), in_use + 1);
    let r = access_write(&mut engine, &mut mem, a, Gfn(3), 100, b"x").unwrap();
    assert_eq!(r, Some(FaultResolution::ZeroFilled));
    assert_eq!(
        access_read(&mut engine, &mut mem, a, Gfn(5)).unwrap()[0],
        6,
        "loaded page"
    );
    assert_eq!(mem.frames_in_use(), in_use + 2);
    assert_eq!(engine.vm_private_pages(a).unwrap(), 3);
    engine.check_consistency(&mem).unwrap();
    // Leaving gives the zero frame back once no page uses it; what stays is the VM's own.
    engine.remove_vm(&mut mem, a).unwrap();
    assert_eq!(mem.frames_in_use(), in_use + 1);
    engine.check_consistency(&mem).unwrap();
    // A duplicate registration takes nothing.
    assert!(matches!(
        engine.add_vm_on_demand(&mut mem, b, D0, 4),
        Err(Error::DuplicateVm(_))
    ));
    assert_eq!(mem.frames_in_use(), in_use + 1);
}

#[test]
fn scanning_one_vm_reclaims_its_pages_and_leaves_the_others_alone() {
    let (idle, busy, a, b, config) = idle_and_busy();
    let span = config.cold_span_us();
    let (mut engine, mut mem) = setup(config, &[(idle, D0, &a), (busy, D0, &b)]);
    let mut wraps = 0;
    for _ in 0..4 {
        engine.advance_time(span + 1);
        let r = engine.scan_vm(&mut mem, idle, 8).unwrap();
        assert_eq!(r.pages, 8);
        wraps += r.rounds_completed;
    }
    assert_eq!(wraps, 4, "one pass of its own per call");
    assert!(
        (0..8).all(|g| mem.mapping(idle, Gfn(g)).is_none()),
        "cold and compressed"
    );
    assert_eq!(engine.vm_private_pages(idle).unwrap(), 0);
    assert_eq!(engine.vm_private_pages(busy).unwrap(), 8, "never visited");
    assert_eq!(engine.rounds(), 0, "the global scan did not move");
    assert_vm(&engine, &mem, idle, &a);
    assert!(matches!(
        engine.scan_vm(&mut mem, VmId(5), 1),
        Err(Error::UnknownVm(_))
    ));
    // The global scan goes on as before and converges.
    converge(&mut engine, &mut mem);
    assert_vm(&engine, &mem, busy, &b);
}
