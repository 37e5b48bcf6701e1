"""Every request the server must refuse, each with the protocol's error code, and the
connection still serving afterwards.

Usage: errors.py RW_URI RO_URI SIZE

libnbd's client-side checks are switched off (strict mode 0) so the bad requests reach the
server. Both exports are SIZE bytes.
"""
import errno
import sys

import nbd

from nbdtest import check, connect, done, expect_error

rw_uri, ro_uri, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
M = 1024 * 1024


def still_serving(h, what):
    h.pwrite(b"ok", 0) if not h.is_read_only() else None
    check(len(h.pread(512, 0)) == 512, f"connection still serves after {what}")


for structured in (True, False):
    mode = "structured" if structured else "simple"
    h = connect(rw_uri, structured=structured, contexts=() if not structured else ("base:allocation",), strict=0)
    check(h.get_structured_replies_negotiated() == structured, f"{mode} replies")

    # Out of range.
    expect_error(lambda: h.pread(1024, size - 512), errno.EINVAL, f"{mode}: read past the end")
    expect_error(lambda: h.pwrite(b"x" * 1024, size - 512), errno.ENOSPC, f"{mode}: write past the end")
    expect_error(lambda: h.zero(1024, size), errno.ENOSPC, f"{mode}: write zeroes past the end")
    expect_error(lambda: h.trim(1, size), errno.EINVAL, f"{mode}: trim past the end")
    expect_error(lambda: h.cache(1, size + 4096), errno.EINVAL, f"{mode}: cache past the end")
    expect_error(lambda: h.pread(512, 2**64 - 256), errno.EINVAL, f"{mode}: read with offset + length overflowing")
    still_serving(h, "range errors")

    # Zero lengths.
    expect_error(lambda: h.pread(0, 0), errno.EINVAL, f"{mode}: zero-length read")
    expect_error(lambda: h.pwrite(b"", 0), errno.EINVAL, f"{mode}: zero-length write")
    expect_error(lambda: h.zero(0, 0), errno.EINVAL, f"{mode}: zero-length write zeroes")
    expect_error(lambda: h.trim(0, 0), errno.EINVAL, f"{mode}: zero-length trim")
    still_serving(h, "zero lengths")

    # Oversized payloads (the cap is 32 MiB); the write's 33 MiB of data are drained.
    expect_error(lambda: h.pread(33 * M, 0), errno.EINVAL, f"{mode}: read above the payload cap")
    expect_error(lambda: h.pwrite(b"\xee" * (33 * M), 0), errno.EINVAL, f"{mode}: write above the payload cap")
    check(h.pread(2, 0) == b"ok", "the drained write changed nothing")
    still_serving(h, "oversized payloads")

    # Flags not valid for the command, or unknown.
    expect_error(lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL, f"{mode}: NO_HOLE on a read")
    expect_error(lambda: h.pwrite(b"y" * 512, 0, nbd.CMD_FLAG_REQ_ONE), errno.EINVAL, f"{mode}: REQ_ONE on a write")
    check(h.pread(2, 0) == b"ok", "the refused write changed nothing")
    expect_error(lambda: h.trim(512, 0, nbd.CMD_FLAG_FAST_ZERO), errno.EINVAL, f"{mode}: FAST_ZERO on a trim")
    if not structured:
        expect_error(lambda: h.pread(512, 0, nbd.CMD_FLAG_DF), errno.EINVAL, "simple: DF without structured replies")
        # Block status with no context negotiated (and no structured replies).
        expect_error(lambda: h.block_status(512, 0, lambda *a: 0), errno.EINVAL, "simple: block status without a context")
    still_serving(h, "bad flags")
    h.shutdown()

# Block status on a structured connection that selected no context.
h = connect(rw_uri, contexts=(), strict=0)
check(not h.can_meta_context("base:allocation"), "no context selected")
expect_error(lambda: h.block_status(512, 0, lambda *a: 0), errno.EINVAL, "block status without a context")
still_serving(h, "block status refusal")
h.shutdown()

# A read-only export refuses every kind of write with EPERM.
h = connect(ro_uri, strict=0)
check(h.is_read_only(), "export is read-only")
check(not h.can_trim() and not h.can_zero(), "no trim or zero offered on a read-only export")
expect_error(lambda: h.pwrite(b"z" * 4096, 0), errno.EPERM, "write to a read-only export")
expect_error(lambda: h.zero(4096, 0), errno.EPERM, "write zeroes to a read-only export")
expect_error(lambda: h.trim(4096, 0), errno.EPERM, "trim on a read-only export")
expect_error(lambda: h.pwrite(b"z" * 4096, size), errno.EPERM, "out-of-range write to a read-only export")
h.flush()
check(h.pread(4096, 0) != b"z" * 4096, "nothing was written")
still_serving(h, "read-only refusals")
h.shutdown()
done()
