"""One filesystem workload in one process; prints one JSON object. Used by
bench_volumes.py and bench_storage.py, on the host (`python3 fsworker.py ...`) and in a
guest (`fcvm exec --vm -- python3 -c "$(cat fsworker.py)" ...`): one process does the
whole loop, so the figures are the filesystem's, not process spawning under TCG.

    fsworker.py OP DIR N [--drop]

OP:
  seq_write    N MiB to DIR/seq in 1 MiB writes (the same random MiB each time), fsync,
               close: {"seconds", "bytes"}
  seq_read     read DIR/seq in 1 MiB reads into one buffer, then unlink it; every MiB
               is compared with the written one outside the timed calls: {"seconds",
               "bytes"} (seconds = open + reads + close)
  small_files  N x (create + write 100 B + close, stat, unlink) in DIR/small:
               {"seconds", "files"}
  roundtrip    N x getxattr of a name DIR/rt does not have (ENODATA; through FUSE one
               uncached request each): {"seconds", "calls"}
  mkmany       N empty files DIR/many/e-000000...: {"seconds", "files"}
  readdir      os.listdir(DIR/many): {"seconds", "entries"} (must be N)
  rmmany       remove DIR/many and its N entries: {"seconds", "files"}
  findpid      DIR is a marker: the pid of the process whose argv is `sleep DIR`
               (the container's command): {"pid"}
  readahead    the read_ahead_kb of DIR's filesystem's bdi, after setting it to N if
               N > 0: {"read_ahead_kb"}
  fstype       the type of the filesystem DIR is on (from /proc/self/mountinfo, or
               /proc/PID/mountinfo for DIR under /proc/PID/root): {"fstype", "source"}

--drop: before the timed part, sync and drop the page, dentry and inode caches
(`echo 3 > /proc/sys/vm/drop_caches`: for the guest; never pass it on the host).
--cpu: also {"cpu_s": {...}}: CPU seconds spent meanwhile, system-wide by kind (user,
nice, system, idle, iowait, irq, softirq: /proc/stat), by every fcvm-fuse-relay
("relay") and by this process ("worker"; it includes the unlink after seq_read and
the setup outside the timed part). For the guest, where the relay runs.
--fadvise (seq_read only): fsync the file and posix_fadvise(DONTNEED) it first, so
only this file leaves the page cache (a cold read on the host without a global drop).

Exits 1 with a message on stderr when a check fails (a short file, a wrong entry count,
different data).
"""

import json
import os
import sys
import time

MiB = 1 << 20


def pattern():
    # Deterministic, incompressible enough, and cheap to make under TCG.
    seed = bytes(range(256)) * 16  # 4 KiB
    out = bytearray()
    i = 0
    while len(out) < MiB:
        out += seed[i % 256 :] + seed[: i % 256]
        i += 7
    return bytes(out[:MiB])


def fail(msg):
    sys.stderr.write("fsworker: " + msg + "\n")
    sys.exit(1)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def seq_write(d, n):
    buf = pattern()
    path = os.path.join(d, "seq")
    t0 = time.perf_counter()
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    for _ in range(n):
        if os.write(fd, buf) != MiB:
            fail("short write")
    os.fsync(fd)
    os.close(fd)
    dt = time.perf_counter() - t0
    size = os.stat(path).st_size
    if size != n * MiB:
        fail(f"{path} is {size} bytes, wrote {n * MiB}")
    return {"seconds": dt, "bytes": size}


def seq_read(d, n, fadvise=False):
    expect = pattern()
    path = os.path.join(d, "seq")
    if fadvise:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    buf = bytearray(MiB)
    view = memoryview(buf)
    total = 0
    bad = 0
    timed = 0.0
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    timed += time.perf_counter() - t0
    while True:
        t0 = time.perf_counter()
        k = os.readv(fd, [view])
        timed += time.perf_counter() - t0
        if k == 0:
            break
        if k < MiB:  # finish the MiB (a short read may happen at any size)
            got = k
            while got < MiB:
                t0 = time.perf_counter()
                m = os.readv(fd, [view[got:]])
                timed += time.perf_counter() - t0
                if m == 0:
                    break
                got += m
            k = got
        if (buf if k == MiB else bytes(view[:k])) != expect[:k]:  # (memcmp)
            bad += 1
        total += k
    t0 = time.perf_counter()
    os.close(fd)
    timed += time.perf_counter() - t0
    os.unlink(path)
    if total != n * MiB:
        fail(f"read {total} bytes of {n * MiB}")
    if bad:
        fail(f"{bad} MiB blocks read back different")
    return {"seconds": timed, "bytes": total}


def small_files(d, n):
    top = os.path.join(d, "small")
    os.mkdir(top)
    data = b"x" * 100
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    t0 = time.perf_counter()
    for i in range(n):
        p = f"{top}/f{i}"
        fd = os.open(p, flags, 0o644)
        os.write(fd, data)
        os.close(fd)
        if os.stat(p).st_size != 100:
            fail(f"{p}: wrong size")
        os.unlink(p)
    dt = time.perf_counter() - t0
    os.rmdir(top)
    return {"seconds": dt, "files": n}


def roundtrip(d, n):
    """n x getxattr("user.fcvm-bench-none") of DIR/rt: ENODATA each time, and through a
    FUSE mount one request with nothing cached, so seconds / n is one round trip."""
    path = os.path.join(d, "rt")
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
    os.stat(path)
    t0 = time.perf_counter()
    for _ in range(n):
        try:
            os.getxattr(path, "user.fcvm-bench-none")
            fail("user.fcvm-bench-none exists")
        except OSError:
            pass
    dt = time.perf_counter() - t0
    os.unlink(path)
    return {"seconds": dt, "calls": n}


def mkmany(d, n):
    top = os.path.join(d, "many")
    os.mkdir(top)
    t0 = time.perf_counter()
    for i in range(n):
        os.close(os.open(f"{top}/e-{i:06d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    return {"seconds": time.perf_counter() - t0, "files": n}


def readdir(d, n):
    top = os.path.join(d, "many")
    t0 = time.perf_counter()
    names = os.listdir(top)
    dt = time.perf_counter() - t0
    if len(names) != n:
        fail(f"listed {len(names)} entries of {n}")
    return {"seconds": dt, "entries": len(names)}


def rmmany(d, n):
    top = os.path.join(d, "many")
    t0 = time.perf_counter()
    for i in range(n):
        os.unlink(f"{top}/e-{i:06d}")
    os.rmdir(top)
    return {"seconds": time.perf_counter() - t0, "files": n}


def findpid(marker):
    want = b"sleep\0" + marker.encode() + b"\0"
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if f.read() == want:
                        return {"pid": int(name)}
            except OSError:
                pass
    fail(f"no process runs `sleep {marker}`")


def fstype(d):
    st = os.stat(d).st_dev
    best = None
    parts = d.split("/")  # /proc/PID/root/...: that process's mounts
    pid = parts[2] if d.startswith("/proc/") and parts[3:4] == ["root"] else "self"
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            major, minor = (int(x) for x in fields[2].split(":"))
            if os.makedev(major, minor) == st:
                rf = right.split()
                best = {"fstype": rf[0], "source": rf[1]}
    return best or {"fstype": "?", "source": "?"}


def readahead(d, kb):
    """The read_ahead_kb of DIR's filesystem (its bdi), set first when kb > 0."""
    st = os.stat(d).st_dev
    path = f"/sys/class/bdi/{os.major(st)}:{os.minor(st)}/read_ahead_kb"
    if kb > 0:
        with open(path, "w") as f:
            f.write(str(kb))
    with open(path) as f:
        return {"read_ahead_kb": int(f.read())}


def cpu_now():
    """Guest-wide CPU seconds by kind (/proc/stat), and each fcvm-fuse-relay's."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:8]]
    kinds = ("user", "nice", "system", "idle", "iowait", "irq", "softirq")
    out = {k: v / hz for k, v in zip(kinds, vals, strict=True)}
    relay = 0.0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    st = f.read()
            except OSError:
                continue
            if "(fcvm-fuse-relay)" in st:
                fields = st.rsplit(")", 1)[1].split()
                relay += (int(fields[11]) + int(fields[12])) / hz
    out["relay"] = relay
    t = os.times()
    out["worker"] = t.user + t.system
    return out


def cpu_delta(before):
    after = cpu_now()
    return {k: round(after[k] - before[k], 3) for k in before}


def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    flags = {a for a in argv if a.startswith("--")}
    op, d = args[0], args[1]
    n = int(args[2]) if len(args) > 2 else 0
    if op == "findpid":
        out = findpid(d)
    elif op == "fstype":
        out = fstype(d)
    elif op == "readahead":
        out = readahead(d, n)
    else:
        if "--drop" in flags:
            drop_caches()
        before = cpu_now() if "--cpu" in flags else None
        if op == "seq_read":
            out = seq_read(d, n, fadvise="--fadvise" in flags)
        else:
            fn = {"seq_write": seq_write, "small_files": small_files, "mkmany": mkmany,
                  "readdir": readdir, "rmmany": rmmany, "roundtrip": roundtrip}[op]  # fmt: skip
            out = fn(d, n)
        if before is not None:
            out["cpu_s"] = cpu_delta(before)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
