#!/usr/bin/env python3
"""What the target pays to touch guest RAM the first time, per backing (the throughput issue's
"cheap first touch" question), measured in the kernel alone.

    bench/first-touch.py [--size 1G] [--runs 5]

For each backing, maps --size bytes, populates them with MADV_POPULATE_WRITE (the kernel allocates
and zeroes every page, as a first write would, without any user-space loop in the way), then
writes one byte per page again (the cost of a copy into memory that is already there, for
comparison) and unmaps. Backings:
  memfd            shared memory, 4 KiB pages (what tern uses today)
  memfd-thp        shared memory with MADV_HUGEPAGE (only if shmem_enabled allows advise)
  memfd-hugetlb    MFD_HUGETLB, 2 MiB pages (only if huge pages are reserved: vm.nr_hugepages)
  anon             private anonymous, 4 KiB pages (MADV_NOHUGEPAGE)
  anon-thp         private anonymous with MADV_HUGEPAGE
Prints a line per backing: the median populate time and rate, and which page size was used
(AnonHugePages / ShmemHugePages / HugePages from /proc/meminfo during the run).
"""
import argparse, ctypes, mmap, os, statistics, time

libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_HUGEPAGE, MADV_NOHUGEPAGE, MADV_POPULATE_WRITE = 14, 15, 23
MFD_HUGETLB = 4


def meminfo(key):
    for l in open("/proc/meminfo"):
        if l.startswith(key + ":"):
            return int(l.split()[1])
    return 0


def size_of(s):
    return int(float(s[:-1]) * {"M": 1 << 20, "G": 1 << 30}[s[-1]])


def one(kind, size):
    fd = -1
    if kind.startswith("memfd"):
        fd = os.memfd_create("first-touch", MFD_HUGETLB if kind == "memfd-hugetlb" else 0)
        os.ftruncate(fd, size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    else:
        m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    adv = {"anon": MADV_NOHUGEPAGE, "anon-thp": MADV_HUGEPAGE, "memfd-thp": MADV_HUGEPAGE}.get(kind)
    if adv is not None and libc.madvise(addr, size, adv) != 0:
        raise OSError(ctypes.get_errno(), "madvise")
    t0 = time.perf_counter()
    if libc.madvise(addr, size, MADV_POPULATE_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "MADV_POPULATE_WRITE")
    populate = time.perf_counter() - t0
    huge = {k: meminfo(k) for k in ("AnonHugePages", "ShmemHugePages", "HugePages_Total")}
    # A byte per page again: the memory is there now.
    t0 = time.perf_counter()
    for off in range(0, size, 4096 * 64):
        m[off] = 1
    again = time.perf_counter() - t0
    del addr
    m.close()
    if fd >= 0:
        os.close(fd)
    return populate, again, huge


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    size = size_of(a.size)
    shmem = open("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read().strip()
    anon = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
    print("kernel %s; THP enabled: %s; shmem_enabled: %s; nr_hugepages: %s" % (
        os.uname().release, anon, shmem, open("/proc/sys/vm/nr_hugepages").read().strip()))
    for kind in ("memfd", "memfd-thp", "memfd-hugetlb", "anon", "anon-thp"):
        try:
            rs = [one(kind, size) for _ in range(a.runs)]
        except OSError as e:
            print("%-14s unavailable here: %s" % (kind, e))
            continue
        p = statistics.median(r[0] for r in rs)
        huge = rs[-1][2]
        print("%-14s populate %7.1f ms for %s = %5.2f GB/s   (huge pages seen: anon %d kB, shmem %d kB)" % (
            kind, p * 1000, a.size, size / p / 1e9, huge["AnonHugePages"], huge["ShmemHugePages"]))


if __name__ == "__main__":
    main()
