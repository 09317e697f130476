#!/usr/bin/env bash
# Which calls on a daemon's loop thread wait, under load: strace -f -T of
# a proxy relaying 1,000 clients x 4 MiB (C, N, S to change), or with
# `server` of the server taking them straight (no proxy), then the worst
# duration of each traced call on the loop thread (the daemon's main pid),
# every call over 5 ms, the counts, and the calls on files of the store
# (-y names each descriptor's file: a socket's `write` is not a file's).
# Needs strace; writes under a temp dir that it removes.
# Usage: scripts/loop-strace.sh path/to/stopover [proxy|server]
#   e.g. C=200 N=400 S=1MiB SERVER_ARGS=--fsync scripts/loop-strace.sh target/release/stopover server
set -euo pipefail
BIN=${1:?usage: loop-strace.sh path/to/stopover [proxy|server]}
WHO=${2:-proxy}
W=$(mktemp -d "${TMPDIR:-/tmp}/stopover-strace.XXXXXX")
trap 'kill $PROXY $SP 2>/dev/null || true; rm -rf "$W"' EXIT
mkdir -p "$W/recv" "$W/spool"
ulimit -n 20000 || true
"$BIN" server --listen 127.0.0.1:0 --dir "$W/recv" ${SERVER_ARGS:-} 2> "$W/server.log" & SP=$!
sleep 0.5; SADDR=$(grep -o 'listening on [0-9.:]*' "$W/server.log" | awk '{print $3}')
"$BIN" proxy --listen 127.0.0.1:0 --upstream "$SADDR" --dir "$W/spool" 2> "$W/proxy.log" & PROXY=$!; PP=$PROXY
sleep 0.5; PADDR=$(grep -o 'listening on [0-9.:]*' "$W/proxy.log" | awk '{print $3}')
if [ "$WHO" = server ]; then PP=$SP; PADDR=$SADDR; fi
strace -f -T -y -e trace=fallocate,ftruncate,pwrite64,write,io_uring_enter,sync_file_range,fadvise64,fsync,fdatasync,openat,unlinkat,renameat2,rename,unlink,close \
    -p "$PP" -o "$W/strace.txt" 2>/dev/null & STP=$!
sleep 1
${LOAD_NICE:+nice -n $LOAD_NICE} "$BIN" load --to "$PADDR" -c "${C:-1000}" -n "${N:-1000}" -s "${S:-4MiB}" --no-progress 2>&1 | head -8
kill $STP; sleep 0.5
echo "worst per call on the loop thread ($PP):"
grep "^$PP " "$W/strace.txt" | sed -E 's/^[0-9]+ +([a-z0-9_]+)\(.*<([0-9.]+)>$/\1 \2/' \
    | grep -E "^[a-z0-9_]+ [0-9.]+$" | sort -k1,1 -k2,2gr | awk '{ if ($1 != p) { print; p = $1 } }'
echo "calls over 5 ms on the loop thread:"
grep "^$PP " "$W/strace.txt" | awk -F'<' '{ d = $NF; sub(/>.*/, "", d); if (d + 0 > 0.005) print }' | head -20
echo "counts:"
grep "^$PP " "$W/strace.txt" | awk '{ split($2, a, "("); print a[1] }' | sort | uniq -c | sort -rn | head
echo "calls on the store's files or names on the loop thread, by call (worst duration):"
grep "^$PP " "$W/strace.txt" | grep -E "$W/(recv|spool)" \
    | sed -E 's/^[0-9]+ +([a-z0-9_]+)\(.*<([0-9.]+)>$/\1 \2/' | grep -E "^[a-z0-9_]+ [0-9.]+$" \
    | awk '{ n[$1]++; if ($2 > m[$1]) m[$1] = $2 } END { for (c in n) printf "%8d %s (worst %.6f s)\n", n[c], c, m[c] }' | sort -rn
echo "warnings: proxy $(grep -c WARN "$W/proxy.log" || true), server $(grep -c WARN "$W/server.log" || true)"
grep -h WARN "$W/proxy.log" "$W/server.log" | head -3 || true
