"""What to do for one pair, given what is observed (pure; the handlers carry it out).

Pairing on one GPU: the online pod is created first; the offline pod only once the online pod reports its GPU,
carrying that GPU in `valve.io/want-gpu`, and only while no other offline pod on the node waits for its GPU
(`offline_gate`): the kubelet does not tell the device plugin which pod an allocation is for, so one pending
offline pod per node is what lets the plugin read the wish of the right pod. A pair whose pods still end on two
GPUs (an old plugin, a replaced online pod that joined another GPU) gets its offline pod recreated, at most
`repairs_left` times. Without GPU reports (no annotator), the offline pod is created without a wish once the
online pod has run `unwished` long, and the plugin's slot rule alone decides, as before. A replaced online pod leaves the offline pod alone: the plugin puts a new online tenant
next to a lone offline one, and only if it lands elsewhere is the offline pod recreated once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from valve.api import colocation as c
from valve.api import dra
from valve.api.colocation import ConditionType, Phase
from valve.api.contract import ANN_HASH, LABEL_PAIR, OFFLINE, ONLINE, ROLES
from valve.operator import status as st
from valve.operator.placement import NO_FIT
from valve.operator.pods import OperatorConfig, PodView, claim_name, owner_reference, render_pod

MAX_NAME = 63  # the pair name is a label value on its pods
CREATE_FAILED = "PodCreateFailed"


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
class CreateClaim:
    """placement dra: the pair's ResourceClaim."""

    claim: dict[str, Any]


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    status: dict[str, Any]
    actions: list[Create | Delete | CreateClaim] = field(default_factory=list)
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


def not_allowed(spec: c.ColocationPairSpec, cfg: OperatorConfig) -> str | None:
    """Sidecar images come from the operator's configuration: a pair may only pick one it allows."""
    named = {"spec.online.proxy.image": spec.online.proxy.image, "spec.offline.arbiter.image": spec.offline.arbiter.image}
    bad = [f"{where}: image {image!r} is not allowed" for where, image in named.items() if not cfg.image_allowed(image)]
    if not bad:
        return None
    return "; ".join(bad) + f" (the operator allows {', '.join([cfg.sidecar_image, *cfg.allowed_images])})"


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
    offline_gate: bool = True,
    repairs_left: int = 1,
    unwished: bool = False,
    create_failed: str | None = None,
    render: Callable[..., dict[str, Any]] = render_pod,
    parsed: tuple[c.ColocationPairSpec | None, str | None] | None = None,
) -> Plan:
    """What to do now. `create_failed`: the API's message when it refused to create one of the pair's pods
    (e.g. PodSecurity): no pods are created this time, and the pair says why. `parsed`: `parse_spec(pair)`,
    when the caller has it already."""
    spec, invalid = parsed or parse_spec(pair)
    refused = "InvalidSpec"
    if spec is not None and (bad := not_allowed(spec, cfg)):
        invalid, refused = bad, "ImageNotAllowed"
    actions: list[Create | Delete | CreateClaim] = []

    if invalid is not None:
        placed = st.Cond(ConditionType.Placed, "False", refused, invalid)
    elif create_failed is not None:
        placed = st.Cond(ConditionType.Placed, "False", CREATE_FAILED, create_failed)
    elif node is None:
        placed = st.Cond(ConditionType.Placed, "False", "NoCapacity", no_fit)
    else:
        placed = st.Cond(ConditionType.Placed, "True", "NodeSelected", f"placed on node {node}")
        if not pair["metadata"].get("deletionTimestamp"):  # never create for a pair being deleted
            actions = _pod_actions(pair, spec, pods, node, cfg, offline_gate, repairs_left, unwished, render)

    phase, conds, gpu = st.compute(node=node, pods=pods, placed=placed, invalid=invalid is not None)
    return _finish(pair, pods, phase, conds, node=node, gpu=gpu, now=now, create_failed=create_failed,
                   actions=actions)


def _finish(pair: dict[str, Any], pods: dict[str, PodView | None], phase: Phase, conds: list[st.Cond], *,
            node: str | None, gpu: str | None, now: str, create_failed: str | None,
            actions: list[Create | Delete | CreateClaim], extra: dict[str, Any] | None = None) -> Plan:
    """The status and the events of a plan (both placements)."""
    old = pair.get("status") or {}
    generation = int(pair["metadata"].get("generation") or 1)
    placed = conds[0]
    message = _message(phase, conds)
    status = {
        "phase": phase.value,
        "node": node,
        "gpuUUID": gpu,
        "onlinePod": pods[ONLINE].name if pods.get(ONLINE) else None,
        "offlinePod": pods[OFFLINE].name if pods.get(OFFLINE) else None,
        **(extra or {}),
        "message": message,
        "observedGeneration": generation,
        "conditions": st.merge_conditions(old.get("conditions") or [], conds, generation, now),
    }
    status = {k: v for k, v in status.items() if v is not None}

    events: list[Event] = []
    was = next((cd for cd in old.get("conditions") or [] if cd.get("type") == ConditionType.Placed.value), {})
    if placed.reason == CREATE_FAILED and (was.get("reason"), was.get("message")) != (CREATE_FAILED, create_failed):
        events.append(Event("Warning", CREATE_FAILED, create_failed or ""))
    if old.get("phase") != phase.value:  # transitions only: detail changes are in the status
        kind = "Warning" if phase in (Phase.Failed, Phase.Degraded) or placed.reason == "NoCapacity" else "Normal"
        events.append(Event(kind, phase.value, message))
    return Plan(status=status, actions=actions, events=events)


def plan_dra(
    pair: dict[str, Any],
    pods: dict[str, PodView | None],
    claim: dict[str, Any] | None,
    *,
    cfg: OperatorConfig,
    now: str,
    create_failed: str | None = None,
    render: Callable[..., dict[str, Any]] = render_pod,
    parsed: tuple[c.ColocationPairSpec | None, str | None] | None = None,
) -> Plan:
    """placement dra: the pair's ResourceClaim (created once, from the spec's gate and runtime settings), both
    pods at once (the shared claim puts them on one GPU: no order, no node, no GPU wish), a pod recreated when
    its spec changed or it ended; status from the claim's allocation and the pods."""
    spec, invalid = parsed or parse_spec(pair)
    refused = "InvalidSpec"
    if spec is not None and (bad := not_allowed(spec, cfg)):
        invalid, refused = bad, "ImageNotAllowed"
    meta = pair["metadata"]
    name = claim_name(meta["name"])
    actions: list[Create | Delete | CreateClaim] = []
    stop = None
    if invalid is not None:
        stop = st.Cond(ConditionType.Placed, "False", refused, invalid)
    elif create_failed is not None:
        stop = st.Cond(ConditionType.Placed, "False", CREATE_FAILED, create_failed)
    elif not meta.get("deletionTimestamp"):
        if claim is None:
            config = dra.claim_config(spec.offline.gate, spec.runtime)
            actions.append(CreateClaim(dra.pair_claim(name, meta["namespace"], config, owner_reference(pair),
                                                      {LABEL_PAIR: meta["name"]})))
        for role in ROLES:
            desired = render(pair, spec, role, None, cfg)
            pod = pods.get(role)
            if pod is None:
                actions.append(Create(role, desired))
            elif why := _replace_reason(pod, desired):
                actions.append(Delete(role, pod.name, pod.uid, why))
    phase, conds, node, gpu = st.compute_dra(claim=name, allocation=dra.allocation(claim), pods=pods,
                                             refused=stop, invalid=invalid is not None)
    return _finish(pair, pods, phase, conds, node=node, gpu=gpu, now=now, create_failed=create_failed,
                   actions=actions, extra={"resourceClaim": name if invalid is None else None})


def action_event(action: Create | Delete, old_status: dict[str, Any], node: str | None) -> Event | None:
    """The event posted on the pair once an action has been carried out (not when it was a no-op).

    A first creation has none: the phase events (Placed, Running) tell that story in fewer requests.
    """
    if isinstance(action, Create):
        if not old_status.get(f"{action.role}Pod"):
            return None
        return Event("Normal", "RecreatedPod",
                     f"recreated {action.role} pod {action.pod['metadata']['name']} on node {node}")
    return Event("Normal" if action.why == "SpecChanged" else "Warning", "DeletingPod",
                 f"deleting {action.role} pod {action.name} to recreate it: {action.why}")


def _pod_actions(
    pair: dict[str, Any], spec: c.ColocationPairSpec, pods: dict[str, PodView | None], node: str,
    cfg: OperatorConfig, offline_gate: bool, repairs_left: int, unwished: bool,
    render: Callable[..., dict[str, Any]],
) -> list[Create | Delete]:
    online, offline = pods.get(ONLINE), pods.get(OFFLINE)
    started = online is not None and not online.deleting and online.started
    want = online.gpu if started and online is not None else None
    desired = {ONLINE: render(pair, spec, ONLINE, node, cfg),
               OFFLINE: render(pair, spec, OFFLINE, node, cfg, want_gpu=want)}
    out: list[Create | Delete] = []

    online_why = _replace_reason(online, desired[ONLINE])
    if online is None:
        out.append(Create(ONLINE, desired[ONLINE]))
    elif online_why:
        out.append(Delete(ONLINE, online.name, online.uid, online_why))

    if offline is not None and not offline.deleting:
        why = _replace_reason(offline, desired[OFFLINE])
        if not why and want is not None and not online_why and repairs_left > 0:
            why = _misplaced(offline, want)
        if why:
            out.append(Delete(OFFLINE, offline.name, offline.uid, why))
    elif offline is None and (want is not None or (started and unwished)) and not online_why and offline_gate:
        out.append(Create(OFFLINE, desired[OFFLINE]))
    return out


def _misplaced(offline: PodView, want: str) -> str | None:
    """Why an offline pod is not where its online partner is (it got, or asked for, another GPU)."""
    if offline.gpu is not None and offline.gpu != want:
        return "GPUMismatch"
    if offline.gpu is None and offline.want not in (None, want) and not offline.started:
        return "GPUMismatch"  # still pending, but it asks for the GPU of an online pod that is gone
    return None


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
