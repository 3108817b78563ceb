#!/bin/sh
# Install Debian's Chromium for tests/integration/test_browser.py when it is missing and apt-get is
# usable (root); otherwise do nothing (the browser test then skips, saying why). Never fails the
# command it is part of: the README's test command runs it first.
[ -n "${IM_TEST_CHROMIUM:-}" ] && exit 0  # the test is told which browser to drive
for name in chromium chromium-browser google-chrome google-chrome-stable; do
  if command -v "$name" >/dev/null 2>&1; then
    exit 0
  fi
done
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: no Chromium, and apt-get is not usable here (not root, or not Debian): the browser test will skip" >&2
  exit 0
fi
echo "install-browser: installing chromium with apt-get (for the browser test)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; then
  echo "install-browser: apt-get install chromium failed: the browser test will skip" >&2
fi
exit 0
