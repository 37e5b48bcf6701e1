#!/usr/bin/env python3
"""The report of nbd-bench.sh: reads its fio JSON and peak-RSS files, prints the tables.

Files in --results: header.txt (printed first), SERVER.TRANSPORT.PROFILE.ROUND.json (fio
--output-format=json; with --group_reporting the first job holds the sums), rss.tsv (server,
round, session, VmHWM in kB). A missing JSON (fio failed) shows as FAIL / is left out of the
medians. Standard library only.
"""
import argparse
import json
import os
import statistics
import sys


def load(results, server, transport, profile, rnd):
    path = os.path.join(results, f"{server}.{transport}.{profile}.{rnd}.json")
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    # fio may print notes before the JSON object.
    job = json.loads(text[text.index("{"):])["jobs"][0]
    side = job["write"] if "write" in profile else job["read"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    p50 = pct.get("50.000000")
    p99 = pct.get("99.000000")
    return {
        "iops": side["iops"],
        "mib": side["bw_bytes"] / (1 << 20),
        "p50": p50 / 1000 if p50 is not None else None,
        "p99": p99 / 1000 if p99 is not None else None,
    }


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return a / b if a is not None and b else None


def label(x, y):
    """The header of a ratio column: strata+F/strata is shown as +F/strata."""
    return (x[len("strata"):] if y == "strata" and x.startswith("strata+") else x) + "/" + y


def fmt(x, width, spec=".0f"):
    return f"{'FAIL' if x is None else format(x, spec):>{width}}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--servers", required=True)
    ap.add_argument("--unix", default="")
    ap.add_argument("--tcp", default="")
    ap.add_argument("--want", default="", help="profiles to show (default: all that ran)")
    a = ap.parse_args()
    servers = a.servers.split()
    want = set(a.want.split())
    rounds = range(1, a.rounds + 1)

    header = os.path.join(a.results, "header.txt")
    if os.path.exists(header):
        with open(header) as f:
            sys.stdout.write(f.read())
        print()

    # Ratio columns: strata against the peers, each strata+F against strata.
    pairs = []
    if "strata" in servers:
        pairs += [("strata", p) for p in ("qemu-nbd", "nbdkit") if p in servers]
        pairs += [(s, "strata") for s in servers if s.startswith("strata+")]

    for transport, plist in (("unix", a.unix.split()), ("tcp", a.tcp.split())):
        plist = [p for p in plist if not want or p in want]
        if not plist:
            continue
        rows = []
        for p in plist:
            per = {s: [load(a.results, s, transport, p, r) for r in rounds] for s in servers}
            rows.append((p, per))
        print(f"== {transport} ({'Unix socket' if transport == 'unix' else 'TCP 127.0.0.1'}): "
              f"median of {a.rounds} round(s); IOPS, MiB/s; ratios of median IOPS "
              f"(above 1: the first is faster)")
        w = max(10, max(len(s) for s in servers) + 1)
        head = f"{'profile':<23}" + "".join(f"{s:>{w}}{'MiB/s':>7}" for s in servers)
        head += "".join(f"{label(x, y):>{max(len(label(x, y)) + 1, 8)}}" for x, y in pairs)
        print(head)
        print("-" * len(head))
        for p, per in rows:
            m = {s: med(x["iops"] if x else None for x in per[s]) for s in servers}
            mb = {s: med(x["mib"] if x else None for x in per[s]) for s in servers}
            line = f"{p:<23}" + "".join(fmt(m[s], w) + fmt(mb[s], 7) for s in servers)
            line += "".join(fmt(ratio(m[x], m[y]), max(len(label(x, y)) + 1, 8), ".2f") for x, y in pairs)
            print(line)

        lat = [(p, per) for p, per in rows if p.endswith("-qd1")]
        if lat:
            print()
            print("completion latency, µs (median over rounds of fio's clat p50 / p99):")
            print(f"{'profile':<23}" + "".join(f"{s:>{w + 8}}" for s in servers))
            for p, per in lat:
                cells = ""
                for s in servers:
                    p50 = med(x["p50"] if x else None for x in per[s])
                    p99 = med(x["p99"] if x else None for x in per[s])
                    cell = "FAIL" if p50 is None else f"{p50:.0f} / {p99:.0f}"
                    cells += f"{cell:>{w + 8}}"
                print(f"{p:<23}{cells}")

        print()
        print("IOPS per round, min-max:")
        for p, per in rows:
            cells = []
            for s in servers:
                xs = [x["iops"] for x in per[s] if x]
                cells.append(f"{s} {min(xs):.0f}-{max(xs):.0f}" if xs else f"{s} FAIL")
            print(f"  {p:<23}" + "  ".join(cells))
        print()

    # Peak RSS: per round, the highest VmHWM of the server's sessions; median over rounds.
    peak = {}
    rss_path = os.path.join(a.results, "rss.tsv")
    if os.path.exists(rss_path):
        with open(rss_path) as f:
            for line in f:
                parts = line.split()
                if len(parts) != 4:
                    continue
                s, r, _session, kb = parts
                key = (s, int(r))
                peak[key] = max(peak.get(key, 0), int(kb))
    if peak:
        print("peak RSS (VmHWM; per round the highest of the server's sessions), MB: median (min-max)")
        meds = {}
        for s in servers:
            xs = [peak[(s, r)] / 1000 for r in rounds if peak.get((s, r))]
            if xs:
                meds[s] = statistics.median(xs)
                print(f"  {s:<18}{meds[s]:>8.1f}  ({min(xs):.1f}-{max(xs):.1f})")
        for x, y in pairs:
            if x in meds and y in meds and meds[y]:
                print(f"  {x}/{y} peak RSS: {meds[x] / meds[y]:.2f}")


if __name__ == "__main__":
    main()
