#!/usr/bin/env bash
# Paired A/B of two builds' proxies on small transfers: one server (from
# A), then for each round a proxy of A and one of B in turn, 64 clients x
# N x 1 KiB (default 8,000) after 1,000 to warm up; prints each run's
# transfers/s and the proxy's and server's CPU per transfer.
# Usage: scripts/ab-small.sh stopover-A stopover-B [ROUNDS] [N]
set -euo pipefail
A=${1:?usage: ab-small.sh A B [ROUNDS] [N]}; B=${2:?}; R=${3:-3}; N=${4:-8000}
D=$(mktemp -d "${TMPDIR:-/tmp}/stopover-ab.XXXXXX")
trap 'kill $S 2>/dev/null || true; rm -rf "$D"' EXIT
"$A" server --listen 127.0.0.1:0 --dir "$D/r" 2> "$D/s.log" & S=$!
sleep 0.4; SA=$(grep -o 'listening on [0-9.:]*' "$D/s.log" | awk '{print $3}')
cpu() { awk '{ print ($14 + $15) / 100 }' "/proc/$1/stat"; }
for i in $(seq 1 "$R"); do
    for bin in "$A" "$B"; do
        "$bin" proxy --listen 127.0.0.1:0 --upstream "$SA" --dir "$D/p-$i-$(basename "$bin")" 2> "$D/p.log" & P=$!
        sleep 0.4; PA=$(grep -o 'listening on [0-9.:]*' "$D/p.log" | awk '{print $3}')
        "$A" load --to "$PA" -c 64 -n 1000 -s 1KiB --no-progress > /dev/null 2>&1
        c0=$(cpu $P); s0=$(cpu $S)
        rate=$("$A" load --to "$PA" -c 64 -n "$N" -s 1KiB --no-progress 2>&1 | awk '/^  rate/ { print $2 }')
        c1=$(cpu $P); s1=$(cpu $S)
        awk -v b="$(basename "$bin")" -v i="$i" -v r="$rate" -v c0="$c0" -v c1="$c1" -v s0="$s0" -v s1="$s1" -v n="$N" \
            'BEGIN { printf "%s round %d: %s transfers/s, proxy %.0f us/transfer, server %.0f us/transfer\n", b, i, r, (c1 - c0) * 1e6 / n, (s1 - s0) * 1e6 / n }'
        kill $P; wait $P 2>/dev/null || true
    done
done
