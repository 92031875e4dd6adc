"""The node's ResourceSlice: one device per GPU with its attributes, published through the API server."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from valve.api.dra import (
    DRIVER,
    RESOURCE_API,
    RESOURCE_GROUP,
    RESOURCE_VERSION,
    TENANTS,
    device_name,
    slice_name,
)
from valve.device_plugin.backend import GpuInfo
from valve.dra.metrics import DraMetrics

log = logging.getLogger(__name__)
PLURAL = "resourceslices"


def device(gpu: GpuInfo, driver_version: str | None) -> dict[str, Any]:
    """One GPU as a DRA device. Attribute names without a domain are the driver's (`gpu.valve.io/uuid`)."""
    attributes: dict[str, dict[str, Any]] = {
        "uuid": {"string": gpu.uuid},
        "productName": {"string": gpu.name[:64]},
        "index": {"int": gpu.index},
        "pciBusID": {"string": gpu.pci_bus_id},
    }
    if gpu.numa_node is not None:
        attributes["numaNode"] = {"int": gpu.numa_node}
    if driver_version:
        # A string, not a `version`: NVIDIA's driver versions (580.159.04) are not semver (a leading zero).
        attributes["driverVersion"] = {"string": driver_version[:64]}
    return {
        "name": device_name(gpu.uuid),
        "attributes": attributes,
        # Several allocations of one device (KEP-5075): the online and the offline request of a pair's claim.
        # Each takes one of two tenants; memory is the GPU's, stated, not divided (no request consumes it).
        "allowMultipleAllocations": True,
        "capacity": {
            TENANTS: {"value": "2", "requestPolicy": {"default": "1", "validValues": ["1"]}},
            "memory": {"value": str(gpu.memory_bytes), "requestPolicy": {"default": "0",
                                                                          "validRange": {"min": "0"}}},
        },
    }


def resource_slice(node: str, gpus: Sequence[GpuInfo], driver_version: str | None, generation: int) -> dict[str, Any]:
    """The node's one slice: pool = the node's name (one slice in it), the devices, bound to the node."""
    return {
        "apiVersion": RESOURCE_API,
        "kind": "ResourceSlice",
        "metadata": {"name": slice_name(node), "labels": {"app.kubernetes.io/part-of": "valve"}},
        "spec": {
            "driver": DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": generation, "resourceSliceCount": 1},
            "devices": [device(g, driver_version) for g in gpus],
        },
    }


class SlicePublisher:
    """Create the slice, or replace it (an unconditional update: ResourceSlice allows it, so no `get` is
    needed); delete it when the node has no GPU to offer. Exactly the calls in valve.dra.rbac.RULES."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)

    def publish(self, body: dict[str, Any]) -> str:
        from kubernetes.client.exceptions import ApiException

        name = body["metadata"]["name"]
        if not body["spec"]["devices"]:
            try:
                self.api.delete_cluster_custom_object(RESOURCE_GROUP, RESOURCE_VERSION, PLURAL, name)
                return "deleted"
            except ApiException as e:
                if e.status == 404:
                    return "absent"
                raise
        try:
            self.api.create_cluster_custom_object(RESOURCE_GROUP, RESOURCE_VERSION, PLURAL, body)
            return "created"
        except ApiException as e:
            if e.status != 409:
                raise
        self.api.replace_cluster_custom_object(RESOURCE_GROUP, RESOURCE_VERSION, PLURAL, name, body)
        return "updated"


def publish_loop(publisher: SlicePublisher, body: dict[str, Any], stop: threading.Event,
                 published: threading.Event, retry_s: float = 5.0, refresh_s: float = 300.0,
                 metrics: DraMetrics | None = None) -> None:
    """Publish until it succeeds (retrying every `retry_s`), then again every `refresh_s` (a deleted slice
    comes back). `published` is set after the first success; each failed attempt counts in `metrics`."""
    metrics = metrics or DraMetrics()
    failed = None
    while not stop.is_set():
        try:
            outcome = publisher.publish(body)
        except Exception as e:  # API down, RBAC missing: say it once per distinct reason, keep trying
            metrics.publish_errors.inc()
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if reason != failed:
                log.warning("cannot publish ResourceSlice %s: %s (retrying every %.0f s)",
                            body["metadata"]["name"], reason, retry_s)
                failed = reason
            stop.wait(retry_s)
            continue
        if not published.is_set() or failed:
            log.info("ResourceSlice %s %s with %d device(s)", body["metadata"]["name"], outcome,
                     len(body["spec"]["devices"]))
        failed = None
        published.set()
        stop.wait(refresh_s)
