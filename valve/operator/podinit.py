"""The init container of a pair's pods (`valve pod-init`): wait for the pod's GPU, link its folder.

A sidecar mounts the host's runtime root only at its own GPU's folder (`subPathExpr: $(VALVE_GPU_UUID)`, the env
from the GPU annotation), and the runtime looks for `<runtime dir>/<uuid>/control`. This container runs after
the kubelet has allocated the GPU: it waits for the device plugin's annotation (so the sidecars' env is resolved
once it exists) and writes the link `<links>/<uuid> -> <target>` the sidecars see at their runtime dir.

A pod holding several GPUs (`gpus` > 1, a tensor-parallel online replica): its sidecars mount the i-th GPU's folder
at `<target>-<i>` (`subPathExpr: $(VALVE_GPU_UUID_<i>)`, from the annotation `valve.io/gpu-uuid-<i>`); this waits
for the GPU list to name `gpus` GPUs and for each of those annotations, checks that they agree, and links each
`<links>/<uuid_i> -> <target>-<i>`. Never an empty or unchecked UUID: an empty `subPathExpr` would mount the whole
runtime root.
"""

from __future__ import annotations

import os
from pathlib import Path

from valve.api.contract import ANN_GPU, ann_gpu_index, sidecar_gpu_dir


def check_uuid(value: str) -> str:
    """One GPU UUID that is safe as a path component; ValueError otherwise."""
    value = value.strip()
    if "," in value:
        raise ValueError(f"annotation {ANN_GPU} names several GPUs ({value}); one was expected (--gpus)")
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


def indexed_target(target: Path, i: int) -> Path:
    """The i-th GPU's folder in a sidecar of a pod holding several, for the --target the sidecars mount."""
    return Path(sidecar_gpu_dir(i, str(target)))


def run(gpu_from: Path, links: Path, target: Path, timeout_s: float, gpus: int = 1) -> str:
    """Wait for the pod's GPU(s), write the link(s); the GPU list it linked (comma-separated)."""
    import time

    from valve.runtime.podinfo import wait_for_annotation

    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: expected 1 or more")
    if gpus == 1:
        uuid = check_uuid(wait_for_annotation(gpu_from, ANN_GPU, timeout_s=timeout_s))
        link_gpu_dir(uuid, links, target)
        return uuid
    deadline = time.monotonic() + timeout_s
    listed = [check_uuid(u) for u in wait_for_annotation(gpu_from, ANN_GPU, timeout_s=timeout_s).split(",")]
    if len(listed) != gpus or len(set(listed)) != gpus:
        raise ValueError(f"annotation {ANN_GPU} names {','.join(listed)}; this pod's sidecars expect {gpus} GPUs")
    # the device plugin writes these with the list, in one patch; waited for all the same (an older plugin)
    each = [check_uuid(wait_for_annotation(gpu_from, ann_gpu_index(i), timeout_s=max(0.0, deadline - time.monotonic())))
            for i in range(gpus)]
    if each != listed:
        raise ValueError(f"annotations {ann_gpu_index(0)}.. name {','.join(each)}, not {ANN_GPU}'s "
                         f"{','.join(listed)}")
    for i, uuid in enumerate(each):
        link_gpu_dir(uuid, links, indexed_target(target, i))
    return ",".join(each)
