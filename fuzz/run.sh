#!/usr/bin/env bash
# Builds the libFuzzer targets and runs each one for a while.
#
#   fuzz/run.sh [SECONDS] [TARGET...]      SECONDS per target (default 60);
#                                          TARGETs: fuzz_image fuzz_nbd fuzz_check
#                                          fuzz_snapshots fuzz_control (default: all)
#   fuzz/run.sh build                      build only
#   fuzz/run.sh repro TARGET FILE...       run TARGET once on each FILE (a crash reproducer)
#
# How it builds: SwiftPM compiles the nested package in this folder (one library target per
# fuzz target, plus the engine, the NBD server and their dependencies) with
# `-sanitize=fuzzer,address` and `-enable-testing` (fuzz_nbd reaches internal types), then
# `swiftc -sanitize=fuzzer,address` links each target's objects with libFuzzer's main into
# bin/. (A SwiftPM executable target cannot be used: SwiftPM renames `main`.)
#
# Settings (environment): FUZZ_SCRATCH (build folder, default fuzz/.build), FUZZ_JOBS (parallel
# fuzzing processes per target, default 1), FUZZ_ARGS (extra libFuzzer flags).
# New corpus entries go to fuzz/artifacts/corpus-TARGET (not committed); crashes, leaks, OOMs
# and timeouts are written to fuzz/crashes/TARGET-*.
set -euo pipefail
export SWIFT_BACKTRACE=enable=no
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRATCH=${FUZZ_SCRATCH:-$HERE/.build}
ALL_TARGETS=(fuzz_image fuzz_nbd fuzz_check fuzz_snapshots fuzz_control)

module_of() {
    case $1 in
    fuzz_image) echo FuzzImage ;;
    fuzz_nbd) echo FuzzNBD ;;
    fuzz_check) echo FuzzCheck ;;
    fuzz_snapshots) echo FuzzSnapshots ;;
    fuzz_control) echo FuzzControl ;;
    *) echo "run.sh: unknown target $1 (expected: ${ALL_TARGETS[*]})" >&2; exit 2 ;;
    esac
}

build() {
    echo "run.sh: compiling (release, -sanitize=fuzzer,address) in $SCRATCH" >&2
    swift build -c release --package-path "$HERE" --scratch-path "$SCRATCH" \
        -Xswiftc -sanitize=fuzzer,address -Xswiftc -enable-testing >&2
    local out; out=$(swift build -c release --package-path "$HERE" --scratch-path "$SCRATCH" --show-bin-path)
    mkdir -p "$HERE/bin"
    for target in "${ALL_TARGETS[@]}"; do
        local module; module=$(module_of "$target")
        # Every object SwiftPM built, except the other fuzz targets' (each defines the entry
        # point). A Swift target's objects are named after its current source list (objects of
        # files since deleted or renamed stay behind in the folder); a C target's are globbed.
        local objects=() dir
        for dir in "$out"/*.build; do
            case $(basename "$dir") in Fuzz*) [[ $(basename "$dir") == "$module.build" ]] || continue ;; esac
            if [[ -f "$dir/sources" ]]; then
                # (a path with spaces is written in single quotes)
                while IFS= read -r src; do src=${src#\'}; src=${src%\'}; objects+=("$dir/$(basename "$src").o"); done < "$dir/sources"
            else
                while IFS= read -r -d '' o; do objects+=("$o"); done < <(find "$dir" -name '*.o' -print0)
            fi
        done
        echo "run.sh: linking bin/$target (${#objects[@]} objects)" >&2
        # (gold warns once per ASan helper symbol that it "cannot export local symbol": noise.)
        # (-lstdc++: BoringSSL, under swift-nio-ssl, is C++; SwiftPM links it the same way.)
        swiftc -sanitize=fuzzer,address "${objects[@]}" -lz -llz4 -lzstd -lstdc++ -o "$HERE/bin/$target" \
            2> >(grep -v "Cannot export local symbol" >&2)
    done
}

max_len() {
    case $1 in
    fuzz_image | fuzz_check | fuzz_snapshots) echo 65536 ;;
    fuzz_nbd | fuzz_control) echo 8192 ;;
    esac
}

# Backing files named by a fuzzed image resolve against the working folder: use an empty one.
run_dir() { local d; d=$(mktemp -d "${TMPDIR:-/tmp}/strata-fuzz.XXXXXX"); echo "$d"; }

case ${1:-} in
build)
    build
    exit 0
    ;;
repro)
    target=${2:?target}; shift 2
    module_of "$target" >/dev/null
    [[ -x "$HERE/bin/$target" ]] || build
    dir=$(run_dir)
    set +e
    (cd "$dir" && "$HERE/bin/$target" -rss_limit_mb=2048 -timeout=20 "$@")
    rc=$?
    rm -rf "$dir"
    exit $rc
    ;;
esac

SECS=${1:-60}
shift || true
targets=("$@")
((${#targets[@]})) || targets=("${ALL_TARGETS[@]}")
for t in "${targets[@]}"; do module_of "$t" >/dev/null; done
build

mkdir -p "$HERE/crashes"
status=0
for target in "${targets[@]}"; do
    corpus="$HERE/artifacts/corpus-$target"
    seeds="$HERE/corpus/${target#fuzz_}"
    mkdir -p "$corpus"
    dir=$(run_dir)
    echo "run.sh: $target for ${SECS}s (seeds: $seeds; corpus: $corpus)" >&2
    set +e
    (cd "$dir" && "$HERE/bin/$target" "$corpus" "$seeds" \
        -max_total_time="$SECS" -timeout=20 -rss_limit_mb=2048 -max_len="$(max_len "$target")" \
        -artifact_prefix="$HERE/crashes/$target-" -print_final_stats=1 \
        ${FUZZ_JOBS:+-jobs=$FUZZ_JOBS -workers=$FUZZ_JOBS} ${FUZZ_ARGS:-})
    rc=$?
    set -e
    rm -rf "$dir"
    if ((rc != 0)); then
        echo "run.sh: $target stopped with status $rc; see fuzz/crashes/$target-*" >&2
        status=1
    fi
done
exit $status
