"""The measured figures of docs/*.md are recomputed from the result files committed under bench/results/.

Tables are rebuilt row by row with the page's rounding; figures in the text are looked up as the page writes
them. An edited figure, or one the result file does not give, fails. docs/engines.md has its own test
(test_docs_engines_figures.py), the fleet figures of docs/simulate.md theirs (test_simulate_published.py).
"""

from __future__ import annotations

from tests.support.markdown import RESULTS, result, section, tables
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
