"""Prometheus metrics of the DRA driver (names in docs/metrics.md), served like the device plugin's."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from valve.device_plugin.metrics import MetricsEndpoint

RESULTS = ("ok", "error")  # the `result` label: the claim's entry in the kubelet's answer had no error, or one


class DraMetrics(MetricsEndpoint):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.prepared = Gauge("valve_dra_prepared_claims", "Claims prepared on this node (in the checkpoint).",
                              registry=r)
        self.prepares = Counter("valve_dra_prepare_total", "Claims NodePrepareResources answered, by result.",
                                ["result"], registry=r)
        self.unprepares = Counter("valve_dra_unprepare_total", "Claims NodeUnprepareResources answered, by "
                                  "result.", ["result"], registry=r)
        self.publish_errors = Counter("valve_dra_publish_errors_total", "ResourceSlice publish attempts the API "
                                      "server refused or did not answer.", registry=r)
        self.socket_restarts = Counter("valve_dra_socket_restarts_total", "Times a kubelet-facing socket was "
                                       "found deleted and served again.", registry=r)
        for result in RESULTS:  # export 0 before the first call
            self.prepares.labels(result)
            self.unprepares.labels(result)

    def track_prepared(self, count: Callable[[], int]) -> None:
        """The prepared-claims gauge reads `count` at each scrape (the checkpoint is the one record)."""
        self.prepared.set_function(count)
