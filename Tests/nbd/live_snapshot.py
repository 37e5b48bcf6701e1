"""A live snapshot taken through the control socket while writes are in flight holds every
write acknowledged before it and none issued after it.

Usage: live_snapshot.py CONTROL NBDSOCK EXPORT internal NAME
       live_snapshot.py CONTROL NBDSOCK EXPORT external OVERLAY

The first 4 MiB of the export are 64 blocks of 64 KiB; generation g of block b is the 16-byte
stamp (g, b) repeated. Generation 1 is written and acknowledged; generation 2 is queued all at
once; when half of it is acknowledged, the snapshot is asked for (the rest is in flight);
once it returns, generation 3 is written. The snapshot (an internal one exported read-only
with `block-export-add … snapshot`, or the old file of an external one exported read-only)
must then hold, for every block, generation 2 if it was acknowledged before the request and
generation 1 or 2 otherwise: never 3, never a torn block. The export itself reads
generation 3. For an external snapshot, writing generation 4 leaves the old file unchanged.
"""
import json
import socket
import struct
import sys

import nbd

from nbdtest import check, fail

control_path, nbd_socket, export, mode, target = sys.argv[1:6]
BLOCK = 64 * 1024
COUNT = 64


def uri(name):
    return f"nbd+unix:///{name}?socket={nbd_socket}"


def control(command, **arguments):
    """One request on a fresh connection; returns `return`, fails on `error`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(control_path)
    s.sendall((json.dumps({"execute": command, "arguments": arguments, "id": command}) + "\n").encode())
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            fail(f"{command}: connection closed without a reply")
        data += chunk
    s.close()
    reply = json.loads(data)
    check(reply.get("id") == command, f"{command}: reply carries the request id, got {reply}")
    if "error" in reply:
        fail(f"{command} {arguments}: {reply['error']}")
    return reply["return"]


def stamp(gen, block):
    return struct.pack("<QQ", gen, block) * (BLOCK // 16)


def decode(data, block):
    """The generation a block holds, or a failure naming what is wrong with it."""
    gen, b = struct.unpack_from("<QQ", data)
    check(data == stamp(gen, b), f"block {block} is whole (one stamp repeated); starts with gen {gen} block {b}")
    check(b == block, f"block {block} holds its own stamp, got block {b}'s")
    return gen


def read_all(h):
    return [decode(h.pread(BLOCK, b * BLOCK), b) for b in range(COUNT)]


h = nbd.NBD()
h.connect_uri(uri(export))
for b in range(COUNT):
    h.pwrite(stamp(1, b), b * BLOCK)
h.flush()

acked = set()


def completed(b):
    def cb(err):
        e = err.value if hasattr(err, "value") else err
        if e == 0:
            acked.add(b)
        else:
            fail(f"write of block {b} generation 2 failed: errno {e}")
        return 1
    return cb


for b in range(COUNT):
    h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(stamp(2, b))), b * BLOCK, completion=completed(b))
while len(acked) < COUNT // 2:
    h.poll(-1)
before = set(acked)
in_flight = h.aio_in_flight()

if mode == "internal":
    record = control("snapshot-create", export=export, name=target)
    check(record["name"] == target, f"snapshot-create returns the record, got {record}")
else:
    switched = control("snapshot-external", export=export, overlay=target)
    check(switched["overlay"] == target, f"snapshot-external names the overlay, got {switched}")
print(f"snapshot taken with {len(before)} of {COUNT} generation-2 writes acknowledged, "
      f"{in_flight} in flight", flush=True)

while h.aio_in_flight() > 0:
    h.poll(-1)
check(len(acked) == COUNT, f"every generation-2 write succeeded, got {len(acked)}")
for b in range(COUNT):
    h.pwrite(stamp(3, b), b * BLOCK)
h.flush()
check(read_all(h) == [3] * COUNT, "the export reads generation 3 everywhere")

# The snapshot, exported read-only.
if mode == "internal":
    info = [e for e in control("query-exports") if e["name"] == export][0]
    control("block-export-add", name="snap", file=info["file"], snapshot=target)
else:
    control("block-export-add", name="snap", file=switched["backing"], **{"read-only": True})
s = nbd.NBD()
s.connect_uri(uri("snap"))
check(s.is_read_only(), "the snapshot export is read-only")
gens = read_all(s)
for b, g in enumerate(gens):
    allowed = {2} if b in before else {1, 2}
    check(g in allowed, f"block {b}: snapshot holds generation {g}, expected one of {sorted(allowed)}")
print(f"snapshot consistent: {gens.count(2)} blocks of generation 2, {gens.count(1)} of generation 1", flush=True)

if mode == "external":
    for b in range(COUNT):
        h.pwrite(stamp(4, b), b * BLOCK)
    h.flush()
    check(read_all(s) == gens, "the old file is unchanged by later writes")
    check(read_all(h) == [4] * COUNT, "the export reads generation 4 everywhere")
else:
    listed = [r["name"] for r in control("snapshot-list", export=export)]
    check(target in listed, f"snapshot-list lists {target}, got {listed}")
s.shutdown()
control("block-export-del", name="snap")
h.shutdown()
print("ok", flush=True)
