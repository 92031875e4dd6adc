#!/usr/bin/env bash
# Build libvalvegate.so (the launch-level offline gate) with gcc into DIR (default: build/preload).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m valve.preload.build "${1:-build/preload}"
