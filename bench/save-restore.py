#!/usr/bin/env python3
"""Save and restore times and file sizes: `tern save` of a running guest, then `tern restore`.

Usage: bench/save-restore.py [--points 1G:512,4G:512,4G:2048] [--runs 3] [--dir /tmp/tern-sr]
Each point is RAM:working-set-MiB. The guest dirties 64 MiB/s while it runs. Restore time is
tern's own "restored ... in N ms" (start of the process to the guest running); the file is read
from the page cache (it was just written), which is the common case for a local save/restore.
"""
import argparse, json, os, re, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERN = os.path.join(ROOT, "target", "release", "tern")


def wait_line(path, pred, timeout):
    end = time.time() + timeout
    while time.time() < end:
        try:
            with open(path) as f:
                for line in f:
                    if pred(line):
                        return line
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timeout waiting in {path}")


def one(d, mem, wss, run):
    tag = f"{mem}-{wss}-{run}"
    qmp = os.path.join(d, f"{tag}.qmp")
    log = os.path.join(d, f"{tag}.log")
    out = os.path.join(d, f"{tag}.tern")
    for stale in (log, os.path.join(d, f"{tag}-dst.log")):
        if os.path.exists(stale):
            os.unlink(stale)
    src = subprocess.Popen([TERN, "run", "--memory", mem, "--cmdline",
                            f"tern.wss={wss} tern.rate=64 tern.check=0",
                            "--qmp", f"unix:{qmp}", "--serial", f"file:{log}"])
    try:
        wait_line(log, lambda l: l.startswith("tern-guest ready"), 120)
        wait_line(log, lambda l: l.startswith("tern-guest hb"), 30)
        t0 = time.time()
        r = subprocess.run([TERN, "save", "--qmp", f"unix:{qmp}", out],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"tern save failed: {r.stdout}{r.stderr}")
        save_wall = time.time() - t0
        m = re.search(r"total time (\d+) ms", r.stdout)
        save_ms = int(m.group(1)) if m else None
    finally:
        src.kill(); src.wait()
    size = os.path.getsize(out)
    dlog = os.path.join(d, f"{tag}-dst.log")
    dst = subprocess.Popen([TERN, "restore", out, "--serial", f"file:{dlog}"],
                           stderr=subprocess.PIPE, text=True)
    try:
        line = dst.stderr.readline()
        m = re.search(r"in (\d+) ms", line)
        restore_ms = int(m.group(1)) if m else None
        wait_line(dlog, lambda l: l.startswith("tern-guest hb"), 60)
    finally:
        dst.kill(); dst.wait()
    os.unlink(out)
    return {"memory": mem, "wss_mib": wss, "file_bytes": size, "save_ms": save_ms,
            "save_wall_s": round(save_wall, 3), "restore_ms": restore_ms}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", default="1G:512,4G:512,4G:2048")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/tern-sr")
    ap.add_argument("--json")
    a = ap.parse_args()
    if not os.path.exists(TERN):
        subprocess.run(["cargo", "build", "--release", "-p", "tern"], cwd=ROOT, check=True)
    os.makedirs(a.dir, exist_ok=True)
    rows = []
    print(f"{'RAM':>4} {'wss':>5} {'file MiB':>9} {'save ms':>16} {'restore ms':>16}")
    for p in a.points.split(","):
        mem, wss = p.split(":")
        res = [one(a.dir, mem, int(wss), r) for r in range(a.runs)]
        rows += res
        med = lambda k: statistics.median(x[k] for x in res)
        rng = lambda k: f"{min(x[k] for x in res)}-{max(x[k] for x in res)}"
        print(f"{mem:>4} {wss:>5} {med('file_bytes')/2**20:>9.1f} "
              f"{med('save_ms'):>6.0f} ({rng('save_ms'):>8}) {med('restore_ms'):>6.0f} ({rng('restore_ms'):>8})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
