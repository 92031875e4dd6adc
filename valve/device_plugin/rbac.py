"""The API access the device plugin needs (Kubernetes PolicyRules for the chart's ClusterRole).

Exactly what the pod annotator (annotate.py) calls: get a pod to compare its annotations, patch them.
The node's pods come from the kubelet PodResources socket, not from the API server (no list or watch).
"""

from __future__ import annotations

RULES: list[dict[str, list[str]]] = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]},
]
