#!/usr/bin/env bash
# Runs the whole system once: a server and a proxy on free loopback ports,
# a sample file sent through them by the client, then the answer and the
# stored files in both directories. Both daemons are stopped by PID on exit,
# whatever happens, and the working directory is removed (KEEP=1 keeps it).
# With TRACE=1 (make demo-trace), the daemons run with -vv and the demo ends
# with their readiness traces: every event, every read and write, every
# state change, one line each. With LOGS=DIR, the daemons' raw logs are
# copied to DIR/server.log and DIR/proxy.log (`make diagrams` draws the
# proxy's with `stopover trace-view`). SIZE=BYTES sends a file of about
# that size instead of the usual one.
set -euo pipefail

bin=${1:-target/release/stopover}
verbosity=()
[ "${TRACE:-0}" = 1 ] && verbosity=(-vv)
work=$(mktemp -d "${TMPDIR:-/tmp}/stopover-demo.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then
        echo "== kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Waits (bounded) for a daemon's "listening on ADDR" log line; prints ADDR.
listening_addr() {
    local log=$1 pid=$2
    for _ in $(seq 1 200); do
        if addr=$(grep -o 'listening on [^ ]*' "$log" 2>/dev/null | head -n1); then
            [ -n "$addr" ] && { echo "${addr#listening on }"; return 0; }
        fi
        kill -0 "$pid" 2>/dev/null || { echo "daemon exited:" >&2; cat "$log" >&2; return 1; }
        sleep 0.05
    done
    echo "timed out waiting for $log" >&2
    return 1
}

echo "== working in $work (removed at the end; KEEP=1 keeps it)"
"$bin" "${verbosity[@]}" server --listen 127.0.0.1:0 --dir "$work/received" 2>"$work/server.log" &
pids+=($!)
server=$(listening_addr "$work/server.log" "${pids[-1]}")
echo "== server listening on $server"

"$bin" "${verbosity[@]}" proxy --listen 127.0.0.1:0 --upstream "$server" --dir "$work/spool" 2>"$work/proxy.log" &
pids+=($!)
proxy=$(listening_addr "$work/proxy.log" "${pids[-1]}")
echo "== proxy listening on $proxy, forwarding to $server"

sample="$work/sample.bin"
if [ -n "${SIZE:-}" ]; then
    # SIZE=BYTES: a file of that size (make diagrams draws one large
    # enough to need several reads, writes and disk writes).
    { echo "stopover demo file, made $(date -u +%FT%TZ)"; head -c "$SIZE" /dev/urandom; } >"$sample"
elif [ "${TRACE:-0}" = 1 ]; then
    # Small, so the trace stays short enough to read.
    echo "stopover demo file, made $(date -u +%FT%TZ)" >"$sample"
else
    { echo "stopover demo file, made $(date -u +%FT%TZ)"; head -c $((4 * 1024 * 1024)) /dev/urandom; } >"$sample"
fi
echo "== sending $sample ($(stat -c %s "$sample") bytes, crc32c computed by the client as it sends)"
echo "\$ stopover client --to $proxy $sample"
status=0
"$bin" client --to "$proxy" "$sample" || status=$?
echo "== client exit code: $status (0 = the server stored exactly the bytes sent)"

echo "== server stored (received/):"
ls -l "$work/received"
echo "== proxy kept (spool/):"
ls -l "$work/spool"
# Let the daemons finish their last log lines (closing happens just after
# the answer is out), then show the logs without the timestamps.
sleep 0.2
echo "== logs:"
sed 's/^[^ ]* /server| /' "$work/server.log"
sed 's/^[^ ]* /proxy | /' "$work/proxy.log"
if [ -n "${LOGS:-}" ]; then
    mkdir -p "$LOGS"
    cp "$work/server.log" "$work/proxy.log" "$LOGS/"
fi
exit "$status"
