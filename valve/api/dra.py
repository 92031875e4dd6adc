"""Dynamic Resource Allocation (resource.k8s.io/v1): the names and shapes the Valve DRA driver, the operator and
the Helm chart agree on.

- The driver `gpu.valve.io` publishes one device per GPU in a ResourceSlice per node; a device's name is its GPU
  UUID in lower case (`GPU-5d0c…` -> `gpu-5d0c…`, a DNS label), so whoever reads an allocation knows the GPU
  without reading ResourceSlices.
- The DeviceClass `gpu.valve.io` selects those devices.
- A pair shares one ResourceClaim with two requests, `online` and `offline`, both on one device (the constraint
  `matchAttribute: gpu.valve.io/uuid`); the device allows multiple allocations (KEP-5075) and has a `tenants`
  capacity of 2 that each request takes 1 of, so at most one online and one offline tenant share a GPU. Each
  container names its request; the role the driver gives it (`VALVE_ROLE`) is that name.
- The claim's opaque configuration for the driver is a `ClaimConfig` (`valve.io/v1alpha1`, kind
  `ColocationConfig`): the same `RuntimeSettings` model as the ColocationPair's `spec.runtime`, and the offline
  gate mode.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field

from valve.api.colocation import _CAMEL, RuntimeSettings
from valve.api.contract import GROUP, OFFLINE, ONLINE, ROLES

DRIVER = f"gpu.{GROUP}"  # the driver name, the DeviceClass name and the attribute domain
DEVICE_CLASS = DRIVER
RESOURCE_API = "resource.k8s.io/v1"
RESOURCE_GROUP, RESOURCE_VERSION = RESOURCE_API.split("/")
CONFIG_API_VERSION = f"{GROUP}/v1alpha1"
CONFIG_KIND = "ColocationConfig"
TENANTS = "tenants"  # the per-device capacity a request consumes one of
ATTR_UUID = f"{DRIVER}/uuid"  # fully qualified, as constraints name it
REQUESTS = ROLES  # request names in a pair's claim: the container's role
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

GateMode = Literal["hooks", "preload", "none"]


class ClaimConfig(BaseModel):
    """The opaque per-claim configuration of `gpu.valve.io` (DeviceClaimConfiguration.opaque.parameters)."""

    model_config = _CAMEL

    api_version: Literal[CONFIG_API_VERSION] = Field(CONFIG_API_VERSION, alias="apiVersion")  # type: ignore[valid-type]
    kind: Literal[CONFIG_KIND] = CONFIG_KIND  # type: ignore[valid-type]
    gate: GateMode = Field("hooks", description="The offline request's gate: preload puts libvalvegate.so in its "
                           "LD_PRELOAD (and mounts it from the node); hooks and none add nothing.")
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)


def device_name(uuid: str) -> str:
    """The device of a GPU in the ResourceSlice: its UUID in lower case."""
    name = uuid.lower()
    if len(name) > 63 or not _DNS_LABEL.match(name):
        raise ValueError(f"GPU UUID {uuid!r} does not make a DNS label device name")
    return name


def uuid_of(device: str) -> str | None:
    """The GPU UUID of a device name (the inverse of device_name for NVML's `GPU-<uuid>`), else None."""
    return "GPU-" + device[4:] if device.startswith("gpu-") else None


def slice_name(node: str) -> str:
    """The one ResourceSlice of a node (a node name is a DNS subdomain, at most 253 characters)."""
    return f"{node}-{DRIVER}"[:253].rstrip("-.")


def device_class() -> dict[str, Any]:
    return {
        "apiVersion": RESOURCE_API,
        "kind": "DeviceClass",
        "metadata": {"name": DEVICE_CLASS, "labels": {"app.kubernetes.io/part-of": "valve"}},
        "spec": {"selectors": [{"cel": {"expression": f"device.driver == '{DRIVER}'"}}]},
    }


def claim_config(gate: GateMode, runtime: RuntimeSettings) -> dict[str, Any]:
    return ClaimConfig(gate=gate, runtime=runtime).model_dump(by_alias=True, mode="json")


def pair_claim(name: str, namespace: str, config: dict[str, Any],
               owner: dict[str, Any] | None = None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The ResourceClaim two pods share: one GPU for the `online` and the `offline` request."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = dict(labels)
    if owner:
        meta["ownerReferences"] = [owner]
    return {
        "apiVersion": RESOURCE_API,
        "kind": "ResourceClaim",
        "metadata": meta,
        "spec": {"devices": {
            "requests": [{"name": r, "exactly": {"deviceClassName": DEVICE_CLASS, "allocationMode": "ExactCount",
                                                  "count": 1}} for r in (ONLINE, OFFLINE)],
            "constraints": [{"requests": [ONLINE, OFFLINE], "matchAttribute": ATTR_UUID}],
            "config": [{"opaque": {"driver": DRIVER, "parameters": config}}],
        }},
    }


def allocation(claim: dict[str, Any] | None) -> dict[str, Any]:
    """What a claim's allocation says: {node, devices: {request: device}, gpus: {request: uuid}}; {} if none."""
    alloc = ((claim or {}).get("status") or {}).get("allocation")
    if not alloc:
        return {}
    results = [r for r in ((alloc.get("devices") or {}).get("results") or []) if r.get("driver") == DRIVER]
    devices = {r.get("request"): r.get("device") for r in results}
    node = None
    for term in ((alloc.get("nodeSelector") or {}).get("nodeSelectorTerms") or []):
        for field in term.get("matchFields") or []:
            if field.get("key") == "metadata.name" and len(field.get("values") or []) == 1:
                node = field["values"][0]
    pools = {r.get("pool") for r in results}
    if node is None and len(pools) == 1:
        node = pools.pop()  # the driver names its pool after the node
    return {"node": node, "devices": devices, "gpus": {req: uuid_of(dev) for req, dev in devices.items() if dev}}
