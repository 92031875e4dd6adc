"""The per-GPU model: online p99 latency and offline throughput on one GPU in one time bin, per strategy.

All functions are vectorised over numpy arrays of online busy fractions `u` (online GPU-busy seconds per second
on one replica's GPU when it runs alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from valve.simulate.calibration import Calibration


@dataclass(frozen=True)
class Strategy:
    name: str
    label: str
    colocate: bool  # offline work runs on the online replicas' GPUs
    # online p99 multiplier while offline work is on the GPU; None: base + added_s / GPU-s per request
    p99_ratio: float | None = 1.0
    base: float = 1.0
    added_s: float = 0.0
    online_share: float = 1.0  # GPU fraction online gets while both sides have work
    offline_efficiency: float = 1.0
    gated: bool = False  # Valve: offline pays preemptions and reclaims


def strategies(cal: Calibration) -> list[Strategy]:
    return [
        Strategy("dedicated", "dedicated", colocate=False),
        Strategy("naive", "naive sharing (time-slicing)", colocate=True, p99_ratio=cal.ts_online_p99_ratio,
                 base=1.0 / cal.ts_online_share, added_s=cal.ts_online_added_s, online_share=cal.ts_online_share,
                 offline_efficiency=cal.ts_offline_efficiency),
        Strategy("valve", "Valve", colocate=True, p99_ratio=cal.valve_online_p99_ratio,
                 added_s=cal.preemption_latency_s, offline_efficiency=cal.valve_offline_efficiency, gated=True),
    ]


def interference(s: Strategy, request_gpu_s=1.0):
    """Online p99 multiplier while sharing: the measured ratio, else base + added delay / request time."""
    if not s.colocate:
        return 1.0
    if s.p99_ratio is not None:
        return s.p99_ratio
    return s.base + s.added_s / np.asarray(request_gpu_s, dtype=float)


def queue_factor(u, cv):
    """p99 latency over unloaded latency at busy fraction u: Kingman's GI/G/1 factor 1 + (ca²+cs²)/2 · u/(1-u),
    with exponential service times (cs = 1) and arrival CV ca = cv; infinite at u >= 1."""
    u = np.asarray(u, dtype=float)
    k = (1.0 + np.asarray(cv, dtype=float) ** 2) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        f = 1.0 + k * u / (1.0 - u)
    return np.where(u >= 1.0, np.inf, f)


def online_p99(u, cv, s: Strategy, shared, request_gpu_s=1.0):
    """Online p99 / unloaded p99 alone. `shared`: whether offline work is on the GPU (bool or fraction array);
    request_gpu_s broadcasts like cv."""
    alone = queue_factor(u, cv)
    if not s.colocate:
        return alone
    together = interference(s, request_gpu_s) * queue_factor(np.asarray(u) / s.online_share, cv)
    return np.where(np.asarray(shared) > 0, together, alone)


def max_util(slo: float, cv, s: Strategy, shared: bool = True, request_gpu_s=1.0):
    """Largest busy fraction per replica with online p99 <= slo (0 where no load meets it)."""
    m = interference(s, request_gpu_s) if (s.colocate and shared) else 1.0
    share = s.online_share if (s.colocate and shared) else 1.0
    k = (1.0 + np.asarray(cv, dtype=float) ** 2) / 2.0
    x = (slo / m - 1.0) / k
    return np.where(x > 0, share * x / (1.0 + x), 0.0)


def replicas_for(peak, umax, min_replicas: int = 1):
    """Replicas so that peak demand (busy-GPU units) keeps each at or under umax; 0 where umax is 0."""
    peak = np.asarray(peak, dtype=float)
    umax = np.asarray(umax, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.ceil(np.where(umax > 0, peak / umax - 1e-9, 0.0))
    n = np.maximum(n, min_replicas)
    return np.where(umax > 0, n, 0).astype(np.int64)


def preemptions_per_s(u, request_gpu_s, cap: float):
    """Idle -> busy transitions per second of one replica (each closes the gate once): busy periods start at
    rate lambda(1-u) with lambda = u / request_gpu_s, capped by the arbiter's preemption rate limit."""
    u = np.clip(np.asarray(u, dtype=float), 0.0, 1.0)
    return np.minimum(cap, u * (1.0 - u) / np.asarray(request_gpu_s, dtype=float))


def offline_rate(u, s: Strategy, request_gpu_s=1.0, cal: Calibration | None = None, hysteresis_s: float = 0.0,
                 max_preemptions: float = math.inf, reclaims=0.0, bin_s: float = 60.0):
    """Offline work per unit time on a GPU shared with a replica at busy fraction u, relative to offline alone.

    time-slicing: online gets `online_share` of the GPU while it has work, offline gets the rest and all idle
    time (work-conserving). Valve: offline gets the idle time, less (hysteresis + preemption latency) per
    preemption and (reclaim latency + recompute) per reclaim event in the bin.
    """
    u = np.clip(np.asarray(u, dtype=float), 0.0, 1.0)
    if not s.colocate:
        return np.zeros_like(u)
    if not s.gated:
        busy = np.minimum(u / s.online_share, 1.0)  # wall-time fraction online has work
        return s.offline_efficiency * ((1.0 - busy) + busy * (1.0 - s.online_share))
    lost = 0.0
    if cal is not None:
        lost = preemptions_per_s(u, request_gpu_s, max_preemptions) * (hysteresis_s + cal.preemption_latency_s)
        lost = lost + np.asarray(reclaims) * (cal.reclaim_latency_s + cal.reclaim_recompute_s) / bin_s
    return s.offline_efficiency * np.clip(1.0 - u - lost, 0.0, 1.0)


def online_served(u, s: Strategy, shared):
    """Online work actually done (busy-GPU units) on one replica's GPU."""
    u = np.asarray(u, dtype=float)
    cap = np.where(np.asarray(shared) > 0, s.online_share, 1.0) if s.colocate else 1.0
    return np.minimum(u, cap)


def reclaim_events(u, half_life_bins: float, margin: float = 0.0):
    """1 where a replica's online demand rises above the memory reserve: the arbiter keeps free memory for
    online at its recent peak plus a margin, the peak decaying by half every `half_life_bins` bins. Memory
    demand is taken as proportional to the busy fraction. u is (services, bins)."""
    u = np.asarray(u, dtype=float)
    decay = 0.5 ** (1.0 / half_life_bins)
    ev = np.zeros_like(u)
    peak = u[:, 0].copy()
    for t in range(1, u.shape[1]):
        ev[:, t] = u[:, t] > peak * (1.0 + margin)
        peak = np.maximum(peak * decay, u[:, t])
    return ev
