"""Placement of online/offline pairs onto nodes: a pure function shared by the operator and the simulator.

A pair needs one `online-gpu` and one `offline-gpu` slot on the same node, and a GPU on that node with both
slots free (the device plugin's preferred allocation then puts both tenants on it).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

NO_FIT = "no node has a GPU with both online and offline slots free"


@dataclass(frozen=True)
class Node:
    name: str
    online_allocatable: int
    offline_allocatable: int
    online_used: int = 0
    offline_used: int = 0
    gpu_load: tuple[float, ...] = ()  # optional per-GPU online busy fraction, 0..1
    schedulable: bool = True
    # GPUs known to hold both an online and an offline tenant. None: assume used slots pair up as far as
    # they can (min(online_used, offline_used)), which is what pairs placed by Valve do.
    paired: int | None = None

    @property
    def free_pairs(self) -> int:
        """GPUs with both slots free: GPUs minus those with any tenant (each pair shares one GPU)."""
        gpus = min(self.online_allocatable, self.offline_allocatable)
        both = min(self.online_used, self.offline_used)
        paired = both if self.paired is None else max(0, min(self.paired, both))
        touched = self.online_used + self.offline_used - paired
        free = min(gpus - touched, self.online_allocatable - self.online_used,
                   self.offline_allocatable - self.offline_used)
        return max(0, free)

    @property
    def mean_load(self) -> float:
        return sum(self.gpu_load) / len(self.gpu_load) if self.gpu_load else 0.0


@dataclass(frozen=True)
class PairRequest:
    key: str  # "namespace/name"
    online_load: float = 0.0  # expected online busy fraction, 0..1


@dataclass(frozen=True)
class Placement:
    key: str
    node: str | None  # None: no node fits now
    reason: str


def place(pairs: Sequence[PairRequest], nodes: Sequence[Node]) -> list[Placement]:
    """Place pairs in order; best fit (fewest free pair slots first, then lowest load, then name).

    Packing keeps whole nodes free for large pairs and keeps the result deterministic. Runs in
    O((P + N) log N).
    """
    heap = [(n.free_pairs, n.mean_load, n.name) for n in nodes if n.schedulable and n.free_pairs > 0]
    heapq.heapify(heap)
    out: list[Placement] = []
    for pair in pairs:
        if not heap:
            out.append(Placement(pair.key, None, NO_FIT))
            continue
        free, load, name = heapq.heappop(heap)
        out.append(Placement(pair.key, name, f"{free} free pair slot(s) on {name}"))
        if free > 1:
            heapq.heappush(heap, (free - 1, load, name))
    return out
