#!/usr/bin/env bash
# The whole suite against real services: start what is missing, run pytest, stop what we started.
set -euo pipefail
cd "$(dirname "$0")/.."
trap 'scripts/services.sh stop' EXIT
scripts/services.sh start
# the browser tests drive Debian's Chromium (never `playwright install`)
if [ ! -x /usr/bin/chromium ]; then
  echo "[test] installing Debian chromium for the browser tests"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
fi
export QF_TEST_POSTGRES_URL=${QF_TEST_POSTGRES_URL:-postgresql+psycopg2://quarkflow:quarkflow@127.0.0.1:5432/quarkflow_test}
export QF_TEST_GCS_HOST=${QF_TEST_GCS_HOST:-http://127.0.0.1:4443}
export QF_TEST_LS_URL=${QF_TEST_LS_URL:-http://127.0.0.1:8080}
export QF_TEST_LS_TOKEN=${QF_TEST_LS_TOKEN:-0123456789abcdef0123456789abcdef01234567}
set +e
.venv/bin/python -m pytest -v --durations=15 "$@"
rc=$?
set -e
exit $rc
