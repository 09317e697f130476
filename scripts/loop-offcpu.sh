#!/usr/bin/env bash
# Why the proxy's loop thread leaves the CPU, under load: perf records
# every context switch of the loop thread (with its kernel stack) while
# 1,000 clients x 4 MiB (N, S to change) go through proxy and server. A
# loop that never waits sleeps only in epoll_wait (state S); any other
# sleep (D: a lock, the device; S elsewhere) is the loop waiting for
# something. R/R+ is preemption: the thread was runnable but another one
# (the load generator's 1,000 threads, the kernel's workers) had the CPU.
# Then the loop's own histogram from /metrics: handlings over 5 ms.
# Needs perf (linux-perf). Usage: scripts/loop-offcpu.sh path/to/stopover
set -euo pipefail
BIN=${1:?usage: loop-offcpu.sh path/to/stopover}
command -v perf >/dev/null || { echo "loop-offcpu: perf is not installed (apt-get install linux-perf)"; exit 1; }
W=$(mktemp -d "${TMPDIR:-/tmp}/stopover-offcpu.XXXXXX")
trap 'kill $PP $SP 2>/dev/null || true; rm -rf "$W"' EXIT
mkdir -p "$W/recv" "$W/spool"
ulimit -n 20000 || true
"$BIN" server --listen 127.0.0.1:0 --dir "$W/recv" 2> "$W/server.log" & SP=$!
sleep 0.5; SADDR=$(grep -o 'listening on [0-9.:]*' "$W/server.log" | awk '{print $3}')
"$BIN" proxy --listen 127.0.0.1:0 --upstream "$SADDR" --dir "$W/spool" --stats-addr 127.0.0.1:0 2> "$W/proxy.log" & PP=$!
sleep 0.5; PADDR=$(grep -o 'listening on [0-9.:]*' "$W/proxy.log" | head -1 | awk '{print $3}')
MADDR=$(grep -o 'at http://[0-9.:]*/metrics' "$W/proxy.log" | head -1 | sed 's|at http://||; s|/metrics||')
perf record -q -e sched:sched_switch -g -t "$PP" -o "$W/perf.data" 2>/dev/null & PRP=$!
sleep 1
${LOAD_NICE:+nice -n $LOAD_NICE} "$BIN" load --to "$PADDR" -c 1000 -n "${N:-1000}" -s "${S:-4MiB}" --no-progress 2>&1 | sed -n 2,4p
kill -INT $PRP; wait $PRP 2>/dev/null || true
perf script -i "$W/perf.data" 2>/dev/null | awk '
  /sched_switch/ { if (st != "") print st "|" stack
                   match($0, /prev_state=[A-Z+]+/); st = substr($0, RSTART + 11, RLENGTH - 11)
                   stack = ""; n = 0; next }
  /^[ \t]+[0-9a-f]+ / { n++; f = $2; sub(/\+0x.*/, "", f)
                        if (f != "__schedule" && f != "schedule" && n <= 12) stack = stack ";" f }
  END { if (st != "") print st "|" stack }' > "$W/stacks.txt"
echo "the loop thread ($PP) left the CPU:"
echo "  $(grep -c '^S|.*do_epoll_wait' "$W/stacks.txt" || true) times asleep in epoll_wait"
echo "  $(grep -c '^R' "$W/stacks.txt" || true) times preempted (runnable, another thread ran)"
echo "  $(grep -v '^R' "$W/stacks.txt" | grep -vc 'do_epoll_wait' || true) times waiting for anything else:"
grep -v '^R' "$W/stacks.txt" | grep -v 'do_epoll_wait' | cut -d';' -f1-9 | sort | uniq -c | sort -rn | head -10 || true
if [ -n "$MADDR" ]; then
  curl -s "http://$MADDR/metrics" 2>/dev/null | awk '
    /^stopover_loop_event_seconds_bucket\{le="0.005"\}/ { u = $2 }
    /^stopover_loop_event_seconds_count/ { c = $2 }
    /^stopover_loop_event_seconds_max/ { m = $2 }
    END { if (c > 0) printf "event handlings: %d, over 5 ms: %d (%.3f%%), longest %.1f ms\n", c, c - u, 100 * (c - u) / c, m * 1000 }'
fi
