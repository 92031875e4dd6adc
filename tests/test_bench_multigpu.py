"""bench/multigpu.py on CPU: the simulated 8-GPU node, the pairing check, and a dry run of the GPU path's
steps with CPU torch (real processes, arbiters and the host gate)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "multigpu.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_multigpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


mg = load()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vmt", dir="/tmp"))  # unix socket paths must stay short
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_rows_ratios_and_names() -> None:
    lat = {"alone": {"a": [1.0, 2.0, 3.0], "b": [2.0] * 3}, "gate": {"a": [2.0, 4.0, 6.0], "b": [2.0] * 3},
           "gate-one": {"a": [1.0, 2.0, 3.0]}}
    rows = mg.gpu_rows(lat, ["a", "b"])
    a, b = rows
    assert a["phases"]["alone"]["p50_ms"] == 2.0 and a["phases"]["gate"]["p50_ratio"] == 2.0
    assert math.isclose(a["phases"]["gate"]["p99_ratio"], 2.0)
    assert b["phases"]["gate"]["p99_ratio"] == 1.0 and "gate-one" not in b["phases"]
    summary = mg.interference_summary(rows)
    assert summary["gate_p50_ratio_max"] == 2.0 and summary["gate_p50_ratio_min"] == 1.0
    assert summary["gate_all_over_one_p50_ratio"] == [2.0]
    assert mg.gpu_rows({"alone": {"a": [1.0] * 5 + [9.0]}}, ["a"], skip=5)[0]["phases"]["alone"]["p50_ms"] == 9.0
    assert mg.gpu_slug("NVIDIA H100 80GB HBM3") == "h100" and mg.gpu_slug("NVIDIA H200") == "h200"
    assert mg.gpu_slug("Valve Simulated GPU") == "sim"


def test_check_pairs_rejects_split_or_wrong_envs() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "g0", "NVIDIA_VISIBLE_DEVICES": "g0", "VALVE_GPU_UUID": "g0"}
    mg.check_pairs({"g0": {"online": env, "offline": env}}, 1)
    with pytest.raises(mg.BenchError, match="not one GPU each"):
        mg.check_pairs({"g0": {"online": env}, "g1": {"offline": {**env}}}, 1)
    with pytest.raises(mg.BenchError, match="not one online and one offline"):
        mg.check_pairs({"g0": {"online": env}}, 1)
    with pytest.raises(mg.BenchError, match="CUDA_VISIBLE_DEVICES"):
        mg.check_pairs({"g0": {"online": env, "offline": {**env, "CUDA_VISIBLE_DEVICES": "g1"}}}, 1)


def _node(short_dir: Path, count: int):
    from valve.device_plugin.backend import SimBackend

    return mg.start_node(SimBackend(count=count, node="t"), short_dir)


def test_discovery_and_pairing_on_a_simulated_node(short_dir: Path) -> None:
    node = _node(short_dir, 6)
    try:
        found = mg.discovery(node)
        assert [g["numa_node"] for g in found] == [0, 0, 0, 1, 1, 1]
        uuids = [g["uuid"] for g in found]
        envs, steps = mg.schedule_pairs(node.kubelet, uuids, 4, seed=3)
        assert len(envs) == 4 and len(steps) == 8
        assert all(envs[u]["online"]["VALVE_ROLE"] == "online" for u in envs)
        # first wave: 2 online then 2 offline, offered 6 free GPUs each time at first
        assert [s["resource"] for s in steps[:4]] == [mg.ONLINE] * 2 + [mg.OFFLINE] * 2
        assert steps[2]["offered"] == 6 and steps[2]["chosen"] in {steps[0]["chosen"], steps[1]["chosen"]}
    finally:
        node.stop()


def test_pairing_failure_is_caught(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import valve.device_plugin.service as service

    # A plugin that spreads tenants (emptiest GPU first) splits pairs; the bench must say so.
    def spread(role, available, must, size, taken, order, wanted=()):
        busy = taken["online"] | taken["offline"]
        return sorted(available, key=lambda u: (u in busy, order.index(u)))[:size]

    monkeypatch.setattr(service, "preferred_allocation", spread)
    node = _node(short_dir, 4)
    try:
        uuids = [g["uuid"] for g in mg.discovery(node)]
        with pytest.raises(mg.BenchError):
            mg.schedule_pairs(node.kubelet, uuids, 2, seed=1)
    finally:
        node.stop()


def test_simulated_eight_gpu_node(tmp_path: Path) -> None:
    proc = run_script("--sim", "--gpus", "8", "--quick", "--seconds", "2", "--arbiter", "thread", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "multigpu_simx8.json").read_text())
    assert doc["mode"] == "sim" and doc["n_gpus"] == 8 and len(set(doc["uuids"])) == 8
    assert [g["numa_node"] for g in doc["found"]] == [0] * 4 + [1] * 4
    for u in doc["uuids"]:  # one pair per GPU, each tenant sees only that GPU
        assert doc["pairs"][u]["online"]["CUDA_VISIBLE_DEVICES"] == u == doc["pairs"][u]["offline"]["VALVE_GPU_UUID"]
        assert doc["workers"][u]["control"]["path"].endswith(f"/{u}/control")  # its own arbiter's block
        assert doc["control"][u]["heartbeat_ns"] > 0
    for row in doc["rows"]:
        ph = row["phases"]
        assert ph["alone"]["p50_ratio"] == 1.0 and ph["alone"]["n"] > 5
        assert ph["nogate"]["p99_ratio"] > 1.3  # time-slicing hurts online
        assert ph["gate"]["p99_ratio"] < ph["nogate"]["p99_ratio"]
        assert 0 < doc["offline"][row["uuid"]]["gate_ratio"] < 1
    assert "multi-GPU node: 8 x Valve Simulated GPU" in (tmp_path / "multigpu_simx8.txt").read_text()
    assert "nogate x p50/p99" in proc.stdout


@pytest.mark.slow
def test_gpu_path_dry_run_on_cpu(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    proc = run_script("--device", "cpu", "--gpus", "2", "--quick", "--seconds", "0.5", "--arbiter", "cli",
                      "--out", str(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "multigpu_cpux2.json").read_text())
    assert doc["mode"] == "cpu" and doc["cross_talk"] == []
    u0, u1 = doc["uuids"]
    rows = {r["uuid"]: r for r in doc["rows"]}
    assert set(rows[u0]["phases"]) == set(mg.GPU_PHASES)  # quick: gate-one on the first GPU only
    assert "gate-one" not in rows[u1]["phases"]
    for u in (u0, u1):
        assert all(p["n"] > 0 for p in rows[u]["phases"].values())
        assert doc["preemptions"]["gate"][u] > 0  # the arbiter of that GPU closed its gate for online
        assert doc["offline"][u]["alone_sublayers_per_s"] > 0
        runs = {k: doc["offline_runs"][k][u]["sublayers_per_s"] for k in ("alone", "gate", "nogate")}
        assert doc["offline"][u]["gate_ratio"] == pytest.approx(runs["gate"] / runs["alone"])
        assert doc["offline"][u]["nogate_ratio"] == pytest.approx(runs["nogate"] / runs["alone"])
    assert doc["settings"]["online"]["hidden"] == 64
