"""CUDA graphs of the all-decode engine step and of a fresh prompt's prefill (the online server's fast paths).

An eager decode step of a 1B model launches ~800 small kernels and is bound by the CPU (~13 ms on an H100); a
replayed graph costs one launch. Graphs are captured for buckets of batch size x block-table width; a step is
padded up to its bucket: padding rows read and write a reserved scratch block and are masked out. Steps with a
prefill chunk, or too big for every bucket, run eagerly.

A prompt's first prefill (one sequence, nothing cached) replays a graph captured for its length rounded up to a
bucket: eager, the ~400 launches of a 1B model's prefill cost more host time than the GPU needs for 256 tokens.
Padding rows come after the prompt, so causal attention keeps them out of the prompt's rows.

Inputs live in static device buffers (filled by one host-to-device copy per step). With ``capture=False`` the
same static-buffer path runs eagerly (CPU tests check it against the plain path).
"""

from __future__ import annotations

import logging
import time

import torch

from valve.engine.model import PagedBatch

log = logging.getLogger("valve.engine.graphs")

PAD_SEQ = "__graph_pad__"


def buckets(limit: int, start: int = 1) -> list[int]:
    """Powers of two from ``start`` up to the first one >= ``limit``."""
    out, b = [], start
    while True:
        out.append(b)
        if b >= limit:
            return out
        b *= 2


def pick(sizes: list[int], n: int) -> int | None:
    return next((b for b in sizes if b >= n), None)


def capture_graph(forward, pool, what: str):
    """(graph, its output) of ``forward()``, warmed up once outside the capture (library handles, kernels)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            forward()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            out = forward()
        torch.cuda.synchronize()
    except Exception as e:
        raise RuntimeError(f"capturing {what} failed: {e}") from e
    return g, out


class DecodeGraphs:
    def __init__(self, model, cache, max_batch: int = 32, max_context: int = 4096, capture: bool = True) -> None:
        self.model, self.cache = model, cache
        bs = cache.block_size
        self.batch_sizes = buckets(max_batch)
        self.widths = buckets(cache.blocks_for(max_context), start=min(8, cache.blocks_for(max_context)))
        self.pad_block = cache.ensure(PAD_SEQ, 1)[0]  # scratch block for padding rows
        dev = model.device
        bmax, wmax = self.batch_sizes[-1], self.widths[-1]
        self.max_context = wmax * bs
        # one int64 buffer: tokens, positions, slot_block, slot_offset, dec_lens ([5, bmax]), then tables
        self.host = torch.zeros(5 * bmax + bmax * wmax, dtype=torch.long,
                                pin_memory=dev.type == "cuda")
        self.static = torch.zeros_like(self.host, device=dev)
        self.rows = torch.arange(bmax, device=dev)
        self.graphs: dict[tuple[int, int], object] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.capture_enabled = capture and dev.type == "cuda"
        self.capture_seconds = 0.0
        self.replays = 0

    def _batch(self, b: int, w: int) -> PagedBatch:
        bmax, wmax = self.batch_sizes[-1], self.widths[-1]
        s = self.static
        field = [s[i * bmax:i * bmax + b] for i in range(5)]
        tables = s[5 * bmax:].view(bmax, wmax)[:b, :w]
        rows = self.rows[:b]
        return PagedBatch(field[0], field[1], field[2], field[3], rows, dec_index=rows, dec_tables=tables,
                          dec_lens=field[4], dec_all=True)

    def fits(self, plan) -> bool:
        if not plan or any(item.n_tokens != 1 or not item.samples for item in plan):
            return False
        if len(plan) > self.batch_sizes[-1]:
            return False
        return max(item.seq.computed + 1 for item in plan) <= self.max_context

    def _fill(self, plan, b: int, w: int) -> None:
        bs, bmax, wmax = self.cache.block_size, self.batch_sizes[-1], self.widths[-1]
        pad = self.pad_block
        cols = [[0] * bmax, [0] * bmax, [pad] * bmax, [0] * bmax, [1] * bmax]
        rows = []
        for i, item in enumerate(plan):
            seq = item.seq
            p = seq.computed
            table = self.cache.tables[seq.req_id]
            n = self.cache.blocks_for(p + 1)
            for c, val in zip(cols, (seq.token_at(p), p, table[p // bs], p % bs, p + 1), strict=True):
                c[i] = val
            rows.append(table[:n] + [pad] * (w - n))
        rows += [[pad] * w] * (b - len(plan))
        h = self.host
        h[:5 * bmax] = torch.tensor(cols, dtype=torch.long).view(-1)
        h[5 * bmax:].view(bmax, wmax)[:b, :w] = torch.tensor(rows, dtype=torch.long)
        self.static.copy_(h, non_blocking=True)

    def _forward(self, b: int, w: int) -> torch.Tensor:
        return self.model.forward_paged(self._batch(b, w), self.cache.kv)

    def run(self, plan) -> torch.Tensor:
        """Logits [len(plan), vocab] of an all-decode plan (``fits(plan)`` must be True)."""
        b = pick(self.batch_sizes, len(plan))
        w = pick(self.widths, max(self.cache.blocks_for(item.seq.computed + 1) for item in plan))
        self._fill(plan, b, w)
        key = (b, w)
        if not self.capture_enabled:
            return self._forward(b, w)[:len(plan)]
        if key not in self.graphs:
            self.capture(key)
        self.graphs[key].replay()
        self.replays += 1
        return self.outputs[key][:len(plan)]

    def capture(self, key: tuple[int, int]) -> None:
        """Capture one bucket (the static inputs must hold a valid batch, e.g. the padding one)."""
        b, w = key
        t0 = time.perf_counter()
        self._pool = getattr(self, "_pool", None) or torch.cuda.graph_pool_handle()
        what = f"the decode graph for batch {b}, width {w} blocks"
        self.graphs[key], self.outputs[key] = capture_graph(lambda: self._forward(b, w), self._pool, what)
        self.capture_seconds += time.perf_counter() - t0

    def capture_all(self) -> None:
        """Every bucket, largest first (the shared pool is sized once), with padding-only inputs."""
        if not self.capture_enabled:
            return
        for b in reversed(self.batch_sizes):
            for w in reversed(self.widths):
                self._fill([], b, w)
                self.capture((b, w))
        torch.cuda.synchronize()
        log.info("captured %d decode graphs (batch %s x width %s blocks) in %.1f s", len(self.graphs),
                 self.batch_sizes, self.widths, self.capture_seconds)


def prefill_buckets(limit: int) -> list[int]:
    """Token counts: every 64 up to 512, then every 128 (padding stays under a quarter of the prompt)."""
    out = list(range(64, min(limit, 512) + 1, 64))
    out += list(range(640, limit + 1, 128))
    if not out or out[-1] < limit:
        out.append(out[-1] + (64 if out[-1] < 512 else 128) if out else 64)
    return out


class PrefillGraphs:
    """Graphs of one fresh prompt's whole prefill, for prompts of up to ``max_tokens`` tokens."""

    def __init__(self, model, cache, max_tokens: int = 2048, capture: bool = True) -> None:
        self.model, self.cache = model, cache
        self.sizes = prefill_buckets(max_tokens)
        self.max_tokens = self.sizes[-1]
        self.pad_block = cache.ensure(PAD_SEQ, 1)[0]
        dev, tmax = model.device, self.max_tokens
        # tokens, positions, slot_block, slot_offset ([4, tmax]), then the row whose logits are wanted
        self.host = torch.zeros(4 * tmax + 1, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.static = torch.zeros_like(self.host, device=dev)
        self.positions = torch.arange(tmax, dtype=torch.long)
        self.cu = {t: torch.tensor([0, t], dtype=torch.int32, device=dev) for t in self.sizes}
        self.graphs: dict[int, object] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_enabled = capture and dev.type == "cuda"
        self.capture_seconds = 0.0
        self.replays = 0

    def fits(self, plan) -> bool:
        if len(plan) != 1:
            return False
        item = plan[0]
        return item.seq.computed == 0 and item.samples and item.n_tokens <= self.max_tokens

    def _batch(self, t: int) -> PagedBatch:
        s, tmax = self.static, self.max_tokens
        tok, pos, blk, off = (s[i * tmax:i * tmax + t] for i in range(4))
        return PagedBatch(tok, pos, blk, off, s[4 * tmax:], ctx_block=blk, ctx_offset=off, cu_q=self.cu[t],
                          cu_k=self.cu[t], max_q=t, max_k=t)

    def _fill(self, plan, t: int) -> None:
        bs, tmax, h = self.cache.block_size, self.max_tokens, self.host
        n = 0
        h[:4 * tmax].view(4, tmax)[:, :t] = 0
        h[2 * tmax:2 * tmax + t] = self.pad_block
        h[tmax:tmax + t] = self.positions[:t]
        h[3 * tmax:3 * tmax + t] = self.positions[:t] % bs
        if plan:
            seq = plan[0].seq
            n = plan[0].n_tokens
            table = torch.tensor(self.cache.tables[seq.req_id][:self.cache.blocks_for(n)], dtype=torch.long)
            h[:n] = torch.tensor(seq.prompt[:n], dtype=torch.long)
            h[2 * tmax:2 * tmax + n] = table.repeat_interleave(bs)[:n]
        h[4 * tmax] = max(n - 1, 0)
        self.static.copy_(h, non_blocking=True)

    def run(self, plan) -> torch.Tensor:
        """Logits [1, vocab] of a fresh prompt's prefill (``fits(plan)`` must be True)."""
        t = pick(self.sizes, plan[0].n_tokens)
        self._fill(plan, t)
        if not self.capture_enabled:
            return self.model.forward_paged(self._batch(t), self.cache.kv)
        if t not in self.graphs:
            self.capture(t)
            self._fill(plan, t)
        self.graphs[t].replay()
        self.replays += 1
        return self.outputs[t]

    def capture(self, t: int) -> None:
        t0 = time.perf_counter()
        self._pool = getattr(self, "_pool", None) or torch.cuda.graph_pool_handle()
        self._fill([], t)
        forward = lambda: self.model.forward_paged(self._batch(t), self.cache.kv)  # noqa: E731
        self.graphs[t], self.outputs[t] = capture_graph(forward, self._pool, f"the prefill graph for {t} tokens")
        self.capture_seconds += time.perf_counter() - t0

    def capture_all(self) -> None:
        if not self.capture_enabled:
            return
        for t in reversed(self.sizes):
            self.capture(t)
        log.info("captured %d prefill graphs (%d..%d tokens) in %.1f s", len(self.graphs), self.sizes[0],
                 self.sizes[-1], self.capture_seconds)
