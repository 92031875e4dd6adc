#!/usr/bin/env bash
# Run the test suite N times in a row (default 20) with a busy loop on every core, stopping at the first
# failure: how racy tests are found before CI finds them. Extra arguments go to pytest.
#   scripts/stress-tests.sh 20 -x
# A CI machine is often minutes old, so each run starts its monotonic clock at 60 s where a time namespace can be
# made (root, Linux 5.6+): a test that mixes a fake clock with the machine's fails here, not only in CI.
set -uo pipefail
runs=${1:-20}; shift || true
cores=$(nproc)
busy=()
for _ in $(seq "$cores"); do python3 -c 'while True: pass' & busy+=($!); done
trap 'kill "${busy[@]}" 2>/dev/null' EXIT
fresh=no
unshare --time --monotonic=0 true 2>/dev/null && fresh=yes
for i in $(seq "$runs"); do
  start=$(date +%s)
  wrap=()
  back=$(( $(cut -d. -f1 /proc/uptime) - 60 ))
  if [ $fresh = yes ] && [ $back -gt 0 ]; then  # a machine up under 60 s is fresh already
    wrap=(unshare --time --monotonic=-$back --boottime=-$back)
  fi
  if VALVE_NO_SKIP=1 "${wrap[@]}" python3 -m pytest -q -p no:cacheprovider "$@" > "stress-run-$i.log" 2>&1; then
    echo "run $i/$runs: $(tail -1 "stress-run-$i.log") ($(( $(date +%s) - start )) s wall, $cores busy loops, clock from 60 s: $fresh)"
  else
    echo "run $i/$runs FAILED: $(tail -1 "stress-run-$i.log") (log: stress-run-$i.log)"; exit 1
  fi
done
echo "stress: $runs/$runs runs passed under $cores busy loops"
