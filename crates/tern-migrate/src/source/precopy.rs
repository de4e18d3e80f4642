//! Setup and the precopy rounds: each round sends what became dirty since the last sync, then
//! the convergence rule decides whether the rest fits in the downtime limit.

use std::time::Instant;

use serde_json::json;
use tern_wire::{RamRegionDesc, VmDescription};

use super::multifd::DataChannels;
use super::{update_counters, Link, Session};
use crate::control::MigrationControl;
use crate::convergence::{self, Measured, Throttle};
use crate::params::LimitAction;
use crate::stats::RoundRecord;
use crate::{MigrateError, Result, SourceVm};

/// Bytes per second assumed before a round was large enough to measure the link.
const UNMEASURED_BANDWIDTH: f64 = 100e6;

/// Fixed costs of a switch-over, in seconds, before anything was measured.
const SWITCHOVER_OVERHEAD: f64 = 0.005;

/// The VM description a source sends: its machine, RAM regions and device sections.
pub fn describe(vm: &dyn SourceVm) -> VmDescription {
    VmDescription {
        machine: vm.machine(),
        ram: vm
            .ram()
            .regions()
            .into_iter()
            .map(|r| RamRegionDesc {
                id: r.id,
                name: r.name,
                gpa: r.gpa,
                size: r.size,
            })
            .collect(),
        sections: vm.state_schemas(),
    }
}

/// With data channels the main channel has nothing to say during the rounds: a NOP at least every
/// [`KEEPALIVE`] keeps the target's read timeout measuring the source.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(5);

fn keepalive(out: &mut crate::participant::Out<'static>, last: &mut Instant) -> Result<()> {
    if last.elapsed() >= KEEPALIVE {
        out.nop()?;
        out.flush()?;
        *last = Instant::now();
    }
    Ok(())
}

/// Describes the VM and lets every participant start tracking and mark what it will send.
pub(super) fn setup(
    ctl: &MigrationControl,
    session: &mut Session,
    link: &mut Link,
    started: Instant,
) -> Result<()> {
    let vm = &session.vm;
    let mut desc = describe(&**vm);
    if ctl.params.mode == crate::MigrationMode::CprTransfer {
        // The target maps the memory it was handed (the descriptor came with the hello).
        desc.machine["x-tern-handover"] = json!(true);
    }
    let out = &mut link.out;
    out.source_info(&json!({
        "tern": env!("CARGO_PKG_VERSION"),
        "x-tern-ram-digest": ctl.caps().ram_digest,
    }))?;
    out.description(&desc)?;
    if ctl.params.auto_postcopy != crate::AutoPostcopy::Off && !ctl.caps().postcopy_ram {
        return Err(MigrateError::Vm(
            "x-tern-auto-postcopy needs the postcopy-ram capability".into(),
        ));
    }
    if ctl.caps().postcopy_ram {
        super::postcopy::advise(ctl, &**vm, link.ret.is_some(), out)?;
    }
    if let Some(u) = link.urgent.as_mut() {
        // Postcopy-preempt: the urgent stream describes the same VM, then waits.
        u.description(&desc)?;
        u.flush()?;
    }
    let compression = ctl.params.compression();
    for p in session.parts.iter_mut() {
        p.use_compression(compression)?;
        p.use_dirty_log(ctl.params.dirty_log);
    }
    if !link.data_conns.is_empty() {
        // The target starts reading its data channels once the main channel described the VM:
        // the description must not wait in our buffer while the data channels fill theirs.
        out.flush()?;
        let conns = std::mem::take(&mut link.data_conns);
        let d = DataChannels::start(
            vm.clone(),
            conns,
            &desc,
            compression,
            ctl.bandwidth_limit.clone(),
            ctl.accepted_counter(),
        )?;
        for p in session.parts.iter_mut() {
            p.use_channels(&d);
        }
        link.data = Some(d);
    }
    for p in session.parts.iter_mut() {
        p.save_setup(out)?;
    }
    if let Some(d) = &link.data {
        // Round 0: the never-written ranges.
        d.sync(0, &mut || ctl.check_cancel())?;
    }
    let mut s = ctl.stats();
    s.setup_time_ms = started.elapsed().as_millis() as u64;
    s.dirty_log = session
        .parts
        .iter()
        .find_map(|p| p.dirty_log())
        .map(crate::DirtyLogMode::as_str);
    update_counters(&mut s, session, ctl.accepted());
    Ok(())
}

/// Sends round after round until the rest fits in the downtime limit (or a limit says to stop
/// anyway). Returns the number of rounds.
pub(super) fn rounds(
    ctl: &MigrationControl,
    session: &mut Session,
    link: &mut Link,
    started: Instant,
) -> Result<u64> {
    let state_bytes = session.vm.state_size_hint();
    let params = ctl.params;
    let limit_ms = params.downtime_limit_ms;
    let mut round = 1u64;
    let mut bandwidth = 0.0f64;
    let mut last_sync = Instant::now();
    let mut throttle = Throttle::default();
    // Rounds in a row after which precopy could not converge (x-tern-auto-postcopy).
    let mut hopeless = 0u64;
    let secs = |t: Instant| t.duration_since(started).as_secs_f64();
    let (out, data) = (&mut link.out, &link.data);
    let mut alive = Instant::now();
    loop {
        if ctl.postcopy_requested() {
            ctl.stats().stop_reason = Some("postcopy");
            return Ok(round - 1);
        }
        ctl.pass(round);
        ctl.stats().dirty_sync_count = round;
        let t0 = Instant::now();
        let b0 = ctl.accepted();
        let p0 = session.progress();
        let mut batches = 0u64;
        for i in 0..session.parts.len() {
            while session.parts[i].iterate(out)? {
                batches += 1;
                if batches.is_multiple_of(16) {
                    ctl.check_cancel()?;
                    if ctl.postcopy_requested() && data.is_none() {
                        // The rest of this round goes by postcopy.
                        ctl.stats().stop_reason = Some("postcopy");
                        return Ok(round);
                    }
                    if data.is_some() {
                        keepalive(out, &mut alive)?;
                    }
                    let mut s = ctl.stats();
                    update_counters(&mut s, session, ctl.accepted());
                    s.precopy_bytes = s.transferred;
                }
            }
        }
        if let Some(d) = data {
            d.sync(round, &mut || {
                ctl.check_cancel()?;
                keepalive(out, &mut alive)
            })?;
        }
        out.flush()?;
        ctl.check_cancel()?;
        let dt = t0.elapsed().as_secs_f64();
        let bytes = ctl.accepted() - b0;
        if dt > 0.0005 && bytes > 64 << 10 {
            bandwidth = bytes as f64 / dt;
        }
        // What became dirty meanwhile: the next round's work, and what a stop would send now.
        let since = last_sync.elapsed().as_secs_f64();
        let mut dirtied = 0;
        let t_sync = Instant::now();
        for p in session.parts.iter_mut() {
            dirtied += p.sync()?;
        }
        let t_end = Instant::now();
        let sync_ms = (t_end - t_sync).as_secs_f64() * 1000.0;
        last_sync = t_end;
        let pending = session.pending();
        let dirty_rate = dirtied as f64 / since.max(1e-6);
        let m = Measured {
            dirty_rate,
            // A round too small to measure the link: assume a slow one.
            bandwidth: if bandwidth > 0.0 {
                bandwidth
            } else {
                UNMEASURED_BANDWIDTH
            },
            dirty_bytes: pending,
            state_bytes,
            target_load_rate: 0.0,
            fixed_overhead: SWITCHOVER_OVERHEAD,
        };
        let expected = convergence::expected_downtime(&m);
        let p1 = session.progress();
        let (pages, zeros) = (p1.data_pages - p0.data_pages, p1.zero_pages - p0.zero_pages);
        {
            let mut s = ctl.stats();
            update_counters(&mut s, session, ctl.accepted());
            s.precopy_bytes = s.transferred;
            s.mbps = bandwidth * 8.0 / 1e6;
            s.dirty_pages_rate = (dirty_rate / 4096.0) as u64;
            s.pages_per_second = ((pages + zeros) as f64 / dt.max(1e-6)) as u64;
            s.expected_downtime_ms = (expected * 1000.0).min(u64::MAX as f64) as u64;
            if let Some(d) = data {
                d.report(&mut s);
            }
            s.rounds.push(RoundRecord {
                round,
                start: secs(t0),
                end: secs(t_end),
                pages,
                zero_pages: zeros,
                bytes,
                dirty_pages: dirtied / 4096,
                sync_ms,
                rearm_ms: (p1.rearm_us - p0.rearm_us) as f64 / 1000.0,
                bandwidth: if dt > 0.0 { bytes as f64 / dt } else { 0.0 },
                dirty_rate,
                expected_downtime_ms: expected * 1000.0,
                throttle_percent: throttle.percent,
            });
        }
        tracing::debug!(
            round,
            bytes,
            dt,
            dirtied,
            pending,
            expected,
            "precopy round done"
        );
        // Nothing iterates (memory handed over, no copied disk): nothing to wait for, whatever
        // the downtime limit.
        if convergence::converged(&m, limit_ms) || session.parts.is_empty() {
            ctl.stats().stop_reason = Some("converged");
            return Ok(round);
        }
        // x-tern-auto-postcopy (the rule is written at `AutoPostcopy`): before the limits and
        // before auto-converge.
        if ctl.caps().postcopy_ram && params.auto_postcopy != crate::AutoPostcopy::Off {
            hopeless = if dirty_rate >= 0.95 * m.bandwidth {
                hopeless + 1
            } else {
                0
            };
            if hopeless >= params.auto_postcopy.rounds() {
                let why = format!(
                    "switched at round {round}: expected downtime {:.0} ms > {limit_ms} ms; dirty {:.0} MiB/s, link {:.0} MiB/s",
                    expected * 1000.0,
                    dirty_rate / (1 << 20) as f64,
                    m.bandwidth / (1 << 20) as f64,
                );
                tracing::info!(
                    "x-tern-auto-postcopy ({}): {why}",
                    params.auto_postcopy.as_str()
                );
                {
                    let mut s = ctl.stats();
                    s.stop_reason = Some("auto-postcopy");
                    s.auto_postcopy = Some(why);
                }
                ctl.request_postcopy();
                return Ok(round);
            }
        }
        let limit = if params.max_rounds > 0 && round >= params.max_rounds {
            Some(("round limit", format!("{round} rounds")))
        } else if params.max_precopy_ms > 0
            && started.elapsed().as_millis() as u64 >= params.max_precopy_ms
        {
            Some((
                "time limit",
                format!("{} ms of precopy", started.elapsed().as_millis()),
            ))
        } else {
            None
        };
        if let Some((why, what)) = limit {
            let detail = format!(
                "after {what} {:.0} ms of downtime were still expected (limit {limit_ms} ms): the guest dirties {:.0} MiB/s, the link carries {:.0} MiB/s",
                expected * 1000.0,
                dirty_rate / (1 << 20) as f64,
                m.bandwidth / (1 << 20) as f64,
            );
            match params.limit_action {
                LimitAction::Fail => return Err(MigrateError::NotConverging(detail)),
                LimitAction::Switchover => {
                    tracing::warn!("forcing the switch-over: {detail}");
                    ctl.stats().stop_reason = Some(why);
                    return Ok(round);
                }
            }
        }
        if ctl.caps().auto_converge && round >= 2 {
            if let Some(pct) = throttle.after_sync(&params, dirtied, bytes) {
                tracing::info!(round, pct, "auto-converge: throttling the vCPUs");
                session.vm.set_throttle(pct);
                ctl.stats().throttle_percent = pct;
            }
        }
        round += 1;
    }
}
