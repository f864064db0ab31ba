#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh machine, then runs it:
# Debian packages (mosquitto for the broker tests, socat for the RS-485 pseudo-terminals,
# libfaketime for the fault matrix's clock jumps,
# dpkg-dev for the .deb test, chromium for the status page in a headless browser), a virtual
# environment in .venv with the project and its test
# extras, then lint, type check and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto mosquitto-clients)
command -v socat >/dev/null 2>&1 || missing+=(socat)
command -v dpkg-deb >/dev/null 2>&1 || missing+=(dpkg)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # the status page test
# the fault matrix's wall-clock jumps (tests/reliability): the gateway runs under libfaketime
compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || missing+=(libfaketime)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check .
.venv/bin/mypy
# unbuffered: a CI log cut off by a time limit then ends at the test that was running
PYTHONUNBUFFERED=1 exec .venv/bin/pytest "$@"
