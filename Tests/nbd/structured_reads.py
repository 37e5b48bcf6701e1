"""Structured reads, block status and the write-side commands against a qcow2 export.

Usage: structured_reads.py URI

The export is an 8 MiB qcow2 image with 64 KiB clusters whose backing file holds 0x01 at
[0, 64K); the image itself holds 0x02 at [1M, 1M+64K); everything else is unallocated.
"""
import sys

import nbd

from nbdtest import check, chunks, done, expect_error, extents, connect

K, M = 1024, 1024 * 1024
uri = sys.argv[1]
h = connect(uri, contexts=("base:allocation", "qemu:allocation-depth"))

check(h.get_structured_replies_negotiated(), "structured replies negotiated")
check(h.can_meta_context("base:allocation"), "base:allocation negotiated")
check(h.can_meta_context("qemu:allocation-depth"), "qemu:allocation-depth negotiated")
check(h.get_size() == 8 * M, f"size 8M, got {h.get_size()}")
check(h.can_df() and h.can_fast_zero() and h.can_multi_conn(), "DF, fast zero and multi-conn advertised")
check(h.get_block_size(nbd.SIZE_MINIMUM) == 1, "minimum block size 1")
check(h.get_block_size(nbd.SIZE_PREFERRED) == 64 * K, "preferred block size = cluster size")
check(h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * M, "maximum payload 32 MiB")

# A read over data and holes: data chunks for the allocated clusters, hole chunks elsewhere.
got, data = chunks(h, 0, 2 * M)
check(got == [(0, 64 * K, nbd.READ_DATA), (64 * K, M - 64 * K, nbd.READ_HOLE),
              (M, 64 * K, nbd.READ_DATA), (M + 64 * K, M - 64 * K, nbd.READ_HOLE)],
      f"chunks of [0, 2M): {got}")
check(data[:64 * K] == b"\x01" * (64 * K), "backing data reads through")
check(data[M:M + 64 * K] == b"\x02" * (64 * K), "top data")
check(data[64 * K:M] == bytes(M - 64 * K), "holes read as zeroes")
print("ok: structured read with holes", flush=True)

# An unaligned read entirely inside a hole: one hole chunk.
got, data = chunks(h, 3 * M + 5, 1000)
check(got == [(3 * M + 5, 1000, nbd.READ_HOLE)], f"unaligned hole read: {got}")

# DF: exactly one data chunk with the zeroes spelled out.
got, data = chunks(h, 0, 128 * K, nbd.CMD_FLAG_DF)
check(got == [(0, 128 * K, nbd.READ_DATA)], f"DF read is one data chunk: {got}")
check(data == b"\x01" * (64 * K) + bytes(64 * K), "DF read content")
print("ok: DF", flush=True)

# Block status, both contexts.
alloc = extents(h, 0, 8 * M, "base:allocation")
check(alloc == [(64 * K, 0), (M - 64 * K, 3), (64 * K, 0), (7 * M - 64 * K, 3)], f"base:allocation {alloc}")
depth = extents(h, 0, 8 * M, "qemu:allocation-depth")
check(depth == [(64 * K, 2), (M - 64 * K, 0), (64 * K, 1), (7 * M - 64 * K, 0)], f"allocation depth {depth}")
one = extents(h, 32 * K, 4 * M, "base:allocation", nbd.CMD_FLAG_REQ_ONE)
check(one == [(32 * K, 0)], f"REQ_ONE from 32K: {one}")
tail = extents(h, 8 * M - 512, 512, "base:allocation")
check(tail == [(512, 3)], f"last sector: {tail}")
print("ok: block status", flush=True)

# Writes change the status; FUA and flush are accepted.
h.pwrite(b"\x03" * (128 * K), 4 * M, nbd.CMD_FLAG_FUA)
check(extents(h, 4 * M, 128 * K, "base:allocation") == [(128 * K, 0)], "written range is data")
check(extents(h, 4 * M, 128 * K, "qemu:allocation-depth") == [(128 * K, 1)], "written range is local")
h.flush()
check(h.pread(128 * K, 4 * M) == b"\x03" * (128 * K), "write reads back")

# Trim of whole clusters frees them: holes again, reading zeroes.
h.trim(64 * K, M)
check(h.pread(64 * K, M) == bytes(64 * K), "trimmed cluster reads zeroes")
check(extents(h, M, 64 * K, "base:allocation")[0][1] & nbd.STATE_ZERO, "trimmed cluster is zero")
print("ok: write, flush, trim", flush=True)

# Write zeroes, with and without NO_HOLE: reads zero either way.
h.pwrite(b"\x04" * (256 * K), 6 * M)
h.zero(128 * K, 6 * M, nbd.CMD_FLAG_NO_HOLE)
h.zero(128 * K, 6 * M + 128 * K)
check(h.pread(256 * K, 6 * M) == bytes(256 * K), "zeroed range reads zeroes")
check(all(f & nbd.STATE_ZERO for _, f in extents(h, 6 * M, 256 * K, "base:allocation")), "zeroed range reports zero")
print("ok: write zeroes", flush=True)

# Fast zero: fine where the image already reads zero, and over whole clusters (metadata
# only); ENOTSUP (and no change) where zero data would have to be written.
h.zero(M, 2 * M, nbd.CMD_FLAG_FAST_ZERO)
expect_error(lambda: h.zero(4 * K, 512, nbd.CMD_FLAG_FAST_ZERO), 95, "fast zero inside a cluster of backing data")
check(h.pread(64 * K, 0) == b"\x01" * (64 * K), "refused fast zero left the data")
h.zero(64 * K, 0, nbd.CMD_FLAG_FAST_ZERO)
check(h.pread(64 * K, 0) == bytes(64 * K), "fast zero of a whole cluster over backing data")

# Cache is a hint that succeeds inside the export.
h.cache(M, 0)
h.shutdown()
done()
