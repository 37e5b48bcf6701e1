#!/usr/bin/env bash
# Compressed conversion, in one run: `strata convert -c` (lz4 and zstd) against
# `qemu-img convert -c` (zlib and zstd), time and output size, on the same source image.
#
# The source is an ext4 image made with `mkfs.ext4 -d` from a folder of this machine
# (default /usr/share: text, images, locale data; no download), converted to raw once.
# Each round runs every converter once, in an order rotated per round; before each run
# the source is read back into the page cache, and each time includes a final `sync`
# (qemu-img does not flush its output by default; strata does). The table shows the
# median time over the rounds, the output size, and the speed relative to qemu-img zstd
# (above 1: faster).
#
#   strata-lz4     strata convert -c -O qcow2 -o compression_type=lz4   (Strata only: QEMU refuses it)
#   strata-zstd    strata convert -c -O qcow2 -o compression_type=zstd
#   qemu-zlib      qemu-img convert -c -O qcow2 -o compression_type=zlib
#   qemu-zstd      qemu-img convert -c -O qcow2 -o compression_type=zstd
#
# Settings (environment):
#   ROUNDS=3          rounds
#   TREE=/usr/share   the folder the ext4 image is made from
#   SIZE=             the ext4 image size (default: the folder's size plus a third, rounded to MiB)
#   WORKERS=          strata -m (default 16: strata uses one worker per core, at most -m)
#   STRATA=path       the strata binary; default: build it (release) in $STRATA_SCRATCH
#   STRATA_SCRATCH=<repo>/.build-strata
#   WORKDIR=dir       where images go (default: a new folder under ${TMPDIR:-/tmp})
#   KEEP=1            keep WORKDIR afterwards
#
# Installs nothing: it says which Debian package is missing and stops.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
TREE=${TREE:-/usr/share}
WORKERS=${WORKERS:-16}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
STRATA_SCRATCH=${STRATA_SCRATCH:-$REPO/.build-strata}

source "$HERE/lib.sh"
require_tools compress-bench qemu-img:qemu-utils mkfs.ext4:e2fsprogs python3:python3
[[ -d "$TREE" ]] || { echo "compress-bench: no folder $TREE (set TREE)" >&2; exit 2; }

find_strata compress-bench

WORKDIR=${WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/strata-compress-bench.XXXXXX")}
cleanup() {
    if [[ "${KEEP:-0}" == 1 ]]; then
        echo "compress-bench: kept $WORKDIR" >&2
    else
        rm -rf "$WORKDIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

SRC="$WORKDIR/source.raw"
if [[ -z "${SIZE:-}" ]]; then
    kib=$(du -sk "$TREE" 2>/dev/null | cut -f1)
    SIZE="$(( (kib * 4 / 3) / 1024 + 64 ))M"
fi
echo "compress-bench: making a $SIZE ext4 image of $TREE ..." >&2
truncate -s "$SIZE" "$SRC"
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 -d "$TREE" "$SRC" >&2
allocated=$(du -k "$SRC" | cut -f1)

# Runs one converter; prints its seconds (conversion plus sync).
convert_one() {
    local name=$1 out="$WORKDIR/$1.qcow2"
    rm -f "$out"
    cat "$SRC" >/dev/null
    sync
    local t0 t1
    t0=$(date +%s.%N)
    case $name in
    strata-lz4)  "$STRATA" convert -q -c -m "$WORKERS" -f raw -O qcow2 -o compression_type=lz4 "$SRC" "$out" ;;
    strata-zstd) "$STRATA" convert -q -c -m "$WORKERS" -f raw -O qcow2 -o compression_type=zstd "$SRC" "$out" ;;
    qemu-zlib)   qemu-img convert -c -f raw -O qcow2 -o compression_type=zlib "$SRC" "$out" ;;
    qemu-zstd)   qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd "$SRC" "$out" ;;
    esac
    sync
    t1=$(date +%s.%N)
    python3 -c "print(f'{$t1 - $t0:.2f}')"
}

CONVERTERS=(strata-lz4 strata-zstd qemu-zlib qemu-zstd)
RESULTS="$WORKDIR/results.txt"
: >"$RESULTS"
echo "compress-bench: $ROUNDS rounds x ${#CONVERTERS[@]} converters; source $SIZE, $((allocated / 1024)) MiB allocated; $(nproc) cores; work in $WORKDIR" >&2
for round in $(seq 1 "$ROUNDS"); do
    n=${#CONVERTERS[@]}
    for k in $(seq 0 $((n - 1))); do
        name=${CONVERTERS[$(( (k + round - 1) % n ))]}
        secs=$(convert_one "$name")
        size=$(stat -c %s "$WORKDIR/$name.qcow2")
        echo "compress-bench: round $round/$ROUNDS: $name ${secs}s $size bytes" >&2
        echo "$name $round $secs $size" >>"$RESULTS"
    done
done
# The outputs hold the source's content (strata compares every image; qemu-img its own).
for name in "${CONVERTERS[@]}"; do
    "$STRATA" compare -q "$SRC" "$WORKDIR/$name.qcow2" \
        || { echo "compress-bench: $name output differs from the source" >&2; exit 1; }
done

python3 - "$RESULTS" "$ROUNDS" "$allocated" "${CONVERTERS[*]}" <<'PY'
import statistics, sys
path, rounds, allocated_kib, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split()
rows = {}
for line in open(path):
    name, rnd, secs, size = line.split()
    rows.setdefault(name, []).append((float(secs), int(size)))
med = {n: statistics.median(t for t, _ in rows[n]) for n in names}
size = {n: rows[n][-1][1] for n in names}
mib = allocated_kib / 1024
print(f"median of {rounds} rounds; source {mib:.0f} MiB allocated; time includes a final sync")
head = f"{'converter':<13}{'seconds':>9}{'min-max':>14}{'MiB/s':>8}{'out MiB':>9}{'ratio':>7}{'speed vs qemu-zstd':>20}"
print(head)
print("-" * len(head))
for n in names:
    ts = [t for t, _ in rows[n]]
    print(f"{n:<13}{med[n]:>9.2f}{min(ts):>7.2f}-{max(ts):<6.2f}{mib / med[n]:>8.0f}{size[n] / 2**20:>9.0f}"
          f"{size[n] / (allocated_kib * 1024):>7.2f}{med['qemu-zstd'] / med[n]:>20.2f}")
PY
