"""Structured reads of a fragmented image, a probed raw image's first sector, and block status
of a huge empty disk.

Usage: one_pass_reads.py FRAGMENTED_URI RAW_URI HUGE_URI

FRAGMENTED: a 4 MiB qcow2 image with 512-byte clusters; cluster k holds the byte (k % 251) + 1
when k is even, and is unallocated when k is odd. RAW: a 1 MiB raw image served without a
format (probed). HUGE: an empty 16 TiB qcow2 image.
"""
import errno
import sys

import nbd

from nbdtest import check, chunks, done, expect_error, extents, connect

K, M = 1024, 1024 * 1024
fragmented, raw, huge = sys.argv[1:4]

# Every other 512-byte cluster is data: the worst case for the number of chunks. A whole
# 2 MiB read is 4096 chunks, alternating, each exactly one cluster, in one reply.
h = connect(fragmented)
got, data = chunks(h, 0, 2 * M)
check(len(got) == 4096, f"4096 chunks, got {len(got)}")
for k, (off, length, status) in enumerate(got):
    want = nbd.READ_DATA if k % 2 == 0 else nbd.READ_HOLE
    if (off, length, status) != (k * 512, 512, want):
        check(False, f"chunk {k}: {(off, length, status)}")
expected = b"".join(bytes([(k % 251) + 1]) * 512 if k % 2 == 0 else bytes(512) for k in range(4096))
check(data == expected, "data and holes read back")
print("ok: 4096 alternating chunks", flush=True)

# Unaligned, straddling: a short first and last run.
got, data = chunks(h, 300, 1000)
check(got == [(300, 212, nbd.READ_DATA), (512, 512, nbd.READ_HOLE), (1024, 276, nbd.READ_DATA)], f"unaligned: {got}")
check(data == b"\x01" * 212 + bytes(512) + b"\x03" * 276, "unaligned data")
# The maximum payload in one request.
got, data = chunks(h, 0, 4 * M)
check(len(got) == 8192 and len(data) == 4 * M, f"4 MiB read in {len(got)} chunks")
got, data = chunks(h, 0, 64 * K, nbd.CMD_FLAG_DF)
check(got == [(0, 64 * K, nbd.READ_DATA)] and data == expected[:64 * K], "DF: one data chunk")
print("ok: unaligned, maximum and DF reads", flush=True)
h.shutdown()

# A probed raw image refuses writes that would make it probe as qcow2 (EPERM), in one request
# or byte by byte; elsewhere, and other bytes there, are fine.
h = connect(raw)
expect_error(lambda: h.pwrite(b"QFI\xfb" + bytes(508), 0), errno.EPERM, "qcow2 magic over sector 0")
h.pwrite(b"QFI", 0)
expect_error(lambda: h.pwrite(b"\xfb", 3), errno.EPERM, "the magic's last byte")
h.pwrite(b"QFI\xfb", 512)
h.pwrite(b"hello", 0)
check(h.pread(8, 0) == b"hello\x00\x00\x00", "sector 0 took the other bytes")
h.flush()
h.shutdown()
print("ok: probed raw image keeps its format", flush=True)

# An empty 16 TiB disk: block status of as much as one request can ask, in one extent.
h = connect(huge)
size = h.get_size()
check(size == 16 * 1024 * 1024 * M, f"16 TiB, got {size}")
check(extents(h, 0, 4 * 1024 * M - 512, "base:allocation") == [(4 * 1024 * M - 512, 3)], "one hole extent")
check(extents(h, size - 4 * M, 4 * M, "base:allocation") == [(4 * M, 3)], "the end too")
got, data = chunks(h, size - 32 * M, 32 * M)
check(got == [(size - 32 * M, 32 * M, nbd.READ_HOLE)], f"a 32 MiB read at the end is one hole chunk: {got}")
print("ok: huge empty disk", flush=True)
done()
