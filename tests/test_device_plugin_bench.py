"""bench/device_plugin_nvml.py, the GPU smoke run, on simulated GPUs: every step runs and the report is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_run_on_sim_backend_writes_report(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "device_plugin_nvml.py"), "--backend", "sim",
                           "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "device_plugin_sim.json").read_text())
    assert doc["rc"] == 0 and len(doc["gpus"]) == 2
    assert {r["resource"] for r in doc["registrations"]} == {"valve.io/online-gpu", "valve.io/offline-gpu"}
    lw = doc["list_and_watch"]["valve.io/online-gpu"]
    assert [d["numa"] for d in lw] == [[g["numa_node"]] for g in doc["gpus"]]
    on, off = doc["allocations"]["valve.io/online-gpu"], doc["allocations"]["valve.io/offline-gpu"]
    assert on["preferred"] == off["preferred"]  # the pair lands on one GPU
    assert off["envs"]["VALVE_ROLE"] == "offline" and off["envs"]["CUDA_VISIBLE_DEVICES"] == off["preferred"][0]
    assert doc["bad_id"] == "INVALID_ARGUMENT" and doc["reregistration_s"] < 5.0
    assert doc["left_after_stop"] == ["kubelet.sock"]
    assert "== discovery (sim)" in (tmp_path / "device_plugin_sim.txt").read_text()
