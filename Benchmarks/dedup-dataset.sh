#!/usr/bin/env bash
# The dedup data set: two ext4 images filled from this machine's /usr, sharing most of their
# files as two VMs installed from one distribution do, and the ideal a dedup store could
# reach on them: the distinct non-zero cluster contents, at 4 KiB and 64 KiB clusters.
#
#   Benchmarks/dedup-dataset.sh [WORKDIR]
#
# Image A holds /usr/bin, /usr/sbin, /usr/share and /usr/lib/python3*; image B holds the same
# trees except /usr/share/doc, plus /usr/lib/gcc (the second VM has other packages). Each is
# made with `mkfs.ext4 -d` (no download, nothing leaves WORKDIR). The counts read both images
# cluster by cluster, skip all-zero clusters (a dedup image stores them as zero entries) and
# hash the rest (SHA-256): "ideal" is the number of distinct contents, the least a dedup
# image can store. Later runs of the dedup benchmark compare what Strata stores with it.
#
# Settings (environment): KEEP=1 keeps WORKDIR; OUT=file also writes the table there
# (default: Benchmarks/results/DATE-dedup-dataset.txt); REUSE=1 keeps a.img and b.img already
# in WORKDIR instead of making them again. WORKDIR/ideal.txt gets the counts in clusters, one
# line per cluster size: "CLUSTER_BYTES NONZERO DISTINCT" (Benchmarks/dedup-bench.sh reads it).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/strata-dedup-data.XXXXXX")}
OUT=${OUT:-$HERE/results/$(date +%Y-%m-%d)-dedup-dataset.txt}
command -v mkfs.ext4 >/dev/null || { echo "dedup-dataset: mkfs.ext4 is missing (apt-get install e2fsprogs)" >&2; exit 1; }
command -v python3 >/dev/null || { echo "dedup-dataset: python3 is missing" >&2; exit 1; }
mkdir -p "$WORK"
cleanup() { [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT

# Staging trees of hard links (nothing is copied; mkfs reads the files through them).
stage() {
    local dir=$1; shift
    rm -rf "$dir"; mkdir -p "$dir/usr" "$dir/usr/lib"
    for src in "$@"; do
        [ -e "$src" ] || continue
        local rel=${src#/}
        mkdir -p "$dir/$(dirname "$rel")"
        cp -a --link "$src" "$dir/$rel" 2>/dev/null || cp -a "$src" "$dir/$rel"
    done
}
if [ "${REUSE:-0}" = 1 ] && [ -s "$WORK/a.img" ] && [ -s "$WORK/b.img" ]; then
    echo "dedup-dataset: reusing $WORK/a.img and $WORK/b.img" >&2
else
stage "$WORK/a" /usr/bin /usr/sbin /usr/share /usr/lib/python3*
stage "$WORK/b" /usr/bin /usr/sbin /usr/share /usr/lib/python3* /usr/lib/gcc
rm -rf "$WORK/b/usr/share/doc"

for v in a b; do
    kib=$(du -sk "$WORK/$v" | cut -f1)
    size=$(( (kib * 13 / 10 + 65536) / 1024 ))M   # the data, plus room for the file system
    rm -f "$WORK/$v.img"
    mkfs.ext4 -q -F -b 4096 -d "$WORK/$v" "$WORK/$v.img" "$size"
    rm -rf "${WORK:?}/$v"
done
fi

python3 - "$WORK/ideal.txt" "$WORK/a.img" "$WORK/b.img" <<'EOF' | tee "$OUT"
import hashlib, os, sys
ideal = open(sys.argv[1], "w")
images = sys.argv[2:]
print("dedup data set: %s" % ", ".join("%s (%.2f GiB)" % (os.path.basename(p), os.path.getsize(p) / 2**30) for p in images))
print("%-10s %14s %14s %14s %10s" % ("cluster", "non-zero", "distinct", "duplicate", "dup %"))
for cs in (4096, 65536):
    seen = set()
    nonzero = 0
    zero = bytes(cs)
    for p in images:
        with open(p, "rb", buffering=1 << 20) as f:
            while True:
                b = f.read(cs)
                if not b:
                    break
                if b == zero[:len(b)]:
                    continue
                nonzero += 1
                seen.add(hashlib.sha256(b).digest())
    dup = nonzero - len(seen)
    ideal.write("%d %d %d\n" % (cs, nonzero, len(seen)))
    print("%-10s %11.1f MiB %11.1f MiB %11.1f MiB %9.1f%%" % (
        "%d KiB" % (cs // 1024), nonzero * cs / 2**20, len(seen) * cs / 2**20, dup * cs / 2**20, 100.0 * dup / max(nonzero, 1)))
print("ideal = distinct: the least a dedup image of both can store (all-zero clusters become zero entries)")
EOF
echo "dedup-dataset: table written to $OUT" >&2
