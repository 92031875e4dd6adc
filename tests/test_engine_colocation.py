"""The colocation benchmark (bench/colocation.py): its measurements, and the script end to end on CPU."""

import asyncio
import json
import os
import subprocess
import sys

import pytest

from bench.colocation import ROOT, busy_fraction, mps_missing, offline_rate, preset, settings_from, tokens_at
from bench.harness.loadgen import RequestResult


def req(t_send, e2e):
    return RequestResult(0.0, 1, 1, t_send=t_send, ttft=e2e / 2, e2e=e2e)


def test_busy_fraction_merges_overlaps_and_clips():
    rs = [req(0.0, 1.0), req(0.5, 1.0), req(3.0, 0.5), req(9.5, 2.0), RequestResult(0, 1, 1, t_send=5.0)]
    # [0, 1.5] + [3, 3.5] + [9.5, 10] of 10 s; the failed request (no e2e) counts nothing
    assert busy_fraction(rs, 10.0) == pytest.approx(0.25)
    assert busy_fraction([], 10.0) == 0.0


def test_offline_rate_interpolates_progress_records():
    recs = [{"time": 100.0, "generated_tokens": 0}, {"time": 101.0, "generated_tokens": 100},
            {"time": 103.0, "generated_tokens": 500}]
    assert tokens_at(recs, 100.5) == pytest.approx(50)
    assert tokens_at(recs, 99.0) == 0 and tokens_at(recs, 200.0) == 500
    assert offline_rate(recs, 100.5, 102.0) == pytest.approx((300 - 50) / 1.5)


def test_presets_and_overrides():
    gpu = preset("cuda", quick=False)
    assert gpu.online_model == gpu.offline_model == "llama-1b" and gpu.rate is None and gpu.seconds >= 30
    assert preset("cuda", quick=True).seconds < gpu.seconds
    cpu = settings_from("cpu", True, seconds=0.7, variants=("online-alone",), busy=None)
    assert cpu.online_model == "tiny" and cpu.seconds == 0.7 and cpu.variants == ("online-alone",)
    assert mps_missing("cpu") == "MPS needs a CUDA device"


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(240)
def test_bench_colocation_runs_end_to_end_on_cpu(tmp_path):
    pytest.importorskip("torch")
    cmd = [sys.executable, str(ROOT / "bench" / "colocation.py"), "--quick", "--device", "cpu",
           "--seconds", "1.0", "--out", str(tmp_path), "--variants", "online-alone,offline-alone,valve,mps"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=220,
                          env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "online-alone" in done.stdout and "TTFT p99" in done.stdout
    res = json.loads((tmp_path / "colocation_cpu.json").read_text())
    assert (tmp_path / "colocation_cpu.png").stat().st_size > 10_000
    v = res["variants"]
    assert set(v) == {"online-alone", "offline-alone", "valve"}
    assert res["skipped"] == {"mps": "MPS needs a CUDA device"}
    for name in ("online-alone", "valve"):
        assert len(v[name]["ttft_ms"]) >= 2 and v[name]["errors"] == 0, v[name]
        assert all(x > 0 for x in v[name]["ttft_ms"] + v[name]["tpot_ms"])
    assert v["offline-alone"]["offline_tokens_per_s"] > 0 and v["valve"]["offline_tokens_per_s"] > 0
    # Valve really ran: the online requests closed the gate, the offline KV cache lived in the pool
    ctl = v["valve"]["control"]
    assert ctl["online_requests"] >= 2 and ctl["preemptions"] >= 1 and ctl["offline_pool_bytes"] > 0
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows["online-alone"]["ttft_p99_ratio"] == 1.0
    assert rows["valve"]["ttft_p50_ratio"] > 0 and rows["valve"]["offline_ratio"] > 0
    assert res["env"]["device"] == "cpu" and res["settings"]["online_model"] == "tiny"
    assert res["pids"] and not any(pid_alive(p) for p in res["pids"])  # nothing left behind
    # each tenant's alone record: how much of its step time was host work (no NVML on CPU: no utilisation)
    for who in ("online", "offline"):
        t = res["tenants"][who]
        assert t["gpu_util"] is None and 0 < t["host_share"] <= 1, t
    assert "offline alone: GPU util -, host share of step time" in done.stdout
    # where each request's time to first token went: the server's parts plus the client's add up to its TTFT
    from bench.colocation_report import PARTS

    for name in ("online-alone", "valve"):
        rows = v[name]["timeline"]
        assert len(rows) == len(v[name]["ttft_ms"]), name
        for r in rows:
            assert sum(r[k] for k in PARTS if r[k] is not None) == pytest.approx(r["ttft"], abs=1e-6)
            assert r["queue"] >= 0 and r["client"] > 0 and r["gpu"] is None
        bd = res["breakdown"][name]
        assert bd["n"] == len(rows) and bd["mean_ms"]["ttft"] == pytest.approx(
            sum(bd["mean_ms"][k] for k in PARTS if bd["mean_ms"][k] is not None))
    assert res["breakdown"]["online-alone"]["extra_vs_alone_ms"]["queue"] == 0
    assert (tmp_path / "colocation_cpu_breakdown.png").stat().st_size > 5_000
    assert "valve: mean TTFT" in done.stdout

@pytest.mark.parametrize("args, message", [
    (["--engine", "vllm"], "unknown engine 'vllm'"),
    (["--model", "llama-70b"], "unknown online model 'llama-70b'"),
    (["--engine", "ours", "--arch", "qwen"], "--arch qwen needs --engine transformers"),
])
def test_bench_colocation_bad_input_is_one_line_before_any_child(tmp_path, args, message):
    cmd = [sys.executable, str(ROOT / "bench" / "colocation.py"), "--device", "cpu", "--out", str(tmp_path), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_colocation_memory_check_names_the_fix():
    from bench.colocation import Settings, check_settings

    s = Settings(online_model="llama-8b", offline_model="llama-8b")
    check_settings(s, 141 * 2**30)  # two 8B models and their caches fit an H200
    with pytest.raises(ValueError, match="pick a smaller --model"):
        check_settings(s, 40 * 2**30)


def test_summary_is_the_median_of_the_repeats_with_their_spread():
    from bench.colocation_report import summarize

    def row(name, ttft, ratio, tps, n=300):
        return {"variant": name, "requests": n, "errors": 0, "ttft_p50_ms": ttft, "ttft_p50_ratio": ratio,
                "offline_tokens_per_s": tps, "harvest": float("nan")}

    reps = [[row("valve", 6.0, 1.02, 100.0)], [row("valve", 9.0, 1.10, 90.0)], [row("valve", 7.0, 1.01, None)]]
    (s,) = summarize(reps)
    assert s["repeats"] == 3 and s["requests"] == 900
    assert s["ttft_p50_ms"] == 7.0 and s["spread"]["ttft_p50_ms"] == [6.0, 9.0]
    assert s["ttft_p50_ratio"] == 1.02 and s["spread"]["ttft_p50_ratio"] == [1.01, 1.10]
    assert s["offline_tokens_per_s"] == 95.0  # the median of the repeats that measured it (even count: the mean)
    assert s["harvest"] != s["harvest"] and s["spread"]["harvest"] is None


def test_pooled_repeats_join_samples_and_take_the_median_of_scalars():
    from bench.colocation_report import mean_breakdown, pool

    reps = [{"valve": {"ttft_ms": [1.0, 2.0], "gpu_util": 80.0}},
            {"valve": {"ttft_ms": [3.0], "gpu_util": 90.0}},
            {"valve": {"ttft_ms": [4.0], "gpu_util": 70.0}}]
    assert pool(reps) == {"valve": {"ttft_ms": [1.0, 2.0, 3.0, 4.0], "gpu_util": 80.0}}
    bd = mean_breakdown([{"valve": {"n": 3, "mean_ms": {"gpu": 2.0}, "extra_vs_alone_ms": {"gpu": 1.0},
                                    "sm_mhz_arrival": 1000.0}},
                         {"valve": {"n": 1, "mean_ms": {"gpu": 6.0}, "extra_vs_alone_ms": {"gpu": None},
                                    "sm_mhz_arrival": None}}])
    assert bd["valve"]["n"] == 4 and bd["valve"]["mean_ms"]["gpu"] == 3.0  # weighted by requests
    assert bd["valve"]["extra_vs_alone_ms"]["gpu"] == 1.0 and bd["valve"]["sm_mhz_arrival"] == 1000.0


def test_a_requests_count_sets_the_trace_and_the_window():
    from bench.colocation import Run, Settings, new_trace

    run = Run(Settings(requests=300, seed=3), ROOT, {}, rate=12.0, vocab=1000)
    new_trace(run, 3)
    assert len(run.trace) == 300 and run.seconds() == run.trace[-1].t
    assert 300 / 12.0 * 0.7 < run.seconds() < 300 / 12.0 * 1.3  # about requests / rate
    first = [r.prompt for r in run.trace[:5]]
    new_trace(run, 4)  # the next repeat: as many requests, another mix
    assert len(run.trace) == 300 and [r.prompt for r in run.trace[:5]] != first
    plain = Run(Settings(seconds=7.0), ROOT, {}, rate=12.0, vocab=1000)
    new_trace(plain, 0)
    assert plain.seconds() == 7.0 and all(r.t < 7.0 for r in plain.trace)


@pytest.mark.timeout(240)
def test_bench_colocation_repeats_interleave_every_variant_on_cpu(tmp_path):
    pytest.importorskip("torch")
    # a run cut short after its first repeat, then resumed: the first repeat is kept, the second one is run
    cmd = [sys.executable, str(ROOT / "bench" / "colocation.py"), "--quick", "--device", "cpu", "--requests", "5",
           "--out", str(tmp_path), "--variants", "online-alone,valve"]
    first = tmp_path / "first.json"
    for extra in (["--repeats", "1"], ["--repeats", "2", "--resume", str(first)]):
        done = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=110,
                              env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        if not first.exists():
            (tmp_path / "colocation_cpu.json").rename(first)
    res = json.loads((tmp_path / "colocation_cpu.json").read_text())
    assert res["repeats"][0] == json.loads(first.read_text())["variants"]
    assert res["calibration"] == json.loads(first.read_text())["calibration"]
    assert "variants" not in res and len(res["repeats"]) == len(res["repeat_rows"]) == 2
    for rep in res["repeats"]:  # each repeat ran both variants on its own trace, in order
        assert list(rep) == ["online-alone", "valve"]
        assert all(len(v["ttft_ms"]) == 5 and v["errors"] == 0 for v in rep.values())
        assert rep["valve"]["control"]["online_requests"] >= 5
    lengths = [[r["prompt_tokens"] for r in rep["online-alone"]["timeline"]] for rep in res["repeats"]]
    assert lengths[0] != lengths[1]
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows["valve"]["repeats"] == 2 and rows["valve"]["requests"] == 10
    ratios = sorted(rr["ttft_p99_ratio"] for rows_ in res["repeat_rows"] for rr in rows_ if rr["variant"] == "valve")
    assert rows["valve"]["ttft_p99_ratio"] == pytest.approx(sum(ratios) / 2)
    assert rows["valve"]["spread"]["ttft_p99_ratio"] == pytest.approx(ratios)
    assert res["breakdown"]["valve"]["n"] == 10 and res["breakdown"]["valve"]["repeats"] == 2
    assert "2 repeats" in done.stdout and res["skipped"] == {}


def test_resume_refuses_other_settings_and_finished_runs(tmp_path):
    from dataclasses import asdict

    from bench.colocation import Settings, load_resume

    s = Settings(requests=300, repeats=3)
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmark": "colocation", "settings": {**asdict(s), "repeats": 2},
                                "repeats": [{}, {}]}))
    assert len(load_resume(path, s)["repeats"]) == 2
    with pytest.raises(ValueError, match=r"ran other settings \(busy, requests\)"):
        load_resume(path, Settings(requests=100, repeats=3, busy=0.5))
    with pytest.raises(ValueError, match="already has 2 repeats"):
        load_resume(path, Settings(requests=300, repeats=2))
    with pytest.raises(ValueError, match="cannot read --resume"):
        load_resume(tmp_path / "missing.json", s)


@pytest.mark.timeout(240)
def test_memory_pressure_variant_reclaims_for_online_on_cpu(tmp_path):
    """valve-mem end to end: the online server's KV pool grows for bursts after asking the arbiter; the offline
    pool, which filled the (simulated, shared) device, gives the memory back; no online allocation fails."""
    pytest.importorskip("torch")
    cmd = [sys.executable, str(ROOT / "bench" / "colocation.py"), "--quick", "--device", "cpu", "--seconds", "1.5",
           "--rate", "30", "--arrival", "gamma", "--cv", "3", "--out", str(tmp_path),
           "--variants", "online-alone,valve-mem"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=220,
                          env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads((tmp_path / "colocation_cpu.json").read_text())
    v = res["variants"]["valve-mem"]
    assert v["errors"] == 0 and len(v["ttft_ms"]) >= 10
    assert v["mem_reclaims"] > 0 and v["mem_reclaimed_bytes"] > 0 and len(v["mem_reclaim_ms"]) == v["mem_reclaims"]
    assert v["mem_online_ooms"] == 0 and v["mem_online_device_ooms"] == 0
    assert v["mem_online_grows"] > 0 and len(v["mem_ask_wait_ms"]) > 0  # it asked, then mapped
    assert v["control"]["reclaim_ack_seq"] > 0 and v["offline_tokens_per_s"] > 0
    row = {r["variant"]: r for r in res["memory_rows"]}["valve-mem"]
    assert row["reclaims"] == v["mem_reclaims"] and row["online_ooms"] == 0 and row["reclaim_p99_ms"] > 0
    assert {"evicted", "recomputed_tokens", "ask_wait_p99_ms"} <= set(row)
    assert res["memory_plan"]["device_bytes"] > 0 and "online-alone" not in {r["variant"] for r in res["memory_rows"]}
    assert "memory pressure" in done.stdout and "KV map OOMs" in done.stdout and "failed reqs" in done.stdout
    assert "memory pressure" in (tmp_path / "colocation_cpu.txt").read_text()


def test_memory_pressure_flag_adds_the_variants_and_old_settings_still_resume(tmp_path):
    from dataclasses import asdict

    from bench.colocation import Settings, load_resume, with_memory_variants

    assert with_memory_variants(("online-alone", "valve", "mps")) == ("online-alone", "valve", "mps", "valve-mem",
                                                                     "mps-mem")
    assert with_memory_variants(("online-alone",))[-2:] == ("time-slicing-mem", "valve-mem")
    s = Settings(requests=300, repeats=3)
    old = {k: v for k, v in asdict(s).items() if not k.startswith("mem_")}  # a result from before these settings
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"benchmark": "colocation", "settings": {**old, "repeats": 2}, "repeats": [{}, {}]}))
    assert len(load_resume(path, s)["repeats"]) == 2
    with pytest.raises(ValueError, match=r"ran other settings \(mem_leave_bytes\)"):
        load_resume(path, Settings(requests=300, repeats=3, mem_leave_bytes=1 << 20))


def table_cells(t) -> list[list[str]]:
    """A rich table's rows as the strings it prints."""
    return [[str(c._cells[i]) for c in t.columns] for i in range(t.row_count)]


def test_online_requests_failed_of_oom_are_counted():
    """The engine dies of a CUDA OOM in its own allocations (not its KV pool): the request in flight gets the error
    in its stream, later ones a 500 that names it; the bench counts every one as an OOM failure and the memory
    table says so (before, it counted only KV mappings the device refused: 0)."""
    torch = pytest.importorskip("torch")
    from bench import colocation_report as report
    from bench.harness.loadgen import TraceRequest, run_trace
    from tests.support.serving import serving
    from valve.engine.server import build_worker, create_app
    from valve.engine.tokenizer import ByteTokenizer

    worker = build_worker("tiny", "cpu", num_blocks=64, block_size=8, max_batch_tokens=64, max_seqs=4)

    def step():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 MiB. GPU 0 has 31.56 MiB free.")

    worker.engine.step = step
    worker.start()
    try:
        with serving(create_app(worker, "tiny", ByteTokenizer(256))) as url:
            first = asyncio.run(run_trace(url, [TraceRequest(0.0, [5, 6, 7], 4)], "tiny"))
            assert worker.error is not None  # set before the request in flight was told
            later = asyncio.run(run_trace(url, [TraceRequest(0.01 * i, [5, 6], 4) for i in range(3)], "tiny"))
    finally:
        worker.stop()
    assert "out of memory" in first[0].error and all(r.error.startswith("HTTP 500") for r in later)
    errors = [r.error for r in first + later] + [None, "HTTP 400: bad request", "DeviceOutOfMemory: chunk 3"]
    assert report.oom_errors(errors) == 5
    v = {"errors": 4, "oom_errors": report.oom_errors(r.error for r in first + later), "mem_reclaims": 0,
         "mem_reclaimed_bytes": 0, "mem_evicted": 0, "mem_recomputed_tokens": 0, "mem_online_ooms": 0,
         "error_samples": sorted({r.error for r in first + later})[:3]}
    (row,) = report.memory_rows({"valve-mem": v})
    assert (row["online_ooms"], row["online_errors"], row["online_oom_errors"]) == (0, 4, 4)
    old = {k: val for k, val in v.items() if k != "oom_errors"}  # a result written before the count: samples
    (old_row,) = report.memory_rows({"valve-mem": old})
    assert (old_row["online_oom_errors"], old_row["online_oom_errors_exact"]) == (2, False)
    cells = [table_cells(report.render_memory_table(rows, "t"))[0] for rows in ([row], [old_row])]
    assert [c[8] for c in cells] == ["4 (4 OOM)", "4 (>=2 OOM)"] and cells[0][7] == "0"


def test_variant_names_carry_runtime_settings():
    from bench.colocation import merge, parse_variant

    assert parse_variant("valve") == ("valve", {})
    assert parse_variant("valve@queue_ahead=1+near_online.window_ms=200+near_online.max_batch_tokens=512") == (
        "valve", {"queue_ahead": 1, "near_online": {"window_ms": 200, "max_batch_tokens": 512}})
    assert parse_variant("valve-mem@eviction_policy=fifo") == ("valve-mem", {"eviction_policy": "fifo"})
    for bad, why in (("vlave", "unknown variant 'vlave'"), ("mps@queue_ahead=1", "only Valve variants"),
                     ("valve@queue_ahead", "is not key=value"), ("valve@queue_ahead=0", "greater than or equal"),
                     ("valve@queue_ahaed=1", "queue_ahaed"), ("valve@near_online.window=5", "near_online.window")):
        with pytest.raises(ValueError, match=why) as e:
            parse_variant(bad)
        assert "\n" not in str(e.value)
    # the memory variant's reserve and a variant's settings together: nested dicts merged, the variant's win
    assert merge({"reserve": {"min_bytes": 1, "decay_seconds": 5}}, {"reserve": {"min_bytes": 2}, "queue_ahead": 3}) \
        == {"reserve": {"min_bytes": 2, "decay_seconds": 5}, "queue_ahead": 3}


@pytest.mark.timeout(240)
def test_bench_colocation_sweeps_runtime_settings_on_cpu(tmp_path):
    """Valve at two settings beside its defaults in one run: each arbiter published its variant's settings, the
    offline engine took the near-online budget, and the trade-off points and plot are written."""
    pytest.importorskip("torch")
    near = "valve@near_online.window_ms=60000+near_online.max_batch_tokens=8+queue_ahead=1"
    cmd = [sys.executable, str(ROOT / "bench" / "colocation.py"), "--quick", "--device", "cpu", "--requests", "4",
           "--out", str(tmp_path), "--variants", f"online-alone,offline-alone,valve,{near},valve@near_online.window_ms=0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=220,
                          env={**os.environ, "COLUMNS": "250", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads((tmp_path / "colocation_cpu.json").read_text())
    v = res["variants"]
    defaults = v["valve"]["control"]  # RuntimeSpec's defaults: 200 ms, 512 tokens
    assert (defaults["near_online_ns"], defaults["near_online_tokens"]) == (200 * 10**6, 512)
    off = "valve@near_online.window_ms=0"
    assert v[off]["control"]["near_online_ns"] == 0 and v[off]["offline_small_steps"] == 0
    ctl = v[near]["control"]
    assert (ctl["near_online_ns"], ctl["near_online_tokens"], ctl["queue_ahead"]) == (60 * 10**9, 8, 1)
    assert v[near]["offline_small_steps"] > 0  # the engine stepped at most 8 tokens after online first came
    assert v[off]["control"]["queue_ahead"] == 2
    points = {p["variant"]: p for p in res["tradeoff"]}
    assert set(points) == {"valve", near, off}
    rows = {r["variant"]: r for r in res["rows"]}
    assert all(points[n]["harvest"] == rows[n]["harvest"] > 0 for n in points)
    assert (tmp_path / "colocation_cpu_tradeoff.png").stat().st_size > 10_000
    assert str(tmp_path / "colocation_cpu_tradeoff.png") in res["files"]
