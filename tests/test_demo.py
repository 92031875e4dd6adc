import json
import subprocess
import sys

from valve.demo import Workload, simulate, summarize


def test_gate_brings_online_latency_back_to_alone():
    w = Workload()
    res = {v: simulate(v, w, seconds=8, seed=2) for v in ("online-alone", "offline-alone", "time-slicing", "valve")}
    rows = {r["variant"]: r for r in summarize(res)}
    ts, valve = rows["time-slicing"], rows["valve"]
    assert ts["tpot_p99_ratio"] > 1.5 and ts["ttft_p99_ratio"] > 1.3
    assert valve["tpot_p99_ratio"] < 1.1 and valve["ttft_p99_ratio"] < 1.1
    assert 0.3 < valve["offline_ratio"] < 1.0
    # one preemption per burst: never more closures than requests
    assert 0 < valve["preemptions"] <= len(res["valve"].ttft_ms)
    assert valve["preempt_latency_p99_ms"] < w.offline_kernel_ns / 1e6 + 0.1


def test_valve_demo_command_prints_the_table(tmp_path):
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "valve.cli", "demo", "--seconds", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=120, env={"COLUMNS": "160", "PATH": ""},
    )
    assert proc.returncode == 0, proc.stderr
    for word in ("online-alone", "time-slicing", "valve", "TTFT p99", "preemptions"):
        assert word in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["online-alone", "offline-alone", "time-slicing", "valve"]
