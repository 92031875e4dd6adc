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
from valve.api.contract import ROLES
from valve.operator import metrics
from valve.operator.capacity import Claim, NodeView, build_nodes, node_view
from valve.operator.kube import Kube
from valve.operator.placement import NO_FIT, PairRequest, place
from valve.operator.pods import LABEL_MANAGED, MANAGED_BY, OperatorConfig, PodView, pod_view
from valve.operator.reconcile import Create, action_event, node_of, parse_spec, plan

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, name)
CREATED_GRACE_S = 30.0  # how long a created pod counts as there before the watch shows it


@dataclass
class Operator:
    """State shared by the handlers of one operator process."""

    kube: Kube
    cfg: OperatorConfig = field(default_factory=OperatorConfig)
    resync_seconds: float = 30.0
    indices: dict[str, Any] = field(default_factory=dict)
    claims: dict[Key, str] = field(default_factory=dict)  # placed, status not observed yet
    first_seen: dict[Key, float] = field(default_factory=dict)
    phases: dict[Key, str] = field(default_factory=dict)
    written: dict[Key, dict[str, Any]] = field(default_factory=dict)  # last status this process wrote
    created: dict[tuple[str, str, str], tuple[float, PodView]] = field(default_factory=dict)
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
            # A pod this process created that the watch has not shown yet counts as there (no re-create).
            entry = self.created.get((*key, role))
            if entry is not None and (role in found or now - entry[0] > CREATED_GRACE_S):
                del self.created[(*key, role)]
            elif entry is not None:
                found[role] = entry[1]
        return {role: found.get(role) for role in ROLES}

    def node_views(self) -> list[NodeView]:
        return [view for store in self.indices["valve_nodes"].values() for view in store]

    def all_pods(self) -> list[PodView]:
        return [pod for key, store in self.indices["valve_pods"].items() if key[0] == "node" for pod in store]

    def claim_list(self) -> list[Claim]:
        out = []
        for key, store in self.indices["valve_pairs"].items():
            for body in store:
                node = self.claims.get(key) or (body.get("status") or {}).get("node")
                if node:
                    pods = self.pods_of(key)
                    out.append(Claim(node, tuple(r for r in ROLES if pods[r] is None)))
        return out

    # --- reconciliation --------------------------------------------------------------------------
    async def reconcile(self, body: dict[str, Any]) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        lock = self.locks.setdefault(key, asyncio.Lock())
        async with lock:
            try:
                await self._reconcile(key, body)
            except Exception:
                metrics.RECONCILE_ERRORS.inc()
                raise

    async def _reconcile(self, key: Key, body: dict[str, Any]) -> None:
        self.first_seen.setdefault(key, time.monotonic())
        if key in self.written:
            # The operator is the only writer of status: what it wrote last is newer than a queued event's.
            body = {**body, "status": self.written[key]}
        pods = self.pods_of(key)
        node = self.claims.get(key) or node_of(body, pods)
        spec, _ = parse_spec(body)
        no_fit = NO_FIT
        if node is None and spec is not None and (body.get("status") or {}).get("phase"):
            node, no_fit = await self.place(key, spec)
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        todo = plan(body, pods, node=node, cfg=self.cfg, now=now, no_fit=no_fit)

        old = body.get("status") or {}
        done = []
        for action in todo.actions:
            if isinstance(action, Create):
                created = await self.kube.create_pod(action.pod)
                ok = created is not None
                if ok:
                    self.created[(*key, action.role)] = (time.monotonic(), pod_view(created))
                else:
                    log.info("pod %s exists already", action.pod["metadata"]["name"])
            else:
                ok = await self.kube.delete_pod(key[0], action.name, action.uid)
            if ok:
                done.append(action_event(action, old, node))
        if any(old.get(k) != v for k, v in todo.status.items()) or set(old) - set(todo.status):
            await self.kube.patch_status(*key, {**{k: None for k in old}, **todo.status})
            self.written[key] = todo.status
        for event in [*done, *todo.events]:
            await self.kube.post_event(body, event.type, event.reason, event.message)
        self.phases[key] = todo.status["phase"]
        metrics.set_pairs(self.phases.values())

    async def place(self, key: Key, spec: c.ColocationPairSpec) -> tuple[str | None, str]:
        """Pick a node for one pair (placements are serialised so two pairs never take one slot)."""
        async with self.placing:
            nodes = build_nodes(self.node_views(), self.all_pods(), self.claim_list(), spec.node_selector)
            result = place([PairRequest(f"{key[0]}/{key[1]}")], nodes)[0]
            if result.node is not None:
                self.claims[key] = result.node
                metrics.PLACEMENT_LATENCY.observe(time.monotonic() - self.first_seen.get(key, time.monotonic()))
            return result.node, result.reason

    def forget(self, key: Key) -> None:
        for d in (self.claims, self.first_seen, self.phases, self.locks, self.written):
            d.pop(key, None)
        for role in ROLES:
            self.created.pop((*key, role), None)
        metrics.set_pairs(self.phases.values())

    def settle_claim(self, key: Key, body: dict[str, Any]) -> None:
        """A claim is no longer needed once the pair's status shows the node."""
        if (body.get("status") or {}).get("node") and key in self.claims:
            del self.claims[key]

    async def resync(self) -> None:
        """Reconcile every pair (a safety net for missed events and for pairs waiting for capacity)."""
        for key in list(self.indices["valve_pairs"].keys()):
            body = self.pair_body(key)
            if body is not None:
                try:
                    await self.reconcile(body)
                except Exception as e:
                    log.warning("resync of %s/%s failed: %s", *key, e)
        metrics.RESYNCS.inc()

    async def resync_loop(self) -> None:
        await self.indexed.wait()  # resource handlers (and so `indexed`) start only once indexes are full
        while True:
            await asyncio.sleep(self.resync_seconds)
            await self.resync()


def _snapshot(body: kopf.Body) -> dict[str, Any]:
    raw = dict(body)
    return {"apiVersion": raw.get("apiVersion"), "kind": raw.get("kind"), "metadata": dict(raw["metadata"]),
            "spec": raw.get("spec"), "status": raw.get("status")}


def _owner(body: kopf.Body) -> str | None:
    for ref in body.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == c.KIND and ref.get("apiVersion", "").startswith(c.GROUP + "/") and ref.get("controller"):
            return ref.get("name")
    return None


def build_registry(op: Operator, login: Callable[..., Any] | None = None) -> kopf.OperatorRegistry:
    """All handlers of the operator, in a registry of their own."""
    registry = kopf.OperatorRegistry()
    pairs = dict(group=c.GROUP, version=c.VERSION, plural=c.PLURAL, registry=registry)

    kopf.on.login(registry=registry)(login or kopf.login_via_client)

    @kopf.on.startup(registry=registry, id="valve_startup")
    async def valve_startup(**kwargs: Any) -> None:
        op.indices.update({name: kwargs[name] for name in ("valve_pairs", "valve_pods", "valve_nodes")})
        op.resync_task = asyncio.create_task(op.resync_loop(), name="valve resync")

    @kopf.on.cleanup(registry=registry, id="valve_cleanup")
    async def valve_cleanup(**_: Any) -> None:
        if op.resync_task is not None:
            op.resync_task.cancel()

    @kopf.index(**pairs, id="valve_pairs")
    def valve_pairs(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
        return {(namespace, name): _snapshot(body)}

    @kopf.index("v1", "pods", registry=registry, id="valve_pods")
    def valve_pods(namespace: str, body: kopf.Body, **_: Any) -> dict[Any, PodView]:
        view = pod_view(dict(body))
        owner = _owner(body)
        out: dict[Any, PodView] = {}
        if view.online or view.offline:
            out[("node", view.node or view.target)] = view
        if owner is not None:
            out[("pair", namespace, owner)] = view
        return out  # {} (not None) so kopf drops what an earlier version of the pod indexed

    @kopf.index("v1", "nodes", registry=registry, id="valve_nodes")
    def valve_nodes(name: str, body: kopf.Body, **_: Any) -> dict[str, NodeView]:
        return {name: node_view(dict(body))}

    @kopf.on.event(**pairs, id="valve_pair_event")
    async def valve_pair_event(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
        op.indexed.set()
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event.get("type") == "DELETED":
            op.forget(key)
            return
        snapshot = _snapshot(body)
        op.settle_claim(key, snapshot)
        await op.reconcile(snapshot)

    @kopf.on.event("v1", "pods", labels={LABEL_MANAGED: MANAGED_BY}, registry=registry, id="valve_pod_event")
    async def valve_pod_event(namespace: str, body: kopf.Body, **_: Any) -> None:
        op.indexed.set()
        owner = _owner(body)
        pair = op.pair_body((namespace, owner)) if owner else None
        if pair is not None:
            await op.reconcile(pair)

    return registry


def make_settings(peering: str | None = None) -> kopf.OperatorSettings:
    """kopf settings: standalone unless a peering name is given, no scanning, no event posting of its own."""
    settings = kopf.OperatorSettings()
    settings.peering.standalone = peering is None
    if peering is not None:
        settings.peering.name = peering
        settings.peering.mandatory = True
    settings.scanning.disabled = True  # no CRD or namespace watching: no RBAC for them
    settings.posting.enabled = False  # events are posted by the handlers, on decisions only
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    return settings
