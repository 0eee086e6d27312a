#!/usr/bin/env bash
# Install the system tools the test suite uses but pip cannot provide.
#
# `promtool` and the `prometheus` server (Debian's `prometheus` package: alert
# rule checks and the live-Prometheus test), `amtool` (prometheus-alertmanager:
# the Alertmanager config check), `shellcheck` (this script's own lint) and
# `chromium` (the web console's browser tests). Run as root. Idempotent: when every tool is
# already on PATH this exits 0 without touching apt.
set -euo pipefail

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
# Debian's chromium: the console's browser tests drive it with Playwright
# (nothing ever downloads a browser build).
command -v chromium >/dev/null 2>&1 || missing+=(chromium)

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-system-deps.sh: must run as root to install: ${missing[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${missing[@]}"

command -v promtool >/dev/null 2>&1 || {
    echo "install-system-deps.sh: promtool still missing after installing prometheus" >&2
    exit 1
}
