"""The API access the operator needs: Kubernetes PolicyRules for the Helm chart's ClusterRole.

Exactly what the code uses (the end-to-end tests record every request and check both directions):
kopf watches pairs, policies, pods and nodes (list, watch); the handlers create and delete pods, patch the
pairs' and policies' status, read a policy's Job and create events. The admission webhook needs no API access
(kopf does not manage its configuration: the chart does). kopf runs standalone: no peering (no kopf CRDs, no leases), no CRD or namespace
scanning, no annotations or finalizers on the pairs. API discovery (/api, /apis) is granted to every
authenticated user by the default `system:discovery` ClusterRole.
"""

from __future__ import annotations

from valve.api import colocation as c
from valve.api import policy as pol

RULES: list[dict[str, list[str]]] = [
    {"apiGroups": [c.GROUP], "resources": [c.PLURAL], "verbs": ["list", "watch", "get"]},
    {"apiGroups": [c.GROUP], "resources": [f"{c.PLURAL}/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    # ColocationPolicies: kopf lists and watches them; the operator writes their status and reads the Job a
    # policy names as its offline workload (get only: never changes it).
    {"apiGroups": [pol.GROUP], "resources": [pol.PLURAL], "verbs": ["list", "watch"]},
    {"apiGroups": [pol.GROUP], "resources": [f"{pol.PLURAL}/status"], "verbs": ["patch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get"]},
]
# Used only once a policy exists (its status) or names a Job: a run with pairs alone does not use them.
POLICY_ONLY = {(pol.GROUP, f"{pol.PLURAL}/status", "patch"), ("batch", "jobs", "get")}


def allows(rules: list[dict[str, list[str]]], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def request_verb(method: str, name: str | None, params: dict[str, str]) -> str:
    """The RBAC verb of an API request (as the API server's request-info resolver computes it)."""
    method = method.upper()
    if method == "GET":
        if params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if name else "list"
    if method == "POST":
        return "create"
    if method == "PUT":
        return "update"
    if method == "PATCH":
        return "patch"
    if method == "DELETE":
        return "delete" if name else "deletecollection"
    raise ValueError(f"no RBAC verb for {method}")


# Only where pairs use `spec.placement: dra` (the chart grants it with dra.enabled): the pair's ResourceClaim is
# read on each reconcile (its allocation: node, GPU) and created once. The pair owns it, so the garbage
# collector deletes it with the pair: no delete.
DRA_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["resource.k8s.io"], "resources": ["resourceclaims"], "verbs": ["get", "create"]},
]

# Only with `valve operator --peering NAME` (several replicas): kopf's peering objects (kopf's own CRDs,
# https://kopf.readthedocs.io/en/stable/peering/) — the namespaced kind with --namespace, else the cluster one.
PEERING_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings", "kopfpeerings"],
     "verbs": ["list", "watch", "patch", "get"]},
]
