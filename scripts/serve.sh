#!/usr/bin/env bash
# The main job: build strata, create a demo image (when missing) and serve it over NBD with
# the defaults (TCP 127.0.0.1:10809, export "demo", also the default export).
# Usage: scripts/serve.sh [IMAGE]   (default: demo.qcow2 in the repository, 10 GiB, thin)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/deps.sh build)"
swift build -c release --product strata >&2
strata=.build/release/strata
image="${1:-demo.qcow2}"
if [ ! -e "$image" ]; then
  "$strata" create -f qcow2 "$image" 10G >&2
fi
echo "Try it from another shell:  nbdinfo nbd://127.0.0.1:10809/$(basename "${image%.*}")" >&2
exec "$strata" serve "$image"
