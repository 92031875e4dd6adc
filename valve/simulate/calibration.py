"""Interference and reclamation costs for the fleet model, calibrated from the GPU benchmarks in `bench/results/`.

Every field has a default from earlier H100 measurements or a stated assumption, and a source string that says where the value used came
from. `map_bench_results` is the one place that maps a benchmark JSON onto these fields: the benchmark schemas
are still moving, so it matches flattened key paths by words (variant, metric, unit) and reports the key it used.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

# The H100 preemption probe (the first gate measurement, before bench/preemption.py): online burst of 10 bf16 2048^3 matmuls, 0.41 ms alone; offline matmul loop in another
# process: no gate -> p50 1.21 ms, p99 2.05 ms; gated -> p50 0.64 ms, p99 0.72 ms.
PROBE_ALONE_MS = 0.41
PROBE_NO_GATE_P99_MS = 2.05
PROBE_GATED_P99_MS = 0.72


@dataclass(frozen=True)
class Calibration:
    """Dimensionless costs of colocation; see docs/simulate.md for how each one enters the model."""

    # online p99 latency multiplier while offline work shares the GPU, measured end to end on LLM requests
    # (`bench/colocation.py`). None: derived per service from the added latencies below and each service's
    # GPU seconds per request (a micro-benchmark's ratio would be wrong for requests 100x longer).
    valve_online_p99_ratio: float | None = None
    ts_online_p99_ratio: float | None = None
    # fraction of the GPU that online gets while both sides have work under time-slicing
    ts_online_share: float = 0.5
    # time-slicing: p99 delay before an online burst runs (waiting for offline's time slice)
    ts_online_added_s: float = (PROBE_NO_GATE_P99_MS - PROBE_ALONE_MS) / 1000.0
    # offline throughput per unit of GPU time left to it, relative to offline alone
    valve_offline_efficiency: float = 0.95
    ts_offline_efficiency: float = 1.0
    # gate cost: delay before the first online kernel after the gate closes (offline loses it too)
    preemption_latency_s: float = (PROBE_GATED_P99_MS - PROBE_ALONE_MS) / 1000.0
    # memory reclamation: time to give offline memory back, and offline GPU time lost to recompute per reclaim
    reclaim_latency_s: float = 0.019
    reclaim_recompute_s: float = 0.5
    gpu: str = "H100 (built-in defaults)"
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def source(self, name: str) -> str:
        return self.sources.get(name, DEFAULT_SOURCES.get(name, "default"))

    def rows(self) -> list[tuple[str, str, str]]:
        """(field, value, source) for every numeric field, for printing."""
        return [(f.name, fmt(getattr(self, f.name)), self.source(f.name)) for f in numeric_fields()]

    def as_dict(self) -> dict[str, Any]:
        return {f.name: {"value": getattr(self, f.name), "source": self.source(f.name)} for f in numeric_fields()} | {
            "gpu": self.gpu
        }


def fmt(v: float | None) -> str:
    return "per service" if v is None else f"{v:.4g}"


DEFAULT_SOURCES = {
    "valve_online_p99_ratio": "default: per service, 1 + preemption_latency_s / GPU-s per request (offline is "
                              "stopped while online runs; a request waits for the gate once)",
    "ts_online_p99_ratio": "default: per service, 1 / ts_online_share + ts_online_added_s / GPU-s per request "
                           "(online runs in shared time slices)",
    "ts_online_share": "default (assumed): two contexts with work get equal time slices",
    "ts_online_added_s": "default: H100 preemption probe, no-gate p99 2.05 ms - alone 0.41 ms",
    "valve_offline_efficiency": "default (assumed): sub-layer gate waits and bounded queue-ahead cost ~5%",
    "ts_offline_efficiency": "default (assumed): time-slicing is work-conserving",
    "preemption_latency_s": "default: H100 preemption probe, gated p99 0.72 ms - alone 0.41 ms",
    "reclaim_latency_s": "default: H100 reclaim measurement (bench/reclaim.py), 8 GiB unmapped and released in 19 ms",
    "reclaim_recompute_s": "default (assumed): offline GPU time lost to recompute evicted sequences per reclaim",
}


def numeric_fields():
    return [f for f in fields(Calibration) if f.name not in ("gpu", "sources")]


# ---------------------------------------------------------------------------------------------------------------
# Reading benchmark JSON


def flatten(doc: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Leaves of a JSON document with their key paths (lower case). List items named by a name-like key
    ("name", "variant", "mode", "label") take that name as their path segment instead of their index."""
    if isinstance(doc, dict):
        out = []
        for k, v in doc.items():
            out += flatten(v, path + (str(k).lower(),))
        return out
    if isinstance(doc, list):
        out = []
        for i, v in enumerate(doc):
            seg = str(i)
            if isinstance(v, dict):
                for key in ("name", "variant", "mode", "label", "size", "size_gib"):
                    if isinstance(v.get(key), str | int) and not isinstance(v.get(key), bool):
                        seg = str(v[key]).lower()
                        break
            out += flatten(v, path + (seg,))
        return out
    return [(path, doc)]


def tokens(path: tuple[str, ...]) -> set[str]:
    return {t for t in re.split(r"[^a-z0-9]+", " ".join(path)) if t}


TS_WORDS = {"timeslicing", "timeslice", "ts", "nogate", "ungated", "naive", "sliced", "nogating"}
TS_PATTERN = re.compile(r"no[_\- ]?gat|time[_\- ]?slic")
VALVE_WORDS = {"valve", "gate", "gated", "gating"}
ALONE_WORDS = {"alone", "baseline", "isolated", "solo"}


def variant(path: tuple[str, ...]) -> str | None:
    """Which configuration a key path belongs to: 'ts', 'mps', 'valve', 'alone' or None."""
    words = tokens(path)
    if words & TS_WORDS or TS_PATTERN.search(" ".join(path)):
        return "ts"
    if "mps" in words:
        return "mps"
    if words & VALVE_WORDS:
        return "valve"
    if words & ALONE_WORDS or re.search(r"(online|offline)[_\- ]?only", " ".join(path)):
        return "alone"
    return None


UNITS = {"s": 1.0, "sec": 1.0, "secs": 1.0, "seconds": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def unit_scale(path: tuple[str, ...]) -> float | None:
    """Seconds per unit from the key path ('p99_ms' -> 1e-3); None when no unit word is in the path."""
    found = [UNITS[w] for w in re.split(r"[^a-z0-9]+", " ".join(path)) if w in UNITS]
    return found[-1] if found else None


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v


def is_ratio(words: set[str]) -> bool:
    return bool(words & {"ratio", "relative", "rel", "normalized", "normalised", "vs", "x"})


def key(path: tuple[str, ...]) -> str:
    return ".".join(path)


def map_bench_results(kind: str, doc: Any) -> dict[str, tuple[float, str]]:
    """Map one benchmark JSON onto calibration fields: {field: (value, "key.path it came from")}.

    kind is the file family: 'colocation' (`bench/colocation.py`), 'preemption' (bench/preemption.py) or 'reclaim'
    (bench/reclaim.py).
    Rules (first match wins; edit here when a schema settles):
    - online p99 ratio per variant: a key with 'p99' and a ratio word ('ratio', 'relative', 'vs', ...), not about
      offline, preemption or reclaim; for colocation the larger of the TTFT and TPOT ratios. Without ratio keys:
      the variant's absolute p99 divided by the 'alone' one with the same remaining key words.
    - offline efficiency: offline throughput ratio of the variant divided by (1 - online busy fraction at the
      benchmark), the busy fraction from an 'online ... alone ... util|busy|load' key (a percentage is divided by
      100). Without the busy fraction the ratio is not used.
    - preemption latency: a 'preempt ... p99' key with a unit word (s, ms, us, ns).
    - reclaim latency: a 'p99' latency with a unit word; the 8 GiB entry if one is named, else the largest.
    """
    leaves = [(p, v) for p, v in flatten(doc) if is_number(v)]
    out: dict[str, tuple[float, str]] = {}

    def online_p99(words: set[str]) -> bool:
        return "p99" in words and not words & {"offline", "preempt", "preemption", "reclaim"}

    for var, name in (("valve", "valve_online_p99_ratio"), ("ts", "ts_online_p99_ratio")):
        if kind != "colocation":  # micro-benchmark bursts: their ratios don't carry over to LLM requests
            break
        ratios = [(v, key(p)) for p, v in leaves
                  if variant(p) == var and online_p99(tokens(p)) and is_ratio(tokens(p))]
        if not ratios:
            ratios = absolute_ratios(leaves, var, online_p99)
        if ratios:
            v, where = max(ratios, key=lambda vw: vw[0])
            if v > 0:  # a measured ratio a hair under 1 is noise: no speed-up from colocation
                out[name] = (max(1.0, float(v)), where)

    busy = [(v, p) for p, v in leaves if variant(p) == "alone" and {"online"} <= tokens(p)
            and tokens(p) & {"util", "utilization", "utilisation", "busy", "load", "duty"}
            and not tokens(p) & {"offline", "memory", "mem"}]
    # the share of time online has work (busy, duty) over NVML's kernel-running share (util)
    busy.sort(key=lambda vp: not tokens(vp[1]) & {"busy", "duty", "load"})
    if busy:
        u, upath = busy[0]
        u = u / 100.0 if u > 1.0 else u
        latency = {"p50", "p90", "p99", "ttft", "tpot", "latency", "ms", "us"}
        for var, name in (("valve", "valve_offline_efficiency"), ("ts", "ts_offline_efficiency")):
            thr = [(v, p) for p, v in leaves if variant(p) == var and "offline" in tokens(p)
                   and is_ratio(tokens(p)) and not tokens(p) & latency]
            # a named throughput ratio ('offline_tokens_per_s_ratio') over a bare 'offline_ratio'
            thr.sort(key=lambda vp: not tokens(vp[1]) & {"throughput", "tokens", "tok", "tps", "toks", "rate",
                                                          "progress"})
            if thr and 0.0 <= u < 1.0:
                v, p = thr[0]
                out[name] = (min(1.0, float(v) / (1.0 - u)), f"{key(p)} / (1 - {key(upath)})")

    if kind == "preemption":
        added = absolute_ratios(leaves, "ts", online_p99, difference=True)
        if added:
            v, where = max(added, key=lambda vw: vw[0])
            out["ts_online_added_s"] = (max(0.0, float(v)), where)
        for p, v in leaves:
            w = tokens(p)
            scale = unit_scale(p)
            if w & {"preempt", "preemption"} and "p99" in w and scale and variant(p) in (None, "valve"):
                out["preemption_latency_s"] = (float(v) * scale, key(p))
                break

    if kind == "reclaim" and isinstance(doc, dict) and isinstance(doc.get("latency"), list):
        rows = [(i, r) for i, r in enumerate(doc["latency"]) if isinstance(r, dict) and is_number(r.get("p99_ms"))]
        eight = [(i, r) for i, r in rows if r.get("size_gib") == 8]
        if eight or rows:  # bench/reclaim.py's table: the 8 GiB row, else the largest size
            i, r = eight[0] if eight else max(rows, key=lambda ir: ir[1].get("size_gib") or 0)
            out["reclaim_latency_s"] = (float(r["p99_ms"]) * 1e-3, f"latency.{i}.p99_ms ({r.get('size_gib')} GiB)")
            return out

    if kind == "reclaim":
        cands = [(float(v) * unit_scale(p), p) for p, v in leaves
                 if "p99" in tokens(p) and unit_scale(p) and not tokens(p) & {"throughput", "loss"}]
        eight = [c for c in cands if re.search(r"(^|[^0-9])8[_ ]?(gib|gb|g)?([^0-9]|$)", key(c[1]))]
        pick = eight or cands
        if pick:
            v, p = max(pick, key=lambda vp: vp[0])
            out["reclaim_latency_s"] = (v, key(p))
    return out


def absolute_ratios(leaves, var: str, want, difference: bool = False) -> list[tuple[float, str]]:
    """Variant p99 / alone p99 (or, with difference, variant - alone in seconds: keys need a unit word) for keys
    whose words (minus the variant words) agree."""
    drop = TS_WORDS | VALVE_WORDS | ALONE_WORDS | {"mps", "no", "time", "slicing", "gate", "only", "with"}
    alone = {frozenset(tokens(p) - drop): (v, p) for p, v in leaves if variant(p) == "alone" and want(tokens(p))}
    out = []
    for p, v in leaves:
        if variant(p) == var and want(tokens(p)):
            base, bp = alone.get(frozenset(tokens(p) - drop), (0, ()))
            if not base:
                continue
            if not difference:
                out.append((v / base, f"{key(p)} / {key(bp)}"))
            elif unit_scale(p) and unit_scale(p) == unit_scale(bp):
                out.append(((v - base) * unit_scale(p), f"{key(p)} - {key(bp)}"))
    return out


def gpu_name(doc: Any) -> str | None:
    """The GPU a benchmark ran on: a 'gpu'/'gpu_name' value, else a device or name that reads like a GPU."""
    found = None
    for p, v in flatten(doc):
        if not (isinstance(v, str) and p) or v.lower() in ("cpu", "cuda", "gpu", ""):
            continue
        gpu_like = "nvidia" in v.lower() or re.search(r"\b[HABL]\d{2,3}\b", v)
        if p[-1] in ("gpu", "gpu_name") and found is None:
            found = v
        if p[-1] in ("gpu", "gpu_name", "device", "device_name", "name") and gpu_like:
            return v
    return found


# Preference order: LLM-shaped end-to-end benchmark first, then the micro-benchmarks.
KINDS = ("colocation", "preemption", "reclaim")


def load_calibration(results_dir: str | Path | None = "bench/results", override: str | Path | None = None,
                     ) -> tuple[Calibration, list[str]]:
    """Calibration from the newest `{colocation,preemption,reclaim}_*.json` in results_dir (when present),
    then a flat override JSON ({field: value}); returns it with notes on what was read or skipped."""
    values: dict[str, float] = {}
    sources: dict[str, str] = {}
    notes: list[str] = []
    gpu = None
    if results_dir is not None and Path(results_dir).is_dir():
        for kind in KINDS:
            files = sorted((f for f in Path(results_dir).glob(f"{kind}_*.json")
                            if not f.stem.endswith(("_raw", "_quick"))),  # per-sample dumps and smoke runs
                           key=lambda f: (f.stat().st_mtime, f.name), reverse=True)
            if not files:
                notes.append(f"no {kind}_*.json in {results_dir}")
                continue
            f = files[0]
            try:
                doc = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                notes.append(f"skipped {f}: {e}")
                continue
            mapped = map_bench_results(kind, doc)
            notes.append(f"read {f}: {len(mapped)} value(s)" + (" (nothing recognised)" if not mapped else ""))
            for name, (v, where) in mapped.items():
                if name not in values:  # earlier kinds win
                    values[name], sources[name] = v, f"{f}: {where}"
            if mapped and gpu is None:
                gpu = gpu_name(doc)
    if override is not None:
        try:
            doc = json.loads(Path(override).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"calibration file {override}: {e}") from e
        names = {f.name for f in numeric_fields()}
        unknown = set(doc) - names - {"gpu"}
        if unknown:
            raise ValueError(f"calibration file {override}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
        for name, v in doc.items():
            if name == "gpu":
                gpu = str(v)
                continue
            if not is_number(v):
                raise ValueError(f"calibration file {override}: {name} must be a number, got {v!r}")
            values[name], sources[name] = float(v), f"{override}"
    cal = replace(Calibration(), gpu=gpu or Calibration.gpu, sources=sources, **values)
    check(cal)
    return cal, notes


def check(cal: Calibration) -> None:
    for name in ("valve_online_p99_ratio", "ts_online_p99_ratio"):
        if getattr(cal, name) is not None and getattr(cal, name) < 1.0:
            raise ValueError(f"{name} = {getattr(cal, name)} (from {cal.source(name)}) must be >= 1")
    for name in ("ts_online_share", "valve_offline_efficiency", "ts_offline_efficiency"):
        if not 0.0 < getattr(cal, name) <= 1.0:
            raise ValueError(f"{name} = {getattr(cal, name)} (from {cal.source(name)}) must be in (0, 1]")
    for name in ("preemption_latency_s", "ts_online_added_s", "reclaim_latency_s", "reclaim_recompute_s"):
        if getattr(cal, name) < 0.0:
            raise ValueError(f"{name} must be >= 0")
