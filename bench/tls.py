#!/usr/bin/env python3
"""The cost nobody publishes: what TLS does to a tern migration's throughput and CPU, single
stream and on parallel channels (multifd), over tcp on loopback.

    bench/tls.py                     # {plain, tls} x {single, multifd 2, multifd 4}, 3 runs each, interleaved
    bench/tls.py --quick             # plain-single and tls-single, one run each
    bench/tls.py --runs 5 --configs plain-single,tls-single --out /tmp/b --no-build

One command: it builds tern in release mode (--no-build skips that) and makes a PKI with
openssl(1) in --out/pki: a CA, a server certificate (DNS:target.tern, IP:127.0.0.1,
extendedKeyUsage serverAuth) and a client certificate (DNS:source.tern, clientAuth), X.509 v3,
EC P-256 keys, basicConstraints CA:FALSE, keyUsage digitalSignature, laid out in QEMU's file
names (pki/server: ca-cert.pem, server-cert.pem, server-key.pem; pki/client: ca-cert.pem,
client-cert.pem, client-key.pem).

The guest is the built-in one: `tern run --memory 2G --vcpus 1 --cmdline "tern.wss=1024
tern.rate=0 tern.check=0 tern.hb=100"`, 1 GiB of non-zero (incompressible) pages written once
at boot and not dirtied afterwards, so every configuration moves the same bytes in one round.
Each run boots a fresh source and a fresh target (`tern run --incoming defer --qmp unix:...`).
Both sides get the same settings over QMP:

    multifd N:  migrate-set-capabilities {"capabilities": [{"capability": "multifd", "state": true}]}
                migrate-set-parameters {"multifd-channels": N}
    tls:        object-add {"qom-type": "tls-creds-x509", "id": "tls0", "dir": pki/server or pki/client,
                            "endpoint": "server" or "client", "verify-peer": true}
                migrate-set-parameters {"tls-creds": "tls0"}  (+ "tls-authz": "source.tern" on the target)

The source checks the target's certificate against the URI's host (127.0.0.1, in its SAN); the
target checks the source's certificate and that it names source.tern: mutual authentication,
TLS 1.3. Then the target runs `migrate-incoming` tcp:127.0.0.1:PORT, the source `migrate`
(downtime-limit 300 ms, bandwidth unlimited), and `query-migrate` is polled every 20 ms until
the migration ends; a completed run also checks that the guest's heartbeat goes on at the target.
Runs are interleaved (run i does every configuration, in an order rotated by i) so that machine
noise hits all alike.

Warm host memory. The target allocates and zeroes its 2 GiB of RAM when the migration arrives (a
`ram-prefault` thread, and faults on the copy into RAM), so that cost falls inside the
measurement. On a host that is itself a VM returning freed memory to its hypervisor (virtio-balloon
free page reporting, as on the machine this was written on), memory freed by the previous run's
VMs is reported back within seconds, and touching it again costs the outer host's faults: the
target's zeroing then takes 3-4 s of system time instead of 0.4-0.6 s, at random from run to
run, more than the whole migration, and it swamps what TLS costs. So by default, just before each
`migrate`, the script touches 3 GiB of fresh memory (huge pages where THP allows) and frees it:
what the target allocates next is memory the host already backs, as on bare metal. That takes
seconds and lies outside the measurement. --cold skips it (to see the cost as it falls).

Measured per run: total time (query-migrate `total-time`, TLS handshakes included), bytes
(`ram.transferred`), throughput MB/s = ram.transferred / total-time (10^6 bytes), and the CPU
seconds the source and the target spent during the migration (every thread but the vCPUs, from
/proc, before `migrate` and when it completed) per GiB of ram.transferred, also split into user
and system time per side (encryption is user time; the kernel's socket copies and the zeroing of
the target's fresh RAM are system time). Note that the source's guest spins on its vCPU (about
70% of a core) all along: on a small host it competes with the migration's threads.

Prints a table: config, runs completed, total ms median (min-max), MB/s median (min-max), CPU
s/GiB of source + target median (min-max), the source's and the target's share (medians), their
user/system CPU seconds (medians), and for every tls row its ratio to the plain row of the same
channel count: throughput (tls / plain, below 1 = slower) and CPU per GiB (tls / plain, above 1 =
dearer). Failed runs are listed under
their row with query-migrate's error-desc and the last lines of the target's output. Writes
results.json and table.txt in --out (default /tmp/tern-bench-tls), and each run's source and
target output in --out/logs. Exit status 1 if any run did not complete.
"""
import argparse, json, os, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import Proc, Qmp, TERN, ROOT, free_port, cpu_seconds, cpu_split, hb, med, spread, warm_host_memory  # noqa: E402

GUEST = "tern.wss=1024 tern.rate=0 tern.check=0 tern.hb=100"
MEM = "2G"
# name -> (tls, data channels; 1 = a single stream, no multifd)
CONFIGS = {
    "plain-single": (False, 1),
    "plain-multifd2": (False, 2),
    "plain-multifd4": (False, 4),
    "tls-single": (True, 1),
    "tls-multifd2": (True, 2),
    "tls-multifd4": (True, 4),
}
QUICK = ("plain-single", "tls-single")
KEY = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
WARM = 3 << 30  # the target's RAM (2 GiB) and a margin


def sh(cwd, script):
    r = subprocess.run(["sh", "-c", script], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("%s: %s" % (script, r.stderr.strip()))


def pki(out):
    """A CA, the target's (server) and the source's (client) certificates, in QEMU's layout:
    the same openssl commands as crates/tern/tests/tls.rs."""
    p = os.path.join(out, "pki")
    os.makedirs(p, exist_ok=True)
    sh(p, "openssl req -x509 %s -keyout ca-key.pem -out ca-cert.pem -days 7 -subj '/CN=tern bench CA'" % KEY)
    for name, san, usage in (("server", "DNS:target.tern,IP:127.0.0.1", "serverAuth"),
                             ("client", "DNS:source.tern", "clientAuth")):
        with open(os.path.join(p, name + ".ext"), "w") as f:
            f.write("subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
                    "extendedKeyUsage=%s\n" % (san, usage))
        sh(p, "openssl req %s -keyout %s-key.pem -out %s.csr -subj '/CN=%s' && "
              "openssl x509 -req -in %s.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial "
              "-out %s-cert.pem -days 7 -extfile %s.ext" % (KEY, name, name, name, name, name, name))
        o = os.path.join(p, name)
        os.makedirs(o, exist_ok=True)
        for src, dst in (("ca-cert.pem", "ca-cert.pem"), (name + "-cert.pem", name + "-cert.pem"),
                         (name + "-key.pem", name + "-key.pem")):
            with open(os.path.join(p, src), "rb") as i, open(os.path.join(o, dst), "wb") as w:
                w.write(i.read())
        os.chmod(os.path.join(o, name + "-key.pem"), 0o600)
    return p


def setup(q, tls, channels, creds_dir, endpoint, authz=None):
    if channels > 1:
        q.ex("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
        q.ex("migrate-set-parameters", {"multifd-channels": channels})
    if tls:
        q.ex("object-add", {"qom-type": "tls-creds-x509", "id": "tls0", "dir": creds_dir,
                            "endpoint": endpoint, "verify-peer": True})
        params = {"tls-creds": "tls0"}
        if authz:
            params["tls-authz"] = authz
        q.ex("migrate-set-parameters", params)


def save_log(proc, path):
    with open(path, "w") as f:
        f.write("\n".join(proc.lines) + "\n")


def run_one(cfg, out, pkid, run, timeout, warm):
    tls, channels = CONFIGS[cfg]
    sq, dq = os.path.join(out, "s.qmp"), os.path.join(out, "d.qmp")
    for x in (sq, dq):
        if os.path.exists(x):
            os.unlink(x)
    uri = "tcp:127.0.0.1:%d" % free_port()
    res = {"config": cfg, "tls": tls, "channels": channels, "run": run}
    src = dst = None
    try:
        src = Proc([TERN, "run", "--memory", MEM, "--vcpus", "1", "--cmdline", GUEST, "--qmp", "unix:" + sq])
        dst = Proc([TERN, "run", "--incoming", "defer", "--qmp", "unix:" + dq])
        src.wait_line(lambda l: l == "tern-guest ready", 300)
        src.wait_line(lambda l: hb(l) is not None, 30)  # beating: past the fill
        s, t = Qmp(sq), Qmp(dq)
        setup(t, tls, channels, os.path.join(pkid, "server"), "server", "source.tern")
        t.ex("migrate-incoming", {"uri": uri})
        setup(s, tls, channels, os.path.join(pkid, "client"), "client")
        s.ex("migrate-set-parameters", {"downtime-limit": 300, "max-bandwidth": 0})
        time.sleep(0.5)  # let both settle: what follows is the migration's CPU
        if warm:
            res["warm_s"] = round(warm_host_memory(WARM), 2)
        c0 = (cpu_seconds(src.p.pid), cpu_seconds(dst.p.pid))
        us0 = (cpu_split(src.p.pid), cpu_split(dst.p.pid))
        t0 = time.monotonic()
        s.ex("migrate", {"uri": uri})
        while True:
            r = s.ex("query-migrate")
            if r.get("status") in ("completed", "failed", "cancelled"):
                c1 = (cpu_seconds(src.p.pid), cpu_seconds(dst.p.pid))
                us1 = (cpu_split(src.p.pid), cpu_split(dst.p.pid))
                break
            if time.monotonic() - t0 > timeout:
                s.ex("migrate_cancel")
                r = {"status": "timeout", "error-desc": "not completed after %d s: %s" % (timeout, r)}
                c1 = None
                break
            time.sleep(0.02)
        ram = r.get("ram", {})
        res.update(status=r.get("status"), why=r.get("error-desc"), total_ms=r.get("total-time"),
                   setup_ms=r.get("setup-time"), downtime_ms=r.get("downtime"),
                   transferred=ram.get("transferred"), normal_pages=ram.get("normal"),
                   multifd_bytes=ram.get("multifd-bytes"), rounds=ram.get("dirty-sync-count"))
        if r.get("status") == "completed" and ram.get("transferred") and r.get("total-time"):
            gib = ram["transferred"] / 2**30
            src_cpu, dst_cpu = c1[0] - c0[0], c1[1] - c0[1]
            res.update(mbps=round(ram["transferred"] / r["total-time"] / 1000, 1),
                       src_cpu_s=round(src_cpu, 2), dst_cpu_s=round(dst_cpu, 2),
                       cpu_s_per_gib=round((src_cpu + dst_cpu) / gib, 3),
                       src_cpu_s_per_gib=round(src_cpu / gib, 3), dst_cpu_s_per_gib=round(dst_cpu / gib, 3),
                       src_user_s=round(us1[0][0] - us0[0][0], 2), src_sys_s=round(us1[0][1] - us0[0][1], 2),
                       dst_user_s=round(us1[1][0] - us0[1][0], 2), dst_sys_s=round(us1[1][1] - us0[1][1], 2))
            # The guest goes on at the target: a heartbeat past the source's last.
            last = max((hb(l)[0] for l in src.lines if hb(l)), default=0)
            dst.wait_line(lambda l: hb(l) is not None and hb(l)[0] > last, 30)
            res["dst_continues"] = True
        elif r.get("status") != "completed":
            time.sleep(0.5)  # the target's say on it
            res["dst_tail"] = dst.lines[-8:]
        return res
    except Exception as e:  # a run that breaks is a result too, not the end of the benchmark
        res.update(status="error", why=str(e)[:400])
        if dst is not None:
            res["dst_tail"] = dst.lines[-8:]
        return res
    finally:
        for p, name in ((src, "src"), (dst, "dst")):
            if p is not None:
                p.kill()
                save_log(p, os.path.join(out, "logs", "%s-%d-%s.log" % (cfg, run, name)))
        for x in (sq, dq):
            if os.path.exists(x):
                os.unlink(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="plain-single and tls-single, one run")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="a subset of: " + ",".join(CONFIGS))
    ap.add_argument("--timeout", type=int, default=120, help="seconds for one migration")
    ap.add_argument("--out", default="/tmp/tern-bench-tls")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--cold", action="store_true",
                    help="do not warm the host's free memory before each migration (see above)")
    a = ap.parse_args()
    if a.quick:
        a.configs, a.runs = ",".join(QUICK), 1
    configs = a.configs.split(",")
    for c in configs:
        if c not in CONFIGS:
            ap.error("unknown config %r (known: %s)" % (c, ", ".join(CONFIGS)))
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "tern"], cwd=ROOT, check=True)
    os.makedirs(os.path.join(a.out, "logs"), exist_ok=True)
    pkid = pki(a.out)
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    results = []
    for i in range(a.runs):
        order = configs[i % len(configs):] + configs[:i % len(configs)]
        for cfg in order:
            r = run_one(cfg, a.out, pkid, i, a.timeout, not a.cold)
            print(json.dumps(r), flush=True)
            results.append(r)
    return report(a, configs, results, rev)


def report(a, configs, results, rev):
    lines = []
    p = lambda s="": (print(s), lines.append(s))
    p()
    p("tern migration, plain vs TLS 1.3 (mutual auth, EC P-256), tcp on loopback; guest %s, 1 GiB of"
      " non-zero pages, not dirtied; median (min-max) of %d run(s); tern %s; host memory %s" % (
          MEM, a.runs, rev, "cold (--cold)" if a.cold else "warmed before each migration"))
    p("%-15s %-5s %-19s %-19s %-19s %-9s %-9s %-21s %s" % ("config", "runs", "total ms", "MB/s",
      "CPU s/GiB src+dst", "src s/GiB", "dst s/GiB", "user/sys s: src, dst", "vs plain (throughput, CPU/GiB)"))
    summary = []
    for cfg in configs:
        ok = [r for r in results if r["config"] == cfg and r.get("status") == "completed" and r.get("mbps")]
        summary.append({"config": cfg, "completed": len(ok), "runs": len([r for r in results if r["config"] == cfg]),
                        "total_ms": med(ok, "total_ms"), "mbps": med(ok, "mbps"),
                        "cpu_s_per_gib": med(ok, "cpu_s_per_gib"),
                        "src_cpu_s_per_gib": med(ok, "src_cpu_s_per_gib"),
                        "dst_cpu_s_per_gib": med(ok, "dst_cpu_s_per_gib")})
    for row in summary:
        cfg = row["config"]
        tls, ch = CONFIGS[cfg]
        rs = [r for r in results if r["config"] == cfg]
        ok = [r for r in rs if r.get("status") == "completed" and r.get("mbps")]
        ratio = ""
        if tls:
            plain = next((x for x in summary if CONFIGS[x["config"]] == (False, ch)), None)
            if plain and plain["mbps"] and row["mbps"]:
                row["throughput_ratio"] = round(row["mbps"] / plain["mbps"], 3)
                row["cpu_ratio"] = (round(row["cpu_s_per_gib"] / plain["cpu_s_per_gib"], 3)
                                    if plain["cpu_s_per_gib"] else None)
                ratio = "%.2fx, %s" % (row["throughput_ratio"],
                                       "%.2fx" % row["cpu_ratio"] if row["cpu_ratio"] is not None else "-")
            else:
                ratio = "- (no plain %s)" % ("single" if ch == 1 else "multifd%d" % ch)
        f = lambda k: "%.3f" % row[k] if row[k] is not None else "-"
        g = lambda k: "%.2f" % med(ok, k) if med(ok, k) is not None else "-"
        us = "%s/%s, %s/%s" % (g("src_user_s"), g("src_sys_s"), g("dst_user_s"), g("dst_sys_s"))
        p("%-15s %-5s %-19s %-19s %-19s %-9s %-9s %-21s %s" % (
            cfg, "%d/%d" % (len(ok), len(rs)), spread(ok, "total_ms"), spread(ok, "mbps"),
            spread(ok, "cpu_s_per_gib", "%.3f"), f("src_cpu_s_per_gib"), f("dst_cpu_s_per_gib"), us, ratio))
        for r in rs:
            if r.get("status") != "completed":
                p("    run %d: %s: %s" % (r["run"], r.get("status"), r.get("why")))
                for l in r.get("dst_tail") or []:
                    p("        target: %s" % l)
    sent = [r["transferred"] for r in results if r.get("transferred") and r.get("status") == "completed"]
    if sent:
        p("bytes moved (ram.transferred): %.1f MB median (%.1f-%.1f) over all completed runs" % (
            statistics.median(sent) / 1e6, min(sent) / 1e6, max(sent) / 1e6))
    out = os.path.join(a.out, "results.json")
    json.dump({"args": vars(a), "tern": rev, "guest": GUEST, "memory": MEM, "results": results,
               "summary": summary}, open(out, "w"), indent=1)
    with open(os.path.join(a.out, "table.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    p("results: %s, table: %s, logs: %s" % (out, os.path.join(a.out, "table.txt"), os.path.join(a.out, "logs")))
    return 0 if all(r.get("status") == "completed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
