"""A client caught by a server shutdown: it queues many writes, announces it, and records
which ones the server acknowledged before the connection ended.

Usage: shutdown_client.py URI COUNT

Prints "submitted" once every write is queued, then, when the connection is over, one line
"acked: i j k ..." with the indexes of the writes that succeeded. Write i puts byte
(i % 250) + 1 in the 64 KiB block at i * 64 KiB. Exits 0 unless the server broke the protocol
in a way libnbd reports as something other than a closed connection or an error reply.
"""
import sys

import nbd

uri, count = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
block = 64 * 1024
status = {}


def completed(i):
    def cb(err):
        status[i] = err.value if hasattr(err, "value") else err
        return 1
    return cb


for i in range(count):
    buf = nbd.Buffer.from_bytearray(bytearray([(i % 250) + 1]) * block)
    h.aio_pwrite(buf, i * block, completion=completed(i))
print("submitted", flush=True)

try:
    while h.aio_in_flight() > 0:
        h.poll(-1)
except nbd.Error as e:
    print(f"connection ended: {e.string}", file=sys.stderr, flush=True)

acked = sorted(i for i, err in status.items() if err == 0)
print("acked: " + " ".join(map(str, acked)), flush=True)
