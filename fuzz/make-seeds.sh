#!/usr/bin/env bash
# Regenerates the committed seed corpora: small qcow2 images made by qemu-img/qemu-io
# (corpus/image), the same images plus hand-damaged copies (corpus/check), images with several
# internal snapshots (corpus/snapshots), NBD client byte streams (corpus/nbd) and control
# socket request lines (corpus/control). Needs qemu-utils and python3.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for tool in qemu-img qemu-io python3; do
    command -v "$tool" >/dev/null || { echo "make-seeds: $tool is missing (qemu-utils / python3)" >&2; exit 2; }
done

IMG="$HERE/corpus/image"
mkdir -p "$IMG"
rm -f "$IMG"/*.qcow2
cd "$IMG"
io() { local f=$1; shift; local args=(); for c in "$@"; do args+=(-c "$c"); done; qemu-io -f qcow2 "${args[@]}" "$f" >/dev/null; }
make() { qemu-img create -q -f qcow2 -o "$2" "$1" 1M; }

make empty-512.qcow2 cluster_size=512
make data-512.qcow2 cluster_size=512
io data-512.qcow2 'write -P 0xab 0 2k' 'write -P 0xcd 600k 1k' 'write -z 4k 1k' 'discard 0 512'
make v2-512.qcow2 cluster_size=512,compat=0.10
io v2-512.qcow2 'write -P 0x11 1k 1k'
make compressed-zlib-1k.qcow2 cluster_size=1024
io compressed-zlib-1k.qcow2 'write -c -P 0x22 0 1k' 'write -c -P 0x33 8k 1k'
make compressed-zstd-1k.qcow2 cluster_size=1024,compression_type=zstd
io compressed-zstd-1k.qcow2 'write -c -P 0x44 0 1k'
make refcount1-512.qcow2 cluster_size=512,refcount_bits=1
io refcount1-512.qcow2 'write -P 0x55 0 1k'
make refcount64-512.qcow2 cluster_size=512,refcount_bits=64
io refcount64-512.qcow2 'write -P 0x66 0 1k'
make lazy-512.qcow2 cluster_size=512,lazy_refcounts=on
qemu-img create -q -f qcow2 -o cluster_size=512 -b base.raw -F raw -u backing-512.qcow2 1M
make snap-512.qcow2 cluster_size=512
io snap-512.qcow2 'write -P 0x77 0 512'
qemu-img snapshot -c s1 snap-512.qcow2

# fuzz_check: every image above, plus copies damaged the ways `check -r all` repairs.
CHK="$HERE/corpus/check"
mkdir -p "$CHK"
rm -f "$CHK"/*.qcow2
cp "$IMG"/*.qcow2 "$CHK"/
python3 - "$IMG" "$CHK" <<'PY'
import struct, sys, os
src, out = sys.argv[1], sys.argv[2]
u32 = lambda b, o: struct.unpack_from(">I", b, o)[0]
u64 = lambda b, o: struct.unpack_from(">Q", b, o)[0]

def load(name):
    return bytearray(open(os.path.join(src, name), "rb").read())

def geometry(b):
    cb = u32(b, 20)
    order = u32(b, 96) if u32(b, 4) >= 3 else 4
    return 1 << cb, order

def refblock0(b):
    cs, _ = geometry(b)
    return u64(b, u64(b, 48))  # the first refcount table entry

def set_refcount(b, cluster, value):
    cs, order = geometry(b)
    assert order == 4, "16-bit refcounts only"
    struct.pack_into(">H", b, refblock0(b) + 2 * cluster, value)

def first_l2(b):
    l1 = u64(b, 40)
    return u64(b, l1) & 0x00FFFFFFFFFFFE00

def first_data_entry(b):
    cs, _ = geometry(b)
    l2 = first_l2(b)
    for i in range(cs // 8):
        e = u64(b, l2 + 8 * i)
        if e & 0x00FFFFFFFFFFFE00 and not e & (1 << 62):
            return l2 + 8 * i, e
    raise SystemExit("no data entry")

def save(name, b):
    open(os.path.join(out, name), "wb").write(bytes(b))

cs = 512
# A leaked cluster: a cluster appended to the file, counted, used by nothing.
b = load("data-512.qcow2"); b += bytes(cs); set_refcount(b, len(b) // cs - 1, 1); save("leak-512.qcow2", b)
# The L1 table's count dropped to 0: a corruption.
b = load("data-512.qcow2"); set_refcount(b, u64(b, 40) // cs, 0); save("l1-refcount-zero-512.qcow2", b)
# A data cluster counted twice: its COPIED flag is then wrong, and a leak.
b = load("data-512.qcow2"); at, e = first_data_entry(b); set_refcount(b, (e & 0x00FFFFFFFFFFFE00) // cs, 2)
save("data-refcount-two-512.qcow2", b)
# A data cluster without a count: a corruption (the cluster looks free).
b = load("data-512.qcow2"); at, e = first_data_entry(b); set_refcount(b, (e & 0x00FFFFFFFFFFFE00) // cs, 0)
save("data-refcount-zero-512.qcow2", b)
# An L2 entry past the end of the file, and one unaligned.
b = load("data-512.qcow2"); at, e = first_data_entry(b); struct.pack_into(">Q", b, at, (e & ~0x00FFFFFFFFFFFE00) | (1 << 40))
save("l2-past-eof-512.qcow2", b)
b = load("data-512.qcow2"); at, e = first_data_entry(b); struct.pack_into(">Q", b, at, e | 0x100)
save("l2-unaligned-512.qcow2", b)
# Two guest clusters mapped to the same host cluster.
b = load("data-512.qcow2"); at, e = first_data_entry(b); struct.pack_into(">Q", b, at + 8, e)
save("l2-shared-512.qcow2", b)
# The refcount table's first block gone: the structure must be rebuilt.
b = load("data-512.qcow2"); struct.pack_into(">Q", b, u64(b, 48), 0); save("refblock-missing-512.qcow2", b)
# Dirty (lazy refcounts, not closed cleanly) and corrupt bits.
b = load("lazy-512.qcow2"); struct.pack_into(">Q", b, 72, u64(b, 72) | 1); save("dirty-512.qcow2", b)
b = load("data-512.qcow2"); struct.pack_into(">Q", b, 72, u64(b, 72) | 2); save("corrupt-bit-512.qcow2", b)
# A snapshot table that cannot be read.
b = load("snap-512.qcow2"); struct.pack_into(">Q", b, 64, (1 << 50)); save("snapshot-table-past-eof-512.qcow2", b)
PY

# fuzz_snapshots: images with several internal snapshots.
SNP="$HERE/corpus/snapshots"
mkdir -p "$SNP"
rm -f "$SNP"/*.qcow2
cd "$SNP"
make snaps3-512.qcow2 cluster_size=512
io snaps3-512.qcow2 'write -P 0x11 0 1k'
qemu-img snapshot -c s1 snaps3-512.qcow2
io snaps3-512.qcow2 'write -P 0x22 512 1k' 'write -P 0x23 700k 512'
qemu-img snapshot -c s2 snaps3-512.qcow2
io snaps3-512.qcow2 'discard 0 512' 'write -z 64k 4k'
qemu-img snapshot -c s3 snaps3-512.qcow2
make snaps-deleted-512.qcow2 cluster_size=512
for i in 1 2 3 4; do io snaps-deleted-512.qcow2 "write -P 0x4$i $((i * 4))k 1k"; qemu-img snapshot -c "snap-$i" snaps-deleted-512.qcow2; done
qemu-img snapshot -d snap-2 snaps-deleted-512.qcow2
make snaps-resized-512.qcow2 cluster_size=512
io snaps-resized-512.qcow2 'write -P 0x51 0 2k'
qemu-img snapshot -c small snaps-resized-512.qcow2
qemu-img resize -q snaps-resized-512.qcow2 2M
io snaps-resized-512.qcow2 'write -P 0x52 1536k 1k'
qemu-img snapshot -c large snaps-resized-512.qcow2
make snaps-v2-512.qcow2 cluster_size=512,compat=0.10
io snaps-v2-512.qcow2 'write -P 0x61 0 1k'
qemu-img snapshot -c a snaps-v2-512.qcow2
io snaps-v2-512.qcow2 'write -P 0x62 0 512'
qemu-img snapshot -c b snaps-v2-512.qcow2
make snaps-compressed-1k.qcow2 cluster_size=1024
io snaps-compressed-1k.qcow2 'write -c -P 0x71 0 1k' 'write -P 0x72 4k 2k'
qemu-img snapshot -c before snaps-compressed-1k.qcow2
io snaps-compressed-1k.qcow2 'write -P 0x73 0 1k'
qemu-img snapshot -c "$(printf 'n%.0s' {1..100})" snaps-compressed-1k.qcow2
make snaps-refcount64-512.qcow2 cluster_size=512,refcount_bits=64
io snaps-refcount64-512.qcow2 'write -P 0x81 0 1k'
qemu-img snapshot -c x snaps-refcount64-512.qcow2
qemu-img snapshot -c y snaps-refcount64-512.qcow2

# fuzz_control: request lines (files named in them are in the target's scratch folder).
CTL="$HERE/corpus/control"
mkdir -p "$CTL"
rm -f "$CTL"/*.txt
printf '%s\n' '{"execute": "query-version", "id": 1}' '{"execute": "query-commands"}' \
    '{"execute": "query-exports", "id": "x"}' > "$CTL/queries.txt"
printf '%s\n' '{"execute": "block-export-add", "arguments": {"name": "old", "file": "disk.qcow2", "snapshot": "s1"}}' \
    '{"execute": "query-exports"}' '{"execute": "block-export-del", "arguments": {"name": "old"}}' \
    '{"execute": "block-export-add", "arguments": {"name": "r", "file": "raw.img", "format": "raw", "read-only": true}}' \
    '{"execute": "block-export-del", "arguments": {"name": "ro"}}' > "$CTL/exports.txt"
printf '%s\n' '{"execute": "snapshot-list", "arguments": {"export": "disk"}}' \
    '{"execute": "snapshot-create", "arguments": {"export": "disk", "name": "s2"}}' \
    '{"execute": "snapshot-delete", "arguments": {"export": "disk", "name": "s1"}}' \
    '{"execute": "snapshot-create", "arguments": {"export": "ro", "name": "nope"}}' \
    '{"execute": "snapshot-list", "arguments": {"export": "disk"}, "id": [1, 2.5e3, null]}' > "$CTL/snapshots.txt"
printf '%s\n' '{"execute": "snapshot-external", "arguments": {"export": "disk", "overlay": "top.qcow2"}}' \
    '{"execute": "query-exports"}' '{"execute": "snapshot-create", "arguments": {"export": "disk", "name": "on-top"}}' \
    '{"execute": "snapshot-external", "arguments": {"export": "disk", "overlay": "top.qcow2"}}' > "$CTL/external.txt"
printf '%s\r\n' '{"execute": "nope"}' '[1, 2]' '{"execute": 5}' '{"execute": "query-version", "arguments": []}' \
    '{"execute": "query-version", "arguments": {"x": 1}}' '{"a": "\u00e9\ud83d\ude00\n", "b": -0.5e-3, "a": 1}' \
    '[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]' '{"execute": "block-export-add", "arguments": {"name": "", "file": "x\u0000"}}' \
    '{"execute"' 'tru' '"\ud800"' > "$CTL/errors.txt"
cd "$HERE"

mkdir -p "$HERE/corpus/nbd"
rm -f "$HERE/corpus/nbd"/*.bin
python3 - "$HERE/corpus/nbd" <<'PY'
import struct, sys, os
out = sys.argv[1]
be16 = lambda v: struct.pack(">H", v)
be32 = lambda v: struct.pack(">I", v)
be64 = lambda v: struct.pack(">Q", v)

def opt(code, data=b""):
    return b"IHAVEOPT" + be32(code) + be32(len(data)) + data
def name(s):
    return be32(len(s)) + s.encode()
def go(export, infos=()):
    return name(export) + be16(len(infos)) + b"".join(be16(i) for i in infos)
def meta(export, queries):
    return name(export) + be32(len(queries)) + b"".join(name(q) for q in queries)
def req(cmd, offset=0, length=0, flags=0, cookie=1, data=b""):
    return be32(0x25609513) + be16(flags) + be16(cmd) + be64(cookie) + be64(offset) + be32(length) + data

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
FIXED, NO_ZEROES = 1, 2

seeds = {
    # Structured replies, both meta contexts, GO, then every command.
    "go-structured.bin": bytes([15]) + be32(FIXED | NO_ZEROES)
        + opt(8) + opt(10, meta("", ["base:allocation", "qemu:allocation-depth"]))
        + opt(7, go("", [0, 1, 2, 3]))
        + req(READ, 0, 4096) + req(WRITE, 4096, 512, FUA, 2, b"\xab" * 512) + req(FLUSH, cookie=3)
        + req(BS, 0, 1 << 20, 0, 4) + req(BS, 8192, 4096, REQ_ONE, 5) + req(TRIM, 65536, 4096, 0, 6)
        + req(WZ, 131072, 8192, NO_HOLE, 7) + req(WZ, 0, 4096, FAST_ZERO, 8) + req(CACHE, 0, 4096, 0, 9)
        + req(READ, 8192, 16384, DF, 10) + req(DISC, cookie=11),
    # Old-style EXPORT_NAME, simple replies.
    "export-name.bin": bytes([63]) + be32(FIXED) + opt(1, b"disk")
        + req(READ, 512, 1024) + req(WRITE, 1000, 24, 0, 2, b"x" * 24) + req(TRIM, 0, 4096, 0, 3)
        + req(DISC, cookie=4),
    # Option negotiation without transmission.
    "options.bin": bytes([3]) + be32(FIXED | NO_ZEROES)
        + opt(3) + opt(6, go("ro", [1, 2])) + opt(9, meta("", [])) + opt(8) + opt(9, meta("disk", ["base:", "qemu:"]))
        + opt(5) + opt(99, b"junk") + opt(8) + opt(7, go("nope")) + opt(2),
    # A read-only export refusing writes, and requests out of range.
    "read-only.bin": bytes([31]) + be32(FIXED | NO_ZEROES) + opt(7, go("ro"))
        + req(WRITE, 0, 16, 0, 1, b"y" * 16) + req(READ, 65536 - 8, 16, 0, 2) + req(READ, 0, 0, 0, 3)
        + req(FLUSH, 4, 0, 0, 4) + req(99, 0, 1, 0, 5) + req(BS, 0, 4096, 0, 6) + req(DISC, cookie=7),
    # Straight to transmission (control bit 7), ending inside a write's data.
    "transmission.bin": bytes([0x80 | 7]) + req(READ, 0, 65536) + req(WRITE, (1 << 20) - 4, 8, 0, 2, b"z" * 8)
        + req(BS, 0, 1 << 20, REQ_ONE, 3) + req(WRITE, 0, 100, 0, 4, b"w" * 40),
}
for fname, data in seeds.items():
    with open(os.path.join(out, fname), "wb") as f:
        f.write(data)
PY
du -cb "$HERE"/corpus/*/* | tail -1
