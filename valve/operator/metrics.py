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


def set_pairs(phases: Iterable[str]) -> None:
    """Set `valve_pairs{phase}` from the current phase of every pair (all phases, zeros included)."""
    counts = {p.value: 0 for p in Phase}
    for phase in phases:
        counts[phase] = counts.get(phase, 0) + 1
    for phase, n in counts.items():
        PAIRS.labels(phase=phase).set(n)
