"""Not next to NVIDIA's device plugin: a node whose Node object already advertises `nvidia.com/gpu` has its
GPUs handed out by that plugin, and Valve advertising them again would give one GPU to two schedulers' tenants."""

from __future__ import annotations

import logging
from typing import Any

from valve.api.contract import LABEL_NODE_ENABLED

log = logging.getLogger(__name__)

NVIDIA_RESOURCE = "nvidia.com/gpu"


def nvidia_plugin_conflict(pods: Any, node: str | None) -> str | None:
    """Why this plugin must not start on `node` (its capacity has nvidia.com/gpu), or None. A Node that cannot be
    read (no API access, no NODE_NAME) is logged and not held against the node: the check cannot decide."""
    if not node:
        log.warning("NODE_NAME unknown: not checking whether NVIDIA's device plugin serves this node")
        return None
    try:
        capacity = pods.node_capacity(node)
    except Exception as e:  # no config, 403 without the nodes rule, API down
        log.warning("could not read Node %s to check for NVIDIA's device plugin (%s): going on",
                    node, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        return None
    count = str(capacity.get(NVIDIA_RESOURCE, "0")).strip()
    if count in ("", "0"):
        return None
    return (f"Node {node} already advertises {NVIDIA_RESOURCE}={count}: NVIDIA's device plugin serves its GPUs. "
            f"Remove it from this node (or its {LABEL_NODE_ENABLED}=true label), or pass --allow-nvidia-plugin "
            "(chart: devicePlugin.allowNvidiaPlugin=true) if you know the GPUs are split between the two")
