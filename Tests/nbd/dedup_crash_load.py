"""Load for the inline dedup crash test: whole-cluster writes from a small pool of blocks,
overwrites, periodic flushes, and a record of what must survive a crash.

Usage:
  dedup_crash_load.py load URI SEED STATE [--ops N] [--initial STATE0] [--region BLOCKS]
  dedup_crash_load.py verify RAW STATE

load: up to 16 asynchronous writes in flight, each of 1 to 4 whole 4 KiB blocks at a block
boundary of the export, every block drawn from a pool of 8 random blocks and the zero block
(so many writes repeat a content the image already stores), a flush after every 48 writes.
No write is issued over a block that has one in flight. After each completed flush, STATE
(JSON, replaced atomically) holds the SHA-256 of every block whose content is known to be
durable: the content as of the writes completed when that flush was sent, less the blocks
that had a write in flight then or that were written since. Without --ops the load runs
until the connection fails (the server was killed) and exits 0; with --ops N it stops after
N writes, drains, flushes and disconnects, and any error fails it. A fresh export starts as
all zero blocks; --initial STATE0 starts from another run's STATE instead. --region BLOCKS
writes only the first BLOCKS blocks of the export (the others must stay as they were).

verify: every block listed in STATE reads from the raw file RAW with that digest.
"""
import hashlib
import json
import os
import random
import sys

from nbdtest import fail

BLOCK = 4096
POOL = 8
IN_FLIGHT = 16
FLUSH_EVERY = 48


def digest(b):
    return hashlib.sha256(b).hexdigest()


def save(path, blocks, flushes, writes):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"flushes": flushes, "writes": writes, "blocks": {str(k): v for k, v in blocks.items()}}, f)
    os.replace(tmp, path)


def load(uri, seed, state_path, ops, initial, region):
    import nbd
    rng = random.Random(seed)
    pool = [bytes(BLOCK)] + [rng.randbytes(BLOCK) for _ in range(POOL)]
    sums = [digest(p) for p in pool]
    h = nbd.NBD()
    h.connect_uri(uri)
    nblocks = h.get_size() // BLOCK
    span = min(region or nblocks, nblocks)
    if initial:
        with open(initial) as f:
            known = {int(k): v for k, v in json.load(f)["blocks"].items()}
    else:
        known = {b: sums[0] for b in range(nblocks)}
    completed = dict(known)   # block -> digest, from completed writes (and the start)
    durable = dict(known)     # what the last completed flush guarantees, less blocks written since
    pending = None            # the snapshot a flush in flight will make durable
    busy = {}                 # block -> number of writes in flight over it (0 or 1)
    flushing = False
    writes = flushes = since_flush = 0
    errors = []
    save(state_path, durable, flushes, writes)

    def write_done(blocks, contents):
        def cb(err):
            e = err.value if hasattr(err, "value") else err
            for b, c in zip(blocks, contents):
                busy.pop(b, None)
                if e == 0:
                    completed[b] = c
            if e != 0:
                errors.append(f"write of blocks {blocks[0]}..{blocks[-1]}: errno {e}")
            return 1
        return cb

    def flush_done(cb_err):
        nonlocal durable, pending, flushing, flushes
        e = cb_err.value if hasattr(cb_err, "value") else cb_err
        flushing = False
        if e != 0:
            errors.append(f"flush: errno {e}")
            return 1
        durable, pending = pending, None
        flushes += 1
        save(state_path, durable, flushes, writes)
        return 1

    try:
        while ops is None or writes < ops:
            if errors:
                break
            while h.aio_in_flight() >= IN_FLIGHT:
                h.poll(-1)
            if since_flush >= FLUSH_EVERY and not flushing:
                pending = {b: c for b, c in completed.items() if b not in busy}
                flushing = True
                since_flush = 0
                h.aio_flush(completion=flush_done)
                continue
            n = rng.randint(1, 4)
            first = rng.randrange(0, span - n + 1)
            blocks = list(range(first, first + n))
            if any(b in busy for b in blocks):
                h.poll(0)
                continue
            picks = [rng.randrange(0, POOL + 1) for _ in blocks]
            data = b"".join(pool[p] for p in picks)
            for b in blocks:
                busy[b] = 1
                durable.pop(b, None)
                if pending is not None:
                    pending.pop(b, None)
            h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), first * BLOCK,
                         completion=write_done(blocks, [sums[p] for p in picks]))
            writes += 1
            since_flush += 1
        if errors:
            raise RuntimeError(errors[0])
        while h.aio_in_flight() > 0:
            h.poll(-1)
        if errors:
            raise RuntimeError(errors[0])
        h.flush()
        flushes += 1
        save(state_path, completed, flushes, writes)
        h.shutdown()
        print(f"done: {writes} writes, {flushes} flushes", flush=True)
    except (nbd.Error, RuntimeError) as e:
        if ops is not None:
            fail(f"load of {ops} writes failed after {writes}: {e}")
        # The server was killed: STATE already holds the last completed flush's guarantee.
        save(state_path, durable, flushes, writes)
        print(f"connection ended after {writes} writes ({len(errors)} failed in flight), "
              f"{flushes} flushes completed, {len(durable)} blocks known durable: {e}", flush=True)


def verify(raw, state_path):
    with open(state_path) as f:
        blocks = {int(k): v for k, v in json.load(f)["blocks"].items()}
    bad = []
    with open(raw, "rb") as f:
        for b in sorted(blocks):
            f.seek(b * BLOCK)
            got = f.read(BLOCK)
            if len(got) < BLOCK:
                got += bytes(BLOCK - len(got))
            if digest(got) != blocks[b]:
                bad.append(b)
    if bad:
        fail(f"{len(bad)} of {len(blocks)} durable blocks differ, first: {bad[:10]}")
    print(f"ok: {len(blocks)} durable blocks read back", flush=True)


def main():
    args = sys.argv[1:]
    if args[:1] == ["load"] and len(args) >= 4:
        ops = initial = region = None
        rest = args[4:]
        while rest:
            if rest[0] == "--ops":
                ops = int(rest[1])
            elif rest[0] == "--initial":
                initial = rest[1]
            elif rest[0] == "--region":
                region = int(rest[1])
            else:
                fail(f"unknown argument {rest[0]}")
            rest = rest[2:]
        load(args[1], int(args[2]), args[3], ops, initial, region)
    elif args[:1] == ["verify"] and len(args) == 3:
        verify(args[1], args[2])
    else:
        fail(__doc__)


main()
