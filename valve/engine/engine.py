"""The engine: scheduler + paged cache + model, one ``step()`` at a time (greedy sampling)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from valve.engine.kvcache import PagedKVCache, TorchBlockAllocator
from valve.engine.model import LlamaModel, PagedBatch
from valve.engine.scheduler import ScheduledSeq, Scheduler, Sequence


@dataclass
class StepResult:
    tokens: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new token)
    finished: list[Sequence] = field(default_factory=list)
    n_tokens: int = 0  # tokens the model computed in this step (prefill + decode)


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

    def enable_graphs(self, max_batch: int = 32, max_context: int = 4096, capture: bool = True):
        """Run all-decode steps through CUDA graphs (``capture=False``: the same static-buffer path, eager)."""
        from valve.engine.graphs import DecodeGraphs

        self.graphs = DecodeGraphs(self.model, self.cache, max_batch, max_context, capture)
        self.graphs.capture_all()
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
        bs = self.cache.block_size
        tokens, positions, blocks, offsets, logits_rows, sampling = [], [], [], [], [], []
        dec_rows, dec_tables, dec_lens, prefills = [], [], [], []
        dev = self.model.device
        for item in plan:
            seq, n = item.seq, item.n_tokens
            start = len(tokens)
            table = self.cache.tables[seq.req_id]
            pos = range(seq.computed, seq.computed + n)
            tokens += seq.tokens[seq.computed:seq.computed + n]
            positions += pos
            blocks += [table[p // bs] for p in pos]
            offsets += [p % bs for p in pos]
            ctx = seq.computed + n
            if n == 1:
                dec_rows.append(start)
                dec_tables.append(table[: self.cache.blocks_for(ctx)])
                dec_lens.append(ctx)
            else:
                nb = self.cache.blocks_for(ctx)
                prefills.append((start, n, ctx, torch.tensor(table[:nb], device=dev)))
            if item.samples:
                logits_rows.append(start + n - 1)
                sampling.append(seq)

        def t(xs):
            return torch.tensor(xs, dtype=torch.long, device=dev)

        batch = PagedBatch(t(tokens), t(positions), t(blocks), t(offsets), t(logits_rows), prefills=tuple(prefills))
        if dec_rows:
            width = max(len(x) for x in dec_tables)
            batch.dec_index = t(dec_rows)
            # pad with the sequence's own first block: always mapped (block 0 may sit in a chunk the pool
            # released); the padded slots are masked out
            batch.dec_tables = t([x + [x[0]] * (width - len(x)) for x in dec_tables])
            batch.dec_lens = t(dec_lens)
        return batch, sampling

    def step(self) -> StepResult:
        plan = self.scheduler.schedule()
        res = StepResult()
        if not plan:
            return res
        if self.graphs is not None and self.graphs.fits(plan):
            logits, sampling = self.graphs.run(plan), [item.seq for item in plan]
        else:
            batch, sampling = self.build_batch(plan)
            logits = self.model.forward_paged(batch, self.cache.kv)
        sampled = {}
        if sampling:
            ids = logits.argmax(dim=-1).tolist()
            sampled = {seq.req_id: tok for seq, tok in zip(sampling, ids, strict=True)}
            if self.keep_logits:
                for seq, row in zip(sampling, logits, strict=True):
                    self.last_logits[seq.req_id] = row.detach().cpu()
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
