"""bench/preload_gate.py on CPU: its plan and time estimate, the statistics over repeats, the table and plot, bad
options, and a dry run of every step (real worker processes, the library built and preloaded) on CPU torch."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from valve.stats import percentile

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "preload_gate.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_preload_gate", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pg = load()
FULL = pg.FULL


def run_script(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_the_plan_has_each_variant_once_and_the_default_run_fits_one_device_call():
    items = pg.plan(["eager", "graphs", "hf"], [FULL, 2048, 512, 128], [0, 100])
    keys = [(it["what"], it.get("program"), it.get("chunk"), it.get("mode"), it.get("pace")) for it in items]
    assert len(keys) == len(set(keys))
    assert keys.count(("alone", None, None, None, None)) == 1
    contended = [k for k in keys if k[0] == "contended"]
    # eager: 4 chunks x (nolib + gated at 2 paces) + open at 2 paces (unchunked); graphs, hf: 1 + 2 + 2 each
    assert len(contended) == 4 * 3 + 2 + 5 + 5
    assert all(k[2] == FULL for k in contended if k[3] == "open")
    assert {k[2] for k in keys if k[1] in ("graphs", "hf")} == {FULL}  # only the eager program is chunked
    solos = [k for k in keys if k[0] == "solo"]
    assert len(solos) == 4 * 3 + 3 + 3  # each chunk: without the library and at each pace
    # the defaults (300 bursts per variant over 3 repeats, 20 ms gaps, 1.5 s alone): under 7 minutes in all
    est = pg.estimate_s(items, 3, 100, 20.0, 1.5)
    assert 240 < est < 420
    assert pg.estimate_s(items, 3, 200, 20.0, 1.5) > est + 3 * len(contended) * 100 * 0.02


def test_another_repeat_only_if_it_ends_within_the_budget():
    assert pg.another_repeat(0, 999.0, 50.0, 100.0)  # the first always runs
    assert pg.another_repeat(2, 250.0, 50.0, None)
    assert pg.another_repeat(2, 250.0, 50.0, 350.0)  # 100 s a repeat: ends at 350
    assert not pg.another_repeat(2, 250.0, 50.0, 349.0)


def _raw():
    alone = [[1.0] * 99 + [2.0], [1.0] * 99 + [4.0]]
    gated = [[x * 1.5 for x in rep] for rep in alone]
    nolib = [[x * 3 for x in rep] for rep in alone]

    def reps(lats, rates, waits):
        return [{"lat_ms": lat, "rate": r, "unit": "steps", "launches": 10, "waits": w}
                for lat, r, w in zip(lats, rates, waits, strict=True)]

    return {"alone": alone,
            "contended": {("eager", FULL, "gated", 100): reps(gated, [90.0, 92.0], [4, 6]),
                          ("eager", FULL, "nolib", None): reps(nolib, [95.0, 96.0], [0, 0]),
                          ("eager", 512, "gated", 100): reps(alone, [50.0, 52.0], [10, 10]),
                          ("hf", FULL, "open", 100): reps(alone, [800.0, 810.0], [1, 1])},
            "solo": {("eager", FULL, None): [100.0, 100.0], ("eager", FULL, 100): [99.0, 97.0],
                     ("eager", 512, 100): [60.0, 61.0], ("hf", FULL, 100): [700.0, 700.0],
                     ("hf", FULL, None): [707.0, 714.0]},
            "kernel_ms": {("eager", FULL): 0.4, ("eager", 512): 0.03}}


def test_summary_pools_bursts_and_pairs_repeats():
    doc = pg.summarize(_raw())
    a = doc["online_alone"]
    assert a["n"] == 200 and a["p50_ms"] == 1.0
    rows = {(r["program"], r["chunk"], r["mode"]): r for r in doc["rows"]}
    assert [(r["program"], r["chunk"], r["mode"]) for r in doc["rows"]] == [
        ("eager", "full", "nolib"), ("eager", "full", "gated"), ("eager", "512", "gated"), ("hf", "full", "open")]
    g = rows[("eager", "full", "gated")]
    assert g["online"]["n"] == 200 and g["p99_ratio"] == pytest.approx(1.5)  # every burst 1.5x alone's
    assert g["p99_ratio_repeats"]["median"] == pytest.approx(1.5)  # each repeat against its own alone run
    assert g["preempt_excess_ms"]["p50"] == pytest.approx(0.5)
    assert g["offline_contended"] == {"median": 91.0, "min": 90.0, "max": 92.0, "n": 2}
    ov = g["overhead_gate_open"]  # repeat by repeat: 1 - 99/100, 1 - 97/100
    assert (ov["min"], ov["max"]) == (pytest.approx(0.01), pytest.approx(0.03))
    assert g["counters"] == {"launches": 20, "waits": 10} and g["kernel_ms"] == 0.4
    assert "overhead_gate_open" not in rows[("eager", "full", "nolib")]
    assert rows[("eager", "full", "nolib")]["p99_ratio"] == pytest.approx(3.0)
    assert rows[("hf", "full", "open")]["overhead_gate_open"]["median"] == pytest.approx(0.015, abs=1e-3)
    st = doc["standard"]
    assert st == {**st, "bursts_per_variant_min": 200, "repeats": 2, "met": False}


def test_table_and_plot_are_written(tmp_path):
    doc = pg.summarize(_raw())
    doc["settings"] = {}
    files = pg.write(tmp_path, doc)
    assert [f.name for f in files] == ["preload_gate.json", "preload_gate.md", "preload_gate.png"]
    text = (tmp_path / "preload_gate.md").read_text()
    assert "NOT met (min 200 bursts per variant, 2 repeats)" in text
    p99 = percentile([1.5 * x for rep in _raw()["alone"] for x in rep], 99)
    assert (f"| eager | full | 0.400 | gated, every 100 us | 1.50 / {p99:.2f} | x1.50 | x1.50 [1.50-1.50] "
            "| 91.0 steps/s | 98.0 [97.0-99.0] | +2.0% [+1.0..+3.0%] | 10 / 20 | 200 |") in text
    assert (tmp_path / "preload_gate.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "preload_gate.json").read_text())["rows"][0]["chunk"] == "full"


def test_from_json_draws_the_table_and_plot_again(tmp_path):
    doc = pg.summarize(_raw())
    src = tmp_path / "run"
    src.mkdir()
    pg.write(src, doc)
    (src / "preload_gate.png").unlink()
    p = run_script("--from-json", str(src / "preload_gate.json"), "--out", str(tmp_path / "again"), timeout=60)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "again" / "preload_gate.md").read_text() == (src / "preload_gate.md").read_text()
    assert (tmp_path / "again" / "preload_gate.png").read_bytes()[:4] == b"\x89PNG"
    bad = run_script("--from-json", str(tmp_path / "nothing.json"), "--out", str(tmp_path / "x"), timeout=60)
    assert bad.returncode == 2 and "cannot read" in bad.stderr


@pytest.mark.parametrize("args,why", [(["--chunks", "full,0"], "'0' is neither"),
                                      (["--paces", "fast"], "not a list of whole numbers"),
                                      (["--programs", "vllm"], "unknown ['vllm']")])
def test_bad_options_exit_with_one_line(args, why, tmp_path):
    p = run_script(*args, "--out", str(tmp_path), timeout=60)
    assert p.returncode == 2 and why in p.stderr and p.stdout == ""


def test_the_gpu_run_fails_fast_without_a_gpu():
    with pytest.raises(SystemExit, match="a CUDA GPU visible to torch"):
        pg.preflight(["eager"], "cuda")


@pytest.mark.slow
def test_dry_run_on_cpu_runs_every_step(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    p = run_script("--device", "cpu", "--programs", "eager,hf", "--paces", "100", "--chunks", "full,8",
                   "--bursts", "4", "--repeats", "2", "--gap-ms", "2", "--solo-seconds", "0.05", "--out", str(out),
                   "--logs", str(work))
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads((out / "preload_gate.json").read_text())
    # each variant once per repeat, 2 bursts each time (4 over 2 repeats); online alone the same
    got = {(r["program"], r["chunk"], r["mode"], r["pace_us"]) for r in doc["rows"]}
    assert got == {("eager", "full", "nolib", None), ("eager", "full", "open", 100), ("eager", "full", "gated", 100),
                   ("eager", "8", "nolib", None), ("eager", "8", "gated", 100),
                   ("hf", "full", "nolib", None), ("hf", "full", "open", 100), ("hf", "full", "gated", 100)}
    assert doc["online_alone"]["n"] == 4 and doc["online_alone"]["p99_ms_repeats"]["n"] == 2
    for r in doc["rows"]:
        assert r["online"]["n"] == 4 and r["p99_ratio_repeats"]["n"] == 2
        assert r["offline_contended"]["n"] == 2 and r["offline_contended"]["min"] > 0
        assert r["offline_alone"]["n"] == 2 and r["offline_alone"]["min"] > 0
        assert r["unit"] == ("tokens" if r["program"] == "hf" else "steps")
        assert (r["kernel_ms"] is not None) == (r["program"] == "eager")
        assert r["counters"]["waits"] == 0  # no CUDA: the preloaded library has nothing to gate
    assert doc["standard"]["met"] is False and doc["settings"]["device"] == "cpu"
    assert (out / "preload_gate.png").stat().st_size > 0
    assert "| hf | full | - | gated, every 100 us |" in (out / "preload_gate.md").read_text()
    # only the results in --out (a device call returns at most 8 files): the library and logs go to --logs
    assert sorted(f.name for f in out.iterdir()) == ["preload_gate.json", "preload_gate.md", "preload_gate.png"]
    assert (work / "lib" / "libvalvegate.so").is_file() and (work / "online.log").is_file()
