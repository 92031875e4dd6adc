"""The operator's Prometheus metrics (names from docs/metrics.md)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from valve.api.colocation import Phase

PAIRS = Gauge("valve_pairs", "ColocationPairs by phase.", ["phase"])
PLACEMENT_LATENCY = Histogram(
    "valve_placement_latency_seconds",
    "Seconds from the operator first seeing a pair to placing it on a node.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
RECONCILE_ERRORS = Counter("valve_reconcile_errors", "Reconciliations of a pair that raised an error.")
RESYNCS = Counter("valve_operator_resyncs", "Completed resync passes over every pair.")
# Per ColocationPolicy: the counts of the status plan_policy computes (onlinePods, harvestedGPUs, offlinePods).
POLICY_ONLINE_PODS = Gauge("valve_policy_online_pods", "Online pods a ColocationPolicy's selector matches.",
                           ["namespace", "policy"])
POLICY_HARVESTED_GPUS = Gauge("valve_policy_harvested_gpus", "GPUs of a ColocationPolicy's online pods that get an "
                              "offline pod.", ["namespace", "policy"])
POLICY_OFFLINE_PODS = Gauge("valve_policy_offline_pods", "A ColocationPolicy's offline pods (not being deleted) by "
                            "phase.", ["namespace", "policy", "phase"])
POD_PHASES = ("Pending", "Running", "Succeeded", "Failed", "Unknown")


def set_pairs(phases: Iterable[str]) -> None:
    """Set `valve_pairs{phase}` from the current phase of every pair (all phases, zeros included)."""
    counts = {p.value: 0 for p in Phase}
    for phase in phases:
        counts[phase] = counts.get(phase, 0) + 1
    for phase, n in counts.items():
        PAIRS.labels(phase=phase).set(n)


def set_policy(namespace: str, policy: str, online: int, harvested: int, offline: dict[str, int]) -> None:
    """Set one policy's series (every pod phase, zeros included)."""
    POLICY_ONLINE_PODS.labels(namespace, policy).set(online)
    POLICY_HARVESTED_GPUS.labels(namespace, policy).set(harvested)
    for phase in POD_PHASES:
        POLICY_OFFLINE_PODS.labels(namespace, policy, phase).set(offline.get(phase, 0))


def forget_policy(namespace: str, policy: str) -> None:
    """Remove a deleted policy's series (else its last values stay exported for ever)."""
    series = [(g, (namespace, policy)) for g in (POLICY_ONLINE_PODS, POLICY_HARVESTED_GPUS)]
    series += [(POLICY_OFFLINE_PODS, (namespace, policy, phase)) for phase in POD_PHASES]
    for gauge, labels in series:
        try:
            gauge.remove(*labels)
        except KeyError:  # never set: the operator restarted after the policy's last reconcile
            pass
