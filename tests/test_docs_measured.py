"""The measured figures of docs/*.md are recomputed from the result files committed under bench/results/.

Tables are rebuilt row by row with the page's rounding; figures in the text are looked up as the page writes
them. An edited figure, or one the result file does not give, fails. docs/engines.md has its own test
(test_docs_engines_figures.py), the fleet figures of docs/simulate.md theirs (test_simulate_published.py).
"""

from __future__ import annotations

from tests.support.markdown import RESULTS, code_blocks, result, section, tables
from valve.stats import percentile

H100_COLOCATION = "colocation_h100-80gb-hbm3.json"
H200_COLOCATION = "smoke_h200/colocation_h200.json"
LABELS = {"online-alone": "online-alone", "offline-alone": "offline-alone", "time-slicing": "time-slicing",
          "mps": "MPS", "valve": "Valve"}


def flat(text: str) -> str:
    """Text with its line breaks as spaces, so a figure wrapped over two lines is found."""
    return " ".join(text.split())


def colocation_ratios(name: str, variant: str) -> dict[str, float]:
    """TTFT/TPOT p50/p99 as ratios to online-alone and offline tok/s as a ratio to offline-alone."""
    v = result(name)["variants"]
    out = {f"{m}_p{q}": percentile(v[variant][f"{m}_ms"], q) / percentile(v["online-alone"][f"{m}_ms"], q)
           for m in ("ttft", "tpot") for q in (50, 99)}
    out["offline"] = v[variant]["offline_tokens_per_s"] / v["offline-alone"]["offline_tokens_per_s"]
    return out


def test_engine_colocation_table():
    doc = result(H100_COLOCATION)
    v = doc["variants"]
    (table,) = tables(section("docs/engine.md", "## Measured"))
    rows = {r[0]: r for r in table[1:]}
    assert list(rows) == list(LABELS.values())
    for name, label in LABELS.items():
        r = v[name]
        cells = [label, str(len(r["ttft_ms"])) if "ttft_ms" in r else "-"]
        for metric, digits in (("ttft", 1), ("tpot", 2)):
            for q in (50, 99):
                if f"{metric}_ms" not in r:
                    cells.append("-")
                    continue
                val = percentile(r[f"{metric}_ms"], q)
                ref = percentile(v["online-alone"][f"{metric}_ms"], q)
                cells.append(f"{val:.{digits}f} (x{val / ref:.2f})")
        tps = r.get("offline_tokens_per_s")
        cells.append(f"{tps:,.0f} (x{tps / v['offline-alone']['offline_tokens_per_s']:.2f})" if tps else "-")
        cells.append(f"{r['gpu_util']:.0f}%")
        cells.append(f"{r['busy_fraction']:.0%}" if "busy_fraction" in r else "-")
        assert rows[label] == cells, label


def test_engine_colocation_run_and_smoke_run():
    doc, text = result(H100_COLOCATION), flat(section("docs/engine.md", "## Measured"))
    s = doc["settings"]
    assert (f"`python3 bench/colocation.py --seconds {s['seconds']:g} --offline-warmup {s['offline_warmup']:g}`, "
            "one run") in text
    assert f"at {doc['calibration']['rate_per_s']:.2f} req/s Poisson" in text
    assert f"{len(doc['variants']['valve']['ttft_ms'])} requests per variant" in text
    smoke = result(H200_COLOCATION)
    assert smoke["settings"]["seconds"] == 8 and smoke["env"]["gpu"] == "NVIDIA H200"
    assert f"8 s windows, {len(smoke['variants']['valve']['ttft_ms'])} requests per variant" in text
    for name in ("valve", "time-slicing", "mps"):
        r = colocation_ratios(H200_COLOCATION, name)
        assert (f"{LABELS[name]} TTFT p50/p99 " if name == "valve" else f"{LABELS[name]} TTFT ") + (
            f"x{r['ttft_p50']:.2f}/x{r['ttft_p99']:.2f}, TPOT x{r['tpot_p50']:.2f}/x{r['tpot_p99']:.2f}, "
            f"offline x{r['offline']:.2f}") in text, name


def test_engine_reading_figures():
    text = flat(section("docs/engine.md", "## Measured"))
    h100 = {n: colocation_ratios(H100_COLOCATION, n) for n in ("valve", "time-slicing", "mps")}
    h200 = colocation_ratios(H200_COLOCATION, "valve")
    va, ts, mps = h100["valve"], h100["time-slicing"], h100["mps"]
    for figure in (f"TPOT p50 x{va['tpot_p50']:.2f} and p99 x{va['tpot_p99']:.2f}",
                   f"against x{ts['tpot_p50']:.2f}/x{ts['tpot_p99']:.2f} for time-slicing and "
                   f"x{mps['tpot_p50']:.2f}/x{mps['tpot_p99']:.2f} for MPS",
                   f"its TTFT p99 was at online-alone (x{va['ttft_p99']:.2f}) while time-slicing and MPS were at "
                   f"x{ts['ttft_p99']:.2f}",
                   f"its TTFT p99 was x{h200['ttft_p99']:.2f} and its TPOT p99 x{h200['tpot_p99']:.2f}",
                   f"x{va['ttft_p50']:.2f} against < 1.05 (time-slicing x{ts['ttft_p50']:.2f}, "
                   f"MPS x{mps['ttft_p50']:.2f})",
                   f"Valve keeps {va['offline'] * 100:.0f}% of offline-alone throughput"):
        assert figure in text, figure
    assert round(mps["ttft_p99"], 2) == round(ts["ttft_p99"], 2)
    v = result(H100_COLOCATION)["variants"]
    assert f"at {v['valve']['busy_fraction']:.0%} online busy" in text
    assert f"({v['offline-alone']['gpu_util']:.0f}% GPU utilisation alone)" in text
    gate = result("preemption_nvidia_h100_80gb_hbm3.json")["variants"]["gate"]
    assert (f"waited {gate['preempt_p50_us'] / 1e3:.2f} ms p50 and {gate['preempt_p99_us'] / 1e3:.2f} ms p99 "
            "for its first kernel") in text


def test_smoke_readme_figures():
    text = flat((RESULTS / "smoke_h200" / "README.md").read_text())
    valve_h200, valve_h100 = (colocation_ratios(n, "valve")["ttft_p99"] for n in (H200_COLOCATION, H100_COLOCATION))
    gate_h200, gate_h100 = (result(n)["variants"]["gate"]["online_p99_ratio"] for n in (
        "smoke_h200/preemption_nvidia_h200_quick.json", "preemption_nvidia_h100_80gb_hbm3.json"))
    assert (f"Valve TTFT p99 x{valve_h200:.2f} here against x{valve_h100:.2f} on the H100; "
            f"gate p99 x{gate_h200:.2f} against x{gate_h100:.2f}") in text


H100_PREEMPTION = "preemption_nvidia_h100_80gb_hbm3.json"
H200_PREEMPTION = "smoke_h200/preemption_nvidia_h200_quick.json"


def test_preemption_table_is_the_result_file():
    doc = result(H100_PREEMPTION)
    results = section("docs/preemption.md", "## Results")
    assert code_blocks(results)[0].rstrip("\n") == doc["table"].rstrip("\n")
    assert (RESULTS / H100_PREEMPTION.replace(".json", ".txt")).read_text().rstrip("\n") == doc["table"].rstrip("\n")
    assert f"(full run, {doc['wall_s']:.0f} s), one run, {doc['gpu']}" in flat(results)


def test_preemption_figures():
    doc, smoke = result(H100_PREEMPTION), result(H200_PREEMPTION)
    v, sv = doc["variants"], smoke["variants"]
    sub = doc["env"]["offline_sublayer_ms"]
    text = flat(section("docs/preemption.md", "## Results"))
    page = flat((RESULTS.parent.parent / "docs" / "preemption.md").read_text())

    def over(r: dict, base: dict, q: int) -> str:
        return f"{r[f'online_p{q}_ms'] - base[f'online_p{q}_ms']:+.2f} ms"

    def pre(name: str) -> str:
        return f"{v[name]['preempt_p50_us']:.0f} / {v[name]['preempt_p99_us']:.0f} us"

    raw = result(H100_PREEMPTION.replace(".json", "_raw.json"))["alone"]["online"]
    slow = sorted(range(len(raw["lat_ms"])), key=raw["lat_ms"].__getitem__)[-6:]

    def span(key: str, scale: float = 1.0) -> str:
        xs = [raw[key][i] * scale for i in slow]
        return f"{min(xs):.2f}-{max(xs):.2f}"

    clocks = [r["sm_mhz_p50"] for n, r in v.items() if n not in ("alone", "mps_alone")]
    gpu = [r["gpu_p50_ms"] for n, r in v.items() if n not in ("alone", "mps_alone") and not n.startswith("mps")]
    for figure in (
            f"Offline sub-layer GPU times (alone): attention block {sub['attn_block_ms']['max']:.2f} ms, MLP block "
            f"{sub['mlp_block_ms']['max']:.2f} ms, longest linear {sub['linear_ms']['max']:.2f} ms (p50 linear "
            f"{sub['linear_ms']['p50']:.2f} ms)",
            f"`gate` p99 {v['gate']['online_p99_ms']:.3f} ms vs `alone` {v['alone']['online_p99_ms']:.3f} ms "
            f"({over(v['gate'], v['alone'], 99)})",
            f"`graph_memop` {v['graph_memop']['online_p99_ms']:.3f} ms ({over(v['graph_memop'], v['alone'], 99)})",
            f"`mps_gate` misses by {doc['target']['mps_gate']['missed_by_ms']:.2f} ms "
            f"({over(v['mps_gate'], v['alone'], 99)})",
            f"`graph_spin` misses by {doc['target']['graph_spin']['missed_by_ms']:.2f} ms",
            f"{smoke['variants']['gate']['bursts']} bursts per variant",
            f"`gate` p99 {over(sv['gate'], sv['alone'], 99)} over `alone` (x{sv['gate']['online_p99_ratio']:.2f}), "
            f"`graph_memop` {over(sv['graph_memop'], sv['alone'], 99)}; p50 `gate` {over(sv['gate'], sv['alone'], 50)}",
            f"`alone`'s p99 ({v['alone']['online_p99_ms']:.2f} ms, p50 {v['alone']['online_p50_ms']:.2f} ms) is its "
            f"fourth-slowest burst of {v['alone']['bursts']}",
            f"six slowest bursts ({span('lat_ms')} ms) spent {span('preempt_us', 1e-3)} ms between arrival and the "
            f"start of their first kernel, with {span('gpu_ms')} ms of GPU time",
            f"`gate` {over(v['gate'], v['alone'], 50)}, `gate_linear` {over(v['gate_linear'], v['alone'], 50)}, "
            f"`graph_memop` {over(v['graph_memop'], v['alone'], 50)} over `alone`; `nogate` "
            f"{over(v['nogate'], v['alone'], 50)}",
            f"`gate` p50 {v['gate']['preempt_p50_us']:.0f} us / p99 {v['gate']['preempt_p99_us']:.0f} us, "
            f"`gate_linear` {pre('gate_linear').replace(' us', '')} us, `graph_memop` {pre('graph_memop')}, vs "
            f"`nogate` {pre('nogate')}",
            f"`alone`'s {v['alone']['preempt_p50_us']:.0f} us p50 / {v['alone']['preempt_p99_us']:.0f} us p99",
            f"(MLP block {sub['mlp_block_ms']['max']:.2f} ms, longest linear {sub['linear_ms']['max']:.2f} ms)",
            f"Offline throughput: {v['gate']['offline_ratio']:.2f} of offline alone with `gate`, "
            f"{v['gate_linear']['offline_ratio']:.2f} `gate_linear`, {v['graph_memop']['offline_ratio']:.2f} "
            f"`graph_memop`, {v['nogate']['offline_ratio']:.2f} `nogate`, {v['mps']['offline_ratio']:.2f} `mps`",
            f"{v['mps']['online_p50_ratio']:.1f}x slower at p50",
            f"it is back to {over(v['mps_gate'], v['alone'], 50)} p50",
            f"the SM clock is {min(clocks):.0f}-{max(clocks):.0f} MHz",
            f"(GPU time {v['alone']['gpu_p50_ms']:.2f} ms alone, {min(gpu):.2f}-{max(gpu):.2f} ms contended without MPS)"):
        assert figure in text, figure
    assert v["gate"]["preempt_p99_us"] / 1e3 > sub["mlp_block_ms"]["max"], "the page says gate's p99 is above it"
    assert raw["preempt_seen_at_once"] >= 0.99 * len(raw["lat_ms"]), "nearly always"
    assert f"full run, {doc['wall_s']:.0f} s on an H100" in page
    assert f"({v['alone']['gpu_p50_ms']:.2f} ms of GPU time p50 on the H100)" in page
    assert f"the contended variants run at {min(clocks):.0f}-{max(clocks):.0f} MHz" in page


def test_runtime_figures():
    text = flat(section("docs/runtime.md", "## Measured"))
    v, smoke = result(H100_PREEMPTION)["variants"], result(H200_PREEMPTION)["variants"]

    def pq(name: str) -> str:
        return f"x{v[name]['online_p50_ratio']:.2f}/x{v[name]['online_p99_ratio']:.2f}"

    assert (f"one run of {v['gate']['bursts']} bursts per variant (docs/preemption.md): online burst p50/p99 "
            f"{pq('gate')} of alone with the gate, {pq('nogate')} without, {pq('mps')} under MPS; arrival to the "
            f"first online kernel {v['gate']['preempt_p50_us'] / 1e3:.2f}/{v['gate']['preempt_p99_us'] / 1e3:.2f} ms "
            f"with the gate; offline x{v['gate']['offline_ratio']:.2f} of alone with the gate, "
            f"x{v['nogate']['offline_ratio']:.2f} without. The H200 smoke run ({smoke['gate']['bursts']} bursts) gave "
            f"gate p99 x{smoke['gate']['online_p99_ratio']:.2f}") in text
    demo = result("demo_seed0.json")
    rows = {r["variant"]: r for r in demo["rows"]}

    def ratios(name: str) -> str:
        r = rows[name]
        return (f"x{r['ttft_p50_ratio']:.2f}/x{r['ttft_p99_ratio']:.2f}, x{r['tpot_p50_ratio']:.2f}/"
                f"x{r['tpot_p99_ratio']:.2f}, x{r['offline_ratio']:.2f}")

    assert list(rows) == ["online-alone", "offline-alone", "time-slicing", "valve"]
    assert (f"`valve demo --seconds {demo['seconds']:g} --seed {demo['seed']} --json bench/results/demo_seed0.json`, "
            f"{demo['workload']['rate_per_s']:g} online requests/s") in text and demo["gpus"] == 1
    assert (f"time-slicing {ratios('time-slicing')}; valve {ratios('valve')}, {rows['valve']['preemptions']} "
            f"preemptions, preemption p99 {rows['valve']['preempt_latency_p99_ms']:.2f} ms") in text


H100_RECLAIM = "reclaim_nvidia_h100_80gb_hbm3.json"
H200_RECLAIM = "smoke_h200/reclaim_nvidia_h200.json"
POLICY_ROWS = {"alone": "alone", "capacity only": "capacity_only", "fifo": "fifo", "selective": "selective",
               "fifo, engine preempts newest": "fifo_engine_newest",
               "selective, engine preempts newest": "selective_engine_newest"}


def test_memory_tables():
    doc = result(H100_RECLAIM)
    latency, policies = tables(section("docs/memory.md", "## Measured (H100 80GB HBM3, driver 580.159.04, torch 2.11 "
                                       "cu130; `bench/results/reclaim_nvidia_h100_80gb_hbm3.*`)"))
    assert latency[1:] == [[f"{r['size_gib']:g}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                            f"{r['copied_gib_mean']:.2f}", f"{r['unmap_calls_mean']:.0f}"] for r in doc["latency"]]
    assert {r["reps"] for r in doc["latency"]} == {20} and not doc["settings"]["batch_unmap"]
    p = doc["policies"]
    rows = []
    for label, name in POLICY_ROWS.items():
        r = p[name]
        rec = r["recomputed_tokens"]
        rows.append([label, f"{r['tokens_per_s']:.0f}", "-" if name == "alone" else f"{r['loss'] * 100:.1f} %",
                     "-" if name == "alone" else ("0" if name == "capacity_only" else f"{r['eviction_loss'] * 100:.1f} %"),
                     str(r["evictions"]), str(r["engine_preemptions"]), "0" if not rec else f"{rec / 1e6:.2f} M"])
    assert policies[1:] == rows


def test_memory_figures():
    doc, smoke = result(H100_RECLAIM), result(H200_RECLAIM)
    page = flat((RESULTS.parent.parent / "docs" / "memory.md").read_text())
    drv = {d["chunk_mib"]: d for d in doc["driver_costs"]}
    sweep = {(r["chunk_mib"], r["batch_unmap"]): r for r in doc["sweep"]}
    lat8 = next(r for r in doc["latency"] if r["size_gib"] == 8)
    p, sp = doc["policies"], smoke["policies"]

    def unmap(mib: float) -> str:
        d = drv[mib]
        return f"{d['unmap_ms_per_chunk']:.1f} ms in {mib:g} MiB{' chunks' if mib == 2 else ''} " \
               f"({d['unmap_ms_per_chunk'] / d['chunks'] * 1e3:.0f} us"

    saved = {m: 1 - d["unmap_ms_batched"] / d["unmap_ms_per_chunk"] for m, d in drv.items()}
    small = [v for m, v in saved.items() if m <= 256]
    by_chunk = [f"{m:g} MiB {sweep[m, False]['p50_ms']:.1f} / {sweep[m, False]['p99_ms']:.1f}"
                for m in (32, 64, 128, 256, 512)]
    by_chunk[0] += " ms (p50 / p99)"
    handed = [f"{h['size_gib']:g}" for h in doc["handover"] if h["ok"]]
    share = [r["engine_preemptions"] / (r["engine_preemptions"] + r["evictions"]) for n, r in p.items()
             if isinstance(r, dict) and r.get("online") and r["recomputed_tokens"]]
    for figure in (
            f"unmapping 8 GiB took {unmap(2)} a chunk), {unmap(32)}), {unmap(128)})",
            f"8 GiB reclaim p50 {sweep[32, False]['p50_ms']:.2f} ms at 32 MiB, {sweep[128, False]['p50_ms']:.2f} ms at "
            f"128 MiB in the chunk sweep and {lat8['p50_ms']:.2f} ms in the latency part",
            f"compaction copies more ({sweep[128, False]['copied_gib_mean']:.2f} GiB instead of "
            f"{sweep[32, False]['copied_gib_mean']:.2f} GiB",
            f"map slower ({drv[256]['map_ms_per_chunk']:.1f}-{drv[512]['map_ms_per_chunk']:.1f} ms per 8 GiB against "
            f"{drv[128]['map_ms_per_chunk']:.1f} ms) and release no faster (reclaim p50 "
            f"{sweep[256, False]['p50_ms']:.2f} and {sweep[512, False]['p50_ms']:.2f} ms)",
            f"the copy phase is {sweep[128, False]['phases_p50_ms']['copy']:.2f} ms p50 for "
            f"{sweep[128, False]['copied_gib_mean']:.2f} GiB",
            f"It saved {min(small) * 100:.0f}-{max(small) * 100:.0f} % of the unmap time up to 256 MiB chunks and "
            f"{saved[512] * 100:.0f} % at 512 MiB",
            f"slower at 128 MiB (p50 {sweep[128, True]['p50_ms']:.2f} against {sweep[128, False]['p50_ms']:.2f} ms)",
            "8 GiB by chunk size (10 reps, per-chunk unmap): " + ", ".join(by_chunk),
            f"was {lat8['p50_ms']:.2f} ms in the latency part and {sweep[128, False]['p50_ms']:.2f} ms in the sweep "
            f"(unmap phase p50 {lat8['phases_p50_ms']['unmap']:.2f} against "
            f"{sweep[128, False]['phases_p50_ms']['unmap']:.2f} ms)",
            f"Target (< 20 ms p99 for 8 GiB): {'met' if lat8['p99_ms'] < 20 else 'missed'}.",
            f"after reclaiming {', '.join(handed[:-1])} and {handed[-1]} GiB another process allocated exactly the "
            "released bytes",
            f"(`--quick`, {smoke['settings']['reps']} reps, `bench/results/smoke_h200/reclaim_nvidia_h200.json`): "
            "8 GiB p50 / p99 " + next(f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms" for r in smoke["latency"]
                                       if r["size_gib"] == 8),
            f"one run, {doc['settings']['trace_seconds']:g} s, seed {doc['settings']['seed']}",
            f"Selective cuts the throughput loss by {p['selective_cut_vs_fifo'] * 100:.1f} % versus FIFO (the eviction "
            f"part by {p['selective_eviction_cut_vs_fifo'] * 100:.1f} %)",
            f"and by {p['selective_cut_vs_fifo_engine_newest'] * 100:.1f} % "
            f"({p['selective_eviction_cut_vs_fifo_engine_newest'] * 100:.1f} %) when the engine keeps",
            f"(`--quick`, a {smoke['settings']['trace_seconds']:g} s trace): {sp['selective_cut_vs_fifo'] * 100:.1f} % "
            f"and {sp['selective_cut_vs_fifo_engine_newest'] * 100:.1f} %",
            f"Most of the loss ({p['capacity_only']['loss'] * 100:.1f} points) is capacity",
            f"selective saves only {(1 - p['selective']['recomputed_reclaim'] / p['fifo']['recomputed_reclaim']) * 100:.0f}"
            f" % of the recompute ({p['selective']['recomputed_reclaim'] / 1e6:.2f} M vs "
            f"{p['fifo']['recomputed_reclaim'] / 1e6:.2f} M tokens)",
            f"({p['fifo']['engine_preemptions']}-{p['selective']['engine_preemptions']} engine preemptions",
            f"where selective gains only {p['selective_cut_vs_fifo_engine_newest'] * 100:.1f} %",
            f"in the model below {min(share) * 100:.0f}-{max(share) * 100:.0f} % of the evictions"):
        assert figure in page, figure
    assert doc["settings"]["trace"]["block_tokens"] == 16 and doc["settings"]["live_fraction"] == 0.25


def test_device_plugin_smoke_run():
    doc = result("device_plugin_nvidia-h100-80gb-hbm3.json")
    log = (RESULTS / "device_plugin_nvidia-h100-80gb-hbm3.txt").read_text()
    text = flat(section("docs/device_plugin.md", "## GPU smoke run"))
    gpu = doc["gpus"][0]
    stop = float(log.split("== stop: ", 1)[1].split(" s", 1)[0])
    assert doc["settings"]["quick"] and len(doc["gpus"]) == 1 and doc["bad_id"] == "INVALID_ARGUMENT"
    for figure in (f"driver {doc['driver']}, NVML " + log.split("NVML ", 1)[1].split()[0],
                   f"NVML found `{gpu['name']}`", f"`{gpu['uuid'][:13]}…`",
                   f"{gpu['memory_bytes']:,} B ({gpu['memory_bytes'] / 2**30:.1f} GiB), PCI `{gpu['pci_bus_id']}`",
                   f"both resources registered {doc['registration_s']:.3f} s after start",
                   f"both resources re-registered in {doc['reregistration_s']:.3f} s", f"stop took {stop:.1f} s",
                   "left only `kubelet.sock`"):
        assert figure in text, figure
    assert doc["left_after_stop"] == ["kubelet.sock"] and gpu["numa_node"] is None


def multigpu_spread(doc: dict, phase: str) -> str:
    """p50 and p99 ratios to each GPU's alone, as min-max over the GPUs: `x0.72-1.04/x0.87-1.01`."""
    out = []
    for q in (50, 99):
        rs = [r["phases"][phase][f"p{q}_ratio"] for r in doc["rows"]]
        out.append(f"x{min(rs):.2f}-{max(rs):.2f}" if len(rs) > 1 else f"x{rs[0]:.2f}")
    return "/".join(out)


def test_multigpu_run():
    doc = result("multigpu_h200x4.json")
    text = flat(section("docs/device_plugin.md", "## Multi-GPU node run"))
    block = code_blocks(section("docs/device_plugin.md", "## Multi-GPU node run"))[0]
    table = (RESULTS / "multigpu_h200x4.txt").read_text().splitlines()[1:]
    assert [ln.rstrip() for ln in block.splitlines()] == [ln.rstrip() for ln in table]
    n = [ph["n"] for r in doc["rows"] for ph in r["phases"].values()]
    off = doc["offline"].values()
    gate, nogate = [o["gate_ratio"] for o in off], [o["nogate_ratio"] for o in off]
    worst = max(doc["rows"], key=lambda r: r["phases"]["gate-one"]["p50_ratio"])
    ph = worst["phases"]
    one = result("preemption_nvidia_h100_80gb_hbm3.json")["variants"]["gate"]
    assert all(w["uuid_match"] for w in doc["workers"].values()) and doc["cross_talk"] == []
    for figure in (f"Measured on {doc['n_gpus']} x H200", "`python3 bench/multigpu.py`, one run, "
                   f"{doc['settings']['seconds']:g} s per phase ({min(n)}-{max(n)} bursts per GPU and phase)",
                   f"gate {multigpu_spread(doc, 'gate')}, nogate {multigpu_spread(doc, 'nogate')}",
                   f"(gate-one) {multigpu_spread(doc, 'gate-one')}",
                   f"(alone-all) {multigpu_spread(doc, 'alone-all')}",
                   f"Offline kept x{min(gate):.2f}-{max(gate):.2f} of alone with the gate, "
                   f"x{min(nogate):.2f}-{max(nogate):.2f} without",
                   f"gave gate x{one['online_p50_ratio']:.2f}/x{one['online_p99_ratio']:.2f}",
                   f"On GPU {worst['index']} the online p50 was x{ph['alone-all']['p50_ratio']:.2f} of alone with every "
                   f"GPU's online running (alone-all), x{ph['gate-one']['p50_ratio']:.2f} with only its own pair gated "
                   f"(gate-one) and x{ph['gate']['p50_ratio']:.2f} with every pair gated"):
        assert figure in text, figure
    smoke = result("smoke_h200/multigpu_h200x1.json")
    sim = result("multigpu_simx8.json")
    so = next(iter(smoke["offline"].values()))
    assert smoke["settings"]["quick_one"] is True or smoke["n_gpus"] == 1
    for figure in (f"{smoke['settings']['seconds']:g} s per phase",
                   f"gate {multigpu_spread(smoke, 'gate')}, nogate {multigpu_spread(smoke, 'nogate')}, offline with "
                   f"the gate x{so['gate_ratio']:.2f}",
                   f"(`--sim --gpus {sim['n_gpus']}`, {sim['settings']['seconds']:g} s per phase",
                   f"gate {multigpu_spread(sim, 'gate')} on all eight GPUs, no gate {multigpu_spread(sim, 'nogate')}"):
        assert figure in text, figure


def test_multigpu_rerun_with_the_settled_check():
    doc = result("multigpu_h200x2.json")
    before = result("multigpu_h200x2_before_warmup/multigpu_h200x2.json")
    text = flat(section("docs/device_plugin.md", "## Multi-GPU node run"))
    assert doc["cross_talk"] == [] and all(w["uuid_match"] for w in doc["workers"].values())
    per_phase = {u: sum(doc["preemptions"][p][u] for p in doc["phases"]) for u in doc["uuids"]}
    assert per_phase == {u: doc["control"][u]["preemptions"] for u in doc["uuids"]}
    n = [ph["n"] for r in doc["rows"] for ph in r["phases"].values()]
    off, off4 = doc["offline"].values(), result("multigpu_h200x4.json")["offline"].values()
    gate, nogate = [o["gate_ratio"] for o in off], [o["nogate_ratio"] for o in off]
    alone = [r["phases"]["alone"]["p50_ms"] for r in doc["rows"]]
    warm = [w["gated_warmup_s"] for w in doc["workers"].values() if "gated_warmup_s" in w]
    rates = lambda d: [o["alone_sublayers_per_s"] for o in d]  # noqa: E731
    old = [o[k] for o in before["offline"].values() for k in ("gate_ratio", "nogate_ratio")]
    for figure in (f"{doc['n_gpus']} x H200 (`python3 bench/multigpu.py`, one run, {doc['settings']['seconds']:g} s "
                   f"per phase, {min(n)}-{max(n)} bursts per GPU and phase",
                   f"({' and '.join(str(per_phase[u]) for u in doc['uuids'])})",
                   f"gate {multigpu_spread(doc, 'gate')}, nogate {multigpu_spread(doc, 'nogate')}",
                   f"gate-one {multigpu_spread(doc, 'gate-one')}, alone-all {multigpu_spread(doc, 'alone-all')}",
                   f"offline kept x{min(gate):.2f}-{max(gate):.2f} of alone with the gate, "
                   f"x{min(nogate):.2f}-{max(nogate):.2f} without",
                   f"(p50 {alone[0]:.2f} ms against {alone[1]:.2f} ms on GPU 1)",
                   f"took {min(warm):.1f}-{max(warm):.1f} s",
                   f"read {min(rates(before['offline'].values())):.0f}-{max(rates(before['offline'].values())):.0f} "
                   f"sub-layers/s and the offline ratios x{min(old):.2f}-{max(old):.2f}",
                   f"offline-alone then read {min(rates(off)):.0f}-{max(rates(off)):.0f} sub-layers/s, as on four "
                   f"GPUs ({min(rates(off4)):.0f}-{max(rates(off4)):.0f})"):
        assert figure in text, figure
    assert len(warm) == doc["n_gpus"] and "gated_warmup_s" not in next(iter(before["workers"].values()))


def test_operator_scale_table():
    doc = result("operator_scale.json")
    text = section("docs/operator.md", "### Many pairs at once (kmock)")
    (table,) = tables(text)
    rows = [[str(r["pairs"]) + (" (restart)" if "restart" in r else ""), str(r["nodes"]), f"{r['seconds']:.3g}",
             f"{r['pairs_per_s']:.1f}", f"{r['requests_per_pair']:.2f}", str(r["degraded"]), str(r["split_pairs"]),
             f"{r['operator_cpu_s']:.3g} s", f"{r['operator_cpu_ms_per_pair']:.1f}", f"{r['harness_cpu_s']:.3g} s"]
            for r in doc["runs"]]
    assert table[1:] == rows
    text = flat(text)
    plain = [r for r in doc["runs"] if "restart" not in r]
    first, last = plain[0], plain[-1]
    for r in doc["runs"]:
        if "restart" in r:
            x = r["restart"]
            for figure in (f"{x['done_at_restart']} of {r['pairs']} pairs done",
                           f"all done {x['seconds_to_all_done']:.3g} s after the restart",
                           f"{x['pod_creates_refused_409']} pod creates refused with 409"):
                assert figure in text, figure
    kopf = {sum(n for k, n in r["requests_by_kind"].items() if k.startswith("GET")) for r in plain}
    per_pair = {r["requests_by_kind"][k] / r["pairs"] for r in plain
                for k in ("POST pods", "PATCH colocationpairs/status", "POST events")}
    loads = {round(r["loadavg_before"][0], 1) for r in doc["runs"]}
    for figure in (f"`{doc['command']}` writes", f"({doc['machine']['cpus']} cores, load average "
                   f"{min(loads):g} to {max(loads):g} from other work", f"plus kopf's {next(iter(kopf))} discovery",
                   f"({first['operator_cpu_ms_per_pair']:.1f} → {last['operator_cpu_ms_per_pair']:.1f} ms from "
                   f"{first['pairs']} to {last['pairs']})"):
        assert figure in text, figure
    assert {round(x, 2) for x in per_pair} == {2.0} and len(kopf) == 1  # a coalesced status write may add one


def test_simulate_calibration_table():
    from valve.simulate import calibration

    cal = calibration.load()
    text = section("docs/simulate.md", "## Calibration: every variant from measurements")
    (table,) = tables(text)
    points = cal.as_dict()["points"]
    assert table[1:] == [[label, f"{p['online_load']:.3f}", f"x{p['ttft_p99_ratio']:.3f}", f"x{p['tpot_p99_ratio']:.3f}",
                          f"x{p['offline_ratio']:.3f}"] for name, label in (("time-slicing", "time-slicing"),
                                                                             ("mps", "MPS"), ("valve", "Valve"))
                         for p in points[name]]
    text = flat(text)
    names = ("time-slicing", "mps", "valve")
    h100 = {n: colocation_ratios(H100_COLOCATION, n) for n in names}
    h200 = {n: colocation_ratios(H200_COLOCATION, n) for n in names}

    def three(r: dict, key: str) -> str:
        return " / ".join(f"x{r[n][key]:.2f}" for n in names)

    worse_of = max(max(p["ttft_p99_ratio"], p["tpot_p99_ratio"]) / min(p["ttft_p99_ratio"], p["tpot_p99_ratio"])
                   for ps in points.values() for p in ps)
    for figure in (f"TTFT {three(h100, 'ttft_p50')} and TPOT {three(h100, 'tpot_p50')} (time-slicing",
                   f"one run of {len(result(H100_COLOCATION)['variants']['valve']['ttft_ms'])} requests per variant",
                   f"({len(result(H200_COLOCATION)['variants']['valve']['ttft_ms'])} requests per variant",
                   f"TTFT p99 {three(h200, 'ttft_p99')} and TPOT p99 {three(h200, 'tpot_p99')}",
                   f"the worse-of ratio is within {(worse_of - 1) * 100:.1f}% of the other one",
                   f"the model gives the measured x{points['valve'][0]['offline_ratio']:.3f}",
                   f"offline job alone used {result(H100_COLOCATION)['variants']['offline-alone']['gpu_util']:.0f}% of "
                   "the GPU"):
        assert figure in text, figure


def test_simulate_default_run_and_sweep():
    import io

    from rich.console import Console

    from valve.simulate.report import results_table

    res, sweep = result("cluster_default.json"), result("cluster_default_sweep.json")
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(results_table(res))
    text = section("docs/simulate.md", "## Default run")
    assert code_blocks(text)[0] == console.file.getvalue()
    today = {n: s["today"]["online_slo_violation_pct"] for n, s in res["strategies"].items()}
    text = flat(text)
    for figure in (f"on a loaded 2-core machine: {res['wall_seconds']:.2f} s",
                   f"MPS put {today['time_slicing']:.1f}% and {today['mps']:.1f}% of online requests over the SLO, "
                   f"Valve {today['valve']:.2f}%"):
        assert figure in text, figure
    text = section("docs/simulate.md", "## Sensitivity sweep")
    assert f"`valve simulate cluster --sweep --out bench/results`: {sweep['wall_seconds']:.2f} s" in flat(text)
    names = ("time_slicing", "mps", "valve")
    rows = [["baseline", *(f"{sweep['baseline'][n]['gpus_saved_pct']:.1f}" for n in names)]]
    rows += [[f"`{r['name']}` [{r['low']:g}, {r['high']:g}]", *(
        f"{r['at_low'][n]['gpus_saved_pct']:.1f} / {r['at_high'][n]['gpus_saved_pct']:.1f}" for n in names)]
        for r in sweep["tornado"]]
    assert tables(text)[0][1:] == rows


def test_simulate_request_cost_is_the_h100_run():
    from valve.simulate import traces

    doc = result(H100_COLOCATION)
    tpot = percentile(doc["variants"]["online-alone"]["tpot_ms"], 50)
    service = doc["calibration"]["service_s"]
    s = doc["settings"]
    assert round(traces.DECODE_S_PER_TOKEN * 1e3, 2) == round(tpot, 2)
    assert abs(traces.PREFILL_S_PER_TOKEN - (service - s["output_mean"] * traces.DECODE_S_PER_TOKEN)
               / s["prompt_mean"]) < 1e-6
    text = flat(section("docs/simulate.md", "## Traces"))
    assert (f"prompt tokens × {traces.PREFILL_S_PER_TOKEN * 1e3:.3f} ms + output tokens × {tpot:.2f} ms (llama-1b "
            f"alone on the H100: TPOT p50, and the rest of the measured {service:.3f} s per request)") in text


ENGINE_RESULT = "engine_nvidia_h200.json"
QUICK_RUNS = [("ours", "llama-1b", "colocation_h200_ours_llama-1b.json"),
              ("ours", "llama-8b", "colocation_h200_ours_llama-8b.json"),
              ("transformers", "llama-1b", "colocation_h200_transformers-llama_llama-1b.json")]


def span(values, digits: int) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def test_engine_gpu_bound_table_and_figures():
    from bench.engine import table_text

    doc = result(ENGINE_RESULT)
    text = section("docs/engine.md", "## Is the engine GPU-bound? (`bench/engine.py`)")
    (table,) = tables(text)
    assert table == tables(table_text(doc))[0]
    assert (RESULTS / "engine_nvidia_h200.txt").read_text().strip() == table_text(doc).strip()
    runs = doc["runs"]
    util = [r["offline"]["gpu_util"] for r in runs]
    ttft = [r["online"]["ttft_ms_p50"] / r["online"]["prefill_gpu_ms"] for r in runs]
    tpot = [d["tpot_over_gpu"] for r in runs for d in r["online"]["decode"] if d["batch"] in (1, 32)]
    window = [r["offline"]["mfu_measured_peak"] for r in runs]
    prefill = [r["prefill"]["mfu_measured_peak"] for r in runs]
    flat_text = flat(text)
    assert f"utilisation {span(util, 0)}%" in flat_text
    assert f"TTFT {span(ttft, 2)}x and TPOT {span(tpot, 2)}x of the GPU time" in flat_text
    assert min(util) >= 85 and max(ttft) <= 1.5 and max(tpot) <= 1.3  # "every engine and shape meets the targets"
    assert f"MFU is low ({span(window, 2)})" in flat_text and f"prefill steps alone reach {span(prefill, 2)}" in flat_text
    assert f"bf16 GEMM rate: {doc['gemm_tflops_measured']:.0f} TFLOP/s" in flat_text
    errs = [r["check"]["max_rel_err"] for r in runs]
    assert f"relative error of the last logits {span(errs, 3)}" in flat_text
    assert all(r["check"]["last_token_agrees"] for r in runs)
    ours_1b = next(r for r in runs if (r["engine"], r["model"]) == ("ours", "llama-1b"))
    http = result(QUICK_RUNS[0][2])["variants"]["online-alone"]["ttft_ms"]
    assert (f"TTFT p50 of the same 1B shape was {percentile(http, 50):.1f} ms over HTTP against "
            f"{ours_1b['online']['ttft_ms_p50']:.1f} ms here") in flat_text


def test_engine_quick_colocation_runs():
    text = section("docs/engine.md", "### Quick runs with the GPU-bound engine")
    (table,) = tables(text)
    want, by = [], {}
    for engine, model, name in QUICK_RUNS:
        doc = result(name)
        assert (doc["settings"]["engine"], doc["settings"]["online_model"], doc["settings"]["seconds"]) == (
            engine, model, 15.0)
        t = doc["tenants"]
        for variant in ("time-slicing", "mps", "valve"):
            r = colocation_ratios(name, variant)
            by.setdefault(variant, []).append(r)
            want.append([engine, model, LABELS[variant], str(len(doc["variants"][variant]["ttft_ms"])),
                         *(f"x{r[k]:.2f}" for k in ("ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "offline")),
                         f"{t['online']['gpu_util']:.0f}%, {t['online']['host_share']:.2f}",
                         f"{t['offline']['gpu_util']:.0f}%, {t['offline']['host_share']:.2f}"])
    assert table[1:] == want
    flat_text = flat(text)
    ts, mps, valve = by["time-slicing"], by["mps"], by["valve"]
    assert (f"TTFT p50 x{span([r['ttft_p50'] for r in ts], 1)} and x{span([r['ttft_p50'] for r in mps], 1)}, "
            f"TPOT p50 x{span([r['tpot_p50'] for r in ts], 1)} and x{span([r['tpot_p50'] for r in mps], 1)}") in flat_text
    assert f"x{span([r[k] for r in valve for k in ('ttft_p50', 'tpot_p50')], 2)} of online-alone" in flat_text
    assert f"x{span([r['offline'] for r in valve], 2)} of offline-alone" in flat_text
    offline_util = [result(n)["tenants"]["offline"]["gpu_util"] for *_, n in QUICK_RUNS]
    assert f"offline alone {span(offline_util, 0)}% GPU utilisation" in flat_text
    busy = [100 * result(n)["tenants"]["online"]["busy_fraction"] for *_, n in QUICK_RUNS]
    assert f"at {span(busy, 0)}% online busy" in flat_text
    n = [len(result(name)["variants"]["valve"]["ttft_ms"]) for *_, name in QUICK_RUNS]
    assert f"{min(n)} to {max(n)} online requests per variant" in flat_text


BREAKDOWN = "breakdown_h200/colocation_h200_ours_llama-1b.json"


def test_ttft_breakdown_table():
    from bench.colocation_report import PARTS

    doc = result(BREAKDOWN)
    s, bd = doc["settings"], doc["breakdown"]
    text = section("docs/engine.md", "### Where the time to first token goes")
    assert (f"`python3 bench/colocation.py --quick --seconds {s['seconds']:g} --model {s['online_model']} "
            f"--engine {s['engine']}`") in flat(text)
    (table,) = tables(text)
    assert table[0][3:-2] == list(PARTS)
    want = []
    for name in ("online-alone", "time-slicing", "mps", "valve"):
        b = bd[name]
        parts = [f"{b['mean_ms'][p]:.2f}" if name == "online-alone" else f"{b['extra_vs_alone_ms'][p]:+.2f}"
                 for p in PARTS]
        want.append([LABELS[name], str(b["n"]), f"{b['mean_ms']['ttft']:.2f}", *parts,
                     f"{b['sm_mhz_arrival']:.0f}", f"{b['power_w_mean']:.0f}"])
    assert table[1:] == want
    text = flat(text)
    assert f"+{bd['mps']['extra_vs_alone_ms']['gpu']:.1f} ms, and requests queue" in text
    assert f"ones, +{bd['mps']['extra_vs_alone_ms']['queue']:.1f} ms) or with the offline" in text
    assert f"time slices (+{bd['time-slicing']['extra_vs_alone_ms']['gpu']:.1f} ms)" in text
    v = bd["valve"]["extra_vs_alone_ms"]
    assert f"GPU part grew {v['gpu']:.2f} ms and entering the signal {v['signal']:.2f} ms" in text
    mhz = {round(b["sm_mhz_arrival"]) for b in bd.values()} | {round(b["sm_mhz_mean"]) for b in bd.values()}
    assert mhz == {doc["env"]["clocks_max_mhz"]["sm"]} and f"at its {mhz.pop()} MHz maximum" in text
    assert (f"board power {bd['online-alone']['power_w_mean']:.0f} W alone, up to "
            f"{max(b['power_w_mean'] for b in bd.values()):.0f} W with MPS") in text
    assert f"{bd['valve']['n']} requests and one run" in text
    assert min(bd[n]["mean_ms"]["gpu_wait"] for n in bd) > -0.1  # the clock mapping's error, as the page says


RECORD_RUNS = ("colocation_h200_ours_llama-1b_3x.json", "colocation_h200_ours_llama-8b_3x.json")


def record_rows(name: str) -> dict[str, dict]:
    """The run's summary rows recomputed from its raw samples (each repeat's rows, then their median)."""
    from bench.colocation_report import rows, summarize

    doc = result(name)
    reps = doc.get("repeats") or [doc["variants"]]
    got = summarize([rows(v) for v in reps]) if "repeats" in doc else rows(reps[0])
    return {r["variant"]: r for r in got}


def record_cell(row: dict, key: str, pct: bool = False) -> str:
    def fmt(v: float) -> str:
        return f"{v * 100:.0f}%" if pct else f"x{v:.2f}"

    spread = (row.get("spread") or {}).get(key)
    more = f" ({fmt(spread[0])}-{fmt(spread[1])})" if spread and spread[0] != spread[1] else ""
    return fmt(row[key]) + more


def record_tables() -> tuple[list[list[str]], list[list[str]]]:
    alone, table = [], []
    for name in RECORD_RUNS:
        model, by = result(name)["settings"]["online_model"], record_rows(name)
        on, off = by["online-alone"], by["offline-alone"]
        alone.append([model, f"{on['ttft_p50_ms']:.1f} / {on['ttft_p99_ms']:.1f}",
                      f"{on['tpot_p50_ms']:.2f} / {on['tpot_p99_ms']:.2f}", f"{on['busy_fraction'] * 100:.0f}%",
                      f"{off['offline_tokens_per_s']:,.0f}", f"{off['gpu_util']:.0f}%"])
        for v in ("time-slicing", "mps", "valve"):
            r = by[v]
            table.append([model, LABELS[v], str(r.get("repeats", 1)), str(r["requests"]),
                          *(record_cell(r, k) for k in ("ttft_p50_ratio", "ttft_p99_ratio", "tpot_p50_ratio",
                                                         "tpot_p99_ratio", "offline_ratio")),
                          record_cell(r, "harvest", pct=True)])
    return alone, table


def record_figures() -> dict[str, str]:
    """The page's figures in its text, by placeholder name."""
    small, large = (record_rows(n) for n in RECORD_RUNS)
    doc, doc8 = (result(n) for n in RECORD_RUNS)
    third, third8 = ({r["variant"]: r for r in d["repeat_rows"][2]}["valve"] for d in (doc, doc8))
    x = lambda v: f"x{v:.2f}"  # noqa: E731
    pct = lambda v: f"{v * 100:.0f}%"  # noqa: E731
    v, v8 = small["valve"], large["valve"]
    return {
        "VT50": x(v["ttft_p50_ratio"]), "VT99": x(v["ttft_p99_ratio"]), "VP50": x(v["tpot_p50_ratio"]),
        "VP99": x(v["tpot_p99_ratio"]), "VH": pct(v["harvest"]),
        "V8T50": x(v8["ttft_p50_ratio"]), "V8T99": x(v8["ttft_p99_ratio"]), "V8P50": x(v8["tpot_p50_ratio"]),
        "V8P99": x(v8["tpot_p99_ratio"]), "V8H": pct(v8["harvest"]),
        "R3T50": x(third["ttft_p50_ratio"]), "R3T99": x(third["ttft_p99_ratio"]), "R3P99": x(third["tpot_p99_ratio"]),
        "R83T99": x(third8["ttft_p99_ratio"]), "R83P99": x(third8["tpot_p99_ratio"]),
        "TS50": x(small["time-slicing"]["ttft_p50_ratio"]), "MPS50": x(small["mps"]["ttft_p50_ratio"]),
        "ALONEBUSY": pct(small["online-alone"]["busy_fraction"]), "TSBUSY": pct(small["time-slicing"]["busy_fraction"]),
        "MPSBUSY": pct(small["mps"]["busy_fraction"]),
        "VGPU": f"{doc['breakdown']['valve']['extra_vs_alone_ms']['gpu']:+.2f}",
        "V8GPU": f"{doc8['breakdown']['valve']['extra_vs_alone_ms']['gpu']:+.2f}",
    }


def test_colocation_runs_of_record():
    from bench.colocation_report import rows

    for name in RECORD_RUNS:  # the bench's own summary is what the raw samples give
        doc = result(name)
        stored = {r["variant"]: r for r in doc["rows"]}
        assert stored.keys() == record_rows(name).keys()
        for variant, r in record_rows(name).items():
            for k in ("ttft_p50_ratio", "ttft_p99_ratio", "tpot_p99_ratio", "harvest", "requests"):
                assert stored[variant][k] == r[k] or (r[k] != r[k] and stored[variant][k] is None), (name, variant, k)
        assert all(r["requests"] >= 300 * r.get("repeats", 1) for v, r in record_rows(name).items()
                   if v != "offline-alone")
        if "repeats" in doc:  # NaN is written as null
            nan_free = [[{k: None if x != x else x for k, x in r.items()} for r in rows(v)] for v in doc["repeats"]]
            assert nan_free == doc["repeat_rows"]
    text = section("docs/engine.md", "### Runs of record: at least 300 requests per variant, repeated")
    alone, table = tables(text)
    want_alone, want_table = record_tables()
    assert alone[1:] == want_alone and table[1:] == want_table
    flat_text = flat(text)
    f = record_figures()
    for sentence in (
        f"llama-1b (TTFT {f['VT50']}/{f['VT99']}, TPOT {f['VP50']}/{f['VP99']}, harvest {f['VH']})",
        f"For llama-8b (TTFT {f['V8T50']}/{f['V8T99']}, TPOT {f['V8P50']}/{f['V8P99']}, harvest {f['V8H']})",
        f"the third llama-8b repeat TTFT p99 {f['R83T99']} and TPOT p99 {f['R83P99']}",
        f"TTFT p50 {f['R3T50']}, TTFT p99 {f['R3T99']} and TPOT p99 {f['R3P99']}",
        f"(TTFT p50 {f['TS50']} and {f['MPS50']} for llama-1b)",
        f"rose from {f['ALONEBUSY']} alone to {f['TSBUSY']} and {f['MPSBUSY']})",
        f"({f['VGPU']} ms for llama-1b, {f['V8GPU']} ms for llama-8b against",
    ):
        assert sentence in flat_text, sentence
    docs = [result(n) for n in RECORD_RUNS]
    assert [len(d["repeats"]) for d in docs] == [3, 3]
    mhz = [f"{d['breakdown'][v]['sm_mhz_arrival']:.0f}" for d in docs for v in ("online-alone", "valve")]
    assert (f"with the mean SM clock at arrival {mhz[0]}/{mhz[1]} MHz (llama-1b, alone/Valve) and {mhz[2]}/{mhz[3]} "
            "MHz (llama-8b)") in flat_text


def test_preemption_with_the_runtimes_defaults():
    from valve.api.runtime import RuntimeSpec

    doc = result("preemption_h200_defaults/preemption_nvidia_h200_quick.json")
    assert doc["settings"]["hysteresis_ms"] == RuntimeSpec().idle_hysteresis_ms and doc["quick"]
    g, a = doc["variants"]["gate"], doc["variants"]["alone"]
    assert not doc["target"]["gate"]["within_target"]
    text = flat(section("docs/preemption.md", "## Results"))
    assert (f"`gate` p99 {g['online_p99_ms']:.2f} ms against `alone` {a['online_p99_ms']:.2f} ms "
            f"({g['online_p99_ms'] - a['online_p99_ms']:+.2f} ms, target +0.25 ms: missed), p50 "
            f"x{g['online_p50_ratio']:.2f}, offline x{g['offline_ratio']:.2f}; arrival to first online kernel "
            f"{g['preempt_p50_us'] / 1e3:.2f}/{g['preempt_p99_us'] / 1e3:.2f} ms p50/p99 (alone "
            f"{a['preempt_p50_us'] / 1e3:.2f}/{a['preempt_p99_us'] / 1e3:.2f} ms); the SM clock at burst arrival "
            f"{g['sm_mhz_p50']:.0f} MHz against {a['sm_mhz_p50']:.0f} MHz alone") in text
    assert f"{g['bursts']} bursts per variant" in text


def test_operator_scale_quiet_run():
    doc = result("operator_scale_quiet.json")
    (r,) = doc["runs"]
    text = flat(section("docs/operator.md", "### Many pairs at once (kmock)"))
    assert r["pairs"] == 2000 and r["degraded"] == 0 and r["split_pairs"] == 0 and r["seconds"] < 60
    for figure in (f"load average {r['loadavg_before'][0]:.2f} at its start",
                   f"`{doc['command']}`".replace("`", ""),
                   f"2,000 pairs done in {r['seconds']:.1f} s, {r['operator_cpu_ms_per_pair']:.1f} ms of operator CPU per "
                   f"pair, {r['requests_per_pair']:.2f} requests per pair, {r['degraded']} Degraded, "
                   f"{r['split_pairs']} split"):
        assert figure in text.replace("`", ""), figure


SWEEP_RUNS = ("tradeoff_h200/colocation_h200_ours_llama-1b_3x.json", "tradeoff_h200/colocation_h200_ours_llama-8b_3x.json")


def sweep_table() -> list[list[str]]:
    """The settings sweep's rows: each Valve variant's medians of the repeats (spread in brackets), harvest, and
    its TTFT/TPOT p99 over the repeats' requests pooled (a tail of 300, not of 100)."""
    from bench.colocation_report import pool, rows

    out = []
    for name in SWEEP_RUNS:
        doc = result(name)
        by, pooled = record_rows(name), {r["variant"]: r for r in rows(pool(doc["repeats"]))}
        for variant, r in by.items():
            if not variant.startswith("valve"):
                continue
            p = pooled[variant]
            off = doc["repeats"][0][variant]["control"]["near_online_ns"] == 0
            label = variant.partition("@")[2].replace("+", ", ") or ("defaults then (near_online off)" if off
                                                                         else "defaults")
            out.append([doc["settings"]["online_model"], label,
                        str(r["requests"]),
                        *(record_cell(r, k) for k in ("ttft_p50_ratio", "ttft_p99_ratio", "tpot_p50_ratio",
                                                       "tpot_p99_ratio")),
                        record_cell(r, "harvest", pct=True), f"x{p['ttft_p99_ratio']:.2f}", f"x{p['tpot_p99_ratio']:.2f}"])
    return out


def test_settings_sweep_table():
    for name in SWEEP_RUNS:
        doc = result(name)
        assert len(doc["repeats"]) == 3 and all(r["requests"] >= 300 for v, r in record_rows(name).items()
                                                if v != "offline-alone")
        for rep in doc["repeats"]:  # each variant's arbiter published the settings its name gives
            for variant, v in rep.items():
                if variant.startswith("valve@near_online"):
                    ctl = v["control"]
                    assert ctl["near_online_ns"] > 0 and ctl["near_online_tokens"] > 0 and v["offline_small_steps"] > 0
                elif variant.startswith("valve"):
                    assert v["control"]["near_online_ns"] == 0 and v["offline_small_steps"] == 0
    text = section("docs/engine.md", "### Settings sweep: the trade-off")
    (table,) = tables(text)
    assert table[1:] == sweep_table()


def test_settings_sweep_figures():
    from bench.colocation_report import pool, rows

    near = "valve@near_online.window_ms=200+near_online.max_batch_tokens=512"
    text = flat(section("docs/engine.md", "### Settings sweep: the trade-off"))
    small, large = (result(n) for n in SWEEP_RUNS)
    for doc in (small, large):  # "lowered TTFT p99 in each of the six repeats"
        for reps in doc["repeat_rows"]:
            by = {r["variant"]: r for r in reps}
            assert by[near]["ttft_p99_ms"] < by["valve"]["ttft_p99_ms"]
    p1, p8 = ({r["variant"]: r for r in rows(pool(d["repeats"]))} for d in (small, large))
    m1, m8 = ({r["variant"]: r for r in d["rows"]} for d in (small, large))
    x = lambda v: f"x{v:.2f}"  # noqa: E731
    pct = lambda v: f"{v * 100:.0f}%"  # noqa: E731
    alone_tpot = [[r["tpot_p99_ms"] for r in reps if r["variant"] == "online-alone"][0] for reps in
                  small["repeat_rows"]], [[r["tpot_p99_ms"] for r in reps if r["variant"] == "online-alone"][0]
                                          for reps in large["repeat_rows"]]
    tp1, tp8 = ([r["tpot_p99_ratio"] for v, r in m.items() if v.startswith("valve")] for m in (m1, m8))
    for figure in (
        f"(llama-8b pooled {x(p8['valve']['ttft_p99_ratio'])} to {x(p8[near]['ttft_p99_ratio'])}, llama-1b "
        f"{x(p1['valve']['ttft_p99_ratio'])} to {x(p1[near]['ttft_p99_ratio'])})",
        f"at the same harvest ({pct(m1[near]['harvest'])}, and {pct(m8[near]['harvest'])} against "
        f"{pct(m8['valve']['harvest'])})",
        f"no worse ({x(p1[near]['tpot_p99_ratio'])} against {x(p1['valve']['tpot_p99_ratio'])}, "
        f"{x(p8[near]['tpot_p99_ratio'])} against {x(p8['valve']['tpot_p99_ratio'])})",
        f"costs a fifth of the harvest ({pct(m1['valve@near_online.window_ms=1000+near_online.max_batch_tokens=256']['harvest'])})",
        f"({pct(m8['valve@queue_ahead=1']['harvest'])}, {pct(m8['valve@idle_hysteresis_ms=25']['harvest'])}) and left "
        f"TTFT p99 where it was ({x(m8['valve@queue_ahead=1']['ttft_p99_ratio'])}, "
        f"{x(m8['valve@idle_hysteresis_ms=25']['ttft_p99_ratio'])} against {x(m8['valve']['ttft_p99_ratio'])})",
        f"moved from {min(alone_tpot[0]):.1f} to {max(alone_tpot[0]):.1f} ms (llama-1b) and {min(alone_tpot[1]):.1f} "
        f"to {max(alone_tpot[1]):.1f} ms (llama-8b)",
        f"between {x(min(tp8 + tp1))} and {x(max(tp8 + tp1))} from setting to setting, and are {x(min(tp1))}-"
        f"{x(max(tp1))} for every llama-1b setting, where the 310-request runs of record gave "
        f"{x(record_rows(RECORD_RUNS[0])['valve']['tpot_p99_ratio'])}.",
    ):
        assert figure in text, figure
    mhz = [b["sm_mhz_arrival"] for d in (small, large) for b in d["breakdown"].values()]
    alone = {round(d["breakdown"]["online-alone"]["sm_mhz_arrival"]) for d in (small, large)}
    assert (f"The SM clock at arrival averaged {min(mhz):.0f}-{max(mhz):.0f} MHz in every variant of both sweeps "
            f"({alone.pop():.0f} MHz alone)") in text and not alone
    # the default now is the setting measured here
    from valve.api.runtime import RuntimeSpec

    d = RuntimeSpec().near_online
    assert f"valve@near_online.window_ms={d.window_ms:g}+near_online.max_batch_tokens={d.max_batch_tokens}" == near


NEAR_RECORDS = ("record_near_online_h200/colocation_h200_ours_llama-1b_3x.json",
                "record_near_online_h200/colocation_h200_ours_llama-8b_3x.json")
NEAR_OFF = "valve@near_online.window_ms=0"


def test_runs_of_record_with_near_online_on():
    from bench.colocation_report import pool, rows
    from valve.api.runtime import RuntimeSpec

    spec, table, figures, flat_alone = RuntimeSpec().near_online, [], [], []
    docs = [result(n) for n in NEAR_RECORDS]
    bys = [record_rows(n) for n in NEAR_RECORDS]
    for doc, by, old in zip(docs, bys, RECORD_RUNS, strict=True):
        st = doc["settings"]
        assert len(doc["repeats"]) == 3 and st["requests"] >= 300
        assert all(r["requests"] >= 900 for v, r in by.items() if v != "offline-alone")
        assert st["rate"] == result(old)["calibration"]["rate_per_s"] == doc["calibration"]["rate_per_s"]
        assert st["online_model"] == result(old)["settings"]["online_model"]
        for rep in doc["repeats"]:  # plain valve ran the default near_online, the other variant none
            assert rep["valve"]["control"]["near_online_ns"] == spec.window_ms * 1e6
            assert rep["valve"]["control"]["near_online_tokens"] == spec.max_batch_tokens
            assert rep["valve"]["offline_small_steps"] > 0
            assert NEAR_OFF not in rep or rep[NEAR_OFF]["control"]["near_online_ns"] == 0
        pooled = {r["variant"]: r for r in rows(pool(doc["repeats"]))}
        for v, label in (("valve", "defaults (near_online on)"), (NEAR_OFF, "near_online.window_ms=0")):
            if v not in by:
                continue
            r, p = by[v], pooled[v]
            table.append([st["online_model"], label, str(r["requests"]),
                          *(record_cell(r, k) for k in ("ttft_p50_ratio", "ttft_p99_ratio", "tpot_p50_ratio",
                                                         "tpot_p99_ratio", "offline_ratio")),
                          record_cell(r, "harvest", pct=True), f"x{p['ttft_p99_ratio']:.2f}",
                          f"x{p['tpot_p99_ratio']:.2f}"])
        v, p = by["valve"], pooled["valve"]
        assert (v["ttft_p50_ratio"] <= 1.05 and v["ttft_p99_ratio"] <= 1.05 and v["tpot_p50_ratio"] <= 1.02
                and v["tpot_p99_ratio"] <= 1.05 and v["harvest"] >= 0.85 and p["ttft_p99_ratio"] <= 1.05
                and p["tpot_p99_ratio"] <= 1.05)
        on, offa = by["online-alone"], by["offline-alone"]
        flat_alone.append(f"TTFT{' p50/p99' if not flat_alone else ''} {on['ttft_p50_ms']:.1f}/{on['ttft_p99_ms']:.1f} "
                          f"ms, TPOT {on['tpot_p50_ms']:.2f}/{on['tpot_p99_ms']:.2f} ms, busy "
                          f"{on['busy_fraction'] * 100:.0f}%, offline-alone {offa['offline_tokens_per_s']:,.0f} tok/s")
        alone = [[r for r in reps if r["variant"] == "online-alone"][0] for reps in doc["repeat_rows"]]
        figures.append(f"{st['online_model']} TTFT {min(a['ttft_p99_ms'] for a in alone):.1f}-"
                       f"{max(a['ttft_p99_ms'] for a in alone):.1f} ms, TPOT {min(a['tpot_p99_ms'] for a in alone):.1f}-"
                       f"{max(a['tpot_p99_ms'] for a in alone):.1f} ms")
        figures.append(f"--rate {st['rate']!r} --output-mean {st['output_mean']:g} --requests {st['requests']}")
    text = section("docs/engine.md", "### Runs of record with `near_online` on")
    (got,) = tables(text)
    assert got[1:] == table
    large, (b1, b8) = bys[1], (d["breakdown"] for d in docs)
    old8 = record_rows(RECORD_RUNS[1])["valve"]
    worst = [max((r for reps in d["repeat_rows"] for r in reps if r["variant"] == "valve"),
                 key=lambda r: r["ttft_p99_ratio"]) for d in docs]
    nth = [[r for reps in d["repeat_rows"] for r in reps if r["variant"] == "valve"].index(w) + 1
           for d, w in zip(docs, worst, strict=True)]
    figures += [
        f"Online-alone: llama-1b {flat_alone[0]}; llama-8b {flat_alone[1]}",
        f"missed TTFT p99 (x{old8['ttft_p99_ratio']:.3f}) and TPOT p99 (x{old8['tpot_p99_ratio']:.2f})",
        f"had TTFT p99 x{large[NEAR_OFF]['ttft_p99_ratio']:.2f} and harvest {large[NEAR_OFF]['harvest'] * 100:.0f}%",
        f"the {ORDINAL[nth[1]]} llama-8b repeat had TTFT p99 x{worst[1]['ttft_p99_ratio']:.2f}, the {ORDINAL[nth[0]]} "
        f"llama-1b repeat x{worst[0]['ttft_p99_ratio']:.2f}",
        f"({b8['valve']['extra_vs_alone_ms']['gpu']:+.2f} ms against the same request alone; "
        f"{b8[NEAR_OFF]['extra_vs_alone_ms']['gpu']:+.2f} ms with `near_online` off; for llama-1b "
        f"{b1['valve']['extra_vs_alone_ms']['gpu']:+.2f} ms)",
        f"{b8['online-alone']['sm_mhz_arrival']:.0f} MHz alone and {b8['valve']['sm_mhz_arrival']:.0f} MHz with Valve "
        f"(llama-1b {b1['valve']['sm_mhz_arrival']:.0f} MHz)",
    ]
    assert round(b1["online-alone"]["sm_mhz_arrival"]) == round(b8["online-alone"]["sm_mhz_arrival"])
    flat_text = flat(text)
    for figure in figures:
        assert figure in flat_text, figure


ORDINAL = {1: "first", 2: "second", 3: "third"}


def test_preemption_h200_at_the_standard():
    from valve.api.runtime import RuntimeSpec

    doc = result("preemption_h200/preemption_nvidia_h200.json")
    spec = RuntimeSpec()
    assert doc["settings"]["hysteresis_ms"] == spec.idle_hysteresis_ms and not doc["quick"]
    assert doc["settings"]["queue_ahead"] == spec.queue_ahead
    v, t = doc["variants"], doc["target"]
    assert {r["bursts"] for r in v.values()} == {300}
    assert [k for k, r in t.items() if r["within_target"]] == ["gate_linear"]
    text = flat(section("docs/preemption.md", "## Results"))
    a, g, gl = v["alone"], v["gate"], v["gate_linear"]
    sub = doc["env"]["offline_sublayer_ms"]
    ms = lambda r, k: f"{r[k] / 1e3:.2f}"  # noqa: E731
    for figure in (
        f"p99 {gl['online_p99_ms']:.2f} ms against `alone` {a['online_p99_ms']:.2f} ms "
        f"(+{t['gate_linear']['p99_over_alone_ms']:.2f} ms), arrival to first online kernel "
        f"{ms(gl, 'preempt_p50_us')}/{ms(gl, 'preempt_p99_us')} ms p50/p99 (alone {ms(a, 'preempt_p50_us')}/"
        f"{ms(a, 'preempt_p99_us')} ms), at offline x{gl['offline_ratio']:.2f}",
        f"`gate` misses (+{t['gate']['p99_over_alone_ms']:.2f} ms; offline x{g['offline_ratio']:.2f})",
        f"(p99 {ms(g, 'preempt_p99_us')} ms; MLP block {sub['mlp_block_ms']['max']:.2f} ms, longest linear "
        f"{sub['linear_ms']['max']:.2f} ms on this GPU)",
        f"the SM clock at arrival is {g['sm_mhz_p50']:.0f} MHz against {a['sm_mhz_p50']:.0f} MHz alone "
        f"({gl['sm_mhz_p50']:.0f} MHz under `gate_linear`",
        f"`graph_memop` +{t['graph_memop']['p99_over_alone_ms']:.2f} ms, `mps_gate` "
        f"+{t['mps_gate']['p99_over_alone_ms']:.2f} ms",
        f"(p99 x{v['mps_prio']['online_p99_ratio']:.2f} against x{v['mps']['online_p99_ratio']:.2f}, online GPU "
        f"time {v['mps_prio']['gpu_p50_ms']:.2f} against {v['mps']['gpu_p50_ms']:.2f} ms per burst)",
        f"per linear layer meets the bound at {1 - gl['offline_ratio']:.0%} of offline throughput lost, per block "
        f"loses {1 - g['offline_ratio']:.0%}",
    ):
        assert figure in text, figure
