#!/usr/bin/env bash
# Sourced by scripts/test.sh: exports STEALSIM_TEST_REDIS_URL for a Redis server that answers PING.
# Uses redis://127.0.0.1:6379 when it answers; otherwise starts redis-server on a free port
# (installing Debian's redis-server package if the binary is missing).
ping_redis() {
  "$root/.venv/bin/python" - "$1" <<'PY'
import sys, redis
try:
    sys.exit(0 if redis.Redis.from_url(sys.argv[1], socket_timeout=2).ping() else 1)
except Exception:
    sys.exit(1)
PY
}

if [ -n "${STEALSIM_TEST_REDIS_URL:-}" ] && ping_redis "$STEALSIM_TEST_REDIS_URL"; then
  return 0 2>/dev/null || exit 0
fi
if ping_redis "redis://127.0.0.1:6379"; then
  export STEALSIM_TEST_REDIS_URL="redis://127.0.0.1:6379"
  return 0 2>/dev/null || exit 0
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "test: installing redis-server (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
port="$("$root/.venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
redis_dir="$(mktemp -d)"
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
  --dir "$redis_dir" --logfile "$redis_dir/redis.log" --pidfile "$redis_dir/redis.pid"
for _ in $(seq 50); do ping_redis "redis://127.0.0.1:$port" && break; sleep 0.1; done
export STEALSIM_TEST_REDIS_URL="redis://127.0.0.1:$port"
trap 'kill "$(cat "$redis_dir/redis.pid")" 2>/dev/null || true' EXIT
