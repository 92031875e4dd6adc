"""Victim selection for pool reclaim: which sequences to evict and which chunks to empty.

Two policies (``RuntimeSpec.eviction_policy``):

- ``fifo``: evict the oldest sequences first; release the highest-addressed chunks.
- ``selective``: evict the set of sequences that covers the block deficit at the least lost work (work = the
  tokens the engine must recompute, reported through ``KVPool.set_progress``; the blocks held when unknown),
  and release the chunks with the fewest live blocks (fewest compaction copies).

Pure functions over plain numbers, so they are cheap to test and to time.
"""

from __future__ import annotations

from dataclasses import dataclass

FIFO, SELECTIVE = "fifo", "selective"
POLICIES = (FIFO, SELECTIVE)


@dataclass(frozen=True)
class Candidate:
    seq_id: object
    blocks: int  # blocks it holds (what evicting it frees)
    cost: float  # offline work lost if evicted (tokens to recompute)
    order: int  # admission order: lower is older


def check_policy(policy) -> str:
    p = str(getattr(policy, "value", policy))
    if p not in POLICIES:
        raise ValueError(f"unknown eviction policy {policy!r}: use one of {', '.join(POLICIES)}")
    return p


def choose_evictions(cands: list[Candidate], deficit: int, policy: str) -> list[Candidate]:
    """Sequences whose blocks together cover ``deficit`` blocks (all of them when they cannot)."""
    if deficit <= 0:
        return []
    if check_policy(policy) == FIFO:
        out, got = [], 0
        for c in sorted(cands, key=lambda c: c.order):
            if got >= deficit:
                break
            out.append(c)
            got += c.blocks
        return out
    return _min_cost_cover(cands, deficit)


def _min_cost_cover(cands: list[Candidate], deficit: int) -> list[Candidate]:
    """Greedy by lost work per block, then drop members that are not needed; compare with the cheapest single
    sequence that covers the deficit alone (the greedy's weak case is a large overshoot on its last pick)."""
    useful = [c for c in cands if c.blocks > 0]
    greedy, got = [], 0
    for c in sorted(useful, key=lambda c: (c.cost / c.blocks, c.cost, -c.order)):
        if got >= deficit:
            break
        greedy.append(c)
        got += c.blocks
    if got < deficit:  # everything goes
        return greedy
    for c in sorted(greedy, key=lambda c: -c.cost):  # prune: most expensive first
        if got - c.blocks >= deficit:
            greedy.remove(c)
            got -= c.blocks
    singles = [c for c in useful if c.blocks >= deficit]
    if singles:
        best = min(singles, key=lambda c: (c.cost, c.blocks))
        if best.cost < sum(c.cost for c in greedy):
            return [best]
    return greedy


def choose_victim_chunks(chunks: list[int], live: list[int], k: int, policy: str) -> list[int]:
    """``k`` of the mapped ``chunks`` (with ``live`` blocks each) to release. Empty chunks always go first."""
    if k <= 0:
        return []
    if check_policy(policy) == FIFO:
        key = [(lv > 0, -c) for c, lv in zip(chunks, live, strict=True)]
    else:
        key = [(lv, -c) for c, lv in zip(chunks, live, strict=True)]
    order = sorted(range(len(chunks)), key=key.__getitem__)
    return sorted(chunks[i] for i in order[:k])
