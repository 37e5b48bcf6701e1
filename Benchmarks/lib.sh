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

# Prints a TCP port on 127.0.0.1 that is free right now (the kernel picks it).
free_tcp_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# True once something listens on TCP port $1 of 127.0.0.1 (read from /proc/net/tcp: no
# connection is made, so the server sees no client).
tcp_listening() {
    local hex
    hex=$(printf '%04X' "$1")
    grep -qE "^ *[0-9]+: 0100007F:$hex 00000000:0000 0A " /proc/net/tcp 2>/dev/null ||
        grep -qE "^ *[0-9]+: 00000000:$hex 00000000:0000 0A " /proc/net/tcp 2>/dev/null
}

# Prints the peak resident set (VmHWM, kB) of process $1, or 0 when it is gone.
peak_rss_kb() {
    local kb=""
    [[ -r /proc/$1/status ]] && kb=$(awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null)
    echo "${kb:-0}"
}
