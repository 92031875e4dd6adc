"""The per-GPU model: online p99 latency and offline throughput on one GPU in one time bin, per variant.

Every colocating variant is fitted to its measured points (calibration.py): at a measured online load the model
gives the measured online p99 ratio and offline throughput. Between measured loads the fitted values are
interpolated; beyond them the load dependence is an assumption (`load_elasticity`, `offline_loss_exponent`).
Functions are vectorised over numpy arrays of online busy fractions `u` (of one replica's GPU, online alone).
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
    colocate: bool = False  # offline work runs on the online replicas' GPUs
    gated: bool = False  # Valve: offline gets the idle time and pays preemptions and reclaims
    loads: tuple[float, ...] = (0.0,)  # measured online loads
    ratio: tuple[float, ...] = (1.0,)  # measured online p99 ratio at each load
    slowdown: tuple[float, ...] = (1.0,)  # fitted service slowdown at each load
    offline: tuple[float, ...] = (0.0,)  # gated: efficiency over the idle share; else: loss coefficient
    elasticity: float = 1.0
    loss_exponent: float = 1.0


def queue_factor(u, cv):
    """p99 latency over unloaded latency at busy fraction u: Kingman's GI/G/1 factor 1 + (ca²+cs²)/2 · u/(1-u),
    with exponential service times (cs = 1) and arrival CV ca = cv; infinite at u >= 1."""
    u = np.asarray(u, dtype=float)
    k = (1.0 + np.asarray(cv, dtype=float) ** 2) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        f = 1.0 + k * u / (1.0 - u)
    return np.where(u >= 1.0, np.inf, f)


def fit_slowdown(ratio: float, u: float, cv: float) -> float:
    """Service slowdown s with s·Q(s·u)/Q(u) = ratio at the measured load (bisection; s·u stays below 1)."""
    q = float(queue_factor(u, cv))
    lo, hi = 1.0, (1.0 / u if u > 0 else 1e6)
    if ratio <= 1.0:
        return 1.0
    for _ in range(100):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if mid * float(queue_factor(mid * u, cv)) / q < ratio else (lo, mid)
    return (lo + hi) / 2.0


def gate_loss(u, request_gpu_s, cal: Calibration, hysteresis_s: float, max_preemptions: float):
    """GPU time per second offline loses to closing the gate: (hysteresis + preemption latency) per preemption."""
    return preemptions_per_s(u, request_gpu_s, max_preemptions) * (hysteresis_s + cal.preemption_latency_s)


def strategies(cal: Calibration, hysteresis_s: float = 0.005, max_preemptions: float = 100.0) -> list[Strategy]:
    """dedicated, time-slicing, MPS and Valve, each fitted to its measured points."""
    out = [Strategy("dedicated", "dedicated")]
    labels = {"time-slicing": ("time_slicing", "time-slicing"), "mps": ("mps", "MPS"), "valve": ("valve", "Valve")}
    for variant, pts in cal.points.items():
        name, label = labels[variant]
        loads = tuple(p.online_load for p in pts)
        ratio = tuple(p.p99_ratio for p in pts)
        slow = tuple(fit_slowdown(r, u, cal.bench_arrival_cv) for r, u in zip(ratio, loads, strict=True))
        gated = variant == "valve"
        if gated:
            offline = tuple(
                cal.valve_offline_efficiency if cal.valve_offline_efficiency is not None else
                p.offline_ratio / max(1e-9, 1.0 - p.online_load - float(gate_loss(
                    p.online_load, cal.bench_request_gpu_s, cal, hysteresis_s, max_preemptions)))
                for p in pts)
        else:
            offline = tuple((1.0 - p.offline_ratio) / max(p.online_load, 1e-9) ** cal.offline_loss_exponent
                            for p in pts)
        out.append(Strategy(name, label, colocate=True, gated=gated, loads=loads, ratio=ratio, slowdown=slow,
                            offline=offline, elasticity=cal.load_elasticity,
                            loss_exponent=cal.offline_loss_exponent))
    return out


def at(u, s: Strategy, values: tuple[float, ...]):
    """A fitted value at load u: interpolated between measured loads, held beyond them."""
    return np.interp(np.asarray(u, dtype=float), s.loads, values)


def interference(u, cv, s: Strategy):
    """Online p99 multiplier while offline work shares the GPU: the measured ratio R at the measured load; at other
    loads R^(1-e) · (s·Q(s·u)/Q(u))^e with s the fitted slowdown and e the load elasticity."""
    u = np.asarray(u, dtype=float)
    if not s.colocate:
        return np.ones_like(u)
    r = at(u, s, s.ratio)
    sd = at(u, s, s.slowdown)
    with np.errstate(divide="ignore", invalid="ignore"):
        amplified = sd * queue_factor(sd * u, cv) / queue_factor(u, cv)
    return r ** (1.0 - s.elasticity) * amplified ** s.elasticity


def online_p99(u, cv, s: Strategy, shared):
    """Online p99 / unloaded p99 alone. `shared`: whether offline work is on the GPU (bool or fraction array)."""
    alone = queue_factor(u, cv)
    if not s.colocate:
        return alone
    together = alone * interference(u, cv, s)
    return np.where(np.asarray(shared) > 0, together, alone)


def max_util(slo: float, cv, s: Strategy, shared: bool = True):
    """Largest busy fraction per replica with online p99 <= slo (0 where no load meets it); p99 grows with u."""
    cv = np.asarray(cv, dtype=float)
    lo = np.zeros_like(cv)
    hi = np.ones_like(cv)
    for _ in range(50):
        mid = (lo + hi) / 2.0
        ok = online_p99(mid, cv, s, shared) <= slo
        lo, hi = np.where(ok, mid, lo), np.where(ok, hi, mid)
    return np.where(online_p99(lo, cv, s, shared) <= slo, lo, 0.0)


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

    time-slicing, MPS: 1 - c·u^p, c fitted to the measured offline ratio. Valve: the idle time at the fitted
    efficiency, less (hysteresis + preemption latency) per preemption and (reclaim latency + recompute) per
    reclaim event in the bin.
    """
    u = np.clip(np.asarray(u, dtype=float), 0.0, 1.0)
    if not s.colocate:
        return np.zeros_like(u)
    if not s.gated:
        return np.clip(1.0 - at(u, s, s.offline) * u ** s.loss_exponent, 0.0, 1.0)
    lost = 0.0
    if cal is not None:
        lost = gate_loss(u, request_gpu_s, cal, hysteresis_s, max_preemptions)
        lost = lost + np.asarray(reclaims) * (cal.reclaim_latency_s + cal.reclaim_recompute_s) / bin_s
    return at(u, s, s.offline) * np.clip(1.0 - u - lost, 0.0, 1.0)


def online_served(u, s: Strategy, shared):
    """Online work actually done (busy-GPU units) on one replica's GPU: a slowed replica serves at most 1/s."""
    u = np.asarray(u, dtype=float)
    cap = 1.0 / at(u, s, s.slowdown) if s.colocate else 1.0
    return np.minimum(u, np.where(np.asarray(shared) > 0, cap, 1.0))


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
