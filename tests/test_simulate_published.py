"""The fleet figures in README and docs/simulate.md are recomputed from the committed result files."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def saved(st: dict, name: str) -> str:
    r = st[name]["right_sized"]
    return f"{r['gpus_saved']:,} ({r['gpus_saved_pct']:.1f}%)"


def spread(rng: dict, name: str) -> str:
    lo, hi = rng[name]
    return f"{lo:.1f}-{hi:.1f}%"


def fleet_row_figures() -> list[str]:
    st = load("cluster_default.json")["strategies"]
    rng = load("cluster_default_sweep.json")["savings_range_pct"]
    return [f"{load('cluster_default.json')['fleet']['gpus']:,} GPUs x 24 h",
            f"time-slicing {saved(st, 'time_slicing')}", f"MPS {saved(st, 'mps')}", f"Valve {saved(st, 'valve')}",
            f"Valve {spread(rng, 'valve')}", f"time-slicing {spread(rng, 'time_slicing')}", f"MPS {spread(rng, 'mps')}"]


def test_readme_fleet_row_matches_the_committed_results():
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| fleet (simulated"))
    for figure in fleet_row_figures():
        assert figure in row, figure


def test_docs_figures_match_the_committed_results():
    doc = (ROOT / "docs" / "simulate.md").read_text()
    for figure in fleet_row_figures():
        assert figure in doc, figure
    sweep = load("cluster_default_sweep.json")
    grid = sweep["grid"]
    reach = sum(c["valve_reaches_published"] for c in grid)
    others = sum(c["others_as_good"] for c in grid)
    assert f"Valve reaches +{sweep['published_utilisation_gain_pct']}% in {reach} of {len(grid)} cells" in doc
    assert f"time-slicing or MPS save as much as Valve in {others} of {len(grid)}" in doc
    for c in grid:  # the grid table in the docs, cell by cell
        s = c["savings"]
        cells = [f"{c['online_fraction']:g}", f"{c['burst_cv']:g}", f"{c['slo']:g}", f"{s['online_busy_mean']:.2f}",
                 *(f"{s[n]['gpus_saved_pct']:.1f}" for n in ("time_slicing", "mps", "valve")),
                 f"{s['valve']['utilisation_gain_pct']:+.1f}", "yes" if c["valve_reaches_published"] else "no",
                 "yes" if c["others_as_good"] else "no"]
        assert "| " + " | ".join(cells) + " |" in doc, cells


def test_default_run_used_the_packaged_calibration_and_the_fitted_values_reproduce_it():
    from valve.simulate import calibration

    res = load("cluster_default.json")
    assert res["calibration"]["points"] == calibration.load().as_dict()["points"]
    assert res["calibration"]["file"].endswith("valve/simulate/calibration_h100.json")
