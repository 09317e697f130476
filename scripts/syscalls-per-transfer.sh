#!/usr/bin/env bash
# System calls per transfer of the proxy and the server: strace -c -f over
# N x 1 KiB from 16 clients (default 2,000), after 200 to warm up.
# Usage: scripts/syscalls-per-transfer.sh path/to/stopover [N]
set -euo pipefail
B=${1:?usage: syscalls-per-transfer.sh path/to/stopover [N]}; N=${2:-2000}
D=$(mktemp -d "${TMPDIR:-/tmp}/stopover-sc.XXXXXX")
trap 'kill $S $P 2>/dev/null || true; rm -rf "$D"' EXIT
"$B" server --listen 127.0.0.1:0 --dir "$D/r" 2> "$D/s.log" & S=$!
sleep 0.4; SA=$(grep -o 'listening on [0-9.:]*' "$D/s.log" | awk '{print $3}')
"$B" proxy --listen 127.0.0.1:0 --upstream "$SA" --dir "$D/s" 2> "$D/p.log" & P=$!
sleep 0.4; PA=$(grep -o 'listening on [0-9.:]*' "$D/p.log" | awk '{print $3}')
"$B" load --to "$PA" -c 16 -n 200 -s 1KiB -q > /dev/null 2>&1
strace -f -c -p $P -o "$D/proxy.txt" & T=$!
strace -f -c -p $S -o "$D/server.txt" & T2=$!
sleep 0.5
"$B" load --to "$PA" -c 16 -n "$N" -s 1KiB --no-progress 2>&1 | grep -E '^  (ok|rate)'
sleep 0.3; kill -INT $T $T2; wait $T $T2 2>/dev/null || true
for who in proxy server; do
    echo "== $who"
    awk -v n="$N" '/^ *[0-9]/ && $NF != "total" { printf "%-14s %6.2f/transfer\n", $NF, $4 / n }' "$D/$who.txt"
    awk -v n="$N" '$NF == "total" { printf "total          %6.2f/transfer\n", $4 / n }' "$D/$who.txt"
done
