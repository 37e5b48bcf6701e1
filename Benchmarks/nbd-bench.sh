#!/usr/bin/env bash
# Serve the same workloads from `strata serve`, `qemu-nbd` and `nbdkit file` and compare them
# with fio's nbd engine, over Unix sockets and over TCP on 127.0.0.1, in one run.
#
#   strata         strata serve, a fresh qcow2 image (64 KiB clusters), --cache writeback
#   qemu-nbd       qemu-nbd -f qcow2 --cache=writeback --aio=threads -e 8, the same kind of image
#   nbdkit         nbdkit file on a raw file: the protocol's ceiling on this machine
#   strata+F       (FEATURES) strata serve on an image with feature F, compared with plain strata:
#                    snapshots  the image holds SIZE/4 of data (written with qemu-io) and 50
#                               internal snapshots sharing it, made with `strata snapshot -c`
#                               before serving: the first quarter of every write pass copies
#                               on write
#                    dedup      the image is made by `strata create -o dedup=on` (inline dedup;
#                               fio's buffers are scrambled, so little content repeats: this
#                               measures the cost of looking, not the savings)
#
# Every round starts each server afresh, one server after another; round r starts with the
# r-th server of the list, so drift over the run spreads over all of them. Per server and
# round there are up to three sessions (server started, fio runs, peak RSS read, server
# stopped, `sync`):
#
#   A  unix, fresh disk:  seq-write-1M-qd8 (allocating)
#   B  unix, fresh disk:  seq-write-1M-qd4 (allocating; always runs, it fills the disk for the
#                         rest), seq-read-1M-qd4, seq-read-1M-qd8, rand-read-4K-qd1,
#                         rand-read-4K-qd16, rand-write-4K-qd1, rand-write-4K-qd16,
#                         mc2-rand-read-4K-qd16, mc2-rand-write-4K-qd16
#   C  tcp, B's disk:     seq-read-1M-qd4, rand-read-4K-qd1, rand-read-4K-qd16 (TCP_PROFILES)
#
# seq-* go over the whole disk once; rand-* run for RUNTIME seconds each (mostly overwrites);
# mc2-* are 2 fio jobs (one NBD connection each) at depth 16, reported as one (--group_reporting).
# The report (nbd-bench-report.py, on stdout) has a table per transport: median IOPS and MiB/s
# per server, the ratios strata/qemu-nbd, strata/nbdkit and strata+F/strata (above 1: the
# first is faster), p50/p99 completion latency (µs) for the depth-1 profiles, each server's
# min-max over the rounds, and the median over rounds of each server's peak RSS (VmHWM, the
# highest of its sessions in that round). Its header names the settings, versions and commands,
# so the output can be saved in Benchmarks/results/ as is. Progress goes to stderr.
#
# Settings (environment):
#   ROUNDS=3        rounds
#   RUNTIME=8       seconds per random profile
#   SIZE=2G         disk size (fio and the images)
#   SERVERS="strata qemu-nbd nbdkit"
#   FEATURES=""     strata variants to add as servers: "snapshots dedup"
#   PROFILES=all    the profiles to report (names above, space-separated); both transports
#   TCP_PROFILES="seq-read-1M-qd4 rand-read-4K-qd1 rand-read-4K-qd16"   (any unix profile but
#                   the seq-write ones)
#   STRATA_ENV=""   environment for every strata server, e.g. "MALLOC_ARENA_MAX=1"
#   STRATA=path     the strata binary; default: build it (release) in $STRATA_SCRATCH
#   STRATA_SCRATCH=<repo>/.build-strata
#   WORKDIR=dir     where images and sockets go (default: a new folder under ${TMPDIR:-/tmp})
#   KEEP=1          keep WORKDIR (images, fio JSON, server logs) afterwards
#   NOTE=""         a line for the header (e.g. "the machine was shared")
#
# RBD (images in a Ceph pool through librbd, the names as QEMU spells them):
#   CEPH_CONF=path  the cluster's ceph.conf (e.g. from scripts/ceph-cluster.sh start DIR). Every
#                   disk is then a fresh RBD image rbd:RBD_POOL/nbdb-PID-SERVER-N:conf=CEPH_CONF,
#                   made the same way (qemu-img create -f qcow2 ..., strata create for dedup), used
#                   by strata serve and qemu-nbd (QEMU's rbd driver) under that name, and removed
#                   with `rbd rm` when its session is over (on exit too, unless KEEP=1).
#                   SERVERS defaults to "strata qemu-nbd" (nbdkit has no rbd plugin); SIZE to 1G.
#   RBD_POOL=strata the pool
#
# A failed fio run is reported (its cell shows FAIL, the script exits 1 at the end) and the
# run goes on. Installs nothing: it says which Debian package is missing and stops.
set -euo pipefail

CEPH_CONF=${CEPH_CONF:-}
RBD_POOL=${RBD_POOL:-strata}
NOTE=${NOTE:-}
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-8}
if [[ -n "$CEPH_CONF" ]]; then
    SIZE=${SIZE:-1G}
    SERVERS=${SERVERS:-strata qemu-nbd}
else
    SIZE=${SIZE:-2G}
    SERVERS=${SERVERS:-strata qemu-nbd nbdkit}
fi
FEATURES=${FEATURES:-}
PROFILES=${PROFILES:-all}
TCP_PROFILES=${TCP_PROFILES:-seq-read-1M-qd4 rand-read-4K-qd1 rand-read-4K-qd16}
STRATA_ENV=${STRATA_ENV:-}
read -r -a STRATA_ENV_WORDS <<<"$STRATA_ENV"
SNAPSHOTS=50
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
STRATA_SCRATCH=${STRATA_SCRATCH:-$REPO/.build-strata}

source "$HERE/lib.sh"
require_tools nbd-bench fio:fio qemu-nbd:qemu-utils qemu-img:qemu-utils qemu-io:qemu-utils \
    python3:python3 awk:gawk sync:coreutils
if ! fio --enghelp 2>/dev/null | grep -qw nbd; then
    echo "nbd-bench: this fio has no nbd engine (Debian's fio 3.33 has it)" >&2
    exit 2
fi
if [[ -n "$CEPH_CONF" ]]; then
    require_tools nbd-bench rbd:ceph-common
    [[ -r "$CEPH_CONF" ]] || { echo "nbd-bench: no ceph.conf at $CEPH_CONF" >&2; exit 2; }
    CEPH_CONF=$(cd "$(dirname "$CEPH_CONF")" && pwd)/$(basename "$CEPH_CONF")
    if ! qemu-img --help 2>/dev/null | grep -qw rbd; then
        echo "nbd-bench: this QEMU has no rbd driver (Debian package: qemu-block-extra)" >&2
        exit 2
    fi
    if [[ " $SERVERS " == *" nbdkit "* ]]; then
        echo "nbd-bench: nbdkit cannot serve an RBD image here; leave it out of SERVERS" >&2
        exit 2
    fi
elif [[ " $SERVERS " == *" nbdkit "* ]]; then
    require_tools nbd-bench nbdkit:nbdkit
    if ! nbdkit file --version >/dev/null 2>&1; then
        echo "nbd-bench: nbdkit has no file plugin (Debian package: nbdkit)" >&2
        exit 2
    fi
fi

# --- profiles -------------------------------------------------------------------------------
ALL_A=(seq-write-1M-qd8)
ALL_B=(seq-write-1M-qd4 seq-read-1M-qd4 seq-read-1M-qd8 rand-read-4K-qd1 rand-read-4K-qd16
    rand-write-4K-qd1 rand-write-4K-qd16 mc2-rand-read-4K-qd16 mc2-rand-write-4K-qd16)

# fio options of a profile (after the common ones).
profile_args() {
    case $1 in
    seq-write-1M-qd4) echo "--rw=write --bs=1M --iodepth=4" ;;
    seq-write-1M-qd8) echo "--rw=write --bs=1M --iodepth=8" ;;
    seq-read-1M-qd4) echo "--rw=read --bs=1M --iodepth=4" ;;
    seq-read-1M-qd8) echo "--rw=read --bs=1M --iodepth=8" ;;
    rand-read-4K-qd1) echo "--rw=randread --bs=4k --iodepth=1 --time_based --runtime=$RUNTIME --randrepeat=0" ;;
    rand-read-4K-qd16) echo "--rw=randread --bs=4k --iodepth=16 --time_based --runtime=$RUNTIME --randrepeat=0" ;;
    rand-write-4K-qd1) echo "--rw=randwrite --bs=4k --iodepth=1 --time_based --runtime=$RUNTIME --randrepeat=0" ;;
    rand-write-4K-qd16) echo "--rw=randwrite --bs=4k --iodepth=16 --time_based --runtime=$RUNTIME --randrepeat=0" ;;
    mc2-rand-read-4K-qd16) echo "--rw=randread --bs=4k --iodepth=16 --numjobs=2 --group_reporting --time_based --runtime=$RUNTIME --randrepeat=0" ;;
    mc2-rand-write-4K-qd16) echo "--rw=randwrite --bs=4k --iodepth=16 --numjobs=2 --group_reporting --time_based --runtime=$RUNTIME --randrepeat=0" ;;
    *) return 1 ;;
    esac
}

in_list() { # in_list WORD LIST...
    local w=$1 x
    shift
    for x in "$@"; do [[ "$x" == "$w" ]] && return 0; done
    return 1
}

if [[ "$PROFILES" == all ]]; then
    WANT=("${ALL_A[@]}" "${ALL_B[@]}")
else
    read -r -a WANT <<<"$PROFILES"
fi
read -r -a TCP_WANT <<<"$TCP_PROFILES"
for p in "${WANT[@]}" "${TCP_WANT[@]}"; do
    profile_args "$p" >/dev/null || { echo "nbd-bench: unknown profile '$p'" >&2; exit 2; }
done
for p in "${TCP_WANT[@]}"; do
    [[ "$p" != seq-write-* ]] || { echo "nbd-bench: $p cannot run over TCP (the disk is full by then)" >&2; exit 2; }
done
RUN_A=() RUN_B=() RUN_C=()
for p in "${ALL_A[@]}"; do in_list "$p" "${WANT[@]}" && RUN_A+=("$p"); done
for p in "${ALL_B[@]}"; do in_list "$p" "${WANT[@]}" && RUN_B+=("$p"); done
for p in "${TCP_WANT[@]}"; do in_list "$p" "${WANT[@]}" && RUN_C+=("$p"); done
# Session B fills the disk that B's reads and session C need.
if ((${#RUN_B[@]} || ${#RUN_C[@]})) && ! in_list seq-write-1M-qd4 "${RUN_B[@]}"; then
    RUN_B=(seq-write-1M-qd4 "${RUN_B[@]}")
fi
((${#RUN_A[@]} + ${#RUN_B[@]} + ${#RUN_C[@]})) || { echo "nbd-bench: no profile selected" >&2; exit 2; }

# --- servers --------------------------------------------------------------------------------
read -r -a BASE_SERVERS <<<"$SERVERS"
ALL_SERVERS=("${BASE_SERVERS[@]}")
for f in $FEATURES; do
    case $f in
    snapshots | dedup) ALL_SERVERS+=("strata+$f") ;;
    *) echo "nbd-bench: unknown feature '$f' (snapshots, dedup)" >&2; exit 2 ;;
    esac
done
NEED_STRATA=0
for s in "${ALL_SERVERS[@]}"; do
    case $s in
    strata | strata+*) NEED_STRATA=1 ;;
    qemu-nbd | nbdkit) ;;
    *) echo "nbd-bench: unknown server '$s' (strata, qemu-nbd, nbdkit)" >&2; exit 2 ;;
    esac
done
if ((NEED_STRATA)); then find_strata nbd-bench; fi

WORKDIR=${WORKDIR:-$(mktemp -d "${TMPDIR:-/tmp}/strata-nbd-bench.XXXXXX")}
RESULTS=$WORKDIR/results
mkdir -p "$RESULTS"
: >"$RESULTS/rss.tsv"
: >"$RESULTS/failures.txt"
SOCK="" PORT="" URI="" DISK="" DISKS=0
cleanup() {
    stop_server
    [[ -n "$SOCK" ]] && rm -f "$SOCK"
    [[ -n "$CEPH_CONF" && "${KEEP:-0}" != 1 ]] && remove_disk
    if [[ "${KEEP:-0}" == 1 ]]; then
        echo "nbd-bench: kept $WORKDIR" >&2
    else
        rm -rf "$WORKDIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "nbd-bench: $*" >&2; }

# Removes $DISK (a file, or with CEPH_CONF an RBD image; a second try after the watch
# timeout if a killed server's watch still holds it).
remove_disk() {
    [[ -n "$DISK" ]] || return 0
    if [[ -z "$CEPH_CONF" ]]; then
        rm -f "$DISK"
    else
        local spec=${DISK#rbd:}
        spec=${spec%%:*}
        if rbd -c "$CEPH_CONF" info "$spec" >/dev/null 2>&1; then
            rbd -c "$CEPH_CONF" rm --no-progress "$spec" >/dev/null 2>&1 ||
                { sleep 8; rbd -c "$CEPH_CONF" rm --no-progress "$spec" >/dev/null 2>&1; } ||
                log "could not remove $spec (rbd -c $CEPH_CONF rm $spec)"
        fi
    fi
    DISK=""
}

# Makes a fresh disk for server $1 at $DISK: in the file $2, or with CEPH_CONF in a new RBD image.
make_disk() {
    local name=$1 off chunk i cmds=()
    remove_disk
    if [[ -n "$CEPH_CONF" ]]; then
        DISKS=$((DISKS + 1))
        DISK="rbd:$RBD_POOL/nbdb-$$-${name//+/-}-$DISKS:conf=$CEPH_CONF"
    else
        DISK=$2
    fi
    case $name in
    nbdkit) truncate -s "$SIZE" "$DISK" ;;
    strata+dedup) "$STRATA" create -q -f qcow2 -o cluster_size=65536,dedup=on "$DISK" "$SIZE" ;;
    strata+snapshots)
        qemu-img create -q -f qcow2 -o cluster_size=65536 "$DISK" "$SIZE"
        # SIZE/4 of data in 4 MiB writes, each its own pattern, then the snapshots.
        local bytes
        bytes=$(qemu-img info --output=json "$DISK" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
        chunk=$((4 << 20))
        i=0
        for ((off = 0; off + chunk <= bytes / 4; off += chunk)); do
            cmds+=(-c "write -P $((i % 250 + 1)) $off 4M")
            i=$((i + 1))
        done
        ((${#cmds[@]})) && qemu-io -f qcow2 "$DISK" "${cmds[@]}" >/dev/null
        for i in $(seq 1 "$SNAPSHOTS"); do "$STRATA" snapshot -q -c "snap$i" "$DISK"; done
        ;;
    *) qemu-img create -q -f qcow2 -o cluster_size=65536 "$DISK" "$SIZE" ;;
    esac
}

# Starts server $1 on $DISK over transport $2 (unix|tcp); sets SERVER_PID and URI.
start_server() {
    local name=$1 transport=$2 logf="$WORKDIR/$1.log"
    local listen_strata=() listen_qemu=() listen_nbdkit=()
    if [[ $transport == unix ]]; then
        SOCK="$WORKDIR/$name.sock"
        rm -f "$SOCK"
        listen_strata=(--socket "$SOCK")
        listen_qemu=(--socket="$SOCK")
        listen_nbdkit=(--unix "$SOCK")
        URI="nbd+unix:///?socket=$SOCK"
    else
        SOCK=""
        PORT=$(free_tcp_port)
        listen_strata=(--bind 127.0.0.1 --port "$PORT")
        listen_qemu=(--bind=127.0.0.1 --port="$PORT")
        listen_nbdkit=(--ipaddr 127.0.0.1 --port "$PORT")
        URI="nbd://127.0.0.1:$PORT/"
    fi
    echo "=== $(date -u +%FT%TZ) $name $transport" >>"$logf"
    case $name in
    strata | strata+*)
        # env execs strata: $! stays the server's pid.
        env "${STRATA_ENV_WORDS[@]}" "$STRATA" serve "${listen_strata[@]}" --cache writeback -f qcow2 "$DISK" >>"$logf" 2>&1 &
        ;;
    qemu-nbd)
        qemu-nbd --persistent -e 8 -f qcow2 --cache=writeback --aio=threads "${listen_qemu[@]}" \
            "$DISK" >>"$logf" 2>&1 &
        ;;
    nbdkit)
        nbdkit --foreground "${listen_nbdkit[@]}" file "$DISK" >>"$logf" 2>&1 &
        ;;
    esac
    SERVER_PID=$!
    for _ in $(seq 1 400); do
        if [[ $transport == unix ]]; then [[ -S "$SOCK" ]] && return 0; else tcp_listening "$PORT" && return 0; fi
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.05
    done
    log "$name ($transport) did not start; its log:"
    cat "$logf" >&2
    exit 1
}

# Records the server's peak RSS, stops it, removes its socket, and lets the page cache drain.
end_session() {
    local server=$1 round=$2 session=$3
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        log "$server died during session $session of round $round; its log:"
        tail -20 "$WORKDIR/$server.log" >&2
        echo "$server $round session-$session: server died" >>"$RESULTS/failures.txt"
    fi
    printf '%s\t%s\t%s\t%s\n' "$server" "$round" "$session" "$(peak_rss_kb "$SERVER_PID")" >>"$RESULTS/rss.tsv"
    stop_server
    [[ -n "$SOCK" ]] && rm -f "$SOCK"
    SOCK=""
    sync
}

run_fio() {
    local server=$1 transport=$2 round=$3 profile=$4 out args
    out="$RESULTS/$server.$transport.$profile.$round.json"
    read -r -a args <<<"$(profile_args "$profile")"
    log "  $transport $profile"
    if ! fio --name="$profile" --ioengine=nbd --uri="$URI" --size="$SIZE" \
        --output-format=json --output="$out" "${args[@]}" >"$out.err" 2>&1; then
        log "fio failed: $server $transport $profile round $round:"
        tail -5 "$out.err" >&2
        rm -f "$out"
        echo "$server $transport $profile round $round: fio failed" >>"$RESULTS/failures.txt"
    fi
}

# The header of the report: what ran where, with which settings and commands.
{
    echo "# nbd-bench $(date -u +%FT%TZ)"
    echo "git:     $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo ' (dirty)') ($(git -C "$REPO" rev-parse --abbrev-ref HEAD 2>/dev/null || echo '?'))"
    ((NEED_STRATA)) && echo "strata:  $STRATA ($("$STRATA" --version 2>/dev/null | head -1))"
    echo "host:    $(uname -srvm); nproc $(nproc); $(awk '/MemTotal/ { printf "%.1f GiB RAM", $2 / 1048576 }' /proc/meminfo); load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "tools:   $(fio --version), $(qemu-nbd --version | head -1), $(nbdkit --version 2>/dev/null | head -1 || echo 'no nbdkit')"
    [[ -n "$CEPH_CONF" ]] && echo "storage: RBD: every IMG is a fresh image rbd:$RBD_POOL/NAME:conf=$CEPH_CONF (removed by rbd rm after its session); $(ceph --version 2>/dev/null | head -1)"
    [[ -n "$NOTE" ]] && echo "note:    $NOTE"
    echo "settings: ${CEPH_CONF:+CEPH_CONF=$CEPH_CONF RBD_POOL=$RBD_POOL }ROUNDS=$ROUNDS RUNTIME=$RUNTIME SIZE=$SIZE SERVERS=\"$SERVERS\" FEATURES=\"$FEATURES\" STRATA_ENV=\"$STRATA_ENV\" PROFILES=\"$PROFILES\" TCP_PROFILES=\"$TCP_PROFILES\""
    echo "servers (LISTEN: --socket S | --bind 127.0.0.1 --port P, and the same for the others):"
    echo "  strata    ${STRATA_ENV:+$STRATA_ENV }strata serve LISTEN --cache writeback -f qcow2 IMG   (IMG: qemu-img create -f qcow2 -o cluster_size=65536)"
    echo "  qemu-nbd  qemu-nbd --persistent -e 8 -f qcow2 --cache=writeback --aio=threads LISTEN IMG   (same IMG)"
    echo "  nbdkit    nbdkit --foreground LISTEN file RAW   (RAW: truncate -s SIZE)"
    echo "  strata+snapshots  as strata; IMG holds SIZE/4 written by qemu-io in 4M writes, then $SNAPSHOTS x strata snapshot -c"
    echo "  strata+dedup      as strata; IMG: strata create -f qcow2 -o cluster_size=65536,dedup=on"
    echo "fio: fio --ioengine=nbd --uri=URI --size=$SIZE --output-format=json, then per profile:"
    for p in "${RUN_A[@]}" "${RUN_B[@]}"; do echo "  $(printf '%-24s' "$p") $(profile_args "$p")"; done
    echo "sessions per server and round (server started, profiles in this order, peak RSS read, server stopped, sync):"
    ((${#RUN_A[@]})) && echo "  A unix fresh disk: ${RUN_A[*]}"
    ((${#RUN_B[@]})) && echo "  B unix fresh disk: ${RUN_B[*]}"
    ((${#RUN_C[@]})) && echo "  C tcp  B's disk:   ${RUN_C[*]}"
    echo "round r runs the servers in the order of the list rotated by r-1: ${ALL_SERVERS[*]}"
} >"$RESULTS/header.txt"

log "$ROUNDS rounds x ${#ALL_SERVERS[@]} servers (${ALL_SERVERS[*]}); disk $SIZE; random profiles ${RUNTIME}s; work in $WORKDIR"
n=${#ALL_SERVERS[@]}
for round in $(seq 1 "$ROUNDS"); do
    for k in $(seq 0 $((n - 1))); do
        server=${ALL_SERVERS[$(((round - 1 + k) % n))]}
        ext=qcow2
        [[ $server == nbdkit ]] && ext=raw
        log "round $round/$ROUNDS: $server"
        if ((${#RUN_A[@]})); then
            make_disk "$server" "$WORKDIR/$server.$ext"
            start_server "$server" unix
            for p in "${RUN_A[@]}"; do run_fio "$server" unix "$round" "$p"; done
            end_session "$server" "$round" A
        fi
        if ((${#RUN_B[@]})); then
            make_disk "$server" "$WORKDIR/$server.$ext"
            start_server "$server" unix
            for p in "${RUN_B[@]}"; do run_fio "$server" unix "$round" "$p"; done
            end_session "$server" "$round" B
        fi
        if ((${#RUN_C[@]})); then
            start_server "$server" tcp
            for p in "${RUN_C[@]}"; do run_fio "$server" tcp "$round" "$p"; done
            end_session "$server" "$round" C
        fi
        remove_disk
    done
done

status=0
python3 "$HERE/nbd-bench-report.py" --results "$RESULTS" --rounds "$ROUNDS" \
    --servers "${ALL_SERVERS[*]}" --unix "${RUN_A[*]} ${RUN_B[*]}" --tcp "${RUN_C[*]}" \
    --want "${WANT[*]}" || status=$?
if [[ -s "$RESULTS/failures.txt" ]]; then
    log "failures:"
    cat "$RESULTS/failures.txt" >&2
    status=1
fi
exit "$status"
