# Shared by the benchmark scripts (sourced, not run). Needs REPO and STRATA_SCRATCH set.

# Stops, naming the Debian package of each missing tool, unless every one is on PATH; nothing
# is installed for the caller. Usage: require_tools SCRIPT TOOL:PACKAGE ...
require_tools() {
    local script=$1 t
    shift
    local missing=()
    for t in "$@"; do
        command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t%%:*} (Debian package: ${t#*:})")
    done
    if ((${#missing[@]})); then
        echo "$script: missing tools; install them first (nothing is installed for you):" >&2
        printf '  %s\n' "${missing[@]}" >&2
        exit 2
    fi
}

# Sets STRATA to the strata binary: the one given in $STRATA, else a release build of the
# repository in $STRATA_SCRATCH. $1 names the calling script in messages.
find_strata() {
    if [[ -z "${STRATA:-}" ]]; then
        echo "$1: building strata (release) in $STRATA_SCRATCH ..." >&2
        (cd "$REPO" && swift build -c release --scratch-path "$STRATA_SCRATCH" --product strata >&2)
        STRATA="$STRATA_SCRATCH/release/strata"
    fi
    [[ -x "$STRATA" ]] || { echo "$1: no strata binary at $STRATA" >&2; exit 2; }
}

# Stops the server whose pid is in $SERVER_PID: SIGTERM, up to ${1:-10} seconds for a clean
# exit (its images flushed and closed), then SIGKILL.
SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 $(( ${1:-10} * 10 ))); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}
