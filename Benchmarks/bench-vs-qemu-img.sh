#!/usr/bin/env bash
# `strata bench` against `qemu-img bench`, same image, same flags, side by side in one run.
#
# One qcow2 image of SIZE, every cluster written, in the page cache (both tools read the same
# file, alternately). For each case, ROUNDS rounds; in each round both tools run once (which
# goes first alternates). The figure is the tool's own timing: strata's `elapsed-ns` from
# `--output json`, qemu-img's "Run completed in X seconds" (neither includes opening the
# image or process start), as requests per second. The table prints the medians, the ratio
# strata/qemu-img (above 1: strata is faster) and strata's median latency percentiles.
#
# Cases (both tools run exactly these flags):
#   seq-read      -c COUNT -d 64 -s 4k                 qemu-img bench's defaults
#   seq-read-d1   -c COUNT -d 1 -s 4k
#   stride-read   -c COUNT -d 64 -s 4k -S 4k*1021      scattered over the whole image (qemu-img
#                                                       has no random pattern; strata's own
#                                                       --access random is in the chains script)
#   seq-read-64k  -c COUNT/4 -d 16 -s 64k
#   seq-write     -w --pattern 0xa5 -c COUNT -d 64 -s 4k   rewrites allocated clusters
#   write-flush   -w --pattern 0xa5 -c COUNT/4 -d 16 -s 4k --flush-interval 64
# (a non-zero pattern, so neither tool may turn the writes into zero clusters)
#
# Settings (environment):
#   ROUNDS=5  COUNT=75000  SIZE=1G
#   STRATA=path    the strata binary; default: build it (release) in $STRATA_SCRATCH
#   STRATA_SCRATCH=<repo>/.build-strata
#   WORKDIR=dir    where the image goes (default: a new folder under ${TMPDIR:-/tmp})
#   KEEP=1         keep WORKDIR afterwards
#   OUT=file       also write the table here (default: Benchmarks/results/bench-vs-qemu-img-DATE.txt)
#
# Installs nothing: it says which Debian package is missing and stops.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
COUNT=${COUNT:-75000}
SIZE=${SIZE:-1G}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
STRATA_SCRATCH=${STRATA_SCRATCH:-$REPO/.build-strata}
OUT=${OUT:-$HERE/results/bench-vs-qemu-img-$(date +%Y-%m-%d).txt}

source "$HERE/lib.sh"
require_tools bench-vs-qemu-img qemu-img:qemu-utils qemu-io:qemu-utils python3:python3

find_strata bench-vs-qemu-img

WORKDIR=${WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/strata-bench-vs-qemu.XXXXXX")}
mkdir -p "$WORKDIR"
cleanup() {
    if [[ "${KEEP:-0}" == 1 ]]; then echo "bench-vs-qemu-img: kept $WORKDIR" >&2; else rm -rf "$WORKDIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

IMG=$WORKDIR/img.qcow2
echo "bench-vs-qemu-img: $ROUNDS rounds, COUNT=$COUNT, a $SIZE qcow2 image in $WORKDIR" >&2
qemu-img create -q -f qcow2 "$IMG" "$SIZE"
# Fill it 64 MiB a request (qemu-io allocates one buffer per request).
bytes=$(qemu-img info --output json "$IMG" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
fill=()
for ((o = 0; o < bytes; o += 64 << 20)); do fill+=(-c "write -q -P 0x5a $o $(( bytes - o < 64 << 20 ? bytes - o : 64 << 20 ))"); done
qemu-io -f qcow2 "${fill[@]}" "$IMG"

python3 - "$STRATA" "$IMG" "$ROUNDS" "$COUNT" <<'PY' | tee "$OUT"
import json, re, resource, statistics, subprocess, sys

def run(cmd):
    """Runs cmd (must succeed); its stdout and the CPU seconds (user + system) it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
strata, img, rounds, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
q = max(count // 4, 1)
cases = [
    ("seq-read",     ["-c", str(count), "-d", "64", "-s", "4k"]),
    ("seq-read-d1",  ["-c", str(count), "-d", "1", "-s", "4k"]),
    ("stride-read",  ["-c", str(count), "-d", "64", "-s", "4k", "-S", str(4096 * 1021)]),
    ("seq-read-64k", ["-c", str(q), "-d", "16", "-s", "64k"]),
    ("seq-write",    ["-w", "--pattern", "0xa5", "-c", str(count), "-d", "64", "-s", "4k"]),
    ("write-flush",  ["-w", "--pattern", "0xa5", "-c", str(q), "-d", "16", "-s", "4k", "--flush-interval", "64"]),
]

def ops(flags):
    return int(flags[flags.index("-c") + 1])

def strata_run(flags):
    out, cpu = run([strata, "bench", "--output", "json", "-f", "qcow2", *flags, img])
    j = json.loads(out)
    return ops(flags) / (j["elapsed-ns"] / 1e9), cpu / ops(flags) * 1e6, j["latency-ns"]

def qemu_run(flags):
    out, cpu = run(["qemu-img", "bench", "-f", "qcow2", *flags, img])
    secs = float(re.search(r"Run completed in ([0-9.]+) seconds", out).group(1))
    return ops(flags) / max(secs, 1e-6), cpu / ops(flags) * 1e6

print(f"median of {rounds} rounds; requests per second by each tool's own clock; ratio strata/qemu-img (above 1: strata is faster)")
print("cpu: user+system CPU microseconds per request of the whole process (start and open included)")
print(f"image: qcow2, every cluster written; strata latency in microseconds (medians of the rounds)")
print()
head = f"{'case':<14}{'strata ops/s':>13}{'qemu ops/s':>12}{'ratio':>7}{'cpu strata':>11}{'cpu qemu':>10}{'p50':>8}{'p99':>8}{'p99.9':>8}   flags"
print(head)
print("-" * len(head))
for name, flags in cases:
    ours, theirs, lats = [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            o = strata_run(flags); t = qemu_run(flags)
        else:
            t = qemu_run(flags); o = strata_run(flags)
        ours.append(o); theirs.append(t)
    mo, mt = statistics.median(x[0] for x in ours), statistics.median(x[0] for x in theirs)
    co, ct = statistics.median(x[1] for x in ours), statistics.median(x[1] for x in theirs)
    p = {k: statistics.median(x[2][k] for x in ours) / 1000 for k in ("p50", "p99", "p99.9")}
    print(f"{name:<14}{mo:>13.0f}{mt:>12.0f}{mo / mt:>7.2f}{co:>11.2f}{ct:>10.2f}{p['p50']:>8.1f}{p['p99']:>8.1f}{p['p99.9']:>8.1f}   {' '.join(flags)}", flush=True)
PY
