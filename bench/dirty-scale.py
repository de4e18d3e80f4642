#!/usr/bin/env python3
"""Dirty tracking on big guests: does the cost of collecting the dirty log follow what the guest
dirtied, or the size of its RAM?

    bench/dirty-scale.py                          # 1, 4, 16, 20 GiB, every mode, 3 runs each
    bench/dirty-scale.py --mem 1G,20G --runs 1 --modes clear

Per guest size: the built-in guest with a 256 MiB working set dirtied at 64 MiB/s (1 vCPU,
heartbeat every 10 ms), migrated over tcp on loopback by tern with downtime-limit 300 ms, once
per dirty-log mode (`x-tern-dirty-log`: `get` is KVM_GET_DIRTY_LOG re-protecting the whole slot at
every sync, `clear` is manual protect with KVM_CLEAR_DIRTY_LOG in chunks as pages are sent, `ring`
is a source started with `--dirty-ring-size 65536`, the most this host's KVM offers).
Reported from tern's timeline: the time to collect the dirty log per precopy round (median and
max over the rounds after the first), in `clear` mode also the time spent re-arming pages as
they were sent (KVM_CLEAR_DIRTY_LOG, per round: the part of the work that left the sync), the
final sync (with the guest paused) and its share of the downtime, the total time and the
downtime, and the guest's own verdict after the move (its self-check of every page). Only the guest's working set is ever touched: a 20 GiB guest populates
about 300 MiB on each side, so the sizes fit this host's 24 GiB.

Prints a table and writes results.json (one object per run) in --out.
"""
import argparse, json, os, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import Proc, Qmp, TERN, ROOT, free_port, hb  # noqa: E402

RING = 65536  # entries per vCPU: the most this host's KVM offers (1 MiB)


def run_one(mem, mode, d, tag, timeout, wss=256, rate=64):
    cmdline = "tern.wss=%d tern.rate=%d tern.hb=10 tern.check=2" % (wss, rate)
    sq, dq = os.path.join(d, "s.qmp"), os.path.join(d, "d.qmp")
    uri = "tcp:127.0.0.1:%d" % free_port()
    ring = ["--dirty-ring-size", str(RING)] if mode == "ring" else []
    src = Proc([TERN, "run", "--memory", mem, "--vcpus", "1", "--cmdline", cmdline, "--qmp", "unix:" + sq] + ring)
    dst = Proc([TERN, "run", "--incoming", uri, "--qmp", "unix:" + dq])
    res = {"mem": mem, "mode": mode}
    try:
        src.wait_line(lambda l: l == "tern-guest ready", 300)
        time.sleep(3)  # dirtying at a steady state
        s = Qmp(sq)
        Qmp(dq)
        timeline = os.path.join(d, "timeline-%s-%s-%s.json" % (mem, mode, tag))
        s.ex("migrate-set-parameters", {"downtime-limit": 300, "max-bandwidth": 0,
                                        "x-tern-timeline": timeline,
                                        "x-tern-dirty-log": "get" if mode == "get" else "clear"})
        t0 = time.monotonic()
        s.ex("migrate", {"uri": uri})
        while True:
            r = s.ex("query-migrate")
            if r.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() - t0 > timeout:
                s.ex("migrate_cancel")
                r = {"status": "not-converged"}
                break
            time.sleep(0.05)
        res.update({"status": r.get("status"), "why": r.get("error-desc"),
                    "total_ms": r.get("total-time"), "downtime_ms": r.get("downtime")})
        if r.get("status") == "completed":
            hbs = [hb(l)[0] for l in src.lines if hb(l)]
            last_src = max(hbs) if hbs else 0
            dst.wait_line(lambda l: hb(l) is not None and hb(l)[0] > last_src + 1, 60)
            c = dst.wait_line(lambda l: l.startswith("tern-guest check"), 60)
            res["dst_check"] = c.split()[2]
            tl = json.load(open(timeline))
            syncs = [x["sync-ms"] for x in tl["rounds"][1:]]
            res["rounds"] = len(tl["rounds"])
            res["sync_ms_rounds"] = syncs
            res["rearm_ms_rounds"] = [x.get("rearm-ms", 0) for x in tl["rounds"]]
            res["setup_sync_ms"] = tl["rounds"][0]["sync-ms"] if tl["rounds"] else None
            sw = tl.get("switchover") or {}
            dt = sw.get("downtime") or {}
            res["final_sync_ms"] = dt.get("final-sync")
            res["downtime_total_ms"] = dt.get("total")
        return res
    except Exception as e:  # a run that breaks is a result too
        res.update({"status": "error", "why": str(e)[:300]})
        return res
    finally:
        src.kill(); dst.kill()


def fmt(v, f="%.2f"):
    return "-" if v is None else f % v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem", default="1G,4G,16G,20G")
    ap.add_argument("--modes", default="get,clear,ring")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--wss", type=int, default=256, help="the guest's working set, MiB")
    ap.add_argument("--rate", type=int, default=64, help="the guest's dirty rate, MiB/s")
    ap.add_argument("--timeout", type=int, default=120)
    ap.add_argument("--out", default="/tmp/tern-dirty-scale")
    ap.add_argument("--from", dest="from_json", help="only print the table of an earlier run's results.json")
    a = ap.parse_args()
    if a.from_json:
        results = json.load(open(a.from_json))
        a.mem = ",".join(dict.fromkeys(r["mem"] for r in results))
        a.modes = ",".join(dict.fromkeys(r["mode"] for r in results))
        return table(a, results)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "tern"], cwd=ROOT, check=True)
    os.makedirs(a.out, exist_ok=True)
    results = []
    for run in range(a.runs):
        for mem in a.mem.split(","):
            for mode in a.modes.split(","):
                r = run_one(mem, mode, a.out, str(run), a.timeout, a.wss, a.rate)
                r["run"] = run
                print(json.dumps(r), flush=True)
                results.append(r)
    json.dump(results, open(os.path.join(a.out, "results.json"), "w"), indent=1)
    return table(a, results)


def table(a, results):
    print()
    print("%-5s %-6s %-5s %14s %13s %15s %14s %9s %9s %12s %6s" % (
        "mem", "mode", "runs", "round sync ms", "max sync ms", "rearm ms/round", "final sync ms",
        "of dtime", "total ms", "downtime ms", "check"))
    for mem in a.mem.split(","):
        for mode in a.modes.split(","):
            rs = [r for r in results if r["mem"] == mem and r["mode"] == mode and r.get("status") == "completed"]
            bad = [r for r in results if r["mem"] == mem and r["mode"] == mode and r.get("status") != "completed"]
            if not rs:
                print("%-5s %-6s none completed: %s" % (mem, mode, [b.get("why") or b.get("status") for b in bad]))
                continue
            syncs = [s for r in rs for s in r["sync_ms_rounds"]]
            rearms = [s for r in rs for s in r.get("rearm_ms_rounds", [])[1:]]
            final = statistics.median(r["final_sync_ms"] for r in rs)
            dtot = statistics.median(r["downtime_total_ms"] for r in rs)
            print("%-5s %-6s %-5s %14s %13s %15s %14s %8.1f%% %9.0f %12.1f %6s" % (
                mem, mode, "%d/%d" % (len(rs), len(rs) + len(bad)),
                fmt(statistics.median(syncs) if syncs else None), fmt(max(syncs) if syncs else None),
                fmt(statistics.median(rearms) if rearms else None), fmt(final), 100 * final / dtot if dtot else 0,
                statistics.median(r["total_ms"] for r in rs), statistics.median(r["downtime_ms"] for r in rs),
                ",".join(sorted({r.get("dst_check", "?") for r in rs}))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
