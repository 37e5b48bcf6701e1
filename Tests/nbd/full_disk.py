"""A full disk under `strata serve`: writes fail with ENOSPC, the server keeps serving, and
once space returns the same connection writes the rest and every byte reads back.

    full_disk.py URI PID SIZE

The server (process PID) runs under a file size limit (RLIMIT_FSIZE) that its image reaches
long before SIZE bytes are written; "space returns" is `prlimit --pid PID --fsize=unlimited`.
"""
import random
import subprocess
import sys

import nbd
from nbdtest import check, fail

uri, pid, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
chunk = 64 << 10
rng = random.Random(7)
blocks = [bytes(rng.getrandbits(8) for _ in range(chunk)) for _ in range(4)]
model = bytearray(size)

h = nbd.NBD()
h.connect_uri(uri)

# Fill until the limit: every write before the first failure is kept.
written = 0
error = None
for at in range(0, size, chunk):
    data = blocks[(at // chunk) % 4]
    try:
        h.pwrite(data, at)
    except nbd.Error as e:
        error = e
        break
    model[at:at + chunk] = data
    written = at + chunk
    if (at // chunk) % 8 == 7:
        try:
            h.flush()
        except nbd.Error as e:
            error = e
            break
check(error is not None, "the file size limit was reached before the disk was full")
name = error.errno if isinstance(error.errno, str) else str(error.errno)
check(name == "ENOSPC", f"a write past the limit fails with ENOSPC, got {name} ({error.string})")
print(f"ok: {written} bytes written before ENOSPC", flush=True)
check(written > 0, "some writes succeeded before the limit")

# Still serving: reads work, another write into new space fails the same way.
check(h.pread(chunk, 0) == bytes(model[0:chunk]), "reads still work after ENOSPC")
try:
    h.pwrite(blocks[0], size - chunk)
    fail("a second write past the limit succeeded")
except nbd.Error as e:
    check((e.errno if isinstance(e.errno, str) else str(e.errno)) == "ENOSPC", "the second write also fails with ENOSPC")

# Space returns: the rest goes in on the same connection, a flush makes it durable.
r = subprocess.run(["prlimit", "--pid", pid, "--fsize=unlimited"], capture_output=True, text=True)
check(r.returncode == 0, f"prlimit: {r.stderr}")
for at in range(written, size, chunk):
    data = blocks[(at // chunk) % 4]
    h.pwrite(data, at)
    model[at:at + chunk] = data
h.flush()
got = bytearray()
for at in range(0, size, 1 << 20):
    got += h.pread(min(1 << 20, size - at), at)
check(got == model, "every byte written before and after the full disk reads back")
h.shutdown()
print(f"ok: full_disk ({size} bytes)", flush=True)
