"""An online KV cache that grows for bursts and gives memory back when idle (the engine side of
``valve.runtime.memory.online``).

The cache's blocks come from a ``KVPool`` that keeps ``base_bytes`` mapped. Before each step,
:meth:`ElasticKV.before_step` adds up the blocks the queued and running requests need to finish; when the mapped
pool lacks them it maps the difference in one go: under Valve after asking the arbiter for it
(``OnlineMemory.ask``), else straight away. A mapping the device refuses is an online out-of-memory
(``ooms``); the pool's limit stays at what is mapped, so a step never maps memory on its own. The engine
then backs off for ``backoff_s`` (requests wait for blocks) before it tries again.
:meth:`on_idle` releases the chunks above the base once the engine has been idle ``idle_release_s``.
"""

from __future__ import annotations

import time


class ElasticKV:
    def __init__(self, engine, pool, base_bytes: int, memory=None, idle_release_s: float = 1.0,
                 backoff_s: float = 0.05) -> None:
        self.engine, self.pool, self.memory = engine, pool, memory
        self.base_bytes = max(int(base_bytes), pool.chunk_bytes)  # the lowest chunk stays: table padding
        self.idle_release_s, self.backoff_s = idle_release_s, backoff_s
        self.per_chunk = max(1, pool.chunk_bytes // pool.block_bytes - 1)  # a straddling block is lost
        self.ooms = self.grows = self.releases = 0
        self.grown_bytes = self.released_bytes = self.peak_bytes = 0
        self._idle_since: float | None = None
        self._retry_at = 0.0
        self.pool.grow_to(self.base_bytes)
        self.pool.set_limit(self.pool.mapped_bytes)  # growth only here, after asking: never inside a step
        self._report()

    def _report(self) -> None:
        held = self.pool.mapped_bytes
        self.peak_bytes = max(self.peak_bytes, held)
        if self.memory is not None:
            self.memory.report(held)

    def need_blocks(self) -> int:
        """Blocks the running and waiting requests still need to finish, beyond what their tables hold."""
        sch, cache = self.engine.scheduler, self.engine.cache
        return sum(max(0, cache.blocks_for(len(s.prompt) + s.max_tokens) - len(cache.tables.get(s.req_id, ())))
                   for s in (*sch.running, *sch.waiting))

    def before_step(self, engine=None) -> None:
        self._idle_since = None
        pool = self.pool
        short = self.need_blocks() - (pool.stats()["free_blocks"])
        if short <= 0 or time.monotonic() < self._retry_at:
            return
        nbytes = min(-(-short // self.per_chunk) * pool.chunk_bytes, pool.max_bytes - pool.mapped_bytes)
        if nbytes <= 0:
            return
        if self.memory is not None:
            self.memory.ask(nbytes)
        pool.set_limit(pool.max_bytes)
        got = pool.grow_to(pool.mapped_bytes + nbytes)
        pool.set_limit(pool.mapped_bytes)
        if got:
            self.grows += 1
            self.grown_bytes += got
        else:  # the device refused: requests wait for blocks; no new attempt (and no new failure) for a while
            self.ooms += 1
            self._retry_at = time.monotonic() + self.backoff_s
        self._report()

    def on_idle(self) -> None:
        now = time.monotonic()
        if self._idle_since is None:
            self._idle_since = now
        if now - self._idle_since < self.idle_release_s or self.pool.mapped_bytes <= self.base_bytes:
            return
        got = self.pool.release_free(self.base_bytes)
        self.pool.set_limit(self.pool.mapped_bytes)
        if got:
            self.releases += 1
            self.released_bytes += got
            self._report()

    def stats(self) -> dict:
        m = self.memory
        return {"held_bytes": self.pool.mapped_bytes, "peak_bytes": self.peak_bytes, "base_bytes": self.base_bytes,
                "grows": self.grows, "grown_bytes": self.grown_bytes, "releases": self.releases,
                "released_bytes": self.released_bytes, "ooms": self.ooms,
                "device_ooms": self.pool.counters["device_ooms"], "asks": m.asks if m else 0,
                "ask_timeouts": m.timeouts if m else 0, "ask_wait_s": list(m.waits_s) if m else []}
