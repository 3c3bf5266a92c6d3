#!/usr/bin/env bash
# Set up the virtualenv (scripts/setup.sh, the README's set-up command), lint, and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Headless Chromium for the preview page's browser test (Debian package; the test skips, saying why, without it).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
        || echo "chromium could not be installed: the browser test will be skipped"
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# No model hub at test time: fail fast instead of retrying downloads; no telemetry; no token auth on local Ray.
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest -q -rfEs --durations=15 "$@"
