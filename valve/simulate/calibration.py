"""What colocation costs, from measurements: each variant's online p99 ratios and offline throughput at the online
loads the colocation benchmark ran, plus the gate and reclaim costs, and the assumptions the sweep varies.

A calibration file is JSON (see docs/simulate.md). The packaged default, `calibration_h100.json` next to this
module, was built by `build` from the committed bench/results; it is read the same way from a checkout or an
installed package. `valve simulate cluster --calibration FILE` uses another file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from valve.simulate.benchjson import map_bench_results

DEFAULT_FILE = Path(__file__).with_name("calibration_h100.json")
VARIANTS = ("time-slicing", "mps", "valve")


@dataclass(frozen=True)
class Point:
    """One variant at one online load of the colocation benchmark."""

    online_load: float  # online busy fraction alone
    ttft_p99_ratio: float  # over online alone
    tpot_p99_ratio: float
    offline_ratio: float  # offline throughput over offline alone

    @property
    def p99_ratio(self) -> float:
        # the model carries one ratio per variant: the worse of TTFT and TPOT binds the SLO
        return max(1.0, self.ttft_p99_ratio, self.tpot_p99_ratio)


@dataclass(frozen=True)
class Calibration:
    gpu: str
    points: dict[str, tuple[Point, ...]]  # variant -> measured points, sorted by load
    bench_request_gpu_s: float  # GPU-busy seconds per request in the benchmark (for its preemption rate)
    bench_arrival_cv: float = 1.0  # the benchmark's arrivals (Poisson)
    preemption_latency_s: float = 0.0
    reclaim_latency_s: float = 0.0
    # assumptions (the sweep varies them)
    reclaim_recompute_s: float = 0.5  # offline GPU time lost to recompute per reclaim
    load_elasticity: float = 1.0  # 0: measured p99 ratio at every load; 1: a fitted slowdown, queueing amplified
    offline_loss_exponent: float = 1.0  # time-slicing/MPS offline loss grows as load**exponent
    valve_offline_efficiency: float | None = None  # None: fitted to the measured offline ratio
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    path: str = ""

    def loads(self) -> list[float]:
        return sorted({p.online_load for pts in self.points.values() for p in pts})

    def with_(self, **kw) -> Calibration:
        return replace(self, **kw)

    def rows(self) -> list[tuple[str, str, str]]:
        """(name, value, source) for printing."""
        out = []
        for v, pts in self.points.items():
            for p in pts:
                out.append((f"{v} @ load {p.online_load:.3f}", f"TTFT x{p.ttft_p99_ratio:.3f}, TPOT "
                            f"x{p.tpot_p99_ratio:.3f}, offline x{p.offline_ratio:.3f}", self.sources.get("points", "")))
        for name in ("bench_request_gpu_s", "preemption_latency_s", "reclaim_latency_s", "reclaim_recompute_s",
                     "load_elasticity", "offline_loss_exponent", "valve_offline_efficiency"):
            v = getattr(self, name)
            out.append((name, "fitted" if v is None else f"{v:.4g}", self.sources.get(name, "")))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu,
            "file": self.path,
            "points": {v: [vars(p) for p in pts] for v, pts in self.points.items()},
            "bench_request_gpu_s": self.bench_request_gpu_s,
            "bench_arrival_cv": self.bench_arrival_cv,
            "preemption_latency_s": self.preemption_latency_s,
            "reclaim_latency_s": self.reclaim_latency_s,
            "reclaim_recompute_s": self.reclaim_recompute_s,
            "load_elasticity": self.load_elasticity,
            "offline_loss_exponent": self.offline_loss_exponent,
            "valve_offline_efficiency": self.valve_offline_efficiency,
            "sources": dict(self.sources),
        }


class CalibrationError(ValueError):
    pass


def number(doc: dict, name: str, where: str, lo: float = 0.0, hi: float | None = None) -> float:
    v = doc.get(name)
    if not isinstance(v, int | float) or isinstance(v, bool) or v != v:
        raise CalibrationError(f"{where}: {name} must be a number, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise CalibrationError(f"{where}: {name} = {v} outside [{lo}, {hi if hi is not None else 'inf'}]")
    return float(v)


def from_dict(doc: dict, path: str = "") -> Calibration:
    """A calibration from its JSON document; errors name the file and the field."""
    where = path or "calibration"
    if not isinstance(doc, dict) or not isinstance(doc.get("points"), dict):
        raise CalibrationError(f"{where}: expected an object with 'points' {{variant: [measured points]}}")
    missing = [v for v in VARIANTS if not doc["points"].get(v)]
    if missing:
        raise CalibrationError(f"{where}: no measured points for {', '.join(missing)}")
    unknown = set(doc["points"]) - set(VARIANTS)
    if unknown:
        raise CalibrationError(f"{where}: unknown variant(s) {sorted(unknown)}; known: {list(VARIANTS)}")
    points = {}
    for v in VARIANTS:
        pts = []
        for i, p in enumerate(doc["points"][v]):
            at = f"{where}: points.{v}[{i}]"
            if not isinstance(p, dict):
                raise CalibrationError(f"{at}: expected an object")
            pts.append(Point(number(p, "online_load", at, 0.0, 0.99), number(p, "ttft_p99_ratio", at),
                             number(p, "tpot_p99_ratio", at), number(p, "offline_ratio", at, 0.0, 1.0)))
        points[v] = tuple(sorted(pts, key=lambda p: p.online_load))
    kw: dict[str, Any] = {}
    for name, hi in (("bench_arrival_cv", None), ("preemption_latency_s", None), ("reclaim_latency_s", None),
                     ("reclaim_recompute_s", None), ("load_elasticity", 1.0), ("offline_loss_exponent", None)):
        if name in doc:
            kw[name] = number(doc, name, where, 0.0, hi)
    if doc.get("valve_offline_efficiency") is not None:
        kw["valve_offline_efficiency"] = number(doc, "valve_offline_efficiency", where, 0.01, 1.0)
    sources = doc.get("sources") or {}
    return Calibration(gpu=str(doc.get("gpu", "unknown GPU")), points=points,
                       bench_request_gpu_s=number(doc, "bench_request_gpu_s", where, 1e-6),
                       sources={str(k): str(s) for k, s in sources.items()}, path=path, **kw)


def load(path: str | Path | None = None) -> Calibration:
    """The calibration in `path`, or the packaged default."""
    path = Path(path) if path is not None else DEFAULT_FILE
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CalibrationError(f"calibration file {path}: {e}") from e
    return from_dict(doc, str(path))


# ---------------------------------------------------------------------------------------------------------------
# Building a calibration file from benchmark results

ROW_NAMES = {"time-slicing": "time-slicing", "mps": "mps", "valve": "valve"}


def colocation_point(doc: dict, variant: str) -> Point:
    """The `rows` table `bench/colocation.py` writes: ratios per variant, online load from online alone."""
    rows = {r.get("variant"): r for r in doc.get("rows", []) if isinstance(r, dict)}
    alone, row = rows.get("online-alone"), rows.get(ROW_NAMES[variant])
    if alone is None or row is None:
        raise CalibrationError(f"colocation results: no 'online-alone' or '{variant}' row")
    return Point(float(alone["busy_fraction"]), float(row["ttft_p99_ratio"]), float(row["tpot_p99_ratio"]),
                 float(row["offline_ratio"]))


ASSUMED = {
    "reclaim_recompute_s": "assumed: offline GPU time lost to recompute evicted sequences per reclaim",
    "load_elasticity": "assumed: 1 = the measured ratio is a fitted slowdown that queueing amplifies with load; "
                       "0 = the measured ratio at every load (one load measured)",
    "offline_loss_exponent": "assumed: time-slicing/MPS offline loss grows linearly with online load (one load "
                             "measured)",
    "valve_offline_efficiency": "fitted: Valve's measured offline ratio over the idle share left by the model's "
                                "gate costs at the benchmark's load",
}


def build(colocation: list[tuple[str, dict]], preemption: tuple[str, dict], reclaim: tuple[str, dict]) -> dict:
    """A calibration document from benchmark results: colocation files (one per measured load), the preemption
    and reclaim benchmarks; each as (file name, parsed JSON)."""
    points: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    gpu, request_s = "unknown GPU", []
    for _, doc in colocation:
        for v in VARIANTS:
            points[v].append(vars(colocation_point(doc, v)))
        gpu = (doc.get("env") or {}).get("gpu", gpu)
        request_s.append(float(doc["calibration"]["service_s"]))
    pre = map_bench_results("preemption", preemption[1])
    rec = map_bench_results("reclaim", reclaim[1])
    names = ", ".join(n for n, _ in colocation)
    return {
        "gpu": gpu,
        "points": points,
        "bench_request_gpu_s": sum(request_s) / len(request_s),
        "bench_arrival_cv": 1.0,
        "preemption_latency_s": pre["preemption_latency_s"][0],
        "reclaim_latency_s": rec["reclaim_latency_s"][0],
        "reclaim_recompute_s": 0.5,
        "load_elasticity": 1.0,
        "offline_loss_exponent": 1.0,
        "valve_offline_efficiency": None,
        "sources": {
            "points": f"{names}: rows (online load: online-alone busy_fraction)",
            "bench_request_gpu_s": f"{names}: calibration.service_s",
            "bench_arrival_cv": f"{names}: settings.arrival (poisson)",
            "preemption_latency_s": f"{preemption[0]}: {pre['preemption_latency_s'][1]}",
            "reclaim_latency_s": f"{reclaim[0]}: {rec['reclaim_latency_s'][1]}",
        } | ASSUMED,
    }
