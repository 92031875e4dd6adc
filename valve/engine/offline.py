"""Offline runner: prompts from JSONL in, completions to JSONL out, resumable after a kill or an eviction.

Input lines: ``{"id": ..., "prompt": "text" | [token ids], "max_tokens": N}`` (``id`` defaults to the line
number). Output lines: ``{"id", "tokens", "text", "prompt_tokens", "completion_tokens"}``, one per input, in
completion order.

The output file is the checkpoint: a record counts as done once its whole line (with the newline) is written.
Every record is flushed at once (a killed process loses nothing written) and the file is fsynced at least once a
second. On start the runner cuts a torn last line, skips the ids already in the file and runs the rest, so a
restart neither repeats nor drops a record. Sequences in flight at the kill are simply computed again.

With ``--gate`` the model's sub-layers get Valve's offline gate (``valve.runtime.gate.offline.attach``); with
``--kv-pool`` the KV cache blocks come from the runtime's ``KVPool``. Run: ``python -m valve.engine.offline --help``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from valve.signals import stop_on_signals

log = logging.getLogger("valve.engine.offline")


@dataclass
class OfflineStats:
    records: int = 0  # completed in this run
    skipped: int = 0  # already in the output at start
    generated_tokens: int = 0
    computed_tokens: int = 0  # prefill + decode tokens the model ran (recompute included)
    recomputed_tokens: int = 0
    seconds: float = 0.0
    step_seconds: float = 0.0  # wall time in engine steps
    sync_seconds: float = 0.0  # of which waiting for the GPU (the rest is host work)
    small_steps: int = 0  # steps a step hook gave a smaller token budget than the engine's own (near online)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def recover_output(path: Path) -> set[str]:
    """Ids already completed in ``path``; a torn (newline-less or unparsable) last line is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    done: set[str] = set()
    good = 0
    for line in data[:keep].splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a damaged line: keep what came before it
        done.add(str(rec["id"]))
        good += len(line)
    if good != len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
        log.warning("%s: cut %d bytes of a partial record", path, len(data) - good)
    return done


def read_requests(path: Path, tokenizer, default_max_tokens: int) -> Iterator[tuple[str, list[int], int]]:
    with open(path) as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            rec = json.loads(line)
            prompt = rec["prompt"]
            ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            yield str(rec.get("id", n)), ids, int(rec.get("max_tokens", default_max_tokens))


class OfflineRunner:
    def __init__(self, engine, input_path, output_path, tokenizer, default_max_tokens: int = 128,
                 progress_path=None, queue_depth: int | None = None, fsync_seconds: float = 1.0,
                 step_hook=None, progress_seconds: float = 0.5) -> None:
        self.engine, self.tokenizer = engine, tokenizer
        self.input_path, self.output_path = Path(input_path), Path(output_path)
        self.progress_path = Path(progress_path) if progress_path else None
        self.default_max_tokens = default_max_tokens
        self.queue_depth = queue_depth or 2 * engine.scheduler.max_seqs
        self.fsync_seconds = fsync_seconds
        self.progress_seconds = progress_seconds
        self.step_hook = step_hook  # called between steps (e.g. to serve the pool's reclaim requests)
        self.stop_event = threading.Event()

    def run(self, duration: float | None = None, max_records: int | None = None) -> OfflineStats:
        eng = self.engine
        done = recover_output(self.output_path)
        stats = OfflineStats(skipped=len(done))
        seen = set(done)  # ids done or queued: a repeated input id runs once

        def fresh(r):
            if r[0] in seen:
                return False
            seen.add(r[0])
            return True

        pending = (r for r in read_requests(self.input_path, self.tokenizer, self.default_max_tokens) if fresh(r))
        exhausted = False
        t0 = last_sync = time.monotonic()
        last_progress = float("-inf")  # the first step's record tells a watcher the runner is warm
        gen0, comp0 = eng.generated, eng.computed
        step0, sync0 = eng.step_seconds, eng.sync_seconds
        full_budget = eng.scheduler.max_batch_tokens
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.output_path, "a") as out:
            while not self.stop_event.is_set():
                queued = len(eng.scheduler.waiting) + len(eng.scheduler.running)
                while not exhausted and queued < self.queue_depth:
                    nxt = next(pending, None)
                    if nxt is None:
                        exhausted = True
                        break
                    eng.add_request(*nxt)
                    queued += 1
                if not eng.has_work():
                    break
                if self.step_hook:
                    self.step_hook(eng)
                stats.small_steps += eng.scheduler.max_batch_tokens < full_budget
                res = eng.step()
                if not res.n_tokens:  # nothing fits the cache now (the pool was shrunk): wait for room
                    time.sleep(0.001)
                for seq in res.finished:
                    rec = {"id": seq.req_id, "tokens": seq.output, "text": self.tokenizer.decode(seq.output),
                           "prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.output)}
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    stats.records += 1
                    stats.recomputed_tokens += seq.recomputed
                now = time.monotonic()
                if now - last_sync >= self.fsync_seconds:
                    os.fsync(out.fileno())
                    last_sync = now
                stats.generated_tokens, stats.computed_tokens = eng.generated - gen0, eng.computed - comp0
                stats.step_seconds, stats.sync_seconds = eng.step_seconds - step0, eng.sync_seconds - sync0
                stats.seconds = now - t0
                if self.progress_path and now - last_progress >= self.progress_seconds:
                    self.write_progress(stats)
                    last_progress = now
                if (duration is not None and now - t0 >= duration) or (
                        max_records is not None and stats.records >= max_records):
                    break
            out.flush()
            os.fsync(out.fileno())
        stats.seconds = time.monotonic() - t0
        if self.progress_path:
            self.write_progress(stats, final=True)
        return stats

    def write_progress(self, stats: OfflineStats, final: bool = False) -> None:
        rec = {"time": time.time(), **asdict(stats), "tokens_per_s": stats.tokens_per_s, "final": final}
        with open(self.progress_path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def kv_pool_cache(cfg, dtype, block_size: int, pool_bytes: int, backend=None, chunk_bytes: int | None = None):
    """A paged cache whose blocks come from the runtime's KVPool (CUDA virtual memory on a GPU, else the
    simulated backend). Returns (cache, pool)."""
    from valve.engine.kvcache import PagedKVCache
    from valve.runtime.memory.pool import KVPool

    block_bytes = cfg.kv_bytes_per_token(dtype.itemsize) * block_size
    pool = KVPool(backend=backend, block_bytes=block_bytes, chunk_bytes=chunk_bytes, max_bytes=pool_bytes)
    return PagedKVCache(cfg, pool, dtype, block_size), pool


def reclaim_hook(pool, engine, control, log_path=None):
    """A step hook answering the arbiter's reclaim requests between engine steps (the block tables of a step
    in flight must not move under it): moved blocks are remapped and evicted sequences re-queued. ``log_path``:
    one JSON line per answered request (bytes, host time, evictions)."""
    from valve.runtime.memory.client import ReclaimHandler

    def on_reclaim(res):
        engine.apply_reclaim(res)
        if log_path:
            rec = {"time": time.time(), "requested_bytes": res.requested_bytes, "released_bytes": res.released_bytes,
                   "seconds": res.seconds, "evicted": len(res.evicted), "evicted_tokens": res.evicted_tokens,
                   "copied_bytes": res.copied_bytes, "chunks": res.chunks}
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    return ReclaimHandler(pool, control, on_reclaim=on_reclaim)


class PoolFill:
    """Keep the pool mapped up to its limit, less ``leave_bytes`` of the device's free memory, as an engine that
    takes the free memory up front (vLLM's ``gpu_memory_utilization``) does. It starts after ``after_steps``
    steps (the engine's own activations are allocated by then); a refused mapping waits ``backoff_s``."""

    def __init__(self, pool, free_bytes, leave_bytes: int, after_steps: int = 3, backoff_s: float = 1.0) -> None:
        self.pool, self.free_bytes, self.leave = pool, free_bytes, int(leave_bytes)
        self.after_steps, self.backoff_s = after_steps, backoff_s
        self._retry_at = 0.0

    def __call__(self, engine) -> None:
        if engine.steps < self.after_steps or time.monotonic() < self._retry_at:
            return
        room = self.free_bytes() - self.leave
        if room >= self.pool.chunk_bytes and not self.pool.grow_to(self.pool.mapped_bytes + room) and \
                self.pool.mapped_bytes < self.pool.limit_bytes:
            self._retry_at = time.monotonic() + self.backoff_s


def main(
    input: str = "prompts.jsonl",
    output: str = "completions.jsonl",
    model: str = "tiny",
    device: str | None = None,
    num_blocks: int = 4096,
    block_size: int = 16,
    max_batch_tokens: int = 4096,
    max_seqs: int = 128,
    max_tokens: int = 128,
    duration: float | None = None,
    gate: bool = False,
    kv_pool: bool = False,
    kv_pool_bytes: int = 8 << 30,
    progress: str | None = None,
    progress_interval: float = 0.5,
    seed: int = 0,
    engine: str = "ours",
    arch: str = "llama",
    kv_chunk_bytes: int | None = None,
    kv_pool_fill: bool = False,
    kv_pool_leave_bytes: int = 512 << 20,
    kv_pool_fill_after_steps: int = 3,
    reclaim_log: str | None = None,
) -> None:
    """Run every prompt of INPUT through a random-weight Llama-shaped model, resumably, and report tokens/s.

    --engine transformers runs transformers' own model classes (--arch llama or qwen) on the same scheduler and
    paged cache (valve.engine.hf). --gate puts Valve's offline gate before every attention and MLP block; --kv-pool takes the KV cache from
    the runtime's KVPool and, when VALVE_GPU_UUID names a GPU with a running arbiter, answers its memory
    reclaim requests between steps (--reclaim-log PATH: one JSON line per request answered). --kv-pool-fill maps
    the pool up to its limit (the arbiter's, or --kv-pool-bytes) less --kv-pool-leave-bytes of free device memory,
    as a preallocating engine takes the free memory, from step --kv-pool-fill-after-steps on (by then the engine's
    own activations must have reached their peak: they are allocated outside the pool)."""
    from valve.engine.choice import build_engine_model, require_engine

    require_engine(engine, arch, "valve.engine.offline")  # before torch is imported or a model built
    from valve.engine.config import get_config
    from valve.engine.engine import Engine
    from valve.engine.tokenizer import ByteTokenizer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = get_config(model)
    m = build_engine_model(engine, arch, cfg, device=device, seed=seed)
    if gate:
        from valve.runtime.gate.offline import attach

        handle = attach(m)  # default pattern: each layer's attention (``attn``/``self_attn``) and ``mlp``
        log.info("Valve gate before %d sub-layers", len(handle.names))
    from valve.runtime.control import ControlBlock, resolve_control_path

    hooks = []
    path = resolve_control_path()  # the arbiter's block of VALVE_GPU_UUID, when the device plugin set it
    if kv_pool:
        cache, pool = kv_pool_cache(cfg, m.dtype, block_size, kv_pool_bytes, chunk_bytes=kv_chunk_bytes)
        eng = Engine(m, cache, max_batch_tokens=max_batch_tokens, max_seqs=max_seqs)
        if path is not None:
            hooks.append(reclaim_hook(pool, eng, ControlBlock.open(path), reclaim_log))
        if kv_pool_fill:
            from valve.runtime.memory.online import device_free_bytes

            hooks.append(PoolFill(pool, device_free_bytes(pool.backend), kv_pool_leave_bytes,
                                  kv_pool_fill_after_steps))
    else:
        eng = Engine.create(m, num_blocks=num_blocks, block_size=block_size, max_batch_tokens=max_batch_tokens,
                            max_seqs=max_seqs)
    if gate and path is not None:  # smaller steps near online, when the arbiter's RuntimeSpec asks for them
        from valve.runtime.gate.budget import NearOnlineBudget

        hooks.append(NearOnlineBudget(eng.scheduler, ControlBlock.open(path)))
    hook = None
    if hooks:
        def hook(engine):
            for h in hooks:
                h(engine)
    runner = OfflineRunner(eng, input, output, ByteTokenizer(cfg.vocab), max_tokens, progress, step_hook=hook,
                           progress_seconds=progress_interval)

    # Kubernetes eviction: stop after this step, everything written is kept
    stop_on_signals(runner.stop_event, (signal.SIGTERM,))
    stats = runner.run(duration=duration)
    log.info("done: %d records (%d already done), %d tokens in %.1f s: %.1f tokens/s (%d recomputed)",
             stats.records, stats.skipped, stats.generated_tokens, stats.seconds, stats.tokens_per_s,
             stats.recomputed_tokens)
    print(json.dumps({**asdict(stats), "tokens_per_s": stats.tokens_per_s}), flush=True)


if __name__ == "__main__":
    import typer

    typer.run(main)
