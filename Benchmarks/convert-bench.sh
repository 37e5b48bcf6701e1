#!/usr/bin/env bash
# `strata convert` beside `qemu-img convert`, both directions (qcow2 -> raw, raw -> qcow2), on
# a real ext4 file system image: `mkfs.ext4 -d` fills a sparse raw file from a system folder,
# and `qemu-img convert` makes the qcow2 copy of it. Both tools run with their defaults (8
# workers, writes in order, sparse output), so only allocated data is read and written.
#
# Before each timing: the previous output is removed, everything is synced, the page cache is
# dropped and the source is read back in (so each tool starts from a cached source and an
# empty page cache for its output). Each time includes a final `sync`, so it covers writing the
# output to disk. The order of the two tools alternates from round to round. Prints each time,
# then per direction the median and min-max of each tool and the ratio of the medians
# strata/qemu-img (below 1: strata is faster). The outputs are checked against each other and
# the source (cmp for raw, `qemu-img compare` for qcow2). A `dd` of as many bytes as the source
# holds, with fdatasync, gives the disk's floor for comparison.
#
# Usage: Benchmarks/convert-bench.sh
# Environment:
#   ROUNDS=3             timed rounds (each converts both ways with both tools)
#   SRC_DIR=/usr/share   the folder copied into the ext4 image
#   STRATA=<path>        the strata binary (else a release build in $STRATA_SCRATCH)
#   STRATA_SCRATCH=<repo>/.build-strata
#   WORK=<dir>           where the images go; must be a real disk, not tmpfs. A given WORK
#                        keeps the source images for the next run, which reuses them
#                        (default: a temporary folder under /var/tmp, removed afterwards)
# Needs root (to drop the page cache), mkfs.ext4, qemu-img, cmp.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
STRATA_SCRATCH=${STRATA_SCRATCH:-$REPO/.build-strata}
ROUNDS=${ROUNDS:-3}
SRC_DIR=${SRC_DIR:-/usr/share}
source "$HERE/lib.sh"
require_tools convert-bench mkfs.ext4:e2fsprogs qemu-img:qemu-utils cmp:diffutils
find_strata convert-bench
[[ $(id -u) == 0 ]] || { echo "convert-bench: run as root (the page cache is dropped before each timing)" >&2; exit 2; }
if [[ -n "${WORK:-}" ]]; then
    mkdir -p "$WORK"
    trap 'rm -f "$WORK"/out-*' EXIT
else
    WORK=$(mktemp -d /var/tmp/convert-bench.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
fi

if [[ ! -f "$WORK/src.raw" || ! -f "$WORK/src.qcow2" ]]; then
    # The image: about 1.5 times the folder plus 256 MiB, so ext4 has room and leaves holes.
    used_kib=$(du -sk "$SRC_DIR" | cut -f1)
    size_mib=$(( used_kib * 3 / 2 / 1024 + 256 ))
    rm -f "$WORK/src.raw" "$WORK/src.qcow2"
    truncate -s "${size_mib}M" "$WORK/src.raw"
    mkfs.ext4 -q -F -d "$SRC_DIR" "$WORK/src.raw"
    qemu-img convert -f raw -O qcow2 "$WORK/src.raw" "$WORK/src.qcow2"
fi
echo "source: ext4 image (of $SRC_DIR unless reused), $(du -h --apparent-size "$WORK/src.raw" | cut -f1) raw, $(du -h "$WORK/src.raw" | cut -f1) allocated; qcow2 copy $(du -h "$WORK/src.qcow2" | cut -f1)"
echo "strata: $STRATA"
echo "qemu-img: $(qemu-img --version | head -1)"
echo "machine: $(nproc) cores, $(uname -r); load before start: $(cut -d' ' -f1-3 /proc/loadavg)"
# The disk's floor: writing as many bytes as the source holds, with a final fdatasync (no
# conversion can end sooner, since both tools write all of it).
alloc_mib=$(( $(du -k "$WORK/src.raw" | cut -f1) / 1024 ))
sync
echo "disk floor: dd of ${alloc_mib} MiB with fdatasync: $(dd if=/dev/zero of="$WORK/out-floor" bs=1M count="$alloc_mib" conv=fdatasync 2>&1 | tail -1 | sed 's/.*copied, //')"
rm -f "$WORK/out-floor"
echo

# Times one conversion: $1 = its source, $2 = its output, rest = the command. Prints seconds.
time_one() {
    local src=$1 out=$2
    shift 2
    rm -f "$out"
    sync
    echo 3 > /proc/sys/vm/drop_caches
    cat "$src" > /dev/null
    local t0 t1
    t0=$(date +%s.%N)
    "$@" > /dev/null
    sync
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'
}

declare -A times
run_pair() {  # $1 = direction (to-raw | to-qcow2), $2 = round
    local dir=$1 r=$2 tools tool
    if (( r % 2 )); then tools="strata qemu-img"; else tools="qemu-img strata"; fi
    for tool in $tools; do
        local t
        case "$dir/$tool" in
            to-raw/strata)     t=$(time_one "$WORK/src.qcow2" "$WORK/out-strata.raw" "$STRATA" convert -f qcow2 -O raw "$WORK/src.qcow2" "$WORK/out-strata.raw") ;;
            to-raw/qemu-img)   t=$(time_one "$WORK/src.qcow2" "$WORK/out-qemu.raw" qemu-img convert -f qcow2 -O raw "$WORK/src.qcow2" "$WORK/out-qemu.raw") ;;
            to-qcow2/strata)   t=$(time_one "$WORK/src.raw" "$WORK/out-strata.qcow2" "$STRATA" convert -f raw -O qcow2 "$WORK/src.raw" "$WORK/out-strata.qcow2") ;;
            to-qcow2/qemu-img) t=$(time_one "$WORK/src.raw" "$WORK/out-qemu.qcow2" qemu-img convert -f raw -O qcow2 "$WORK/src.raw" "$WORK/out-qemu.qcow2") ;;
        esac
        printf 'round %d  %-9s %-8s  %6s s\n' "$r" "$dir" "$tool" "$t"
        times[$dir/$tool]+="$t "
    done
}

for r in $(seq 1 "$ROUNDS"); do
    run_pair to-raw "$r"
    run_pair to-qcow2 "$r"
    if (( r == 1 )); then
        # Same bytes: the raw outputs against the source, the qcow2 outputs against it too.
        cmp "$WORK/src.raw" "$WORK/out-strata.raw"
        cmp "$WORK/src.raw" "$WORK/out-qemu.raw"
        qemu-img compare -q -f raw -F qcow2 "$WORK/src.raw" "$WORK/out-strata.qcow2"
        qemu-img compare -q -f raw -F qcow2 "$WORK/src.raw" "$WORK/out-qemu.qcow2"
        echo "outputs identical to the source (both tools, both directions)"
        echo "  raw output allocated: strata $(du -h "$WORK/out-strata.raw" | cut -f1), qemu-img $(du -h "$WORK/out-qemu.raw" | cut -f1);" \
             "qcow2 output: strata $(du -h "$WORK/out-strata.qcow2" | cut -f1), qemu-img $(du -h "$WORK/out-qemu.qcow2" | cut -f1)"
    fi
done

# Median and min-max of a list of seconds.
stats() { tr ' ' '\n' <<< "$1" | grep . | sort -n | awk '{ v[NR] = $1 } END { m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.3f %.3f %.3f", m, v[1], v[NR] }'; }
echo
echo "direction  tool      median  (min - max) s   ratio strata/qemu-img (median)"
for dir in to-raw to-qcow2; do
    read -r sm slo shi <<< "$(stats "${times[$dir/strata]}")"
    read -r qm qlo qhi <<< "$(stats "${times[$dir/qemu-img]}")"
    printf '%-9s  strata    %6.3f  (%.3f - %.3f)\n' "$dir" "$sm" "$slo" "$shi"
    printf '%-9s  qemu-img  %6.3f  (%.3f - %.3f)   %s\n' "$dir" "$qm" "$qlo" "$qhi" "$(awk -v a="$sm" -v b="$qm" 'BEGIN { printf "%.2f", a / b }')"
done
