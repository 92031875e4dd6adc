"""Status of a pair from what is observed (pure): phase, conditions, GPU confirmation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from valve.api.colocation import ConditionType, Phase
from valve.api.contract import OFFLINE, ONLINE
from valve.operator.pods import PodView


@dataclass(frozen=True)
class Cond:
    type: ConditionType
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str = ""


def pairing(online: PodView | None, offline: PodView | None, node: str | None) -> Cond:
    """Paired: both pods on the pair's node and on one GPU (from the pods' `valve.io/gpu-uuid`)."""
    if online is None or offline is None:
        return Cond(ConditionType.Paired, "Unknown", "PodsMissing", "waiting for both pods")
    for pod in (online, offline):
        if pod.node is not None and node is not None and pod.node != node:
            return Cond(ConditionType.Paired, "False", "NodeMismatch",
                        f"pod {pod.name} runs on {pod.node}, the pair is placed on {node}")
    if online.gpu is None or offline.gpu is None:
        missing = ", ".join(p.name for p in (online, offline) if p.gpu is None)
        return Cond(ConditionType.Paired, "Unknown", "GPUNotReported", f"no GPU reported yet by {missing}")
    if online.gpu != offline.gpu:
        return Cond(ConditionType.Paired, "False", "GPUMismatch",
                    f"online pod got GPU {online.gpu}, offline pod got GPU {offline.gpu}")
    return Cond(ConditionType.Paired, "True", "SameGPU", f"both pods share GPU {online.gpu}")


def pod_ready(role: str, pod: PodView | None) -> Cond:
    kind = ConditionType.OnlineReady if role == ONLINE else ConditionType.OfflineReady
    if pod is None:
        return Cond(kind, "False", "PodMissing", f"no {role} pod")
    if pod.deleting:
        return Cond(kind, "False", "PodTerminating", f"pod {pod.name} is terminating")
    if pod.ready:
        return Cond(kind, "True", "PodReady", f"pod {pod.name} is ready")
    return Cond(kind, "False", f"Pod{pod.phase}", f"pod {pod.name} is {pod.phase} and not ready")


def compute(
    *,
    node: str | None,
    pods: dict[str, PodView | None],
    placed: Cond,
    invalid: bool = False,
) -> tuple[Phase, list[Cond], str | None]:
    """Phase, conditions and GPU of a pair (`invalid`: the pair is refused, as `placed` says)."""
    online, offline = pods.get(ONLINE), pods.get(OFFLINE)
    if invalid:
        return Phase.Failed, [placed, summary(Phase.Failed, [placed])], None
    conds = [placed, pod_ready(ONLINE, online), pod_ready(OFFLINE, offline), pairing(online, offline, node)]
    paired = conds[3]
    gpu = online.gpu if paired.status == "True" and online is not None else None
    if node is None or placed.status != "True":
        phase = Phase.Pending
    elif paired.status == "False":
        phase = Phase.Degraded
    elif conds[1].status == "True" and conds[2].status == "True":
        phase = Phase.Running
    else:
        phase = Phase.Placed
    return phase, [*conds, summary(phase, conds)], gpu


def summary(phase: Phase, conds: list[Cond]) -> Cond:
    """Ready: True when the pair runs; else False with the first condition that is not True."""
    if phase == Phase.Running:
        return Cond(ConditionType.Ready, "True", "Running", "both pods are ready")
    first = next((cd for cd in conds if cd.status != "True"), None)
    if first is None:
        return Cond(ConditionType.Ready, "False", phase.value, f"phase {phase.value}")
    return Cond(ConditionType.Ready, "False", first.reason, first.message)


def merge_conditions(
    old: list[dict[str, Any]], new: list[Cond], generation: int, now: str
) -> list[dict[str, Any]]:
    """Kubernetes-style conditions; lastTransitionTime moves only when the status changes."""
    previous = {c.get("type"): c for c in old or []}
    out = []
    for cond in new:
        prev = previous.get(cond.type.value)
        changed = prev is None or prev.get("status") != cond.status
        out.append({
            "type": cond.type.value,
            "status": cond.status,
            "observedGeneration": generation,
            "lastTransitionTime": now if changed else prev.get("lastTransitionTime", now),
            "reason": cond.reason,
            "message": cond.message,
        })
    return out


def compute_dra(
    *,
    claim: str,
    allocation: dict[str, Any],
    pods: dict[str, PodView | None],
    refused: Cond | None = None,
    invalid: bool = False,
) -> tuple[Phase, list[Cond], str | None, str | None]:
    """placement dra: phase, conditions, node and GPU from the pair's ResourceClaim and pods.

    Placed once the scheduler has allocated the claim; Paired when both requests got one device (the claim's
    constraint guarantees it: a claim with two GPUs would be a scheduler bug, and is said so). `refused`: the
    Placed condition when the pair is refused (`invalid`: for good, Failed) or a create was refused (Pending)."""
    if refused is not None and invalid:
        return Phase.Failed, [refused, summary(Phase.Failed, [refused])], None, None
    gpus = allocation.get("gpus") or {}
    node = allocation.get("node")
    if refused is not None:
        placed = refused
    elif not allocation:
        placed = Cond(ConditionType.Placed, "False", "ClaimPending",
                      f"waiting for the scheduler to allocate ResourceClaim {claim}")
    else:
        placed = Cond(ConditionType.Placed, "True", "ClaimAllocated",
                      f"ResourceClaim {claim} allocated on node {node}")
    if set(gpus) != {ONLINE, OFFLINE}:
        paired = Cond(ConditionType.Paired, "Unknown", "ClaimPending", f"ResourceClaim {claim} is not allocated")
    elif gpus[ONLINE] != gpus[OFFLINE]:
        paired = Cond(ConditionType.Paired, "False", "GPUMismatch",
                      f"ResourceClaim {claim} gave online {gpus[ONLINE]} and offline {gpus[OFFLINE]}")
    else:
        paired = Cond(ConditionType.Paired, "True", "SharedClaim",
                      f"both pods share GPU {gpus[ONLINE]} through ResourceClaim {claim}")
    conds = [placed, pod_ready(ONLINE, pods.get(ONLINE)), pod_ready(OFFLINE, pods.get(OFFLINE)), paired]
    if placed.status != "True":
        phase = Phase.Pending
    elif paired.status == "False":
        phase = Phase.Degraded
    elif conds[1].status == "True" and conds[2].status == "True" and paired.status == "True":
        phase = Phase.Running
    else:
        phase = Phase.Placed
    gpu = gpus[ONLINE] if paired.status == "True" else None
    return phase, [*conds, summary(phase, conds)], node, gpu
