"""Prometheus metrics of the arbiter's gate (names from docs/metrics.md). The arbiter owns the registry and
passes it to the memory metrics too, so one endpoint serves both."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREEMPTION_BUCKETS = (5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)


class GateMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, gpu: str = "0") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, g = self.registry, [gpu]
        self.preemptions = Counter("valve_preemptions_total", "Gate closures (one per online burst).", ["gpu"],
                                   registry=r).labels(*g)
        self.closed_seconds = Counter("valve_gate_closed_seconds_total", "Time the offline gate was closed.",
                                      ["gpu"], registry=r).labels(*g)
        self.inflight = Gauge("valve_online_inflight", "Online requests in flight.", ["gpu"], registry=r).labels(*g)
        self.preemption_latency = Histogram(
            "valve_preemption_latency_seconds", "Gate close to offline parked at the gate (where the backend can "
            "tell).", ["gpu"], buckets=PREEMPTION_BUCKETS, registry=r).labels(*g)
        self.offline_progress = Counter("valve_offline_progress_total", "Sub-layer gates the offline client "
                                        "passed.", ["gpu"], registry=r).labels(*g)
        # additions (to be listed in docs/metrics.md)
        self.forced_opens = Counter("valve_gate_forced_opens_total", "Gate opened by an offline client on a stale "
                                    "arbiter heartbeat.", ["gpu"], registry=r).labels(*g)
        self.recreated = Counter("valve_control_block_recreated_total", "Control file found truncated, replaced "
                                 "or of another version, and re-created.", ["gpu"], registry=r).labels(*g)
        self.capped = Counter("valve_preemptions_capped_total", "Online bursts that ran with the gate open because "
                              "the preemption rate cap was reached.", ["gpu"], registry=r).labels(*g)
        self.violations = Counter("valve_gate_violations_total", "Closed-gate periods in which the offline "
                                  "tenant worked anyway (enforced gate).", ["gpu"], registry=r).labels(*g)
        self.paused = Gauge("valve_offline_paused", "1 while the arbiter holds the offline process stopped "
                            "(enforce pause).", ["gpu"], registry=r).labels(*g)
