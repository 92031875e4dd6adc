"""bench/operator_scale.py at a small size (--pairs 50 --restart): every pair on one GPU, none Degraded, the
operator's requests per pair within budget, and after a restart mid-batch (the operator process stopped and
started again) no pod create refused and all pairs done within 30 s."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("kopf")
pytest.importorskip("kmock")

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


def test_bench_fifty_pairs_with_a_restart(tmp_path):
    out = tmp_path / "operator_scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "operator_scale.py"), "--pairs", "50", "--restart",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert out.with_suffix(".txt").read_text().startswith("| pairs |")
    plain, restarted = result["runs"]
    for run in (plain, restarted):
        assert run["pairs"] == 50 and run["phases"] == {"Running": 50}
        assert run["degraded"] == 0 and run["split_pairs"] == 0 and run["driver_errors"] == []
        assert len(run["loadavg_before"]) == 3 and run["operator_cpu_s"] > 0
        # the operator is a process of its own: its CPU, its start and kmock's (this process's) apart
        assert run["operator_start_cpu_s"] > 0 and run["harness_cpu_s"] > 0
    # 2 pod creates, at most 2 status writes and 2 events per pair; kopf's discovery, lists and watches on top.
    # The run ends when every pair is Running: a quiet pair's second status write or its Running event may still
    # be on its way then, so those are bounds.
    kinds = plain["requests_by_kind"]
    assert kinds["POST pods"] == 100
    assert 50 <= kinds["POST events"] <= 100 and 50 <= kinds["PATCH colocationpairs/status"] <= 100
    assert plain["requests"] <= 6 * 50 + 20
    after = restarted["restart"]
    assert after["pod_creates_refused_409"] == 0 and after["done_at_restart"] >= 25
    assert after["started_in_s"] <= after["seconds_to_all_done"] < 30  # rounded to 10 ms: the last pairs may finish as it starts watching
    # after the restart: kopf's lists and watches, then only what the pairs not done yet need (no re-creates)
    assert after["requests_after"].get("POST pods", 0) <= 2 * (50 - after["done_at_restart"])
