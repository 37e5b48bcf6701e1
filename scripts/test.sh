#!/usr/bin/env bash
# The whole test suite: unit tests, QEMU interop (qemu-img, qemu-io), NBD with real clients
# (nbdinfo, nbdcopy, nbdsh/python3-libnbd, qemu-img over NBD, fio). Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/deps.sh test)"
swift build --build-tests
# The strata binary the CLI, interop and NBD tests run.
swift build --product strata
export SWIFT_BACKTRACE=enable=no
swift test --skip-build "$@"
