#!/usr/bin/env python3
"""Precopy live migration, tern vs QEMU 10, side by side on the same guest, over tcp on loopback.

    bench/compare.py                 # the full matrix (about an hour on this 2-core machine)
    bench/compare.py --quick         # one point, one run (1 GiB, 64 MiB/s): what CI runs
    bench/compare.py --mem 1G --rates 256 --runs 5 --out /tmp/b

One command: it installs QEMU 10 from bookworm-backports if missing (scripts/install-qemu.sh) and
builds tern in release mode. The guest is the ELF `tern guest write` gives; QEMU boots it with
`-accel kvm -cpu host,-arch-capabilities -kernel ELF -append CMDLINE`, tern with the same command
line. Per point (guest RAM, dirty rate): working set half the RAM, heartbeat every 10 ms, 1 vCPU
(the guest runs its work on the boot CPU under QEMU, which starts no APs for it). Each run boots a
fresh source and target of every VMM, in an order that rotates per run so that machine noise
hits all alike; QEMU gets max-bandwidth unlimited and downtime-limit 300 ms, once single stream
and once with multifd and 4 channels; tern gets the same limit, single stream and with 2 and 4
channels (`tern-multifd2`, `tern-multifd4`). A migration that has not
converged after --timeout seconds (120) is cancelled and shown as such, with why (the dirty rate
and bandwidth last reported). Downtime is reported both as each VMM measures it and as the guest
felt it (the longest stall its heartbeat saw around the switch-over). A plain loopback socket copy
of the same number of bytes (`tern x-socket-copy`) gives the machine's limit; tern's throughput on
non-zero pages (bytes sent during precopy rounds / round time, from its timeline) is shown as a
fraction of it. CPU seconds per GiB moved: the source's and the target's CPU time during the
migration, all threads but the vCPUs, per GiB of guest pages with data moved. Every tern run keeps its timeline (JSON and
SVG) in --out.

Compression (`--compress zstd|lz4`, with `--entropy` to make the guest's pages compressible:
`tern.entropy=`): every tern configuration compresses (tern compresses with or without channels);
QEMU compresses only with multifd, so `qemu-multifd` gets the same compression (QEMU has no lz4:
it runs without compression then, and says so). `--link 1gbit` runs the source and the target in
two network namespaces joined by a veth pair shaped with htb to that rate (both directions), the
point where compression can pay; namespaces are created and removed by the script (root).

Prints a table (tern vs QEMU's best, with ratios and the goals) and writes results.json in --out.
"""
import argparse, json, mmap, os, socket, statistics, subprocess, sys, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TERN_BIN: another build to measure (an A/B of two commits), the release build by default.
TERN = os.environ.get("TERN_BIN") or os.path.join(ROOT, "target", "release", "tern")
VMMS = ("tern", "tern-multifd2", "tern-multifd4", "qemu", "qemu-multifd")
TERNS = ("tern", "tern-multifd2", "tern-multifd4")
QEMUS = ("qemu", "qemu-multifd")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _ticks(stat):
    """(user, system) clock ticks of a /proc stat line."""
    f = stat[stat.rindex(")") + 2:].split()
    return int(f[11]), int(f[12])


def cpu_split(pid):
    """(user, system) CPU seconds of a VMM process except its vCPU threads (the guest's own
    work): what the migration costs the host. The process's totals count threads that have
    exited too."""
    try:
        u, s = _ticks(open("/proc/%d/stat" % pid).read())
        for t in os.listdir("/proc/%d/task" % pid):
            try:
                stat = open("/proc/%d/task/%s/stat" % (pid, t)).read()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            if (comm.startswith("vcpu") and comm[4:].isdigit()) or (comm.startswith("CPU ") and comm.endswith("/KVM")):
                tu, ts = _ticks(stat)
                u, s = u - tu, s - ts
    except OSError:
        return 0, 0
    return u / CLK_TCK, s / CLK_TCK


def cpu_seconds(pid):
    """[`cpu_split`] summed."""
    return sum(cpu_split(pid))


def warm_host_memory(n):
    """Touch n bytes of fresh anonymous memory (huge pages where THP allows) and free them, and
    return the seconds it took. On a host that is itself a VM giving freed memory back to its
    hypervisor (free page reporting, DAMON reclaim), a VMM's first touch of memory freed by the
    previous run costs the outer host's faults, at random and sometimes more than the migration
    measured; after this, what the next VMM allocates is memory the host already backs, as on
    bare metal. Benchmarks call it just before they start a migration."""
    t = time.monotonic()
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass
    for off in range(0, n, 4096):
        m[off] = 1
    m.close()
    return time.monotonic() - t


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


class Proc:
    def __init__(self, cmd):
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for l in self.p.stdout:
            self.lines.append(l.rstrip())

    def wait_line(self, pred, timeout, start=0):
        end = time.monotonic() + timeout
        seen = start
        while time.monotonic() < end:
            while seen < len(self.lines):
                l = self.lines[seen]; seen += 1
                if pred(l):
                    return l
            if self.p.poll() is not None and seen >= len(self.lines):
                raise RuntimeError("process exited: %s" % self.lines[-5:])
            time.sleep(0.01)
        raise RuntimeError("timeout; last lines: %s" % self.lines[-5:])

    def kill(self):
        self.p.kill(); self.p.wait()


class Qmp:
    def __init__(self, path, timeout=60):
        end = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX); self.s.connect(path); break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.ex("qmp_capabilities")

    def ex(self, cmd, args=None):
        self.f.write(json.dumps({"execute": cmd, "arguments": args or {}}) + "\n"); self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                continue
            if "error" in r:
                raise RuntimeError("%s: %s" % (cmd, r["error"]))
            return r["return"]


def hb(l):
    if not l.startswith("tern-guest hb "):
        return None
    n, g = l[len("tern-guest hb "):].split(" gap_us=")
    return int(n), int(g)


def mib(mem):
    return int(float(mem[:-1]) * (1024 if mem.endswith("G") else 1))


NS = ("ternbench-src", "ternbench-dst")
NS_ADDR = ("10.77.0.1", "10.77.0.2")


def sh(cmd, check=True):
    return subprocess.run(cmd, shell=True, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def netns_down():
    for ns in NS:
        sh("ip netns del %s" % ns, check=False)


def netns_up(rate):
    """Two namespaces, a veth "wire" between them shaped to `rate` (tc htb syntax: 1gbit)."""
    netns_down()
    for ns in NS:
        sh("ip netns add %s" % ns)
        sh("ip -n %s link set lo up" % ns)
    sh("ip link add tbsrc netns %s type veth peer name tbdst netns %s" % NS)
    for ns, dev, addr in zip(NS, ("tbsrc", "tbdst"), NS_ADDR):
        sh("ip -n %s addr add %s/24 dev %s" % (ns, addr, dev))
        sh("ip -n %s link set %s up" % (ns, dev))
        sh("tc -n %s qdisc add dev %s root handle 1: htb default 10" % (ns, dev))
        sh("tc -n %s class add dev %s parent 1: classid 1:10 htb rate %s ceil %s" % (ns, dev, rate, rate))


def in_ns(i, cmd, link):
    return (["ip", "netns", "exec", NS[i]] + cmd) if link else cmd


def run_one(vmm, elf, mem, rate, d, tag, timeout, entropy=100, compress=None, link=None):
    wss = mib(mem) // 2
    # The guest checks its working set at 256 MiB/s at most, so that checking does not crowd out
    # the dirtying on big guests.
    check = max(2, wss // 256)
    cmdline = "tern.wss=%d tern.rate=%d tern.hb=10 tern.check=%d" % (wss, rate, check)
    if entropy != 100:
        cmdline += " tern.entropy=%d" % entropy
    sq, dq = os.path.join(d, "s.qmp"), os.path.join(d, "d.qmp")
    uri = "tcp:%s:%d" % (NS_ADDR[1] if link else "127.0.0.1", free_port())
    if vmm.startswith("tern"):
        src = Proc(in_ns(0, [TERN, "run", "--memory", mem, "--vcpus", "1", "--cmdline", cmdline, "--qmp", "unix:" + sq], link))
        dst = Proc(in_ns(1, [TERN, "run", "--incoming", uri, "--qmp", "unix:" + dq], link))
    else:
        base = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", mem,
                "-smp", "1", "-display", "none", "-serial", "stdio", "-monitor", "none",
                "-kernel", elf, "-append", cmdline]
        src = Proc(in_ns(0, base + ["-qmp", "unix:%s,server=on,wait=off" % sq], link))
        dst = Proc(in_ns(1, base + ["-qmp", "unix:%s,server=on,wait=off" % dq, "-incoming", "defer"], link))
    res = {"vmm": vmm, "mem": mem, "rate": rate, "wss_mib": wss, "entropy": entropy,
           "compress": compress or "none", "link": link or "loopback"}
    try:
        src.wait_line(lambda l: l == "tern-guest ready", 300)
        time.sleep(3)  # dirtying at a steady state
        s, t = Qmp(sq), Qmp(dq)
        timeline = None
        if vmm.startswith("tern"):
            timeline = os.path.join(d, "timeline-%s-%s.json" % (vmm, tag))
            s.ex("migrate-set-parameters", {"downtime-limit": 300, "max-bandwidth": 0,
                                            "x-tern-timeline": timeline})
            if vmm.startswith("tern-multifd"):
                s.ex("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
                s.ex("migrate-set-parameters", {"multifd-channels": int(vmm[len("tern-multifd"):])})
            if compress:
                s.ex("migrate-set-parameters", {"multifd-compression": compress})
        else:
            caps = [{"capability": "events", "state": True}]
            if vmm == "qemu-multifd":
                caps.append({"capability": "multifd", "state": True})
            for q in (s, t):
                q.ex("migrate-set-capabilities", {"capabilities": caps})
                if vmm == "qemu-multifd":
                    q.ex("migrate-set-parameters", {"multifd-channels": 4})
                    if compress == "zstd":
                        q.ex("migrate-set-parameters", {"multifd-compression": "zstd"})
            # QEMU's max-bandwidth 0 means "no bandwidth" to some versions: give it a huge cap.
            s.ex("migrate-set-parameters", {"max-bandwidth": 1 << 40, "downtime-limit": 300})
            t.ex("migrate-incoming", {"uri": uri})
        n_src_lines = len(src.lines)
        cpu0 = cpu_seconds(src.p.pid) + cpu_seconds(dst.p.pid)
        t0 = time.monotonic()
        s.ex("migrate", {"uri": uri})
        last = {}
        while True:
            r = s.ex("query-migrate")
            if r.get("status") in ("completed", "failed", "cancelled"):
                cpu = cpu_seconds(src.p.pid) + cpu_seconds(dst.p.pid) - cpu0
                break
            if r.get("status") == "active":
                last = r
            if time.monotonic() - t0 > timeout:
                s.ex("migrate_cancel")
                ram = last.get("ram", {})
                r = {"status": "not-converged",
                     "why": "after %d s: %d rounds, expected downtime %s ms, dirty %.0f MiB/s, link %.0f MiB/s" % (
                         timeout, ram.get("dirty-sync-count", 0), last.get("expected-downtime"),
                         ram.get("dirty-pages-rate", 0) * 4096 / 2**20, ram.get("mbps", 0) * 1e6 / 8 / 2**20)}
                break
            time.sleep(0.02)
        ram = r.get("ram", {})
        res.update({"status": r.get("status"), "why": r.get("why") or r.get("error-desc"),
                    "total_ms": r.get("total-time"), "downtime_ms": r.get("downtime"),
                    "transferred": ram.get("transferred"), "rounds": ram.get("dirty-sync-count"),
                    "normal_pages": ram.get("normal")})
        if r.get("status") == "completed" and ram.get("normal"):
            # Per GiB of guest pages with data moved (not of bytes sent: with compression these
            # differ; without, they are within a percent).
            res["cpu_s"] = round(cpu, 2)
            res["cpu_s_per_gib"] = round(cpu / (ram["normal"] * 4096 / 2**30), 2)
        if r.get("status") == "completed":
            hbs = [hb(l)[0] for l in src.lines if hb(l)]
            last_src = max(hbs) if hbs else 0
            dst.wait_line(lambda l: hb(l) is not None and hb(l)[0] > last_src + 1, 60)
            # The stall the guest felt: the largest gap in the first two heartbeats at the target.
            gaps = [hb(l)[1] for l in dst.lines if hb(l)][:2]
            res["guest_gap_ms"] = round(max(gaps) / 1000, 1)
            c = dst.wait_line(lambda l: l.startswith("tern-guest check"), 60 + 2 * check)
            res["dst_check"] = c.split()[2]
        if timeline and os.path.exists(timeline):
            tl = json.load(open(timeline))
            rounds = [x for x in tl["rounds"] if x["pages"] > 0]
            busy = sum(x["end"] - x["start"] for x in rounds)
            if busy > 0:
                res["nonzero_Bps"] = sum(x["bytes"] for x in rounds) / busy
            sw = tl.get("switchover") or {}
            res["downtime_split_ms"] = sw.get("downtime")
            subprocess.run([TERN, "report", timeline], stdout=subprocess.DEVNULL, check=False)
            res["timeline"] = timeline
        return res
    except Exception as e:  # a VMM that breaks is a result too, not the end of the benchmark
        res.update({"status": "error", "why": str(e)[:300]})
        return res
    finally:
        src.kill(); dst.kill()


def socket_copy(nbytes, runs=3):
    rates = []
    for _ in range(runs):
        out = subprocess.run([TERN, "x-socket-copy", "%dK" % max(1, nbytes // 1024)],
                             capture_output=True, text=True, check=True).stdout
        rates.append(json.loads(out)["bytes_per_second"])
    return statistics.median(rates)


def med(rs, k):
    v = [r[k] for r in rs if r.get(k) is not None]
    return statistics.median(v) if v else None


def spread(rs, k, fmt="%.0f"):
    v = [r[k] for r in rs if r.get(k) is not None]
    if not v:
        return "-"
    return (fmt + " (" + fmt + "-" + fmt + ")") % (statistics.median(v), min(v), max(v))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one point, one run (1G, 64 MiB/s)")
    ap.add_argument("--mem", default="1G,4G,8G", help="guest RAM sizes (8G only if the host has room)")
    ap.add_argument("--rates", default="0,64,256,1024", help="dirty rates in MiB/s")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--vmms", default=",".join(VMMS))
    ap.add_argument("--timeout", type=int, default=120)
    ap.add_argument("--out", default=os.path.join("/tmp", "tern-bench"))
    ap.add_argument("--entropy", type=int, default=100, help="tern.entropy of the guest (100: incompressible)")
    ap.add_argument("--compress", choices=("zstd", "lz4"), help="multifd-compression for every tern and for qemu-multifd")
    ap.add_argument("--link", help="run source and target in two network namespaces joined at this rate (e.g. 1gbit)")
    ap.add_argument("--from", dest="from_log", help="only print the table from the JSON lines of an earlier run's output")
    a = ap.parse_args()
    if a.quick:
        a.mem, a.rates, a.runs = "1G", "64", 1
    if a.from_log:
        results = [json.loads(l) for l in open(a.from_log) if l.startswith("{")]
        if not results:
            print("no results in %s" % a.from_log)
            return 1
        mems = list(dict.fromkeys(r["mem"] for r in results))
        rates = sorted({r["rate"] for r in results})
        vmms = list(dict.fromkeys(r["vmm"] for r in results))
        a.runs = max(r["run"] for r in results) + 1
        os.makedirs(a.out, exist_ok=True)
        return report(a, results, mems, rates, vmms)
    subprocess.run([os.path.join(ROOT, "scripts", "install-qemu.sh")], check=True)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "tern"], cwd=ROOT, check=True)
    os.makedirs(a.out, exist_ok=True)
    elf = os.path.join(a.out, "guest.elf")
    subprocess.run([TERN, "guest", "write", elf], check=True, stdout=subprocess.DEVNULL)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    mems = []
    for m in a.mem.split(","):
        # Source and target each fill half their RAM; keep a quarter of the host free.
        if mib(m) * 2**20 > host * 0.75:
            print("skipping %s: the host has %.1f GiB" % (m, host / 2**30))
            continue
        mems.append(m)
    vmms = a.vmms.split(",")
    rates = [int(x) for x in a.rates.split(",")]
    results = []
    print("qemu: %s" % subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                                      text=True).stdout.splitlines()[0])
    if a.link:
        netns_up(a.link)
    for mem in mems:
        for rate in rates:
            for i in range(a.runs):
                order = vmms[i % len(vmms):] + vmms[:i % len(vmms)]
                for vmm in order:
                    tag = "%s-%d-%d" % (mem, rate, i)
                    try:
                        r = run_one(vmm, elf, mem, rate, a.out, tag, a.timeout, a.entropy, a.compress, a.link)
                    except KeyboardInterrupt:
                        netns_down()
                        raise
                    r["run"] = i
                    print(json.dumps(r), flush=True)
                    results.append(r)
    if a.link:
        netns_down()
    return report(a, results, mems, rates, vmms)


def report(a, results, mems, rates, vmms):
    # The machine's limit for each size: a plain socket copy of what tern sent.
    copy = {}
    for mem in (mems if not getattr(a, "link", None) else []):
        sent = [r["transferred"] for r in results if r["mem"] == mem and r["vmm"] == "tern" and r.get("transferred")]
        if sent:
            copy[mem] = socket_copy(int(statistics.median(sent)))

    lines = []
    p = lambda s="": (print(s), lines.append(s))
    p()
    link = getattr(a, "link", None)
    p("tern vs QEMU 10 precopy over tcp on %s; median (min-max) of %d run(s); downtime-limit 300 ms" % (
        "a %s link between two network namespaces" % link if link else "loopback", a.runs))
    if getattr(a, "compress", None) or getattr(a, "entropy", 100) != 100:
        p("guest tern.entropy=%d; compression %s for every tern and for qemu-multifd%s" % (
            a.entropy, a.compress or "none", " (QEMU has no lz4: none for it)" if a.compress == "lz4" else ""))
    p("%-4s %5s %-13s %-9s %-19s %-19s %-19s %-15s %-9s %-17s" % ("RAM", "MiB/s", "vmm", "converged", "total ms",
      "downtime ms", "guest felt ms", "MB sent", "rounds", "CPU s/GiB"))
    summary = []
    for mem in mems:
        for rate in rates:
            by = {}
            for v in vmms:
                rs = [r for r in results if (r["vmm"], r["mem"], r["rate"]) == (v, mem, rate)]
                ok = [r for r in rs if r["status"] == "completed"]
                by[v] = ok
                p("%-4s %5d %-13s %-9s %-19s %-19s %-19s %-15s %-9s %-17s" % (
                    mem, rate, v, "%d/%d" % (len(ok), len(rs)), spread(ok, "total_ms"), spread(ok, "downtime_ms"),
                    spread(ok, "guest_gap_ms", "%.1f"), spread([dict(x, mb=x["transferred"] / 1e6) for x in ok], "mb"),
                    spread(ok, "rounds"), spread(ok, "cpu_s_per_gib", "%.2f")))
                for r in rs:
                    if r["status"] != "completed":
                        p("     %s run %d: %s: %s" % (v, r["run"], r["status"], r.get("why")))
            # QEMU's best: the better of single stream and multifd, per metric, among what converged.
            # Each side's best configuration, per metric, among what converged.
            q = [v for v in QEMUS if by.get(v)]
            tv = [v for v in TERNS if by.get(v)]
            row = {"mem": mem, "rate": rate}
            best = lambda vs, k: min([m for m in (med(by[v], k) for v in vs) if m is not None], default=None)
            if tv and q:
                for k in ("total_ms", "downtime_ms", "guest_gap_ms", "cpu_s_per_gib"):
                    qb, tb = best(q, k), best(tv, k)
                    row[k + "_ratio"] = tb / qb if qb and tb is not None else None
                f = lambda x: "%.2fx" % x if x is not None else "-"
                p("     tern best / QEMU best: total %s (goal <= 0.5), downtime %s, guest-felt %s, CPU per GiB %s (goal <= 0.5)" % (
                    f(row["total_ms_ratio"]), f(row["downtime_ms_ratio"]), f(row["guest_gap_ms_ratio"]),
                    f(row["cpu_s_per_gib_ratio"])))
            if q and not tv:
                p("     GOAL MISSED: QEMU converged here and tern did not")
            summary.append(row)
    for mem in mems:
        for v in TERNS:
            nz = [r["nonzero_Bps"] for r in results if r["mem"] == mem and r["vmm"] == v and r.get("nonzero_Bps")]
            if nz and mem in copy:
                p("%s: plain loopback socket copy %.2f GB/s; %s on non-zero pages %.2f GB/s median = %.0f%% of it (goal >= 90%%)" % (
                    mem, copy[mem] / 1e9, v, statistics.median(nz) / 1e9, 100 * statistics.median(nz) / copy[mem]))
    out = os.path.join(a.out, "results.json")
    json.dump({"args": vars(a), "results": results, "socket_copy_Bps": copy, "summary": summary},
              open(out, "w"), indent=1)
    with open(os.path.join(a.out, "table.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    p("results: %s, table: %s, timelines: %s/timeline-*.svg" % (out, os.path.join(a.out, "table.txt"), a.out))
    if any(r["status"] == "error" for r in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
