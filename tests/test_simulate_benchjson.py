import pytest

from valve.simulate.benchjson import map_bench_results

COLOCATION = {  # ratios per variant, as the colocation benchmark may write them
    "gpu": "NVIDIA H100 80GB HBM3",
    "variants": {
        "online_alone": {"ttft_p99_ms": 50.0, "tpot_p99_ms": 20.0, "gpu_util": 40.0},
        "offline_alone": {"tokens_per_s": 1000.0},
        "time_slicing": {"ttft_p99_ratio": 2.5, "tpot_p99_ratio": 1.9, "offline_tokens_per_s_ratio": 0.55},
        "mps": {"ttft_p99_ratio": 1.8, "tpot_p99_ratio": 1.5},
        "valve": {"ttft_p99_ratio": 1.03, "tpot_p99_ratio": 1.04, "offline_tokens_per_s_ratio": 0.57},
    },
}
PREEMPTION = {  # absolute latencies in a list of named variants
    "device": "NVIDIA H100",
    "results": [
        {"name": "alone", "online_p50_ms": 0.40, "online_p99_ms": 0.5},
        {"name": "no_gate", "online_p99_ms": 2.5},
        {"name": "mps", "online_p99_ms": 1.5},
        {"name": "gated", "online_p99_ms": 0.6, "preemption_p99_us": 250.0},
    ],
}
RECLAIM = {"reclaim": [{"size_gib": 1, "p99_ms": 4.0}, {"size_gib": 8, "p99_ms": 18.5}, {"size_gib": 16, "p99_ms": 40}]}


def test_colocation_ratios_map_to_the_model():
    m = map_bench_results("colocation", COLOCATION)
    assert m["valve_online_p99_ratio"] == (1.04, "variants.valve.tpot_p99_ratio")  # the worse of TTFT and TPOT
    assert m["ts_online_p99_ratio"][0] == 2.5
    # offline ratio over the idle share of the GPU (online was 40% busy)
    assert m["valve_offline_efficiency"][0] == pytest.approx(0.57 / 0.6)
    assert m["ts_offline_efficiency"][0] == pytest.approx(0.55 / 0.6)
    assert "gpu_util" in m["valve_offline_efficiency"][1]


def test_preemption_benchmark_gives_added_latencies_not_ratios():
    m = map_bench_results("preemption", PREEMPTION)
    # micro-benchmark bursts of 0.5 ms: their ratios would be wrong for LLM requests; the delays carry over
    assert "valve_online_p99_ratio" not in m and "ts_online_p99_ratio" not in m
    assert m["ts_online_added_s"][0] == pytest.approx(2.0e-3)
    assert m["ts_online_added_s"][1] == "results.no_gate.online_p99_ms - results.alone.online_p99_ms"
    assert m["preemption_latency_s"][0] == pytest.approx(250e-6)
    assert "valve_offline_efficiency" not in m  # no offline figures, no online load: nothing guessed


def test_absolute_latencies_of_the_llm_benchmark_become_ratios():
    doc = {"results": PREEMPTION["results"]}
    m = map_bench_results("colocation", doc)
    assert m["valve_online_p99_ratio"][0] == pytest.approx(0.6 / 0.5)
    assert m["valve_online_p99_ratio"][1] == "results.gated.online_p99_ms / results.alone.online_p99_ms"
    assert m["ts_online_p99_ratio"][0] == pytest.approx(2.5 / 0.5)
    assert "ts_online_added_s" not in m


def test_reclaim_latency_prefers_the_8_gib_case():
    assert map_bench_results("reclaim", RECLAIM)["reclaim_latency_s"] == (pytest.approx(0.0185), "reclaim.8.p99_ms")
    assert map_bench_results("reclaim", {"p99_ms": {"1gib": 3.0, "4gib": 9.0}})["reclaim_latency_s"][0] == pytest.approx(0.009)


def test_unknown_schema_maps_nothing():
    assert map_bench_results("colocation", {"hello": [1, 2, {"x": "y"}], "ok": True}) == {}


# The shape `bench/colocation.py` writes: raw samples per variant, then one row
# per variant with ratios to the solo runs.
ENGINE_COLOCATION = {
    "benchmark": "colocation",
    "env": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "gpu_uuid": "GPU-1"},
    "settings": {"seconds": 60.0, "variants": ["online-alone", "offline-alone", "time-slicing", "valve"]},
    "variants": {
        "online-alone": {"gpu_util": 35.0, "ttft_ms": [20.0, 30.0], "tpot_ms": [5.0], "busy_fraction": 0.5},
        "offline-alone": {"gpu_util": 99.0, "offline_tokens_per_s": 1000.0},
        "time-slicing": {"gpu_util": 99.0, "offline_tokens_per_s": 700.0, "ttft_ms": [60.0, 90.0]},
        "valve": {"gpu_util": 95.0, "offline_tokens_per_s": 450.0, "ttft_ms": [21.0, 33.0],
                  "control": {"preemptions": 1200, "gate_closed_ns": 10**10}},
    },
    "rows": [
        {"variant": "online-alone", "ttft_p99_ms": 30.0, "ttft_p99_ratio": 1.0, "tpot_p99_ratio": 1.0,
         "offline_ratio": None, "gpu_util": 35.0, "busy_fraction": 0.5},
        {"variant": "offline-alone", "ttft_p99_ratio": None, "offline_tokens_per_s": 1000.0, "offline_ratio": 1.0},
        {"variant": "time-slicing", "ttft_p50_ratio": 2.9, "ttft_p99_ratio": 3.0, "tpot_p99_ratio": 2.2,
         "offline_ratio": 0.7, "gpu_util": 99.0, "busy_fraction": 0.6},
        {"variant": "valve", "ttft_p50_ratio": 1.05, "ttft_p99_ratio": 1.1, "tpot_p99_ratio": 1.2,
         "offline_ratio": 0.45, "gpu_util": 95.0, "busy_fraction": 0.5},
    ],
}


def test_engine_colocation_benchmark_json_maps_to_the_model():
    m = map_bench_results("colocation", ENGINE_COLOCATION)
    assert m["valve_online_p99_ratio"] == (1.2, "rows.valve.tpot_p99_ratio")
    assert m["ts_online_p99_ratio"] == (3.0, "rows.time-slicing.ttft_p99_ratio")
    # offline ratio over the idle share, online's busy fraction (not NVML's utilisation) alone: 0.45 / 0.5
    assert m["valve_offline_efficiency"][0] == pytest.approx(0.9)
    assert "busy_fraction" in m["valve_offline_efficiency"][1]
    assert m["ts_offline_efficiency"][0] == pytest.approx(1.0)  # 0.7 / 0.5, capped at 1


def test_reclaim_bench_table_uses_its_8_gib_row_not_a_list_index():
    doc = {"latency": [{"size_gib": 1.0, "p99_ms": 2.0}, {"size_gib": 8.0, "p99_ms": 12.5},
                       {"size_gib": 16.0, "p99_ms": 17.0}],
           "sweep": [{"size_gib": 8.0, "chunk_mib": c, "p99_ms": 99.0} for c in range(9)]}
    value, where = map_bench_results("reclaim", doc)["reclaim_latency_s"]
    assert value == pytest.approx(0.0125) and where.startswith("latency.1.")
    doc["latency"] = doc["latency"][:1]
    assert map_bench_results("reclaim", doc)["reclaim_latency_s"][0] == pytest.approx(0.002)
