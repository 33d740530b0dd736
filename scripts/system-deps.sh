#!/usr/bin/env bash
# System packages the test suite needs: Debian's headless Chromium and its WebDriver, for the
# annotation app's browser test. Installed only when missing (no browser is ever downloaded by
# the tests themselves). Needs root, as on CI; elsewhere it says what to run.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: chromium/chromedriver missing; run as root: apt-get install -y chromium chromium-driver" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q chromium chromium-driver
