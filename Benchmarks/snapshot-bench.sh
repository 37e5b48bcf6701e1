#!/usr/bin/env bash
# Time the metadata-only operations of templates and snapshots, strata against qemu-img, in
# one run:
#
#   linked clone   `strata clone T C` vs `qemu-img create -f qcow2 -b T -F qcow2 C`, on templates
#                  holding 1, 4 and 16 GiB of written data; then 10 clones of the 16 GiB
#                  template in a row (each tool, total time). Goal: under 1 s in all.
#   snapshot       `strata snapshot -c NAME F` vs `qemu-img snapshot -c NAME F`, on images
#                  holding 1, 4 and 16 GiB of written data (each round adds one snapshot).
#
# "Written data": images made with `qemu-img create -o preallocation=metadata`, so every
# cluster (64 KiB) is allocated in the L2 tables and counted in the refcounts, as after a
# full write, while the host file stays sparse. A snapshot must take a reference on every
# one of those clusters; a linked clone must not look at them at all. The templates are
# those images with Strata's template mark added to their header (a small fixture step
# below; `strata template create` would drop the all-zero clusters and leave nothing to
# measure). Each figure is the median wall time of ROUNDS runs of the whole command
# (process start included), measured with Python's perf_counter; ratios are
# strata/qemu-img time (below 1 means strata is faster).
#
# Settings (environment):
#   ROUNDS=5       rounds per measurement
#   SIZES="1 4 16" GiB of written data
#   STRATA=path    the strata binary; default: build it (release) in $STRATA_SCRATCH
#   STRATA_SCRATCH=<repo>/.build-strata
#   WORKDIR=dir    where the images go (default: a new folder under ${TMPDIR:-/tmp})
#   KEEP=1         keep WORKDIR afterwards
#   OUT=file       also write the tables here (default: Benchmarks/results/DATE-snapshot.txt)
#
# Installs nothing: it says which Debian package is missing and stops.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
SIZES=${SIZES:-"1 4 16"}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
STRATA_SCRATCH=${STRATA_SCRATCH:-$REPO/.build-strata}
OUT=${OUT:-$HERE/results/$(date +%Y-%m-%d)-snapshot.txt}

source "$HERE/lib.sh"
require_tools snapshot-bench qemu-img:qemu-utils python3:python3

find_strata snapshot-bench

WORKDIR=${WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/strata-snapshot-bench.XXXXXX")}
mkdir -p "$WORKDIR"
cleanup() {
    if [[ "${KEEP:-0}" == 1 ]]; then echo "snapshot-bench: kept $WORKDIR" >&2; else rm -rf "$WORKDIR"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Adds Strata's header extension (type "STRA", 8 bytes of flags, bit 0 = template) before the
# end marker of a version 3 image without a backing file. A fixture step only.
mark_template() {
    python3 - "$1" <<'PY'
import struct, sys
path = sys.argv[1]
with open(path, "r+b") as f:
    head = f.read(4096)
    assert head[:4] == b"QFI\xfb" and struct.unpack(">I", head[4:8])[0] == 3, "a qcow2 v3 image"
    assert struct.unpack(">Q", head[8:16])[0] == 0, "no backing file"
    pos = struct.unpack(">I", head[100:104])[0]  # header_length: the extensions start here
    while True:
        kind, length = struct.unpack(">II", head[pos:pos + 8])
        if kind == 0:
            break
        pos += 8 + (length + 7) // 8 * 8
    ext = struct.pack(">IIQ", 0x53545241, 8, 1) + b"\0" * 8
    f.seek(pos)
    f.write(ext)
PY
}

echo "snapshot-bench: $ROUNDS rounds; written data ${SIZES// /, } GiB; work in $WORKDIR" >&2
for g in $SIZES; do
    for who in strata qemu; do
        qemu-img create -q -f qcow2 -o preallocation=metadata,cluster_size=65536 "$WORKDIR/t$g.$who.qcow2" "${g}G"
        mark_template "$WORKDIR/t$g.$who.qcow2"
        qemu-img create -q -f qcow2 -o preallocation=metadata,cluster_size=65536 "$WORKDIR/s$g.$who.qcow2" "${g}G"
    done
    "$STRATA" info "$WORKDIR/t$g.strata.qcow2" | grep -q "template: true" || { echo "snapshot-bench: fixture not marked" >&2; exit 1; }
done

HAS_SNAPSHOT=0
"$STRATA" snapshot --help >/dev/null 2>&1 && HAS_SNAPSHOT=1

python3 - "$STRATA" "$WORKDIR" "$ROUNDS" "$SIZES" "$HAS_SNAPSHOT" <<'PY' | tee "$OUT"
import os, statistics, subprocess, sys, time
strata, work, rounds, sizes, has_snapshot = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(), sys.argv[5] == "1"

def timed(*cmds):
    """Wall time of running the commands one after another (each must succeed)."""
    t = time.perf_counter()
    for c in cmds:
        subprocess.run(c, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t

def rm(*paths):
    for p in paths:
        if os.path.exists(p): os.unlink(p)

def p(name): return os.path.join(work, name)

def row(label, ours, theirs):
    mo, mt = statistics.median(ours), statistics.median(theirs)
    print(f"{label:<26}{mo * 1000:>12.1f}{mt * 1000:>12.1f}{mo / mt:>9.2f}   {min(ours)*1000:.1f}-{max(ours)*1000:.1f} / {min(theirs)*1000:.1f}-{max(theirs)*1000:.1f}")

head = f"{'':<26}{'strata ms':>12}{'qemu-img ms':>12}{'ratio':>9}   min-max strata / qemu-img"
print(f"median of {rounds} rounds; wall time of the whole command; ratio strata/qemu-img (below 1: strata is faster)")
print()
print("Linked clone of a template")
print(head)
print("-" * len(head))
for g in sizes:
    ours, theirs = [], []
    for r in range(rounds):
        # Alternate which tool goes first.
        order = [("s", ours), ("q", theirs)] if r % 2 == 0 else [("q", theirs), ("s", ours)]
        for who, acc in order:
            if who == "s":
                rm(p("c.strata.qcow2"))
                acc.append(timed([strata, "clone", "-q", p(f"t{g}.strata.qcow2"), p("c.strata.qcow2")]))
            else:
                rm(p("c.qemu.qcow2"))
                acc.append(timed(["qemu-img", "create", "-q", "-f", "qcow2", "-b", f"t{g}.qemu.qcow2", "-F", "qcow2", p("c.qemu.qcow2")]))
    row(f"{g} GiB template", ours, theirs)
big = sizes[-1]
ours, theirs = [], []
for r in range(rounds):
    rm(*[p(f"m{i}.strata.qcow2") for i in range(10)], *[p(f"m{i}.qemu.qcow2") for i in range(10)])
    ours.append(timed(*[[strata, "clone", "-q", p(f"t{big}.strata.qcow2"), p(f"m{i}.strata.qcow2")] for i in range(10)]))
    theirs.append(timed(*[["qemu-img", "create", "-q", "-f", "qcow2", "-b", f"t{big}.qemu.qcow2", "-F", "qcow2", p(f"m{i}.qemu.qcow2")] for i in range(10)]))
row(f"10 clones, {big} GiB template", ours, theirs)
print()
print("Internal snapshot creation")
print(head)
print("-" * len(head))
for g in sizes:
    theirs = [timed(["qemu-img", "snapshot", "-c", f"snap{r}", p(f"s{g}.qemu.qcow2")]) for r in range(rounds)]
    if has_snapshot:
        ours = [timed([strata, "snapshot", "-c", f"snap{r}", p(f"s{g}.strata.qcow2")]) for r in range(rounds)]
        row(f"{g} GiB written", ours, theirs)
    else:
        print(f"{g + ' GiB written':<26}{'n/a':>12}{statistics.median(theirs) * 1000:>12.1f}{'':>9}   (this strata has no 'snapshot' command yet)")
for g in sizes:
    r = subprocess.run(["qemu-img", "check", p(f"s{g}.strata.qcow2")], capture_output=True, text=True)
    if r.returncode != 0: print(f"WARNING: qemu-img check s{g}.strata.qcow2: exit {r.returncode}")
print()
print(f"strata: {strata}; host: {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}")
PY
echo "snapshot-bench: tables written to $OUT" >&2
