#!/usr/bin/env python3
"""Precopy migration, tern vs QEMU on the same guest ELF, over tcp on loopback.

Usage: bench/precopy.py [--runs N] [--mem 1G,4G] [--rates 0,64,256] [--vcpus 1]
Needs target/release/tern (cargo build --release) and qemu-system-x86_64
(scripts/install-qemu.sh). Prints one line per run and a median table.
Guest: half of... no: a 256 MiB working set dirtied at RATE MiB/s (the anchors' setup), the
heartbeat every 10 ms; downtime is reported by each VMM and as the guest felt it (gap_us)."""
import argparse, json, os, socket, statistics, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERN = os.path.join(ROOT, "target/release/tern")

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

class Proc:
    def __init__(self, cmd):
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        threading.Thread(target=self._read, daemon=True).start()
    def _read(self):
        for l in self.p.stdout:
            self.lines.append((time.monotonic(), l.rstrip()))
    def wait_line(self, pred, timeout):
        end = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < end:
            while seen < len(self.lines):
                t, l = self.lines[seen]; seen += 1
                if pred(l): return t, l
            time.sleep(0.01)
        raise RuntimeError("timeout waiting; last: %s" % self.lines[-5:])
    def kill(self):
        self.p.kill(); self.p.wait()

class Qmp:
    def __init__(self, path, timeout=30):
        end = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX); self.s.connect(path); break
            except OSError:
                if time.monotonic() > end: raise
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.ex("qmp_capabilities")
    def ex(self, cmd, args=None):
        self.f.write(json.dumps({"execute": cmd, "arguments": args or {}}) + "\n"); self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r: continue
            if "error" in r: raise RuntimeError("%s: %s" % (cmd, r["error"]))
            return r["return"]

def hb(l):
    if not l.startswith("tern-guest hb "): return None
    n, g = l[len("tern-guest hb "):].split(" gap_us=")
    return int(n), int(g)

def run_one(vmm, elf, mem, rate, vcpus, d):
    cmdline = "tern.wss=256 tern.rate=%d tern.hb=10 tern.check=2" % rate
    sq, dq = os.path.join(d, "s.qmp"), os.path.join(d, "d.qmp")
    port = free_port(); uri = "tcp:127.0.0.1:%d" % port
    if vmm == "tern":
        src = Proc([TERN, "run", "--memory", mem, "--vcpus", str(vcpus), "--cmdline", cmdline, "--qmp", "unix:" + sq])
        dst = Proc([TERN, "run", "--incoming", uri, "--qmp", "unix:" + dq])
    else:
        base = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", mem,
                "-smp", str(vcpus), "-display", "none", "-serial", "stdio", "-monitor", "none",
                "-kernel", elf, "-append", cmdline]
        mode = vmm.split("-", 1)[1] if "-" in vmm else ""
        src = Proc(base + ["-qmp", "unix:%s,server=on,wait=off" % sq])
        dst = Proc(base + ["-qmp", "unix:%s,server=on,wait=off" % dq, "-incoming", "defer"])
    try:
        src.wait_line(lambda l: l == "tern-guest ready", 120)
        time.sleep(3)  # dirtying at steady state, as in the anchors
        s, t = Qmp(sq), Qmp(dq)
        if vmm == "tern":
            s.ex("migrate-set-parameters", {"downtime-limit": 300})
        else:
            caps = [{"capability": "events", "state": True}]
            if mode == "multifd":
                caps.append({"capability": "multifd", "state": True})
            for q in (s, t):
                q.ex("migrate-set-capabilities", {"capabilities": caps})
                if mode == "multifd":
                    q.ex("migrate-set-parameters", {"multifd-channels": 4})
            s.ex("migrate-set-parameters", {"max-bandwidth": 100 << 30, "downtime-limit": 300})
            t.ex("migrate-incoming", {"uri": uri})
        t0 = time.monotonic()
        s.ex("migrate", {"uri": uri})
        while True:
            r = s.ex("query-migrate")
            if r.get("status") in ("completed", "failed", "cancelled"): break
            if time.monotonic() - t0 > 120:
                s.ex("migrate_cancel"); r = {"status": "not-converged"}; break
            time.sleep(0.01)
        res = {"vmm": vmm, "mem": mem, "rate": rate, "status": r.get("status"),
               "total_ms": r.get("total-time"), "downtime_ms": r.get("downtime"),
               "transferred": r.get("ram", {}).get("transferred"), "rounds": r.get("ram", {}).get("dirty-sync-count")}
        if r.get("status") == "completed":
            last_src = max(hb(l)[0] for _, l in src.lines if hb(l))
            _, first = dst.wait_line(lambda l: hb(l) is not None and hb(l)[0] > last_src, 30)
            # the largest gap in the first two heartbeats on the target
            gaps = [hb(l)[1] for _, l in dst.lines if hb(l)][:2]
            res["guest_gap_ms"] = round(max(gaps) / 1000, 1)
            dst.wait_line(lambda l: l.startswith("tern-guest check"), 30)
            res["dst_check"] = [l for _, l in dst.lines if l.startswith("tern-guest check")][0].split()[2]
        return res
    finally:
        src.kill(); dst.kill()

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mem", default="1G,4G")
    ap.add_argument("--rates", default="0,64,256")
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--vmms", default="tern,qemu,qemu-multifd")
    ap.add_argument("--json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        elf = os.path.join(d, "guest.elf")
        subprocess.run([TERN, "guest", "write", elf], check=True, stdout=subprocess.DEVNULL)
        results = []
        for mem in a.mem.split(","):
            for rate in [int(x) for x in a.rates.split(",")]:
                for i in range(a.runs):
                    for vmm in a.vmms.split(","):  # interleaved
                        r = run_one(vmm, elf, mem, rate, a.vcpus, d)
                        print(json.dumps(r), flush=True)
                        results.append(r)
        print("\n%-13s %4s %5s %9s %12s %12s %10s %7s" % ("vmm", "mem", "rate", "total ms", "downtime ms", "guest gap ms", "MB sent", "rounds"))
        keys = sorted({(r["vmm"], r["mem"], r["rate"]) for r in results}, key=lambda k: (k[1], k[2], k[0]))
        for k in keys:
            rs = [r for r in results if (r["vmm"], r["mem"], r["rate"]) == k and r["status"] == "completed"]
            if not rs:
                print("%-13s %4s %5d   did not complete" % k); continue
            med = lambda f: statistics.median([r[f] for r in rs if r.get(f) is not None])
            print("%-13s %4s %5d %9.0f %12.0f %12.1f %10.0f %7.0f" % (k[0], k[1], k[2], med("total_ms"), med("downtime_ms"),
                  med("guest_gap_ms"), med("transferred") / 1e6, med("rounds")))
        if a.json:
            json.dump(results, open(a.json, "w"), indent=1)

if __name__ == "__main__":
    main()
