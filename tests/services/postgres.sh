#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on this machine, for the tests and CI (Debian, as root).
#   tests/services/postgres.sh start DIR   installs postgresql if missing, initdb's DIR/data as the
#                                          postgres user, starts it on a free port on 127.0.0.1 (socket
#                                          in DIR), creates database mlflow; prints POSTGRES_URI=...
#   tests/services/postgres.sh stop DIR    stops it and removes DIR
# Trust authentication on loopback only: for a test database, never for a team's.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"

bin_dir() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

start() {
    local dir=$1 bin port
    need_root
    bin=$(bin_dir) || { apt_install postgresql; bin=$(bin_dir); }
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    chown postgres:postgres "$dir"
    port=$(free_port)
    # postgres must reach DIR: open the folders above it for traversal (pytest's are 700)
    local up=$dir
    while [ "$up" != / ]; do
        up=$(dirname "$up")
        [ "$up" = / ] || chmod o+x "$up"
    done
    su -s /bin/sh postgres -c "$bin/initdb -D $dir/data -U postgres --auth=trust -E UTF8 >$dir/initdb.log 2>&1"
    su -s /bin/sh postgres -c "$bin/pg_ctl -D $dir/data -l $dir/postgres.log -w -t 60 \
        -o '-p $port -k $dir -c listen_addresses=127.0.0.1' start >/dev/null"
    su -s /bin/sh postgres -c "$bin/createdb -h 127.0.0.1 -p $port -U postgres mlflow"
    echo "$port" > "$dir/port"
    echo "POSTGRES_URI=postgresql://postgres@127.0.0.1:$port/mlflow"
}

stop() {
    local dir=$1 bin
    [ -d "$dir" ] || return 0
    if [ -f "$dir/data/postmaster.pid" ] && bin=$(bin_dir); then
        su -s /bin/sh postgres -c "$bin/pg_ctl -D $dir/data -m fast -w -t 30 stop >/dev/null" || true
    fi
    rm -rf "$dir"
}

case "${1:-}" in
    start) start "${2:?usage: $0 start DIR}" ;;
    stop) stop "${2:?usage: $0 stop DIR}" ;;
    *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
