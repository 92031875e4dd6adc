"""The engine: scheduler + paged cache + model, one ``step()`` at a time (greedy sampling)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from valve.engine.kvcache import PagedKVCache, TorchBlockAllocator
from valve.engine.model import LlamaModel, PagedBatch
from valve.engine.scheduler import ScheduledSeq, Scheduler, Sequence


@dataclass
class StepResult:
    tokens: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new token)
    finished: list[Sequence] = field(default_factory=list)
    n_tokens: int = 0  # tokens the model computed in this step (prefill + decode)
    spans: list = field(default_factory=list)  # what ran: (cached tokens before, new tokens) per sequence
    timing: StepTiming | None = None  # with Engine.timing on
    scheduled: list = field(default_factory=list)  # with Engine.timing on: the request ids of the step


@dataclass
class StepTiming:
    """Host times (perf_counter seconds) of a step, and CUDA events around its GPU work (None off CUDA)."""

    start: float  # step() entered
    launch: float  # the forward's first launch
    launched: float  # its last launch returned
    done: float  # sampled tokens on the host
    gpu_begin: object = None
    gpu_end: object = None


class Engine:
    def __init__(self, model: LlamaModel, cache: PagedKVCache, max_batch_tokens: int = 2048,
                 max_seqs: int = 256, keep_logits: bool = False) -> None:
        self.model, self.cache = model, cache
        capacity = None
        n_blocks = getattr(cache.allocator, "num_blocks", getattr(cache.allocator, "max_blocks", None))
        if isinstance(n_blocks, int):
            capacity = n_blocks * cache.block_size
        self.scheduler = Scheduler(cache, max_batch_tokens, max_seqs, capacity_tokens=capacity)
        self.keep_logits = keep_logits
        self.last_logits: dict[object, torch.Tensor] = {}
        self.steps = self.generated = self.computed = 0
        self.graphs = None  # DecodeGraphs: the all-decode fast path (enable_graphs)
        self.prefill_graphs = None  # PrefillGraphs: a fresh prompt alone in its step
        self.sync_seconds = 0.0  # host time blocked on the GPU (sampling): the rest of a step is host work
        self.step_seconds = 0.0  # wall time inside step()
        self.timing = False  # record StepTiming per step (the online server's --timeline)
        self._pinned = self._copied = None  # build_batch's host staging buffer and its last copy

    def enable_graphs(self, max_batch: int = 32, max_context: int = 4096, capture: bool = True,
                      prefill_tokens: int = 0):
        """Run all-decode steps through CUDA graphs (``capture=False``: the same static-buffer path, eager);
        ``prefill_tokens``: also a fresh prompt of up to that many tokens alone in its step."""
        from valve.engine.graphs import DecodeGraphs, PrefillGraphs

        self.graphs = DecodeGraphs(self.model, self.cache, max_batch, max_context, capture)
        self.graphs.capture_all()
        if prefill_tokens:
            self.prefill_graphs = PrefillGraphs(self.model, self.cache, prefill_tokens, capture)
            self.prefill_graphs.capture_all()
        return self.graphs

    @classmethod
    def create(cls, model: LlamaModel, num_blocks: int, block_size: int = 16, **kw) -> Engine:
        """An engine whose cache is a plain torch tensor of ``num_blocks`` blocks."""
        alloc = TorchBlockAllocator(num_blocks, device=model.device)
        return cls(model, PagedKVCache(model.cfg, alloc, model.dtype, block_size), **kw)

    def add_request(self, req_id, prompt: list[int], max_tokens: int) -> Sequence:
        vocab = self.model.cfg.vocab
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"request {req_id!r}: token ids must be in [0, {vocab})")
        seq = Sequence(req_id, list(prompt), max_tokens)
        self.scheduler.add(seq)
        return seq

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def build_batch(self, plan: list[ScheduledSeq]) -> tuple[PagedBatch, list[Sequence]]:
        """The step's inputs in the packed layout. The host sends per-sequence facts (new tokens, start, lengths,
        block tables) in one copy; the per-token indices (positions, cache slots, context gather) are computed
        on the device: a per-token Python loop costs milliseconds at thousands of tokens per step."""
        bs, dev = self.cache.block_size, self.model.device
        tokens, starts, news, ctxs, rows, tables, sampling = [], [], [], [], [], [], []
        for item in plan:
            seq, n = item.seq, item.n_tokens
            ctx = seq.computed + n
            tokens += seq.token_range(seq.computed, ctx)
            starts.append(seq.computed)
            news.append(n)
            ctxs.append(ctx)
            tables.append(self.cache.tables[seq.req_id][: self.cache.blocks_for(ctx)])
            if item.samples:
                rows.append(len(tokens) - 1)
                sampling.append(seq)
        s, n_rows, width = len(plan), len(tokens), max(len(t) for t in tables)
        host = np.empty(n_rows + 3 * s + len(rows) + s * width, dtype=np.int64)
        host[:n_rows] = tokens
        host[n_rows:n_rows + 3 * s] = starts + news + ctxs
        off = n_rows + 3 * s
        host[off:off + len(rows)] = rows
        tab = host[off + len(rows):].reshape(s, width)
        for i, t in enumerate(tables):  # pad with the sequence's own first block: always mapped
            tab[i, :len(t)] = t
            tab[i, len(t):] = t[0]
        d = self._upload(host)
        tok, start, new, ctx = d[:n_rows], d[n_rows:n_rows + s], d[n_rows + s:n_rows + 2 * s], d[n_rows + 2 * s:off]
        tab = d[off + len(rows):].view(s, width)
        seq_ids = torch.arange(s, device=dev)

        def cumulative(lengths):
            cu = torch.zeros(s + 1, dtype=torch.int32, device=dev)
            cu[1:] = lengths.cumsum(0)
            return cu

        cu_q, cu_k = cumulative(new), cumulative(ctx)
        row_seq = torch.repeat_interleave(seq_ids, new, output_size=n_rows)
        pos = start[row_seq] + torch.arange(n_rows, device=dev) - cu_q[:-1][row_seq]
        ctx_seq = torch.repeat_interleave(seq_ids, ctx, output_size=sum(ctxs))
        cpos = torch.arange(sum(ctxs), device=dev) - cu_k[:-1][ctx_seq]
        batch = PagedBatch(tok, pos, tab[row_seq, pos // bs], pos % bs, d[off:off + len(rows)],
                           ctx_block=tab[ctx_seq, cpos // bs], ctx_offset=cpos % bs, cu_q=cu_q, cu_k=cu_k,
                           max_q=max(news), max_k=max(ctxs))
        return batch, sampling

    def _upload(self, host: np.ndarray) -> torch.Tensor:
        """One host-to-device copy through a reused pinned buffer (a pageable copy would sync the stream)."""
        dev = self.model.device
        if dev.type != "cuda":
            return torch.from_numpy(host.copy())
        if self._pinned is None or self._pinned.numel() < host.size:
            self._pinned = torch.empty(max(host.size, 2 * (self._pinned.numel() if self._pinned is not None else 0),
                                           1 << 16), dtype=torch.long, pin_memory=True)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the buffer
        buf = self._pinned[:host.size]
        buf.numpy()[:] = host
        out = buf.to(dev, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return out

    def step(self) -> StepResult:
        t0 = time.perf_counter()
        try:
            return self._step()
        finally:
            self.step_seconds += time.perf_counter() - t0

    def host_share(self, since: tuple[float, float] = (0.0, 0.0)) -> float | None:
        """The part of the time in steps (since ``(step_seconds, sync_seconds)``) the host was not waiting for
        the GPU: near 0 when GPU-bound, near 1 when the GPU waits for Python."""
        steps, synced = self.step_seconds - since[0], self.sync_seconds - since[1]
        return 1 - synced / steps if steps > 0 else None

    def _mark(self):
        """(host time, CUDA event recorded now) when ``timing`` is on: where a step's GPU work starts and ends."""
        if not self.timing:
            return None
        ev = None
        if self.model.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
        return time.perf_counter(), ev

    def _step(self) -> StepResult:
        t_start = time.perf_counter()
        plan = self.scheduler.schedule()
        res = StepResult()
        if not plan:
            return res
        if self.graphs is not None and self.graphs.fits(plan):
            begin = self._mark()
            logits, sampling = self.graphs.run(plan), [item.seq for item in plan]
        elif self.prefill_graphs is not None and self.prefill_graphs.fits(plan):
            begin = self._mark()
            logits, sampling = self.prefill_graphs.run(plan), [plan[0].seq]
        else:
            batch, sampling = self.build_batch(plan)
            begin = self._mark()
            logits = self.model.forward_paged(batch, self.cache.kv)
        end = self._mark()
        sampled = {}
        res.spans = [(item.seq.computed, item.n_tokens) for item in plan]
        if sampling:
            t0 = time.perf_counter()
            ids = logits.argmax(dim=-1).tolist()
            self.sync_seconds += time.perf_counter() - t0
            sampled = {seq.req_id: tok for seq, tok in zip(sampling, ids, strict=True)}
            if self.keep_logits:
                for seq, row in zip(sampling, logits, strict=True):
                    self.last_logits[seq.req_id] = row.detach().cpu()
        if self.timing:
            res.scheduled = [item.seq.req_id for item in plan]
            res.timing = StepTiming(t_start, begin[0], end[0], time.perf_counter(), begin[1], end[1])
        res.n_tokens = sum(item.n_tokens for item in plan)
        res.finished = self.scheduler.commit(plan, sampled)
        report = getattr(self.cache.allocator, "set_progress", None)
        if report is not None:  # the pool's selective eviction weighs the work a sequence would lose
            for item in plan:
                if item.seq.state == "running":
                    report(item.seq.req_id, item.seq.computed)
        res.tokens = [(seq, sampled[seq.req_id]) for seq in sampling]
        self.steps += 1
        self.generated += len(sampled)
        self.computed += res.n_tokens
        return res

    def apply_reclaim(self, result) -> list[Sequence]:
        """Apply a memory-pool reclaim (``moved`` block remaps, ``evicted`` sequences) to tables and queue."""
        self.cache.remap(dict(getattr(result, "moved", {}) or {}))
        self.cache.refresh_storage()
        return self.scheduler.evict(getattr(result, "evicted", []) or [])

    def run_to_completion(self, max_steps: int = 1_000_000) -> None:
        for _ in range(max_steps):
            if not self.has_work():
                return
            self.step()
        raise RuntimeError("engine did not finish within max_steps")
