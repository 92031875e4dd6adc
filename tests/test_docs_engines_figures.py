"""docs/engines.md's measured tables come from the committed result files."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "engines.md").read_text()
PRELOAD = json.loads((ROOT / "bench" / "results" / "preload_gate_h200_quick.json").read_text())
COMPILE = json.loads((ROOT / "bench" / "results" / "compile_gate_h200.json").read_text())
ROWS = {"eager": "PyTorch eager (cuBLAS + SDPA)", "graphs": "PyTorch replaying a CUDA graph",
        "hf": "`transformers` Llama generating"}


def row(program: str) -> str:
    p = PRELOAD["programs"][program]
    c = p["library_counters_contended"]
    return (f"| {ROWS[program]} | {p['online_nolib']['p99_ms']:.2f} ms (x{p['p99_ratio_ungated']:.2f}) "
            f"| {p['online_lib']['p99_ms']:.2f} ms (x{p['p99_ratio_gated']:.2f}) "
            f"| {p['overhead_gate_open'] * 100:+.1f}% | {c['waits']:,} / {c['launches']:,} |")


def test_the_preload_table_is_the_result_file():
    for program in ROWS:
        assert row(program) in DOC, row(program)
    eager = PRELOAD["programs"]["eager"]["preempt_excess_ms"]
    assert f"p50 {eager['p50']:.2f} ms, p99 {eager['p99']:.2f} ms" in DOC


def test_the_compile_figures_are_the_result_file():
    for mode in ("fullgraph", "cudagraphs"):
        r = COMPILE[mode]
        assert r["matches_eager"] and r["held_while_closed"] and r["completed_after_open"]
        assert f"{r['ms_gated']:.2f} ms" in DOC and f"{r['ms_ungated']:.2f} ms" in DOC
