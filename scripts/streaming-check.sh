#!/usr/bin/env bash
# Issue 12's "done when" check, by hand and at full size: 100 clients send
# 300 x 1 MiB through a proxy running with -vv. From the trace, for every
# transfer: did the first upstream write come before the client's upload
# was all read (streaming), or after (store and forward)? Then, ten
# seconds after the run, how much of the spool files is in the page cache
# (fincore, from util-linux, if installed; else the proxy's own count).
#
#   scripts/streaming-check.sh [path/to/stopover] [clients] [transfers]
set -euo pipefail

bin=${1:-target/release/stopover}
clients=${2:-100}
transfers=${3:-300}
work=$(mktemp -d "${TMPDIR:-/tmp}/stopover-streaming.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

addr_of() { # log pid
    for _ in $(seq 1 200); do
        a=$(grep -o 'listening on [^ ]*' "$1" 2>/dev/null | head -n1 || true)
        [ -n "$a" ] && { echo "${a#listening on }"; return 0; }
        kill -0 "$2" 2>/dev/null || { cat "$1" >&2; return 1; }
        sleep 0.05
    done
    return 1
}

"$bin" server --listen 127.0.0.1:0 --dir "$work/received" 2>"$work/server.log" &
pids+=($!)
server=$(addr_of "$work/server.log" "${pids[-1]}")
"$bin" -vv proxy --listen 127.0.0.1:0 --upstream "$server" --dir "$work/spool" 2>"$work/proxy.log" &
pids+=($!)
proxy=$(addr_of "$work/proxy.log" "${pids[-1]}")

"$bin" load --to "$proxy" -c "$clients" -n "$transfers" -s 1MiB --no-progress -q
echo "load: $transfers x 1 MiB from $clients clients through $proxy: all verified"

# Follow each transfer (slab keys are reused: accept .. closed). Builds
# before issue 12 sent from the spool with sendfile: counted as writes.
awk '
    /proxy: accept .* -> #/ { k = $0; sub(/.*-> /, "", k); sub(/,.*/, "", k)
                             read[k] = 0; first[k] = -1; next }
    / #[0-9]+ client read [0-9]+$/ { for (i = 1; i <= NF; i++) if ($i ~ /^#/) k = $i
                                     read[k] += $NF; next }
    / #[0-9]+ upstream (write|sendfile) [0-9]+$/ { for (i = 1; i <= NF; i++) if ($i ~ /^#/) k = $i
                                        if (first[k] < 0) first[k] = read[k]; next }
    / #[0-9]+ closed / { for (i = 1; i <= NF; i++) if ($i ~ /^#/) k = $i
                         n++; if (first[k] >= 0 && first[k] < read[k]) s++
                         if (first[k] > max) max = first[k] }
    END { printf "trace: %d of %d transfers forwarded while still reading (most read before the first upstream write: %d bytes)\n", s, n, max }
' "$work/proxy.log"

echo "waiting 10 s, then the page cache the spool files hold:"
sleep 10
total=$(du -sb "$work/spool" | cut -f1)
if command -v fincore >/dev/null; then
    cached=$(fincore -b -n -o RES "$work"/spool/* | awk '{s += $1} END {print s + 0}')
    echo "fincore: spool files hold $cached of $total bytes in the page cache"
    cached=$(fincore -b -n -o RES "$work"/received/* | awk '{s += $1} END {print s + 0}')
    echo "fincore: (the server's files, for comparison: $cached bytes)"
else
    echo "fincore not installed (util-linux); skipping the page-cache check"
fi
