#!/usr/bin/env bash
# `strata check` beside `qemu-img check` on a fully allocated 1 TiB image of 64 KiB clusters:
# 16 Mi data clusters, 2048 L2 tables, 513 refcount blocks. Only the metadata (160 MiB) is
# written; the data clusters are holes, which neither check reads. Prints time and peak RSS
# of each, for a few rounds.
#
# Usage: Benchmarks/check-scale.sh [ROUNDS]      (default 3)
# Environment:
#   STRATA=<path>        the strata binary (else a release build in $STRATA_SCRATCH)
#   STRATA_SCRATCH=<repo>/.build-strata
#   WORK=<dir>           where the 1 TiB sparse file goes (default: a temporary folder)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
STRATA_SCRATCH=${STRATA_SCRATCH:-$REPO/.build-strata}
ROUNDS=${1:-3}
source "$HERE/lib.sh"
find_strata check-scale
WORK=${WORK:-$(mktemp -d)}
IMAGE="$WORK/full-1t.qcow2"
trap 'rm -f "$IMAGE"' EXIT

/usr/bin/python3 - "$IMAGE" <<'PY'
import struct, sys
cs = 65536
data = 1 << 24                      # 1 TiB / 64 KiB
l2_tables = 2048                    # 8192 entries each
per_block = cs // 2                 # 16-bit refcounts
blocks = 513
total = 3 + blocks + l2_tables + data
assert (total + per_block - 1) // per_block == blocks
l2_first = 3 + blocks
data_first = l2_first + l2_tables
copied = 1 << 63
with open(sys.argv[1], "wb") as f:
    # Header (version 3, 104 bytes): L1 at cluster 1, refcount table at cluster 2.
    f.write(struct.pack(">IIQIIQIIQQIIQQQQII", 0x514649FB, 3, 0, 0, 16, 1 << 40, 0, l2_tables,
                        cs, 2 * cs, 1, 0, 0, 0, 0, 0, 4, 104) + bytes(4))
    f.seek(cs)
    f.write(b"".join(struct.pack(">Q", copied | (l2_first + i) * cs) for i in range(l2_tables)))
    f.seek(2 * cs)
    f.write(b"".join(struct.pack(">Q", (3 + i) * cs) for i in range(blocks)))
    ones = struct.pack(">H", 1) * per_block
    for i in range(blocks):
        f.seek((3 + i) * cs)
        f.write(ones[: 2 * min(per_block, total - i * per_block)])
    for t in range(l2_tables):
        f.seek((l2_first + t) * cs)
        first = data_first + t * 8192
        f.write(struct.pack(">8192Q", *[copied | (first + j) * cs for j in range(8192)]))
    f.truncate(total * cs)
PY
echo "image: $(du -h --apparent-size "$IMAGE" | cut -f1) apparent, $(du -h "$IMAGE" | cut -f1) on disk"
"$STRATA" check "$IMAGE" | tail -2
for r in $(seq 1 "$ROUNDS"); do
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    /usr/bin/time -f "round $r  strata check    %e s  peak RSS %M KiB" "$STRATA" check "$IMAGE" >/dev/null
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    /usr/bin/time -f "round $r  qemu-img check  %e s  peak RSS %M KiB" qemu-img check "$IMAGE" >/dev/null
done
