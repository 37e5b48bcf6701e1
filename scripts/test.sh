#!/usr/bin/env bash
# The whole test suite: unit tests, QEMU interop (qemu-img, qemu-io), NBD with real clients
# (nbdinfo, nbdcopy, nbdsh/python3-libnbd, qemu-img over NBD, fio), RBD on a throw-away
# one-node Ceph cluster (scripts/ceph-cluster.sh). Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/deps.sh test)"

# The RBD tests get a Ceph cluster of their own, started while the build runs (about 20 s).
# They read STRATA_CEPH_CONF (its ceph.conf); if the cluster cannot start they get
# STRATA_CEPH_ERROR instead and fail with it: they are never silently skipped.
# A short folder: the daemons' Unix socket paths must stay under 108 bytes.
ceph_dir=$(mktemp -d /tmp/sc.XXXX)
ceph_job=""
cleanup() {
  # An unfinished start first (its daemons are recorded as they start), then the cluster.
  if [ -n "$ceph_job" ] && kill -0 "$ceph_job" 2>/dev/null; then
    kill "$ceph_job" 2>/dev/null || true
    wait "$ceph_job" 2>/dev/null || true
  fi
  scripts/ceph-cluster.sh stop "$ceph_dir" || true
  rm -rf "$ceph_dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
scripts/ceph-cluster.sh start "$ceph_dir" >"$ceph_dir/start.out" 2>"$ceph_dir/start.err" &
ceph_job=$!

swift build --build-tests
# The strata binary the CLI, interop and NBD tests run.
swift build --product strata

unset STRATA_CEPH_CONF STRATA_CEPH_ERROR
if wait "$ceph_job"; then
  ceph_job=""
  STRATA_CEPH_CONF=$(tail -n 1 "$ceph_dir/start.out")
  export STRATA_CEPH_CONF
  grep -h "ready after" "$ceph_dir/start.err" >&2 || true
else
  ceph_job=""
  cat "$ceph_dir/start.err" >&2
  # One line for the tests to fail with: the reason the start script gives last.
  reason=$(sed -n 's/^ceph-cluster: start failed: //p' "$ceph_dir/start.err" | tail -n 1)
  # The tests prefix it with "the test cluster did not start: ".
  STRATA_CEPH_ERROR="${reason:-see the output of scripts/ceph-cluster.sh start} (scripts/ceph-cluster.sh start DIR to retry by hand)"
  export STRATA_CEPH_ERROR
  echo "the test Ceph cluster did not start: $STRATA_CEPH_ERROR" >&2
fi

export SWIFT_BACKTRACE=enable=no
swift test --skip-build "$@"
