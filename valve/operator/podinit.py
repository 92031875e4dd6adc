"""The init container of a pair's pods (`valve pod-init`): wait for the pod's GPU, link its folder.

A sidecar mounts the host's runtime root only at its own GPU's folder (`subPathExpr: $(VALVE_GPU_UUID)`, the env
from the GPU annotation), and the runtime looks for `<runtime dir>/<uuid>/control`. This container runs after
the kubelet has allocated the GPU: it waits for the device plugin's annotation (so the sidecars' env is resolved
once it exists) and writes the link `<links>/<uuid> -> <target>` the sidecars see at their runtime dir.
"""

from __future__ import annotations

import os
from pathlib import Path

from valve.api.contract import ANN_GPU


def check_uuid(value: str) -> str:
    """One GPU UUID that is safe as a path component; ValueError otherwise."""
    value = value.strip()
    if "," in value:
        raise ValueError(f"annotation {ANN_GPU} names several GPUs ({value}); a pair's pod has one")
    if not value or "/" in value or value in (".", "..") or len(value) > 128:
        raise ValueError(f"annotation {ANN_GPU} is not a GPU UUID: {value!r}")
    return value


def link_gpu_dir(uuid: str, links: Path, target: Path) -> Path:
    """`<links>/<uuid> -> target`, replacing a stale link of an earlier run of the container."""
    link = Path(links) / check_uuid(uuid)
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    return link


def run(gpu_from: Path, links: Path, target: Path, timeout_s: float) -> str:
    from valve.runtime.podinfo import wait_for_annotation

    uuid = check_uuid(wait_for_annotation(gpu_from, ANN_GPU, timeout_s=timeout_s))
    link_gpu_dir(uuid, links, target)
    return uuid
