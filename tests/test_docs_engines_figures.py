"""docs/engines.md's measured tables come from the committed result files."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "engines.md").read_text()
PRELOAD = json.loads((ROOT / "bench" / "results" / "preload_gate_h200_quick.json").read_text())
COMPILE = json.loads((ROOT / "bench" / "results" / "compile_gate_h200.json").read_text())
STANDARD = (ROOT / "bench" / "results" / "preload_gate_h200.md").read_text()  # the 3-repeat run, as printed
STANDARD_TABLE = [ln for ln in STANDARD.splitlines() if ln.startswith("| ")]
ROWS = {"eager": "PyTorch eager (cuBLAS + SDPA)", "graphs": "PyTorch replaying a CUDA graph",
        "hf": "`transformers` Llama generating"}


def online(r: dict) -> str:
    alone = PRELOAD["online_alone"]
    return (f"{r['p50_ms']:.2f}/{r['p99_ms']:.2f} ms (x{r['p50_ms'] / alone['p50_ms']:.2f}/"
            f"x{r['p99_ms'] / alone['p99_ms']:.2f})")


def row(program: str) -> str:
    p = PRELOAD["programs"][program]
    c = p["library_counters_contended"]
    unit = "steps/s" if p["unit"] == "steps" else "tok/s"
    return (f"| {ROWS[program]} | {online(p['online_nolib'])} | {online(p['online_lib'])} "
            f"| {p['online_nolib']['n']} / {p['online_lib']['n']} | {p['solo_nolib']:.1f} {unit} "
            f"| {p['solo_lib']:.1f} ({p['overhead_gate_open'] * 100:+.1f}%) "
            f"| {p['contended_nolib']:.1f} / {p['contended_lib']:.1f} | {c['waits']:,} / {c['launches']:,} |")


def test_the_preload_table_is_the_result_file():
    for program in ROWS:
        assert row(program) in DOC, row(program)
        p = PRELOAD["programs"][program]
        assert round(p["online_nolib"]["p99_ms"] / PRELOAD["online_alone"]["p99_ms"], 2) == round(
            p["p99_ratio_ungated"], 2)
        assert round(p["online_lib"]["p99_ms"] / PRELOAD["online_alone"]["p99_ms"], 2) == round(
            p["p99_ratio_gated"], 2)
    alone = PRELOAD["online_alone"]
    assert f"Online alone p50/p99 {alone['p50_ms']:.2f}/{alone['p99_ms']:.2f} ms ({alone['n']} bursts)" in DOC
    eager = PRELOAD["programs"]["eager"]["preempt_excess_ms"]
    assert f"p50 {eager['p50']:.2f} ms, p99 {eager['p99']:.2f} ms" in DOC
    n = [alone["n"]] + [p[k]["n"] for p in PRELOAD["programs"].values() for k in ("online_nolib", "online_lib")]
    assert f"{min(n)}-{max(n)} per\nvariant" in DOC and PRELOAD["seconds"] == 6
    hf = PRELOAD["programs"]["hf"]
    assert (f"x{hf['contended_nolib'] / hf['solo_nolib']:.2f} ungated and x{hf['contended_lib'] / hf['solo_lib']:.2f} "
            "gated") in " ".join(DOC.split())


def test_the_compile_figures_are_the_result_file():
    for mode in ("fullgraph", "cudagraphs"):
        r = COMPILE[mode]
        assert r["matches_eager"] and r["held_while_closed"] and r["completed_after_open"]
        assert f"{r['ms_gated']:.2f} ms" in DOC and f"{r['ms_ungated']:.2f} ms" in DOC


def test_the_standard_run_table_is_the_result_file():
    doc = DOC[DOC.index("#### Measured (H200, 3 repeats x 100 bursts per variant)"):]
    rows = [ln for ln in doc.splitlines() if ln.startswith("| ")]
    assert rows[:len(STANDARD_TABLE)] == STANDARD_TABLE and len(STANDARD_TABLE) == 25  # header and 24 variants, as printed by the bench
    assert "measurement standard (>= 300 bursts per variant, >= 3 repeats): met" in STANDARD
    assert "online alone: p50 0.588 ms, p99 0.675 ms (300 bursts" in STANDARD
    assert "Online alone p50/p99 0.588/0.675 ms (300 bursts)" in doc
    by = {tuple(c.strip() for c in ln.split("|")[1:5]): ln.split("|")[6].strip() for ln in STANDARD_TABLE[2:]}
    flat = " ".join(doc.replace("**", "").split())
    for key, words in [(("eager", "full", "0.357", "gated, every 0 us"), "falls to {} with its full-size kernels"),
                       (("eager", "2048", "0.094", "gated, every 0 us"), "x1.80 whole; x1.88 against {} at 0.094"),
                       (("eager", "128", "0.034", "gated, every 0 us"), "{} (0.034 ms)"),
                       (("eager", "full", "0.357", "gated, every 100 us"), "pacing at 100 µs made the gated p99 worse "
                                                                         "for the eager program ({} against"),
                       (("graphs", "full", "-", "gated, every 0 us"), "not helped ({} gated)")]:
        assert words.format(by[key]).lower() in flat.lower(), (key, by[key])


def test_the_median_floor_is_the_result_file():
    cells = [ln.split("|") for ln in STANDARD_TABLE[2:]]
    short = [c for c in cells if c[1].strip() == "hf" or (c[1].strip() == "eager" and c[2].strip() == "128")]
    p50 = [float(c[5].split("/")[0]) for c in short]
    assert len(p50) == 8  # eager at 128 tokens: none and gated at two paces; hf: none, open and gated at two
    alone = re.search(r"online alone: p50 ([0-9.]+) ms, p99 ([0-9.]+) ms", STANDARD)
    flat = " ".join(DOC.split())
    assert f"online p50 was {min(p50):.2f}-{max(p50):.2f} ms in every variant" in flat
    assert f"against {alone[1]} ms alone" in flat
    assert f"x1.10 of {alone[2]} ms, {1.10 * float(alone[2]):.2f} ms" in flat
