"""A client that does not negotiate structured replies gets simple replies only.

Usage: simple_replies.py URI
"""
import errno
import sys

import nbd

from nbdtest import check, connect, done, expect_error

uri = sys.argv[1]
h = connect(uri, structured=False, contexts=("base:allocation",))
check(not h.get_structured_replies_negotiated(), "structured replies not negotiated")
check(not h.can_df(), "DF is not offered without structured replies")
check(not h.can_meta_context("base:allocation"), "no meta context without structured replies")
check(h.can_multi_conn() and h.can_flush() and h.can_fua() and h.can_zero(), "flags")

h.pwrite(b"\x5a" * 65536, 65536)
h.pwrite(b"\xa5" * 512, 65536 + 1000, nbd.CMD_FLAG_FUA)
data = h.pread(131072, 0)
check(data[:65536] == bytes(65536), "unwritten range reads zeroes")
check(data[65536:65536 + 1000] == b"\x5a" * 1000, "first write")
check(data[65536 + 1000:65536 + 1512] == b"\xa5" * 512, "overlapping FUA write")
check(data[65536 + 1512:] == b"\x5a" * (65536 - 1512), "rest of the first write")

# Many reads in flight at once, answered out of order, each with its own data.
h.pwrite(bytes(range(256)) * 4096, 0)
cookies = {}
for i in range(64):
    buf = nbd.Buffer(4096)
    cookies[h.aio_pread(buf, i * 4096)] = (i, buf)
while h.aio_in_flight() > 0:
    h.poll(-1)
for cookie, (i, buf) in cookies.items():
    check(h.aio_command_completed(cookie), f"read {i} completed")
    check(buf.to_bytearray() == bytes(range(256)) * 16, f"read {i} content")
print("ok: 64 concurrent reads", flush=True)

h.zero(4096, 0)
check(h.pread(4096, 0) == bytes(4096), "write zeroes")
h.flush()
h.set_strict_mode(0)
expect_error(lambda: h.pread(4096, h.get_size()), errno.EINVAL, "simple error reply for a read past the end")
check(h.pread(16, 4096) == bytes(range(16)), "connection still serves after the error")
h.shutdown()
done()
