"""bench/preemption.py on CPU: its plain functions and a whole --device cpu run."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "preemption.py"


@pytest.fixture(scope="module")
def pb():
    spec = importlib.util.spec_from_file_location("bench_preemption", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arrivals_are_seeded_poisson_with_idle_gaps(pb):
    a = pb.arrival_times(60.0, 20.0, 25, 150.0, seed=3)
    assert a == pb.arrival_times(60.0, 20.0, 25, 150.0, seed=3)
    assert a != pb.arrival_times(60.0, 20.0, 25, 150.0, seed=4)
    assert all(0 < x < 60.0 for x in a) and a == sorted(a)
    gaps = [y - x for x, y in zip(a, a[1:], strict=False)]
    assert sum(g > 0.15 for g in gaps) >= 20  # idle gaps (~1 in 25 of ~2000 bursts)
    no_idle = pb.arrival_times(60.0, 20.0, 0, 150.0, seed=3)
    mean_gap = 60.0 / len(no_idle)
    assert 0.018 < mean_gap < 0.022


def test_percentile_matches_linear_interpolation(pb):
    xs = [5.0, 1.0, 3.0, 2.0, 4.0, float("nan")]
    assert pb.percentile(xs, 50) == 3.0
    assert pb.percentile(xs, 99) == pytest.approx(4.96)
    assert pb.percentile([7.0], 99) == 7.0
    assert math.isnan(pb.percentile([], 50))


def test_summary_ratios_and_target(pb):
    alone = pb.summarize({"lat_ms": [1.0] * 99 + [1.2]}, None, None, None)
    nogate = pb.summarize({"lat_ms": [2.0] * 90 + [5.0] * 10, "preempt_us": [900.0] * 100},
                          {"tok_s": 500.0, "solo_tok_s": 1000.0}, alone, 1000.0)
    gate = pb.summarize({"lat_ms": [1.1] * 99 + [1.9], "preempt_us": [100.0] * 100, "closed": 90},
                        {"tok_s": 800.0, "solo_tok_s": 950.0}, alone, 1000.0)
    assert nogate["online_p50_ratio"] == pytest.approx(2.0) and nogate["offline_ratio"] == 0.5
    assert gate["offline_ratio"] == 0.8 and gate["offline_ratio_own_solo"] == pytest.approx(800 / 950)
    assert gate["preempt_p99_us"] == 100.0 and gate["gate_closed_bursts"] == 90
    v = pb.verdict({"alone": alone, "nogate": nogate, "gate": gate})
    assert v["gate"]["within_target"] and v["gate"]["below"] == {"nogate": True}
    slow = pb.summarize({"lat_ms": [2.0] * 100}, None, alone, None)
    v = pb.verdict({"alone": alone, "gate": slow})
    assert not v["gate"]["within_target"]
    assert v["gate"]["missed_by_ms"] == pytest.approx(2.0 - alone["online_p99_ms"] - 0.25)
    assert v["gate"]["target_ms"] == 0.25
    text = pb.table({"alone": alone, "gate": gate}, {"mps": "nvidia-cuda-mps-control not found"})
    assert "gate" in text and "mps          skipped: nvidia-cuda-mps-control not found" in text


def live_cmdlines(marker: str) -> list[str]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                out.append(cmd)
    return out


@pytest.mark.timeout(120)
def test_cpu_run_end_to_end(tmp_path, pb):
    pytest.importorskip("torch")
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--seconds", "0.6", "--warmup", "3",
                        "--solo-seconds", "0.2", "--out", str(out)], capture_output=True, text=True, timeout=110,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "preemption_cpu.json").read_text())
    raw = json.loads((out / "preemption_cpu_raw.json").read_text())
    assert "alone" in r.stdout and "skipped" in r.stdout
    rows = res["variants"]
    assert set(rows) == {"alone", "nogate", "gate", "gate_linear"}
    for v in ("graph_memop", "graph_spin", "mps", "mps_gate", "mps_prio"):
        assert res["skipped"][v] == "needs a CUDA device"
    assert rows["alone"]["online_p50_ratio"] == 1.0
    st = res["settings"]
    n = len(pb.arrival_times(0.6, st["mean_gap_ms"], st["idle_every"], st["idle_ms"], st["seed"]))
    assert rows["alone"]["bursts"] == n - 3 and rows["alone"]["warmup_bursts"] == 3  # warm-up run, not counted
    assert raw["alone"]["online"]["gpu_ms"] == [] and res["clock_effect"]["measured"] is False
    for v in ("nogate", "gate", "gate_linear"):
        assert rows[v]["bursts"] == rows["alone"]["bursts"] > 5  # same seeded arrivals in every variant
        assert rows[v]["offline_tok_s"] > 0 and rows[v]["offline_solo_tok_s"] > 0
    assert raw["gate"]["offline"]["gate_boundaries"] > 0 and raw["gate"]["offline"]["forced_opens"] == 0
    per_step = {v: raw[v]["offline"]["gate_boundaries"] / raw[v]["offline"]["steps_total"] for v in ("gate", "gate_linear")}
    assert per_step == {"gate": 4.0, "gate_linear": 14.0}  # 2 layers x (attention, MLP) / x 7 linears
    assert raw["nogate"]["offline"]["gate_boundaries"] == 0
    assert res["env"]["arbiter"]["preemptions"] > 0
    assert res["settings"]["device"] == "cpu" and "gate" in res["target"]
    assert res["settings"]["ctl"] and not live_cmdlines(res["settings"]["ctl"])  # no worker left behind
    assert not Path(res["settings"]["ctl"]).exists()  # its runtime dir is removed


@pytest.mark.timeout(120)
def test_a_failing_worker_is_reported_and_nothing_is_left(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "res"
    # queue-ahead 0 is invalid: the arbiter (RuntimeSpec) and the offline Gate refuse it at start
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--seconds", "0.3", "--solo-seconds", "0.1",
                        "--queue-ahead", "0", "--out", str(out)], capture_output=True, text=True, timeout=110,
                       cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    res = json.loads((out / "preemption_cpu.json").read_text())
    assert "worker exited" in res["error"] and "before ready" in res["error"]
    assert res["variants"] == {}
    assert not live_cmdlines(res["settings"]["ctl"])


def test_summary_gpu_time_clock_and_preemption_excess(pb):
    alone = pb.summarize({"lat_ms": [1.0] * 100, "preempt_us": [20.0] * 100, "gpu_ms": [0.8] * 100,
                          "sm_mhz": [1100] * 99 + [None], "warmup": 20}, None, None, None)
    assert alone["gpu_p50_ms"] == 0.8 and alone["sm_mhz_p50"] == 1100 and alone["warmup_bursts"] == 20
    gate = pb.summarize({"lat_ms": [1.3] * 100, "preempt_us": [320.0] * 99 + [920.0], "gpu_ms": [0.6] * 100,
                         "sm_mhz": [1980] * 100}, None, alone, None)
    assert gate["preempt_p50_over_alone_us"] == 300.0 and gate["preempt_p99_over_alone_us"] == pytest.approx(306.0)
    c = pb.clock_effect({"alone": alone, "gate": gate})
    assert c["measured"] and c["alone_clock_drop"] and "clocks down" in c["note"]
    assert c["per_variant"]["gate"] == {"sm_mhz_p50": 1980, "sm_mhz_min": 1980, "gpu_p50_ms": 0.6}
    same = pb.summarize({"lat_ms": [1.0] * 10, "sm_mhz": [1950] * 10}, None, alone, None)
    fair = pb.clock_effect({"alone": dict(alone, sm_mhz_p50=1960.0), "gate": same})
    assert not fair["alone_clock_drop"] and "fair baseline" in fair["note"]
    assert pb.clock_effect({"alone": pb.summarize({"lat_ms": [1.0]}, None, None, None)})["measured"] is False
    text = pb.table({"alone": alone, "gate": gate}, {})
    assert "SM MHz" in text and " 1100" in text and "0.800" in text


def test_the_arbiter_settings_default_to_the_runtimes_and_the_page_says_which(pb):
    from valve.api.runtime import RuntimeSpec

    spec = RuntimeSpec()
    a = pb.build_parser().parse_args([])
    assert (a.hysteresis_ms, a.queue_ahead, a.max_preemptions) == (
        spec.idle_hysteresis_ms, spec.queue_ahead, spec.max_preemptions_per_second)
    text = " ".join((ROOT / "docs" / "preemption.md").read_text().split())
    assert (f"(`RuntimeSpec`: {spec.idle_hysteresis_ms:g} ms, {spec.queue_ahead}, "
            f"{spec.max_preemptions_per_second:g}/s)") in text
