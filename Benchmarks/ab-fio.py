#!/usr/bin/python3
"""Two (or more) strata binaries, one fio profile set, rounds alternating: the before/after
figures of one change to the NBD data path.

    Benchmarks/ab-fio.py OLD_STRATA NEW_STRATA

Serves one fully written 1 GiB qcow2 image (64 KiB clusters, made once with qemu-img and
qemu-io in $WORK, default /tmp/strata-ab) with `strata serve --socket --cache writeback`,
and runs each fio profile (nbd engine) against each binary in turn. Prints, per profile and
binary, the median IOPS, p50 and p99 completion latency over the rounds, the rounds' min-max
and the ratio of the last binary to the first.

Environment: ROUNDS (default 2), RT (seconds per profile, default 5), PROFILES (space-
separated rw,bs,depth triples; default "randread,4k,1 randread,4k,16 read,1M,4"; writes
overwrite the image in place).
"""
import json, os, statistics, subprocess, sys, time

bins = sys.argv[1:]
if len(bins) < 2:
    sys.exit(__doc__)
rounds = int(os.environ.get("ROUNDS", "2"))
rt = os.environ.get("RT", "5")
profiles = [tuple(p.split(",")) for p in os.environ.get("PROFILES", "randread,4k,1 randread,4k,16 read,1M,4").split()]
work = os.environ.get("WORK", "/tmp/strata-ab")
os.makedirs(work, exist_ok=True)
img, sock = f"{work}/img.qcow2", f"{work}/s.sock"
if not os.path.exists(img):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img, "1G"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1G", img], check=True, stdout=subprocess.DEVNULL)
subprocess.run(["sh", "-c", f"cat {img} >/dev/null"])
results = {}
for r in range(rounds):
    for b in (bins if r % 2 == 0 else bins[::-1]):
        if os.path.exists(sock):
            os.unlink(sock)
        server = subprocess.Popen([b, "serve", "--socket", sock, "--cache", "writeback", "-f", "qcow2", img],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        for rw, bs, depth in profiles:
            out = subprocess.run(["fio", "--name=ab", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}", "--size=1G",
                                  f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}", "--time_based", f"--runtime={rt}",
                                  "--output-format=json"], capture_output=True, text=True, check=True).stdout
            side = json.loads(out[out.index("{"):])["jobs"][0]["read" if "read" in rw else "write"]
            pct = side["clat_ns"]["percentile"]
            results.setdefault((b, rw, bs, depth), []).append(
                (side["iops"], pct["50.000000"] / 1000, pct["99.000000"] / 1000))
        server.terminate()
        server.wait()
for rw, bs, depth in profiles:
    line, medians = f"{rw}-{bs}-qd{depth}:", []
    for b in bins:
        xs = results[(b, rw, bs, depth)]
        m = statistics.median(x[0] for x in xs)
        medians.append(m)
        line += (f"  {b}: {m:.0f} IOPS (p50 {statistics.median(x[1] for x in xs):.0f} us,"
                 f" p99 {statistics.median(x[2] for x in xs):.0f} us) [{min(x[0] for x in xs):.0f}-{max(x[0] for x in xs):.0f}]")
    print(line + f"  last/first {medians[-1] / medians[0]:.2f}")
