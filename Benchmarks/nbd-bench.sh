#!/usr/bin/env bash
# Serve the same workloads from `strata serve`, `qemu-nbd` and `nbdkit file` over Unix
# sockets and compare them with fio's nbd engine, in one run.
#
#   strata serve   a fresh 2 GiB qcow2 image (64 KiB clusters), --cache writeback
#   qemu-nbd       the same kind of image, -f qcow2 --cache=writeback -e 8
#   nbdkit file    a 2 GiB raw file: the protocol's ceiling on this machine
#
# Every round recreates each disk and restarts each server (so the sequential write always
# allocates), and runs the servers one after another in the same order. Per server and
# round, fio runs, in this order, on the same disk:
#
#   seq-write-1M   sequential 1 MiB writes over the whole fresh disk (allocating), depth $SEQ_DEPTH
#   seq-read-1M    sequential 1 MiB reads over the whole disk, depth $SEQ_DEPTH
#   rand-read-4K   random 4 KiB reads, depth 16, for $RUNTIME seconds
#   rand-write-4K  random 4 KiB writes, depth 16, for $RUNTIME seconds (mostly overwrites)
#
# and the table shows the median over the rounds, with the ratios strata/qemu-nbd and
# strata/nbdkit (above 1 means strata is faster).
#
# Settings (environment):
#   ROUNDS=3       rounds
#   RUNTIME=8      seconds per random profile
#   SEQ_DEPTH=4    queue depth of the sequential profiles
#   SIZE=2G        disk size (fio and the images)
#   STRATA=path    the strata binary; default: build it (release) in $STRATA_SCRATCH
#   STRATA_SCRATCH=<repo>/.build-strata
#   WORKDIR=dir    where images and sockets go (default: a new folder under ${TMPDIR:-/tmp})
#   KEEP=1         keep WORKDIR (images, fio JSON) afterwards
#
# Installs nothing: it says which Debian package is missing and stops.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-8}
SEQ_DEPTH=${SEQ_DEPTH:-4}
SIZE=${SIZE:-2G}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
STRATA_SCRATCH=${STRATA_SCRATCH:-$REPO/.build-strata}

source "$HERE/lib.sh"
require_tools nbd-bench fio:fio qemu-nbd:qemu-utils qemu-img:qemu-utils nbdkit:nbdkit python3:python3
if ! fio --enghelp 2>/dev/null | grep -qw nbd; then
    echo "nbd-bench: this fio has no nbd engine (Debian's fio 3.33 has it)" >&2
    exit 2
fi
if ! nbdkit file --version >/dev/null 2>&1; then
    echo "nbd-bench: nbdkit has no file plugin (Debian package: nbdkit)" >&2
    exit 2
fi

find_strata nbd-bench

WORKDIR=${WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/strata-nbd-bench.XXXXXX")}
mkdir -p "$WORKDIR/results"
cleanup() {
    stop_server
    if [[ "${KEEP:-0}" == 1 ]]; then
        echo "nbd-bench: kept $WORKDIR" >&2
    else
        rm -rf "$WORKDIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts one server on a fresh disk; sets SERVER_PID and SOCK.
start_server() {
    local name=$1
    SOCK="$WORKDIR/$name.sock"
    rm -f "$SOCK" "$WORKDIR/$name".qcow2 "$WORKDIR/$name".raw
    case $name in
    strata)
        qemu-img create -q -f qcow2 -o cluster_size=65536 "$WORKDIR/strata.qcow2" "$SIZE"
        "$STRATA" serve --socket "$SOCK" --cache writeback -f qcow2 "$WORKDIR/strata.qcow2" \
            >"$WORKDIR/strata.log" 2>&1 &
        ;;
    qemu-nbd)
        qemu-img create -q -f qcow2 -o cluster_size=65536 "$WORKDIR/qemu-nbd.qcow2" "$SIZE"
        qemu-nbd --persistent -e 8 -f qcow2 --cache=writeback --socket="$SOCK" \
            "$WORKDIR/qemu-nbd.qcow2" >"$WORKDIR/qemu-nbd.log" 2>&1 &
        ;;
    nbdkit)
        truncate -s "$SIZE" "$WORKDIR/nbdkit.raw"
        nbdkit --foreground --unix "$SOCK" file "$WORKDIR/nbdkit.raw" \
            >"$WORKDIR/nbdkit.log" 2>&1 &
        ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 1 200); do
        [[ -S "$SOCK" ]] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.05
    done
    echo "nbd-bench: $name did not start; its log:" >&2
    cat "$WORKDIR/$name.log" >&2
    exit 1
}

run_fio() {
    local server=$1 round=$2 profile=$3; shift 3
    fio --name="$profile" --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --size="$SIZE" \
        --output-format=json --output="$WORKDIR/results/$server.$profile.$round.json" "$@" >/dev/null
}

SERVERS=(strata qemu-nbd nbdkit)
PROFILES=(seq-write-1M seq-read-1M rand-read-4K rand-write-4K)
echo "nbd-bench: $ROUNDS rounds x ${#SERVERS[@]} servers; disk $SIZE; random profiles ${RUNTIME}s; work in $WORKDIR" >&2
for round in $(seq 1 "$ROUNDS"); do
    for server in "${SERVERS[@]}"; do
        echo "nbd-bench: round $round/$ROUNDS: $server" >&2
        start_server "$server"
        run_fio "$server" "$round" seq-write-1M --rw=write --bs=1M --iodepth="$SEQ_DEPTH"
        run_fio "$server" "$round" seq-read-1M --rw=read --bs=1M --iodepth="$SEQ_DEPTH"
        run_fio "$server" "$round" rand-read-4K --rw=randread --bs=4k --iodepth=16 \
            --time_based --runtime="$RUNTIME" --randrepeat=0
        run_fio "$server" "$round" rand-write-4K --rw=randwrite --bs=4k --iodepth=16 \
            --time_based --runtime="$RUNTIME" --randrepeat=0
        stop_server
    done
done

python3 - "$WORKDIR/results" "$ROUNDS" "${SERVERS[*]}" "${PROFILES[*]}" <<'PY'
import json, os, statistics, sys
results, rounds, servers, profiles = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()

def sample(server, profile, rnd):
    with open(os.path.join(results, f"{server}.{profile}.{rnd}.json")) as f:
        job = json.load(f)["jobs"][0]
    side = job["write"] if "write" in profile else job["read"]
    return side["iops"], side["bw_bytes"] / (1 << 20)

rows = []
for p in profiles:
    med = {}
    for s in servers:
        xs = [sample(s, p, r) for r in range(1, rounds + 1)]
        med[s] = (statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs),
                  min(x[0] for x in xs), max(x[0] for x in xs))
    rows.append((p, med))

print(f"median of {rounds} rounds; IOPS and MiB/s; ratios of IOPS (above 1: strata is faster)")
head = f"{'profile':<14}" + "".join(f"{s + ' IOPS':>16}{'MiB/s':>8}" for s in servers) + f"{'strata/qemu-nbd':>17}{'strata/nbdkit':>15}"
print(head)
print("-" * len(head))
for p, med in rows:
    cells = "".join(f"{med[s][0]:>16.0f}{med[s][1]:>8.0f}" for s in servers)
    ratio = lambda a, b: med[a][0] / med[b][0] if med[b][0] else float("nan")
    print(f"{p:<14}{cells}{ratio('strata', 'qemu-nbd'):>17.2f}{ratio('strata', 'nbdkit'):>15.2f}")
print()
print("IOPS per round (min-max):")
for p, med in rows:
    print(f"  {p:<14}" + "  ".join(f"{s} {med[s][2]:.0f}-{med[s][3]:.0f}" for s in servers))
PY
