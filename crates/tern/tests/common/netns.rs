//! Two "hosts" made of network namespaces, joined by a shaped veth wire.

use std::path::Path;

use super::{is_hb, tern_bin, Proc, Qmp, Vmm, BOOT, LINE};

/// Two network namespaces joined by a veth pair shaped to `rate` with htb (both ways), removed
/// on drop.
pub struct Link {
    pub ns: [String; 2],
    pub dev: [String; 2],
}

pub fn ip(args: &str) {
    let ok = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ip {args}"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "ip {args}");
}

impl Link {
    pub fn up(rate: &str) -> Link {
        let id = std::process::id();
        let ns = [format!("ternpc-src-{id}"), format!("ternpc-dst-{id}")];
        let dev = [format!("tps{id}"), format!("tpd{id}")];
        let l = Link {
            ns: ns.clone(),
            dev: dev.clone(),
        };
        for n in &ns {
            ip(&format!("netns add {n}"));
            ip(&format!("-n {n} link set lo up"));
        }
        ip(&format!(
            "link add {} netns {} type veth peer name {} netns {}",
            dev[0], ns[0], dev[1], ns[1]
        ));
        for (i, (n, d)) in ns.iter().zip(&dev).enumerate() {
            ip(&format!("-n {n} addr add 10.78.0.{}/24 dev {d}", i + 1));
            ip(&format!("-n {n} link set {d} up"));
            let tc = |a: &str| {
                let ok = std::process::Command::new("tc")
                    .args(["-n", n])
                    .args(a.split_whitespace())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                assert!(ok, "tc {a}");
            };
            tc(&format!("qdisc add dev {d} root handle 1: htb default 10"));
            tc(&format!(
                "class add dev {d} parent 1: classid 1:10 htb rate {rate} ceil {rate}"
            ));
        }
        l
    }

    /// `tern run` in namespace `i`.
    pub fn tern(&self, i: usize, args: &[&str]) -> Proc {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.ns[i], tern_bin(), "run"])
            .args(args);
        Proc::spawn(&mut cmd)
    }
}

impl Link {
    /// Takes the wire down (`false`) or up again: packets are dropped meanwhile, no
    /// connection is told anything (a cable pulled).
    pub fn set(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&format!(
            "-n {} link set {} {state}",
            self.ns[0], self.dev[0]
        ));
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", n])
                .status();
        }
    }
}

impl Link {
    /// A source guest in the first namespace (1 GiB, 2 vCPUs, `cmdline`), booted and beating,
    /// with its monitor at `d/{tag}.qmp`.
    pub fn source(&self, d: &Path, tag: &str, cmdline: &str) -> Vmm {
        let sock = d.join(format!("{tag}.qmp"));
        let qmp = format!("unix:{}", sock.display());
        let mut p = self.tern(
            0,
            &[
                "--memory",
                "1G",
                "--vcpus",
                "2",
                "--cmdline",
                cmdline,
                "--qmp",
                &qmp,
            ],
        );
        p.wait_for("ready", BOOT, |l| l == "tern-guest ready");
        p.wait_for("a heartbeat", BOOT, is_hb);
        Vmm {
            p,
            q: Qmp::connect(&sock, LINE),
        }
    }

    /// A target in the second namespace, `--incoming incoming` (a URI or defer).
    pub fn target(&self, d: &Path, tag: &str, incoming: &str) -> Vmm {
        let sock = d.join(format!("{tag}.qmp"));
        let qmp = format!("unix:{}", sock.display());
        let p = self.tern(1, &["--incoming", incoming, "--qmp", &qmp]);
        Vmm {
            p,
            q: Qmp::connect(&sock, LINE),
        }
    }
}
