"""The offline side of the reclaim protocol: answer the arbiter's "give back N bytes" at a sub-layer boundary.

Register a :class:`ReclaimHandler` with the offline client's boundary hooks (:func:`install`), or call it from the
engine's step loop. At each call it

1. follows the arbiter's ``offline_limit_bytes`` (the pool stops growing above it),
2. if a request is pending (``reclaim_req_seq`` even and above ``reclaim_ack_seq``, unchanged while its bytes
   were read), reclaims that many bytes from the pool (everything it holds if it holds less), acknowledges with
   the bytes released, and passes the :class:`~valve.runtime.memory.pool.ReclaimResult` to ``on_reclaim`` so the
   engine remaps moved blocks and re-queues evicted sequences before it queues more work,
3. reports the pool size (``offline_pool_bytes``) and cumulative evictions for the arbiter's metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from valve.runtime.control import EVICTION_NAMES
from valve.runtime.memory.evict import check_policy
from valve.runtime.memory.pool import KVPool, ReclaimResult

log = logging.getLogger(__name__)


class ReclaimHandler:
    def __init__(
        self,
        pool: KVPool,
        cb,
        policy: str | None = None,
        on_reclaim: Callable[[ReclaimResult], object] | None = None,
        follow_limit: bool = True,
    ) -> None:
        self.pool, self.cb = pool, cb
        self._policy = check_policy(policy) if policy is not None else None
        self.on_reclaim = on_reclaim
        self.follow_limit = follow_limit
        self.handled = 0
        self.last: ReclaimResult | None = None
        self._foreign: tuple[int, int] | None = None  # (limit, pool figure) of a dead predecessor's grant

    @property
    def policy(self) -> str:
        """The eviction policy: the argument, else the arbiter's published one (its RuntimeSpec), else the pool's."""
        if self._policy is not None:
            return self._policy
        return EVICTION_NAMES.get(int(self.cb.fields.eviction_policy), self.pool.policy)

    def __call__(self, *args, **kwargs) -> ReclaimResult | None:
        """The boundary hook (arguments from the caller are ignored)."""
        return self.poll()

    def poll(self) -> ReclaimResult | None:
        f = self.cb.fields
        if self.follow_limit and (f.offline_limit_bytes or f.reserve_target_bytes):  # 0/0: no memory arbiter
            basis, limit, again = int(f.offline_limit_basis), int(f.offline_limit_bytes), int(f.offline_limit_basis)
            reported, mapped = int(f.offline_pool_bytes), self.pool.mapped_bytes
            if basis != again:
                pass  # the arbiter is writing a new pair: keep the current limit until the next poll
            elif basis:
                # the limit is "the pool figure it was built on + room": whoever wrote that figure (this client, or
                # a predecessor that died with its memory), only the room is ours on top of what we map
                self._foreign = None
                self.pool.set_limit(min(limit, mapped + max(0, limit - basis)))
            else:  # an arbiter that publishes no basis (or an empty pool's)
                self.pool.set_limit(self._discounted(limit, reported, mapped))
        res = None
        seq = int(f.reclaim_req_seq)
        if seq % 2 == 0 and seq > int(f.reclaim_ack_seq):
            nbytes = int(f.reclaim_req_bytes)
            if int(f.reclaim_req_seq) == seq:  # not rewritten while we read the bytes
                res = self._answer(f, seq, nbytes)
        f.offline_pool_bytes = self.pool.mapped_bytes
        return res

    def _discounted(self, limit: int, reported: int, mapped: int) -> int:
        if reported > mapped:
            # The arbiter grants "the pool it last read + the free room"; a pool figure above what we map was
            # written by an offline process that died (its memory went with it, the driver freed it): only the room
            # is ours, or a restarted client grows into the reserve online holds on to. The discount holds until
            # the arbiter writes a new limit (one built on our own figure).
            self._foreign = (limit, reported)
        if self._foreign is not None and self._foreign[0] == limit:
            return min(limit, mapped + max(0, limit - self._foreign[1]))
        self._foreign = None
        return limit

    def _answer(self, f, seq: int, nbytes: int) -> ReclaimResult:
        res = self.pool.reclaim(nbytes, self.policy, allow_partial=True)
        f.offline_pool_bytes = self.pool.mapped_bytes
        f.evicted_sequences += len(res.evicted)
        f.recomputed_tokens += res.evicted_tokens
        f.reclaim_ack_bytes = res.released_bytes
        f.reclaim_ack_seq = seq  # last: the arbiter reads the bytes once it sees the number
        self.handled += 1
        self.last = res
        if res.shortfall_bytes:
            log.warning("reclaim %d asked %d bytes, the pool held only %d: released all of it", seq, nbytes,
                        res.released_bytes)
        if self.on_reclaim is not None:
            self.on_reclaim(res)
        return res


def install(pool: KVPool, cb=None, gate=None, policy: str | None = None,
            on_reclaim: Callable[[ReclaimResult], object] | None = None) -> ReclaimHandler:
    """Create a handler and register it with the offline gate's sub-layer boundary hooks (``Gate.on_boundary``).
    ``gate`` defaults to a ``valve.runtime.gate.offline.Gate`` on ``cb``; ``cb`` defaults to the gate's block."""
    if gate is None:
        try:
            from valve.runtime.gate.offline import Gate
        except ImportError as e:
            raise RuntimeError("valve.runtime.gate.offline.Gate is not available: call ReclaimHandler.poll() from the "
                               "engine's step loop instead") from e
        gate = Gate(cb)
    if cb is None:
        cb = getattr(gate, "control", None) or getattr(gate, "cb", None)
        if cb is None:
            raise ValueError("install() needs the control block: pass cb")
    handler = ReclaimHandler(pool, cb, policy, on_reclaim)
    gate.on_boundary(handler)
    return handler
