"""docs/reliability.md's figures are the committed bench/results/chaos.json, row by row; every chaos test has
figures there."""

from __future__ import annotations

import re

from tests.support.markdown import ROOT, result, section, tables


def test_reliability_table_is_the_result_file():
    doc = result("chaos.json")
    text = section("docs/reliability.md", "## Measured")
    (table,) = tables(text)
    want = [["test", "figure", "value"]] + [[f"`{t}`", k, f"{v:g}"] for t, f in sorted(doc["tests"].items())
                                             for k, v in sorted(f.items())]
    assert table == want
    assert f"{doc['cpus']}-core CPU machine" in text and f"Python {doc['env']['python']}" in text
    assert doc["command"] == "python3 bench/chaos.py" and doc["env"]["gpu"] == "sim"


def test_every_chaos_test_recorded_figures():
    names = set()
    for path in (ROOT / "tests" / "chaos").glob("test_*.py"):
        names |= set(re.findall(r"^(?:async )?def (test_\w+)\(", path.read_text(), re.M))
    recorded = {re.sub(r"\[.*\]$", "", t) for t in result("chaos.json")["tests"]}
    assert recorded == names


def test_runtime_enforcement_figures_are_the_result_file():
    e = result("chaos.json")["tests"]["test_gate_skipping_tenant_caught_after_every_long_closure_and_a_gated_one_never"]
    text = " ".join(section("docs/runtime.md", "## Enforcement").split())
    assert (f"(grace {e['grace_ms']:g} ms, period {e['sample_period_ms']:g} ms) the chaos suite caught it "
            f"{e['detect_p50_ms']:g} ms (p50) and {e['detect_max_ms']:g} ms (max) after {e['caught']} closures, "
            f"and flagged a gated tenant in none of {e['gated_closures']}") in text
    assert e["gated_false_positives"] == 0
