//! Starting a guest from a mapped-layout file (`docs/stream-format.md`, *Mapped layout*):
//! in full (every page read and checked before the guest runs), or on demand — the guest starts
//! at once with its RAM registered for faults; a fault thread reads each page the guest touches
//! first, a background reader fills in the rest in order, and every page is checked against its
//! CRC before it is placed, so the guest never runs on a wrong page.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_wire::{MappedFile, PAGE_SIZE};

use crate::control::MigrationControl;
use crate::stats::MigrationStatus;
use crate::target::IncomingOutcome;
use crate::{MigrateError, PostcopyRam, Result, TargetFactory, TargetVm};

/// Pages read at once by the full restore and the background reader (1 MiB).
const CHUNK: u64 = 256;

/// What a restore from a mapped file measured (`x-tern-restore` in `query-migrate`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RestoreStats {
    pub on_demand: bool,
    /// From the start to the guest running, ms.
    pub running_ms: f64,
    /// From the start to every page in place, ms.
    pub filled_ms: Option<f64>,
    /// Pages the guest touched before the background reader got there (on demand).
    pub faults: u64,
}

/// Restores the guest in `file` (a VM built by `factory`) and returns it running; on demand,
/// returns once every page is in place (the guest runs long before).
pub fn restore_mapped(
    file: MappedFile,
    factory: TargetFactory<'_>,
    ctl: &MigrationControl,
    on_demand: bool,
) -> Result<IncomingOutcome> {
    let t0 = Instant::now();
    {
        let mut s = ctl.stats();
        s.started = Some(t0);
        s.total = file.layout.regions.iter().map(|r| r.pages).sum::<u64>() * PAGE_SIZE as u64;
    }
    ctl.set_status(MigrationStatus::Active);
    let result = (|| {
        let vm = factory(&file.desc)?;
        crate::target::check_declared_sections(&file.desc, &vm.state_schemas())?;
        let mine: Vec<(u32, u64)> = vm
            .ram()
            .regions()
            .iter()
            .map(|r| (r.id, r.size / PAGE_SIZE as u64))
            .collect();
        let theirs: Vec<(u32, u64)> = file
            .layout
            .regions
            .iter()
            .map(|r| (r.id, r.pages))
            .collect();
        if mine != theirs {
            return Err(MigrateError::Mismatch(format!(
                "the file's RAM regions (id, pages) {theirs:?} are not this VM's {mine:?}"
            )));
        }
        if on_demand {
            on_demand_restore(&file, vm, ctl, t0)
        } else {
            full_restore(&file, vm, ctl, t0)
        }
    })();
    match result {
        Ok(vm) => {
            ctl.finalize(MigrationStatus::Completed);
            Ok(IncomingOutcome { vm })
        }
        Err(e) => {
            tracing::error!("restore failed: {e}");
            ctl.stats().error = Some(e.to_string());
            ctl.finalize(MigrationStatus::Failed);
            Err(e)
        }
    }
}

fn wire(e: tern_wire::WireError) -> MigrateError {
    MigrateError::Wire(e)
}

/// Every page read, checked and written, then the state; then the guest runs.
fn full_restore(
    file: &MappedFile,
    vm: Arc<dyn TargetVm>,
    ctl: &MigrationControl,
    t0: Instant,
) -> Result<Arc<dyn TargetVm>> {
    let mut buf = vec![0u8; CHUNK as usize * PAGE_SIZE];
    for (ri, r) in file.layout.regions.iter().enumerate() {
        let mut p = 0;
        while p < r.pages {
            ctl.check_cancel()?;
            let n = (r.pages - p).min(CHUNK);
            // Every page is read and checked (a page is never taken for zero from its CRC: a
            // page of data may have the zero page's CRC); fresh guest RAM is zero already.
            let b = &mut buf[..n as usize * PAGE_SIZE];
            file.read_pages(ri, p, b).map_err(wire)?;
            if b.iter().any(|&x| x != 0) {
                vm.ram().write_pages(r.id, p, b)?;
            }
            ctl.stats().transferred += n * PAGE_SIZE as u64;
            p += n;
        }
    }
    vm.load_state(&file.sections)?;
    vm.resume()?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    ctl.stats().restore = Some(RestoreStats {
        on_demand: false,
        running_ms: ms,
        filled_ms: Some(ms),
        faults: 0,
    });
    Ok(vm)
}

/// Reads the pages `first..first + n` of region index `ri`, checks them and places them (runs
/// of zero pages as zero pages). Pages already placed are left as they are.
fn place_pages(
    file: &MappedFile,
    pc: &dyn PostcopyRam,
    ri: usize,
    first: u64,
    n: u64,
    buf: &mut [u8],
) -> Result<()> {
    // The userfaultfd side numbers regions by index.
    let region = ri as u32;
    let b = &mut buf[..n as usize * PAGE_SIZE];
    file.read_pages(ri, first, b).map_err(wire)?;
    let zero = |i: u64| {
        b[i as usize * PAGE_SIZE..(i as usize + 1) * PAGE_SIZE]
            .iter()
            .all(|&x| x == 0)
    };
    let mut i = 0;
    while i < n {
        let z = zero(i);
        let mut e = i + 1;
        while e < n && zero(e) == z {
            e += 1;
        }
        if z {
            pc.place_zero(region, first + i, e - i)?;
        } else {
            pc.place(
                region,
                first + i,
                &b[i as usize * PAGE_SIZE..e as usize * PAGE_SIZE],
            )?;
        }
        i = e;
    }
    Ok(())
}

/// The guest runs at once; faults are served from the file, the rest filled in behind.
fn on_demand_restore(
    file: &MappedFile,
    vm: Arc<dyn TargetVm>,
    ctl: &MigrationControl,
    t0: Instant,
) -> Result<Arc<dyn TargetVm>> {
    let pc = vm.ram().postcopy()?;
    // Every page of the new guest is missing: any touch faults from here (page by page: see
    // `before_faults`).
    pc.listen()?;
    pc.before_faults();
    let stop = AtomicBool::new(false);
    let failed: Mutex<Option<MigrateError>> = Mutex::new(None);
    let faults = AtomicU64::new(0);
    let outcome = std::thread::scope(|s| {
        let (pc, stop, failed, faults) = (&*pc, &stop, &failed, &faults);
        let server = std::thread::Builder::new()
            .name("restore-faults".into())
            .spawn_scoped(s, move || {
                let mut one = vec![0u8; PAGE_SIZE];
                while !stop.load(Ordering::SeqCst) {
                    let served = pc.faults(Duration::from_millis(50)).and_then(|list| {
                        for f in list {
                            let ri = f.region as usize;
                            if ri >= file.layout.regions.len() {
                                continue;
                            }
                            faults.fetch_add(1, Ordering::Relaxed);
                            place_pages(file, pc, ri, f.page, 1, &mut one)?;
                        }
                        Ok(())
                    });
                    if let Err(e) = served {
                        // The vCPU that touched the page waits for ever: it never sees a
                        // wrong page. The restore fails.
                        *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        return;
                    }
                }
            })
            .map_err(MigrateError::io("starting the restore's fault thread"))?;
        let r = (|| {
            // Loading vCPU state touches guest pages (the paravirtual clock): served above.
            vm.load_state(&file.sections)?;
            vm.resume()?;
            ctl.guest_running();
            let running_ms = t0.elapsed().as_secs_f64() * 1000.0;
            tracing::info!("restore on demand: the guest runs after {running_ms:.1} ms");
            ctl.stats().restore = Some(RestoreStats {
                on_demand: true,
                running_ms,
                filled_ms: None,
                faults: 0,
            });
            let mut buf = vec![0u8; CHUNK as usize * PAGE_SIZE];
            for (ri, r) in file.layout.regions.iter().enumerate() {
                let mut p = 0;
                while p < r.pages {
                    if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
                        return Err(e);
                    }
                    let n = (r.pages - p).min(CHUNK);
                    place_pages(file, pc, ri, p, n, &mut buf)?;
                    ctl.stats().transferred += n * PAGE_SIZE as u64;
                    p += n;
                }
            }
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        pc.interrupt();
        let _ = server.join();
        if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e);
        }
        r
    });
    if let Err(e) = outcome {
        // The guest may be running: it stops now, and its registration stays (a page it lacks
        // is never a zero page, nor a wrong one).
        vm.stop_guest();
        std::mem::forget(pc);
        return Err(e);
    }
    // Every page is in: faults go back to the kernel.
    pc.finish()?;
    if let Some(r) = ctl.stats().restore.as_mut() {
        r.filled_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
        r.faults = faults.load(Ordering::Relaxed);
    }
    Ok(vm)
}
