#!/usr/bin/env bash
# Install the headless browser that tests/test_demo_browser.py drives: Debian's Chromium
# and its WebDriver, from the distribution's packages (the browser itself never downloads
# anything; Playwright's own browser download is not used). Safe to run repeatedly: it
# does nothing when /usr/bin/chromium is already there.
#
#   tests/browser_setup.sh            # as root, or with sudo available
#
# The Python side (the `playwright` package, driving the system Chromium through
# executable_path) comes with the project's dev extras.
set -euo pipefail

CHROMIUM="${VESPER_CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
    echo "chromium present: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: $CHROMIUM is missing and apt-get is not available; install Chromium with" \
         "your system's package manager (or set VESPER_CHROMIUM to its path)" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "error: installing Chromium needs root: run this script as root" >&2
        exit 1
    fi
fi

echo "==> installing chromium and chromium-driver (Debian packages)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver
echo "chromium installed: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
