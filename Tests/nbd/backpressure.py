"""Backpressure: while the server's image is stalled, a client that keeps sending writes must be
throttled by the server no longer reading, not buffered without limit.

Usage: backpressure.py SOCKET EXPORT COUNT SIZE

Phase 1 sends COUNT writes of SIZE bytes without blocking for two seconds and prints
"accepted N" (bytes the kernel took). The test then un-stalls the image and writes "go" on
stdin. Phase 2 sends the rest, reads all COUNT replies, checks each succeeded, and prints
"replied COUNT".
"""
import socket
import struct
import sys

from nbdtest import check, done, push_until_stalled_then_collect, recv_exactly

sock_path, export, count, size = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4])

s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sock_path)


def recv(n):
    return recv_exactly(s, n)


recv(18)
s.sendall(struct.pack(">I", 1))
s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 4 + len(export) + 2) + struct.pack(">I", len(export)) + export + b"\0\0")
while True:
    magic, opt, rtype, length = struct.unpack(">QIII", recv(20))
    recv(length)
    if rtype == 1:
        break
    check(rtype == 3, f"GO reply {rtype:#x}")

payload = bytes([0x5A]) * size
stream = b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 1, i, (i * size) % (8 << 20), size) + payload
                  for i in range(count))
push_until_stalled_then_collect(s, stream, count, recv)
done()
