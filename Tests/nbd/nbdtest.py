"""Small helpers shared by the NBD test scripts (run with /usr/bin/python3, which has libnbd).

Every script checks one area of `strata serve` with a real client, prints one line per check,
and exits 1 at the first failure with a message saying what was expected and what came back.
"""
import errno
import sys

checks = 0


def fail(message):
    print(f"FAIL: {message}", flush=True)
    sys.exit(1)


def check(condition, message):
    """Asserts `condition`; `message` says what was expected."""
    global checks
    if not condition:
        fail(message)
    checks += 1


def expect_error(fn, code, what):
    """Calls fn(), which must fail with the NBD error `code` (an errno value)."""
    import nbd
    global checks
    try:
        fn()
    except nbd.Error as e:
        # libnbd's Python binding reports the errno by name ("EINVAL").
        got = e.errno if isinstance(e.errno, str) else errno.errorcode.get(e.errno, str(e.errno))
        if got != errno.errorcode[code]:
            fail(f"{what}: expected {errno.errorcode[code]}, got {got} ({e.string})")
        checks += 1
        print(f"ok: {what} -> {errno.errorcode[code]}", flush=True)
        return
    fail(f"{what}: succeeded, expected {errno.errorcode[code]}")


def connect(uri, structured=True, contexts=("base:allocation",), strict=None):
    """A libnbd handle connected to `uri`."""
    import nbd
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    for c in contexts:
        h.add_meta_context(c)
    if strict is not None:
        h.set_strict_mode(strict)
    h.connect_uri(uri)
    return h


def extents(h, offset, length, context, flags=0):
    """Block status for one context as a list of (length, flags) pairs."""
    out = {}

    def cb(metacontext, off, entries, err):
        out.setdefault(metacontext, []).append((off, list(entries)))
        return 0

    h.block_status(length, offset, cb, flags)
    got = out.get(context)
    check(got is not None and len(got) == 1, f"exactly one {context} chunk at {offset}, got {out}")
    off, flat = got[0]
    check(off == offset, f"{context} chunk starts at {offset}, got {off}")
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def chunks(h, offset, length, flags=0):
    """A structured read as a list of (offset, length, status) and the data."""
    seen = []

    def cb(subbuf, off, status, err):
        seen.append((off, len(subbuf), status))
        return 0

    data = h.pread_structured(length, offset, cb, flags)
    return sorted(seen), data


def recv_exactly(s, n):
    """Reads exactly n bytes from socket s (EOFError if the server closes first)."""
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def done():
    print(f"all {checks} checks passed", flush=True)
    sys.exit(0)


def push_until_stalled_then_collect(sock, stream, count, recv):
    """The backpressure scripts' two phases over the raw socket `sock`: push `stream` (`count`
    pipelined 64-bit-cookie writes, already encoded) without blocking for 2 s and print how
    many bytes the server took; then, once stdin says "go", send the rest and require one
    successful simple reply per cookie, read with `recv(n)`."""
    import select
    import struct
    import time
    sock.setblocking(False)
    sent = 0
    deadline = time.time() + 2
    while sent < len(stream) and time.time() < deadline:
        try:
            sent += sock.send(stream[sent:sent + (1 << 20)])
        except BlockingIOError:
            select.select([], [sock], [], 0.05)
    print(f"accepted {sent}", flush=True)

    check(sys.stdin.readline().strip() == "go", "told to go on")
    sock.setblocking(True)
    sock.sendall(stream[sent:])
    cookies = set()
    for _ in range(count):
        magic, error, cookie = struct.unpack(">IIQ", recv(16))
        check(magic == 0x67446698 and error == 0, f"write {cookie}: magic {magic:#x} error {error}")
        cookies.add(cookie)
    check(cookies == set(range(count)), "every write answered once")
    print(f"replied {count}", flush=True)
