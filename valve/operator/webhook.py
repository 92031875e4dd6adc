"""The mutating admission webhook's decision for one pod (pure; the kopf handler in policy_handlers.py serves it).

A pod that a `ColocationPolicy` of its namespace selects gets the proxy sidecar, the init container that links its
GPU's runtime folder and the volumes (`pods.inject_online`, the functions a pair's online pod is built with); a pod
asking for several `valve.io/online-gpu` (tensor parallel) gets them for each of its GPUs. Any other pod is left
untouched, and so is a selected pod Valve cannot serve (no `valve.io/online-gpu` or not an integer, a reserved
name, an image the operator does not allow): the pod is admitted as it is, with a warning the client
shows, and the operator's policy status says why its GPU is not harvested. Nothing here refuses a pod.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from valve.api import policy as pol
from valve.api.contract import LABEL_POLICY, ONLINE_RESOURCE, RESERVED_CONTAINERS, RESERVED_VOLUMES
from valve.operator.pods import LABEL_MANAGED, MANAGED_BY, OperatorConfig, inject_online

PROXY = "valve-proxy"


def parse_policy(body: dict[str, Any]) -> tuple[pol.ColocationPolicySpec | None, str | None]:
    """The validated spec, or None and a one-line reason."""
    name = body["metadata"]["name"]
    if len(name) > pol.NAME_MAX:
        return None, f"name is {len(name)} characters long; at most {pol.NAME_MAX} (it names the offline pods)"
    try:
        return pol.ColocationPolicySpec.model_validate(body.get("spec") or {}), None
    except ValidationError as e:
        return None, "; ".join(f"spec.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())


def selecting(labels: dict[str, str], policies: Iterable[dict[str, Any]]) -> list[tuple[str, pol.ColocationPolicySpec]]:
    """The valid policies whose selector picks these labels, by name."""
    out = []
    for body in policies:
        if body["metadata"].get("deletionTimestamp"):
            continue
        spec, _ = parse_policy(body)
        if spec is not None and spec.selector.matches(labels):
            out.append((body["metadata"]["name"], spec))
    return sorted(out, key=lambda p: p[0])


def gpu_request(pod: dict[str, Any]) -> int:
    """valve.io/online-gpu the pod's containers ask for (limits, as for extended resources, else requests)."""
    total = 0
    for container in (pod.get("spec") or {}).get("containers") or []:
        res = container.get("resources") or {}
        value = (res.get("limits") or {}).get(ONLINE_RESOURCE, (res.get("requests") or {}).get(ONLINE_RESOURCE))
        try:
            total += int(str(value)) if value is not None else 0
        except ValueError:
            return -1
    return total


def unserved(pod: dict[str, Any], spec: pol.ColocationPolicySpec, cfg: OperatorConfig) -> str | None:
    """Why Valve cannot serve this selected pod (None: it can)."""
    gpus = gpu_request(pod)
    if gpus == 0:
        return f"requests no {ONLINE_RESOURCE}"
    if gpus < 0:
        return f"requests {ONLINE_RESOURCE} that is not an integer"
    if not cfg.image_allowed(spec.online.proxy.image):
        return f"proxy image {spec.online.proxy.image!r} is not allowed by the operator"
    body = pod.get("spec") or {}
    names = {c.get("name") for c in [*(body.get("containers") or []), *(body.get("initContainers") or [])]}
    names |= {v.get("name") for v in body.get("volumes") or []}
    clash = sorted(n for n in names if n in RESERVED_CONTAINERS or n in RESERVED_VOLUMES)
    if clash:
        return f"uses {', '.join(clash)}, reserved for what Valve adds"
    return None


def admit(pod: dict[str, Any], policies: Iterable[dict[str, Any]],
          cfg: OperatorConfig) -> tuple[dict[str, Any] | None, list[str]]:
    """(the pod to admit instead, or None to admit it unchanged; warnings for the client)."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(LABEL_MANAGED) == MANAGED_BY or LABEL_POLICY in labels:
        return None, []  # the operator's own pods, or a pod injected already (a reinvocation)
    if any(c.get("name") == PROXY for c in (pod.get("spec") or {}).get("containers") or []):
        return None, []
    chosen = selecting(labels, policies)
    if not chosen:
        return None, []
    warnings = []
    name, spec = chosen[0]
    if len(chosen) > 1:
        others = ", ".join(n for n, _ in chosen[1:])
        warnings.append(f"valve: ColocationPolicies {name}, {others} all select this pod; {name} is used")
    why = unserved(pod, spec, cfg)
    if why is not None:
        return None, [*warnings, f"valve: ColocationPolicy {name} selects this pod but it {why}: "
                                 "admitted without Valve's sidecar, its GPU is not harvested"]
    return inject_online(pod, name, spec.online.proxy, cfg, gpus=gpu_request(pod)), warnings
