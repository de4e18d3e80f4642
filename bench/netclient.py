#!/usr/bin/env python3
"""The network study's client (bench/network.py): a TCP stream to or from the built-in guest,
checked byte for byte, timed in 10 ms buckets, with its longest stall.

    ip netns exec PC python3 bench/netclient.py --connect 10.0.0.10:5002 --mode source \\
        [--marks FILE] [--stop FILE] [--seconds N] [--out FILE]
    ip netns exec PC python3 bench/netclient.py --connect 10.0.0.10:5001 --mode sink ...
    ip netns exec PC python3 bench/netclient.py --ping 10.0.0.10 [--count 10]

The stream is the guest's: little-endian u64 counters 0, 1, 2, ... back to back.
- source (guest port 5002): the guest sends it, this client checks every byte in order. On a
  mismatch it resynchronises on the counter (three consecutive counters at any byte offset) and
  counts the counter values skipped (missing) or repeated, and the bytes that were neither.
- sink (guest port 5001): this client sends it and the guest checks it; bytes are counted when the
  socket accepts them.
It connects with retries for --connect-timeout seconds (30: the guest may still be booting) and
runs until SIGTERM/SIGINT, until the --stop file exists, until --seconds elapse, or until the peer
closes the connection. Times are time.monotonic() (CLOCK_MONOTONIC, one clock for every process on
the machine): the driver appends "NAME TIME" lines to --marks (migrate-start, migrate-end) and
the client splits its throughput into before/during/after by them.

Writes JSON to --out: bytes, lost (bytes off the ideal stream: per resync, 8 per skipped counter
or the bytes that fit nowhere, whichever is more, or 8 per repeated counter plus those),
skipped/repeated counters, the first mismatch's offset, the longest stall (longest time between
two receptions of data once the stream started, or between the last one and the end if the stream
stopped), when it started, MB/s before/during/after, and the bytes of every 10 ms bucket since
the stream started. The LAST line printed is exactly:
    stream: <bytes> bytes, <lost> lost, longest stall <ms> ms
--ping sends ICMP echo requests (raw socket: root) and prints its JSON, then `rtt: MIN/AVG/MAX ms`.
"""
import argparse, json, os, select, signal, socket, struct, sys, time

BLOCK_CTRS = 1 << 16          # counters per expected block: the low two bytes vary, six are fixed
BLOCK = BLOCK_CTRS * 8        # 512 KiB
BUCKET = 0.01                 # seconds
RESYNC_MAX = 1 << 20          # bytes searched for the counter before they are written off
PLAUSIBLE = 1 << 40           # a resynchronised counter further than this from the expected is noise


class Pattern:
    """The ideal stream, a 512 KiB block at a time: block k holds counters k*65536 .. k*65536+65535."""

    def __init__(self):
        self.template = struct.pack("<%dQ" % BLOCK_CTRS, *range(BLOCK_CTRS))
        self.cache = {}

    def block(self, k):
        b = self.cache.get(k)
        if b is None:
            ba = bytearray(self.template)
            hi = (k << 16).to_bytes(8, "little")
            for i in range(2, 8):
                if hi[i]:
                    ba[i::8] = bytes((hi[i],)) * BLOCK_CTRS
            if len(self.cache) >= 4:
                self.cache.clear()
            b = self.cache[k] = memoryview(bytes(ba))
        return b


class Checker:
    def __init__(self):
        self.pat = Pattern()
        self.voff = 0            # offset in the ideal stream of the next byte expected
        self.bytes = 0           # bytes received
        self.skipped = 0         # counter values missing
        self.repeated = 0        # counter values received again
        self.garbage = 0         # bytes that fit nowhere (between a mismatch and the resync)
        self.lost_bytes = 0
        self.first_mismatch = None   # offset in the received stream
        self.events = []         # (received offset, expected counter, counter found) per resync
        self.pending = None      # bytes under resynchronisation
        self.scan = 0            # where in them the search resumes

    def lost(self):
        """Bytes off the ideal stream: per resync, the bytes of the counters skipped or those that
        fit nowhere, whichever is more (a corrupted counter is one, not both), or the bytes of the
        counters repeated plus those that fit nowhere; and what is still unresolved."""
        return self.lost_bytes + (len(self.pending) if self.pending else 0)

    def feed(self, mv):
        n = len(mv)
        if self.pending is not None:
            self.pending += mv
            self.bytes += n
            self._resync()
            return
        i = 0
        while i < n:
            k, o = divmod(self.voff, BLOCK)
            exp = self.pat.block(k)
            m = min(n - i, BLOCK - o)
            if mv[i:i + m] != exp[o:o + m]:
                j = self._first_diff(mv[i:i + m], exp[o:o + m])
                if self.first_mismatch is None:
                    self.first_mismatch = self.bytes + i + j
                # Back to the start of the counter the mismatch is in: what precedes it matched.
                back = (self.voff + j) % 8
                self.voff += j - back
                start = i + j - back
                self.bytes += start
                self.pending = bytearray()
                self.scan = 0
                self.feed(mv[start:])
                return
            i += m
            self.voff += m
        self.bytes += n

    @staticmethod
    def _first_diff(a, b):
        lo, hi = 0, len(a)          # a[:lo] == b[:lo]; a[:hi] != b[:hi]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if a[:mid] == b[:mid]:
                lo = mid
            else:
                hi = mid
        return lo

    def _resync(self):
        p = self.pending
        want = self.voff // 8
        limit = len(p) - 24
        for s in range(self.scan, limit + 1):
            c = int.from_bytes(p[s:s + 8], "little")
            if abs(c - want) > PLAUSIBLE:
                continue
            if int.from_bytes(p[s + 8:s + 16], "little") == c + 1 and int.from_bytes(p[s + 16:s + 24], "little") == c + 2:
                self.garbage += s
                if c >= want:
                    self.skipped += c - want
                    self.lost_bytes += max(8 * (c - want), s)
                else:
                    self.repeated += want - c
                    self.lost_bytes += 8 * (want - c) + s
                if len(self.events) < 100:
                    self.events.append({"offset": self.bytes - len(p) + s, "expected": want, "found": c})
                self.voff = c * 8
                rest = bytes(p[s:])
                self.pending = None
                self.bytes -= len(rest)
                self.feed(memoryview(rest))
                return
        self.scan = max(self.scan, limit + 1)
        if len(p) > RESYNC_MAX:
            keep = p[-23:]
            self.garbage += len(p) - len(keep)
            self.lost_bytes += len(p) - len(keep)
            self.pending = bytearray(keep)
            self.scan = 0


class Timing:
    """Bytes per 10 ms bucket from the first data on, and the gaps between receptions."""

    def __init__(self):
        self.t0 = None
        self.last = None
        self.buckets = []
        self.stall = (0.0, None)     # (seconds, monotonic time it started)
        self.stalls = []             # every gap over 50 ms: (start, seconds)
        self.gaps = []               # every gap over 5 ms (for the gap at the switch-over)

    def add(self, now, n):
        if self.t0 is None:
            self.t0 = self.last = now
        gap = now - self.last
        if gap > self.stall[0]:
            self.stall = (gap, self.last)
        if gap > 0.05 and len(self.stalls) < 1000:
            self.stalls.append((self.last, gap))
        if gap > 0.005 and len(self.gaps) < 200000:
            self.gaps.append((self.last, gap))
        self.last = now
        b = int((now - self.t0) / BUCKET)
        if b >= len(self.buckets):
            self.buckets.extend([0] * (b + 1 - len(self.buckets)))
        self.buckets[b] += n

    def finish(self, now):
        """A stream that stopped: the time since its last data is a stall too."""
        if self.last is not None and now - self.last > self.stall[0]:
            self.stall = (now - self.last, self.last)
            self.stalls.append((self.last, now - self.last))
        if self.last is not None:
            self.gaps.append((self.last, now - self.last))

    def longest_within(self, a, b):
        """The longest gap that overlaps [a, b] (seconds, or 0)."""
        return max((g for t, g in self.gaps if t <= b and t + g >= a), default=0.0)

    def bytes_between(self, a, b):
        """Bytes in the buckets whose start lies in [a, b) (monotonic times)."""
        if self.t0 is None:
            return 0
        i = max(0, int((a - self.t0) / BUCKET))
        j = max(0, int((b - self.t0) / BUCKET))
        return sum(self.buckets[i:j])


def read_marks(path):
    marks = {}
    if path and os.path.exists(path):
        for l in open(path):
            f = l.split()
            if len(f) == 2:
                try:
                    marks[f[0]] = float(f[1])
                except ValueError:
                    pass
    return marks


def connect(host, port, timeout):
    end = time.monotonic() + timeout
    err = None
    while time.monotonic() < end and not STOP["flag"]:
        s = socket.socket()
        s.settimeout(max(0.1, min(2.0, end - time.monotonic())))
        try:
            s.connect((host, port))
            return s
        except OSError as e:
            err = e
            s.close()
            time.sleep(0.2)
    raise SystemExit("netclient: cannot connect to %s:%d within %d s: %s" % (host, port, timeout, err))


STOP = {"flag": False, "why": None}


def on_signal(sig, _frame):
    STOP["flag"] = True
    STOP["why"] = signal.Signals(sig).name


def run_stream(a):
    host, port = a.connect.rsplit(":", 1)
    s = connect(host, int(port), a.connect_timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(0.05)
    print("connected to %s:%s mode %s at %.6f" % (host, port, a.mode, time.monotonic()), flush=True)
    t_start = time.monotonic()
    deadline = t_start + a.seconds if a.seconds else None
    chk, tm = Checker(), Timing()
    pat = chk.pat
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    next_poll = 0.0
    end = "stopped"
    sent = 0                 # sink: offset of the next byte to send
    while True:
        now = time.monotonic()
        if now >= next_poll:
            next_poll = now + 0.05
            if STOP["flag"]:
                end = STOP["why"]; break
            if a.stop and os.path.exists(a.stop):
                end = "stop-file"; break
            if deadline and now >= deadline:
                end = "seconds"; break
        try:
            if a.mode == "source":
                n = s.recv_into(buf)
                if n == 0:
                    end = "eof"; break
                now = time.monotonic()
                chk.feed(view[:n])
            else:
                k, o = divmod(sent, BLOCK)
                n = s.send(pat.block(k)[o:])
                now = time.monotonic()
                sent += n
                chk.bytes += n
            tm.add(now, n)
        except socket.timeout:
            continue
        except InterruptedError:
            continue
        except OSError as e:
            end = "error: %s" % e; break
    t_end = time.monotonic()
    tm.finish(t_end)
    s.close()
    return report(a, chk, tm, t_start, t_end, end)


def report(a, chk, tm, t_start, t_end, end):
    marks = read_marks(a.marks)
    ms, me = marks.get("migrate-start"), marks.get("migrate-end")
    first = tm.t0 if tm.t0 is not None else t_start

    def rate(t0, t1):
        if t0 is None or t1 is None or t1 - t0 <= 0:
            return None
        return round(tm.bytes_between(t0, t1) / 1e6 / (t1 - t0), 2)
    res = {
        "mode": a.mode, "connect": a.connect, "end": end,
        "bytes": chk.bytes, "lost": chk.lost(),
        "skipped_counters": chk.skipped, "repeated_counters": chk.repeated, "garbage_bytes": chk.garbage,
        "unresolved_bytes": len(chk.pending) if chk.pending else 0,
        "first_mismatch": chk.first_mismatch, "resyncs": chk.events,
        "longest_stall_ms": round(tm.stall[0] * 1000, 1),
        "longest_stall_at": tm.stall[1],
        "stalls_over_50ms": [{"at": round(t, 6), "ms": round(g * 1000, 1)} for t, g in tm.stalls],
        "t_connect": t_start, "t_first_data": tm.t0, "t_last_data": tm.last, "t_end": t_end,
        "marks": marks,
        "mbps_total": rate(first, t_end),
        "bucket_s": BUCKET, "buckets": tm.buckets,
    }
    if tm.stall[1] is not None:
        res["longest_stall_from_start_s"] = round(tm.stall[1] - first, 3)
        if ms is not None:
            res["longest_stall_from_migrate_start_ms"] = round((tm.stall[1] - ms) * 1000, 1)
        if me is not None:
            res["longest_stall_from_migrate_end_ms"] = round((tm.stall[1] - me) * 1000, 1)
    if ms is not None and me is not None:
        # The stall the switch-over caused: the longest gap overlapping the migration, up to
        # 0.5 s after it ended (a gap before the migration is the stream's own).
        res["switch_stall_ms"] = round(tm.longest_within(ms, me + 0.5) * 1000, 1)
    if ms is not None:
        res["mbps_before"] = rate(first, ms)
        res["bytes_before"] = tm.bytes_between(first, ms)
    if ms is not None and me is not None:
        res["mbps_during"] = rate(ms, me)
        res["bytes_during"] = tm.bytes_between(ms, me)
    if me is not None:
        res["mbps_after"] = rate(me, t_end)
        res["bytes_after"] = tm.bytes_between(me, t_end + BUCKET)
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, a.out)
    if chk.first_mismatch is not None:
        print("mismatch at byte %d; skipped %d counters, repeated %d, %d bytes fit nowhere" % (
            chk.first_mismatch, chk.skipped, chk.repeated, chk.garbage + res["unresolved_bytes"]))
    print("end: %s; MB/s before %s, during %s, after %s" % (
        end, res.get("mbps_before"), res.get("mbps_during"), res.get("mbps_after")))
    print("stream: %d bytes, %d lost, longest stall %.1f ms" % (chk.bytes, chk.lost(), tm.stall[0] * 1000),
          flush=True)
    return 0


def checksum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b[:len(b) // 2 * 2]))
    if len(b) % 2:
        s += b[-1] << 8
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ping(a):
    """ICMP echo over a raw socket: the round trip time through the shaped wires."""
    dst = socket.gethostbyname(a.ping)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    rtts = []
    end_all = time.monotonic() + a.connect_timeout + a.count
    seq = 0
    while len(rtts) < a.count and time.monotonic() < end_all and not STOP["flag"]:
        seq += 1
        payload = b"tern-ping" + bytes(47)
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        pkt = struct.pack("!BBHHH", 8, 0, checksum(hdr + payload), ident, seq) + payload
        t0 = time.monotonic()
        s.sendto(pkt, (dst, 0))
        deadline = t0 + 1.0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([s], [], [], left)
            if not r:
                break
            data, src = s.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if src[0] == dst and typ == 0 and rid == ident and rseq == seq:
                rtts.append((time.monotonic() - t0) * 1000)
                break
        time.sleep(max(0.0, a.interval - (time.monotonic() - t0)))
    res = {"ping": dst, "sent": seq, "received": len(rtts), "rtt_ms": [round(x, 3) for x in rtts]}
    if a.out:
        json.dump(res, open(a.out, "w"), indent=1)
    print(json.dumps(res))
    if not rtts:
        print("rtt: no reply from %s" % dst)
        return 1
    print("rtt: %.3f/%.3f/%.3f ms" % (min(rtts), sum(rtts) / len(rtts), max(rtts)), flush=True)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connect", help="HOST:PORT of the guest (5002 source, 5001 sink)")
    ap.add_argument("--mode", choices=("source", "sink"), default="source")
    ap.add_argument("--marks", help="file of 'NAME MONOTONIC_TIME' lines (migrate-start, migrate-end)")
    ap.add_argument("--stop", help="stop once this file exists")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0: no limit)")
    ap.add_argument("--out", help="JSON results")
    ap.add_argument("--connect-timeout", type=float, default=30)
    ap.add_argument("--ping", metavar="HOST", help="measure the round trip time instead")
    ap.add_argument("--count", type=int, default=10, help="--ping: echo requests")
    ap.add_argument("--interval", type=float, default=0.1, help="--ping: seconds between requests")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if a.ping:
        return ping(a)
    if not a.connect:
        ap.error("--connect HOST:PORT or --ping HOST")
    return run_stream(a)


if __name__ == "__main__":
    sys.exit(main())
