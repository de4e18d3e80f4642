#!/usr/bin/env python3
"""Live migration of a guest with a network connection open, tern vs QEMU 10, between two hosts
on a switch: how long the client's TCP stream stalls, and whether anything is lost.

    bench/network.py                 # tern and QEMU, 3 runs each, interleaved (about 2 minutes)
    bench/network.py --quick         # tern only, one run: what CI runs; exits 1 if anything is wrong
    bench/network.py --runs 5 --vmm tern,qemu --rate 1gbit --out /tmp/b

Root (network namespaces). One command: it installs QEMU 10 if missing (scripts/install-qemu.sh)
and builds tern in release mode (--no-build skips that). Per run it makes a fresh topology with
scripts/net-hosts.sh (namespaces named from a new prefix): hosts a and b, each a bridge with the
guest's TAP (tap0) and a wire to a switch, and a client on the switch; every wire is shaped with
htb to --rate (1gbit) each way, and the bridges learn MACs with STP off, no forward delay and 300 s
ageing (so only the announce, or the guest's own traffic, can move the guest's entry). The guest is
the built-in one (`tern guest write`), 256 MiB, 1 vCPU, `tern.ip=10.0.0.10/24 tern.wss=64
tern.rate=16 tern.check=2 tern.hb=20`, MAC 52:54:00:12:34:56, the same ELF and command line for
both VMMs:

    tern: ip netns exec PA tern run --memory 256M --vcpus 1 --cmdline CMD
              --net tap=tap0,mac=MAC --qmp unix:S --serial file:LOG
          ip netns exec PB tern run --incoming tcp:10.0.0.2:4444 --net tap=tap0,mac=MAC ...
    QEMU: ip netns exec PA qemu-system-x86_64 -M microvm,acpi=off
              -global virtio-mmio.force-legacy=false -accel kvm -cpu host,-arch-capabilities
              -m 256M -smp 1 -kernel ELF -append CMD -netdev tap,id=n0,ifname=tap0,script=no,
              downscript=no,vhost=off -device virtio-net-device,netdev=n0,mac=MAC ...
          and the same in PB with -incoming tcp:10.0.0.2:4444

The source runs in host a; once its guest says `tern-guest net up` and beats, the target starts in
host b, listening on host b's bridge address, so that the migration stream crosses the same shaped
wires as the client's traffic, as between real hosts. The client (bench/netclient.py, in the client
namespace) first measures the round trip to the guest (ICMP, 10 pings), then reads the guest's
counter stream (TCP port 5002; --stream sink sends one to port 5001 instead) and checks every byte;
after 2 s ('before') the source migrates (QMP `migrate`, downtime-limit 300 ms, bandwidth
unlimited; `query-migrate` polled every 10 ms), the driver marks migrate-start and migrate-end in
the client's marks file, and the stream goes on for 3 s more ('after'). Meanwhile the switch's
forwarding entry for the guest's MAC is polled (`net-hosts.sh fdb`) until it points at host b's
port. After the migration completes, the target VMM announces the guest (RARP from its MAC on the
TAP, QEMU's schedule: 50 ms, then +100 ms, 5 rounds) and the guest sends its own gratuitous ARP.

Reported per run: migration status, total time and downtime (query-migrate's), RAM bytes sent,
the client's longest stall (the longest time between two receptions of data) and when it fell, its
MB/s before/during/after the migration, bytes lost (netclient resynchronises on the counter), the
RTT, where the switch forwarded the guest's MAC before and after, and the target's checks: the
heartbeat goes on, `tern-guest net ok` appears, no `FAIL` on either serial console. The goal:
tern's longest stall < 2 x its downtime + one RTT, and shorter than QEMU's. Prints a table, writes
results.json and table.txt in --out (with each run's serial logs and the client's JSON). A run is
bad if the migration did not complete, a guest printed FAIL, bytes were lost, no data came after
the migration (or the stream stopped for the last second), the target's heartbeat or net check did not show, or the switch never learned the
guest at host b; then the exit status is 1. The last line printed is the (last) tern run's
`stream: <bytes> bytes, <lost> lost, longest stall <ms> ms`.
"""
import argparse, json, os, shutil, signal, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import Proc, Qmp, TERN, ROOT, hb  # noqa: E402

GUEST = "tern.ip=10.0.0.10/24 tern.wss=64 tern.rate=16 tern.check=2 tern.hb=20"
MAC = "52:54:00:12:34:56"
GUEST_IP = "10.0.0.10"
TARGET = "tcp:10.0.0.2:4444"
NET_HOSTS = os.path.join(ROOT, "scripts", "net-hosts.sh")
NETCLIENT = os.path.join(ROOT, "bench", "netclient.py")


class Serial:
    """A serial console written to a file by a VMM: its lines, read as they come."""

    def __init__(self, path, proc):
        self.path, self.proc = path, proc
        self.lines, self._pos, self._part = [], 0, b""

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self._pos)
                data = f.read()
        except FileNotFoundError:
            return self.lines
        self._pos += len(data)
        data = self._part + data
        *done, self._part = data.split(b"\n")
        self.lines.extend(l.decode("utf-8", "replace").rstrip("\r") for l in done)
        return self.lines

    def wait_line(self, pred, timeout, start=0, what="a line"):
        end = time.monotonic() + timeout
        seen = start
        while True:
            self.poll()
            while seen < len(self.lines):
                l = self.lines[seen]; seen += 1
                if pred(l):
                    return l
            if self.proc.p.poll() is not None:
                self.poll()
                raise RuntimeError("waiting for %s: the VMM exited (%s); its output: %s; serial: %s" % (
                    what, self.proc.p.returncode, self.proc.lines[-5:], self.lines[-3:]))
            if time.monotonic() > end:
                raise RuntimeError("waiting for %s: timeout after %d s; serial: %s; VMM output: %s" % (
                    what, timeout, self.lines[-3:], self.proc.lines[-3:]))
            time.sleep(0.02)


def sh(*cmd):
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError("%s: %s" % (" ".join(cmd), (r.stderr or r.stdout).strip()[:300]))
    return r.stdout


def fdb(prefix):
    r = subprocess.run([NET_HOSTS, "fdb", prefix, MAC], capture_output=True, text=True)
    return r.stdout.strip() or "none"


def vmm_cmd(vmm, ns, elf, qmp, log, incoming=None):
    if vmm == "tern":
        cmd = [TERN, "run"]
        cmd += ["--incoming", incoming] if incoming else ["--memory", "256M", "--vcpus", "1", "--cmdline", GUEST]
        cmd += ["--net", "tap=tap0,mac=" + MAC, "--qmp", "unix:" + qmp, "--serial", "file:" + log]
    else:
        cmd = ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-global", "virtio-mmio.force-legacy=false",
               "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "256M", "-smp", "1",
               "-kernel", elf, "-append", GUEST,
               "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off",
               "-device", "virtio-net-device,netdev=n0,mac=" + MAC,
               "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
               "-serial", "file:" + log, "-qmp", "unix:%s,server=on,wait=off" % qmp]
        if incoming:
            cmd += ["-incoming", incoming]
    return ["ip", "netns", "exec", ns] + cmd


def mark(path, name):
    with open(path, "a") as f:
        f.write("%s %.6f\n" % (name, time.monotonic()))


def stop(proc, grace=5):
    if proc is None or proc.p.poll() is not None:
        return
    proc.p.send_signal(signal.SIGTERM)
    try:
        proc.p.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_one(vmm, elf, d, prefix, a):
    """One migration with the client streaming; returns the run's results (never raises)."""
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    sq, dq = os.path.join(d, "s.qmp"), os.path.join(d, "d.qmp")
    slog, dlog = os.path.join(d, "src.log"), os.path.join(d, "dst.log")
    marks, stopf, cjson = os.path.join(d, "marks"), os.path.join(d, "stop"), os.path.join(d, "client.json")
    pa, pb, pc = prefix + "a", prefix + "b", prefix + "c"
    res = {"vmm": vmm, "prefix": prefix, "rate": a.rate, "stream": a.stream, "problems": []}
    src = dst = client = None
    try:
        sh(NET_HOSTS, "up", prefix, a.rate)
        src = Proc(vmm_cmd(vmm, pa, elf, sq, slog))
        ss = Serial(slog, src)
        ss.wait_line(lambda l: l.startswith("tern-guest net up"), 120, what="tern-guest net up (source)")
        ss.wait_line(lambda l: hb(l) is not None, 30, what="a heartbeat (source)")
        dst = Proc(vmm_cmd(vmm, pb, elf, dq, dlog, incoming=TARGET))
        ds = Serial(dlog, dst)
        s, _t = Qmp(sq, 30), Qmp(dq, 30)  # the target's too: it is up and listening
        if vmm == "tern":
            s.ex("migrate-set-parameters", {"downtime-limit": 300, "max-bandwidth": 0})
        else:
            s.ex("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            # QEMU's max-bandwidth 0 means "no bandwidth" to some versions: give it a huge cap.
            s.ex("migrate-set-parameters", {"downtime-limit": 300, "max-bandwidth": 1 << 40})

        # The round trip through the shaped wires, on an idle network.
        r = subprocess.run(["ip", "netns", "exec", pc, sys.executable, NETCLIENT, "--ping", GUEST_IP,
                            "--count", "10", "--interval", "0.05", "--connect-timeout", "10"],
                           capture_output=True, text=True)
        rtt = [l for l in r.stdout.splitlines() if l.startswith("{")]
        rtts = json.loads(rtt[-1])["rtt_ms"] if rtt else []
        if not rtts:
            raise RuntimeError("the guest does not answer ping from the client: %s" % (r.stdout + r.stderr).strip()[-300:])
        res["rtt_ms"] = round(statistics.median(rtts), 3)
        res["fdb_before"] = fdb(prefix)

        port = "5002" if a.stream == "source" else "5001"
        client = Proc(["ip", "netns", "exec", pc, sys.executable, NETCLIENT, "--connect", GUEST_IP + ":" + port,
                       "--mode", a.stream, "--marks", marks, "--stop", stopf, "--out", cjson,
                       "--seconds", str(a.before + a.after + a.timeout + 60)])
        client.wait_line(lambda l: l.startswith("connected to"), 40)
        time.sleep(a.before)

        mark(marks, "migrate-start")
        t0 = time.monotonic()
        s.ex("migrate", {"uri": TARGET})
        while True:
            q = s.ex("query-migrate")
            if q.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() - t0 > a.timeout:
                s.ex("migrate_cancel")
                q = {"status": "timeout", "error-desc": "not completed after %d s" % a.timeout}
                break
            time.sleep(0.01)
        mark(marks, "migrate-end")
        t_end = time.monotonic()
        ram = q.get("ram", {})
        res.update(status=q.get("status"), why=q.get("error-desc"), total_ms=q.get("total-time"),
                   downtime_ms=q.get("downtime"), ram_bytes=ram.get("transferred"),
                   rounds=ram.get("dirty-sync-count"), driver_ms=round((t_end - t0) * 1000))

        if q.get("status") == "completed":
            # Where the switch sends the guest's frames, right after the switch-over.
            where = fdb(prefix)
            while where != "b" and time.monotonic() - t_end < min(a.after, 3.0):
                time.sleep(0.02)
                where = fdb(prefix)
            res["fdb_after"] = where
            if where == "b":
                res["fdb_moved_ms"] = round((time.monotonic() - t_end) * 1000)
        time.sleep(max(0.0, t_end + a.after - time.monotonic()))
        open(stopf, "w").close()
        client.p.wait(30)
        out = [l for l in client.lines if l.startswith("stream: ")]
        res["stream_line"] = out[-1] if out else None
        c = json.load(open(cjson))
        res.update(bytes=c["bytes"], lost=c["lost"], stall_ms=c["longest_stall_ms"],
                   switch_stall_ms=c.get("switch_stall_ms"),
                   stall_from_migrate_start_ms=c.get("longest_stall_from_migrate_start_ms"),
                   mbps_before=c.get("mbps_before"), mbps_during=c.get("mbps_during"),
                   mbps_after=c.get("mbps_after"), bytes_after=c.get("bytes_after"), client_end=c["end"],
                   tail_stall_ms=round((c["t_end"] - c["t_last_data"]) * 1000, 1) if c.get("t_last_data") else None,
                   stalls_over_50ms=c["stalls_over_50ms"][:20])

        if q.get("status") == "completed":
            last = max((hb(l)[0] for l in ss.poll() if hb(l)), default=0)
            try:
                ds.wait_line(lambda l: hb(l) is not None and hb(l)[0] > last, 30, what="a heartbeat at the target")
                res["dst_hb"] = "ok"
            except RuntimeError as e:
                res["dst_hb"] = str(e)[:200]
            try:
                res["dst_net_ok"] = ds.wait_line(lambda l: l.startswith("tern-guest net ok"), 30,
                                                 what="tern-guest net ok at the target")
            except RuntimeError as e:
                res["dst_net_ok"] = None
                res["problems"].append(str(e)[:200])
            res["guest_announces"] = sum(1 for l in ds.poll() if l.startswith("tern-guest net announce"))
    except Exception as e:  # a VMM that breaks is a result too, not the end of the benchmark
        res.setdefault("status", "error")
        res["problems"].append("error: %s" % str(e)[:400])
    finally:
        for p in (client, src, dst):
            stop(p)
        subprocess.run([NET_HOSTS, "down", prefix])
    for name, path in (("source", slog), ("target", dlog)):
        if os.path.exists(path):
            bad = [l for l in open(path, errors="replace") if "FAIL" in l]
            if bad:
                res["problems"].append("%s guest: %s" % (name, bad[0].strip()[:200]))
    check(res)
    return res


def check(res):
    p = res["problems"]
    if res.get("status") not in ("completed", "error"):
        p.append("migration %s: %s" % (res.get("status"), res.get("why")))
    if res.get("status") != "completed":
        return
    if res.get("lost"):
        p.append("the client lost %d bytes" % res["lost"])
    if "bytes_after" in res and not res["bytes_after"]:
        p.append("no data reached the client after the migration")
    elif (res.get("tail_stall_ms") or 0) > 1000:
        p.append("the stream stopped %.0f ms before the end and did not come back" % res["tail_stall_ms"])
    if res.get("client_end") not in (None, "stop-file"):
        p.append("the client's stream ended early: %s" % res["client_end"])
    if res.get("dst_hb") not in (None, "ok"):
        p.append("the target's heartbeat did not go on: %s" % res["dst_hb"])
    if "fdb_after" in res and res["fdb_after"] != "b":
        p.append("the switch still forwards the guest's MAC to %s, not host b" % res["fdb_after"])


def spread(rs, k, fmt="%.0f"):
    v = [r[k] for r in rs if r.get(k) is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return fmt % v[0]
    return (fmt + " (" + fmt + "-" + fmt + ")") % (statistics.median(v), min(v), max(v))


def med(rs, k):
    v = [r[k] for r in rs if r.get(k) is not None]
    return statistics.median(v) if v else None


def report(a, results, vmms):
    lines = []
    p = lambda s="": (print(s), lines.append(s))
    p()
    p("live migration with a TCP stream to a client (%s, guest -> client), %s wires, median (min-max) of %d run(s)" % (
        a.stream, a.rate, a.runs))
    hdr = "%-5s %-5s %-19s %-17s %-19s %-19s %-20s %-20s %-20s %-5s %-17s %s"
    p(hdr % ("vmm", "runs", "total ms", "downtime ms", "stall at switch ms", "longest stall ms",
             "MB/s before", "MB/s during", "MB/s after", "lost", "RTT ms", "fdb after"))
    for v in vmms:
        rs = [r for r in results if r["vmm"] == v]
        ok = [r for r in rs if r.get("status") == "completed"]
        p(hdr % (v, "%d/%d" % (len(ok), len(rs)), spread(ok, "total_ms"), spread(ok, "downtime_ms"),
                 spread(ok, "switch_stall_ms", "%.1f"),
                 spread(ok, "stall_ms", "%.1f"), spread(ok, "mbps_before", "%.1f"), spread(ok, "mbps_during", "%.1f"),
                 spread(ok, "mbps_after", "%.1f"), sum(r.get("lost") or 0 for r in ok),
                 spread(ok, "rtt_ms", "%.2f"), ",".join(r.get("fdb_after", "-") for r in ok) or "-"))
        for r in rs:
            for why in r["problems"]:
                p("      %s run %d: %s" % (v, r["run"], why))
    tern = [r for r in results if r["vmm"] == "tern" and r.get("status") == "completed"
            and r.get("switch_stall_ms") is not None and r.get("downtime_ms") is not None]
    if tern:
        p("(stall at switch: the longest gap in the stream overlapping the migration, up to 0.5 s after it;"
          " longest stall: over the whole stream, before the migration too)")
        for r in tern:
            r["goal_ms"] = round(2 * r["downtime_ms"] + r["rtt_ms"], 1)
        met = [r for r in tern if r["switch_stall_ms"] < r["goal_ms"]]
        p("goal: tern's stall at the switch < 2 x its downtime + 1 RTT: %s (met in %d of %d run(s): %s)" % (
            "met" if len(met) == len(tern) else "MISSED", len(met), len(tern),
            ", ".join("%.1f < %.1f" % (r["switch_stall_ms"], r["goal_ms"]) if r in met else
                      "%.1f >= %.1f" % (r["switch_stall_ms"], r["goal_ms"]) for r in tern)))
        qs = med([r for r in results if r["vmm"] == "qemu" and r.get("status") == "completed"
                  and r.get("switch_stall_ms") is not None], "switch_stall_ms")
        if qs is not None:
            ts = med(tern, "switch_stall_ms")
            p("goal: tern's stall at the switch shorter than QEMU's: %s (median %.1f ms vs %.1f ms)" % (
                "met" if ts < qs else "MISSED", ts, qs))
    out = os.path.join(a.out, "results.json")
    json.dump({"args": vars(a), "results": results}, open(out, "w"), indent=1)
    with open(os.path.join(a.out, "table.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("results: %s, table: %s" % (out, os.path.join(a.out, "table.txt")))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tern only, one run (CI): exit 1 if anything is wrong")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--vmm", default="tern,qemu", help="comma-separated: tern, qemu")
    ap.add_argument("--out", default="/tmp/tern-bench-network")
    ap.add_argument("--rate", default="1gbit", help="every wire's rate each way (tc syntax)")
    ap.add_argument("--stream", choices=("source", "sink"), default="source",
                    help="source: the guest sends (port 5002); sink: the client sends (port 5001)")
    ap.add_argument("--before", type=float, default=2.0, help="seconds of streaming before migrating")
    ap.add_argument("--after", type=float, default=3.0, help="seconds of streaming after the migration")
    ap.add_argument("--timeout", type=int, default=120, help="seconds before a migration is cancelled")
    ap.add_argument("--no-build", action="store_true", help="use target/release/tern as it is")
    a = ap.parse_args()
    if a.quick:
        a.vmm, a.runs = "tern", 1
    vmms = [v for v in a.vmm.split(",") if v]
    if not vmms or any(v not in ("tern", "qemu") for v in vmms):
        ap.error("--vmm: tern and/or qemu")
    if os.geteuid() != 0:
        sys.exit("bench/network.py: needs root (network namespaces, TAP devices)")
    for tool in ("ip", "tc", "bridge"):
        if not shutil.which(tool):
            sys.exit("bench/network.py: %s is missing (iproute2)" % tool)
    os.makedirs(a.out, exist_ok=True)
    if "qemu" in vmms:
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "install-qemu.sh")], check=True)
        print("qemu: %s" % subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                                          text=True).stdout.splitlines()[0])
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "tern"], cwd=ROOT, check=True)
    elf = os.path.join(a.out, "guest.elf")
    subprocess.run([TERN, "guest", "write", elf], check=True, stdout=subprocess.DEVNULL)
    results = []
    tag = "%03x" % (os.getpid() & 0xFFF)
    k = 0
    for i in range(a.runs):
        order = vmms[i % len(vmms):] + vmms[:i % len(vmms)]
        for vmm in order:
            d = os.path.join(a.out, "%s-%d" % (vmm, i))
            os.makedirs(d, exist_ok=True)
            prefix = "tn%s%d" % (tag, k)
            k += 1
            r = run_one(vmm, elf, d, prefix, a)
            r["run"] = i
            print(json.dumps({x: y for x, y in r.items() if x != "stalls_over_50ms"}), flush=True)
            results.append(r)
    report(a, results, vmms)
    bad = [r for r in results if r["problems"]]
    if bad:
        print("FAILED: %d of %d run(s) went wrong (see above): %s" % (
            len(bad), len(results), "; ".join("%s run %d: %s" % (r["vmm"], r["run"], r["problems"][0]) for r in bad)))
    if "tern" in vmms:
        last = [r for r in results if r["vmm"] == "tern"][-1]
        print(last.get("stream_line") or "stream: none (%s)" % (last["problems"][:1] or ["no client output"])[0])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
