#!/usr/bin/env python3
"""Time from starting the VMM to `tern-guest ready`, tern vs QEMU on the same guest ELF,
and tern's RSS once the guest idles. Usage: bench/boot-time.py [runs] (default 5)."""
import os, statistics, subprocess, sys, tempfile, time

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERN = os.path.join(ROOT, "target/release/tern")
CMDLINE = "tern.wss=256"

def time_to_ready(cmd):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in p.stdout:
            if line.strip() == "tern-guest ready":
                return time.monotonic() - t0, p
        raise RuntimeError("no ready line from %s" % cmd[0])
    except BaseException:
        p.kill(); raise

def rss_kb(pid):
    fields = {}
    for l in open("/proc/%d/status" % pid):
        k, v = l.split(":", 1)
        fields[k] = v.strip()
    return {k: fields.get(k) for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}

with tempfile.TemporaryDirectory() as d:
    elf = os.path.join(d, "guest.elf")
    subprocess.run([TERN, "guest", "write", elf], check=True, stdout=subprocess.DEVNULL)
    tern_cmd = [TERN, "run", "--memory", "1G", "--vcpus", "2", "--cmdline", CMDLINE]
    qemu_cmd = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
                "-m", "1G", "-smp", "2", "-display", "none", "-serial", "stdio",
                "-monitor", "none", "-kernel", elf, "-append", CMDLINE]
    res = {"tern": [], "qemu": []}
    rss = None
    for i in range(RUNS):  # interleaved so machine noise hits both alike
        for name, cmd in (("tern", tern_cmd), ("qemu", qemu_cmd)):
            t, p = time_to_ready(cmd)
            res[name].append(t)
            if name == "tern" and i == 0:
                time.sleep(2)
                rss = rss_kb(p.pid)
            p.kill(); p.wait()
    for name, ts in res.items():
        print("%-5s time to ready: median %.3f s  (runs: %s)" % (
            name, statistics.median(ts), ", ".join("%.3f" % t for t in ts)))
    print("ratio tern/qemu: %.2f" % (statistics.median(res["tern"]) / statistics.median(res["qemu"])))
    print("tern RSS, idle 1 GiB guest with a 256 MiB working set:", rss)
