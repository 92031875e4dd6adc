"""Prometheus metrics of memory reclamation (names from docs/metrics.md), exported by the arbiter.

The arbiter owns the registry (pass it in; a private one otherwise) and the `gpu` label (the GPU UUID).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class MemoryMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, gpu: str = "0") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, g = self.registry, [gpu]
        self.reclaimed = Counter("valve_reclaimed_bytes_total", "Bytes the offline pool gave back on request.",
                                 ["gpu"], registry=r).labels(*g)
        self.latency = Histogram("valve_reclaim_latency_seconds", "Reclaim request to acknowledgement.", ["gpu"],
                                 buckets=LATENCY_BUCKETS, registry=r).labels(*g)
        self.reserve = Gauge("valve_memory_reserve_bytes", "Free GPU memory the arbiter keeps for online bursts.",
                             ["gpu"], registry=r).labels(*g)
        self.evicted = Counter("valve_evicted_sequences_total", "Offline sequences evicted by reclaims "
                               "(re-queued for recompute).", ["gpu"], registry=r).labels(*g)
        self.recomputed = Counter("valve_recomputed_tokens_total", "Tokens of evicted offline sequences, to be "
                                  "recomputed.", ["gpu"], registry=r).labels(*g)
        # additions (not in docs/metrics.md's first list)
        self.requests = Counter("valve_reclaim_requests_total", "Reclaim requests posted to the offline client.",
                                ["gpu"], registry=r).labels(*g)
        self.abandoned = Counter("valve_reclaim_abandoned_total", "Reclaim requests withdrawn or timed out "
                                 "without an answer.", ["gpu"], registry=r).labels(*g)
        self.timeouts = Counter("valve_reclaim_timeouts_total", "Reclaim requests the offline client did not "
                                "answer within the ack timeout.", ["gpu"], registry=r).labels(*g)
        self.shortfall = Gauge("valve_memory_reserve_shortfall_bytes", "Reserve the offline pool cannot cover "
                               "(0 when the reserve is met or can be).", ["gpu"], registry=r).labels(*g)
        self.offline_limit = Gauge("valve_offline_memory_limit_bytes", "The most the offline pool may hold now.",
                                   ["gpu"], registry=r).labels(*g)
