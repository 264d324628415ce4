#!/usr/bin/env bash
# Make Debian's headless-capable `chromium` available for the dashboard browser test.
# Idempotent: does nothing when chromium is already on PATH. Needs root (or sudo) to install.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "chromium present: $(command -v chromium)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "error: chromium is missing and installing it needs root; run: apt-get install chromium" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium
command -v chromium >/dev/null 2>&1 || { echo "error: chromium still not on PATH after install" >&2; exit 1; }
echo "chromium installed: $(command -v chromium)"
