"""The API access the DRA driver needs (Kubernetes PolicyRules for the chart's ClusterRole).

Exactly what the code calls: create, replace (update) and delete its node's ResourceSlice (slices.py), and get
the ResourceClaim the kubelet asks it to prepare, to read its allocation and configuration (driver.py). No list,
no watch.
"""

from __future__ import annotations

from valve.api.dra import RESOURCE_GROUP

RULES: list[dict[str, list[str]]] = [
    {"apiGroups": [RESOURCE_GROUP], "resources": ["resourceslices"], "verbs": ["create", "update", "delete"]},
    {"apiGroups": [RESOURCE_GROUP], "resources": ["resourceclaims"], "verbs": ["get"]},
]
