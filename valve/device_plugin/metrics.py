"""Prometheus metrics of the device plugin (names from docs/metrics.md); the `gpu` label is the GPU UUID."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from valve.netaddr import host_port

log = logging.getLogger(__name__)


class MetricsEndpoint:
    """A component's own registry and its /metrics HTTP endpoint (the device plugin's, the DRA driver's)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._server: Any = None
        self.port: int | None = None

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Expose /metrics over HTTP; port 0 picks a free one. Returns the bound port."""
        try:
            self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:  # one line for the command's error, naming the option
            raise OSError(f"--metrics-port: cannot listen on {host_port(addr, port)}: {e.strerror or e}") from None
        self.port = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", addr, self.port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class PluginMetrics(MetricsEndpoint):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.devices = Gauge("valve_devices", "Devices advertised to the kubelet.", ["resource"], registry=r)
        self.healthy = Gauge(
            "valve_device_healthy", "1 if the device is advertised Healthy, else 0.", ["gpu", "resource"], registry=r
        )
        self.allocations = Counter(
            "valve_allocations_total", "Container allocations answered by Allocate.", ["resource"], registry=r
        )
        self.utilization = Gauge("valve_gpu_utilization_ratio", "GPU busy fraction (NVML), 0..1.", ["gpu"], registry=r)
        self.registered = Gauge("valve_device_plugin_registered", "1 while the resource is registered with the "
                                "kubelet, else 0.", ["resource"], registry=r)
        self.memory_used = Gauge("valve_gpu_memory_used_bytes", "GPU memory in use (NVML).", ["gpu"], registry=r)
        self.skipped = Gauge("valve_devices_skipped", "GPUs found but not advertised (mig: MIG mode enabled).",
                             ["reason"], registry=r)
        self.init_error = Gauge("valve_device_plugin_init_error", "1 while the plugin runs without advertising "
                                "anything: it could not initialise (--no-fail-on-init-error).", registry=r)
