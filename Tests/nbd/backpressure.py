"""Backpressure: while the server's image is stalled, a client that keeps sending writes must be
throttled by the server no longer reading, not buffered without limit.

Usage: backpressure.py SOCKET EXPORT COUNT SIZE

Phase 1 sends COUNT writes of SIZE bytes without blocking for two seconds and prints
"accepted N" (bytes the kernel took). The test then un-stalls the image and writes "go" on
stdin. Phase 2 sends the rest, reads all COUNT replies, checks each succeeded, and prints
"replied COUNT".
"""
import select
import socket
import struct
import sys
import time

from nbdtest import check, done, recv_exactly

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
s.setblocking(False)
sent = 0
deadline = time.time() + 2
while sent < len(stream) and time.time() < deadline:
    try:
        sent += s.send(stream[sent:sent + (1 << 20)])
    except BlockingIOError:
        select.select([], [s], [], 0.05)
print(f"accepted {sent}", flush=True)

check(sys.stdin.readline().strip() == "go", "told to go on")
s.setblocking(True)
s.sendall(stream[sent:])
cookies = set()
for _ in range(count):
    magic, error, cookie = struct.unpack(">IIQ", recv(16))
    check(magic == 0x67446698 and error == 0, f"write {cookie}: magic {magic:#x} error {error}")
    cookies.add(cookie)
check(cookies == set(range(count)), "every write answered once")
print(f"replied {count}", flush=True)
done()
