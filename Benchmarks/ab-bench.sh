#!/usr/bin/env bash
# A/B of two strata builds through `strata serve` (a change against the commit before it), in
# one run, rounds alternating A and B so both see the same machine:
#
#   Benchmarks/ab-bench.sh OLD_STRATA NEW_STRATA
#
# Per round and binary: a fresh 2 GiB qcow2 image (64 KiB clusters), served on a Unix socket;
# fio's nbd engine writes it sequentially in 1 MiB requests at depth 4 (every write
# allocates), then reads 4 KiB at random at depth 16 for $RUNTIME seconds. Prints IOPS per
# round, then the medians and the ratio B/A (above 1: B is faster).
#
# Settings (environment): ROUNDS=4, RUNTIME=6, WORKDIR (default: a new folder under $TMPDIR).
# To build the old side: git worktree add /tmp/old COMMIT && (cd /tmp/old && swift build -c release --product strata)
set -euo pipefail
A=$1; B=$2
ROUNDS=${ROUNDS:-4}
RUNTIME=${RUNTIME:-6}
WORKDIR=${WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/strata-ab.XXXXXX")}
SOCK=$WORKDIR/s.sock
iops() {
    python3 -c 'import json,sys; t=sys.stdin.read(); d=json.loads(t[t.index("{"):]); print(int(d["jobs"][0][sys.argv[1]]["iops"]))' "$1"
}
declare -A W R
for r in $(seq 1 "$ROUNDS"); do
    for side in A B; do
        bin=${!side}
        rm -f "$WORKDIR/d.qcow2" "$SOCK"
        "$bin" create -q -f qcow2 "$WORKDIR/d.qcow2" 2G
        sync; sleep 1
        "$bin" serve --socket "$SOCK" "$WORKDIR/d.qcow2" >/dev/null 2>&1 &
        pid=$!
        for _ in $(seq 100); do [[ -S $SOCK ]] && break; sleep 0.05; done
        w=$(fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --size=2G --rw=write --bs=1M --iodepth=4 \
            --output-format=json 2>/dev/null | iops write)
        rr=$(fio --name=r --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --size=2G --rw=randread --bs=4k --iodepth=16 \
            --time_based --runtime="$RUNTIME" --output-format=json 2>/dev/null | iops read)
        kill "$pid"; wait "$pid" 2>/dev/null || true
        W[$side]+="$w "; R[$side]+="$rr "
        echo "round $r $side: seq-write-1M $w IOPS, rand-read-4K $rr IOPS"
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
for p in W R; do
    name=$([[ $p == W ]] && echo seq-write-1M || echo rand-read-4K)
    eval "a=\${$p[A]}; b=\${$p[B]}"
    ma=$(echo "$a" | median); mb=$(echo "$b" | median)
    echo "$name median: A $ma, B $mb, B/A $(python3 -c "print(round($mb/$ma, 2))")"
done
rm -rf "$WORKDIR"
