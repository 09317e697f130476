#!/usr/bin/env bash
# `make compat`: toxiproxy's own client libraries drive stopover's
# toxiproxy-compatible API. Installs the Node client (toxiproxy-node-client,
# npm) and the Python client (toxiproxy-python, PyPI) into a temporary
# directory, starts a server and a proxy with --api-addr on free loopback
# ports, and runs scripts/compat/{node.js,python.py} against them: create a
# proxy, add and remove toxics, reset, populate, and measure a latency
# toxic through the proxy. Needs node (>= 18), npm, python3 and pip, and
# the registries. Never part of `make test`. Daemons are stopped by PID.
set -euo pipefail

bin=${1:-target/release/stopover}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/stopover-compat.XXXXXX")
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "== kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# Waits (bounded) for PATTERN ADDR in a daemon's log; prints ADDR.
logged_addr() {
    local log=$1 pid=$2 pattern=$3
    for _ in $(seq 1 200); do
        if addr=$(grep -o "$pattern [^ ]*" "$log" 2>/dev/null | head -n1); then
            addr=${addr##* }
            addr=${addr#http://}
            [ -n "$addr" ] && { echo "${addr%%/*}"; return 0; }
        fi
        kill -0 "$pid" 2>/dev/null || { echo "daemon exited:" >&2; cat "$log" >&2; return 1; }
        sleep 0.05
    done
    echo "timed out waiting for '$pattern' in $log" >&2
    return 1
}

echo "== installing the clients into $work"
npm install --silent --no-audit --no-fund --prefix "$work/node" toxiproxy-node-client >/dev/null
echo "   node:   toxiproxy-node-client $(node -p "require('$work/node/node_modules/toxiproxy-node-client/package.json').version")"
PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --target "$work/py" toxiproxy-python
echo "   python: toxiproxy-python $(PYTHONPATH="$work/py" python3 -c "import importlib.metadata as m; print(m.version('toxiproxy-python'))")"

"$bin" server --listen 127.0.0.1:0 --dir "$work/received" 2>"$work/server.log" &
pids+=($!)
server=$(logged_addr "$work/server.log" "${pids[-1]}" "listening on")
"$bin" -v proxy --listen 127.0.0.1:0 --upstream "$server" --dir "$work/spool" \
    --api-addr 127.0.0.1:0 2>"$work/proxy.log" &
pids+=($!)
proxy=$(logged_addr "$work/proxy.log" "${pids[-1]}" "listening on")
api=$(logged_addr "$work/proxy.log" "${pids[-1]}" "toxiproxy API at")
echo "== server $server, proxy $proxy, API $api"

status=0
echo "== Node client"
NODE_PATH="$work/node/node_modules" node "$here/compat/node.js" "$api" "$server" || status=1
echo "== Python client"
PYTHONPATH="$work/py" python3 "$here/compat/python.py" "$api" "$server" || status=1
if [ "$status" != 0 ]; then
    echo "== proxy log (last 40 lines)"; tail -n 40 "$work/proxy.log"
    echo "compat: FAILED"
    exit 1
fi
echo "== recordings per proxy:"
(cd "$work/spool" && find . -type f | sort | sed 's/^/   /' | head -n 20)
echo "compat: both clients passed"
