"""bench/reclaim.py on CPU: the modelled offline trace loses no evicted sequence; the latency path checks data."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_reclaim", ROOT / "bench" / "reclaim.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_reclaim"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


SMALL = dict(capacity_gib=48.0, burst_every_s=1.0, burst_gib=(8.0, 14.0), burst_s=(0.3, 1.0))


@pytest.mark.parametrize("policy", ["fifo", "selective"])
def test_every_evicted_sequence_finishes_after_requeue(bench, policy):
    cfg = replace(bench.TraceConfig(), **SMALL)
    r = bench.trace(policy, 5.0, seed=1, cfg=cfg, n_requests=200)
    assert r["evictions"] > 0 and r["evicted_unique"] > 0  # the trace does evict
    assert r["finished"] == 200 and r["unfinished"] == 0  # and every sequence still finishes


def test_offline_alone_evicts_nothing_and_is_fastest(bench):
    cfg = replace(bench.TraceConfig(), **SMALL)
    alone = bench.trace("selective", 4.0, seed=2, cfg=cfg, online=False)
    shared = bench.trace("selective", 4.0, seed=2, cfg=cfg)
    assert alone["evictions"] == 0 and alone["reclaim_requests"] == 0
    assert shared["reclaim_requests"] > 0 and shared["tokens_per_s"] < alone["tokens_per_s"]


def test_latency_path_on_the_simulated_backend_checks_live_data(bench):
    pytest.importorskip("torch")
    rows = bench.latency("cpu", [1 / 64], reps=2, live_fraction=0.25, block_bytes=128 << 10,
                         chunk_bytes=4 << 20, seed=0)
    assert rows[0]["reps"] == 2 and rows[0]["copied_gib_mean"] > 0 and rows[0]["p99_ms"] > 0


def test_check_live_catches_corruption(bench):
    torch = pytest.importorskip("torch")
    from valve.runtime.memory.pool import KVPool
    from valve.runtime.memory.sim import SimBackend

    pool = KVPool(SimBackend(), block_bytes=1 << 16, chunk_bytes=2 << 20, max_bytes=8 << 20)
    view = pool.tensor(torch.int32, ((1 << 16) // 4,))
    import random

    values = bench.fill_live(pool, view, 0.5, random.Random(0))
    bench.check_live(pool, view, values)
    view[pool.block_table(pool.sequences()[0])[0], 5] = -1
    with pytest.raises(AssertionError, match="1 of .* live blocks corrupted"):
        bench.check_live(pool, view, values)


def test_main_cpu_quick_writes_json_and_table(bench, tmp_path):
    pytest.importorskip("torch")
    rc = bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--sizes", "1", "--reps", "2",
                     "--trace-seconds", "3"])
    assert rc == 0
    data = json.loads((tmp_path / "reclaim_sim.json").read_text())
    assert data["env"]["gpu"] == "sim" and data["latency"][0]["reps"] == 2
    assert set(data["policies"]) >= {"alone", "fifo", "selective", "selective_cut_vs_fifo"}
    assert "selective cuts the loss" in (tmp_path / "reclaim_sim.txt").read_text()


def test_capacity_only_run_evicts_but_recomputes_nothing(bench):
    cfg = replace(bench.TraceConfig(), **SMALL)
    r = bench.trace("fifo", 4.0, seed=1, cfg=cfg, recompute=False)
    full = bench.trace("fifo", 4.0, seed=1, cfg=cfg)
    assert r["evictions"] > 0 and r["recomputed_tokens"] == 0
    assert full["recomputed_tokens"] == full["recomputed_reclaim"] + full["recomputed_engine"] > 0


def test_policies_split_the_loss_against_the_capacity_only_run(bench):
    cfg = replace(bench.TraceConfig(), **SMALL)
    p = bench.policies(3.0, seed=1, cfg=cfg, jobs=1)
    assert set(bench.VARIANTS) <= set(p)
    cap = p["capacity_only"]["loss"]
    for n in ("fifo", "selective"):
        assert abs(p[n]["eviction_loss"] - (p[n]["loss"] - cap)) < 1e-12
