//! Memory multiplexing on real VMs: the memory engine (`hv-mem`) driven over EPT.
//!
//! This module owns the engine instance and [`EptBackend`], the engine's [`MemoryBackend`] over
//! the VMs' EPTs, their [`GuestMemory`] tables (which mirror the EPT leaves for the hypervisor's
//! own copies) and the frame allocator. It decides *when* the engine runs: one scan step of
//! `[memory] scan_pages` pages at most every `scan_interval_us`, between two quanta, and a fault
//! whenever a guest (or the hypervisor on a guest's behalf, for a hypercall's buffer) touches a
//! page the engine has taken away or made read-only. *What* happens to a page is the engine's
//! business, and this module must not second-guess it; the exit handling and scheduling stay
//! in [`crate::vm`]. It reaches the VMs only through
//! [`HasGuestPhys`].
//!
//! Coldness is the engine's policy too, but in time, and the clocks are the kernel's: before
//! each scan step this module reports host time (the TSC) and each VM's *own time*, the CPU
//! time the VM was given. That is its accounted CPU time (`Vm::acct`, read only) without the
//! time the engine spent resolving its faults, and a quantum the VM gave back early (yield,
//! HLT) counts in full: an idle VM ages, while a VM waiting for the CPU behind others does not.
//! A page is cold once unaccessed for `[memory] cold_after_us` of both (hv-mem's
//! `Config::cold_after_us` and `cold_after_wall_us`), so however often the scanner passes, a
//! page a guest uses whenever it runs is never taken away; the scan rate only sets how soon a
//! cold page is found.
//!
//! Translation caching: the engine's contract asks that a map or unmap be in force before the
//! guest can observe memory again. The guests do not run while the engine does (one CPU, and the
//! engine runs only in VM-exit context), so the backend marks the VM's EPT stale
//! ([`crate::guest_phys::GuestPhys::stale`]) and the run loop issues the INVEPT before that VM
//! is entered next: one INVEPT per VM
//! per scan step instead of one per page. The same holds for accessed/dirty flags cleared by the
//! scanner: the CPU only sets a flag again once its cached translation is gone.

use alloc::vec;
use alloc::vec::Vec;

use hv_manifest::{IdleConfig, MemoryConfig};
use hv_mem::{
    Access, Config, DomainId, Engine, FaultResolution, Frame, Gfn, Mapping, MemoryBackend,
    OutOfFrames, Page, Stats, VmId, PAGE_SIZE,
};
use hv_vm::frames::FrameAllocator;
use hv_vm::idle::IdleState;
use hv_vm::memory::PageMapping;
use hv_vmx::ept::EptPerms;

use crate::guest_phys::{HasGuestPhys, TableFrames};
use crate::platform::rdtsc;

/// Heap bytes every declared guest page costs whatever its content, for the admission check
/// ([`MemMux::admits`]): the engine's per-page state and the VM's guest-memory mirror (one
/// `u64` per page). Everything else the engine holds (objects, indexes, patches, compressed
/// pages) grows with what it does and is capped by `Config::heap_limit_bytes`.
const FIXED_BYTES_PER_PAGE: u64 = hv_mem::PAGE_META_BYTES as u64 + 8;

/// Pages a scan step visits between two looks at the clock (a step of `scan_pages` is cut
/// short at a chunk's end once it has used its budget).
const SCAN_CHUNK_PAGES: u64 = 256;

/// Free frames kept for breaking shares and decompressing: a first write to a zero page waits
/// when no more than this many are free (128 KiB).
const RESERVED_FRAMES: u64 = 32;

/// Passes over an idle VM's own pages, one idle coldness threshold apart, that the scanner makes
/// before anything else once the VM becomes idle.
const IDLE_PASSES: u32 = 3;

/// Heap bytes kept free for the rest of the hypervisor when the engine's store is sized: at
/// least this, and at least a quarter of the heap.
const HEAP_RESERVE_BYTES: usize = 2 << 20;

/// A VM's own time, as reported to the engine, and what it is computed from.
#[derive(Clone, Copy, Debug, Default)]
struct OwnTime {
    /// The VM's `acct` runs and CPU time, and the engine's fault time for it, when last read.
    runs: u64,
    cpu_tsc: u64,
    fault_tsc: u64,
    /// The VM's own time so far, TSC ticks.
    own_tsc: u64,
}

/// The engine and its schedule.
pub struct MemMux {
    engine: Engine,
    scan_pages: u64,
    interval_tsc: u64,
    /// `[memory] scan_cpu_percent`: the scanner's most share of host time.
    scan_cpu_percent: u64,
    /// When the first scan step began: the scan budget counts from there.
    first_scan: Option<u64>,
    /// Scan steps run under memory pressure, outside the budget.
    pressure_steps: u64,
    /// Free frames below which memory is under pressure.
    pub low_watermark_frames: u64,
    /// Scan steps put off because the scanner had used its share.
    budget_waits: u64,
    /// When the engine was created (the closing report's time base).
    created: u64,
    /// Per VM (by index): what the scanner does about it being idle.
    idle: Vec<IdleReclaim>,
    /// Own passes of idle VMs completed.
    idle_passes: u64,
    /// First writes to zero pages refused to keep [`RESERVED_FRAMES`] free.
    engine_refusals: u64,
    /// The thresholds an idle VM's pages get: the detector's window (`idle_after` intervals).
    idle_cold_us: u64,
    tsc_hz: u64,
    last_scan: u64,
    /// Per VM (by index): TSC ticks the engine spent on its faults, and its own time.
    vm_fault_tsc: Vec<u64>,
    own: Vec<OwnTime>,
    /// EPT accessed/dirty flags are enabled (else every page counts as accessed and dirty).
    ept_ad: bool,
    /// Host TSC ticks spent in scan steps and in faults, and how many of each.
    scan_tsc: u64,
    scans: u64,
    fault_tsc: u64,
    faults: u64,
    /// Of the faults, those on a hypercall's buffer rather than a guest access.
    hypercall_faults: u64,
    /// The last fault the engine found nothing to do for, (VM index, page, write), unless the
    /// VM has exited for another reason since.
    last_spurious: Option<(usize, u64, bool)>,
    /// The stats after the scan step that had saved the most frames by sharing, patching and
    /// compression so far, and that step's number.
    peak: Stats,
    peak_scan: u64,
}

/// What the scanner does about one VM being idle.
#[derive(Clone, Copy, Debug)]
struct IdleReclaim {
    /// The idle state its coldness thresholds were last set for.
    state: IdleState,
    /// Own passes ([`hv_mem::Engine::scan_vm`]) still to make while it is idle, and when the
    /// next may start (host TSC).
    passes_left: u32,
    next_pass: u64,
    /// Its private pages when it first became idle (as the scanner saw it), and the fewest seen
    /// at any step while it was idle or dormant (its footprint down to the working set).
    footprint: Option<(u64, u64)>,
}

impl Default for IdleReclaim {
    fn default() -> Self {
        Self {
            state: IdleState::Active,
            passes_left: 0,
            next_pass: 0,
            footprint: None,
        }
    }
}

/// Why a fault could not be resolved.
#[derive(Debug)]
pub enum FaultError {
    /// The engine refused (no free frame, a corrupt object, a page it does not manage).
    Engine(hv_mem::Error),
    /// The engine found the page already mapped as needed twice in a row for the same access:
    /// re-entering the guest would only fault again, forever.
    Stuck,
}

impl FaultError {
    /// No host frame was free: the VM can wait for one instead of stopping.
    pub fn out_of_frames(&self) -> bool {
        matches!(self, Self::Engine(hv_mem::Error::OutOfFrames))
    }
}

impl core::fmt::Display for FaultError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Engine(e) => write!(f, "{e}"),
            Self::Stuck => f.write_str("the page is mapped as needed, yet the access still faults"),
        }
    }
}

impl MemMux {
    /// Whether the heap bytes every one of `pages` guest pages costs (its state in the engine
    /// and its entry in the VM's memory mirror) fit in half of `heap_free` heap bytes (logged
    /// when they do not). The kernel asks before it creates the VMs, whose memory is then
    /// allocated on demand only if the engine will run.
    pub fn admits(pages: u64, heap_free: usize) -> bool {
        let need = pages.saturating_mul(FIXED_BYTES_PER_PAGE);
        if need > heap_free as u64 / 2 {
            log::error!(target: "mem",
                "memory multiplexing off: {pages} guest pages need {} KiB of per-page state, \
                 more than half of the {} KiB free on the hypervisor heap",
                need >> 10, heap_free >> 10);
            return false;
        }
        true
    }

    /// Creates the engine and registers every VM (VM index = `VmId`). `None`, after logging why,
    /// if the engine cannot be set up; the VMs then run with plain memory. `vms` may have memory
    /// allocated on demand (absent pages): they become zero pages.
    ///
    /// The engine's metadata and its store of patches and compressed pages live on the
    /// hypervisor's heap (`heap_free` bytes free now, the VMs' memory mirrors already taken).
    /// An allocation failure there would stop the whole hypervisor, so multiplexing is refused
    /// up front unless the per-page state fits in half of it ([`Self::admits`]); what grows
    /// (objects, indexes, the store) is capped by the engine's heap limit, which leaves a
    /// reserve free, and past it the engine simply keeps pages whole.
    pub fn new(
        config: &MemoryConfig,
        idle: &IdleConfig,
        vms: &mut [impl HasGuestPhys],
        frames: &mut FrameAllocator,
        tsc_hz: u64,
        ept_ad: bool,
        heap_free: usize,
    ) -> Option<Self> {
        let pages: u64 = vms.iter().map(|v| v.guest_phys().memory.pages()).sum();
        // The mirrors are allocated already (the kernel asked `admits` before creating the
        // VMs): only the engine's own per-page state is still to come.
        let per_page = pages.saturating_mul(hv_mem::PAGE_META_BYTES as u64);
        if per_page > heap_free as u64 / 2 {
            log::error!(target: "mem",
                "memory multiplexing off: {pages} guest pages need {} KiB of engine state, \
                 more than half of the {} KiB free on the hypervisor heap",
                per_page >> 10, heap_free >> 10);
            return None;
        }
        // What grows gets what the per-page state leaves, less a reserve for everything else
        // on the heap: filling the heap to its last byte would make the next ordinary
        // allocation stop the hypervisor.
        let reserve = (heap_free / 4).max(HEAP_RESERVE_BYTES);
        let heap_limit = heap_free
            .saturating_sub(usize::try_from(per_page).unwrap_or(usize::MAX))
            .saturating_sub(reserve);
        let engine_config = Config {
            pages_per_scan: usize::try_from(config.scan_pages).unwrap_or(usize::MAX),
            cold_after_us: config.cold_after_us,
            cold_after_wall_us: config.cold_after_us,
            heap_limit_bytes: heap_limit,
            ..Config::default()
        };
        log::info!(target: "mem",
            "engine heap: per-page state {} KiB; objects, indexes, patches and compressed pages \
             up to {} KiB; of {} KiB free",
            per_page >> 10, heap_limit >> 10, heap_free >> 10);
        let mut engine = match Engine::new(engine_config) {
            Ok(engine) => engine,
            Err(e) => {
                log::error!(target: "mem", "memory multiplexing off: the engine refused its configuration: {e}");
                return None;
            }
        };
        let mut backend = EptBackend {
            vms,
            frames,
            ept_ad,
        };
        for i in 0..backend.vms.len() {
            let (domain, pages, name) = {
                let v = &backend.vms[i];
                let (vm, memory) = (v.vm(), &v.guest_phys().memory);
                (
                    DomainId(vm.sharing_domain()),
                    memory.pages(),
                    vm.name.clone(),
                )
            };
            match engine.add_vm_on_demand(&mut backend, VmId(i as u32), domain, pages) {
                // The engine names VMs by number in its own log lines; say once which is which.
                Ok(zeros) => log::info!(target: "mem",
                    "vm {name} is engine VM {i} (sharing domain {}){}", domain.0,
                    if zeros > 0 { alloc::format!(", {zeros} of its {pages} pages allocated on demand") } else { alloc::string::String::new() }),
                Err(e) => {
                    // A VM whose memory is on demand cannot run without the engine: the caller
                    // only allocates on demand when `admits` said yes, and registering a new
                    // VM fails only for want of one frame (the zero frame).
                    log::error!(target: "mem", "memory multiplexing off: cannot register vm {name}: {e}");
                    return None;
                }
            }
        }
        let vms = &*backend.vms;
        log::info!(target: "mem",
            "memory multiplexing on: {} VMs, scan step {} pages every {} us, EPT A/D bits {}",
            vms.len(), config.scan_pages, config.scan_interval_us,
            if ept_ad { "yes" } else { "no (every page counts as recently used: no compression or patching)" });
        // Coldness is time; the scan rate says how soon after going cold a page is found.
        let pass_us = pages
            .div_ceil(config.scan_pages.max(1))
            .saturating_mul(config.scan_interval_us);
        log::info!(target: "mem",
            "a page untouched for {} of its VM's own time and of host time is cold; \
             a full scan pass takes at least {}",
            Micros(config.cold_after_us), Micros(pass_us));
        // An idle VM's working set is what its wake-ups touched over the detector's window.
        let idle_cold_us = idle
            .interval_us
            .saturating_mul(idle.idle_after)
            .min(config.cold_after_us);
        log::info!(target: "mem",
            "scanner budget: {}% of host time; an idle VM's page untouched for {} is cold{}",
            config.scan_cpu_percent, Micros(idle_cold_us),
            if idle.detect { "" } else { " (idle detection is off)" });
        Some(Self {
            engine,
            scan_pages: config.scan_pages,
            interval_tsc: hv_vm::sched::us_to_tsc(config.scan_interval_us, tsc_hz),
            scan_cpu_percent: config.scan_cpu_percent.clamp(1, 100),
            first_scan: None,
            pressure_steps: 0,
            low_watermark_frames: config.low_watermark_mib << 8,
            budget_waits: 0,
            created: rdtsc(),
            idle: vec![IdleReclaim::default(); vms.len()],
            idle_passes: 0,
            engine_refusals: 0,
            idle_cold_us,
            tsc_hz,
            last_scan: 0,
            vm_fault_tsc: vec![0; vms.len()],
            own: vec![OwnTime::default(); vms.len()],
            ept_ad,
            scan_tsc: 0,
            scans: 0,
            fault_tsc: 0,
            faults: 0,
            hypercall_faults: 0,
            last_spurious: None,
            peak: Stats::default(),
            peak_scan: 0,
        })
    }

    fn backend<'a, V: HasGuestPhys>(
        &'a mut self,
        vms: &'a mut [V],
        frames: &'a mut FrameAllocator,
    ) -> (&'a mut Engine, EptBackend<'a, V>) {
        (
            &mut self.engine,
            EptBackend {
                vms,
                frames,
                ept_ad: self.ept_ad,
            },
        )
    }

    /// Runs one scan step if the interval since the last one has passed and the scanner is
    /// within its budget: its total time at most `scan_cpu_percent` of the host time since the
    /// first step. A step runs in chunks of [`SCAN_CHUNK_PAGES`] and ends early when it has used
    /// what the budget allows, so over any run the scanner takes no more than its share plus
    /// one chunk.
    ///
    /// Before the step, VMs the idle detector calls idle or dormant (and that do not opt out
    /// with `idle_reclaim = false`) get shorter coldness thresholds: the pages their idle
    /// wake-ups leave alone go at the next visit, their working set stays.
    ///
    /// The first step waits until every VM has been on the CPU once: the engine merges a page
    /// the guest has not touched on its first visit, and before a VM has run, every page looks
    /// untouched, so its code and stack would be compressed or merged only to be faulted back in
    /// by its first instructions.
    ///
    /// Under memory `pressure` (free memory below `low_watermark_mib`, or a VM waiting for a
    /// frame) the step runs at once, outside the interval and the budget: reclaiming is then
    /// what lets the VMs run at all.
    pub fn maybe_scan(
        &mut self,
        vms: &mut [impl HasGuestPhys],
        frames: &mut FrameAllocator,
        ran: Option<usize>,
        pressure: bool,
    ) {
        // Called before every quantum, so at most one VM (`ran`) ran since the last call.
        if let Some(i) = ran {
            self.account(vms, i);
        }
        let start = rdtsc();
        if pressure {
            self.pressure_steps += 1;
        } else if self.scans == 0 {
            if vms
                .iter()
                .map(|v| v.vm())
                .any(|vm| vm.state.is_runnable() && vm.acct.stats.runs == 0)
            {
                return;
            }
        } else if start.wrapping_sub(self.last_scan) < self.interval_tsc {
            return;
        } else if self.allowance(start) == Some(0) {
            self.budget_waits += 1;
            return;
        }
        self.first_scan.get_or_insert(start);
        self.set_cold_thresholds(vms, start);
        self.engine
            .set_wall_time(hv_vm::sched::tsc_to_us(start, self.tsc_hz));
        for (i, own) in self.own.iter().enumerate() {
            let us = hv_vm::sched::tsc_to_us(own.own_tsc, self.tsc_hz);
            // A VM that stopped has left the engine; nothing to tell about it.
            let _ = self.engine.set_vm_time(VmId(i as u32), us);
        }
        // The step runs in chunks, and stops early once it has used what the budget allows now:
        // what a page costs varies tenfold (a cold page is compressed, a quiet one only looked
        // at), so a step sized in pages alone could overrun the budget by a whole step.
        let allowance = if pressure {
            None
        } else {
            self.allowance(start)
        };
        let over = || allowance.is_some_and(|a| rdtsc().wrapping_sub(start) >= a);
        // Idle VMs first: the scan work that reclaims the most for the least.
        let mut left = self.scan_idle_first(vms, frames, start, self.scan_pages, over);
        let (engine, mut backend) = self.backend(vms, frames);
        while left > 0 && !over() {
            let chunk = left.min(SCAN_CHUNK_PAGES);
            engine.scan(&mut backend, chunk);
            left -= chunk;
        }
        let stats = engine.stats();
        let end = rdtsc();
        self.scan_tsc += end.wrapping_sub(start);
        self.scans += 1;
        self.last_scan = end;
        if beyond_zero(&stats) > beyond_zero(&self.peak) {
            self.peak = stats;
            self.peak_scan = self.scans;
        }
        self.track_idle_footprints();
    }

    /// What the scan budget allows the scanner to spend at `now`, TSC ticks: its share of the
    /// host time since its first step, less what it spent. `None` before the first step.
    fn allowance(&self, now: u64) -> Option<u64> {
        let first = self.first_scan?;
        let allowed =
            u128::from(now.saturating_sub(first)) * u128::from(self.scan_cpu_percent) / 100;
        Some((allowed.min(u128::from(u64::MAX)) as u64).saturating_sub(self.scan_tsc))
    }

    /// Records the footprint of every VM whose coldness thresholds are an idle VM's.
    fn track_idle_footprints(&mut self) {
        for (i, idle) in self.idle.iter_mut().enumerate() {
            if idle.state == IdleState::Active {
                continue;
            }
            let Ok(private) = self.engine.vm_private_pages(VmId(i as u32)) else {
                continue;
            };
            let (_, min) = idle.footprint.get_or_insert((private, private));
            *min = (*min).min(private);
        }
    }

    /// Gives each VM whose idle state changed the coldness thresholds of its new state.
    fn set_cold_thresholds(&mut self, vms: &[impl HasGuestPhys], now: u64) {
        for (i, vm) in vms.iter().map(|v| v.vm()).enumerate() {
            let state = if vm.config.idle_reclaim {
                vm.idle.state()
            } else {
                IdleState::Active
            };
            let Some(idle) = self.idle.get_mut(i) else {
                continue;
            };
            if idle.state == state || !vm.state.is_runnable() {
                continue;
            }
            let became_idle = idle.state == IdleState::Active;
            idle.state = state;
            let id = VmId(i as u32);
            let after =
                (state != IdleState::Active).then_some((self.idle_cold_us, self.idle_cold_us));
            // A VM that stopped has left the engine; nothing to set.
            let _ = self.engine.set_vm_cold_after(id, after);
            if after.is_none() {
                idle.passes_left = 0;
            } else if became_idle {
                // Passes of its own, one cold threshold apart: the first finds what its wake-ups
                // touch, the next ones take the rest.
                (idle.passes_left, idle.next_pass) = (IDLE_PASSES, now);
                if let (None, Ok(private)) = (idle.footprint, self.engine.vm_private_pages(id)) {
                    idle.footprint = Some((private, private));
                }
            }
        }
    }

    /// Spends up to `left` pages of a scan step on the own passes of idle VMs that are due at
    /// `now`, in chunks, stopping when `over_budget` says so; returns the pages left.
    fn scan_idle_first<V: HasGuestPhys>(
        &mut self,
        vms: &mut [V],
        frames: &mut FrameAllocator,
        now: u64,
        mut left: u64,
        over_budget: impl Fn() -> bool,
    ) -> u64 {
        let cold_tsc = hv_vm::sched::us_to_tsc(self.idle_cold_us, self.tsc_hz);
        for i in 0..self.idle.len() {
            while left > 0 && !over_budget() {
                let idle = self.idle[i];
                if idle.passes_left == 0 || now < idle.next_pass {
                    break;
                }
                let chunk = left.min(SCAN_CHUNK_PAGES);
                left -= chunk;
                let (engine, mut backend) = self.backend(vms, frames);
                match engine.scan_vm(&mut backend, VmId(i as u32), chunk) {
                    Ok(r) if r.rounds_completed > 0 => {
                        self.idle[i].passes_left -= 1;
                        self.idle[i].next_pass = rdtsc().saturating_add(cold_tsc);
                        self.idle_passes += 1;
                    }
                    Ok(_) => {}
                    // It left the engine (stopped).
                    Err(_) => self.idle[i].passes_left = 0,
                }
            }
        }
        left
    }

    /// Full scan rounds the engine has completed.
    pub fn rounds(&self) -> u64 {
        self.engine.rounds()
    }

    /// Brings VM `i`'s own time up to date: since the last call, the CPU time it was charged
    /// less the engine's work on its faults, and at least a full quantum per time it was
    /// scheduled (a VM that yields or halts gave the rest of its quantum away; it was not
    /// kept waiting).
    fn account(&mut self, vms: &[impl HasGuestPhys], i: usize) {
        let vm = vms[i].vm();
        {
            let (Some(own), Some(&fault_tsc)) = (self.own.get_mut(i), self.vm_fault_tsc.get(i))
            else {
                return;
            };
            let s = &vm.acct.stats;
            let runs = s.runs.saturating_sub(own.runs);
            let ran = s.cpu_tsc.saturating_sub(own.cpu_tsc);
            let faults = fault_tsc.saturating_sub(own.fault_tsc);
            let quanta = runs.saturating_mul(hv_vm::sched::us_to_tsc(vm.quantum_us(), self.tsc_hz));
            own.own_tsc = own
                .own_tsc
                .saturating_add(ran.saturating_sub(faults).max(quanta));
            (own.runs, own.cpu_tsc, own.fault_tsc) = (s.runs, s.cpu_tsc, fault_tsc);
        }
    }

    /// Resolves an access of VM `index` to `gpa` that its EPT (or, for the hypervisor's copy of
    /// a hypercall buffer, its GuestMemory mirror) does not allow: a page the engine shared,
    /// patched, compressed or mapped onto a zero frame.
    pub fn fault(
        &mut self,
        vms: &mut [impl HasGuestPhys],
        frames: &mut FrameAllocator,
        index: usize,
        gpa: u64,
        write: bool,
        hypercall: bool,
    ) -> Result<(), FaultError> {
        self.hypercall_faults += u64::from(hypercall);
        // The last frames are kept for breaking shares and decompressing: a VM that would
        // take one for a page it never wrote waits instead, so that a VM holding shared pages
        // can still write them and go on (and perhaps stop, freeing its memory).
        if write
            && frames.free_frames() <= RESERVED_FRAMES
            && self
                .engine
                .is_zero_page(VmId(index as u32), Gfn(gpa >> 12))
                .unwrap_or(false)
        {
            self.engine_refusals += 1;
            return Err(FaultError::Engine(hv_mem::Error::OutOfFrames));
        }
        let start = rdtsc();
        let access = if write { Access::Write } else { Access::Read };
        let (engine, mut backend) = self.backend(vms, frames);
        let result = engine.fault(&mut backend, VmId(index as u32), Gfn(gpa >> 12), access);
        let spent = rdtsc().wrapping_sub(start);
        self.fault_tsc += spent;
        if let Some(t) = self.vm_fault_tsc.get_mut(index) {
            *t += spent;
        }
        self.faults += 1;
        let this = (index, gpa >> 12, write);
        match result {
            Ok(FaultResolution::Spurious) => {
                // Nothing to do: perhaps a translation cached from before the engine's last
                // change to this VM. Drop the VM's cached translations and let it retry once.
                if self.last_spurious.replace(this) == Some(this) {
                    return Err(FaultError::Stuck);
                }
                if let Some(v) = vms.get_mut(index) {
                    v.guest_phys_mut().stale = true;
                }
                Ok(())
            }
            Ok(_) => {
                self.last_spurious = None;
                Ok(())
            }
            Err(e) => Err(FaultError::Engine(e)),
        }
    }

    /// The VM made progress (an exit other than a memory fault): a spurious fault that follows
    /// is a new one, not the same access faulting again.
    pub fn progressed(&mut self) {
        self.last_spurious = None;
    }

    /// Unregisters a VM that stopped: the engine drops its references (shared, zero, patched and
    /// compressed pages), so that every page still present is a private frame the VM owns.
    pub fn remove_vm(
        &mut self,
        vms: &mut [impl HasGuestPhys],
        frames: &mut FrameAllocator,
        index: usize,
    ) {
        let (engine, mut backend) = self.backend(vms, frames);
        if let Err(e) = engine.remove_vm(&mut backend, VmId(index as u32)) {
            let name = backend.vms.get(index).map_or("?", |v| v.vm().name.as_str());
            log::error!(target: "mem", "removing vm {name}: {e}");
        }
    }

    /// The closing statistics: the savings at their peak, and the costs and the engine's
    /// cumulative event counters. The peak is the scan step with the most frames saved by
    /// sharing, patching and compression: zero pages aside, because VMs are all zero pages
    /// until their guests write, and VMs leave the engine as they stop, so neither the first
    /// nor the final state shows what multiplexing achieves while the VMs run.
    pub fn report(&self, vms: &[impl HasGuestPhys], vm_cpu_tsc: u64) {
        let p = &self.peak;
        let c = self.engine.stats().counters;
        let us = |tsc: u64| hv_vm::sched::tsc_to_us(tsc, self.tsc_hz);
        let net_kib = (p.frames_saved() * PAGE_SIZE as u64)
            .saturating_sub(p.bytes_blob_heap + p.bytes_metadata)
            / 1024;
        log::info!(target: "mem",
            "peak at scan {} of {}: pages={} saved_frames={} saved_zero={} saved_shared={} \
             saved_patched={} saved_compressed={} net_saved_kib={} patch_bytes={} \
             compressed_bytes={} blob_heap_bytes={} metadata_bytes={}",
            self.peak_scan, self.scans, p.pages_total, p.frames_saved(), p.frames_saved_zero,
            p.frames_saved_shared, p.frames_saved_patched, p.frames_saved_compressed, net_kib,
            p.bytes_patches, p.bytes_compressed, p.bytes_blob_heap, p.bytes_metadata);
        log::info!(target: "mem",
            "work: scans={} scan_us={} faults={} fault_us={} hypercall_faults={} rounds={} merges_zero={} \
             merges_identical={} patches_made={} pages_compressed={} cow_breaks={} \
             faults_zero={} faults_shared={} faults_patched={} faults_decompressed={} \
             faults_out_of_frames={} volatile_skips={} heap_limited={}",
            self.scans, us(self.scan_tsc), self.faults, us(self.fault_tsc), self.hypercall_faults, c.rounds,
            c.merges_zero, c.merges_identical, c.patches_made, c.pages_compressed, c.cow_breaks,
            c.faults_zero, c.faults_shared, c.faults_patched, c.faults_decompressed,
            c.faults_out_of_frames, c.volatile_skips, c.heap_limited);
        let run = rdtsc().wrapping_sub(self.created).max(1);
        let permille = |t: u64| (u128::from(t) * 1000 / u128::from(run)) as u64;
        log::info!(target: "mem",
            "cpu: scan_us={} scan_permille={} budget_percent={} budget_waits={} pressure_steps={} idle_passes={} reserve_waits={} \
             fault_us={} vm_cpu_us={} vm_cpu_permille={} (permille: of host time since the engine \
             started)",
            us(self.scan_tsc), permille(self.scan_tsc), self.scan_cpu_percent, self.budget_waits,
            self.pressure_steps, self.idle_passes, self.engine_refusals,
            us(self.fault_tsc), us(vm_cpu_tsc), permille(vm_cpu_tsc));
        for (v, idle) in vms.iter().zip(&self.idle) {
            if let Some((first, min)) = idle.footprint {
                log::info!(target: "mem",
                    "idle footprint vm={} pages={} private_when_idle={first} private_min={min}",
                    v.vm().name, v.guest_phys().memory.pages());
            }
        }
    }
}

/// Frames saved by sharing, patching and compression.
fn beyond_zero(s: &Stats) -> u64 {
    s.frames_saved_shared + s.frames_saved_patched + s.frames_saved_compressed
}

/// The engine's view of the VMs' memory: EPT leaves, the GuestMemory mirrors, host frames
/// through the identity map, and the frame allocator.
struct EptBackend<'a, V> {
    vms: &'a mut [V],
    frames: &'a mut FrameAllocator,
    ept_ad: bool,
}

impl<V: HasGuestPhys> EptBackend<'_, V> {
    /// Sets the EPT leaf and the mirror of one guest page together.
    fn set(&mut self, vm: VmId, gfn: Gfn, mapping: Option<(u64, bool)>) {
        let index = vm.0 as usize;
        let Some(owner) = self.vms.get_mut(index) else {
            return;
        };
        let v = owner.guest_phys_mut();
        let mut tables = TableFrames(self.frames);
        let gpa = gfn.0 << 12;
        let result = match mapping {
            Some((hpa, writable)) => {
                let perms = if writable {
                    EptPerms::RWX
                } else {
                    EptPerms::RX
                };
                v.ept.map(&mut tables, gpa, hpa, perms)
            }
            None => {
                v.ept.unmap(&mut tables, gpa);
                Ok(())
            }
        };
        match result {
            Ok(()) => v.memory.set_page(
                gfn.0,
                mapping.map(|(hpa, writable)| PageMapping { hpa, writable }),
            ),
            // Every guest page's leaf table exists from VM creation on, so remapping a page
            // allocates nothing and cannot fail; if it did, the old leaf and mirror stay.
            Err(e) => {
                log::error!(target: "mem", "vm {}: remapping gpa {gpa:#x}: {e}", owner.vm().name)
            }
        }
        owner.guest_phys_mut().stale = true;
    }

    fn take_flag(&mut self, vm: VmId, gfn: Gfn, dirty: bool) -> bool {
        if !self.ept_ad {
            return true; // the contract's conservative answer
        }
        let index = vm.0 as usize;
        let mut tables = TableFrames(self.frames);
        let Some(v) = self.vms.get_mut(index).map(|v| v.guest_phys_mut()) else {
            return true;
        };
        let gpa = gfn.0 << 12;
        let was = if dirty {
            v.ept.take_dirty(&mut tables, gpa)
        } else {
            v.ept.take_accessed(&mut tables, gpa)
        };
        if was == Some(true) {
            // The CPU sets the flag again only after its cached translation is dropped.
            v.stale = true;
        }
        was.unwrap_or(true)
    }
}

/// A duration for a log line: microseconds below 10 ms, milliseconds above.
struct Micros(u64);

impl core::fmt::Display for Micros {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0 < 10_000 {
            write!(f, "{} us", self.0)
        } else {
            write!(f, "{} ms", self.0 / 1000)
        }
    }
}

const fn frame_hpa(frame: Frame) -> u64 {
    frame.0 << 12
}

impl<V: HasGuestPhys> MemoryBackend for EptBackend<'_, V> {
    fn mapping(&self, vm: VmId, gfn: Gfn) -> Option<Mapping> {
        let m = self
            .vms
            .get(vm.0 as usize)?
            .guest_phys()
            .memory
            .page(gfn.0)?;
        Some(Mapping {
            frame: Frame(m.hpa >> 12),
            writable: m.writable,
        })
    }

    fn map(&mut self, vm: VmId, gfn: Gfn, frame: Frame, writable: bool) {
        self.set(vm, gfn, Some((frame_hpa(frame), writable)));
    }

    fn unmap(&mut self, vm: VmId, gfn: Gfn) {
        self.set(vm, gfn, None);
    }

    fn frame(&self, frame: Frame) -> &Page {
        // SAFETY: every frame the engine names came from the frame allocator (a VM's memory or
        // `alloc_frame`): identity-mapped RAM below 4 GiB, 4 KiB aligned, not the kernel's. No
        // guest runs while the engine holds this reference (one CPU, VM-exit context).
        unsafe { &*(frame_hpa(frame) as *const Page) }
    }

    fn frame_mut(&mut self, frame: Frame) -> &mut Page {
        // SAFETY: as in `frame`; the engine writes only frames it allocated and has not mapped
        // yet, so nothing else refers to this one.
        unsafe { &mut *(frame_hpa(frame) as *mut Page) }
    }

    fn copy_frame(&mut self, src: Frame, dst: Frame) {
        // SAFETY: as in `frame`; the engine passes distinct frames, so the copies do not overlap.
        unsafe {
            core::ptr::copy_nonoverlapping(
                frame_hpa(src) as *const u8,
                frame_hpa(dst) as *mut u8,
                PAGE_SIZE,
            )
        };
    }

    fn alloc_frame(&mut self) -> Result<Frame, OutOfFrames> {
        self.frames
            .alloc()
            .map(|hpa| Frame(hpa >> 12))
            .ok_or(OutOfFrames)
    }

    fn free_frame(&mut self, frame: Frame) {
        self.frames.free(frame_hpa(frame));
    }

    fn test_and_clear_accessed(&mut self, vm: VmId, gfn: Gfn) -> bool {
        self.take_flag(vm, gfn, false)
    }

    fn test_and_clear_dirty(&mut self, vm: VmId, gfn: Gfn) -> bool {
        self.take_flag(vm, gfn, true)
    }
}
