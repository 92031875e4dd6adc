"""bench/enforce.py on the CPU path (a real arbiter with /proc busy samples, numpy tenants, the host gate): a few
closures; the tenant that skips the gate is caught in each, the gated one in none."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.enforce import ROOT, main


@pytest.mark.timeout(120)
def test_the_skipping_tenant_is_caught_after_every_closure_and_the_gated_one_never(tmp_path):
    args = ["--device", "cpu", "--closures", "4", "--hold-ms", "400", "500", "--gap-ms", "150", "250",
            "--out", str(tmp_path), "--logs", str(tmp_path / "logs")]
    assert main(args) == 0
    doc = json.loads((tmp_path / "enforce_cpu.json").read_text())
    assert (tmp_path / "enforce_cpu.txt").read_text().startswith("enforce on cpu")
    s, skip, gated = doc["settings"], doc["tenants"]["skip"], doc["tenants"]["gated"]
    assert s["busy"] == "cpu" and s["closures"] == 4
    # the skipping tenant: never passed a gate, flagged once per closure, after the grace and before the reopen
    assert skip["summary"]["detected"] == skip["arbiter_violations"] == 4
    assert skip["gates_passed"] == 0 and skip["tenant_steps"] > 0
    for r in skip["records"]:
        assert r["detected"] and s["grace_ms"] <= r["detect_ms"] <= r["closed_ms"], r
        assert r["marks_while_closed"] == 0
    # the gated tenant worked between closures, held still in them (at most the gate it was passing), never flagged
    assert doc["gated_false_positives"] == gated["arbiter_violations"] == 0
    assert gated["gates_passed"] == gated["tenant_steps"] > 0
    assert all(not r["detected"] and r["marks_while_closed"] <= 1 for r in gated["records"])
    log = (tmp_path / "logs" / "arbiter-skip.log").read_text()
    assert log.count("gate violation: offline pid") == 4


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    bench = str(ROOT / "bench" / "enforce.py")
    done = subprocess.run([sys.executable, bench, "--device", "cpu", "--out", str(tmp_path / "f")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == f"enforce: --out {str(tmp_path / 'f')!r}: is a file, not a folder"
    done = subprocess.run([sys.executable, bench, "--device", "cpu", "--hold-ms", "500", "400"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().startswith("enforce: --closures at least 1")
