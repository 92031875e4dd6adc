"""kopf handlers: thin glue between watch events and the pure functions in this package.

kopf runs standalone (no peering, no CRD/namespace scanning, no event posting of its own, no
annotations or finalizers on the objects): handlers are level-triggered `on.event` handlers plus indexes,
so the operator's API use is exactly what `valve.operator.rbac.RULES` lists.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf

from valve.api import colocation as c
from valve.api.contract import OFFLINE, ONLINE, ROLES
from valve.operator import metrics
from valve.operator.capacity import Claim, FreeSlots, NodeView, build_nodes, node_view
from valve.operator.kube import CreateRefused, Kube
from valve.operator.placement import NO_FIT, Node, PairRequest, place
from valve.operator.pods import (
    LABEL_MANAGED,
    MANAGED_BY,
    OperatorConfig,
    PodView,
    claim_name,
    pod_view,
    render_pod,
)
from valve.operator.reconcile import (
    Create,
    CreateClaim,
    action_event,
    node_of,
    not_allowed,
    parse_spec,
    plan,
    plan_dra,
)

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, name)
CREATED_GRACE_S = 30.0  # how long a created pod counts as there before the watch shows it
CONFLICT_GRACE_S = 300.0  # how long a create refused with 409 (the pod exists) counts as there
GPU_REPORT_GRACE_S = 5.0  # an online pod started this long without a reported GPU: offline pod without a wish
MAX_REPAIRS = 3  # offline pods recreated for a GPU mismatch, per pair and process, before the pair stays Degraded
POLICY_GATE = "policy:"  # prefix of a policy's key in `inflight` (no namespace name has a colon)
URGENT = ("phase", "node")  # status fields written at once; other changes once the pair is quiet


@dataclass
class Operator:
    """State shared by the handlers of one operator process.

    Per pair, everything is O(1) in the number of pairs: pods come from the index by pair key, node usage
    from the index by node key (bounded by the node's GPUs), the best-fit node from `FreeSlots`.
    """

    kube: Kube
    cfg: OperatorConfig = field(default_factory=OperatorConfig)
    resync_seconds: float = 30.0
    coalesce_seconds: float | None = None  # quiet time before a detail-only status write (None: resync_seconds)
    indices: dict[str, Any] = field(default_factory=dict)
    claims: dict[Key, str] = field(default_factory=dict)  # placed, status not observed yet
    pair_node: dict[Key, str] = field(default_factory=dict)
    node_pairs: dict[str, set[Key]] = field(default_factory=dict)
    first_seen: dict[Key, float] = field(default_factory=dict)
    phases: dict[Key, str] = field(default_factory=dict)
    written: dict[Key, dict[str, Any]] = field(default_factory=dict)  # status as last written (or read)
    latest: dict[Key, dict[str, Any]] = field(default_factory=dict)  # status as last computed
    dirty: dict[Key, float] = field(default_factory=dict)  # latest != written, last changed at (monotonic)
    created: dict[tuple[str, str, str], tuple[float, PodView]] = field(default_factory=dict)  # until deadline
    repairs: dict[Key, int] = field(default_factory=dict)
    waiting: dict[str, set[Key]] = field(default_factory=dict)  # node -> pairs held by the offline gate
    inflight: dict[str, tuple[Key, float]] = field(default_factory=dict)  # node -> (pair, until) creating offline
    fingerprints: dict[Key, tuple[Any, ...]] = field(default_factory=dict)
    unreported: dict[Key, float] = field(default_factory=dict)  # online pod started, GPU not reported, since
    refused: dict[Key, str] = field(default_factory=dict)  # a pod create the API refused: its message, until resync
    rendered: dict[Key, dict[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    specs: dict[Key, tuple[tuple[Any, Any], Any]] = field(default_factory=dict)  # (uid, generation), parse_spec
    free: FreeSlots = field(default_factory=FreeSlots)
    free_ready: bool = False
    indexed: asyncio.Event = field(default_factory=asyncio.Event)  # kopf has filled the indexes
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    placing: asyncio.Lock = field(default_factory=asyncio.Lock)
    resync_task: asyncio.Task | None = None

    # --- views over the kopf indexes -------------------------------------------------------------
    def pair_body(self, key: Key) -> dict[str, Any] | None:
        store = self.indices["valve_pairs"].get(key)
        return next(iter(store), None) if store else None

    def pods_of(self, key: Key) -> dict[str, PodView | None]:
        store = self.indices["valve_pods"].get(("pair", *key))
        found = {pod.role: pod for pod in (store or ()) if pod.role in ROLES}
        now = time.monotonic()
        for role in ROLES:
            # A pod this process created (or was told exists) that the watch has not shown yet counts as there.
            entry = self.created.get((*key, role))
            if entry is not None and (role in found or now > entry[0]):
                del self.created[(*key, role)]
            elif entry is not None:
                found[role] = entry[1]
        return {role: found.get(role) for role in ROLES}

    def node_pods(self, node: str) -> list[PodView]:
        return list(self.indices["valve_pods"].get(("node", node)) or ())

    def node_usage(self, name: str) -> Node | None:
        """One node's free slots from its own pods and the pairs placed on it whose pods are not seen yet."""
        store = self.indices["valve_nodes"].get(name)
        view = next(iter(store), None) if store else None
        if view is None:
            return None
        claims = []
        for key in self.node_pairs.get(name, ()):
            pods = self.pods_of(key)
            missing = tuple(r for r in ROLES if pods[r] is None)
            if missing:
                claims.append(Claim(name, missing))
        return build_nodes([view], self.node_pods(name), claims)[0]

    def refresh(self, name: str | None) -> None:
        if not self.free_ready or name is None:
            return
        node = self.node_usage(name)
        if node is None:
            self.free.remove(name)
        else:
            self.free.update(node)

    def assign(self, key: Key, node: str | None) -> None:
        old = self.pair_node.get(key)
        if old == node:
            return
        if old is not None:
            self.node_pairs.get(old, set()).discard(key)
        if node is None:
            self.pair_node.pop(key, None)
        else:
            self.pair_node[key] = node
            self.node_pairs.setdefault(node, set()).add(key)
        for name in (old, node):
            self.refresh(name)

    def offline_gate(self, key: Key, node: str, pods: dict[str, PodView | None]) -> bool:
        """True when no other offline pod on the node waits for admission (so the plugin knows whose wish to follow)."""
        own = pods[OFFLINE].uid if pods[OFFLINE] is not None else None
        return not self.node_busy(node, key, own)

    def inflight_pod(self, key: Key, node: str) -> PodView | None:
        """The offline pod whose create took the node's gate: a pair's (by pair key) or a policy's (by
        (POLICY_GATE + namespace, pod name), looked up among the node's pods)."""
        if key[0].startswith(POLICY_GATE):
            return next((p for p in self.node_pods(node) if p.name == key[1] and p.offline), None)
        return self.pods_of(key)[OFFLINE]

    def node_busy(self, node: str, key: Key, own: str | None = None) -> bool:
        """Whether an offline pod other than `key`'s (pod uid `own`) waits for admission on the node, or is
        being created."""
        if any(p.offline and p.admitting and p.uid != own for p in self.node_pods(node)):
            return True
        entry = self.inflight.get(node)
        if entry is None or entry[0] == key:
            return False
        pod = self.inflight_pod(entry[0], node)
        if (pod is None and time.monotonic() < entry[1]) or (pod is not None and pod.admitting):
            return True  # its create is on its way, or its pod waits for admission
        del self.inflight[node]
        return False

    # --- reconciliation --------------------------------------------------------------------------
    async def reconcile(self, body: dict[str, Any], resync: bool = False) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        lock = self.locks.setdefault(key, asyncio.Lock())
        async with lock:
            try:
                await self._reconcile(key, body, resync)
            except Exception:
                metrics.RECONCILE_ERRORS.inc()
                raise

    async def _reconcile(self, key: Key, body: dict[str, Any], resync: bool) -> None:
        if body["metadata"].get("deletionTimestamp"):
            self.forget(key)  # being deleted: its pods go with it, nothing is created for it any more
            return
        if resync:
            self.refused.pop(key, None)  # try the create again (e.g. the namespace's PodSecurity label changed)
        self.first_seen.setdefault(key, time.monotonic())
        self.written.setdefault(key, body.get("status") or {})
        if key in self.latest:
            # The operator is the only writer of status: what it computed last is newer than a queued event's.
            body = {**body, "status": self.latest[key]}
        pods = self.pods_of(key)
        node = self.claims.get(key) or node_of(body, pods)
        fingerprint = (body["metadata"].get("resourceVersion"), node, pods[ONLINE], pods[OFFLINE],
                       self.repairs.get(key, 0))
        if resync and self.fingerprints.get(key) == fingerprint and self.phases.get(key) != "Pending" \
                and key not in self.waiting.get(node or "", ()) and key not in self.unreported:
            return  # nothing it depends on changed since the last pass
        parsed = self.parse(key, body)
        spec = parsed[0]
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        dra_claim = None  # placement dra: (the pair's ResourceClaim or None)
        if spec is not None and spec.placement == "dra":
            # The scheduler places the pods by the pair's ResourceClaim: no node, slots or offline gate here.
            claim = await self.kube.get_claim(key[0], claim_name(key[1]))
            dra_claim = (claim,)
            todo = plan_dra(body, pods, claim, cfg=self.cfg, now=now, create_failed=self.refused.get(key),
                            render=self.renderer(key), parsed=parsed)
            node = todo.status.get("node")
        else:
            todo, node = await self._plan_device_plugin(key, body, parsed, pods, node, now)

        if node is not None and any(isinstance(a, Create) and a.role == OFFLINE for a in todo.actions):
            # Taken before the create's await: another pair's reconcile must see the gate closed meanwhile.
            self.inflight[node] = (key, time.monotonic() + CREATED_GRACE_S)
        old = body.get("status") or {}
        done = []
        for action in todo.actions:
            if isinstance(action, CreateClaim):
                try:
                    await self.kube.create_claim(action.claim)
                except CreateRefused as e:
                    log.warning("creating ResourceClaim %s refused: %s", action.claim["metadata"]["name"], e)
                    await self.refuse(key, body, node, e.message, pods, now, dra_claim)
                    return
                continue
            if isinstance(action, Create):
                if old.get(f"{action.role}Pod") and not await self.kube.pair_exists(
                        *key, body["metadata"].get("uid")):
                    self.forget(key)  # its DELETED event is still on the way: no orphan pod
                    return
                try:
                    created = await self.kube.create_pod(action.pod)
                except CreateRefused as e:
                    log.warning("creating pod %s refused: %s", action.pod["metadata"]["name"], e)
                    await self.refuse(key, body, node, e.message, pods, now, dra_claim)
                    return
                ok = created is not None
                grace = CREATED_GRACE_S
                if not ok:  # it exists: count it as there until the watch shows it, do not ask again
                    log.info("pod %s exists already", action.pod["metadata"]["name"])
                    created, grace = action.pod, CONFLICT_GRACE_S
                self.created[(*key, action.role)] = (time.monotonic() + grace, pod_view(created))
            else:
                ok = await self.kube.delete_pod(key[0], action.name, action.uid)
                if ok and action.why == "GPUMismatch":
                    self.repairs[key] = self.repairs.get(key, 0) + 1
            if ok and (event := action_event(action, old, node)) is not None:
                done.append(event)
        await self.write_status(key, todo.status)
        for event in [*done, *todo.events]:
            await self.kube.post_event(body, event.type, event.reason, event.message)
        self.set_phase(key, todo.status["phase"])
        self.fingerprints[key] = (body["metadata"].get("resourceVersion"), node, *self.pods_of(key).values(),
                                  self.repairs.get(key, 0))

    async def _plan_device_plugin(self, key: Key, body: dict[str, Any],
                                  parsed: tuple[c.ColocationPairSpec | None, str | None],
                                  pods: dict[str, PodView | None], node: str | None, now: str) -> tuple[Any, str | None]:
        """placement devicePlugin: pick a node, follow the offline gate and the online pod's GPU report."""
        spec = parsed[0]
        if spec is not None and (not_allowed(spec, self.cfg) or key in self.refused):
            spec = None  # refused: take no GPU for it
        no_fit = NO_FIT
        if node is None and spec is not None:
            node, no_fit = await self.place(key, spec)
        self.assign(key, node)
        gate = True
        if node is not None and pods[OFFLINE] is None:
            gate = self.offline_gate(key, node, pods)
            if gate:
                self.waiting.get(node, set()).discard(key)
            else:
                self.waiting.setdefault(node, set()).add(key)
        online = pods[ONLINE]
        if online is not None and online.started and online.gpu is None:
            unreported_s = time.monotonic() - self.unreported.setdefault(key, time.monotonic())
        else:
            unreported_s = 0.0
            self.unreported.pop(key, None)
        todo = plan(body, pods, node=node, cfg=self.cfg, now=now, no_fit=no_fit, offline_gate=gate,
                    repairs_left=MAX_REPAIRS - self.repairs.get(key, 0),
                    unwished=unreported_s >= GPU_REPORT_GRACE_S, create_failed=self.refused.get(key),
                    render=self.renderer(key), parsed=parsed)
        return todo, node

    async def refuse(self, key: Key, body: dict[str, Any], node: str | None, message: str,
                     pods: dict[str, PodView | None], now: str, dra_claim: tuple[Any] | None = None) -> None:
        """A pod create was refused: release the GPU claim (and the node's offline gate) and say why.
        `dra_claim`: placement dra, with the pair's ResourceClaim (nothing of the node ledger to release)."""
        self.refused[key] = message
        if dra_claim is not None:
            todo = plan_dra(body, pods, dra_claim[0], cfg=self.cfg, now=now, create_failed=message)
            await self.write_status(key, todo.status)
            for event in todo.events:
                await self.kube.post_event(body, event.type, event.reason, event.message)
            self.set_phase(key, todo.status["phase"])
            return
        self.claims.pop(key, None)
        if node is not None and self.inflight.get(node, (None,))[0] == key:
            del self.inflight[node]
        if not any(p is not None and not p.deleting for p in pods.values()):
            node = None
            self.assign(key, None)
        todo = plan(body, pods, node=node, cfg=self.cfg, now=now, create_failed=message)
        await self.write_status(key, todo.status)
        for event in todo.events:
            await self.kube.post_event(body, event.type, event.reason, event.message)
        self.set_phase(key, todo.status["phase"])
        if node is not None:
            await self.wake(node)

    async def write_status(self, key: Key, status: dict[str, Any], flush: bool = False) -> None:
        """Write at once what matters (phase, node); other changes once the pair has been quiet for
        `coalesce_seconds` (a pair going through its steps writes only its transitions)."""
        previous = self.latest.get(key)
        self.latest[key] = status
        server = self.written.get(key) or {}
        if status == server:
            self.dirty.pop(key, None)
            return
        if not flush and server and all(server.get(f) == status.get(f) for f in URGENT):
            if status != previous or key not in self.dirty:
                self.dirty[key] = time.monotonic()
            return
        await self.kube.patch_status(*key, {**{k: None for k in server}, **status})
        self.written[key] = status
        self.dirty.pop(key, None)

    async def flush(self, older_than: float) -> None:
        now = time.monotonic()
        for key in [k for k, since in self.dirty.items() if now - since >= older_than]:
            if key in self.latest:
                async with self.locks.setdefault(key, asyncio.Lock()):
                    await self.write_status(key, self.latest[key], flush=True)

    def parse(self, key: Key, body: dict[str, Any]) -> tuple[c.ColocationPairSpec | None, str | None]:
        """parse_spec, remembered per pair by (uid, generation): the API server bumps the generation whenever
        the spec changes, and a pair is reconciled on every event of its pods."""
        meta = body["metadata"]
        sig = (meta.get("uid"), meta.get("generation"))
        got = self.specs.get(key)
        if got is None or got[0] != sig or None in sig:
            got = self.specs[key] = (sig, parse_spec(body))
        return got[1]

    def renderer(self, key: Key) -> Callable[..., dict[str, Any]]:
        """render_pod, remembered per pair: the pods depend only on the spec (generation), node and wish."""
        cache = self.rendered.setdefault(key, {})

        def render(pair: dict[str, Any], spec: c.ColocationPairSpec, role: str, node: str, cfg: OperatorConfig,
                   want_gpu: str | None = None) -> dict[str, Any]:
            meta = pair["metadata"]
            sig = (meta.get("uid"), meta.get("generation"), role, node, want_gpu)
            if sig not in cache:
                if len(cache) > 8:
                    cache.clear()
                cache[sig] = render_pod(pair, spec, role, node, cfg, want_gpu=want_gpu)
            return cache[sig]
        return render

    def set_phase(self, key: Key, phase: str) -> None:
        old = self.phases.get(key)
        if old != phase:
            if old is not None:
                metrics.PAIRS.labels(phase=old).dec()
            metrics.PAIRS.labels(phase=phase).inc()
            self.phases[key] = phase

    async def place(self, key: Key, spec: c.ColocationPairSpec) -> tuple[str | None, str]:
        """Pick a node for one pair (placements are serialised so two pairs never take one slot)."""
        async with self.placing:
            if not self.free_ready:
                self.start_ledger()
            if spec.node_selector:  # rare: scan the nodes that match
                views = [v for store in self.indices["valve_nodes"].values() for v in store
                         if all(v.labels.get(k) == val for k, val in spec.node_selector.items())]
                nodes = [n for v in views if (n := self.node_usage(v.name)) is not None]
                result = place([PairRequest(f"{key[0]}/{key[1]}")], nodes)[0]
                name, reason = result.node, result.reason
            else:
                name = self.free.best()
                reason = f"best fit on {name}" if name else NO_FIT
            if name is not None:
                self.claims[key] = name
                self.assign(key, name)
                metrics.PLACEMENT_LATENCY.observe(time.monotonic() - self.first_seen.get(key, time.monotonic()))
            return name, reason

    def start_ledger(self) -> None:
        """Once per process: every placed pair's node (status or pods), then every node's free slots."""
        for key, store in self.indices["valve_pairs"].items():
            for body in store:
                if (body.get("spec") or {}).get("placement") == "dra":
                    continue  # its GPU is no extended-resource slot
                node = self.claims.get(key) or node_of(body, self.pods_of(key))
                if node:
                    self.pair_node[key] = node
                    self.node_pairs.setdefault(node, set()).add(key)
        self.free_ready = True
        for name in list(self.indices["valve_nodes"].keys()):
            self.refresh(name)

    async def wake(self, node: str | None) -> None:
        """An offline pod on the node was admitted (or went): the next pair held by the gate may go on.

        One at a time: the first that creates its offline pod closes the gate again for the others. A pair
        that is held again (another offline pod on the node still waits for admission) ends the round: without
        that, it was taken again and again, never awaiting anything, and the event loop stood still.
        """
        waiting = self.waiting.get(node or "")
        while waiting:
            key = min(waiting)  # any order would do; a fixed one keeps runs reproducible
            waiting.discard(key)
            body = self.pair_body(key)
            if body is not None:
                await self.reconcile(body)
            if node in self.inflight or key in waiting:
                return

    def forget(self, key: Key) -> None:
        node = self.pair_node.get(key)
        self.assign(key, None)
        if node is not None:
            self.waiting.get(node, set()).discard(key)
        if self.phases.get(key) is not None:
            metrics.PAIRS.labels(phase=self.phases[key]).dec()
        for d in (self.claims, self.first_seen, self.phases, self.locks, self.written, self.latest, self.dirty,
                  self.repairs, self.fingerprints, self.unreported, self.rendered, self.refused, self.specs):
            d.pop(key, None)
        for role in ROLES:
            self.created.pop((*key, role), None)

    def settle_claim(self, key: Key, body: dict[str, Any]) -> None:
        """A claim is no longer needed once the pair's status shows the node."""
        if (body.get("status") or {}).get("node") and key in self.claims:
            del self.claims[key]

    async def resync(self) -> None:
        """Reconcile every pair whose inputs changed, or that waits for capacity (a safety net for missed events)."""
        for key in list(self.indices["valve_pairs"].keys()):
            body = self.pair_body(key)
            if body is not None:
                try:
                    await self.reconcile(body, resync=True)
                except Exception as e:
                    log.warning("resync of %s/%s failed: %s", *key, e)
        metrics.RESYNCS.inc()

    async def resync_loop(self) -> None:
        await self.indexed.wait()  # resource handlers (and so `indexed`) start only once indexes are full
        quiet = self.resync_seconds if self.coalesce_seconds is None else self.coalesce_seconds
        tick = max(0.05, min(self.resync_seconds, quiet / 2))
        last = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            await self.flush(quiet)
            if time.monotonic() - last >= self.resync_seconds:
                await self.resync()
                last = time.monotonic()


def _snapshot(body: kopf.Body) -> dict[str, Any]:
    raw = dict(body)
    return {"apiVersion": raw.get("apiVersion"), "kind": raw.get("kind"), "metadata": dict(raw["metadata"]),
            "spec": raw.get("spec"), "status": raw.get("status")}


def _owner(body: kopf.Body) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == c.KIND and ref.get("apiVersion", "").startswith(c.GROUP + "/") and ref.get("controller"):
            return ref.get("name")
    return None


def build_registry(op: Operator, login: Callable[..., Any] | None = None,
                   webhook: bool = False) -> kopf.OperatorRegistry:
    """All handlers of the operator, in a registry of their own."""
    registry = kopf.OperatorRegistry()
    pairs = dict(group=c.GROUP, version=c.VERSION, plural=c.PLURAL, registry=registry)

    kopf.on.login(registry=registry)(login or kopf.login_via_client)

    @kopf.on.startup(registry=registry, id="valve_startup")
    async def valve_startup(**kwargs: Any) -> None:
        metrics.set_pairs(())
        op.indices.update({name: kwargs[name] for name in ("valve_pairs", "valve_pods", "valve_nodes")})
        op.resync_task = asyncio.create_task(op.resync_loop(), name="valve resync")

    @kopf.on.cleanup(registry=registry, id="valve_cleanup")
    async def valve_cleanup(**_: Any) -> None:
        if op.resync_task is not None:
            op.resync_task.cancel()

    # Index handlers are coroutines: kopf runs a plain function in a thread pool, one hop per event and index.
    @kopf.index(**pairs, id="valve_pairs")
    async def valve_pairs(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
        return {(namespace, name): _snapshot(body)}

    @kopf.index("v1", "pods", registry=registry, id="valve_pods")
    async def valve_pods(namespace: str, body: kopf.Body, **_: Any) -> dict[Any, PodView]:
        view = pod_view(dict(body))
        owner = _owner(body)
        out: dict[Any, PodView] = {}
        if view.online or view.offline:
            out[("node", view.node or view.target)] = view
        if owner is not None:
            out[("pair", namespace, owner)] = view
        return out  # {} (not None) so kopf drops what an earlier version of the pod indexed

    @kopf.index("v1", "nodes", registry=registry, id="valve_nodes")
    async def valve_nodes(name: str, body: kopf.Body, **_: Any) -> dict[str, NodeView]:
        return {name: node_view(dict(body))}

    @kopf.on.event(**pairs, id="valve_pair_event")
    async def valve_pair_event(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
        op.indexed.set()
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event.get("type") == "DELETED" or body["metadata"].get("deletionTimestamp"):
            op.forget(key)
            return
        snapshot = _snapshot(body)
        op.settle_claim(key, snapshot)
        await op.reconcile(snapshot)

    @kopf.on.event("v1", "pods", labels={LABEL_MANAGED: MANAGED_BY}, registry=registry, id="valve_pod_event")
    async def valve_pod_event(event: dict[str, Any], namespace: str, body: kopf.Body, **_: Any) -> None:
        op.indexed.set()
        view = pod_view(dict(body))
        node = view.node or view.target
        op.refresh(node)
        owner = _owner(body)
        pair = op.pair_body((namespace, owner)) if owner else None
        if pair is not None:
            await op.reconcile(pair)
        if view.offline and (event.get("type") == "DELETED" or not view.admitting):
            await op.wake(node)

    @kopf.on.event("v1", "nodes", registry=registry, id="valve_node_event")
    async def valve_node_event(name: str, **_: Any) -> None:
        op.refresh(name)

    from valve.operator.policy_handlers import add_policy_handlers

    add_policy_handlers(registry, op, webhook=webhook)
    return registry


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf builds, strips and compares a "last handled" copy of every object on every event for its change
    handlers (on.create/update/...); the operator has none (level-triggered on.event and indexes), so none is
    built, read or stored: these deep copies were about a fifth of the operator's CPU per event."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return None

    def fetch(self, *, body: kopf.Body) -> Any:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        return None


def make_settings(peering: str | None = None) -> kopf.OperatorSettings:
    """kopf settings: standalone unless a peering name is given, no scanning, no event posting of its own,
    no diff-base per object."""
    settings = kopf.OperatorSettings()
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.peering.standalone = peering is None
    if peering is not None:
        settings.peering.name = peering
        settings.peering.mandatory = True
    settings.scanning.disabled = True  # no CRD or namespace watching: no RBAC for them
    settings.posting.enabled = False  # events are posted by the handlers, on decisions only
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    return settings
