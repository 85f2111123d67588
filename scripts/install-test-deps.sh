#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine, then attnlog itself.
# CPU torch comes first and pinned: a plain `torch` requirement can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=""
  for pkg in chromium chromium-driver fonts-noto-cjk; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
else
  echo "note: not root or no apt-get; browser and CJK-font tests skip without chromium/fonts-noto-cjk"
fi

python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -c scripts/constraints-test.txt -e '.[test]'
