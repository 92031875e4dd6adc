"""The API access the device plugin needs (Kubernetes PolicyRules for the chart's ClusterRole).

Exactly what the pod annotator (annotate.py) calls: get a pod to compare its annotations, patch them; and
list the node's pods (field selector spec.nodeName) to read the GPU a pending offline pod asks for
(`valve.io/want-gpu`) in GetPreferredAllocation; and get its own Node at start, to refuse a node whose
capacity already has nvidia.com/gpu (coexist.py). No watch.
"""

from __future__ import annotations

RULES: list[dict[str, list[str]]] = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "patch"]},
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
]
