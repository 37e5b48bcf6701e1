"""A client of an export that the server removes while the client is connected.

Usage:
  removed_export.py idle URI
      libnbd: writes 64 KiB of byte 0x5A at offset 0 and flushes, prints "connected", waits
      for a line on stdin, then waits (up to 10 s) for the server to close the connection:
      prints "closed by the server". A read must then fail: prints "refused: MESSAGE".
  removed_export.py abandon SOCKET EXPORT COUNT
      Raw protocol: sends COUNT writes of 512 bytes, prints "sent" and hangs up at once
      without reading any reply.
  removed_export.py busy SOCKET EXPORT STALLED EXTRA
      Raw protocol, simple replies: sends STALLED + EXTRA writes of 512 bytes (cookie i at
      offset i * 512) in one go, prints "sent", then reads replies. The first EXTRA replies
      must be NBD_ESHUTDOWN for the last EXTRA cookies (the requests the server had received
      but not started when the export was removed): prints "refused EXTRA". Then the STALLED
      writes in flight must succeed: prints "acked STALLED". Then the server must close the
      connection: prints "closed".
"""
import socket
import struct
import sys
import time

from nbdtest import check, done, fail, recv_exactly


def idle(uri):
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"\x5a" * 65536, 0)
    h.flush()
    print("connected", flush=True)
    sys.stdin.readline()
    deadline = time.monotonic() + 10
    try:
        while not (h.aio_is_closed() or h.aio_is_dead()) and time.monotonic() < deadline:
            h.poll(100)
    except nbd.Error:
        pass
    check(h.aio_is_closed() or h.aio_is_dead(), "the server closes the connection")
    print("closed by the server", flush=True)
    try:
        h.pread(512, 0)
    except nbd.Error as e:
        print(f"refused: {e.string}", flush=True)
        done()
    fail("a read on a removed export succeeded")


def send_writes(sock_path, export, count):
    """Connects, enters transmission with simple replies, sends `count` writes of 512 bytes
    (cookie i at offset i * 512, filled with byte i % 250 + 1) in one go; returns the socket
    and a function reading exactly n bytes."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(sock_path)

    def recv(n):
        return recv_exactly(s, n)

    recv(18)                                            # NBDMAGIC, IHAVEOPT, handshake flags
    s.sendall(struct.pack(">I", 3))                     # client flags: FIXED_NEWSTYLE | NO_ZEROES
    name = export.encode()
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 4 + len(name) + 2)  # IHAVEOPT, NBD_OPT_GO, length
              + struct.pack(">I", len(name)) + name + struct.pack(">H", 0))  # name, no info requests
    while True:
        _, _, rtype, length = struct.unpack(">QIII", recv(20))
        recv(length)
        if rtype == 1:                                  # NBD_REP_ACK
            break
        check(rtype == 3, f"GO reply type {rtype:#x}")  # NBD_REP_INFO

    requests = b""
    for i in range(count):
        requests += struct.pack(">IHHQQI", 0x25609513, 0, 1, i, i * 512, 512) + bytes([i % 250 + 1]) * 512
    s.sendall(requests)
    print("sent", flush=True)
    return s, recv


def abandon(sock_path, export, count):
    s, _ = send_writes(sock_path, export, count)
    s.close()
    done()


def busy(sock_path, export, stalled, extra):
    s, recv = send_writes(sock_path, export, stalled + extra)

    def reply():
        magic, error, cookie = struct.unpack(">IIQ", recv(16))
        check(magic == 0x67446698, f"simple reply magic, got {magic:#x}")
        return cookie, error

    refused = [reply() for _ in range(extra)]
    check(sorted(refused) == [(i, 108) for i in range(stalled, stalled + extra)],
          f"the requests not yet started get ESHUTDOWN (108): {refused}")
    print(f"refused {extra}", flush=True)
    acked = [reply() for _ in range(stalled)]
    check(sorted(acked) == [(i, 0) for i in range(stalled)], f"the writes in flight succeed: {acked}")
    print(f"acked {stalled}", flush=True)
    check(s.recv(1) == b"", "the server closes the connection")
    print("closed", flush=True)
    done()


if sys.argv[1] == "idle":
    idle(sys.argv[2])
elif sys.argv[1] == "abandon":
    abandon(sys.argv[2], sys.argv[3], int(sys.argv[4]))
elif sys.argv[1] == "busy":
    busy(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
else:
    fail(f"unknown mode {sys.argv[1]}")
