#!/usr/bin/env bash
# A local Ray cluster started as a user starts one, for the tests and CI (the Ray environment's
# `ray` on PATH: pip install -e ".[dev,ray]").
#   tests/services/ray.sh start DIR   `ray start --head --num-cpus=2` on free ports outside Ray's worker
#                                     port range (10002-19999); prints RAY_ADDRESS=127.0.0.1:PORT
#   tests/services/ray.sh stop DIR    stops that cluster (by its process group), removes DIR
# Jobs join it with hydra.launcher.ray.init.address=auto (hydra/launcher=ray_cluster).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"

# Ray 2.60's `ray start` turns on token authentication (and keeps a token in ~/.ray) while its
# clients do not send one unless told: a test cluster on loopback runs without it.
export RAY_AUTH_MODE=disabled

start() {
    local dir=$1 port dash_port i
    command -v ray >/dev/null || { echo "no ray here: pip install -e \".[dev,ray]\"" >&2; exit 3; }
    mkdir -p "$dir"
    port=$(free_port)
    dash_port=$(free_port)
    echo "$port" > "$dir/port"
    # --block: `ray start` stays, in a session of its own, and takes the cluster down with it
    setsid ray start --head --block --num-cpus="${RAY_NUM_CPUS:-2}" --node-ip-address=127.0.0.1 --port="$port" \
        --dashboard-port="$dash_port" --include-dashboard=false --disable-usage-stats \
        >"$dir/ray-start.log" 2>&1 < /dev/null &
    echo $! > "$dir/ray.pid"
    for i in $(seq 240); do
        if ray status --address "127.0.0.1:$port" >/dev/null 2>&1; then
            echo "RAY_ADDRESS=127.0.0.1:$port"
            return 0
        fi
        kill -0 "$(cat "$dir/ray.pid")" 2>/dev/null || break
        sleep 0.5
    done
    echo "ray: the head did not come up" >&2
    tail -n 20 "$dir/ray-start.log" >&2
    stop "$dir"
    exit 1
}

stop() {  # the head's session only: other Ray clusters on the machine are left alone
    local dir=$1 pid i
    [ -d "$dir" ] || return 0
    if [ -f "$dir/ray.pid" ]; then
        pid=$(cat "$dir/ray.pid")
        kill -TERM -- "-$pid" 2>/dev/null || true
        for i in $(seq 20); do
            kill -0 -- "-$pid" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    # as `ray stop` does: forget the address, or the next `ray.init()` tries to join the stopped cluster
    local current=/tmp/ray/ray_current_cluster
    if [ -f "$dir/port" ] && [ -f "$current" ] && [ "$(sed 's/.*://' "$current")" = "$(cat "$dir/port")" ]; then
        rm -f "$current"
    fi
    rm -rf "$dir"
}

case "${1:-}" in
    start) start "${2:?usage: $0 start DIR}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
