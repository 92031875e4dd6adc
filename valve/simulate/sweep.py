"""Sensitivity of the right-sized savings: each assumption varied alone over a stated range (a tornado), and a
small grid of load, burstiness and SLO slack that shows where Valve reaches the published utilisation gain and
where time-slicing or MPS do as well."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

from valve.simulate import fleet, traces
from valve.simulate.calibration import Calibration

PUBLISHED_UTILISATION_GAIN_PCT = 34.6  # the production result Valve builds on (2,170 of 8,054 GPUs)
STRATEGIES = ("time_slicing", "mps", "valve")


@dataclass(frozen=True)
class Knob:
    name: str
    low: float
    high: float
    why: str  # where the range comes from
    on: str = "cal"  # "cal": a calibration field; "cfg": FleetConfig; "trace": the synthetic trace


KNOBS = (
    Knob("reclaim_recompute_s", 0.1, 5.0, "assumed: a short prefix to a long sequence recomputed per reclaim"),
    Knob("preemption_latency_s", 0.00031, 0.005, "H100 probe's gated p99 (0.31 ms) to a 5 ms sub-layer wait"),
    Knob("valve_offline_efficiency", 0.7, 1.0, "fitted 0.90 on a 1B model; 0.7 for gate waits on larger ones"),
    Knob("load_elasticity", 0.0, 1.0, "measured ratio at every load (0) to queueing-amplified slowdown (1)"),
    Knob("offline_loss_exponent", 0.5, 2.0, "time-slicing/MPS offline loss concave (0.5) to convex (2) in load"),
    Knob("slo", 2.0, 10.0, "online p99 bound, x unloaded p99", on="cfg"),
    Knob("burst_cv", 0.0, 0.5, "CV of the per-minute burst factor, all services (default per class)", on="trace"),
    Knob("online_fraction", 0.3, 0.7, "online share of today's fleet (the online load)", on="trace"),
)

GRID = {"online_fraction": (0.3, 0.5, 0.7), "burst_cv": (0.0, 0.15, 0.5), "slo": (2.0, 5.0, 10.0)}


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: the fleet, the calibration and the synthetic trace's knobs."""

    cfg: fleet.FleetConfig
    cal: Calibration
    services: int = 240
    hours: float = 24.0
    bin_minutes: float = 1.0
    burst_cv: float | None = None
    online_fraction: float = 0.5

    def set(self, name: str, value: float) -> Setting:
        knob = {k.name: k for k in KNOBS}[name]
        if knob.on == "cal":
            return replace(self, cal=self.cal.with_(**{name: value}))
        if knob.on == "cfg":
            return replace(self, cfg=replace(self.cfg, **{name: value}))
        return replace(self, **{name: value})


def savings(st: Setting) -> dict:
    """GPUs saved (%) and utilisation gain per strategy, and the online load of the dedicated fleet."""
    work = traces.synthetic(st.services, st.hours, st.bin_minutes, st.cfg.seed, burst_cv=st.burst_cv)
    work = fleet.scale_to_online_gpus(work, int(round(st.cfg.gpus * st.online_fraction)), st.cfg.slo,
                                      st.cfg.min_replicas)
    res = fleet.right_sized(work, st.cfg, st.cal)
    out = {s: {"gpus_saved_pct": res[s]["right_sized"]["gpus_saved_pct"],
               "utilisation_gain_pct": res[s]["right_sized"]["utilisation_gain_pct"]} for s in STRATEGIES}
    ded = res["dedicated"]["right_sized"]
    out["online_busy_mean"] = round(float(work.demand.mean(axis=1).sum()) / max(ded["online_gpus"], 1), 4)
    return out


def baseline_value(st: Setting, knob: Knob) -> float | None:
    if knob.on == "cal":
        return getattr(st.cal, knob.name)
    if knob.on == "cfg":
        return getattr(st.cfg, knob.name)
    return getattr(st, knob.name)


def tornado(base: Setting, progress: Callable[[int, int], None] | None = None) -> dict:
    """Every knob at its low and high end, the others at the baseline."""
    rows = []
    for i, k in enumerate(KNOBS):
        rows.append({"name": k.name, "low": k.low, "high": k.high, "baseline": baseline_value(base, k), "why": k.why,
                     "at_low": savings(base.set(k.name, k.low)), "at_high": savings(base.set(k.name, k.high))})
        if progress:
            progress(i + 1, len(KNOBS))
    return {"rows": rows}


def grid(base: Setting, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Load x burstiness x SLO slack: savings per strategy, whether Valve reaches the published gain, and
    whether time-slicing or MPS save as much as Valve."""
    cells = []
    combos = list(itertools.product(*GRID.values()))
    for i, values in enumerate(combos):
        st = base
        for name, v in zip(GRID, values, strict=True):
            st = st.set(name, v)
        s = savings(st)
        best_other = max(s["time_slicing"]["gpus_saved_pct"], s["mps"]["gpus_saved_pct"])
        cells.append(dict(zip(GRID, values, strict=True)) | {
            "savings": s,
            "valve_reaches_published": s["valve"]["utilisation_gain_pct"] >= PUBLISHED_UTILISATION_GAIN_PCT,
            "others_as_good": best_other >= s["valve"]["gpus_saved_pct"],
        })
        if progress:
            progress(i + 1, len(combos))
    return cells


def ranges(baseline: dict, rows: list[dict]) -> dict:
    """Lowest and highest GPUs saved (%) per strategy over the baseline and every tornado end."""
    out = {}
    for s in STRATEGIES:
        vals = [baseline[s]["gpus_saved_pct"]] + [r[end][s]["gpus_saved_pct"] for r in rows
                                                  for end in ("at_low", "at_high")]
        out[s] = [min(vals), max(vals)]
    return out


def run(base: Setting, progress: Callable[[str, int, int], None] | None = None) -> dict:
    baseline = savings(base)
    t = tornado(base, (lambda d, n: progress("sweep: one assumption at a time", d, n)) if progress else None)
    g = grid(base, (lambda d, n: progress("sweep: load x burstiness x SLO grid", d, n)) if progress else None)
    return {
        "baseline": baseline,
        "tornado": t["rows"],
        "savings_range_pct": ranges(baseline, t["rows"]),
        "grid": g,
        "published_utilisation_gain_pct": PUBLISHED_UTILISATION_GAIN_PCT,
        "calibration": base.cal.as_dict(),
        "config": {"gpus": base.cfg.gpus, "services": base.services, "hours": base.hours, "slo": base.cfg.slo,
                   "online_fraction": base.online_fraction, "burst_cv": base.burst_cv, "seed": base.cfg.seed},
    }


def plot(res: dict, path) -> None:
    """Tornado of Valve's GPUs saved, and of Valve's lead over the better of time-slicing and MPS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["tornado"]
    base = res["baseline"]

    def lead(s: dict) -> float:
        return s["valve"]["gpus_saved_pct"] - max(s["time_slicing"]["gpus_saved_pct"], s["mps"]["gpus_saved_pct"])

    panels = (("Valve: GPUs saved (%)", lambda s: s["valve"]["gpus_saved_pct"]),
              ("Valve minus best of time-slicing/MPS (points)", lead))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    for ax, (title, f) in zip(axes, panels, strict=True):
        b = f(base)
        order = sorted(rows, key=lambda r: abs(f(r["at_high"]) - f(r["at_low"])))
        for y, r in enumerate(order):
            lo, hi = f(r["at_low"]), f(r["at_high"])
            ax.barh(y, lo - b, left=b, color="tab:blue", alpha=0.7, label="low end" if y == 0 else None)
            ax.barh(y, hi - b, left=b, color="tab:orange", alpha=0.7, label="high end" if y == 0 else None)
        ax.set_yticks(range(len(order)), [f"{r['name']} [{r['low']:g}, {r['high']:g}]" for r in order], fontsize=8)
        ax.axvline(b, color="k", lw=1)
        ax.set(title=title, xlabel=f"baseline {b:.1f}")
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=8)
    fig.suptitle("valve simulate cluster --sweep: one assumption at a time")
    fig.savefig(path, dpi=110)
    plt.close(fig)
