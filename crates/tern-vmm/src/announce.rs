//! Telling the network where the guest is now: after an incoming migration (and on QMP
//! `announce-self`) each NIC sends RARP frames from its MAC on its TAP, and asks a guest that
//! negotiated VIRTIO_NET_F_GUEST_ANNOUNCE to announce itself (gratuitous ARPs from its own
//! stack, acknowledged on the control queue). Switches, and a Linux bridge's MAC learning, then
//! forward the guest's traffic to its new port at once instead of after an ARP or MAC-ageing
//! timeout.
//!
//! The schedule is QEMU's: the first round at once, then `rounds - 1` more, the k-th after
//! `initial + (k - 1) * step` milliseconds, never more than `max`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::tap::format_mac;
use crate::vm::Vm;

/// QEMU's `announce-*` parameters, in milliseconds and rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnnounceParams {
    pub initial: u64,
    pub max: u64,
    pub rounds: u64,
    pub step: u64,
}

impl Default for AnnounceParams {
    /// QEMU's defaults.
    fn default() -> Self {
        AnnounceParams {
            initial: 50,
            max: 550,
            rounds: 5,
            step: 100,
        }
    }
}

impl AnnounceParams {
    /// The wait before round `k` (0-based; round 0 goes at once).
    pub fn delay(&self, k: u64) -> Duration {
        if k == 0 {
            return Duration::ZERO;
        }
        let ms = self
            .initial
            .saturating_add((k - 1).saturating_mul(self.step))
            .min(self.max);
        Duration::from_millis(ms)
    }
}

/// A NIC's counters (QMP `x-tern-query-nics`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NicInfo {
    pub name: String,
    pub mac: String,
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_errors: u64,
    pub dropped_at_switch: u64,
    pub rarps: u64,
    pub guest_announces: u64,
}

impl Vm {
    /// The NICs' names (`net0`, `net1`...: their order after the disks).
    pub fn nic_names(&self) -> Vec<String> {
        (0..self.nets.len()).map(|i| format!("net{i}")).collect()
    }

    /// Each NIC's counters.
    pub fn nics(&self) -> Vec<NicInfo> {
        self.nets
            .iter()
            .zip(&self.net_macs)
            .enumerate()
            .map(|(i, ((_, s), mac))| NicInfo {
                name: format!("net{i}"),
                mac: format_mac(mac),
                rx_frames: s.rx_frames.load(Ordering::Relaxed),
                tx_frames: s.tx_frames.load(Ordering::Relaxed),
                rx_bytes: s.rx_bytes.load(Ordering::Relaxed),
                tx_bytes: s.tx_bytes.load(Ordering::Relaxed),
                rx_dropped: s.rx_dropped.load(Ordering::Relaxed),
                tx_errors: s.tx_errors.load(Ordering::Relaxed),
                dropped_at_switch: s.dropped_at_switch.load(Ordering::Relaxed),
                rarps: s.rarps.load(Ordering::Relaxed),
                guest_announces: s.guest_announces.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Announces the NICs `which` (indices; all when None) on a timer thread with `p`'s
    /// schedule. A later call replaces a schedule still running (as QEMU resets its timer).
    pub fn announce(&self, p: AnnounceParams, which: Option<Vec<usize>>) {
        if self.nets.is_empty() || p.rounds == 0 {
            return;
        }
        let gen = self.announce_gen.fetch_add(1, Ordering::SeqCst) + 1;
        let nics = which.unwrap_or_else(|| (0..self.nets.len()).collect());
        let me = self.me.clone();
        let spawned = std::thread::Builder::new()
            .name("announce".into())
            .spawn(move || {
                for k in 0..p.rounds {
                    std::thread::sleep(p.delay(k));
                    let Some(vm) = me.upgrade() else { return };
                    if vm.announce_gen.load(Ordering::SeqCst) != gen {
                        return;
                    }
                    for &i in &nics {
                        if let Some((dev, _)) = vm.nets.get(i) {
                            dev.announce();
                        }
                    }
                }
                tracing::debug!("announce: {} round(s) done", p.rounds);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the announce timer: {e}");
        }
    }

    /// The guest runs on another host now (a completed outgoing migration): the NICs drop the
    /// frames that waited for it, counted and logged.
    pub fn retire_devices(&self) {
        // An announce schedule still running here would pull the guest's traffic back.
        self.announce_gen.fetch_add(1, Ordering::SeqCst);
        for (dev, _) in &self.nets {
            if let Some(msg) = dev.retire() {
                tracing::info!("{msg}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_qemus() {
        let p = AnnounceParams::default();
        let d: Vec<u64> = (0..p.rounds)
            .map(|k| p.delay(k).as_millis() as u64)
            .collect();
        assert_eq!(d, [0, 50, 150, 250, 350]);
        let p = AnnounceParams {
            initial: 100,
            max: 250,
            rounds: 4,
            step: 100,
        };
        let d: Vec<u64> = (0..p.rounds)
            .map(|k| p.delay(k).as_millis() as u64)
            .collect();
        assert_eq!(d, [0, 100, 200, 250]);
    }
}
