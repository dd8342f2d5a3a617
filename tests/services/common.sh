# Shared by the service scripts in this folder (sourced, not run).

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "needs root (it installs Debian packages and runs daemons as their users)" >&2
        exit 3
    fi
}

apt_install() {
    if ! command -v apt-get >/dev/null; then
        echo "no apt-get here to install $*" >&2
        exit 3
    fi
    echo "installing $* (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q "$@" >/dev/null 2>&1; then
        apt-get update -q >/dev/null 2>&1 || true
        apt-get install -y -q "$@" >&2
    fi
}

free_port() {  # a free TCP port on 127.0.0.1, outside Ray's worker port range 10002-19999
    python3 - <<'PY'
import random, socket
while True:
    port = random.randint(20000, 32000)
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
    print(port)
    break
PY
}

stop_pidfile() {  # stop the process whose pid is in file $1 (TERM, then KILL after 10 s)
    local pid i
    [ -f "$1" ] || return 0
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || return 0
    for i in $(seq 40); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.25
    done
    kill -9 "$pid" 2>/dev/null || true
}
