#!/usr/bin/env bash
# make soak: a bounded soak of a proxy and a server under the bench's
# "active" load (1,000 clients streaming 1 MiB uploads), with retention set
# well below what the run writes, and the spool's filesystem filled to the
# last byte for part of the run.
#
# It prints one row per SOAK_INTERVAL: throughput, transfers (relayed,
# refused, aborted), what each daemon keeps on disk and has deleted, the
# recordings the proxy gave up, RSS, open descriptors and the longest time
# one event's handling took. A daemon that leaks memory, descriptors or
# disk, or stalls its loop, shows it here.
#
#   SOAK_S          total seconds of load              (default 240)
#   SOAK_INTERVAL   seconds per row                    (default 60)
#   SOAK_CLIENTS    concurrent clients                 (default 1000)
#   SOAK_SIZE       upload size                        (default 1MiB)
#   SOAK_RETAIN     --retain-bytes of each daemon      (default 512MiB)
#   SOAK_SPOOL_MB   size of the spool's ext4 image     (default 2048)
#
# The spool lives on a loop-mounted ext4 image where this runs as root and
# the kernel allows it (made with no blocks reserved for root, so a root
# proxy cannot write past the filler); from SOAK_S/3 to 2*SOAK_S/3 a filler
# file takes every free byte of it, so recordings fail (each counted, the load test
# going on) and resume once the filler is gone. Elsewhere the spool is a
# plain directory and the fill is skipped (said so).
#
# Usage: scripts/soak.sh path/to/stopover
set -euo pipefail

BIN=${1:?usage: soak.sh path/to/stopover}
SOAK_S=${SOAK_S:-240}
SOAK_INTERVAL=${SOAK_INTERVAL:-60}
SOAK_CLIENTS=${SOAK_CLIENTS:-1000}
SOAK_SIZE=${SOAK_SIZE:-1MiB}
SOAK_RETAIN=${SOAK_RETAIN:-512MiB}
SOAK_SPOOL_MB=${SOAK_SPOOL_MB:-2048}

work=$(mktemp -d "${TMPDIR:-/tmp}/stopover-soak.XXXXXX")
pids=()
mounted=""
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ -n "$mounted" ]; then umount "$mounted" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# The spool's filesystem: an ext4 image on a loop device where possible.
spool_fs="$work/spoolfs"
mkdir -p "$spool_fs"
if [ "$(id -u)" = 0 ] && truncate -s "${SOAK_SPOOL_MB}M" "$work/spool.img" \
    && mkfs.ext4 -q -F -m 0 "$work/spool.img" 2>/dev/null \
    && mount -o loop "$work/spool.img" "$spool_fs" 2>/dev/null; then
    mounted="$spool_fs"
    echo "soak: spool on a ${SOAK_SPOOL_MB} MiB ext4 image ($(df -h --output=source "$spool_fs" | tail -1))"
else
    echo "soak: not root or no loop devices here: the spool is a plain directory and the disk-full phase is skipped"
fi

# Starts a daemon, waits for its "listening on" line; sets $addr and $stats.
start() {
    local name=$1; shift
    "$BIN" "$@" --listen 127.0.0.1:0 --stats-addr 127.0.0.1:0 2>"$work/$name.log" &
    pids+=($!)
    for _ in $(seq 1 200); do
        grep -q "listening on" "$work/$name.log" 2>/dev/null && break
        sleep 0.05
    done
    addr=$(grep -o "listening on [0-9.:]*" "$work/$name.log" | head -1 | awk '{print $3}')
    stats=$(grep -o "metrics at http://[0-9.:]*" "$work/$name.log" | head -1 | sed 's|.*http://||')
    [ -n "$addr" ] && [ -n "$stats" ] || { echo "soak: $name did not start:"; cat "$work/$name.log"; exit 1; }
}

start server server --dir "$work/received" --retain-bytes "$SOAK_RETAIN"
server_addr=$addr server_stats=$stats server_pid=${pids[-1]}
start proxy proxy --upstream "$server_addr" --dir "$spool_fs/spool" --retain-bytes "$SOAK_RETAIN"
proxy_addr=$addr proxy_stats=$stats proxy_pid=${pids[-1]}

# GET /metrics with bash alone (no curl needed); prints the body.
metrics() {
    local host=${1%:*} port=${1##*:}
    exec 9<>"/dev/tcp/$host/$port"
    printf 'GET /metrics HTTP/1.0\r\nHost: soak\r\n\r\n' >&9
    cat <&9
    exec 9<&-
}
# One metric's value (labels included in the name), 0 if absent.
value() { awk -v m="$2" '$1 == m { print $2; found = 1 } END { if (!found) print 0 }' <<<"$1"; }
# The share of event handlings (since start) that took under 5 ms.
under_5ms() {
    awk -v u="$(value "$1" 'stopover_loop_event_seconds_bucket{le="0.005"}')" \
        -v n="$(value "$1" stopover_loop_event_seconds_count)" \
        'BEGIN { if (n > 0) print 100 * u / n; else print 100 }'
}
rss_mib() { awk '/^VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }

echo "soak: proxy $proxy_addr -> server $server_addr; $SOAK_CLIENTS clients x $SOAK_SIZE for ${SOAK_S}s; --retain-bytes $SOAK_RETAIN on both"
"$BIN" -q load --to "$proxy_addr" -c "$SOAK_CLIENTS" -s "$SOAK_SIZE" -d "${SOAK_S}s" \
    --no-progress --json >"$work/load.json" 2>"$work/load.log" &
load_pid=$!
pids+=($load_pid)

printf '%6s %8s %9s %8s %7s | %9s %7s %8s %7s | %9s %7s %8s | %9s %9s %11s %13s | %s\n' \
    "t s" "MB/s" "relayed" "refused" "aborted" \
    "spool MB" "files" "deleted" "failed" \
    "recv MB" "files" "deleted" \
    "RSS MiB" "fds" "max ms" "% <5 ms" "spool fs"
prev_bytes=0 prev_relayed=0 prev_refused=0 prev_aborted=0
start_t=$(date +%s)
filled=""
elapsed=0
while kill -0 "$load_pid" 2>/dev/null && [ "$elapsed" -lt $((SOAK_S + 30)) ]; do
    sleep "$SOAK_INTERVAL" & wait $!
    elapsed=$(( $(date +%s) - start_t ))
    # The disk-full phase: the middle third of the run.
    if [ -n "$mounted" ] && [ -z "$filled" ] && [ "$elapsed" -ge $((SOAK_S / 3)) ]; then
        fallocate -l "$(df -B1 --output=avail "$spool_fs" | tail -1)" "$spool_fs/filler" 2>/dev/null \
            || dd if=/dev/zero of="$spool_fs/filler" bs=1M status=none 2>/dev/null || true
        filled=yes
        echo "soak: t=${elapsed}s the spool's filesystem is full now ($(df -h --output=avail "$spool_fs" | tail -1 | tr -d ' ') free)"
    elif [ "$filled" = yes ] && [ "$elapsed" -ge $((2 * SOAK_S / 3)) ]; then
        rm -f "$spool_fs/filler"
        filled=done
        echo "soak: t=${elapsed}s the filler is gone: recording should resume"
    fi
    p=$(metrics "$proxy_stats") s=$(metrics "$server_stats")
    bytes=$(value "$p" stopover_bytes_received_total)
    relayed=$(value "$p" 'stopover_transfers_total{outcome="relayed"}')
    refused=$(value "$p" 'stopover_transfers_total{outcome="refused"}')
    aborted=$(value "$p" 'stopover_transfers_total{outcome="aborted"}')
    printf '%6d %8.0f %9d %8d %7d | %9.0f %7d %8d %7d | %9.0f %7d %8d | %4s/%-4s %4s/%-4s %5.0f/%-5.0f %6.2f/%-6.2f | %s\n' \
        "$elapsed" \
        "$(awk -v a="$bytes" -v b="$prev_bytes" -v t="$SOAK_INTERVAL" 'BEGIN { print (a - b) / t / 1e6 }')" \
        $((relayed - prev_relayed)) $((refused - prev_refused)) $((aborted - prev_aborted)) \
        "$(awk -v v="$(value "$p" stopover_recordings_bytes)" 'BEGIN { print v / 1e6 }')" \
        "$(value "$p" stopover_recordings_files)" "$(value "$p" stopover_recordings_deleted_total)" \
        "$(value "$p" stopover_recordings_failed_total)" \
        "$(awk -v v="$(value "$s" stopover_recordings_bytes)" 'BEGIN { print v / 1e6 }')" \
        "$(value "$s" stopover_recordings_files)" "$(value "$s" stopover_recordings_deleted_total)" \
        "$(rss_mib "$proxy_pid")" "$(rss_mib "$server_pid")" "$(fds "$proxy_pid")" "$(fds "$server_pid")" \
        "$(awk -v v="$(value "$p" stopover_loop_event_seconds_max)" 'BEGIN { print v * 1000 }')" \
        "$(awk -v v="$(value "$s" stopover_loop_event_seconds_max)" 'BEGIN { print v * 1000 }')" \
        "$(under_5ms "$p")" "$(under_5ms "$s")" \
        "$(df -h --output=used,size "$spool_fs" | tail -1 | awk '{ print $1 "/" $2 }')"
    prev_bytes=$bytes prev_relayed=$relayed prev_refused=$refused prev_aborted=$aborted
done
wait "$load_pid" || true
echo "soak: the load generator's verdict:"
grep -o '"transfers_ok":[0-9]*\|"transfers_failed":[0-9]*\|"mb_per_s":[0-9.]*' "$work/load.json" | head -3 | tr '\n' ' '
echo
leftover=$(find "$spool_fs/spool" "$work/received" -name '*.part' | wc -l)
warnings=$(grep -c WARN "$work/proxy.log" || true)
echo "soak: .part files left: $leftover; proxy warning lines: $warnings"
echo "(columns: RSS, descriptors, the longest event handling since start and the share under 5 ms: each proxy/server)"
