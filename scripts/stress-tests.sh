#!/usr/bin/env bash
# Run the test suite N times in a row (default 20) with a busy loop on every core, stopping at the first
# failure: how racy tests are found before CI finds them. Extra arguments go to pytest.
#   scripts/stress-tests.sh 20 -x
set -uo pipefail
runs=${1:-20}; shift || true
cores=$(nproc)
busy=()
for _ in $(seq "$cores"); do python3 -c 'while True: pass' & busy+=($!); done
trap 'kill "${busy[@]}" 2>/dev/null' EXIT
for i in $(seq "$runs"); do
  start=$(date +%s)
  if VALVE_NO_SKIP=1 python3 -m pytest -q -p no:cacheprovider "$@" > "stress-run-$i.log" 2>&1; then
    echo "run $i/$runs: $(tail -1 "stress-run-$i.log") ($(( $(date +%s) - start )) s wall, $cores busy loops)"
  else
    echo "run $i/$runs FAILED: $(tail -1 "stress-run-$i.log") (log: stress-run-$i.log)"; exit 1
  fi
done
echo "stress: $runs/$runs runs passed under $cores busy loops"
