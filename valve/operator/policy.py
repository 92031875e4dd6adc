"""What to do for one ColocationPolicy, given what is observed (pure; policy_handlers.py carries it out).

Slots: each GPU of a selected online pod that Valve serves (injected by the webhook), has started and reports its
GPUs (as many as it requests `valve.io/online-gpu`) is a slot: (online pod, node, GPU); a tensor-parallel replica
on N GPUs is N slots. Each slot gets one offline pod, created from the
policy's template (or its Job's), pinned to the slot's node and asking the device plugin for the slot's GPU, as
a pair's offline pod does. An offline pod whose online pod is gone (scale down, rollout, eviction) is deleted; a
new online pod gets a new one. Indexes (JOB_COMPLETION_INDEX) are the lowest free ones: an index is reused only
once no pod holding it is left (so two pods never work on one index at once), and a succeeded index is never run
again (`status.completedIndexes`). At most one offline pod per node waits for admission (`busy_nodes`: the
device plugin reads the wish of the one pod being admitted). Bad input creates nothing and says why.

Backoff: a slot whose offline pod failed (phase Failed) gets its next one only after `cfg.offline_backoff_s`
(base, doubling per failure in a row, up to cap; a failure more than 2 x cap after the slot's last retry counts as
the first again, as the kubelet resets CrashLoopBackOff). The history is the slot's row in the policy's status
(`failures`, `retryAfter`, `failedPodUID`), so an operator restart keeps it; a new online pod is a new slot, with
none. Time is the `now` passed in.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from valve.api import colocation as c
from valve.api import policy as pol
from valve.api.contract import (
    ANN_COMPLETION_INDEX,
    ANN_GPU,
    ANN_HASH,
    ANN_NODE,
    ANN_ONLINE_POD,
    ANN_WANT_GPU,
    LABEL_POLICY,
    ONLINE_RESOURCE,
)
from valve.api.policy import PolicyConditionType as T
from valve.operator import status as st
from valve.operator.metrics import POD_PHASES
from valve.operator.pods import (
    JOB_LABELS,
    LABEL_MANAGED,
    MANAGED_BY,
    OperatorConfig,
    policy_pod_name,
    render_policy_offline_pod,
)
from valve.operator.reconcile import Event
from valve.operator.webhook import PROXY, gpu_request, parse_policy

CREATE_FAILED = "PodCreateFailed"


@dataclass(frozen=True)
class WorkloadPod:
    """What a policy needs to know about a pod of its namespace."""

    name: str
    uid: str
    labels: tuple[tuple[str, str], ...]
    phase: str
    node: str | None
    gpu: str | None
    deleting: bool
    gpus: int  # valve.io/online-gpu requested (-1: not an integer)
    injected: bool  # has Valve's proxy sidecar
    valve_pod: bool  # created by the operator (a pair's or a policy's)
    policy: str | None = None  # LABEL_POLICY
    index: int | None = None  # a policy offline pod's index
    serves: str | None = None  # a policy offline pod's online pod uid
    hash: str | None = None
    target: str | None = None  # node the operator pinned it to
    want: str | None = None

    @property
    def started(self) -> bool:
        return self.phase in ("Running", "Succeeded")

    @property
    def terminal(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


def workload_pod(pod: dict[str, Any]) -> WorkloadPod:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    ann = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    index = ann.get(ANN_COMPLETION_INDEX)
    return WorkloadPod(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        labels=tuple(sorted(labels.items())),
        phase=(pod.get("status") or {}).get("phase") or "Pending",
        node=spec.get("nodeName"),
        gpu=ann.get(ANN_GPU),
        deleting=bool(meta.get("deletionTimestamp")),
        gpus=gpu_request(pod),
        injected=any(ct.get("name") == PROXY for ct in spec.get("containers") or []),
        valve_pod=labels.get(LABEL_MANAGED) == MANAGED_BY,
        policy=labels.get(LABEL_POLICY),
        index=int(index) if index is not None and str(index).isdigit() else None,
        serves=ann.get(ANN_ONLINE_POD),
        hash=ann.get(ANN_HASH),
        target=ann.get(ANN_NODE),
        want=ann.get(ANN_WANT_GPU),
    )


@dataclass(frozen=True)
class Create:
    pod: dict[str, Any]
    node: str


@dataclass(frozen=True)
class Delete:
    name: str
    uid: str
    why: str


@dataclass
class PolicyPlan:
    status: dict[str, Any]
    actions: list[Create | Delete] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    warned: set[tuple[str, str]] = field(default_factory=set)  # (pod uid, reason) told by an event now
    offline_phases: dict[str, int] = field(default_factory=dict)  # status.offlinePods by pod phase (for metrics)
    retry_at: datetime.datetime | None = None  # the earliest end of a slot's backoff: reconcile again then


@dataclass(frozen=True)
class JobView:
    """The referenced Job, as far as the policy needs it (None in the plan: not found)."""

    suspended: bool
    template: dict[str, Any]
    completions: int | None  # only for completionMode Indexed


def job_view(job: dict[str, Any]) -> JobView:
    spec = job.get("spec") or {}
    indexed = spec.get("completionMode") == "Indexed"
    return JobView(bool(spec.get("suspend")), spec.get("template") or {},
                   spec.get("completions") if indexed else None)


def offline_template(spec: pol.ColocationPolicySpec, job: JobView | None) -> tuple[c.PodTemplate | None, int | None,
                                                                                   tuple[str, str] | None]:
    """(template, completions, None) or (None, None, (reason, message)) when the offline workload is unusable."""
    if spec.offline.template is not None:
        return spec.offline.template, spec.offline.completions, None
    name = spec.offline.job_ref.name if spec.offline.job_ref else ""
    if job is None:
        return None, None, ("JobNotFound", f"Job {name} not found in the policy's namespace")
    if not job.suspended:
        return None, None, ("JobNotSuspended", f"Job {name} is not suspended: its own controller would run its pods "
                            "too (set spec.suspend: true; Valve runs them on the harvested GPUs)")
    raw = dict(job.template)
    meta = dict(raw.get("metadata") or {})
    meta["labels"] = {k: v for k, v in (meta.get("labels") or {}).items() if k not in JOB_LABELS}
    meta.pop("creationTimestamp", None)
    raw["metadata"] = {k: v for k, v in meta.items() if k in ("labels", "annotations")}
    try:
        template = c.PodTemplate.model_validate(raw)
    except ValueError as e:
        return None, None, ("InvalidJobTemplate", f"Job {name}'s pod template: {str(e).splitlines()[0]}")
    return template, spec.offline.completions or job.completions, None


def _gpus(gpu: str | None) -> list[str]:
    return [p for p in (gpu or "").split(",") if p]


def _single_gpu(gpu: str | None) -> str | None:
    parts = _gpus(gpu)
    return parts[0] if len(parts) == 1 else None


Slot = tuple[str, str]  # (online pod uid, GPU): a policy offline pod's (ANN_ONLINE_POD, ANN_WANT_GPU)
BACKOFF_FIELDS = ("failures", "retryAfter", "failedPodUID")  # a slot's row: its failure history


def backoff_seconds(failures: int, base: float, cap: float) -> float:
    """The wait before a slot's next offline pod after `failures` (>= 1) failed in a row."""
    return min(base * 2 ** min(failures - 1, 62), cap)


def instant(text: Any) -> datetime.datetime | None:
    """An RFC 3339 time (aware), None if it is not one (a hand-edited status forgets its history)."""
    try:
        at = datetime.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return at if at.tzinfo is not None else None


def ceil_ms(at: datetime.datetime) -> datetime.datetime:
    """Rounded up to the millisecond: a retry time as written is never earlier than the one computed."""
    return datetime.datetime.fromtimestamp(math.ceil(at.timestamp() * 1000 - 1e-6) / 1000, datetime.UTC)


def stamp(at: datetime.datetime) -> str:
    """RFC 3339, UTC, milliseconds."""
    return at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def plan_policy(
    policy: dict[str, Any],
    pods: Iterable[WorkloadPod],
    *,
    cfg: OperatorConfig,
    now: str,
    job: JobView | None = None,
    busy_nodes: frozenset[str] = frozenset(),
    warned: frozenset[tuple[str, str]] = frozenset(),
    create_failed: str | None = None,
    repairs_left: int = 1,
    render: Callable[..., dict[str, Any]] = render_policy_offline_pod,
) -> PolicyPlan:
    meta = policy["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    old = policy.get("status") or {}
    at = instant(now)
    if at is None:
        raise ValueError(f"now must be an RFC 3339 time with its offset, not {now!r}")
    now = at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")  # conditions: whole seconds
    generation = int(meta.get("generation") or 1)
    spec, invalid = parse_policy(policy)
    problem: tuple[str, str] | None = None
    template, completions = None, None
    if spec is None:
        problem = ("InvalidSpec", invalid or "")
    elif not cfg.image_allowed(spec.offline.arbiter.image) or not cfg.image_allowed(spec.online.proxy.image):
        allowed = ", ".join([cfg.sidecar_image, *cfg.allowed_images])
        problem = ("ImageNotAllowed", f"a sidecar image the operator does not allow (it allows {allowed})")
    else:
        template, completions, problem = offline_template(spec, job)
    if problem is None and create_failed is not None:
        problem = (CREATE_FAILED, create_failed)

    pods = list(pods)
    events: list[Event] = []
    told: set[tuple[str, str]] = set()

    def warn(pod: WorkloadPod, reason: str, message: str) -> None:
        if (pod.uid, reason) not in warned:
            events.append(Event("Warning", reason, message))
            told.add((pod.uid, reason))

    # Online side: the pods the selector picks (never Valve's own), each served or told why not.
    selected = [p for p in pods if spec is not None and not p.valve_pod and not p.deleting and not p.terminal
                and spec.selector.matches(p.label_map())]
    slots: dict[Slot, tuple[WorkloadPod, str, str]] = {}  # (online uid, gpu) -> (pod, node, gpu)
    for pod in selected:
        if pod.gpus == 0:
            warn(pod, "NoGPURequest", f"online pod {pod.name} requests no {ONLINE_RESOURCE}: not colocated")
        elif pod.gpus < 0:
            warn(pod, "NoGPURequest", f"online pod {pod.name} requests {ONLINE_RESOURCE} that is not an integer: "
                 "not colocated")
        elif not pod.injected:
            warn(pod, "NotInjected", f"online pod {pod.name} has no Valve proxy (created while the webhook was "
                 "unavailable?): its GPU is not harvested until the pod is recreated")
        elif pod.started and pod.node and len(gpus := _gpus(pod.gpu)) == pod.gpus:
            for gpu in gpus:  # every GPU of the replica, once the device plugin has reported all of them
                slots[(pod.uid, gpu)] = (pod, pod.node, gpu)

    # Each slot's failure history, from its row (expired: more than 2 x cap after its last retry).
    base, cap = cfg.offline_backoff_s
    rows = {(r.get("onlinePod"), r.get("gpuUUID")): r for r in old.get("slots") or [] if r.get("failures")}
    history: dict[Slot, dict[str, Any]] = {}
    for key, (online, _, gpu) in slots.items():
        row = rows.get((online.name, gpu)) or {}
        if (retry := instant(row.get("retryAfter"))) is not None and (at - retry).total_seconds() <= 2 * cap:
            history[key] = {**{k: row[k] for k in BACKOFF_FIELDS if row.get(k) is not None}, "at": retry}

    def failed(key: Slot, pod: WorkloadPod, node: str, gpu: str) -> None:
        """Count a failed offline pod of a slot, once (its uid is kept), and say when the next one comes."""
        was = history.get(key, {})
        if was.get("failedPodUID") == pod.uid:
            return
        failures = int(was.get("failures") or 0) + 1
        wait = backoff_seconds(failures, base, cap)
        retry = ceil_ms(at + datetime.timedelta(seconds=wait))
        history[key] = {"failures": failures, "retryAfter": stamp(retry), "failedPodUID": pod.uid, "at": retry}
        events.append(Event("Warning", "OfflinePodFailed", f"offline pod {pod.name} (index {pod.index}) on node "
                            f"{node}, GPU {gpu} failed ({failures} in a row on this GPU): the next one in {wait:g} s, "
                            f"at {stamp(retry)}"))

    # Offline side: the policy's pods, by the online pod they serve.
    mine = [p for p in pods if p.valve_pod and p.policy == name]
    completed = set(old.get("completedIndexes") or []) | {p.index for p in mine
                                                          if p.phase == "Succeeded" and p.index is not None}
    actions: list[Create | Delete] = []
    serving: dict[Slot, WorkloadPod] = {}
    for pod in mine:
        key = (pod.serves or "", pod.want or "")
        if pod.deleting:
            if key in slots:
                serving.setdefault(key, pod)  # its replacement waits until it is gone
            continue
        slot = slots.get(key)
        why = None
        if slot is None:
            why = "OnlinePodGone"
        elif pod.phase == "Failed":
            why = "PodFailed"
            failed(key, pod, slot[1], slot[2])
        elif template is not None and spec is not None and pod.index is not None and pod.hash != render(
                policy, spec.offline, spec.runtime, template, node=slot[1], gpu=slot[2], online_uid=key[0],
                index=pod.index, cfg=cfg)["metadata"]["annotations"][ANN_HASH]:
            why = "SpecChanged"
        elif repairs_left > 0 and pod.gpu is not None and _single_gpu(pod.gpu) != slot[2]:
            why = "GPUMismatch"
        if why is not None:
            actions.append(Delete(pod.name, pod.uid, why))
        if slot is not None:
            serving.setdefault(key, pod)

    backoff = {k: h["at"] for k, h in history.items() if h["at"] > at}  # slots waiting out their backoff
    backing = sorted(backoff.values())
    if problem is None and template is not None and spec is not None:
        taken = {p.index for p in mine if p.index is not None} | completed
        names = {p.name for p in mine}
        busy = set(busy_nodes)
        for (uid, _), (_, node, gpu) in sorted(slots.items(), key=_slot_order):
            if (uid, gpu) in serving or (uid, gpu) in backoff or node in busy:
                continue
            index = _free_index(taken, completions, lambda i: policy_pod_name(name, i) in names)
            if index is None:
                break
            taken.add(index)
            busy.add(node)
            actions.append(Create(render(policy, spec.offline, spec.runtime, template, node=node, gpu=gpu,
                                         online_uid=uid, index=index, cfg=cfg), node))

    # Status.
    slot_rows = []
    for key, (online, node, gpu) in sorted(slots.items(), key=_slot_order):
        off = serving.get(key)
        slot_rows.append({k: v for k, v in {
            "onlinePod": online.name, "node": node, "gpuUUID": gpu, "offlinePod": off.name if off else None,
            "index": off.index if off else None, "offlinePhase": off.phase if off else None,
            **{k: history.get(key, {}).get(k) for k in BACKOFF_FIELDS}}.items() if v is not None})
    if len(slot_rows) > pol.MAX_SLOTS:  # bounded: the rows holding a failure history are kept first
        keep = sorted(sorted(range(len(slot_rows)), key=lambda i: "failures" not in slot_rows[i])[:pol.MAX_SLOTS])
        slot_rows = [slot_rows[i] for i in keep]
    live = [p for p in mine if not p.deleting]
    phases: dict[str, int] = {}
    for p in live:
        phase = p.phase if p.phase in POD_PHASES else "Unknown"
        phases[phase] = phases.get(phase, 0) + 1
    running = sum(1 for p in live if p.phase == "Running" and (p.serves or "", p.want or "") in slots)
    done = completions is not None and len(completed & set(range(completions))) >= completions

    matched = st.Cond(T.Matched, "True", "PodsMatched", f"{len(selected)} online pod(s) selected") if selected \
        else st.Cond(T.Matched, "False", "NoPodsMatched", f"the selector matches no running pod in namespace "
                     f"{namespace}" if spec is not None else "no valid selector")
    if problem is not None:
        workload = st.Cond(T.OfflineWorkload, "False", problem[0], problem[1])
    else:
        source = f"Job {spec.offline.job_ref.name}" if spec and spec.offline.job_ref else "the policy's template"
        workload = st.Cond(T.OfflineWorkload, "True", "JobReady" if spec and spec.offline.job_ref
                           else "TemplateReady", f"offline pods from {source}")
    if done:
        harvesting = st.Cond(T.Harvesting, "True", "Complete", f"all {completions} index(es) succeeded")
    elif not slots:
        harvesting = st.Cond(T.Harvesting, "False", "NoGPU", "no selected online pod holds a GPU yet")
    elif running == len(slots):
        harvesting = st.Cond(T.Harvesting, "True", "AllGPUsHarvested",
                             f"{running} offline pod(s) run on {len(slots)} GPU(s)")
    elif backing:
        harvesting = st.Cond(T.Harvesting, "False", "OfflineBackoff",
                             f"{len(backing)} of {len(slots)} harvested GPU(s) wait after a failed offline pod; "
                             f"next attempt at {stamp(backing[0])}")
    else:
        harvesting = st.Cond(T.Harvesting, "False", "OfflinePending",
                             f"{running} of {len(slots)} harvested GPU(s) run an offline pod")
    conds = [matched, workload, harvesting]
    first = next((cd for cd in conds if cd.status != "True"), None)
    ready = st.Cond(T.Ready, "True", "Harvesting", harvesting.message) if first is None \
        else st.Cond(T.Ready, "False", first.reason, first.message)
    conds.append(ready)
    status = {
        "onlinePods": len(selected),
        "harvestedGPUs": len(slots),
        "offlinePods": len(live),
        "offlineRunning": running,
        "completedIndexes": sorted(completed),
        "slots": slot_rows,
        "message": ready.message,
        "observedGeneration": generation,
        "conditions": st.merge_conditions(old.get("conditions") or [], conds, generation, now),
    }
    was = {cd.get("type"): (cd.get("status"), cd.get("reason")) for cd in old.get("conditions") or []}
    for cd in conds[:3]:
        if was.get(cd.type.value) != (cd.status, cd.reason):
            events.append(Event("Normal" if cd.status == "True" else "Warning", cd.reason, cd.message))
    return PolicyPlan(status=status, actions=actions, events=events, warned=told, offline_phases=phases,
                      retry_at=backing[0] if backing else None)


def _slot_order(item: tuple[Slot, tuple[WorkloadPod, str, str]]) -> tuple[str, str]:
    return item[1][0].name, item[1][2]  # by online pod, then GPU


def _free_index(taken: set[int], completions: int | None, name_taken: Callable[[int], bool]) -> int | None:
    i = 0
    while i in taken or name_taken(i):
        i += 1
    return None if completions is not None and i >= completions else i


def action_event(action: Create | Delete) -> Event:
    if isinstance(action, Create):
        meta = action.pod["metadata"]
        return Event("Normal", "CreatedOfflinePod", f"created offline pod {meta['name']} (index "
                     f"{meta['annotations'][ANN_COMPLETION_INDEX]}) on node {action.node}, GPU "
                     f"{meta['annotations'][ANN_WANT_GPU]}")
    kind = "Warning" if action.why == "GPUMismatch" else "Normal"  # a failure has its own OfflinePodFailed
    return Event(kind, "DeletingOfflinePod", f"deleting offline pod {action.name}: {action.why}")
