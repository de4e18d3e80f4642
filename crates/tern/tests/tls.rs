//! TLS on migration channels, through real KVM: mutual authentication completes a migration
//! (the guest goes on, its self-check passes, RAM digests match), every kind of bad client is
//! refused with its reason on both sides while the source runs on, and what crosses the wire
//! holds nothing of the guest's memory in clear. Certificates come from openssl(1), made per test.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::json;

/// A word the guest's command line carries into its memory (the boot page), and that a
/// migration in clear therefore sends.
const CANARY: &str = "tern-tls-canary-7Hq3Zp9Wm2Xk";

fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a second CA, and certificates: `server` (target.tern, 127.0.0.1), `client`
/// (source.tern), `intruder` (our CA, another name) and `rogue` (source.tern from the other CA),
/// each in QEMU's layout in its own directory.
fn pki(d: &Path) -> PathBuf {
    let p = d.join("pki");
    std::fs::create_dir_all(&p).unwrap();
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    sh(
        &p,
        &format!(
            "openssl req -x509 {key} -keyout ca-key.pem -out ca-cert.pem -days 2 -subj '/CN=tern test CA' 2>/dev/null &&
             openssl req -x509 {key} -keyout rogue-ca-key.pem -out rogue-ca-cert.pem -days 2 -subj '/CN=rogue CA' 2>/dev/null"
        ),
    );
    let issue = |name: &str, ca: &str, san: &str, usage: &str| {
        std::fs::write(
            p.join(format!("{name}.ext")),
            format!(
                "subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage={usage}\n"
            ),
        )
        .unwrap();
        sh(
            &p,
            &format!(
                "openssl req {key} -keyout {name}-key.pem -out {name}.csr -subj '/CN={name}' 2>/dev/null &&
                 openssl x509 -req -in {name}.csr -CA {ca}-cert.pem -CAkey {ca}-key.pem -CAcreateserial \
                   -out {name}-cert.pem -days 2 -extfile {name}.ext 2>/dev/null"
            ),
        );
    };
    issue("server", "ca", "DNS:target.tern,IP:127.0.0.1", "serverAuth");
    issue("client", "ca", "DNS:source.tern", "clientAuth");
    issue("intruder", "ca", "DNS:intruder.tern", "clientAuth");
    issue("rogue", "rogue-ca", "DNS:source.tern", "clientAuth");
    // QEMU's file names, one directory per identity.
    for (dir, who, role) in [
        ("server", Some("server"), "server"),
        ("client", Some("client"), "client"),
        ("intruder", Some("intruder"), "client"),
        ("rogue", Some("rogue"), "client"),
        ("nocert", None, "client"),
    ] {
        let o = p.join(dir);
        std::fs::create_dir_all(&o).unwrap();
        std::fs::copy(p.join("ca-cert.pem"), o.join("ca-cert.pem")).unwrap();
        if let Some(w) = who {
            std::fs::copy(
                p.join(format!("{w}-cert.pem")),
                o.join(format!("{role}-cert.pem")),
            )
            .unwrap();
            std::fs::copy(
                p.join(format!("{w}-key.pem")),
                o.join(format!("{role}-key.pem")),
            )
            .unwrap();
        }
    }
    p
}

/// A TCP relay that records what the source sends: what a capture of the wire would see.
struct Tap {
    port: u16,
    seen: Arc<Mutex<Vec<u8>>>,
}

fn relay(to: u16) -> Tap {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut a) = c else { return };
            let Ok(mut b) = TcpStream::connect(("127.0.0.1", to)) else {
                return;
            };
            let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            let rec = rec.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = a.read(&mut buf) {
                    if n == 0 || b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    rec.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                let _ = b.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut b2, &mut a2);
                let _ = a2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Tap { port, seen }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A target waiting for `migrate-incoming` (`defer`), with these `--object`s, its log in
/// `d/{tag}.log`.
fn deferred(d: &Path, tag: &str, objects: &[String]) -> Vmm {
    let sock = d.join(format!("{tag}.qmp"));
    let log = std::fs::File::create(d.join(format!("{tag}.log"))).unwrap();
    let mut cmd = Command::new(tern_bin());
    cmd.args(["run", "--incoming", "defer", "--qmp"])
        .arg(format!("unix:{}", sock.display()));
    for o in objects {
        cmd.arg("--object").arg(o);
    }
    let p = Proc::spawn_with_stderr(&mut cmd, Stdio::from(log));
    let q = Qmp::connect(&sock, LINE);
    Vmm { p, q }
}

/// Starts listening on a free port of 127.0.0.1; returns it.
fn listen(q: &mut Qmp) -> u16 {
    let port = free_port();
    q.ok(
        "migrate-incoming",
        json!({"uri": format!("tcp:127.0.0.1:{port}")}),
    );
    port
}

/// The server's credentials as an `--object`.
fn server_object(pki: &Path, id: &str) -> String {
    format!(
        "tls-creds-x509,id={id},dir={},endpoint=server",
        pki.join("server").display()
    )
}

/// A target with the server's credentials from the command line (`tls0`), listening on a free
/// port of 127.0.0.1 (returned); `tls-authz` set if `authz` is.
fn tls_target(d: &Path, pki: &Path, tag: &str, authz: Option<&str>) -> (Vmm, u16) {
    tls_target_with(d, pki, tag, authz, &[])
}

/// [`tls_target`] with capabilities set before it listens.
fn tls_target_with(
    d: &Path,
    pki: &Path,
    tag: &str,
    authz: Option<&str>,
    caps: &[&str],
) -> (Vmm, u16) {
    let Vmm { p, mut q } = deferred(d, tag, &[server_object(pki, "tls0")]);
    let mut params = json!({"tls-creds": "tls0"});
    if let Some(a) = authz {
        params["tls-authz"] = json!(a);
    }
    q.ok("migrate-set-parameters", params);
    if !caps.is_empty() {
        let list: Vec<_> = caps
            .iter()
            .map(|c| json!({"capability": c, "state": true}))
            .collect();
        q.ok("migrate-set-capabilities", json!({"capabilities": list}));
    }
    let port = listen(&mut q);
    (Vmm { p, q }, port)
}

fn client_creds(q: &mut Qmp, pki: &Path, id: &str, dir: &str) {
    q.ok(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": id, "endpoint": "client",
               "dir": pki.join(dir).display().to_string()}),
    );
}

#[test]
fn a_migration_with_mutual_tls_completes_and_nothing_of_the_guest_crosses_in_clear() {
    let _x = exclusive();
    let d = dir("tls-ok");
    let pki = pki(&d);
    let cmdline = format!("tern.wss=128 tern.rate=32 tern.check=1 {CANARY}");
    let mut src = source(&d, "src", "512M", &cmdline);
    src.q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "x-tern-ram-digest", "state": true}]}),
    );
    // Control: in clear, the relay sees the canary (so the check below can fail).
    {
        let mut plain = deferred(&d, "plain", &[]);
        let port = listen(&mut plain.q);
        let tap = relay(port);
        src.q.ok(
            "migrate",
            json!({"uri": format!("tcp:127.0.0.1:{}", tap.port)}),
        );
        completes(&mut src, &mut plain.p, Duration::from_secs(120), "in clear");
        assert!(
            contains(&tap.seen.lock().unwrap(), CANARY.as_bytes()),
            "a migration in clear carries the guest's memory as it is"
        );
        // The guest lives on in the clear target, which becomes the source of the TLS move.
        quit(src);
        src = plain;
        src.q.ok(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "x-tern-ram-digest", "state": true}]}),
        );
    }
    let (mut dst, port) = tls_target(&d, &pki, "dst", Some("source.tern"));
    client_creds(&mut src.q, &pki, "tls0", "client");
    src.q
        .ok("migrate-set-parameters", json!({"tls-creds": "tls0"}));
    let tap = relay(port);
    src.q.ok(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{}", tap.port)}),
    );
    // The target's certificate names 127.0.0.1: the URI's host is checked by default.
    moved_whole(&mut src, &mut dst, Duration::from_secs(120), "over TLS");
    let seen = tap.seen.lock().unwrap().clone();
    assert!(seen.len() > 1 << 20, "the relay saw {} bytes", seen.len());
    assert!(
        !contains(&seen, CANARY.as_bytes()),
        "the guest's memory crossed the wire in clear"
    );
    assert!(
        !contains(&seen, b"tern.wss="),
        "the guest's command line crossed the wire in clear"
    );
    quit(dst);
}

#[test]
fn sources_without_a_good_certificate_are_refused_with_the_reason_and_run_on() {
    let _x = exclusive();
    let d = dir("tls-refused");
    let pki = pki(&d);
    let mut src = source(&d, "src", "256M", "tern.wss=64 tern.rate=16 tern.check=1");
    let (mut dst, port) = tls_target(&d, &pki, "dst", Some("source.tern"));
    let uri = format!("tcp:127.0.0.1:{port}");
    for (id, dir, source_says, target_says) in [
        (
            "none",
            "nocert",
            "refused us",
            "the source presented no certificate",
        ),
        ("rogue", "rogue", "refused us", "not signed by our CA"),
        (
            "intruder",
            "intruder",
            "refused us",
            "the source's certificate is not for 'source.tern' (tls-authz)",
        ),
    ] {
        client_creds(&mut src.q, &pki, id, dir);
        src.q.ok("migrate-set-parameters", json!({"tls-creds": id}));
        src.q.ok("migrate", json!({"uri": uri}));
        let r = wait_migration(&mut src.q, LINE);
        assert_eq!(r["status"], "failed", "{id}: {r}");
        let why = r["error-desc"].as_str().unwrap_or_default();
        assert!(why.contains(source_says), "{id}: {why}");
        source_still_fine(&mut src.p, &mut src.q);
        let log = std::fs::read_to_string(d.join("dst.log")).unwrap();
        assert!(log.contains(target_says), "{id}: the target's log: {log}");
    }
    // A source in clear does not get in either.
    src.q.ok("migrate-set-parameters", json!({"tls-creds": ""}));
    src.q.ok("migrate", json!({"uri": uri}));
    let r = wait_migration(&mut src.q, LINE);
    assert_eq!(r["status"], "failed", "in clear: {r}");
    source_still_fine(&mut src.p, &mut src.q);
    // The target still waits, and takes the right source.
    assert_eq!(dst.q.ok("query-status", json!({}))["status"], "inmigrate");
    client_creds(&mut src.q, &pki, "good", "client");
    src.q.ok(
        "migrate-set-parameters",
        json!({"tls-creds": "good", "tls-hostname": "target.tern"}),
    );
    src.q.ok("migrate", json!({"uri": uri}));
    completes(
        &mut src,
        &mut dst.p,
        Duration::from_secs(120),
        "the right source",
    );
    quit(dst);
}

#[test]
fn tls_settings_are_checked_when_given() {
    let d = dir("tls-bad");
    let pki = pki(&d);
    let Vmm { p, mut q } = deferred(&d, "q", &[]);
    let e = q.err("migrate-set-parameters", json!({"tls-creds": "nope"}));
    assert!(e.contains("No TLS credentials with id 'nope'"), "{e}");
    let e = q.err(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "x", "endpoint": "server",
               "dir": pki.join("nocert").display().to_string()}),
    );
    assert!(e.contains("server-cert.pem"), "{e}");
    client_creds(&mut q, &pki, "c", "client");
    let e = q.err(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "c", "endpoint": "client",
               "dir": pki.join("client").display().to_string()}),
    );
    assert!(e.contains("exists already"), "{e}");
    q.ok("migrate-set-parameters", json!({"tls-creds": "c"}));
    let e = q.err("object-del", json!({"id": "c"}));
    assert!(e.contains("in use"), "{e}");
    // A bad name is refused when given, not at every connection.
    let e = q.err(
        "migrate-set-parameters",
        json!({"tls-hostname": "not a name"}),
    );
    assert!(e.contains("tls-hostname"), "{e}");
    // Client credentials on a target: refused when the migration is started.
    let e = q.err("migrate-incoming", json!({"uri": "tcp:127.0.0.1:1"}));
    assert!(
        e.contains("the target of a migration needs endpoint=server"),
        "{e}"
    );
    let out = Command::new(tern_bin())
        .args(["run", "--serial", "none", "--object"])
        .arg(format!(
            "tls-creds-x509,id=t,dir={},endpoint=server",
            d.join("missing").display()
        ))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a directory"), "{err}");
    quit(Vmm { p, q });
}

/// Every connection of a migration is secured: the data channels of multifd, then (the guest
/// moving on) postcopy's urgent connection, each refused to a source in clear.
#[test]
fn parallel_channels_and_postcopy_preempt_run_over_tls() {
    let _x = exclusive();
    let d = dir("tls-channels");
    let pki = pki(&d);
    let mut a = source(&d, "a", "512M", "tern.wss=256 tern.rate=256 tern.check=1");
    // b: a target with both credentials (it will be a source next).
    let (mut b, port) = {
        let client = format!(
            "tls-creds-x509,id=cli,dir={},endpoint=client",
            pki.join("client").display()
        );
        let Vmm { p, mut q } = deferred(&d, "b", &[server_object(&pki, "srv"), client]);
        q.ok(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": true}]}),
        );
        q.ok(
            "migrate-set-parameters",
            json!({"tls-creds": "srv", "multifd-channels": 2}),
        );
        let port = listen(&mut q);
        (Vmm { p, q }, port)
    };
    client_creds(&mut a.q, &pki, "cli", "client");
    a.q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": true}]}),
    );
    a.q.ok(
        "migrate-set-parameters",
        json!({"tls-creds": "cli", "multifd-channels": 2}),
    );
    a.q.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let r = wait_migration(&mut a.q, Duration::from_secs(120));
    assert_eq!(r["status"], "completed", "multifd over TLS: {r}");
    let n = paused_last_hb(&mut a.p);
    continues_on(&mut b.p, n);
    let rb = wait_migration(&mut b.q, LINE);
    assert_eq!(rb["status"], "completed", "{rb}");
    quit(a);

    // b to c by postcopy with preempt, over TLS; c also requires tls-authz.
    let (mut c, port) = tls_target_with(
        &d,
        &pki,
        "c",
        Some("source.tern"),
        &["postcopy-ram", "postcopy-preempt"],
    );
    let uri = format!("tcp:127.0.0.1:{port}");
    b.q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "multifd", "state": false},
                                {"capability": "postcopy-ram", "state": true},
                                {"capability": "postcopy-preempt", "state": true}]}),
    );
    b.q.ok(
        "migrate-set-parameters",
        json!({"tls-creds": "cli", "max-bandwidth": 32 << 20}),
    );
    b.q.ok("migrate", json!({"uri": uri}));
    wait_status(&mut b.q, "active");
    b.q.ok("migrate-start-postcopy", json!({}));
    let r = wait_until(&mut b.q, "postcopy over TLS", |r| {
        !matches!(
            r["status"].as_str(),
            Some("active" | "setup" | "postcopy-active")
        )
    });
    assert_eq!(r["status"], "completed", "postcopy over TLS: {r}");
    let n = paused_last_hb(&mut b.p);
    continues_on(&mut c.p, n);
    let rc = c.q.ok("query-migrate", json!({}));
    assert!(
        rc["ram"]["postcopy-requests"].as_u64().unwrap_or(0) > 0,
        "the guest asked for pages over the urgent connection: {rc}"
    );
    quit(c);
}
