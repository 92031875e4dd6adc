"""Reading benchmark JSON whose schemas still move: `map_bench_results` matches flattened key paths by words
(variant, metric, unit) and reports the key it used. The calibration builder uses it for the preemption and
reclaim benchmarks.
"""

from __future__ import annotations

import re
from typing import Any

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

    kind is the file family: 'colocation' (bench/colocation.py), 'preemption' (bench/preemption.py) or 'reclaim'
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
