"""The server against a hand-written client speaking raw bytes: malformed handshakes, garbage,
unknown options and commands, oversized and refused writes, pipelining, NBD_CMD_DISC.

Usage: raw_protocol.py SOCKET EXPORT SIZE

Needs no libnbd: every message is built with struct, field by field. Each broken connection
is followed by a good one, to show that only the offending connection was dropped.
"""
import socket
import struct
import sys

from nbdtest import check, done, fail, recv_exactly

sock_path, export, size = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])

NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQUEST_MAGIC, SIMPLE_MAGIC, STRUCTURED_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID, REP_ERR_UNKNOWN = ERR | 1, ERR | 2, ERR | 3, ERR | 6
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
EINVAL, EPERM, ENOSPC = 22, 1, 28


class Conn:
    def __init__(self):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(20)
        self.s.connect(sock_path)

    def recv(self, n):
        return recv_exactly(self.s, n)

    def send(self, data):
        self.s.sendall(data)

    def closed_by_server(self):
        """True when the server has closed the connection (EOF, possibly after some bytes)."""
        try:
            while True:
                if not self.s.recv(65536):
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def greeting(self, client_flags=1):
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        check(magic == NBDMAGIC and opt == IHAVEOPT, "greeting magics")
        check(flags == 3, f"handshake flags FIXED_NEWSTYLE|NO_ZEROES, got {flags}")
        if client_flags is not None:
            self.send(struct.pack(">I", client_flags))

    def option(self, code, data=b""):
        self.send(struct.pack(">QII", IHAVEOPT, code, len(data)) + data)

    def reply(self, code):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv(20))
        check(magic == REPLY_MAGIC, f"option reply magic, got {magic:#x}")
        check(opt == code, f"reply is for option {code}, got {opt}")
        return rtype, self.recv(length)

    def go(self, name=export, structured=True):
        if structured:
            self.option(OPT_STRUCTURED_REPLY)
            check(self.reply(OPT_STRUCTURED_REPLY)[0] == REP_ACK, "structured replies acked")
        self.option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        while True:
            rtype, data = self.reply(OPT_GO)
            if rtype == REP_ACK:
                return
            check(rtype == REP_INFO, f"GO reply type {rtype:#x}")

    def request(self, cmd, cookie, offset=0, length=0, flags=0, payload=b""):
        self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload)

    def simple_reply(self):
        magic, error, cookie = struct.unpack(">IIQ", self.recv(16))
        check(magic == SIMPLE_MAGIC, f"simple reply magic, got {magic:#x}")
        return cookie, error

    def structured_reply(self):
        """All chunks of one reply (until DONE) as (cookie, [(type, payload)])."""
        chunks = []
        while True:
            magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", self.recv(20))
            check(magic == STRUCTURED_MAGIC, f"structured reply magic, got {magic:#x}")
            chunks.append((rtype, self.recv(length)))
            if flags & 1:
                return cookie, chunks

    def error_of(self, chunks):
        """The NBD error of a structured reply made of one error chunk."""
        check(len(chunks) == 1 and chunks[0][0] == 0x8001, f"one error chunk, got {[c[0] for c in chunks]}")
        return struct.unpack(">I", chunks[0][1][:4])[0]


def good_connection_works():
    c = Conn()
    c.greeting()
    c.go()
    c.request(CMD_READ, 77, 0, 512)
    cookie, chunks = c.structured_reply()
    check(cookie == 77 and sum(len(p) - 8 if t == 1 else struct.unpack(">I", p[8:12])[0] for t, p in chunks) == 512,
          "a fresh connection reads normally")
    c.request(CMD_DISC, 0)
    check(c.closed_by_server(), "DISC closes the connection")


# --- Handshake violations close only that connection.

c = Conn()
c.greeting(client_flags=None)
c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # garbage: bogus client flags, then a bad option magic
check(c.closed_by_server(), "garbage after the greeting closes the connection")
good_connection_works()
print("ok: garbage in the handshake", flush=True)

c = Conn()
c.greeting(client_flags=1 | 8)
check(c.closed_by_server(), "unknown client flags close the connection")
c = Conn()
c.greeting(client_flags=0)
check(c.closed_by_server(), "a client without fixed newstyle is refused")
c = Conn()
c.greeting()
c.send(struct.pack(">QII", 0x1122334455667788, OPT_LIST, 0))
check(c.closed_by_server(), "bad option magic closes the connection")
c = Conn()
c.greeting()
c.send(struct.pack(">QII", IHAVEOPT, OPT_LIST, 100 * 1024 * 1024))
check(c.closed_by_server(), "an option longer than the cap closes the connection without waiting for its data")
c = Conn()
c.greeting()
c.option(OPT_EXPORT_NAME, b"no-such-export")
check(c.closed_by_server(), "EXPORT_NAME for an unknown export closes the connection")
c = Conn()
c.greeting()
for i in range(300):
    c.option(0x4242)
replies = 0
try:
    while True:
        c.reply(0x4242)
        replies += 1
except (EOFError, ConnectionResetError):
    pass
check(replies == 256, f"256 options answered before the cap closed the connection, got {replies}")
good_connection_works()
print("ok: malformed handshakes", flush=True)

# --- Option errors keep the negotiation going.

c = Conn()
c.greeting()
c.option(0x4242, b"some data")
check(c.reply(0x4242)[0] == REP_ERR_UNSUP, "unknown option: ERR_UNSUP")
c.option(OPT_LIST, b"x")
check(c.reply(OPT_LIST)[0] == REP_ERR_INVALID, "LIST with data: ERR_INVALID")
c.option(OPT_STARTTLS)
check(c.reply(OPT_STARTTLS)[0] == REP_ERR_POLICY, "STARTTLS: ERR_POLICY")
c.option(OPT_SET_META, struct.pack(">I", len(export)) + export + struct.pack(">I", 0))
check(c.reply(OPT_SET_META)[0] == REP_ERR_INVALID, "SET_META_CONTEXT before structured replies: ERR_INVALID")
c.option(OPT_GO, struct.pack(">I", 7) + b"missing" + struct.pack(">H", 0))
check(c.reply(OPT_GO)[0] == REP_ERR_UNKNOWN, "GO for an unknown export: ERR_UNKNOWN")
c.option(OPT_GO, struct.pack(">I", 1000) + export)
check(c.reply(OPT_GO)[0] == REP_ERR_INVALID, "GO whose name length overruns the option: ERR_INVALID")
c.option(OPT_LIST)
names = []
while True:
    rtype, data = c.reply(OPT_LIST)
    if rtype == REP_ACK:
        break
    check(rtype == REP_SERVER, "LIST reply is SERVER or ACK")
    n = struct.unpack(">I", data[:4])[0]
    names.append(data[4:4 + n])
check(export in names, f"LIST names the export: {names}")
c.option(OPT_ABORT)
check(c.reply(OPT_ABORT)[0] == REP_ACK, "ABORT: ACK")
check(c.closed_by_server(), "ABORT closes")
print("ok: option errors", flush=True)

# --- Requests pipelined right behind NBD_OPT_GO, in the same packet, are served.

c = Conn()
c.greeting()
c.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 4 + len(export) + 2) + struct.pack(">I", len(export)) + export + b"\0\0"
       + struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 31, 0, 16)
       + struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_FLUSH, 32, 0, 0))
while True:
    rtype, _ = c.reply(OPT_GO)
    if rtype == REP_ACK:
        break
check(c.simple_reply() == (31, 0) and len(c.recv(16)) == 16, "read sent with GO answered")
check(c.simple_reply() == (32, 0), "flush sent with GO answered")
c.request(CMD_DISC, 0)
check(c.closed_by_server(), "closed after DISC")
print("ok: requests pipelined behind GO", flush=True)

# --- NBD_OPT_EXPORT_NAME, with and without the 124 zero bytes.

for client_flags, zeroes in ((1, 124), (3, 0)):
    c = Conn()
    c.greeting(client_flags)
    c.option(OPT_EXPORT_NAME, export)
    exp_size, tflags = struct.unpack(">QH", c.recv(10))
    check(exp_size == size, f"EXPORT_NAME size {exp_size}")
    check(tflags & 1 and tflags & (1 << 8), f"HAS_FLAGS and CAN_MULTI_CONN, got {tflags:#x}")
    check(not tflags & (1 << 7), "no DF without structured replies")
    if zeroes:
        check(c.recv(zeroes) == bytes(zeroes), "124 zero bytes")
    c.request(CMD_READ, 5, 0, 8)
    check(c.simple_reply() == (5, 0), "simple reply right after the export info")
    c.recv(8)
    c.request(CMD_DISC, 0)
    check(c.closed_by_server(), "closed after DISC")
print("ok: EXPORT_NAME", flush=True)

# --- Transmission errors keep the connection serving (simple replies).

c = Conn()
c.greeting()
c.go(structured=False)
c.request(0x42, 1)
check(c.simple_reply() == (1, EINVAL), "unknown command: EINVAL")
c.request(CMD_READ, 2, 0, 512, flags=1 << 9)
check(c.simple_reply() == (2, EINVAL), "unknown flag: EINVAL")
c.request(CMD_FLUSH, 3, 512, 0)
check(c.simple_reply() == (3, EINVAL), "flush with an offset: EINVAL")
big = 33 * 1024 * 1024
c.request(CMD_WRITE, 4, 0, big, payload=b"\xcc" * big)
check(c.simple_reply() == (4, EINVAL), "33 MiB write: EINVAL, payload drained")
c.request(CMD_WRITE, 5, size - 100, 512, payload=b"\xdd" * 512)
check(c.simple_reply() == (5, ENOSPC), "write past the end: ENOSPC, payload drained")
c.request(CMD_WRITE, 6, 0, 4, flags=1 << 4, payload=b"\xee" * 4)
check(c.simple_reply() == (6, EINVAL), "FAST_ZERO on a write: EINVAL, payload drained")
c.request(CMD_READ, 7, 0, 4)
check(c.simple_reply() == (7, 0), "read after the refusals")
check(c.recv(4) == bytes(4), "the refused writes changed nothing (the export starts zeroed)")
print("ok: transmission errors", flush=True)

# Pipelining: 200 mixed requests sent before reading any reply; every cookie answered once.
payload = bytes(range(256)) * 16
batch = b""
for i in range(100):
    batch += struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1000 + i, i * 4096, 4096) + payload
    batch += struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 2000 + i, i * 4096, 4096)
c.send(batch)
answered = set()
for _ in range(200):
    cookie, error = c.simple_reply()
    check(error == 0, f"cookie {cookie}: error {error}")
    check(cookie not in answered, f"cookie {cookie} answered twice")
    answered.add(cookie)
    if cookie >= 2000:
        c.recv(4096)
check(answered == set(range(1000, 1100)) | set(range(2000, 2100)), "every pipelined request answered")
c.request(CMD_FLUSH, 9)
check(c.simple_reply() == (9, 0), "flush")
c.request(CMD_READ, 10, 99 * 4096, 4096)
check(c.simple_reply() == (10, 0) and c.recv(4096) == payload, "pipelined writes landed")
print("ok: 200 pipelined requests", flush=True)

# Backpressure: 2000 reads of 64 KiB (125 MiB of replies) sent without reading; the server
# must throttle rather than fail, and answer all of them once we read.
n = 2000
sender = b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 5000 + i, 0, 65536) for i in range(n))
import threading
t = threading.Thread(target=lambda: c.send(sender))
t.start()
seen = 0
for _ in range(n):
    cookie, error = c.simple_reply()
    check(error == 0, f"flooded read {cookie}: error {error}")
    c.recv(65536)
    seen += 1
t.join()
check(seen == n, "every flooded read answered")
print("ok: backpressure", flush=True)

# DISC answers what is in flight, then closes.
c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 11, 0, 4096) + struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 12, 0, 0))
check(c.simple_reply() == (11, 0), "request before DISC is answered")
c.recv(4096)
check(c.closed_by_server(), "then the connection closes")

# A bad request magic closes the connection.
c = Conn()
c.greeting()
c.go()
c.send(b"\x00" * 28)
check(c.closed_by_server(), "bad request magic closes the connection")

# Structured errors carry the error code in an error chunk.
c = Conn()
c.greeting()
c.go()
c.request(CMD_READ, 20, size, 1)
cookie, chunks = c.structured_reply()
check(cookie == 20 and c.error_of(chunks) == EINVAL, "structured EINVAL for a read past the end")
c.request(CMD_BLOCK_STATUS, 21, 0, 512)
cookie, chunks = c.structured_reply()
check(cookie == 21 and c.error_of(chunks) == EINVAL, "structured EINVAL for block status without a context")
c.request(0x99, 22)
cookie, chunks = c.structured_reply()
check(cookie == 22 and c.error_of(chunks) == EINVAL, "structured EINVAL for an unknown command")
c.request(CMD_DISC, 0)
check(c.closed_by_server(), "closed after DISC")

good_connection_works()
done()
