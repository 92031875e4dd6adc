"""kopf handlers for ColocationPolicies and the admission webhook: thin glue over `policy.plan_policy` and
`webhook.admit` (pure), sharing the pair operator's state (its pod indexes and the per-node offline gate).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import kopf

from valve.api import policy as pol
from valve.operator import metrics
from valve.operator.handlers import _snapshot
from valve.operator.kube import CreateRefused
from valve.operator.pods import render_policy_offline_pod
from valve.operator.policy import (
    Create,
    JobView,
    WorkloadPod,
    action_event,
    job_view,
    plan_policy,
    workload_pod,
)
from valve.operator.webhook import admit, parse_policy

log = logging.getLogger(__name__)
Key = tuple[str, str]
CREATED_GRACE_S = 30.0  # a created pod counts as there this long before the watch shows it
MAX_REPAIRS = 3  # offline pods recreated for a GPU mismatch, per policy and process
WEBHOOK_ID = "inject.valve.io"  # the handler's id: the webhook's URL path (/inject.valve.io)


@dataclass
class PolicyController:
    op: Any  # handlers.Operator: kube, cfg, indexes, offline gate
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    written: dict[Key, dict[str, Any]] = field(default_factory=dict)
    warned: dict[Key, set[tuple[str, str]]] = field(default_factory=dict)
    created: dict[Key, dict[str, tuple[float, WorkloadPod]]] = field(default_factory=dict)
    refused: dict[Key, str] = field(default_factory=dict)
    jobs: dict[Key, tuple[float, JobView | None]] = field(default_factory=dict)
    repairs: dict[Key, int] = field(default_factory=dict)
    waiting: dict[str, set[Key]] = field(default_factory=dict)  # node -> policies held by its offline gate
    rendered: dict[Key, dict[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    timers: dict[Key, asyncio.TimerHandle] = field(default_factory=dict)  # a reconcile when a backoff ends
    retries: set[asyncio.Task] = field(default_factory=set)

    def policies_in(self, namespace: str) -> list[dict[str, Any]]:
        return list(self.op.indices["valve_policies"].get(namespace) or ())

    def body(self, key: Key) -> dict[str, Any] | None:
        return next((b for b in self.policies_in(key[0]) if b["metadata"]["name"] == key[1]), None)

    def pods(self, key: Key) -> list[WorkloadPod]:
        seen = list(self.op.indices["valve_ns_pods"].get(key[0]) or ())
        names = {p.name for p in seen}
        mine = self.created.get(key, {})
        now = time.monotonic()
        for name, (until, view) in list(mine.items()):
            if name in names or now > until:
                del mine[name]
            else:
                seen.append(view)
        return seen

    async def job(self, key: Key, name: str, fresh: bool) -> JobView | None:
        cached = self.jobs.get(key)
        if fresh or cached is None or time.monotonic() - cached[0] > self.op.resync_seconds:
            body = await self.op.kube.get_job(key[0], name)
            cached = (time.monotonic(), job_view(body) if body is not None else None)
            self.jobs[key] = cached
        return cached[1]

    async def reconcile(self, body: dict[str, Any], resync: bool = False) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        async with self.locks.setdefault(key, asyncio.Lock()):
            try:
                await self._reconcile(key, body, resync)
            except Exception:
                metrics.RECONCILE_ERRORS.inc()
                raise

    async def _reconcile(self, key: Key, body: dict[str, Any], resync: bool) -> None:
        if body["metadata"].get("deletionTimestamp"):
            self.forget(key)
            return
        if resync:
            self.refused.pop(key, None)
        self.written.setdefault(key, body.get("status") or {})
        body = {**body, "status": self.written[key]}  # the operator is the only writer of status
        spec, _ = parse_policy(body)
        job = None
        if spec is not None and spec.offline.job_ref is not None:
            job = await self.job(key, spec.offline.job_ref.name, resync)
        pods = self.pods(key)
        gate_key = ("policy:" + key[0], key[1])
        nodes = {p.node for p in pods if p.node}
        busy = frozenset(n for n in nodes if self.op.node_busy(n, gate_key))
        now = datetime.datetime.now(datetime.UTC).isoformat()  # precise: backoffs are timed from it
        todo = plan_policy(body, pods, cfg=self.op.cfg, now=now, job=job, busy_nodes=busy,
                           warned=frozenset(self.warned.get(key, ())), create_failed=self.refused.get(key),
                           repairs_left=MAX_REPAIRS - self.repairs.get(key, 0),
                           render=self.renderer(key, body, self.jobs.get(key, (None,))[0]))
        for node in busy:
            self.waiting.setdefault(node, set()).add(key)
        self.wake_at(key, todo.retry_at)
        done = []
        for action in todo.actions:
            if isinstance(action, Create):
                name = action.pod["metadata"]["name"]
                # Taken before the create's await: a pair's reconcile must see the node's gate closed meanwhile.
                self.op.inflight[action.node] = (("policy:" + key[0], name), time.monotonic() + CREATED_GRACE_S)
                try:
                    created = await self.op.kube.create_pod(action.pod)
                except CreateRefused as e:
                    log.warning("creating pod %s refused: %s", name, e)
                    self.op.inflight.pop(action.node, None)
                    self.refused[key] = e.message
                    return await self._reconcile(key, body, False)
                self.created.setdefault(key, {})[name] = (time.monotonic() + CREATED_GRACE_S,
                                                          workload_pod(created or action.pod))
                done.append(action_event(action))
            else:
                if await self.op.kube.delete_pod(key[0], action.name, action.uid):
                    if action.why == "GPUMismatch":
                        self.repairs[key] = self.repairs.get(key, 0) + 1
                    done.append(action_event(action))
        if todo.status != self.written.get(key):
            old = self.written.get(key) or {}
            await self.op.kube.patch_status(*key, {**{k: None for k in old}, **todo.status}, plural=pol.PLURAL)
            self.written[key] = todo.status
        self.warned.setdefault(key, set()).update(todo.warned)
        metrics.set_policy(*key, todo.status["onlinePods"], todo.status["harvestedGPUs"], todo.offline_phases)
        for event in [*todo.events, *done]:
            await self.op.kube.post_event(body, event.type, event.reason, event.message)

    def wake_at(self, key: Key, at: datetime.datetime | None) -> None:
        """Reconcile the policy again when its earliest backoff ends (nothing else may happen by then)."""
        if (old := self.timers.pop(key, None)) is not None:
            old.cancel()
        if at is not None:
            delay = max(0.0, (at - datetime.datetime.now(datetime.UTC)).total_seconds())
            self.timers[key] = asyncio.get_running_loop().call_later(delay, self._retry, key)

    def _retry(self, key: Key) -> None:
        self.timers.pop(key, None)
        if (body := self.body(key)) is not None:
            task = asyncio.create_task(self.reconcile_logged(body), name=f"valve policy retry {key[0]}/{key[1]}")
            self.retries.add(task)
            task.add_done_callback(self.retries.discard)

    async def reconcile_logged(self, body: dict[str, Any], resync: bool = False) -> None:
        try:
            await self.reconcile(body, resync)
        except Exception as e:  # the next resync tries again
            log.warning("reconcile of policy %s/%s failed: %s", body["metadata"].get("namespace"),
                        body["metadata"].get("name"), e)

    def renderer(self, key: Key, body: dict[str, Any], job_seen: float | None) -> Any:
        """render_policy_offline_pod, remembered per policy: plan_policy renders each offline pod on every pass
        (to compare spec hashes), and its inputs change only with the policy's generation or its Job."""
        cache = self.rendered.setdefault(key, {})
        meta = body["metadata"]

        def render(policy: dict[str, Any], offline: Any, runtime: Any, template: Any, **kw: Any) -> dict[str, Any]:
            sig = (meta.get("uid"), meta.get("generation"), job_seen, *sorted(kw.items(), key=lambda i: i[0]))
            if sig not in cache:
                if len(cache) > 4096:
                    cache.clear()
                cache[sig] = render_policy_offline_pod(policy, offline, runtime, template, **kw)
            return cache[sig]
        return render

    async def namespace_changed(self, namespace: str) -> None:
        for body in self.policies_in(namespace):
            await self.reconcile(body)

    async def wake(self, node: str | None) -> None:
        for key in sorted(self.waiting.pop(node or "", set())):
            body = self.body(key)
            if body is not None:
                await self.reconcile(body)

    def forget(self, key: Key) -> None:
        metrics.forget_policy(*key)
        self.wake_at(key, None)
        for d in (self.locks, self.written, self.warned, self.created, self.refused, self.jobs, self.repairs,
                  self.rendered):
            d.pop(key, None)

    async def resync(self) -> None:
        for store in list(self.op.indices["valve_policies"].values()):
            for body in list(store):
                await self.reconcile_logged(body, resync=True)

    async def resync_loop(self) -> None:
        await self.op.indexed.wait()
        while True:
            await asyncio.sleep(self.op.resync_seconds)
            await self.resync()


def add_policy_handlers(registry: kopf.OperatorRegistry, op: Any, webhook: bool = False) -> PolicyController:
    """The policy handlers, and the admission webhook's handler when the operator serves one (kopf refuses to
    start with admission handlers and no server)."""
    pc = PolicyController(op)
    policies = dict(group=pol.GROUP, version=pol.VERSION, plural=pol.PLURAL, registry=registry)
    tasks: list[asyncio.Task] = []

    @kopf.on.startup(registry=registry, id="valve_policy_startup")
    async def valve_policy_startup(**kwargs: Any) -> None:
        op.indices.update({name: kwargs[name] for name in ("valve_policies", "valve_ns_pods")})
        tasks.append(asyncio.create_task(pc.resync_loop(), name="valve policy resync"))

    @kopf.on.cleanup(registry=registry, id="valve_policy_cleanup")
    async def valve_policy_cleanup(**_: Any) -> None:
        for task in tasks:
            task.cancel()

    @kopf.index(**policies, id="valve_policies")
    async def valve_policies(namespace: str, body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
        return {namespace: _snapshot(body)}

    @kopf.index("v1", "pods", registry=registry, id="valve_ns_pods")
    async def valve_ns_pods(namespace: str, body: kopf.Body, **_: Any) -> dict[str, WorkloadPod]:
        return {namespace: workload_pod(dict(body))}

    @kopf.on.event(**policies, id="valve_policy_event")
    async def valve_policy_event(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
        op.indexed.set()
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event.get("type") == "DELETED" or body["metadata"].get("deletionTimestamp"):
            pc.forget(key)
            return
        await pc.reconcile(_snapshot(body))

    @kopf.on.event("v1", "pods", registry=registry, id="valve_policy_pod_event")
    async def valve_policy_pod_event(event: dict[str, Any], namespace: str, body: kopf.Body, **_: Any) -> None:
        if pc.policies_in(namespace):
            await pc.namespace_changed(namespace)
        view = workload_pod(dict(body))
        if view.valve_pod and (event.get("type") == "DELETED" or view.started or view.terminal):
            await pc.wake(view.node or view.target)

    if not webhook:
        return pc

    @kopf.on.mutate("v1", "pods", operations={"CREATE"}, id=WEBHOOK_ID, registry=registry)
    def valve_inject(body: kopf.Body, patch: kopf.Patch, warnings: list[str], **kwargs: Any) -> None:
        # Fail open: whatever goes wrong here, the pod is admitted as it came (online never waits on Valve).
        try:
            raw = dict(body)
            namespace = (raw.get("metadata") or {}).get("namespace") or ""
            store = kwargs["valve_policies"].get(namespace) if namespace else None
            new, told = admit(raw, list(store or ()), op.cfg)
            warnings.extend(told)
            if new is not None:
                patch.fns.append(lambda target: _replace(target, new))
        except Exception as e:
            log.warning("admission of pod %s not mutated: %s", (dict(body).get("metadata") or {}).get("name"), e)

    return pc


def _replace(target: dict[str, Any], new: dict[str, Any]) -> None:
    """kopf diffs the body it was given against this one into the JSON patch it answers with."""
    target.clear()
    target.update(new)
