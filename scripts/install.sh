#!/usr/bin/env bash
# Installs mmsearch and everything its demo and tests need, offline apart from the package registries.
# Idempotent: a second run on a set-up machine only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Debian tools: ffmpeg decodes audio formats PyAV may lack; chromium drives the browser tests; flite and
# espeak-ng speak test queries.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  need=()
  command -v ffmpeg >/dev/null 2>&1 || need+=(ffmpeg)
  # Two more voices than the bundled Piper one: spoken-query tests measure speech on voices we never trained on.
  command -v flite >/dev/null 2>&1 || need+=(flite)
  command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
  if [ "${MMSEARCH_BROWSER:-1}" = 1 ]; then
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
  fi
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi

# torch first, pinned to the build that lies on this machine's disk (a looser spec pulls a multi-GB download).
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
"$PY" -m pip install -q -e ".[offline,server,dev,mcp,langchain,llamaindex,export,photos,ray]"
