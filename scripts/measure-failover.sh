#!/usr/bin/env bash
# Measures how long a key is unavailable after its drone is killed with SIGKILL: the time
# from `kill -9` of the drone running the key's backend to a connect for that key starting
# a new backend on another drone. Real binaries, the embedded database, default timings
# (override with PLANE_LEASE_MS etc.), loopback only.
#
# Needs: a debug build (`cargo build`), a running Docker engine, and the demo image
# `plane/demo:latest` (`plane dev` builds it on its first start).
set -euo pipefail
cd "$(dirname "$0")/.."
plane=target/debug/plane
[ -x "$plane" ] || { echo "error: $plane is missing; run cargo build first" >&2; exit 1; }
docker image inspect plane/demo:latest >/dev/null 2>&1 || {
  echo "error: the image plane/demo:latest is missing; start plane dev once to build it" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
dir=$(mktemp -d /tmp/plane-failover.XXXXXX)
port=$(free_port)
cluster="localhost:$(free_port)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; sleep 3; rm -rf "$dir"; }
trap cleanup EXIT

"$plane" controller --db "$dir/plane.db" --port "$port" --default-cluster "$cluster" 2>"$dir/controller.log" &
pids+=($!)
api="http://127.0.0.1:$port"
until curl -sf "$api/pub/health" >/dev/null; do sleep 0.1; done
start_drone() {
  "$plane" drone --controller-url "$api" --cluster "$cluster" --name "$1" --state-dir "$dir/$1" 2>"$dir/$1.log" &
  pids+=($!)
  until curl -s "$api/ctrl/c/$cluster/state" | grep -q "\"name\":\"$1\",\"connected\":true"; do sleep 0.1; done
}
connect() {
  curl -s -X POST -H 'content-type: application/json' "$api/ctrl/connect" \
    -d '{"key":{"name":"failover"},"spawn_config":{"executable":{"image":"plane/demo:latest"}}}'
}

start_drone a-victim
victim=${pids[-1]}
connect | grep -q '"spawned":true' || { echo "error: the first connect did not spawn" >&2; exit 1; }
start_drone b-survivor
kill -9 "$victim"
killed=$(date +%s.%N)
wait "$victim" 2>/dev/null || true
until connect | grep -q '"spawned":true'; do sleep 0.05; done
spawned=$(date +%s.%N)
printf 'kill -9 of the drone to the key spawning again: %.2f s  (load average: %s)\n' \
  "$(echo "$spawned - $killed" | bc)" "$(cut -d' ' -f1-3 /proc/loadavg)"
grep -h "killed it" "$dir/a-victim/fence.log" | sed 's/\x1b\[[0-9;]*m//g' | sed 's/^/fence: /' || true
