"""NBD_OPT_STARTTLS from a hand-written client: what a server answers before TLS, the upgrade
on the same connection, and option haggling and I/O inside TLS.

Usage: tls_options.py SOCKET EXPORT require|optional CERTDIR

CERTDIR holds ca-cert.pem, client-cert.pem and client-key.pem (the layout libnbd and QEMU
use). Messages are built with struct; TLS runs over memory BIOs so the script decides exactly
which bytes go on the wire and when (one check sends its ClientHello in the same write as
STARTTLS, before the ACK arrives).
"""
import socket
import ssl
import struct
import sys

from nbdtest import check, done

sock_path, export, mode, certdir = sys.argv[1], sys.argv[2].encode(), sys.argv[3], sys.argv[4]

NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQUEST_MAGIC, STRUCTURED_MAGIC, SIMPLE_MAGIC = 0x25609513, 0x668E33EF, 0x67446698
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META = 8, 9
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
ERR = 1 << 31
REP_ERR_INVALID, REP_ERR_TLS_REQD = ERR | 3, ERR | 5
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2


def tls_context():
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=f"{certdir}/ca-cert.pem")
    ctx.load_cert_chain(f"{certdir}/client-cert.pem", f"{certdir}/client-key.pem")
    return ctx


class Conn:
    """One connection; plain text until `starttls`, then every byte goes through TLS."""

    def __init__(self):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(20)
        self.s.connect(sock_path)
        self.tls = None
        self.pending = b""  # plain-text bytes received beyond what was asked for

    # --- transport

    def _flush(self):
        data = self.out.read()
        if data:
            self.s.sendall(data)

    def _feed(self):
        data = self.s.recv(65536)
        if not data:
            raise EOFError("server closed the connection")
        self.inc.write(data)

    def send(self, data):
        if self.tls is None:
            self.s.sendall(data)
        else:
            self.tls.write(data)
            self._flush()

    def recv(self, n):
        buf = self.pending[:n]
        self.pending = self.pending[n:]
        while len(buf) < n:
            if self.tls is None:
                data = self.s.recv(n - len(buf))
                if not data:
                    raise EOFError("server closed the connection")
                buf += data
                continue
            try:
                data = self.tls.read(n - len(buf))
                if not data:  # the server's close_notify
                    raise EOFError("server closed the TLS session")
                buf += data
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()
            except ssl.SSLZeroReturnError:
                raise EOFError("server closed the TLS session")
        return buf

    def closed_by_server(self):
        try:
            while True:
                if self.tls is None:
                    if not self.s.recv(65536):
                        return True
                else:
                    self.recv(1)
        except (EOFError, ConnectionResetError, ssl.SSLError):
            return True
        except socket.timeout:
            return False

    # --- NBD

    def greeting(self):
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        check(magic == NBDMAGIC and opt == IHAVEOPT and flags == 3, "greeting: FIXED_NEWSTYLE|NO_ZEROES as without TLS")
        self.send(struct.pack(">I", 1))

    def option(self, code, data=b""):
        self.send(struct.pack(">QII", IHAVEOPT, code, len(data)) + data)

    def reply(self, code):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv(20))
        check(magic == REPLY_MAGIC and opt == code, f"option reply for {code}")
        return rtype, self.recv(length)

    def replies(self, code):
        """Every reply to one option up to its ACK or error: the list of types."""
        types = []
        while True:
            rtype, _ = self.reply(code)
            types.append(rtype)
            if rtype == REP_ACK or rtype & ERR:
                return types

    def starttls(self, early_hello=False):
        """STARTTLS, then the TLS handshake. With `early_hello` the ClientHello goes out in the
        same write as the option, before the server's ACK."""
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = tls_context().wrap_bio(self.inc, self.out, server_hostname="localhost")
        request = struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0)
        if early_hello:
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            request += self.out.read()
        self.s.sendall(request)
        # The ACK is plain text; anything after it is the server's first TLS flight.
        head = b""
        while len(head) < 20:
            data = self.s.recv(65536)
            check(data, "the server answers STARTTLS")
            head += data
        magic, opt, rtype, length = struct.unpack(">QIII", head[:20])
        check(magic == REPLY_MAGIC and opt == OPT_STARTTLS and rtype == REP_ACK and length == 0, "STARTTLS: ACK")
        self.inc.write(head[20:])
        while True:
            try:
                tls.do_handshake()
                self._flush()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()
        self.tls = tls

    def go(self, structured=True):
        if structured:
            self.option(OPT_STRUCTURED_REPLY)
            check(self.reply(OPT_STRUCTURED_REPLY)[0] == REP_ACK, "structured replies acked")
        self.option(OPT_GO, struct.pack(">I", len(export)) + export + struct.pack(">H", 0))
        types = self.replies(OPT_GO)
        check(types[-1] == REP_ACK, f"GO acked, got {[hex(t) for t in types]}")

    def request(self, cmd, cookie, offset=0, length=0, payload=b""):
        self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, cookie, offset, length) + payload)

    def structured_read(self, cookie, length):
        data = b""
        while True:
            magic, flags, rtype, got_cookie, n = struct.unpack(">IHHQI", self.recv(20))
            check(magic == STRUCTURED_MAGIC and got_cookie == cookie, "structured reply")
            payload = self.recv(n)
            check(rtype in (0, 1, 2), f"read chunk type {rtype}")
            if rtype == 1:
                data += payload[8:]
            elif rtype == 2:
                data += bytes(struct.unpack(">I", payload[8:12])[0])
            if flags & 1:
                check(len(data) == length, f"read returned {len(data)} of {length} bytes")
                return data


def info_data(name=export):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", 0)


# --- Before TLS

c = Conn()
c.greeting()
if mode == "require":
    for code, data, what in [(OPT_LIST, b"", "LIST"), (OPT_INFO, info_data(), "INFO"), (OPT_GO, info_data(), "GO"),
                             (OPT_STRUCTURED_REPLY, b"", "STRUCTURED_REPLY"), (99, b"xyz", "an unknown option")]:
        c.option(code, data)
        check(c.replies(code) == [REP_ERR_TLS_REQD], f"{what} before STARTTLS: ERR_TLS_REQD")
    c.option(OPT_STARTTLS, b"x")
    check(c.replies(OPT_STARTTLS) == [REP_ERR_INVALID], "STARTTLS with data: ERR_INVALID")
    c.option(OPT_ABORT)
    check(c.replies(OPT_ABORT) == [REP_ACK], "ABORT is allowed before TLS")
    check(c.closed_by_server(), "ABORT closes")

    c = Conn()
    c.greeting()
    c.option(OPT_EXPORT_NAME, export)
    check(c.closed_by_server(), "EXPORT_NAME before TLS closes the connection (it cannot carry an error)")
else:
    c.option(OPT_LIST)
    types = c.replies(OPT_LIST)
    check(types[-1] == REP_ACK and REP_SERVER in types, "optional TLS: LIST works in plain text")
    c.go()
    c.request(CMD_READ, 1, 0, 4096)
    c.structured_read(1, 4096)
    c.request(CMD_DISC, 0)
    check(c.closed_by_server(), "plain-text transmission works and DISC closes")

    # Structured replies negotiated before STARTTLS do not survive it.
    c = Conn()
    c.greeting()
    c.option(OPT_STRUCTURED_REPLY)
    check(c.replies(OPT_STRUCTURED_REPLY) == [REP_ACK], "STRUCTURED_REPLY in plain text")
    c.starttls()
    c.option(OPT_LIST_META, info_data()[:-2] + struct.pack(">I", 0))
    check(c.replies(OPT_LIST_META) == [REP_ERR_INVALID], "after STARTTLS structured replies must be negotiated again")
    c.option(OPT_ABORT)
    check(c.replies(OPT_ABORT) == [REP_ACK], "ABORT inside TLS")

# --- Inside TLS

for early in (False, True):
    c = Conn()
    c.greeting()
    c.starttls(early_hello=early)
    what = "with the ClientHello sent before the ACK" if early else "after the ACK"
    c.option(OPT_STARTTLS)
    check(c.replies(OPT_STARTTLS) == [REP_ERR_INVALID], f"STARTTLS again inside TLS: ERR_INVALID ({what})")
    c.option(OPT_LIST)
    types = c.replies(OPT_LIST)
    check(types[-1] == REP_ACK and REP_SERVER in types, f"LIST inside TLS ({what})")
    c.option(OPT_INFO, info_data())
    check(c.replies(OPT_INFO)[-1] == REP_ACK, "INFO inside TLS")
    c.go()
    pattern = bytes(range(256)) * 16
    c.request(CMD_WRITE, 7, 65536, len(pattern), pattern)
    magic = struct.unpack(">I", c.recv(4))[0]
    if magic == SIMPLE_MAGIC:
        error, cookie = struct.unpack(">IQ", c.recv(12))
        check(error == 0 and cookie == 7, "write inside TLS acknowledged")
    else:
        flags, rtype, cookie, n = struct.unpack(">HHQI", c.recv(16))
        check(magic == STRUCTURED_MAGIC and cookie == 7 and rtype == 0 and flags & 1, "write inside TLS acknowledged")
        c.recv(n)
    c.request(CMD_READ, 8, 65536, len(pattern))
    check(c.structured_read(8, len(pattern)) == pattern, f"read back byte-exact inside TLS ({what})")
    c.request(CMD_DISC, 0)
    check(c.closed_by_server(), "DISC inside TLS closes")

done()
