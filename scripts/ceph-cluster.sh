#!/usr/bin/env bash
# A throw-away one-node Ceph cluster for the test suite: one monitor, one manager, one OSD
# (bluestore on a sparse file), all on 127.0.0.1, no systemd, every file inside one folder.
#
# Usage:
#   scripts/ceph-cluster.sh start DIR    create DIR, start the cluster, wait until it is healthy,
#                                        create pool "strata"; prints one line: DIR/ceph.conf
#   scripts/ceph-cluster.sh stop DIR     stop the daemons by their recorded pids (idempotent)
#   scripts/ceph-cluster.sh status DIR   print `ceph -s`
#
# Clients then need only the conf file (it names the admin keyring):
#   rbd -c DIR/ceph.conf create strata/img --size 64M
#   qemu-img create -f qcow2 rbd:strata/img:conf=DIR/ceph.conf 64M
#
# Keep DIR short (e.g. mktemp -d /tmp/sc.XXXX): Unix socket paths must stay under 108 bytes.
# Only the final stdout line of `start` is for callers; all progress and errors go to stderr.
# Needs: ceph-mon ceph-mgr ceph-osd ceph-common (scripts/deps.sh test).
set -euo pipefail

POOL=strata
HEALTH_TIMEOUT=${CEPH_CLUSTER_TIMEOUT:-120}   # seconds to wait for HEALTH_OK and active+clean
# Daemons in start order; stop goes in reverse (OSD first, or it waits for the monitor 5 s).
DAEMONS=(mon mgr osd)

log() { echo "ceph-cluster: $*" >&2; }
# fail: a start failure with its reason, which `start` repeats last ("start failed: ...").
FAIL_REASON=""
fail() { FAIL_REASON=$*; log "$*"; return 1; }
die() { fail "$*" || exit 1; }

usage() {
  sed -n '5,10p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# True while a process runs. A zombie counts as gone: the daemons are reparented to pid 1 when
# `start` exits, and an init that reaps slowly (seen here: about 2 s) must not slow `stop` down.
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat:0:1}" != Z ]
}

# The pid recorded for a daemon if that process is still a running Ceph daemon, else nothing.
# Checking the command name guards against a reused pid after a reboot or a long gap.
live_pid() {
  local f="$DIR/$1.pid" pid
  [ -s "$f" ] || return 0
  pid=$(<"$f")
  alive "$pid" || return 0
  case "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" in
    *ceph-"$1"*) echo "$pid" ;;
  esac
}

# Every CLI call is bounded: without a reachable monitor `ceph` would otherwise retry for 300 s.
cephc() { timeout 20 ceph -c "$CONF" --connect-timeout 10 "$@"; }

stop_cluster() {
  local d pid i
  for d in osd mgr mon; do
    pid=$(live_pid "$d")
    [ -n "$pid" ] || { rm -f "$DIR/$d.pid"; continue; }
    kill -TERM "$pid" 2>/dev/null || true
    # Up to about 5 s for a clean exit, then SIGKILL: nothing in the cluster is worth keeping.
    for ((i = 0; i < 50; i++)); do
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then
      log "$d (pid $pid) did not exit after SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do
        alive "$pid" || break
        sleep 0.1
      done
    fi
    alive "$pid" && die "$d (pid $pid) is still running"
    log "stopped ceph-$d (pid $pid)"
    rm -f "$DIR/$d.pid"
  done
}

# The evidence for a failed start: the end of every daemon log and what the monitor says.
report_failure() {
  local f
  for f in "$DIR"/log/*.log "$DIR"/log/*.out; do
    [ -s "$f" ] || continue
    log "---- tail of $f"
    tail -n 20 "$f" >&2
  done
  log "---- ceph -s"
  cephc -s >&2 2>&1 || true
}

# A free TCP port P on 127.0.0.1 with P+1 also free (the monitor's v2 and v1 addresses).
# Random in 20000..59999 so that two clusters started at once are unlikely to pick the same one;
# if they still do, the second monitor fails to bind and its start fails with its log shown.
free_port_pair() {
  local used p i
  used=$(ss -Htln 2>/dev/null | awk '{print $4}' | sed 's/.*://' | sort -u)
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
    if ! grep -qxE "$p|$((p + 1))" <<<"$used"; then echo "$p"; return; fi
  done
  die "no free port pair found on 127.0.0.1"
}

# True when the cluster is HEALTH_OK, the OSD is up and in, and every PG is active+clean.
# One `ceph -s` per poll (each CLI call costs about 0.7 s of Python start-up), read with the
# Python the ceph CLI itself runs on (/usr/bin/python3, with ceph-common), so no jq is needed.
healthy() {
  cephc -s -f json 2>/dev/null | /usr/bin/python3 -c '
import json, sys
s = json.load(sys.stdin)
o, p = s["osdmap"], s["pgmap"]
clean = sum(x["count"] for x in p.get("pgs_by_state", []) if x["state_name"] == "active+clean")
ok = (s["health"]["status"] == "HEALTH_OK" and o["num_osds"] == o["num_up_osds"] == o["num_in_osds"] == 1
      and clean == p["num_pgs"])
sys.exit(0 if ok else 1)' 2>/dev/null
}

# Waits for healthy(); fails early if a daemon died, and at the deadline.
wait_healthy() {
  local what=$1 deadline=$((SECONDS + HEALTH_TIMEOUT)) d
  until healthy; do
    for d in "${DAEMONS[@]}"; do
      [ -n "$(live_pid "$d")" ] || { fail "ceph-$d exited while waiting for $what"; return; }
    done
    [ "$SECONDS" -lt "$deadline" ] || { fail "not healthy after ${HEALTH_TIMEOUT} s ($what)"; return; }
    sleep 0.5
  done
}

# Starts one daemon in the foreground mode (-f: no fork, logs to its file) as a background job
# and records its pid. setsid keeps it out of the caller's process group so a Ctrl-C in the
# test run reaches the test command, and the trap in scripts/test.sh stops the cluster in order.
start_daemon() {
  local d=$1; shift
  setsid "ceph-$d" -c "$CONF" -f "$@" </dev/null >>"$DIR/log/$d.out" 2>&1 &
  echo $! >"$DIR/$d.pid"
}

start_cluster() {
  local d port fsid osd_uuid osd_secret t0=$SECONDS
  for d in "${DAEMONS[@]}"; do
    [ -z "$(live_pid "$d")" ] || die "$DIR already holds a running cluster (ceph-$d pid $(live_pid "$d"))"
  done
  for c in ceph ceph-mon ceph-mgr ceph-osd ceph-authtool monmaptool ss; do
    command -v "$c" >/dev/null || die "$c not found (install with scripts/deps.sh test)"
  done
  # A leftover stopped cluster in DIR is discarded: only the files this script makes.
  rm -rf "${DIR:?}"/{mon,mgr,osd,log,run,crash,ceph.conf,keyring,*.keyring,monmap,*.pid}
  mkdir -p "$DIR"/{mon,mgr,osd,log,run,crash}

  port=$(free_port_pair)
  fsid=$(uuidgen)
  local mon_addr="[v2:127.0.0.1:$port,v1:127.0.0.1:$((port + 1))]"
  cat >"$CONF" <<EOF
# Written by scripts/ceph-cluster.sh: a throw-away one-node test cluster.
[global]
fsid = $fsid
mon host = $mon_addr
public addr = 127.0.0.1
cluster addr = 127.0.0.1
run dir = $DIR/run
crash dir = $DIR/crash
log file = $DIR/log/\$name.log
# One OSD: pools of size 1, no redundancy warning, CRUSH places replicas across OSDs, not hosts.
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
# Fixed PG counts: the autoscaler would resize pools (and delay active+clean) in the middle of tests.
osd pool default pg autoscale mode = off
# Test clusters get deleted: allow it, and let tests remove their pools.
mon allow pool delete = true
# The disk of a test machine may be well under 30% free: the default warn (30%) keeps
# HEALTH_WARN forever and the default crit (5%) stops the monitor.
mon data avail warn = 2
mon data avail crit = 1
# All clients are current: no insecure global_id reclaim (and so no health warning about it).
auth allow insecure global id reclaim = false
# A client killed with SIGKILL loses its watches (the RBD exclusive-lock owner's watch) after
# this many seconds instead of 30, so tests of a crashed writer do not wait half a minute.
osd client watch timeout = 6
# The OSD's cache target: 1 GiB instead of 4.
osd memory target = 1073741824
# PG states reach "ceph -s" through the manager: OSD -> mgr every mgr stats period, mgr -> mon
# every mon mgr digest period (5 s each by default). At 1 s, "active+clean" is seen seconds sooner.
mgr stats period = 1
mon mgr digest period = 1
osd mon report interval = 1
# Fewer manager modules, a faster manager start (the always-on ones, rbd_support among them, still run).
mgr initial modules = iostat

[client]
# Clients (client.admin by default) find their key here, so \`rbd -c $CONF\` and qemu's conf=
# need no id= or keyring=. Not in [global]: each daemon has its own keyring, set below.
keyring = $DIR/keyring
# A full or broken cluster would otherwise block a writer forever; fail its I/O after 60 s.
rados osd op timeout = 60

[mon.a]
mon data = $DIR/mon
admin socket = $DIR/run/ceph-mon.a.asok
keyring = $DIR/mon/keyring

[mgr.x]
mgr data = $DIR/mgr
admin socket = $DIR/run/ceph-mgr.x.asok
keyring = $DIR/mgr/keyring

[osd.0]
osd data = $DIR/osd
admin socket = $DIR/run/ceph-osd.0.asok
keyring = $DIR/osd/keyring
osd objectstore = bluestore
# BlueStore on a sparse 16 GiB file inside osd data (only written blocks take disk space).
bluestore block create = true
bluestore block size = 17179869184
EOF

  # Keys: the monitor's keyring holds mon. and client.admin; the admin keyring is the clients'.
  ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
  ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/keyring" >/dev/null
  # The monmap must carry both addresses (--addv): without it the monitor binds Ceph's default
  # ports and clients looking at mon host hang.
  monmaptool --create --fsid "$fsid" --addv a "$mon_addr" "$DIR/monmap" >/dev/null
  # From here on any failure (set -e) shows the logs, stops whatever was started, and ends
  # with one line saying why: the last fail() message, or the command that failed.
  set -E
  trap '[ -n "$FAIL_REASON" ] || FAIL_REASON="command failed: $BASH_COMMAND"' ERR
  trap 'report_failure; stop_cluster; log "start failed: $FAIL_REASON"' EXIT
  ceph-mon -c "$CONF" -i a --mkfs --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring" \
    >>"$DIR/log/mon.out" 2>&1
  start_daemon mon -i a

  # The manager's key comes from the monitor, so this also waits for the monitor to answer.
  local i
  for ((i = 0; i < 30; i++)); do
    cephc auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
      -o "$DIR/mgr/keyring" 2>/dev/null && break
    [ -n "$(live_pid mon)" ] || fail "ceph-mon exited"
    sleep 1
  done
  [ -s "$DIR/mgr/keyring" ] || fail "the monitor did not answer"
  start_daemon mgr -i x

  # The OSD: register it with a secret of our own, then write its keyring file by hand
  # (`ceph-osd --mkfs --key` writes none and the OSD then fails with "failed to fetch mon config").
  osd_uuid=$(uuidgen)
  osd_secret=$(ceph-authtool --gen-print-key)
  echo "{\"cephx_secret\": \"$osd_secret\"}" >"$DIR/osd/secret.json"
  d=$(cephc osd new "$osd_uuid" -i "$DIR/osd/secret.json")
  rm -f "$DIR/osd/secret.json"
  [ "$d" = 0 ] || fail "ceph osd new returned id '$d', expected 0"
  printf '[osd.0]\n\tkey = %s\n' "$osd_secret" >"$DIR/osd/keyring"
  ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$DIR/log/osd.out" 2>&1
  start_daemon osd -i 0

  wait_healthy "the cluster"
  log "healthy after $((SECONDS - t0)) s"

  cephc osd pool create "$POOL" 16 16 >/dev/null 2>&1
  timeout 60 rbd -c "$CONF" pool init "$POOL"
  wait_healthy "pool $POOL"
  trap - EXIT ERR
  log "pool $POOL ready after $((SECONDS - t0)) s; stop with: $0 stop $DIR"
  echo "$CONF"
}

[ $# -eq 2 ] || usage
case "$2" in /*) DIR=$2 ;; *) DIR=$PWD/$2 ;; esac
DIR=${DIR%/}
CONF=$DIR/ceph.conf
case "$1" in
  start)
    # The longest socket path is DIR/run/ceph-osd.0.asok; sun_path holds 107 bytes.
    [ $((${#DIR} + 24)) -lt 108 ] || die "folder path too long for Unix sockets (keep it under 80 bytes): $DIR"
    mkdir -p "$DIR"
    start_cluster ;;
  stop) [ -d "$DIR" ] && stop_cluster; exit 0 ;;
  status)
    [ -f "$CONF" ] || die "no cluster in $DIR"
    [ -n "$(live_pid mon)" ] || die "the cluster in $DIR is not running"
    cephc -s ;;
  *) usage ;;
esac
