"""Multi-connection coherence: all connections to an export share one image, so a write
acknowledged (and flushed) on one connection is visible on every other.

Usage: multiconn.py URI CONNECTIONS
"""
import random
import sys

import nbd

from nbdtest import check, connect, done

uri, n = sys.argv[1], int(sys.argv[2])
K = 1024
handles = [connect(uri) for _ in range(n)]
check(all(h.can_multi_conn() for h in handles), "every connection advertises CAN_MULTI_CONN")
size = handles[0].get_size()
rng = random.Random(1234)

for round in range(200):
    writer = handles[round % n]
    readers = [h for h in handles if h is not writer]
    offset = rng.randrange(0, size // 4096) * 4096
    data = bytes([rng.randrange(1, 256)]) * (4 * K)
    if round % 2:
        writer.pwrite(data, offset, nbd.CMD_FLAG_FUA)
    else:
        writer.pwrite(data, offset)
        writer.flush()
    for r in readers:
        check(r.pread(4 * K, offset) == data, f"round {round}: write at {offset} visible on every connection")
print(f"ok: 200 rounds over {n} connections", flush=True)

# Concurrent asynchronous writes from all connections to disjoint blocks, then one flush:
# every block reads back everywhere.
expected = {}
for i, h in enumerate(handles):
    for j in range(32):
        offset = (i * 32 + j) * 4096
        data = bytes([(i * 32 + j) % 251 + 1]) * 4096
        expected[offset] = data
        h.aio_pwrite(data, offset)
for h in handles:
    while h.aio_in_flight() > 0:
        h.poll(-1)
handles[-1].flush()
for offset, data in expected.items():
    check(handles[0].pread(4096, offset) == data, f"async write at {offset} visible")
print("ok: concurrent writes from all connections", flush=True)

for h in handles:
    h.shutdown()
done()
