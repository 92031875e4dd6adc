"""Online load traces: synthetic (diurnal curve x bursty gamma noise, several service classes) or from a CSV.

A trace gives, per service and time bin, the online demand in busy-GPU units: GPU-busy seconds per second
(requests/s x GPU seconds per request). Demand 2.5 keeps 2.5 GPUs fully busy when each runs alone.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class TraceError(ValueError):
    """A trace file that cannot be used, with the file and line in the message."""


@dataclass(frozen=True)
class ServiceClass:
    name: str
    peak_to_mean: float  # of the diurnal curve (the per-bin bursts come on top)
    burst_cv: float  # coefficient of variation of the per-bin gamma factor on the diurnal curve
    arrival_cv: float  # coefficient of variation of request inter-arrival times within a bin (queueing)
    request_gpu_s: float  # GPU-busy seconds per request
    weight: float  # share of services


DEFAULT_CLASSES = (
    ServiceClass("chat", peak_to_mean=2.0, burst_cv=0.10, arrival_cv=1.0, request_gpu_s=0.05, weight=0.40),
    ServiceClass("code", peak_to_mean=2.5, burst_cv=0.15, arrival_cv=1.5, request_gpu_s=0.03, weight=0.25),
    ServiceClass("search", peak_to_mean=1.5, burst_cv=0.05, arrival_cv=1.0, request_gpu_s=0.02, weight=0.20),
    ServiceClass("agent", peak_to_mean=3.0, burst_cv=0.25, arrival_cv=2.0, request_gpu_s=0.20, weight=0.15),
)

# Where each service's users are: peak hour offset and share of services.
REGIONS = ((0.0, 0.60), (8.0, 0.25), (16.0, 0.15))


@dataclass
class Workload:
    names: list[str]
    classes: list[str]
    demand: np.ndarray  # (services, bins) busy-GPU units
    cv: np.ndarray  # (services,) arrival CV within a bin
    request_gpu_s: np.ndarray  # (services,)
    replicas: np.ndarray  # (services,) today's replicas; 0 = provision for peak
    bin_minutes: float

    @property
    def bins(self) -> int:
        return self.demand.shape[1]

    @property
    def hours(self) -> float:
        return self.bins * self.bin_minutes / 60.0

    def scaled(self, factor: np.ndarray) -> Workload:
        return Workload(self.names, self.classes, self.demand * np.asarray(factor)[:, None], self.cv,
                        self.request_gpu_s, self.replicas, self.bin_minutes)


def von_mises_k(peak_to_mean: float) -> float:
    """Concentration k of exp(k cos x) whose peak over mean, e^k / I0(k), equals peak_to_mean."""
    if peak_to_mean <= 1.0:
        return 0.0
    lo, hi = 0.0, 1.0
    while math.exp(hi) / np.i0(hi) < peak_to_mean:
        hi *= 2.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if math.exp(mid) / np.i0(mid) < peak_to_mean else (lo, mid)
    return (lo + hi) / 2.0


def diurnal(hours: np.ndarray, peak_hour: float, peak_to_mean: float, cache: dict | None = None) -> np.ndarray:
    """Daily curve with mean 1 over a day and the given peak over mean, highest at peak_hour."""
    k = cache[peak_to_mean] if cache and peak_to_mean in cache else von_mises_k(peak_to_mean)
    return np.exp(k * (np.cos(2 * np.pi * (hours - peak_hour) / 24.0) - 1.0)) * math.exp(k) / float(np.i0(k))


def gamma_noise(rng: np.random.Generator, cv: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Mean-1 gamma factors with the per-row coefficient of variation cv (1 where cv is 0)."""
    cv = np.asarray(cv, dtype=float)[:, None]
    k = np.where(cv > 0, 1.0 / np.maximum(cv, 1e-9) ** 2, 1.0)
    g = rng.gamma(np.broadcast_to(k, shape), 1.0) / k
    return np.where(cv > 0, g, 1.0)


def synthetic(services: int, hours: float, bin_minutes: float, seed: int,
              classes: tuple[ServiceClass, ...] = DEFAULT_CLASSES, burst_cv: float | None = None,
              arrival_cv: float | None = None, size_sigma: float = 1.2) -> Workload:
    """Services of the given classes with lognormal sizes (unscaled: see fleet.scale_to_online_gpus).

    Demand per bin = size x diurnal curve (peak hour 11-17 h local, regions 0/8/16 h apart) x a mean-1 gamma
    factor with CV burst_cv. burst_cv and arrival_cv, when given, override every class's value.
    """
    rng = np.random.default_rng(seed)
    bins = int(round(hours * 60.0 / bin_minutes))
    if bins < 1:
        raise ValueError("the horizon must hold at least one bin")
    w = np.array([c.weight for c in classes], dtype=float)
    pick = rng.choice(len(classes), size=services, p=w / w.sum())
    offsets = rng.choice([r[0] for r in REGIONS], size=services, p=[r[1] for r in REGIONS])
    peak_hour = rng.uniform(11.0, 17.0, size=services) + offsets
    size = rng.lognormal(0.0, size_sigma, size=services)
    t = (np.arange(bins) + 0.5) * bin_minutes / 60.0
    burst = np.array([classes[i].burst_cv if burst_cv is None else burst_cv for i in pick])
    cvs = np.array([classes[i].arrival_cv if arrival_cv is None else arrival_cv for i in pick])
    ks = {c.peak_to_mean: von_mises_k(c.peak_to_mean) for c in classes}
    curve = np.stack([diurnal(t, peak_hour[s], classes[pick[s]].peak_to_mean, ks) for s in range(services)])
    demand = size[:, None] * curve * gamma_noise(rng, burst, (services, bins))
    return Workload(
        names=[f"{classes[pick[s]].name}-{s:04d}" for s in range(services)],
        classes=[classes[i].name for i in pick],
        demand=demand,
        cv=cvs,
        request_gpu_s=np.array([classes[i].request_gpu_s for i in pick]),
        replicas=np.zeros(services, dtype=np.int64),
        bin_minutes=bin_minutes,
    )


CSV_REQUIRED = ("service", "minute", "rps")
CSV_OPTIONAL = ("gpu_s_per_request", "cv", "replicas", "class")


def read_csv(path: str | Path, gpu_s_per_request: float = 0.05, cv: float = 1.0) -> Workload:
    """Per-service request rates, one row per service and time bin.

    Columns: service (name), minute (bin start, minutes from the trace start; bins evenly spaced from 0, the
    same for every service), rps (requests per second, >= 0). Optional, constant per service:
    gpu_s_per_request (GPU-busy seconds per request; default the argument), cv (CV of request inter-arrival
    times, used for queueing; default the argument), replicas (online replicas today; empty or 0 = provision for peak), class (a label).
    """
    path = Path(path)
    f, reader, header = open_csv(path, CSV_REQUIRED)
    with f:
        rates: dict[str, dict[int, float]] = {}
        per_service: dict[str, dict[str, str]] = {}
        for row in reader:
            line = reader.line_num
            if None in row:
                raise TraceError(f"{path}:{line}: more fields than columns")
            name = (row["service"] or "").strip()
            if not name:
                raise TraceError(f"{path}:{line}: empty service name")
            minute = number(path, line, "minute", row["minute"])
            if minute < 0 or minute != int(minute):
                raise TraceError(f"{path}:{line}: minute must be a whole number >= 0, got {row['minute']!r}")
            rps = number(path, line, "rps", row["rps"])
            if rps < 0:
                raise TraceError(f"{path}:{line}: rps must be >= 0, got {row['rps']!r}")
            series = rates.setdefault(name, {})
            if int(minute) in series:
                raise TraceError(f"{path}:{line}: second row for service {name!r} at minute {int(minute)}")
            series[int(minute)] = rps
            fixed = {c: (row.get(c) or "").strip() for c in CSV_OPTIONAL if c in header}
            seen = per_service.setdefault(name, fixed)
            for c, v in fixed.items():
                if v != seen[c]:
                    raise TraceError(f"{path}:{line}: {c} of service {name!r} changes ({seen[c]!r} then {v!r}); "
                                     "it must be the same on every row of a service")
    if not rates:
        raise TraceError(f"{path}: no data rows")
    minutes = sorted(set().union(*[set(s) for s in rates.values()]))
    step = minutes[1] - minutes[0] if len(minutes) > 1 else 1
    if minutes[0] != 0 or minutes != list(range(0, minutes[-1] + 1, step)):
        raise TraceError(f"{path}: minutes must be evenly spaced from 0 (found {minutes[:5]}...)")
    names = sorted(rates)
    demand = np.zeros((len(names), len(minutes)))
    gpu_s = np.zeros(len(names))
    cvs = np.zeros(len(names))
    replicas = np.zeros(len(names), dtype=np.int64)
    classes = []
    for i, name in enumerate(names):
        gaps = [m for m in minutes if m not in rates[name]]
        if gaps:
            raise TraceError(f"{path}: service {name!r} has no row for minute {gaps[0]} ({len(gaps)} missing)")
        opt = per_service[name]
        where = f"{path}: service {name!r}"
        gpu_s[i] = positive(where, "gpu_s_per_request", opt.get("gpu_s_per_request") or gpu_s_per_request)
        cvs[i] = number(where, None, "cv", opt.get("cv") or cv)
        if cvs[i] < 0:
            raise TraceError(f"{where}: cv must be >= 0")
        r = number(where, None, "replicas", opt.get("replicas") or 0)
        if r < 0 or r != int(r):
            raise TraceError(f"{where}: replicas must be a whole number >= 0")
        replicas[i] = int(r)
        classes.append(opt.get("class") or "csv")
        demand[i] = [rates[name][m] for m in minutes]
    demand *= gpu_s[:, None]
    return Workload(names, classes, demand, cvs, gpu_s, replicas, bin_minutes=float(step))


def open_csv(path: Path, required: tuple[str, ...]):
    """The open file, its DictReader and its header, checked for the required columns."""
    try:
        f = path.open(newline="")
    except OSError as e:
        raise TraceError(f"{path}: {e.strerror or e}") from e
    reader = csv.DictReader(f)
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if not header or missing:
        f.close()
        if not header:
            raise TraceError(f"{path}: empty file (expected a header with {', '.join(required)})")
        raise TraceError(f"{path}:1: missing column(s) {', '.join(missing)}; header is {', '.join(header)}")
    reader.fieldnames = header
    return f, reader, header


def number(path, line, column: str, text) -> float:
    where = f"{path}:{line}" if line is not None else f"{path}"
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise TraceError(f"{where}: {column} must be a number, got {text!r}") from None
    if not math.isfinite(v):
        raise TraceError(f"{where}: {column} must be finite, got {text!r}")
    return v


def positive(where: str, column: str, text) -> float:
    v = number(where, None, column, text)
    if v <= 0:
        raise TraceError(f"{where}: {column} must be > 0, got {text!r}")
    return v


# ---------------------------------------------------------------------------------------------------------------
# Request-level traces: one row per request, the columns public LLM-serving traces carry

REQUEST_COLUMNS = ("arrival_s", "prompt_tokens", "output_tokens")
# GPU-busy seconds per token, llama-1b alone on an H100 (bench/results/colocation_h100-80gb-hbm3.json): TPOT p50
# 3.27 ms; prefill the rest of the measured 0.236 s per request of 256 prompt and 64 output tokens
DECODE_S_PER_TOKEN = 0.00327
PREFILL_S_PER_TOKEN = (0.236 - 64 * DECODE_S_PER_TOKEN) / 256


def read_requests(path: str | Path, bin_minutes: float = 1.0, prefill_s_per_token: float = PREFILL_S_PER_TOKEN,
                  decode_s_per_token: float = DECODE_S_PER_TOKEN) -> Workload:
    """One row per request: arrival_s (seconds from any origin, sorted), prompt_tokens, output_tokens, and an
    optional service (default one service, "trace"). Demand per bin is the GPU-busy seconds of the requests
    arriving in it (prefill and decode per token) per second; each service's arrival CV comes from its
    inter-arrival times."""
    path = Path(path)
    arrivals: dict[str, list[float]] = {}
    work: dict[str, list[float]] = {}
    f, reader, _ = open_csv(path, REQUEST_COLUMNS)
    with f:
        last = -math.inf
        for row in reader:
            line = reader.line_num
            if None in row:
                raise TraceError(f"{path}:{line}: more fields than columns")
            t = number(path, line, "arrival_s", row["arrival_s"])
            if t < last:
                raise TraceError(f"{path}:{line}: arrival_s {t:g} is before the previous row's {last:g} "
                                 "(rows must be sorted by arrival time)")
            last = t
            tokens = [number(path, line, c, row[c]) for c in ("prompt_tokens", "output_tokens")]
            if min(tokens) < 0:
                raise TraceError(f"{path}:{line}: token counts must be >= 0")
            name = (row.get("service") or "").strip() or "trace"
            arrivals.setdefault(name, []).append(t)
            work.setdefault(name, []).append(tokens[0] * prefill_s_per_token + tokens[1] * decode_s_per_token)
    if not arrivals:
        raise TraceError(f"{path}: no data rows")
    t0 = min(a[0] for a in arrivals.values())
    bin_s = bin_minutes * 60.0
    bins = max(1, int((max(a[-1] for a in arrivals.values()) - t0) // bin_s) + 1)
    names = sorted(arrivals)
    demand = np.zeros((len(names), bins))
    cvs = np.ones(len(names))
    gpu_s = np.zeros(len(names))
    for i, name in enumerate(names):
        a = np.asarray(arrivals[name])
        idx = ((a - t0) // bin_s).astype(np.int64)
        np.add.at(demand[i], idx, np.asarray(work[name]) / bin_s)
        gaps = np.diff(a)
        if len(gaps) > 1 and gaps.mean() > 0:
            cvs[i] = float(gaps.std() / gaps.mean())
        gpu_s[i] = max(float(np.mean(work[name])), 1e-9)
    return Workload(names, ["trace"] * len(names), demand, cvs, gpu_s, np.zeros(len(names), dtype=np.int64),
                    bin_minutes)
