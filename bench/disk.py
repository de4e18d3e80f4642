#!/usr/bin/env python3
"""Live migration with a disk that is not shared, tern vs QEMU 10, over tcp on loopback.

    bench/disk.py                    # 4 GiB disk; guest writes 0 and 32 MiB/s; plus no disk
    bench/disk.py --quick            # 1 GiB disk, 32 MiB/s only, one run
    bench/disk.py --disk 4G --rates 0,32 --runs 3 --out /tmp/b

The guest is the built-in one (`tern guest write`), 1 GiB of RAM, 1 vCPU, dirtying 64 MiB/s of a
256 MiB working set, and writing its disk (a virtio-blk device, virtio-mmio) at the rate given
(`tern.disk_rate=`); both VMMs run the same ELF with the same command line. Each side has its own
disk file (sparse, the same size); the target's starts empty.

tern: `tern run --disk path=SRC` and a target `tern run --incoming tcp:... --disk path=DST`; one
`migrate` moves RAM and the disk together (the disk is one more participant of the same rounds).

QEMU (its own tools, as libvirt drives them for non-shared storage): `-M microvm,acpi=off
-global virtio-mmio.force-legacy=false` with `-blockdev` file+raw nodes and `-device
virtio-blk-device`; the target (`-incoming defer`) runs `nbd-server-start` and
`block-export-add` (type nbd, writable) of its disk node; the source `blockdev-add`s an nbd node
for it and runs `blockdev-mirror` (sync full) into it; once the job is ready, `migrate` moves RAM
(the mirror keeps copying the guest's writes meanwhile); after the migration completes the source
`block-job-cancel`s the ready job (the data is in sync once the VM stopped) and the target stops
its NBD server.

Reported per run: total time (tern: the migration; QEMU: from starting the mirror to the end of
the migration), downtime as the VMM measures it, bytes (RAM: `ram.transferred`; disk: tern's
`disk.transferred`, bytes on the wire, holes costing a 16-byte record per 256 KiB — QEMU's mirror
job `offset`, its progress over the whole disk, holes included, not bytes sent), the disk's own
convergence (tern: when the disk's
`remaining` first fell below 1% of it; QEMU: when the mirror job became ready), and whether the
guest's disk check passed on the target (`tern-guest disk ok`). Writes results.json in --out.
"""
import argparse, json, os, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare import Proc, Qmp, TERN, ROOT, free_port, hb  # noqa: E402

GUEST = "tern.wss=256 tern.rate=64 tern.check=4 tern.hb=20"


def disk_ok(line):
    return line.startswith("tern-guest disk ok ") and int(line.split()[3]) > 0


def disk_seen(rate):
    """What shows the guest's disk works: a check of written blocks, or (no writes) the device."""
    return disk_ok if rate else (lambda l: l.startswith("tern-guest disk found"))


def sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)


def continues(r, src, dst, check_disk, res):
    """A completed migration: the heartbeat goes on at the target, and its disk check passes."""
    if r.get("status") != "completed":
        return
    last = max((hb(l)[0] for l in src.lines if hb(l)), default=0)
    dst.wait_line(lambda l: hb(l) is not None and hb(l)[0] > last, 60)
    if check_disk:
        dst.wait_line(disk_ok, 120)
        res["dst_disk_check"] = "ok"


def wait_migration(q, timeout, sample=None):
    t0 = time.monotonic()
    while True:
        r = q.ex("query-migrate")
        if sample:
            sample(r)
        if r.get("status") in ("completed", "failed", "cancelled"):
            return r
        if time.monotonic() - t0 > timeout:
            q.ex("migrate_cancel")
            return {"status": "timeout"}
        time.sleep(0.02)


def run_tern(elf, d, disk, rate, timeout):
    cmd = GUEST + (" tern.disk_rate=%d" % rate if disk else "")
    sq, dq = os.path.join(d, "s.qmp"), os.path.join(d, "d.qmp")
    uri = "tcp:127.0.0.1:%d" % free_port()
    sargs, dargs = [], []
    if disk:
        s_img, d_img = os.path.join(d, "src.img"), os.path.join(d, "dst.img")
        sparse(s_img, disk); sparse(d_img, disk)
        sargs, dargs = ["--disk", "path=" + s_img], ["--disk", "path=" + d_img]
    src = Proc([TERN, "run", "--memory", "1G", "--vcpus", "1", "--cmdline", cmd, "--qmp", "unix:" + sq] + sargs)
    dst = Proc([TERN, "run", "--incoming", uri, "--qmp", "unix:" + dq] + dargs)
    res = {"vmm": "tern"}
    try:
        src.wait_line(lambda l: l == "tern-guest ready", 300)
        if disk:
            src.wait_line(disk_seen(rate), 120)
        time.sleep(2)
        s = Qmp(sq)
        s.ex("migrate-set-parameters", {"downtime-limit": 300, "max-bandwidth": 0})
        t0 = time.monotonic()
        conv = {}

        def sample(r):
            dk = r.get("disk")
            if dk and "t" not in conv and dk["transferred"] > 0 and dk["remaining"] < dk["total"] / 100:
                conv["t"] = time.monotonic() - t0
        s.ex("migrate", {"uri": uri})
        r = wait_migration(s, timeout, sample)
        res.update(status=r.get("status"), total_ms=r.get("total-time"), downtime_ms=r.get("downtime"),
                   ram_bytes=r.get("ram", {}).get("transferred"),
                   disk_bytes=(r.get("disk") or {}).get("transferred", 0),
                   disk_rounds=(r.get("disk") or {}).get("dirty-sync-count"),
                   disk_converged_ms=round(conv["t"] * 1000) if "t" in conv else None)
        continues(r, src, dst, disk and rate, res)
        return res
    except Exception as e:
        res.update(status="error", why=str(e)[:300])
        return res
    finally:
        src.kill(); dst.kill()


def run_qemu(elf, d, disk, rate, timeout):
    cmd = GUEST + (" tern.disk_rate=%d" % rate if disk else "")
    sq, dq = os.path.join(d, "qs.qmp"), os.path.join(d, "qd.qmp")
    uri = "tcp:127.0.0.1:%d" % free_port()
    nbd = free_port()
    base = ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
            "-m", "1G", "-smp", "1", "-display", "none", "-serial", "stdio", "-monitor", "none",
            "-global", "virtio-mmio.force-legacy=false", "-kernel", elf, "-append", cmd]

    def drive(img):
        return ["-blockdev", "driver=file,filename=%s,node-name=f0" % img,
                "-blockdev", "driver=raw,file=f0,node-name=d0", "-device", "virtio-blk-device,drive=d0"]
    sargs, dargs = [], []
    if disk:
        s_img, d_img = os.path.join(d, "qsrc.img"), os.path.join(d, "qdst.img")
        sparse(s_img, disk); sparse(d_img, disk)
        sargs, dargs = drive(s_img), drive(d_img)
    src = Proc(base + sargs + ["-qmp", "unix:%s,server=on,wait=off" % sq])
    dst = Proc(base + dargs + ["-qmp", "unix:%s,server=on,wait=off" % dq, "-incoming", "defer"])
    res = {"vmm": "qemu"}
    try:
        src.wait_line(lambda l: l == "tern-guest ready", 300)
        if disk:
            src.wait_line(disk_seen(rate), 120)
        time.sleep(2)
        s, t = Qmp(sq), Qmp(dq)
        s.ex("migrate-set-parameters", {"downtime-limit": 300, "max-bandwidth": 1 << 40})
        t0 = time.monotonic()
        ready_ms, mirrored = None, 0
        if disk:
            t.ex("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(nbd)}}})
            t.ex("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0", "writable": True})
            s.ex("blockdev-add", {"driver": "nbd", "node-name": "nbd0",
                                  "server": {"type": "inet", "host": "127.0.0.1", "port": str(nbd)},
                                  "export": "d0"})
            s.ex("blockdev-mirror", {"job-id": "m0", "device": "d0", "target": "nbd0", "sync": "full"})
            while True:
                jobs = s.ex("query-block-jobs")
                if jobs and jobs[0].get("ready"):
                    ready_ms = round((time.monotonic() - t0) * 1000)
                    break
                if time.monotonic() - t0 > timeout:
                    raise RuntimeError("the mirror never became ready: %s" % jobs)
                time.sleep(0.05)
        t.ex("migrate-incoming", {"uri": uri})
        s.ex("migrate", {"uri": uri})
        r = wait_migration(s, timeout)
        total_ms = round((time.monotonic() - t0) * 1000)
        if disk:
            jobs = s.ex("query-block-jobs")
            mirrored = jobs[0].get("offset", 0) if jobs else 0
            s.ex("block-job-cancel", {"device": "m0"})
            t.ex("nbd-server-stop")
        res.update(status=r.get("status"), total_ms=total_ms if disk else r.get("total-time"),
                   migrate_ms=r.get("total-time"), downtime_ms=r.get("downtime"),
                   ram_bytes=r.get("ram", {}).get("transferred"), disk_bytes=mirrored,
                   disk_converged_ms=ready_ms)
        continues(r, src, dst, disk and rate, res)
        return res
    except Exception as e:
        res.update(status="error", why=str(e)[:300])
        return res
    finally:
        src.kill(); dst.kill()


def size(s):
    return int(float(s[:-1]) * (1 << 30 if s.endswith("G") else 1 << 20))


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--disk", default="4G")
    a.add_argument("--rates", default="0,32")
    a.add_argument("--runs", type=int, default=1)
    a.add_argument("--timeout", type=int, default=300)
    a.add_argument("--quick", action="store_true")
    a.add_argument("--no-qemu", action="store_true")
    a.add_argument("--out", default="/tmp/tern-bench-disk")
    args = a.parse_args()
    if args.quick:
        args.disk, args.rates = "1G", "32"
    os.makedirs(args.out, exist_ok=True)
    if not args.no_qemu:
        subprocess.run([os.path.join(ROOT, "scripts", "install-qemu.sh")], check=True)
    subprocess.run(["cargo", "build", "--release", "-p", "tern"], cwd=ROOT, check=True)
    elf = os.path.join(args.out, "guest.elf")
    subprocess.run([TERN, "guest", "write", elf], check=True, stdout=subprocess.DEVNULL)
    points = [(None, 0)] + [(size(args.disk), int(r)) for r in args.rates.split(",")]
    vmms = [("tern", run_tern)] + ([] if args.no_qemu else [("qemu", run_qemu)])
    results = []
    for disk, rate in points:
        for run in range(args.runs):
            for name, fn in vmms:
                d = os.path.join(args.out, "%s-%s-%d-%d" % (name, disk or 0, rate, run))
                os.makedirs(d, exist_ok=True)
                r = fn(elf, d, disk, rate, args.timeout)
                r.update(disk=args.disk if disk else "none", disk_rate=rate, run=run)
                print(json.dumps(r), flush=True)
                results.append(r)
                for f in os.listdir(d):
                    if f.endswith(".img"):
                        os.unlink(os.path.join(d, f))
    json.dump(results, open(os.path.join(args.out, "results.json"), "w"), indent=1)
    print("\n%-5s %-5s %-9s %-6s %9s %9s %10s %10s %12s %s" % (
        "vmm", "disk", "disk MiB/s", "status", "total ms", "down ms", "RAM MiB", "disk MiB", "disk conv ms", "dst disk"))
    for (disk, rate) in points:
        for name, _ in vmms:
            rs = [r for r in results if r["vmm"] == name and r["disk_rate"] == rate and (r["disk"] == "none") == (disk is None)]
            ok = [r for r in rs if r.get("status") == "completed"]

            def m(k, div=1):
                v = [r[k] for r in ok if r.get(k) is not None]
                return "%.0f" % (statistics.median(v) / div) if v else "-"
            print("%-5s %-5s %-9s %-6s %9s %9s %10s %10s %12s %s" % (
                name, rs[0]["disk"] if rs else "?", rate if disk else "-", "%d/%d" % (len(ok), len(rs)),
                m("total_ms"), m("downtime_ms"), m("ram_bytes", 1 << 20), m("disk_bytes", 1 << 20),
                m("disk_converged_ms"), ",".join(r.get("dst_disk_check", "-") for r in ok) or "-"))
            for r in rs:
                if r.get("status") != "completed":
                    print("      %s: %s" % (r.get("status"), r.get("why")))


if __name__ == "__main__":
    main()
