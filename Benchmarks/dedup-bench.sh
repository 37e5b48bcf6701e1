#!/usr/bin/env bash
# Inline dedup, measured two ways, in one run:
#
# 1. ratio  How close `strata serve` on a dedup image comes to the ideal on the data set of
#           Benchmarks/dedup-dataset.sh (two /usr-filled ext4 images, A and B). For 4 KiB and
#           64 KiB clusters: a fresh `strata create -o cluster_size=N,dedup=on` image holds A
#           at offset 0 and B right after it (1 MiB aligned), as two regions of one disk; each
#           is copied in over NBD with nbdcopy through nbdkit's offset filter (captive nbdkit
#           in front of `strata serve`, so nbdcopy's zero detection and parallel requests are
#           kept). Then the server stops and the table shows the clusters Strata stores
#           (`strata info --space`) against the distinct non-zero cluster contents of A and B
#           ("ideal"), the file size, the copy time, `qemu-img check` and a `qemu-img compare`
#           of each region against its source image. The same copy into an image without
#           dedup (PLAIN_COPY=1) gives the copy time without dedup, for reference.
# 2. write  Write throughput over NBD with fio's nbd engine: a 4 KiB-cluster dedup image
#           (strata-dedup) against a plain 64 KiB-cluster image (strata-plain); for reference,
#           strata on a 4 KiB image without dedup (strata-4k) and qemu-nbd on a 64 KiB image.
#           Same fio jobs on each; fio makes content of which
#           $DEDUPE_PCT% of the blocks repeat (dedupe_percentage) and is $COMPRESS_PCT%
#           compressible. Per server and round, on a fresh disk:
#             seq-write-1M   sequential 1 MiB writes over the whole disk, depth $DEPTH
#             rand-write-4K  random 4 KiB writes, depth $DEPTH, $RUNTIME seconds (overwrites)
#           Rounds alternate the order of the servers; the table shows medians and the ratio
#           strata-dedup/strata-plain (IOPS).
#
#   Benchmarks/dedup-bench.sh [ratio] [write]      (default: both)
#
# Settings (environment):
#   CLUSTERS="4096 65536"  cluster sizes of the ratio part
#   PLAIN_COPY=1           also copy A and B into an image without dedup (same cluster size):
#                          the copy time without dedup, for reference (0: skip)
#   NBDCOPY_OPTS=""        more nbdcopy options for the ratio part, e.g. "--connections=1
#                          --requests=1" to copy one request at a time (no concurrent writes)
#   ROUNDS=3 RUNTIME=10 DEPTH=8 SIZE=1G   the write part (SIZE: disk size and fio's span)
#   DEDUPE_PCT=50 COMPRESS_PCT=50         fio's content
#   QEMU_REF=1             also run qemu-nbd in the write part (0: skip it)
#   PLAIN4K=1              also run strata on a 4 KiB-cluster image without dedup (strata-4k),
#                          which tells the cost of small clusters from the cost of dedup (0: skip)
#   STRATA=path            the strata binary; default: build it (release) in $STRATA_SCRATCH
#   STRATA_SCRATCH=<repo>/.build-strata
#   WORKDIR=dir            where images and sockets go (default: a new folder under ${TMPDIR:-/tmp});
#                          the data set is made in WORKDIR/data, and kept there for a
#                          later run with the same WORKDIR (REUSE=0 makes it again)
#   KEEP=1                 keep WORKDIR afterwards
#   OUT=file               the tables (default: Benchmarks/results/DATE-dedup-bench.txt)
#
# Installs nothing: it says which Debian package is missing and stops.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PARTS=("$@")
((${#PARTS[@]})) || PARTS=(ratio write)
CLUSTERS=${CLUSTERS:-4096 65536}
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
DEPTH=${DEPTH:-8}
SIZE=${SIZE:-1G}
DEDUPE_PCT=${DEDUPE_PCT:-50}
COMPRESS_PCT=${COMPRESS_PCT:-50}
QEMU_REF=${QEMU_REF:-1}
NBDCOPY_OPTS=${NBDCOPY_OPTS:-}
PLAIN_COPY=${PLAIN_COPY:-1}
PLAIN4K=${PLAIN4K:-1}
STRATA_SCRATCH=${STRATA_SCRATCH:-$REPO/.build-strata}
OUT=${OUT:-$HERE/results/$(date +%Y-%m-%d)-dedup-bench.txt}

source "$HERE/lib.sh"
require_tools dedup-bench fio:fio qemu-img:qemu-utils qemu-nbd:qemu-utils nbdkit:nbdkit nbdcopy:libnbd-bin python3:python3 mkfs.ext4:e2fsprogs
if ! fio --enghelp 2>/dev/null | grep -qw nbd; then
    echo "dedup-bench: this fio has no nbd engine (Debian's fio 3.33 has it)" >&2
    exit 2
fi

find_strata dedup-bench

WORKDIR=${WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/strata-dedup-bench.XXXXXX")}
mkdir -p "$WORKDIR/fio"
cleanup() {
    stop_server 60
    if [[ "${KEEP:-0}" == 1 ]]; then echo "dedup-bench: kept $WORKDIR" >&2; else rm -rf "$WORKDIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts a server (strata or qemu-nbd) on IMAGE at socket SOCK; sets SERVER_PID.
start_server() {
    local kind=$1 image=$2
    SOCK="$WORKDIR/$kind.sock"
    rm -f "$SOCK"
    case $kind in
    strata*) "$STRATA" serve --socket "$SOCK" -f qcow2 "$image" >"$WORKDIR/$kind.log" 2>&1 & ;;
    qemu-nbd) qemu-nbd --persistent -e 8 -f qcow2 --cache=writeback --socket="$SOCK" "$image" \
                  >"$WORKDIR/$kind.log" 2>&1 & ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 1 200); do
        [[ -S "$SOCK" ]] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.05
    done
    echo "dedup-bench: $kind did not start; its log:" >&2
    cat "$WORKDIR/$kind.log" >&2
    exit 1
}

now() { date +%s.%N; }
{
echo "dedup-bench $(date '+%Y-%m-%d %H:%M'), strata $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
} >"$OUT"

# ---------------------------------------------------------------- 1. ratio against the ideal
run_ratio() {
    local data="$WORKDIR/data"
    KEEP=1 REUSE=${REUSE:-1} OUT="$WORKDIR/dataset.txt" "$HERE/dedup-dataset.sh" "$data" >&2
    local a="$data/a.img" b="$data/b.img"
    local size_a size_b off_b total
    size_a=$(stat -c %s "$a"); size_b=$(stat -c %s "$b")
    off_b=$(( (size_a + (1 << 20) - 1) >> 20 << 20 ))
    total=$(( off_b + ((size_b + (1 << 20) - 1) >> 20 << 20) ))
    local rows="$WORKDIR/ratio.rows"
    : >"$rows"
    local modes=(dedup)
    [[ "$PLAIN_COPY" == 1 ]] && modes+=(plain)
    for cs in $CLUSTERS; do
      for mode in "${modes[@]}"; do
        local img="$WORKDIR/$mode-$cs.qcow2" opts="cluster_size=$cs"
        [[ $mode == dedup ]] && opts+=",dedup=on"
        rm -f "$img" "$img.dedup-index"
        "$STRATA" create -q -f qcow2 -o "$opts" "$img" "$total"
        start_server strata "$img"
        echo "dedup-bench: ratio, $cs-byte clusters, $mode: copying A and B into $img" >&2
        local t0 t1 t2
        t0=$(now)
        for region in "$a 0 $size_a" "$b $off_b $size_b"; do
            set -- $region
            # nbdkit serves the region [offset, offset+range) of the strata export; nbdcopy
            # writes the image into it (flushing at the end).
            nbdkit -U - --filter=offset nbd socket="$SOCK" offset="$2" range="$3" \
                --run "nbdcopy --target-is-zero $NBDCOPY_OPTS -- '$1' \"\$uri\""
        done
        t1=$(now)
        stop_server 60 # finishes requests, flushes and closes the image
        t2=$(now)
        local check compare_a compare_b
        check=$(qemu-img check -q "$img" >/dev/null 2>&1 && echo clean || echo "rc=$?")
        region_json() { printf 'json:{"driver":"raw","offset":%s,"size":%s,"file":{"driver":"qcow2","file":{"driver":"file","filename":"%s"}}}' "$1" "$2" "$img"; }
        compare_a=$(qemu-img compare -q -f raw "$a" "$(region_json 0 "$size_a")" && echo same || echo DIFFERS)
        compare_b=$(qemu-img compare -q -f raw "$b" "$(region_json "$off_b" "$size_b")" && echo same || echo DIFFERS)
        "$STRATA" info --space --output json "$img" >"$WORKDIR/info-$mode-$cs.json"
        echo "$mode $cs $(stat -c %s "$img") $(du -B1 "$img" | cut -f1) $t0 $t1 $t2 $check $compare_a $compare_b" >>"$rows"
        [[ "${KEEP:-0}" == 1 ]] || rm -f "$img" "$img.dedup-index"
      done
    done
    python3 - "$WORKDIR" "$rows" "$size_a" "$size_b" "$off_b" <<'PY' | tee -a "$OUT"
import json, os, sys
work, rows, size_a, size_b, off_b = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
ideal = {}
for line in open(os.path.join(work, "data", "ideal.txt")):
    cs, nonzero, distinct = map(int, line.split())
    ideal[cs] = (nonzero, distinct)
print("1. dedup ratio: A (%.2f GiB) at offset 0, B (%.2f GiB) at %d, copied over NBD into one dedup=on image"
      % (size_a / 2**30, size_b / 2**30, off_b))
print("   (nbdcopy %sthrough nbdkit's offset filter into strata serve; ideal = distinct non-zero clusters of A and B)" % (os.environ.get("NBDCOPY_OPTS", "") + " " if os.environ.get("NBDCOPY_OPTS") else ""))
head = "%-14s %10s %10s %10s %10s %9s %10s %10s %8s %8s %6s %6s %6s" % (
    "cluster", "non-zero", "referenced", "ideal", "stored", "stored/", "file", "allocated", "copy", "close", "check", "cmp A", "cmp B")
print(head)
print("%-14s %10s %10s %10s %10s %9s %10s %10s %8s %8s" % ("", "clusters", "clusters", "clusters", "clusters", "ideal", "MiB", "MiB", "s", "s"))
print("-" * len(head))
for line in open(rows):
    mode, cs, fsize, alloc, t0, t1, t2, check, ca, cb = line.split()
    cs, fsize, alloc = int(cs), int(fsize), int(alloc)
    t0, t1, t2 = float(t0), float(t1), float(t2)
    data = json.load(open(os.path.join(work, "info-%s-%d.json" % (mode, cs))))["format-specific"]["data"]
    stored, referenced = data["stored-clusters"], data["referenced-clusters"]
    nonzero, distinct = ideal[cs]
    print("%-14s %10d %10d %10d %10d %8.1f%% %10.1f %10.1f %8.1f %8.1f %6s %6s %6s" % (
        "%d KiB %s" % (cs // 1024, mode), nonzero, referenced, distinct, stored, 100.0 * stored / distinct,
        fsize / 2**20, alloc / 2**20, t1 - t0, t2 - t1, check, ca, cb))
    print("%-14s copy %.0f MiB/s of non-zero data; stored data %.1f MiB, ideal %.1f MiB, without dedup %.1f MiB"
          % ("", nonzero * cs / 2**20 / (t1 - t0), stored * cs / 2**20, distinct * cs / 2**20, nonzero * cs / 2**20))
print("goal: stored/ideal at most ~101%")
print()
PY
}

# ---------------------------------------------------------------- 2. write throughput
run_write() {
    local servers=(strata-dedup strata-plain)
    [[ "$PLAIN4K" == 1 ]] && servers+=(strata-4k)
    [[ "$QEMU_REF" == 1 ]] && servers+=(qemu-nbd)
    local content=(--dedupe_percentage="$DEDUPE_PCT" --buffer_compress_percentage="$COMPRESS_PCT" --refill_buffers=1)
    echo "dedup-bench: write, $ROUNDS rounds x ${#servers[@]} servers; disk $SIZE; work in $WORKDIR" >&2
    for round in $(seq 1 "$ROUNDS"); do
        local order=("${servers[@]}")
        if ((round % 2 == 0)); then
            order=(); for ((i = ${#servers[@]} - 1; i >= 0; i--)); do order+=("${servers[i]}"); done
        fi
        for server in "${order[@]}"; do
            echo "dedup-bench: round $round/$ROUNDS: $server" >&2
            local img="$WORKDIR/$server.qcow2"
            rm -f "$img" "$img.dedup-index"
            case $server in
            strata-dedup) "$STRATA" create -q -f qcow2 -o cluster_size=4096,dedup=on "$img" "$SIZE" ;;
            strata-plain) "$STRATA" create -q -f qcow2 -o cluster_size=65536 "$img" "$SIZE" ;;
            strata-4k) "$STRATA" create -q -f qcow2 -o cluster_size=4096 "$img" "$SIZE" ;;
            qemu-nbd) qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" "$SIZE" ;;
            esac
            sync
            start_server "$server" "$img"
            for profile in seq-write-1M rand-write-4K; do
                local args=(--rw=write --bs=1M)
                [[ $profile == rand-write-4K ]] && args=(--rw=randwrite --bs=4k --time_based --runtime="$RUNTIME")
                fio --name="$profile" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --size="$SIZE" \
                    --iodepth="$DEPTH" "${content[@]}" "${args[@]}" \
                    --output-format=json --output="$WORKDIR/fio/$server.$profile.$round.json" >/dev/null
            done
            stop_server 60
            if [[ $server == strata-dedup ]]; then
                "$STRATA" info --space --output json "$img" >"$WORKDIR/fio/$server.space.$round.json"
            fi
            rm -f "$img" "$img.dedup-index"
        done
    done
    python3 - "$WORKDIR/fio" "$ROUNDS" "${servers[*]}" "$SIZE" "$DEPTH" "$RUNTIME" "$DEDUPE_PCT" "$COMPRESS_PCT" <<'PY' | tee -a "$OUT"
import json, os, statistics, sys
d, rounds, servers = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
size, depth, runtime, dedupe, compress = sys.argv[4:]
profiles = ["seq-write-1M", "rand-write-4K"]
def sample(s, p, r):
    job = json.load(open(os.path.join(d, f"{s}.{p}.{r}.json")))["jobs"][0]["write"]
    return job["iops"], job["bw_bytes"] / 2**20
print(f"2. write throughput over NBD (fio nbd engine, Unix socket, fresh {size} disk, depth {depth}, "
      f"dedupe_percentage={dedupe}, buffer_compress_percentage={compress}; rand-write-4K {runtime} s after the sequential pass)")
print(f"   strata-dedup: cluster_size=4096,dedup=on; strata-4k: cluster_size=4096; strata-plain and qemu-nbd: 64 KiB clusters; median of {rounds} rounds, order alternating")
head = f"{'profile':<14}" + "".join(f"{s + ' IOPS':>19}{'MiB/s':>8}" for s in servers) + f"{'dedup/plain':>13}"
if "strata-4k" in servers:
    head += f"{'dedup/4k':>10}"
if "qemu-nbd" in servers:
    head += f"{'dedup/qemu-nbd':>16}"
print(head)
print("-" * len(head))
for p in profiles:
    med = {}
    for s in servers:
        xs = [sample(s, p, r) for r in range(1, rounds + 1)]
        med[s] = (statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs), [round(x[0]) for x in xs])
    line = f"{p:<14}" + "".join(f"{med[s][0]:>19.0f}{med[s][1]:>8.0f}" for s in servers)
    line += f"{med['strata-dedup'][0] / med['strata-plain'][0]:>13.2f}"
    if "strata-4k" in servers:
        line += f"{med['strata-dedup'][0] / med['strata-4k'][0]:>10.2f}"
    if "qemu-nbd" in servers:
        line += f"{med['strata-dedup'][0] / med['qemu-nbd'][0]:>16.2f}"
    print(line)
    print(f"{'':<14}per round: " + "; ".join(f"{s} {med[s][2]}" for s in servers))
for r in range(1, rounds + 1):
    f = os.path.join(d, f"strata-dedup.space.{r}.json")
    if os.path.exists(f):
        x = json.load(open(f))["format-specific"]["data"]
        print(f"strata-dedup round {r}: referenced {x['referenced-clusters']} clusters, stored {x['stored-clusters']} "
              f"({100.0 * x['stored-clusters'] / max(x['referenced-clusters'], 1):.1f}%), bytes saved {x['bytes-saved'] / 2**20:.0f} MiB")
print("goal: dedup/plain >= 0.70")
print()
PY
}

for part in "${PARTS[@]}"; do
    case $part in
    ratio) run_ratio ;;
    write) run_write ;;
    *) echo "dedup-bench: unknown part '$part' (ratio, write)" >&2; exit 2 ;;
    esac
done
echo "dedup-bench: tables written to $OUT" >&2
