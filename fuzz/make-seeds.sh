#!/usr/bin/env bash
# Regenerates the committed seed corpora: small qcow2 images made by qemu-img/qemu-io
# (corpus/image) and NBD client byte streams (corpus/nbd). Needs qemu-utils and python3.
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
du -cb "$HERE"/corpus/image/* "$HERE"/corpus/nbd/* | tail -1
