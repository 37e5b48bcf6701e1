#!/usr/bin/env bash
# Installs the Debian packages Strata needs, skipping those already present.
# Usage: scripts/deps.sh [build|test]   (build: libraries to compile; test: + QEMU, NBD clients, Ceph)
set -euo pipefail
want=(liblz4-dev libzstd-dev zlib1g-dev pkg-config)
if [ "${1:-test}" = test ]; then
  want+=(qemu-utils libnbd-bin python3-libnbd fio nbdkit openssl)
  # The real-guest tests (scripts/guest/build.sh, GuestTests): QEMU, the initramfs tools,
  # the guest's NBD client and mke2fs, and the host's e2fsck/debugfs; xz unpacks the kernel.
  want+=(qemu-system-x86 busybox-static nbd-client e2fsprogs xz-utils)
  # The RBD tests: a throw-away one-node Ceph cluster (scripts/ceph-cluster.sh; the daemons'
  # install scripts start nothing) and QEMU's rbd driver, the test oracle for qcow2 on RBD.
  want+=(ceph-mon ceph-mgr ceph-osd ceph-common qemu-block-extra)
fi
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "Installing: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
# The Swift toolchain lives in /opt/swift on our machines.
if ! command -v swift >/dev/null && [ -x /opt/swift/usr/bin/swift ]; then
  echo "export PATH=\"/opt/swift/usr/bin:\$PATH\""
fi
