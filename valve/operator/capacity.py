"""From observed nodes and pods to the `placement.Node` inputs (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from valve.api.contract import OFFLINE, OFFLINE_RESOURCE, ONLINE, ONLINE_RESOURCE
from valve.operator.placement import Node
from valve.operator.pods import PodView


@dataclass(frozen=True)
class NodeView:
    name: str
    online_allocatable: int
    offline_allocatable: int
    schedulable: bool
    labels: Mapping[str, str] = field(default_factory=dict)


def node_view(node: dict[str, Any]) -> NodeView:
    meta = node.get("metadata", {})
    spec = node.get("spec", {}) or {}
    status = node.get("status", {}) or {}
    alloc = status.get("allocatable") or {}
    conditions = status.get("conditions") or []
    ready = any(cd.get("type") == "Ready" and cd.get("status") == "True" for cd in conditions)
    return NodeView(
        name=meta.get("name", ""),
        online_allocatable=_int(alloc.get(ONLINE_RESOURCE)),
        offline_allocatable=_int(alloc.get(OFFLINE_RESOURCE)),
        schedulable=ready and not spec.get("unschedulable", False),
        labels=dict(meta.get("labels") or {}),
    )


@dataclass(frozen=True)
class Claim:
    """A pair placed on a node whose pods (some roles) are not observed yet: their slots are taken."""

    node: str
    roles: tuple[str, ...]


def build_nodes(
    nodes: Iterable[NodeView],
    pods: Iterable[PodView],
    claims: Iterable[Claim] = (),
    selector: Mapping[str, str] | None = None,
) -> list[Node]:
    """Nodes with used slots counted from live pods and claims; `paired` from the GPUs pods report.

    A pod without a reported GPU is assumed to pair with another unreported pod of the other role on
    its node (what the device plugin's preferred allocation does for one pair at a time).
    """
    usage: dict[str, _Usage] = {}
    for pod in pods:
        where = pod.node or pod.target
        if where is None or pod.terminal or (pod.online == 0 and pod.offline == 0):
            continue
        usage.setdefault(where, _Usage()).add(pod)
    for claim in claims:
        u = usage.setdefault(claim.node, _Usage())
        u.unreported_online += ONLINE in claim.roles
        u.unreported_offline += OFFLINE in claim.roles

    out = []
    for view in nodes:
        if selector and any(view.labels.get(k) != v for k, v in selector.items()):
            continue
        u = usage.get(view.name, _Usage())
        out.append(Node(
            name=view.name,
            online_allocatable=view.online_allocatable,
            offline_allocatable=view.offline_allocatable,
            online_used=u.online_used,
            offline_used=u.offline_used,
            schedulable=view.schedulable,
            paired=u.paired,
        ))
    return out


@dataclass
class _Usage:
    online_gpus: set[str] = field(default_factory=set)
    offline_gpus: set[str] = field(default_factory=set)
    reported_online: int = 0
    reported_offline: int = 0
    unreported_online: int = 0
    unreported_offline: int = 0

    def add(self, pod: PodView) -> None:
        if pod.gpu is not None:
            if pod.online:
                self.online_gpus.add(pod.gpu)
                self.reported_online += pod.online
            if pod.offline:
                self.offline_gpus.add(pod.gpu)
                self.reported_offline += pod.offline
        else:
            self.unreported_online += pod.online
            self.unreported_offline += pod.offline

    @property
    def online_used(self) -> int:
        return self.reported_online + self.unreported_online

    @property
    def offline_used(self) -> int:
        return self.reported_offline + self.unreported_offline

    @property
    def paired(self) -> int:
        touched = len(self.online_gpus | self.offline_gpus) + max(self.unreported_online, self.unreported_offline)
        return max(0, self.online_used + self.offline_used - touched)


def _int(value: Any) -> int:
    try:
        return int(str(value)) if value is not None else 0
    except ValueError:
        return 0


class FreeSlots:
    """Best-fit choice over nodes without rescanning them: a heap of (free pairs, load, name) kept current
    by `update(node)` whenever something on a node changes (stale entries are skipped when popped).

    Each placement and each update costs O(log nodes), whatever the number of pairs.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, str, int]] = []
        self._current: dict[str, tuple[int, int]] = {}  # name -> (version, free pairs)
        self._versions = 0

    def __contains__(self, name: str) -> bool:
        return name in self._current

    def update(self, node: Node) -> None:
        import heapq

        self._versions += 1
        free = node.free_pairs if node.schedulable else 0
        self._current[node.name] = (self._versions, free)
        if free > 0:
            heapq.heappush(self._heap, (free, node.mean_load, node.name, self._versions))
        if len(self._heap) > 4 * len(self._current) + 64:  # drop stale entries now and then
            self._heap = [e for e in self._heap if self._current.get(e[2], (None,))[0] == e[3]]
            heapq.heapify(self._heap)

    def remove(self, name: str) -> None:
        self._current.pop(name, None)

    def best(self) -> str | None:
        """The best-fit node with a free pair slot (left in place: the caller takes the slot, then updates it)."""
        import heapq

        while self._heap:
            free, _, name, version = self._heap[0]
            if self._current.get(name, (None,))[0] == version:
                return name
            heapq.heappop(self._heap)
        return None
