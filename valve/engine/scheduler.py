"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget (``max_batch_tokens``). Running sequences come first, oldest first: a decoding
sequence takes one token, a sequence still in prefill takes the next chunk of its prompt. Waiting sequences are
admitted in arrival order with what budget is left (chunked prefill), while the cache has blocks for them and
fewer than ``max_seqs`` run. When a running sequence needs a block and none is free, the youngest running
sequence is preempted: its blocks are freed and it goes back to the front of the queue to be recomputed (its
generated tokens are kept, so nothing is lost). Plain Python; the cache is anything with ``ensure``/``free``.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from valve.engine.kvcache import OutOfBlocks

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Sequence:
    req_id: object
    prompt: list[int]
    max_tokens: int
    output: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose keys/values are in the cache
    state: str = WAITING
    arrival: float = field(default_factory=time.monotonic)
    recomputed: int = 0  # tokens computed again after preemption or eviction
    preemptions: int = 0
    error: str | None = None
    order: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_range(self, start: int, stop: int) -> list[int]:
        """``tokens[start:stop]`` without building the whole list."""
        p = len(self.prompt)
        if stop <= p:
            return self.prompt[start:stop]
        if start >= p:
            return self.output[start - p:stop - p]
        return self.prompt[start:] + self.output[:stop - p]

    def token_at(self, i: int) -> int:
        p = len(self.prompt)
        return self.prompt[i] if i < p else self.output[i - p]

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        return self.length - self.computed

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_tokens


@dataclass
class ScheduledSeq:
    seq: Sequence
    n_tokens: int  # new tokens this step: positions [seq.computed, seq.computed + n_tokens)

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token (so it yields a next token)."""
        return self.seq.computed + self.n_tokens == self.seq.length


class Scheduler:
    def __init__(self, cache, max_batch_tokens: int = 2048, max_seqs: int = 256,
                 capacity_tokens: int | None = None) -> None:
        if max_batch_tokens <= 0 or max_seqs <= 0:
            raise ValueError("max_batch_tokens and max_seqs must be positive")
        self.cache, self.max_batch_tokens, self.max_seqs = cache, max_batch_tokens, max_seqs
        self.capacity_tokens = capacity_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._order = itertools.count()

    def add(self, seq: Sequence) -> None:
        if not seq.prompt:
            raise ValueError(f"request {seq.req_id!r}: empty prompt")
        if seq.max_tokens < 1:
            raise ValueError(f"request {seq.req_id!r}: max_tokens must be >= 1")
        need = len(seq.prompt) + seq.max_tokens
        if self.capacity_tokens is not None and need > self.capacity_tokens:
            raise ValueError(f"request {seq.req_id!r}: {need} tokens exceed the cache ({self.capacity_tokens})")
        seq.state, seq.order = WAITING, next(self._order)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.requeue(seq)
        seq.preemptions += 1
        self.preemptions += 1

    def requeue(self, seq: Sequence) -> None:
        """Back to the front of the queue for recompute; the cache is freed (or was taken by eviction)."""
        self.cache.free(seq.req_id)
        seq.recomputed += seq.computed
        seq.computed, seq.state = 0, WAITING
        self.waiting.appendleft(seq)

    def evict(self, req_ids) -> list[Sequence]:
        """Sequences whose blocks the memory pool took back: forget their cache and re-queue them."""
        ids = set(req_ids)
        hit = [s for s in self.running if s.req_id in ids]
        for s in sorted(hit, key=lambda s: s.order, reverse=True):  # oldest ends up first in the queue
            self.running.remove(s)
            self.cache.drop(s.req_id)
            self.requeue(s)
        return hit

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_batch_tokens
        plan: list[ScheduledSeq] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.pending, budget)
            try:
                self.cache.ensure(seq.req_id, seq.computed + n)
            except OutOfBlocks:
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
                continue
            plan.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            n = min(seq.pending, budget)
            try:
                self.cache.ensure(seq.req_id, seq.computed + n)
            except OutOfBlocks:
                break
            self.waiting.popleft()
            seq.state = RUNNING
            self.running.append(seq)
            plan.append(ScheduledSeq(seq, n))
            budget -= n
        return plan

    def commit(self, plan: list[ScheduledSeq], sampled: dict) -> list[Sequence]:
        """Record a finished step: advance computed counts, append sampled tokens (``req_id -> token``).
        Returns the sequences that finished in this step (their cache is freed)."""
        finished = []
        for item in plan:
            seq = item.seq
            seq.computed += item.n_tokens
            if seq.req_id in sampled:
                seq.output.append(sampled[seq.req_id])
                if seq.done:
                    self.finish(seq)
                    finished.append(seq)
        return finished

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.free(seq.req_id)
        seq.state = FINISHED
