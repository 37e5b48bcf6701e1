"""Backpressure inside TLS: while the server's image is stalled, a client that keeps sending
writes over TLS must be throttled by the server no longer reading, not buffered without limit
(the TLS handler must not keep reading the socket for the request decoder).

Usage: tls_backpressure.py SOCKET EXPORT COUNT SIZE CERTDIR

The same protocol as backpressure.py, after NBD_OPT_STARTTLS: phase 1 sends COUNT encrypted
writes of SIZE bytes without blocking for two seconds and prints "accepted N" (ciphertext
bytes the kernel took); after "go" on stdin, phase 2 sends the rest, reads all COUNT replies
and prints "replied COUNT".
"""
import socket
import ssl
import struct
import sys

from nbdtest import check, done, push_until_stalled_then_collect, recv_exactly

sock_path, export, count, size, certdir = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sock_path)
recv_exactly(s, 18)
s.sendall(struct.pack(">I", 1))
s.sendall(struct.pack(">QII", 0x49484156454F5054, 5, 0))  # NBD_OPT_STARTTLS
magic, opt, rtype, length = struct.unpack(">QIII", recv_exactly(s, 20))
check(rtype == 1 and length == 0, f"STARTTLS acked, got {rtype:#x}")

ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=f"{certdir}/ca-cert.pem")
ctx.load_cert_chain(f"{certdir}/client-cert.pem", f"{certdir}/client-key.pem")
inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(inc, out, server_hostname="localhost")


def flush():
    data = out.read()
    if data:
        s.sendall(data)


def feed():
    data = s.recv(1 << 20)
    check(data, "the server keeps the connection open")
    inc.write(data)


def recv(n):
    buf = b""
    while len(buf) < n:
        try:
            data = tls.read(n - len(buf))
            check(data, "the TLS session stays open")
            buf += data
        except ssl.SSLWantReadError:
            flush()
            feed()
    return buf


while True:
    try:
        tls.do_handshake()
        flush()
        break
    except ssl.SSLWantReadError:
        flush()
        feed()

tls.write(struct.pack(">QII", 0x49484156454F5054, 7, 4 + len(export) + 2) + struct.pack(">I", len(export)) + export + b"\0\0")
flush()
while True:
    magic, opt, rtype, length = struct.unpack(">QIII", recv(20))
    recv(length)
    if rtype == 1:
        break
    check(rtype == 3, f"GO reply {rtype:#x}")

payload = bytes([0x5A]) * size
for i in range(count):
    tls.write(struct.pack(">IHHQQI", 0x25609513, 0, 1, i, (i * size) % (8 << 20), size) + payload)
stream = out.read()  # every request, encrypted
push_until_stalled_then_collect(s, stream, count, recv)
done()
