#!/usr/bin/env bash
# 4 KiB random reads with many internal snapshots and through deep backing chains, strata
# against qemu-img, on the same files in one run (issue 10: "performance with many snapshots
# and deep chains").
#
# Fixtures (qcow2, SIZE, 64 KiB clusters):
#   base          every cluster written (0x5a)
#   snap-N        a copy of base with N internal snapshots (N in SNAPSHOTS, default 0 10 50);
#                 before each snapshot one 64 KiB write lands somewhere else, so the active
#                 L2 tables diverge from the snapshots' as in real use
#   chain-D       the top of a chain of D overlays on base (D in DEPTHS, default 1 5 20):
#                 chain-D -> chain-(D-1) -> ... -> chain-1 -> base. Each overlay holds one
#                 64 KiB write every 64 MiB (so every layer has its L2 tables), the rest of
#                 the data is in base: nearly every read walks the whole chain
#
# Each round runs, on each fixture, alternating which tool goes first:
#   strata random   strata bench --access random -c COUNT -d 64 -s 4k  (uniform 4 KiB-aligned offsets)
#   strata stride   strata bench -c COUNT -d 64 -s 4k -S 4k*1021       (scattered, the same offsets
#   qemu stride     qemu-img bench -c COUNT -d 64 -s 4k -S 4k*1021      as qemu-img's, which has no
#                                                                        random pattern)
# (strata wraps the stride modulo size - 4k as qemu does since ff2ab634, qemu-img 7.2 modulo
# the size: the offsets part after the first wrap, both scattered over the whole image.)
# The figure is requests per second by the tool's own clock (strata's elapsed-ns, qemu-img's
# "Run completed in"), the median of ROUNDS, and the CPU time (user + system) per request of
# the whole process; "vs ref" is each tool's figure over its own figure on the reference
# fixture (snap-0 for the snapshots, chain-1 for the chains).
# Goal: strata's random-read figure stays within 10% of its own reference (vs ref >= 0.90).
#
# Settings (environment):
#   ROUNDS=5  COUNT=75000  SIZE=1G  SNAPSHOTS="0 10 50"  DEPTHS="1 5 20"
#   STRATA=path    the strata binary; default: build it (release) in $STRATA_SCRATCH
#   STRATA_SCRATCH=<repo>/.build-strata
#   WORKDIR=dir    where the images go (default: a new folder under ${TMPDIR:-/tmp})
#   KEEP=1         keep WORKDIR afterwards (and reuse its fixtures on the next run)
#   OUT=file       also write the tables here (default: Benchmarks/results/bench-chains-DATE.txt)
#
# Installs nothing: it says which Debian package is missing and stops.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
COUNT=${COUNT:-75000}
SIZE=${SIZE:-1G}
SNAPSHOTS=${SNAPSHOTS:-"0 10 50"}
DEPTHS=${DEPTHS:-"1 5 20"}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
STRATA_SCRATCH=${STRATA_SCRATCH:-$REPO/.build-strata}
OUT=${OUT:-$HERE/results/bench-chains-$(date +%Y-%m-%d).txt}

source "$HERE/lib.sh"
require_tools bench-chains qemu-img:qemu-utils qemu-io:qemu-utils python3:python3

find_strata bench-chains

WORKDIR=${WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/strata-bench-chains.XXXXXX")}
mkdir -p "$WORKDIR"
cleanup() {
    if [[ "${KEEP:-0}" == 1 ]]; then echo "bench-chains: kept $WORKDIR" >&2; else rm -rf "$WORKDIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

MiB=$((1 << 20))
W=$WORKDIR
if [[ ! -f $W/fixtures-done ]]; then
    echo "bench-chains: making fixtures ($SIZE) in $W" >&2
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$W/base.qcow2" "$SIZE"
    bytes=$(qemu-img info --output json "$W/base.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
    fill=()
    for ((o = 0; o < bytes; o += 64 * MiB)); do fill+=(-c "write -q -P 0x5a $o $(( bytes - o < 64 * MiB ? bytes - o : 64 * MiB ))"); done
    qemu-io -f qcow2 "${fill[@]}" "$W/base.qcow2"

    for n in $SNAPSHOTS; do
        cp --sparse=always "$W/base.qcow2" "$W/snap-$n.qcow2"
        for ((k = 1; k <= n; k++)); do
            qemu-io -f qcow2 -c "write -q -P $((k % 256)) $(( (k * 37 * MiB) % bytes )) 64k" "$W/snap-$n.qcow2"
            qemu-img snapshot -c "s$k" "$W/snap-$n.qcow2"
        done
    done

    prev=base.qcow2
    max_depth=$(tr ' ' '\n' <<<"$DEPTHS" | sort -n | tail -1)
    for ((d = 1; d <= max_depth; d++)); do
        qemu-img create -q -f qcow2 -o cluster_size=65536 -b "$prev" -F qcow2 "$W/chain-$d.qcow2"
        writes=()
        for ((o = 0; o < bytes; o += 64 * MiB)); do writes+=(-c "write -q -P $((d % 256)) $(( o + d * 65536 )) 64k"); done
        qemu-io -f qcow2 "${writes[@]}" "$W/chain-$d.qcow2"
        prev=chain-$d.qcow2
    done
    touch "$W/fixtures-done"
fi

python3 - "$STRATA" "$W" "$ROUNDS" "$COUNT" "$SNAPSHOTS" "$DEPTHS" <<'PY' | tee "$OUT"
import json, re, resource, statistics, subprocess, sys

def run(cmd):
    """Runs cmd (must succeed); its stdout and the CPU seconds (user + system) it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
strata, work, rounds, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
snapshots, depths = sys.argv[5].split(), sys.argv[6].split()
common = ["-c", str(count), "-d", "64", "-s", "4k"]
stride = ["-S", str(4096 * 1021)]

def strata_run(img, flags):
    out, cpu = run([strata, "bench", "--output", "json", "-f", "qcow2", *common, *flags, img])
    return count / (json.loads(out)["elapsed-ns"] / 1e9), cpu / count * 1e6

def qemu_run(img):
    out, cpu = run(["qemu-img", "bench", "-f", "qcow2", *common, *stride, img])
    return count / max(float(re.search(r"Run completed in ([0-9.]+) seconds", out).group(1)), 1e-6), cpu / count * 1e6

def measure(name):
    """Medians of (ops/s, cpu us/op) for strata random, strata stride, qemu-img stride."""
    img = f"{work}/{name}.qcow2"
    sr, ss, qs = [], [], []
    for r in range(rounds):
        runs = [lambda: sr.append(strata_run(img, ["--access", "random"])),
                lambda: ss.append(strata_run(img, stride)),
                lambda: qs.append(qemu_run(img))]
        for f in (runs if r % 2 == 0 else runs[::-1]): f()
    return [(statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for v in (sr, ss, qs)]

print(f"4 KiB reads, depth 64, {count} requests, median of {rounds} rounds")
print("ops/s: requests per second by each tool's own clock; cpu: user+system CPU microseconds per request of the whole process")
print("random: strata --access random; stride: -S 4k*1021 for both tools (qemu-img has no random pattern)")
print("vs ref: the figure over the same tool's figure on the reference fixture (snap-0, chain-1); goal for strata random ops/s >= 0.90")
print()
head = (f"{'fixture':<9}{'strata random':>14}{'vs ref':>7}{'cpu':>7}{'strata stride':>14}{'vs ref':>7}{'cpu':>7}"
        f"{'qemu stride':>12}{'vs ref':>7}{'cpu':>7}{'strata/qemu':>12}")
for title, names in (("Internal snapshots", [f"snap-{n}" for n in snapshots]),
                     ("Backing chain depth (overlays above base)", [f"chain-{d}" for d in depths])):
    print(title)
    print(head)
    print("-" * len(head))
    ref = None
    for name in names:
        m = measure(name)
        ref = ref or m
        cols = "".join(f"{m[k][0]:>{w}.0f}{m[k][0] / ref[k][0]:>7.2f}{m[k][1]:>7.2f}" for k, w in ((0, 14), (1, 14), (2, 12)))
        print(f"{name:<9}{cols}{m[1][0] / m[2][0]:>12.2f}", flush=True)
    print()
PY
