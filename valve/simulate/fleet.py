"""Trace-driven fleet simulation: dedicated GPUs, time-slicing, MPS and Valve, side by side.

Two views per strategy:
- today's fleet: the same GPUs and online replicas as now; offline work also runs on the online replicas' GPUs
  (colocating strategies). Measured: utilisation, online SLO violations, when the offline backlog is done.
- right-sized: the fewest GPUs that keep every service within its online SLO and give the same offline
  throughput as today's dedicated offline GPUs.

Valve's pairs are placed by the operator's placement function (`valve.operator.placement.place`), looked up at
call time so that the simulator always runs whatever the operator runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from valve.api.runtime import RuntimeSpec
from valve.operator import placement
from valve.simulate import model
from valve.simulate.calibration import Calibration
from valve.simulate.traces import Workload

Progress = Callable[[str, float, float], None]  # (stage, completed, total)


@dataclass(frozen=True)
class FleetConfig:
    gpus: int = 8054
    gpus_per_node: int = 8
    online_fraction: float = 0.5  # synthetic traces: share of today's GPUs that serve online
    slo: float = 5.0  # online p99 latency bound, as a multiple of the unloaded p99 of a request alone
    offline_backlog: float = 2.0  # offline work, in horizons of today's offline GPUs running flat out
    offline_job_hours: float = 1.0  # mean offline job size, GPU-hours on a GPU of its own
    offline_job_sigma: float = 0.5  # lognormal sigma of job sizes (0: all the same)
    max_horizons: float = 20.0  # stop the offline backlog simulation after this many horizons
    min_replicas: int = 1
    seed: int = 0
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)


def node_sizes(gpus: int, per_node: int) -> list[int]:
    full, rest = divmod(gpus, per_node)
    return [per_node] * full + ([rest] if rest else [])


def scale_to_online_gpus(work: Workload, target: int, slo: float, min_replicas: int = 1) -> Workload:
    """Scale a synthetic workload so that provisioning it for peak (alone, within the SLO) takes at most
    `target` GPUs, as close to it as whole replicas allow."""
    umax = model.max_util(slo, work.cv, model.Strategy("dedicated", "", colocate=False))
    peak = work.demand.max(axis=1)
    if target < min_replicas * len(peak):
        raise ValueError(f"{len(peak)} services need at least {min_replicas * len(peak)} online GPUs; "
                         f"only {target} are online (raise --online-fraction or lower --services)")

    def gpus(c: float) -> int:
        return int(model.replicas_for(c * peak, umax, min_replicas).sum())

    lo, hi = 0.0, 1.0
    while gpus(hi) <= target:
        lo, hi = hi, hi * 2.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if gpus(mid) <= target else (lo, mid)
    return work.scaled(np.full(len(peak), lo))


def job_sizes(rng: np.random.Generator, total: float, mean: float, sigma: float) -> np.ndarray:
    """Offline job sizes (GPU-hours alone), lognormal with the given mean, adding up to `total`."""
    if total <= 0:
        return np.zeros(0)
    n = max(1, int(math.ceil(total / mean)))
    sizes = rng.lognormal(math.log(mean) - sigma**2 / 2.0, sigma, size=n) if sigma > 0 else np.full(n, mean)
    return sizes * (total / sizes.sum())


@dataclass
class Layout:
    """Which service's replica each GPU of today's fleet carries and whether offline shares it."""

    service: np.ndarray  # (gpus,) service index, -1 for offline-only GPUs
    shared: np.ndarray  # (gpus,) bool: offline runs beside the replica
    placement_seconds: float = 0.0
    pairs: int = 0
    unpaired: int = 0  # replicas whose pair the placement did not place (they run alone where a GPU is free)
    unplaced: int = 0  # replicas left with no GPU at all
    nodes_used: int = 0


def place_pairs(replicas: np.ndarray, work: Workload, loads: np.ndarray, gpus: int, per_node: int,
                pre_used: int = 0) -> Layout:
    """Place one pair (online replica + offline tenant) per replica with the operator's placement function.

    `pre_used` GPUs (filled from the last node backwards) are taken by something else. A replica whose pair
    is not placed still runs, alone, on a free GPU (or nowhere, counted in `unplaced`).
    """
    sizes = node_sizes(gpus, per_node)
    used = [0] * len(sizes)
    left = pre_used
    for i in range(len(sizes) - 1, -1, -1):
        used[i], left = min(sizes[i], left), left - min(sizes[i], left)
    nodes = [placement.Node(name=f"node-{i:05d}", online_allocatable=k, offline_allocatable=k,
                            online_used=used[i], offline_used=used[i]) for i, k in enumerate(sizes)]
    owner: dict[str, int] = {}
    pairs = []
    for s, n in enumerate(replicas):
        for r in range(int(n)):
            key = f"{work.names[s]}/{r}"
            owner[key] = s
            pairs.append(placement.PairRequest(key=key, online_load=float(loads[s])))
    t0 = time.perf_counter()
    result = placement.place(pairs, nodes)
    seconds = time.perf_counter() - t0
    index = {n.name: i for i, n in enumerate(nodes)}
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    service = np.full(gpus, -1, dtype=np.int64)
    for i, k in enumerate(sizes):  # taken GPUs are a node's last ones; pairs fill from its first
        service[first[i] + k - used[i]: first[i] + k] = -2
    slot = np.zeros(len(sizes), dtype=np.int64)
    shared = np.zeros(gpus, dtype=bool)
    homeless = []
    for p in result:
        s = owner[p.key]
        i = index.get(p.node) if p.node is not None else None
        if i is None or slot[i] >= sizes[i] - used[i]:
            homeless.append(s)
            continue
        service[first[i] + slot[i]] = s
        shared[first[i] + slot[i]] = True
        slot[i] += 1
    placed = {p.key for p in result}
    homeless += [owner[p.key] for p in pairs if p.key not in placed]
    free = np.flatnonzero(service == -1)
    for s, g in zip(homeless, free, strict=False):
        service[g] = s  # runs alone; offline does not share this GPU
    service[service == -2] = -1
    return Layout(service, shared, seconds, len(pairs), len(homeless), max(0, len(homeless) - len(free)),
                  int((slot > 0).sum()))


@dataclass
class JobRun:
    finish: np.ndarray  # (jobs,) hours; nan where not done
    active: np.ndarray  # (services, bins) fraction of a service's shared GPUs running an offline job
    offline_gpus: np.ndarray  # (bins,) offline GPU-equivalents of work done in each bin of the horizon
    left: np.ndarray  # (bins,) backlog left at the end of each bin of the horizon, fraction
    bins_run: int


def run_jobs(rate: np.ndarray, layout: Layout, jobs: np.ndarray, bin_h: float, max_bins: int,
             progress: Progress | None = None, stage: str = "") -> JobRun:
    """Greedy FIFO offline backlog over the GPUs, bin by bin; the online trace repeats after the horizon.

    rate is (services, bins): offline work per hour on a GPU shared with that service's replica; offline-only
    GPUs run at 1, GPUs of unshared replicas at 0.
    """
    S, T = rate.shape
    G = len(layout.service)
    idx = np.where(layout.service < 0, S + 1, np.where(layout.shared, layout.service, S))
    table = np.zeros(S + 2)
    table[S + 1] = 1.0
    finish = np.full(len(jobs), np.nan)
    job = np.full(G, -1, dtype=np.int64)
    remaining = np.zeros(G)
    nxt = 0
    shared_count = np.bincount(layout.service[layout.shared], minlength=S).astype(float)
    active = np.zeros((S, T))
    offline = np.zeros(T)
    left = np.zeros(T)
    total = float(jobs.sum()) or 1.0
    done_work = 0.0
    t = 0
    while t < max_bins and (nxt < len(jobs) or (job >= 0).any()):
        table[:S] = rate[:, t % T]
        speed = table[idx]  # work per hour
        cap = speed * bin_h
        spare = cap.copy()
        used_bin = 0.0
        first = True
        while True:
            # a GPU without a job pulls the next one from the queue only when it can work on it now
            idle = np.flatnonzero((job < 0) & (spare > 1e-12))
            k = min(len(idle), len(jobs) - nxt)
            job[idle[:k]] = np.arange(nxt, nxt + k)
            remaining[idle[:k]] = jobs[nxt: nxt + k]
            nxt += k
            if t < T and first:  # replicas' GPUs that carry an offline job in this bin
                busy = layout.shared & (job >= 0)
                active[:, t] = np.bincount(layout.service[busy], minlength=S) / np.maximum(shared_count, 1.0)
                first = False
            on = job >= 0
            use = np.where(on, np.minimum(spare, remaining), 0.0)
            remaining -= use
            spare -= use
            used_bin += use.sum()
            fin = np.flatnonzero(on & (remaining <= 1e-12) & (use > 0))
            if len(fin) == 0:
                break
            finish[job[fin]] = t * bin_h + (cap[fin] - spare[fin]) / speed[fin]
            job[fin] = -1
            if nxt >= len(jobs) or not (spare[fin] > 1e-12).any():
                break
        done_work += used_bin
        if t < T:
            offline[t] = used_bin / bin_h
            left[t] = 1.0 - done_work / total
        t += 1
        if progress and (t % 60 == 0):
            progress(stage, done_work, total)
    if progress:
        progress(stage, total, total)
    if t < T:
        left[t:] = 1.0 - done_work / total
    return JobRun(finish, active, offline, left, t)


def percent(x: float) -> float:
    return round(100.0 * float(x), 3)


@dataclass
class Fleet:
    """Today's fleet under the workload, and what every strategy's run shares."""

    work: Workload
    cfg: FleetConfig
    cal: Calibration
    peak: np.ndarray  # (services,) peak demand, busy GPUs
    n_ded: np.ndarray  # (services,) dedicated replicas that keep the peak within the SLO
    today: np.ndarray  # (services,) replicas today
    online_gpus: int
    offline_gpus: int
    u: np.ndarray  # (services, bins) utilisation of today's replicas
    requests: np.ndarray  # (services, bins) requests per second: weights for SLO shares
    jobs: np.ndarray  # offline job sizes, GPU-hours alone
    slo: float  # the bound that online p99 ratios are compared with
    over_alone: np.ndarray  # (services, bins) over the SLO without a tenant

    @property
    def bin_h(self) -> float:
        return self.work.bin_minutes / 60.0

    @property
    def bin_s(self) -> float:
        return self.work.bin_minutes * 60.0

    def rates(self, s: model.Strategy, util: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Offline work per hour on a GPU shared with each service's replica, and reclaim events per bin."""
        rt = self.cfg.runtime
        half_life_bins = rt.reserve.decay_seconds / self.bin_s
        events = model.reclaim_events(util, half_life_bins, rt.reserve.margin_ratio) if s.gated else 0.0
        r = model.offline_rate(util, s, self.work.request_gpu_s[:, None], self.cal, rt.idle_hysteresis_ms / 1000.0,
                               rt.max_preemptions_per_second, events, self.bin_s)
        return r, np.asarray(events)


def today_fleet(work: Workload, cfg: FleetConfig, cal: Calibration, dedicated: model.Strategy) -> Fleet:
    """Today's replicas (the trace's, else dedicated ones for the peak), their utilisation and the backlog."""
    peak = work.demand.max(axis=1)
    n_ded = model.replicas_for(peak, model.max_util(cfg.slo, work.cv, dedicated), cfg.min_replicas)
    today = np.where(work.replicas > 0, work.replicas, n_ded)
    online_gpus = int(today.sum())
    if online_gpus > cfg.gpus:
        raise ValueError(f"online services need {online_gpus} GPUs today, more than the fleet's {cfg.gpus}")
    offline_gpus = cfg.gpus - online_gpus
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(today[:, None] > 0, work.demand / np.maximum(today, 1)[:, None], 0.0)
    requests = work.demand / work.request_gpu_s[:, None]
    rng = np.random.default_rng(cfg.seed + 7919)
    jobs = job_sizes(rng, cfg.offline_backlog * offline_gpus * work.hours, cfg.offline_job_hours,
                     cfg.offline_job_sigma)
    slo = cfg.slo * (1.0 + 1e-9)
    over_alone = model.queue_factor(u, work.cv[:, None]) > slo
    return Fleet(work, cfg, cal, peak, n_ded, today, online_gpus, offline_gpus, u, requests, jobs, slo, over_alone)


def place_today(fleet: Fleet, progress: Progress | None) -> Layout:
    """Valve's pairs on today's fleet, placed by the operator's placement function."""
    if progress:
        progress("placement", 0, 1)
    cfg = fleet.cfg
    layout = place_pairs(fleet.today, fleet.work, fleet.u.mean(axis=1), cfg.gpus, cfg.gpus_per_node)
    if progress:
        progress("placement", 1, 1)
    return layout


def dedicated_layout(fleet: Fleet) -> Layout:
    """Today's replicas on GPUs of their own, then the offline GPUs."""
    services = len(fleet.today)
    return Layout(np.concatenate([np.repeat(np.arange(services), fleet.today), np.full(fleet.offline_gpus, -1)]),
                  np.zeros(fleet.cfg.gpus, dtype=bool))


def run_today(s: model.Strategy, fleet: Fleet, lay: Layout, progress: Progress | None) -> tuple[dict, dict]:
    """One strategy on today's fleet: its statistics and its time series."""
    work, cfg, u, today, requests = fleet.work, fleet.cfg, fleet.u, fleet.today, fleet.requests
    max_bins = int(math.ceil(cfg.max_horizons * work.demand.shape[1]))
    rate, events = fleet.rates(s, u)
    run = run_jobs(rate, lay, fleet.jobs, fleet.bin_h, max_bins, progress, f"offline backlog: {s.label}")
    shared = run.active if s.colocate else np.zeros_like(u)
    p99_shared = model.online_p99(u, work.cv[:, None], s, np.ones_like(u))
    over = shared * (p99_shared > fleet.slo) + (1.0 - shared) * fleet.over_alone
    requests_over = requests * over
    served = shared * model.online_served(u, s, np.ones_like(u)) + (1 - shared) * np.minimum(u, 1.0)
    online_work = (served * today[:, None]).sum(axis=0)  # (bins,) busy-GPU units
    util = (online_work + run.offline_gpus) / cfg.gpus
    done = np.isfinite(run.finish)
    weight = requests.sum()
    stats = {
        "utilisation_pct": percent(util.mean()),
        "online_util_of_online_gpus_pct": percent(online_work.mean() / max(fleet.online_gpus, 1)),
        "offline_gpu_equivalents": round(float(run.offline_gpus.mean()), 3),
        "online_slo_violation_pct": percent(requests_over.sum() / weight) if weight > 0 else 0.0,
        "online_service_minutes_over_slo_pct": percent((over * (today[:, None] > 0)).mean()),
        "online_unserved_pct": percent(1.0 - online_work.sum() / max(
            (np.minimum(u, 1.0) * today[:, None]).sum(), 1e-12)),
        "offline_backlog_done_h": round(float(np.nanmax(run.finish)), 2) if done.all() and len(fleet.jobs) else None,
        "offline_backlog_done_in_horizon_pct": percent(1.0 - run.left[-1]),
        "offline_mean_job_done_h": round(float(np.nanmean(run.finish)), 2) if done.any() else None,
    }
    if s.gated:
        stats |= gate_stats(fleet, shared, events)
    series = {"utilisation": util, "slo_violation": requests_over.sum(axis=0) / np.maximum(
        requests.sum(axis=0), 1e-12), "backlog_left": run.left}
    return stats, series


def gate_stats(fleet: Fleet, shared: np.ndarray, events: np.ndarray) -> dict:
    """Preemptions and memory reclaims of the gated strategy, per shared GPU."""
    rt = fleet.cfg.runtime
    preempt = model.preemptions_per_s(fleet.u, fleet.work.request_gpu_s[:, None], rt.max_preemptions_per_second)
    per = (shared * fleet.today[:, None])
    return {
        "preemptions_per_gpu_s": round(float((preempt * per).sum() / max(per.sum(), 1e-12)), 3),
        "reclaims_per_gpu_h": round(float((events * per).sum() / max(per.sum(), 1e-12) / fleet.bin_h), 2),
    }


def add_savings(out: dict, strategies: list[model.Strategy]) -> None:
    """Each right-sized strategy's GPUs saved and utilisation gained against dedicated GPUs."""
    base = out["dedicated"]["right_sized"]
    for s in strategies:
        r = out[s.name]["right_sized"]
        r["gpus_saved"] = base["gpus_needed"] - r["gpus_needed"]
        r["gpus_saved_pct"] = percent(r["gpus_saved"] / base["gpus_needed"])
        r["utilisation_gain_pct"] = percent(r["utilisation_pct"] / base["utilisation_pct"] - 1.0)


def fleet_summary(fleet: Fleet) -> dict:
    """The fleet, its online demand and its offline backlog, as the results report them."""
    work, cfg = fleet.work, fleet.cfg
    return {
        "gpus": cfg.gpus,
        "nodes": len(node_sizes(cfg.gpus, cfg.gpus_per_node)),
        "gpus_per_node": cfg.gpus_per_node,
        "hours": work.hours,
        "bin_minutes": work.bin_minutes,
        "services": work.demand.shape[0],
        "service_classes": {c: work.classes.count(c) for c in sorted(set(work.classes))},
        "online_gpus_today": fleet.online_gpus,
        "offline_gpus_today": fleet.offline_gpus,
        "online_demand_mean_gpus": round(float(work.demand.sum(axis=0).mean()), 2),
        "online_demand_peak_gpus": round(float(work.demand.sum(axis=0).max()), 2),
        "offline_backlog_gpu_hours": round(float(fleet.jobs.sum()), 1),
        "offline_jobs": len(fleet.jobs),
    }


def downsampled_series(work: Workload, series: dict) -> dict:
    """The time series every 5 minutes, with their hours axis."""
    step = max(1, int(round(5.0 / work.bin_minutes)))
    hours_axis = (np.arange(0, work.demand.shape[1], step) + step / 2.0) * (work.bin_minutes / 60.0)
    return {"hours": hours_axis.round(4).tolist()} | {
        name: {k: downsample(v, step) for k, v in d.items()} for name, d in series.items()}


def simulate(work: Workload, cfg: FleetConfig, cal: Calibration, progress: Progress | None = None) -> dict:
    """Run every strategy on the workload; returns the results as a JSON-ready dict."""
    t_start = time.perf_counter()
    strategies = runtime_strategies(cal, cfg)
    fleet = today_fleet(work, cfg, cal, strategies[0])
    layout = place_today(fleet, progress)
    alone = dedicated_layout(fleet)
    out: dict = {}
    series: dict = {}
    for s in strategies:
        stats, series[s.name] = run_today(s, fleet, layout if s.colocate else alone, progress)
        sized = right_size(s, work, cfg, fleet.offline_gpus, fleet.n_ded, fleet.peak, fleet.rates)
        out[s.name] = {"label": s.label, "today": stats, "right_sized": sized}
    add_savings(out, strategies)
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k != "runtime"} | {"runtime": cfg.runtime.model_dump()},
        "calibration": cal.as_dict(),
        "fleet": fleet_summary(fleet),
        "placement": {"pairs": layout.pairs, "nodes_used": layout.nodes_used, "unpaired": layout.unpaired,
                      "unplaced": layout.unplaced,
                      "seconds": round(layout.placement_seconds, 4)},
        "strategies": out,
        "series": downsampled_series(work, series),
        "simulate_seconds": round(time.perf_counter() - t_start, 2),
    }


def runtime_strategies(cal: Calibration, cfg: FleetConfig) -> list[model.Strategy]:
    rt = cfg.runtime
    return model.strategies(cal, rt.idle_hysteresis_ms / 1000.0, rt.max_preemptions_per_second)


def right_sized(work: Workload, cfg: FleetConfig, cal: Calibration) -> dict:
    """Only the right-sized view of every strategy (no offline backlog run): what the sweep needs."""
    strategies = runtime_strategies(cal, cfg)
    fleet = today_fleet(work, cfg, cal, strategies[0])
    out = {s.name: {"label": s.label, "right_sized": right_size(s, work, cfg, fleet.offline_gpus, fleet.n_ded,
                                                                  fleet.peak, fleet.rates)} for s in strategies}
    add_savings(out, strategies)
    return out


def downsample(x: np.ndarray, step: int) -> list[float]:
    n = len(x) // step * step
    head = x[:n].reshape(-1, step).mean(axis=1)
    tail = [x[n:].mean()] if n < len(x) else []
    return [round(float(v), 5) for v in list(head) + tail]


def right_size(s: model.Strategy, work: Workload, cfg: FleetConfig, offline_target: int, n_ded: np.ndarray,
               peak: np.ndarray, rates) -> dict:
    """Fewest GPUs for the online SLO and `offline_target` GPU-equivalents of offline throughput.

    Each service shares its GPUs only if that needs fewer GPUs than keeping them dedicated (the extra replicas
    needed to absorb interference cost less than the offline work they carry).
    """
    online_work = float(work.demand.mean(axis=1).sum())
    if not s.colocate:
        need = int(n_ded.sum()) + offline_target
        return {"gpus_needed": need, "online_gpus": int(n_ded.sum()), "offline_gpus": offline_target,
                "services_shared": 0, "utilisation_pct": percent((online_work + offline_target) / max(need, 1)),
                "by_class": by_class(work, n_ded, np.zeros(len(n_ded), dtype=bool), np.zeros(len(n_ded)))}
    n_col = model.replicas_for(peak, model.max_util(cfg.slo, work.cv, s, True), cfg.min_replicas)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(n_col[:, None] > 0, work.demand / np.maximum(n_col, 1)[:, None], 0.0)
    rate, _ = rates(s, u)
    carried = n_col * rate.mean(axis=1)  # offline GPU-equivalents on the service's GPUs
    share = choose_shared(n_col - n_ded, carried, n_col > 0, offline_target)
    online = int(np.where(share, n_col, n_ded).sum())
    offline = int(math.ceil(max(0.0, offline_target - float(carried[share].sum())) - 1e-9))
    need = online + offline
    extra_nodes = 0
    if s.gated and share.any():  # the operator's placement must fit the pairs on a fleet of this size
        pairs = np.where(share, n_col, 0)
        for _ in range(8):
            gpus = need + extra_nodes * cfg.gpus_per_node
            lay = place_pairs(pairs, work, u.mean(axis=1), gpus, cfg.gpus_per_node, pre_used=need - int(pairs.sum()))
            if lay.unpaired == 0:
                break
            extra_nodes += int(math.ceil(lay.unpaired / cfg.gpus_per_node))
        need += extra_nodes * cfg.gpus_per_node
    return {"gpus_needed": need, "online_gpus": online, "offline_gpus": offline, "services_shared": int(share.sum()),
            "offline_carried_by_shared_gpus": round(float(carried[share].sum()), 2),
            "extra_nodes_for_placement": extra_nodes,
            "utilisation_pct": percent((online_work + offline_target) / max(need, 1)),
            "by_class": by_class(work, np.where(share, n_col, n_ded), share, np.where(share, carried, 0.0))}


def by_class(work: Workload, gpus: np.ndarray, share: np.ndarray, carried: np.ndarray) -> dict:
    """Online GPUs, services sharing and offline GPU-equivalents carried, per service class."""
    out = {}
    cls = np.array(work.classes)
    for c in sorted(set(work.classes)):
        m = cls == c
        out[c] = {"services": int(m.sum()), "online_gpus": int(gpus[m].sum()), "services_shared": int(share[m].sum()),
                  "offline_carried": round(float(carried[m].sum()), 2),
                  "online_mean_busy_gpus": round(float(work.demand[m].mean(axis=1).sum()), 2)}
    return out


def choose_shared(extra: np.ndarray, carried: np.ndarray, ok: np.ndarray, target: float) -> np.ndarray:
    """Which services share their GPUs: greedy by extra online GPUs per offline GPU-equivalent carried.

    Sharing service i costs extra[i] more online GPUs (to absorb interference) and carries carried[i] of
    offline work; it pays while the offline work still needed is more than the extra GPUs.
    """
    share = np.zeros(len(extra), dtype=bool)
    need = float(target)
    order = np.argsort(np.where(carried > 0, extra / np.maximum(carried, 1e-12), np.inf), kind="stable")
    for i in order:
        if not ok[i] or carried[i] <= 0:
            continue
        if extra[i] <= 0 or extra[i] < min(carried[i], need):
            share[i] = True
            need -= carried[i]
    return share
