#!/usr/bin/env bash
# Runs Plane's whole test suite: formatting, lints, unit tests and the integration tests
# on SQLite and PostgreSQL against the local Docker engine, plus a headless-Chromium test.
#
# Installs what is missing (apt-get; schemathesis from PyPI into a cached virtualenv) and
# starts a throwaway PostgreSQL and a throwaway password-protected image registry on free
# loopback ports, removed again on exit. Needs: cargo, python3, a running Docker engine,
# root or sudo for apt-get when packages are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# --- Packages --------------------------------------------------------------------------
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
command -v curl >/dev/null 2>&1 || missing+=(curl)
# schemathesis is installed into a virtualenv (see below).
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
command -v htpasswd >/dev/null 2>&1 || missing+=(apache2-utils)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
# certutil: the HTTPS browser test trusts its CA in a throwaway NSS database.
command -v certutil >/dev/null 2>&1 || missing+=(libnss3-tools)
# The ACME tests' certificate authority (each test runs its own on free loopback ports).
command -v pebble >/dev/null 2>&1 || missing+=(pebble)
# The benchmarks' short modes (run last) compare against nginx under load from wrk.
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
docker info >/dev/null 2>&1 || { echo "error: the Docker engine is not reachable (docker info failed)" >&2; exit 1; }

# --- schemathesis (PyPI), which fuzzes the controller's OpenAPI document ------------------
# Kept in a virtualenv under the user's cache, so a second run does not reinstall it.
schemathesis_version=4.32.5
schemathesis_venv="${XDG_CACHE_HOME:-$HOME/.cache}/plane-test/schemathesis-$schemathesis_version"
if [ ! -x "$schemathesis_venv/bin/schemathesis" ]; then
  log "installing schemathesis $schemathesis_version from PyPI"
  python3 -m venv "$schemathesis_venv"
  "$schemathesis_venv/bin/pip" install -q "schemathesis==$schemathesis_version"
fi
export PLANE_TEST_SCHEMATHESIS="$schemathesis_venv/bin/schemathesis"

# --- Plane 0.5.5 (crates.io), bench/connect's reference ------------------------------------
# Built once (several minutes) into the user's cache.
plane055_root="${XDG_CACHE_HOME:-$HOME/.cache}/plane-test/plane-0.5.5"
plane055="$plane055_root/bin/plane"
if [ ! -x "$plane055" ]; then
  log "building Plane 0.5.5 from crates.io (once)"
  RUSTFLAGS="--cfg tracing_unstable" cargo install --quiet plane --version 0.5.5 --locked --root "$plane055_root"
fi

# --- Throwaway PostgreSQL on a free loopback port ---------------------------------------
pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
pg_dir=$(mktemp -d /tmp/plane-test-pg.XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
pg_port=$(free_port)
pg_user=$(id -un)
run_pg() {
  # PostgreSQL refuses to run as root; use the postgres account the package created.
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if [ "$(id -u)" = 0 ]; then chown postgres "$pg_dir"; pg_user=postgres; fi
registry_dir=$(mktemp -d /tmp/plane-test-registry.XXXXXX)
registry_pid=
cleanup() {
  run_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
  [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null
  rm -rf "$pg_dir" "$registry_dir"
}
trap cleanup EXIT
log "starting PostgreSQL on 127.0.0.1:$pg_port"
run_pg "$pg_bin/initdb" -D "$pg_dir/data" -U "$pg_user" --auth=trust >/dev/null
run_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/postgres.log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $pg_dir -c max_connections=300 -c fsync=off" start >/dev/null
export PLANE_TEST_POSTGRES_URL="postgres://$pg_user@127.0.0.1:$pg_port/postgres"

# --- Throwaway password-protected image registry on a free loopback port -----------------
# Docker treats registries on 127.0.0.0/8 as insecure-allowed, so plain HTTP works.
registry_port=$(free_port)
registry_password=$(python3 -c 'import secrets; print(secrets.token_hex(12))')
htpasswd -Bbn plane "$registry_password" > "$registry_dir/htpasswd"
cat > "$registry_dir/config.yml" <<YAML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $registry_dir/data
http:
  addr: 127.0.0.1:$registry_port
auth:
  htpasswd:
    realm: plane-test
    path: $registry_dir/htpasswd
YAML
log "starting an image registry on 127.0.0.1:$registry_port"
docker-registry serve "$registry_dir/config.yml" > "$registry_dir/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 1 50); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$registry_port/v2/" || true)
  [ "$code" = 401 ] && break
  sleep 0.1
done
[ "$code" = 401 ] || { echo "error: the test registry did not start; see $registry_dir/registry.log" >&2; cat "$registry_dir/registry.log" >&2; exit 1; }
export PLANE_TEST_REGISTRY="127.0.0.1:$registry_port"
export PLANE_TEST_REGISTRY_USER=plane
export PLANE_TEST_REGISTRY_PASSWORD="$registry_password"

# --- Checks and tests -------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
log "cargo build (the plane binary is used by the walkthrough test)"
cargo build --workspace --all-targets
log "cargo test"
# Integration tests mostly wait on containers, so run more of them than there are cores.
test_log="$pg_dir/cargo-test.log"
cargo test --workspace --all-targets -- --test-threads "${PLANE_TEST_THREADS:-6}" 2>&1 | tee "$test_log"
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "\nsummary: %d passed, %d failed\n", p, f }' "$test_log"

# The benchmarks in their short modes, on the debug build the tests used, so the scripts
# cannot rot (their figures mean nothing here; docs/performance.md has real ones).
export PATH="$PATH:/usr/sbin"
log "bench/proxy --short"
bench/proxy --short --debug --no-build
log "bench/idle-ws --short"
bench/idle-ws --short --debug --no-build
log "bench/spawn --short"
bench/spawn --short --debug --no-build
log "bench/connect --short"
bench/connect --short --debug --no-build --plane055 "$plane055"
log "bench/scale --short"
bench/scale --short --debug --no-build
