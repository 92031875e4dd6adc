"""Preparing and unpreparing claims (what NodePrepareResources / NodeUnprepareResources do), free of gRPC.

A claim is prepared once: its allocation is read from the API server, checked against this node's devices, and
turned into a CDI spec file and a checkpoint entry. Asked again (the kubelet retries, a second pod of the pair
starts, the driver restarted), the checkpoint answers without reading the claim again. Every failure is the
claim's own one-line error; one bad claim never fails the others in the same call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from valve.api.contract import OFFLINE, PRELOAD_LIBRARY, ROLES
from valve.api.dra import (
    CONFIG_API_VERSION,
    CONFIG_KIND,
    DRIVER,
    RESOURCE_GROUP,
    RESOURCE_VERSION,
    ClaimConfig,
)
from valve.device_plugin.backend import GpuInfo
from valve.device_plugin.service import ensure_runtime_dir
from valve.dra import cdi
from valve.dra.checkpoint import Checkpoint

log = logging.getLogger(__name__)


class ClaimError(Exception):
    """This claim cannot be prepared; the message is the per-claim error the kubelet reports."""


@dataclass(frozen=True)
class ClaimRef:
    namespace: str
    uid: str
    name: str

    def __str__(self) -> str:
        return f"ResourceClaim {self.namespace}/{self.name} (uid {self.uid})"


class ClaimSource(Protocol):
    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The ResourceClaim as the API server has it, None if there is none; raises on other failures."""
        ...


class KubeClaims:
    """ResourceClaims read through the kubernetes client (`get` only, as valve.dra.rbac.RULES grants)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.get_namespaced_custom_object(RESOURCE_GROUP, RESOURCE_VERSION, namespace,
                                                         "resourceclaims", name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise


@dataclass(frozen=True)
class DriverConfig:
    node_name: str
    cdi_dir: Path
    runtime_root: Path
    state_dir: Path
    runtime_dir_mode: int = 0o700
    gpu_cdi_kind: str | None = "nvidia.com/gpu"  # the GPU's own CDI device (NVIDIA's spec); None: ours only
    preload_library: str = PRELOAD_LIBRARY


def config_error(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'parameters'}: {err['msg']}" for err in e.errors())


def claim_config(allocation: dict[str, Any], request: str) -> ClaimConfig:
    """The driver's opaque configuration that applies to a request (class configs first, then the claim's: the
    last one wins), else the defaults."""
    found: dict[str, Any] | None = None
    for entry in (allocation.get("devices") or {}).get("config") or []:
        opaque = entry.get("opaque") or {}
        if opaque.get("driver") != DRIVER:
            continue  # another driver's: not ours to judge
        if entry.get("requests") and request not in entry["requests"]:
            continue
        found = opaque.get("parameters")
    if found is None:
        return ClaimConfig()
    if not isinstance(found, dict):
        raise ClaimError(f"config for {DRIVER}: parameters must be an object ({CONFIG_API_VERSION} "
                         f"{CONFIG_KIND}), got {type(found).__name__}")
    try:
        return ClaimConfig.model_validate(found)
    except ValidationError as e:
        raise ClaimError(f"config for {DRIVER} ({CONFIG_API_VERSION} {CONFIG_KIND}): {config_error(e)}") from None


def allocated_devices(ref: ClaimRef, claim: dict[str, Any] | None, node: str,
                      gpus: dict[str, GpuInfo]) -> tuple[list[cdi.PreparedDevice], dict[str, Any]]:
    """This node's devices in the claim's allocation, one per request, and the allocation; or a ClaimError."""
    if claim is None:
        raise ClaimError(f"{ref}: not found")
    if not isinstance(claim, dict) or not isinstance(claim.get("metadata"), dict):
        raise ClaimError(f"{ref}: malformed object from the API server")
    uid = claim["metadata"].get("uid")
    if uid != ref.uid:
        raise ClaimError(f"{ref}: the API server has uid {uid} (the claim was replaced)")
    allocation = (claim.get("status") or {}).get("allocation")
    if not isinstance(allocation, dict):
        raise ClaimError(f"{ref}: not allocated")
    results = [r for r in (allocation.get("devices") or {}).get("results") or []
               if isinstance(r, dict) and r.get("driver") == DRIVER]
    if not results:
        raise ClaimError(f"{ref}: no device of driver {DRIVER} in its allocation")
    out = []
    for r in results:
        request, pool, name = r.get("request"), r.get("pool"), r.get("device")
        if request not in ROLES:
            raise ClaimError(f"{ref}: request {request!r}: a {DRIVER} request is named after its role, "
                             f"{' or '.join(ROLES)}")
        gpu = gpus.get(name or "")
        if pool != node or gpu is None:
            raise ClaimError(f"{ref}: device {pool}/{name} is not on this node ({node}: "
                             f"{', '.join(sorted(gpus)) or 'no devices'})")
        out.append(cdi.PreparedDevice(request=request, pool=pool, device=name, uuid=gpu.uuid))
    if len({d.request for d in out}) != len(out):
        raise ClaimError(f"{ref}: more than one device for a request; a {DRIVER} request takes one GPU")
    return out, allocation


class Driver:
    """Claims in, CDI devices out; the checkpoint keeps what is prepared."""

    def __init__(self, cfg: DriverConfig, gpus: Sequence[GpuInfo], claims: ClaimSource,
                 device_name: Callable[[str], str]) -> None:
        self.cfg = cfg
        self.gpus = {device_name(g.uuid): g for g in gpus}
        self.claims = claims
        self.checkpoint = Checkpoint(cfg.state_dir / "checkpoint.json")
        self._lock = threading.Lock()  # one change at a time: the kubelet may call for several pods at once

    def prepare(self, ref: ClaimRef) -> list[tuple[cdi.PreparedDevice, list[str]]]:
        """The claim's devices and their CDI IDs (idempotent); raises ClaimError."""
        if not (ref.uid and ref.name and ref.namespace):
            raise ClaimError(f"claim namespace={ref.namespace!r} name={ref.name!r} uid={ref.uid!r}: the kubelet "
                             "must give namespace, name and uid")
        with self._lock:
            entry = self.checkpoint.get(ref.uid)
            if entry is None:
                entry = self._prepare_new(ref)
            else:
                self._ensure_spec(ref.uid, entry)  # e.g. a tmpfs CDI dir emptied by a reboot
        devices = [cdi.PreparedDevice(**d) for d in entry["devices"]]
        return [(d, cdi.cdi_ids(ref.uid, d, self.cfg.gpu_cdi_kind)) for d in devices]

    def _prepare_new(self, ref: ClaimRef) -> dict[str, Any]:
        try:
            claim = self.claims.get(ref.namespace, ref.name)
        except Exception as e:
            raise ClaimError(f"{ref}: cannot read it from the API server: {first_line(e)}") from None
        devices, allocation = allocated_devices(ref, claim, self.cfg.node_name, self.gpus)
        configs = {d.request: claim_config(allocation, d.request) for d in devices}
        offline = configs.get(OFFLINE)
        runtime = next(iter(configs.values())).runtime.runtime_spec().model_dump_json()
        entry = {
            "namespace": ref.namespace,
            "name": ref.name,
            "devices": [d.to_json() for d in devices],
            "edits": {"preload": offline is not None and offline.gate == "preload", "runtimeSpec": runtime},
        }
        for d in devices:
            ensure_runtime_dir(self.cfg.runtime_root, d.uuid, self.cfg.runtime_dir_mode)
        self._write_spec(ref.uid, entry)
        self.checkpoint.put(ref.uid, entry)  # after the spec: a claim in the checkpoint always has its spec
        log.info("prepared %s: %s", ref, ", ".join(f"{d.request}={d.uuid}" for d in devices))
        return entry

    def _edits(self, entry: dict[str, Any]) -> cdi.Edits:
        edits = entry.get("edits") or {}
        return cdi.Edits(runtime_root=self.cfg.runtime_root,
                         preload_library=self.cfg.preload_library if edits.get("preload") else None,
                         runtime_spec_json=edits.get("runtimeSpec"))

    def _write_spec(self, uid: str, entry: dict[str, Any]) -> None:
        devices = [cdi.PreparedDevice(**d) for d in entry["devices"]]
        cdi.write_atomic(cdi.spec_path(self.cfg.cdi_dir, uid), cdi.spec(uid, devices, self._edits(entry)))

    def _ensure_spec(self, uid: str, entry: dict[str, Any]) -> None:
        if not cdi.spec_path(self.cfg.cdi_dir, uid).exists():
            self._write_spec(uid, entry)

    def unprepare(self, ref: ClaimRef) -> bool:
        """Remove the claim's CDI spec and checkpoint entry; True if it was prepared (unknown: nothing to do)."""
        if not ref.uid:
            raise ClaimError(f"claim {ref.namespace}/{ref.name}: the kubelet must give its uid")
        with self._lock:
            cdi.spec_path(self.cfg.cdi_dir, ref.uid).unlink(missing_ok=True)
            known = self.checkpoint.remove(ref.uid)
        if known:
            log.info("unprepared %s", ref)
        return known

    def prepared(self) -> list[str]:
        return sorted(self.checkpoint.claims)


def first_line(e: BaseException) -> str:
    status, reason = getattr(e, "status", None), getattr(e, "reason", None)
    if status is not None and reason is not None:  # the kubernetes client's ApiException: "(403)\nReason: ..."
        return f"{status} {reason}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
