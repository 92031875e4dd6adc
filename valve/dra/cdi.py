"""CDI (Container Device Interface) spec files for prepared claims: one file per claim, one CDI device per request.

The container runtime reads `<cdi dir>/*.json` and applies a device's `containerEdits` to each container the
kubelet names it for (the containers that reference that request of the claim).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from valve.api.contract import ENV_RUNTIME_SPEC, OFFLINE
from valve.api.dra import DRIVER
from valve.device_plugin.service import allocation_env

CDI_VERSION = "0.6.0"
CDI_KIND = f"k8s.{DRIVER}/claim"  # vendor k8s.gpu.valve.io, class claim: the kind of the devices we write
SPEC_PREFIX = f"k8s.{DRIVER}-claim_"


@dataclass(frozen=True)
class PreparedDevice:
    request: str  # online | offline: the container's role
    pool: str
    device: str
    uuid: str

    def cdi_name(self, claim_uid: str) -> str:
        return f"{claim_uid}-{self.request}"

    def to_json(self) -> dict[str, str]:
        return {"request": self.request, "pool": self.pool, "device": self.device, "uuid": self.uuid}


@dataclass(frozen=True)
class Edits:
    """What the driver adds to a request's containers besides the GPU."""

    runtime_root: Path
    preload_library: str | None  # set: the offline request gets it in LD_PRELOAD (claim config gate: preload)
    runtime_spec_json: str | None  # the claim config's RuntimeSpec, for the arbiter (VALVE_RUNTIME_SPEC)


def spec_path(cdi_dir: Path, claim_uid: str) -> Path:
    return cdi_dir / f"{SPEC_PREFIX}{claim_uid}.json"


def container_edits(dev: PreparedDevice, edits: Edits) -> dict[str, Any]:
    env = allocation_env(dev.request, [dev.uuid], edits.runtime_root)
    if edits.runtime_spec_json is not None:
        env[ENV_RUNTIME_SPEC] = edits.runtime_spec_json
    gpu_dir = str(edits.runtime_root / dev.uuid)
    mounts = [{"hostPath": gpu_dir, "containerPath": gpu_dir, "options": ["rw", "rbind", "nosuid", "nodev"]}]
    if dev.request == OFFLINE and edits.preload_library:
        env["LD_PRELOAD"] = edits.preload_library
        mounts.append({"hostPath": edits.preload_library, "containerPath": edits.preload_library,
                       "options": ["ro", "bind", "nosuid", "nodev"]})
    return {"env": [f"{k}={v}" for k, v in env.items()], "mounts": mounts}


def spec(claim_uid: str, devices: Iterable[PreparedDevice], edits: Edits) -> dict[str, Any]:
    return {
        "cdiVersion": CDI_VERSION,
        "kind": CDI_KIND,
        "devices": [{"name": d.cdi_name(claim_uid), "containerEdits": container_edits(d, edits)} for d in devices],
    }


def cdi_ids(claim_uid: str, dev: PreparedDevice, gpu_kind: str | None) -> list[str]:
    """The CDI device IDs of one request: ours, and the GPU itself in the NVIDIA spec (`nvidia.com/gpu=<uuid>`,
    what `nvidia-ctk cdi generate` writes: device nodes, driver libraries) unless `gpu_kind` is None."""
    ids = [f"{CDI_KIND}={dev.cdi_name(claim_uid)}"]
    if gpu_kind:
        ids.append(f"{gpu_kind}={dev.uuid}")
    return ids


def write_atomic(path: Path, data: dict[str, Any], mode: int = 0o644) -> None:
    """Write JSON so a reader (the runtime, a restarted driver) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
