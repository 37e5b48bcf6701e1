"""Concurrency and connection limits, with raw sockets.

Usage:
  connection_limits.py out-of-order SOCKET EXPORT
      The export's writes are stalled by the test. A WRITE then a READ are sent; the READ must
      be answered first. Prints "read answered first", waits for "go" on stdin (the test
      un-stalls the image), then expects the WRITE's reply.
  connection_limits.py max-connections SOCKET
      The server allows one connection. A second connection gets no greeting while the first
      is open, and gets it once the first closes.
  connection_limits.py handshake-timeout SOCKET SECONDS
      A client that never answers the greeting is disconnected after about SECONDS.
"""
import socket
import struct
import sys
import time

from nbdtest import check, done, recv_exactly as recv


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s




def go(s, export):
    recv(s, 18)
    s.sendall(struct.pack(">I", 1))
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 4 + len(export) + 2) + struct.pack(">I", len(export)) + export + b"\0\0")
    while True:
        magic, opt, rtype, length = struct.unpack(">QIII", recv(s, 20))
        recv(s, length)
        if rtype == 1:
            return
        check(rtype == 3, f"GO reply {rtype:#x}")


mode = sys.argv[1]
if mode == "out-of-order":
    s = connect(sys.argv[2])
    s.settimeout(20)
    go(s, sys.argv[3].encode())
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 4096) + b"\x77" * 4096)  # WRITE, cookie 1
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 2, 8192, 512))                # READ, cookie 2
    magic, error, cookie = struct.unpack(">IIQ", recv(s, 16))
    check((magic, error, cookie) == (0x67446698, 0, 2), f"first reply is the read's: cookie {cookie}")
    recv(s, 512)
    print("read answered first", flush=True)
    check(sys.stdin.readline().strip() == "go", "told to go on")
    magic, error, cookie = struct.unpack(">IIQ", recv(s, 16))
    check((magic, error, cookie) == (0x67446698, 0, 1), f"then the write's: cookie {cookie}")
elif mode == "max-connections":
    first = connect(sys.argv[2])
    first.settimeout(10)
    check(len(recv(first, 18)) == 18, "first connection greeted")
    second = connect(sys.argv[2])  # accepted by the kernel's backlog, not by the server
    second.settimeout(1)
    try:
        second.recv(18)
        check(False, "second connection must wait while the first is open")
    except socket.timeout:
        check(True, "second connection waits")
    first.close()
    second.settimeout(10)
    check(len(recv(second, 18)) == 18, "second connection greeted once the first closed")
elif mode == "handshake-timeout":
    limit = float(sys.argv[3])
    s = connect(sys.argv[2])
    s.settimeout(limit + 10)
    start = time.time()
    recv(s, 18)
    data = s.recv(1)  # never answer; the server must hang up
    elapsed = time.time() - start
    check(data == b"", "server closed the silent connection")
    check(limit - 0.5 <= elapsed <= limit + 5, f"closed after {elapsed:.1f} s, limit {limit} s")
else:
    check(False, f"unknown mode {mode}")
done()
