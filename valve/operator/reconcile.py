"""What to do for one pair, given what is observed (pure; the handlers carry it out).

Order matters for pairing on one GPU: the online pod is created first; the offline pod only once the online
pod has started (its GPU is allocated), so the device plugin puts the offline tenant on the online pod's GPU.
When the online pod must be recreated, the offline pod goes too and follows it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from valve.api import colocation as c
from valve.api.colocation import ConditionType, Phase
from valve.api.contract import ANN_HASH, OFFLINE, ONLINE
from valve.operator import status as st
from valve.operator.placement import NO_FIT
from valve.operator.pods import OperatorConfig, PodView, pod_name, render_pod

MAX_NAME = 63  # the pair name is a label value on its pods


@dataclass(frozen=True)
class Create:
    role: str
    pod: dict[str, Any]


@dataclass(frozen=True)
class Delete:
    role: str
    name: str
    uid: str
    why: str


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    status: dict[str, Any]
    actions: list[Create | Delete] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    @property
    def phase(self) -> Phase:
        return Phase(self.status["phase"])


def parse_spec(pair: dict[str, Any]) -> tuple[c.ColocationPairSpec | None, str | None]:
    """The validated spec, or None and a one-line reason."""
    name = pair["metadata"]["name"]
    if len(name) > MAX_NAME:
        return None, f"name is {len(name)} characters long; at most {MAX_NAME} (it labels the pods)"
    try:
        return c.ColocationPairSpec.model_validate(pair.get("spec") or {}), None
    except ValidationError as e:
        problems = [f"spec.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        return None, "; ".join(problems)


def node_of(pair: dict[str, Any], pods: dict[str, PodView | None]) -> str | None:
    """The node the pair is placed on: its status, else where its existing pods are pinned."""
    node = (pair.get("status") or {}).get("node")
    if node:
        return node
    for pod in pods.values():
        if pod is not None and not pod.deleting and (pod.target or pod.node):
            return pod.target or pod.node
    return None


def plan(
    pair: dict[str, Any],
    pods: dict[str, PodView | None],
    *,
    node: str | None,
    cfg: OperatorConfig,
    now: str,
    no_fit: str = NO_FIT,
) -> Plan:
    spec, invalid = parse_spec(pair)
    old = pair.get("status") or {}
    generation = int(pair["metadata"].get("generation") or 1)
    actions: list[Create | Delete] = []
    events: list[Event] = []

    if invalid is not None:
        placed = st.Cond(ConditionType.Placed, "False", "InvalidSpec", invalid)
    elif not old.get("phase"):
        placed = st.Cond(ConditionType.Placed, "Unknown", "Accepted", "waiting for placement")
        node = None  # first write: record that the operator saw the pair (Pending) before acting on it
    elif node is None:
        placed = st.Cond(ConditionType.Placed, "False", "NoCapacity", no_fit)
    else:
        placed = st.Cond(ConditionType.Placed, "True", "NodeSelected", f"placed on node {node}")
        actions = _pod_actions(pair, spec, pods, node, cfg)

    phase, conds, gpu = st.compute(node=node, pods=pods, placed=placed, invalid=invalid)
    message = _message(phase, conds)
    status = {
        "phase": phase.value,
        "node": node,
        "gpuUUID": gpu,
        "onlinePod": pods[ONLINE].name if pods.get(ONLINE) else None,
        "offlinePod": pods[OFFLINE].name if pods.get(OFFLINE) else None,
        "message": message,
        "observedGeneration": generation,
        "conditions": st.merge_conditions(old.get("conditions") or [], conds, generation, now),
    }
    status = {k: v for k, v in status.items() if v is not None}

    if old.get("phase") != phase.value or old.get("message") != message:
        kind = "Warning" if phase in (Phase.Failed, Phase.Degraded) or placed.reason == "NoCapacity" else "Normal"
        events.append(Event(kind, phase.value, message))
    return Plan(status=status, actions=actions, events=events)


def action_event(action: Create | Delete, old_status: dict[str, Any], node: str | None) -> Event:
    """The event posted on the pair once an action has been carried out (not when it was a no-op)."""
    if isinstance(action, Create):
        verb = "Recreated" if old_status.get(f"{action.role}Pod") else "Created"
        return Event("Normal", f"{verb}Pod",
                     f"{verb.lower()} {action.role} pod {action.pod['metadata']['name']} on node {node}")
    return Event("Normal" if action.why == "SpecChanged" else "Warning", "DeletingPod",
                 f"deleting {action.role} pod {action.name} to recreate it: {action.why}")


def _pod_actions(
    pair: dict[str, Any], spec: c.ColocationPairSpec, pods: dict[str, PodView | None], node: str, cfg: OperatorConfig
) -> list[Create | Delete]:
    desired = {role: render_pod(pair, spec, role, node, cfg) for role in (ONLINE, OFFLINE)}
    online, offline = pods.get(ONLINE), pods.get(OFFLINE)
    out: list[Create | Delete] = []

    online_why = _replace_reason(online, desired[ONLINE])
    if online is None:
        out.append(Create(ONLINE, desired[ONLINE]))
    elif online_why:
        out.append(Delete(ONLINE, online.name, online.uid, online_why))

    if offline is not None and not offline.deleting:
        why = _replace_reason(offline, desired[OFFLINE])
        if online is None or online_why:
            why = f"the online pod {pod_name(pair['metadata']['name'], ONLINE)} is being recreated"
        if why:
            out.append(Delete(OFFLINE, offline.name, offline.uid, why))
    elif offline is None and online is not None and not online_why and not online.deleting and online.started:
        out.append(Create(OFFLINE, desired[OFFLINE]))
    return out


def _replace_reason(pod: PodView | None, desired: dict[str, Any]) -> str | None:
    if pod is None or pod.deleting:
        return None
    if pod.terminal:
        return f"Pod{pod.phase}"
    if pod.hash != desired["metadata"]["annotations"][ANN_HASH]:
        return "SpecChanged"
    return None


def _message(phase: Phase, conds: list[st.Cond]) -> str:
    if phase in (Phase.Running, Phase.Degraded):
        return next(cd.message for cd in conds if cd.type == ConditionType.Paired)
    for cond in conds:
        if cond.status != "True":
            return cond.message
    return ""
