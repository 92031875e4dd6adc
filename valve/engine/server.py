"""Online server: OpenAI-compatible ``/v1/completions`` (with ``stream: true`` as SSE) on Starlette + uvicorn.

Each request is wrapped in Valve's ``online_request()`` from its arrival to its last token, so the arbiter
closes the offline gate while online work is in flight. Run: ``python -m valve.engine.server --help``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from valve.engine.tokenizer import ByteTokenizer
from valve.engine.worker import FINISH, EngineWorker

log = logging.getLogger("valve.engine.server")


class BadRequest(ValueError):
    pass


def parse_completion_request(body: dict, tokenizer: ByteTokenizer, max_tokens_limit: int) -> tuple[list[int], int, bool]:
    """Validate an OpenAI completions body -> (prompt token ids, max_tokens, stream)."""
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = prompt
    else:
        raise BadRequest("prompt must be a string or a list of token ids")
    if not ids:
        raise BadRequest("prompt is empty")
    if any(not 0 <= t < tokenizer.vocab for t in ids):
        raise BadRequest(f"token ids must be in [0, {tokenizer.vocab})")
    max_tokens = body.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= max_tokens_limit:
        raise BadRequest(f"max_tokens must be an integer in [1, {max_tokens_limit}]")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be a boolean")
    return ids, max_tokens, stream


def resolve_online_signal(enabled: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """Valve's ``online_request`` when enabled (fails loudly if the runtime lacks it), else a no-op."""
    if not enabled:
        return contextlib.nullcontext
    from valve.runtime.online.signal import online_request

    return online_request


def _chunk(cid: str, model: str, created: int, text: str, finish: str | None) -> bytes:
    body = {"id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n".encode()


def create_app(worker: EngineWorker, model_name: str, tokenizer: ByteTokenizer,
               online_signal: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               max_tokens_limit: int = 4096, timeline=None, elastic=None) -> Starlette:
    async def completions(request: Request):
        arrive = time.perf_counter()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse({"error": {"message": "body is not JSON", "type": "invalid_request_error"}}, 400)
        try:
            ids, max_tokens, stream = parse_completion_request(body, tokenizer, max_tokens_limit)
        except BadRequest as e:
            return JSONResponse({"error": {"message": str(e), "type": "invalid_request_error"}}, 400)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        signal = contextlib.ExitStack()
        signal.enter_context(online_signal())  # from arrival to the last token
        try:
            sub = worker.submit(ids, max_tokens)
        except RuntimeError as e:  # the engine thread died: say why (e.g. CUDA OOM), not a bare 500
            signal.close()
            return JSONResponse({"error": {"message": str(e), "type": "server_error"}}, 500)
        except BaseException:
            signal.close()
            raise

        async def tokens():
            while True:
                item = await sub.out.get()
                if item is FINISH:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item

        if not stream:
            try:
                out = [t async for t in tokens()]
            except (RuntimeError, ValueError) as e:
                return JSONResponse({"error": {"message": str(e), "type": "server_error"}}, 500)
            finally:
                signal.close()
            return JSONResponse({
                "id": cid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "text": tokenizer.decode(out), "logprobs": None,
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out),
                          "total_tokens": len(ids) + len(out)},
            })

        async def sse():
            n, finished, sent = 0, False, None
            try:
                async for tok in tokens():
                    n += 1
                    if sent is None:
                        sent = time.perf_counter()
                    yield _chunk(cid, model_name, created, tokenizer.decode([tok]), None)
                finished = True
                yield _chunk(cid, model_name, created, "", "length")
                yield b"data: [DONE]\n\n"
            except (RuntimeError, ValueError) as e:
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n".encode()
            finally:
                if not finished:
                    worker.cancel(sub.req_id)
                signal.close()
                if timeline is not None and sent is not None:
                    timeline.record(request.headers.get("x-request-id"), len(ids), arrive, sub, sent)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "valve"}]})

    async def health(request: Request):
        if worker.error is not None:
            return JSONResponse({"status": "error", "error": str(worker.error)}, 503)
        return JSONResponse({"status": "ok", "steps": worker.engine.steps})

    async def stats(request: Request):
        eng = worker.engine
        out = {"steps": eng.steps, "step_seconds": eng.step_seconds, "sync_seconds": eng.sync_seconds,
               "generated": eng.generated, "computed": eng.computed}
        if elastic is not None:
            out["memory"] = elastic.stats()
        return JSONResponse(out)

    return Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/stats", stats, methods=["GET"]),
    ])


def elastic_engine(m, block_size: int, max_batch_tokens: int, max_seqs: int, max_bytes: int, chunk_bytes: int | None):
    """An engine whose KV cache is a KVPool of at most ``max_bytes`` (mapped on demand: ``ElasticKV``)."""
    from valve.engine.engine import Engine
    from valve.engine.offline import kv_pool_cache

    cache, pool = kv_pool_cache(m.cfg, m.dtype, block_size, max_bytes, chunk_bytes=chunk_bytes)
    return Engine(m, cache, max_batch_tokens=max_batch_tokens, max_seqs=max_seqs), pool


def build_worker(model: str, device: str | None, num_blocks: int, block_size: int, max_batch_tokens: int,
                 max_seqs: int, seed: int = 0, graphs: bool = False, graph_max_batch: int = 32,
                 graph_max_context: int = 4096, graph_max_prompt: int = 0, engine: str = "ours",
                 arch: str = "llama", elastic_bytes: int = 0, chunk_bytes: int | None = None) -> EngineWorker:
    from valve.engine.choice import build_engine_model
    from valve.engine.config import get_config
    from valve.engine.engine import Engine

    m = build_engine_model(engine, arch, get_config(model), device=device, seed=seed)
    if elastic_bytes:
        eng, _ = elastic_engine(m, block_size, max_batch_tokens, max_seqs, elastic_bytes, chunk_bytes)
    else:
        eng = Engine.create(m, num_blocks=num_blocks, block_size=block_size, max_batch_tokens=max_batch_tokens,
                            max_seqs=max_seqs)
    warmup(eng)
    if graphs and m.device.type == "cuda":
        eng.enable_graphs(min(graph_max_batch, max_seqs), graph_max_context,
                          prefill_tokens=min(graph_max_prompt, max_batch_tokens))
    return EngineWorker(eng, name="online-engine")


def make_elastic(worker: EngineWorker, base_bytes: int, valve: bool, idle_release_s: float):
    """The worker's engine grows its KV pool before steps and shrinks it when idle; with ``valve`` it asks the
    arbiter of VALVE_GPU_UUID first (the control block must exist: the arbiter runs)."""
    from valve.engine.elastic import ElasticKV
    from valve.runtime.memory.online import OnlineMemory, device_free_bytes

    pool = worker.engine.cache.allocator
    pool.release_free(base_bytes)  # what the warm-up mapped
    memory = None
    if valve:
        from valve.api.contract import ENV_GPU_UUID
        from valve.runtime.control import ControlBlock, resolve_control_path

        path = resolve_control_path()
        if path is None:
            raise ValueError(f"--valve with --kv-elastic-bytes needs {ENV_GPU_UUID} (the arbiter's GPU)")
        memory = OnlineMemory(ControlBlock.open(path), device_free_bytes(pool.backend))
    el = ElasticKV(worker.engine, pool, base_bytes, memory, idle_release_s)
    worker.before_step = el.before_step
    worker.on_idle = el.on_idle
    return el


def warmup_lengths(max_prompt: int) -> list[int]:
    """Prompt lengths whose prefills load the kernels that real prompts pick (GEMM kernels change with M)."""
    return sorted({*range(16, min(512, max_prompt) + 1, 16), *range(576, max_prompt + 1, 64), max_prompt})


def warmup(eng, prompt_len: int = 64, max_tokens: int = 4, sweep: int = 0) -> None:
    """Requests through the engine before serving (CUDA context, kernels, allocator). ``sweep``: also prefill
    every length of ``warmup_lengths(sweep)`` once (CUDA loads a kernel on its first launch: tens of ms that
    would otherwise land on the first requests of each shape)."""
    eng.add_request("warmup", [1] * prompt_len, max_tokens)
    eng.run_to_completion()
    for n in warmup_lengths(sweep) if sweep else ():
        if eng.cache.blocks_for(n + 1) <= (eng.cache.free_blocks() or 0):  # what fits this cache
            eng.add_request(f"warmup-{n}", [1] * n, 1)
            eng.run_to_completion()
    if eng.model.device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def main(
    model: str = "tiny",
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str | None = None,
    num_blocks: int = 2048,
    block_size: int = 16,
    max_batch_tokens: int = 2048,
    max_seqs: int = 64,
    valve: bool = False,
    seed: int = 0,
    ready_file: str | None = None,
    graphs: bool = True,
    graph_max_batch: int = 32,
    graph_max_context: int = 4096,
    warmup_max_prompt: int = 2048,
    engine: str = "ours",
    arch: str = "llama",
    timeline: str | None = None,
    kv_elastic_bytes: int = 0,
    kv_base_bytes: int = 0,
    kv_chunk_bytes: int | None = None,
    kv_idle_release_s: float = 1.0,
) -> None:
    """Serve a random-weight Llama-shaped model on /v1/completions. On CUDA, all-decode steps and a prompt of up
    to --warmup-max-prompt tokens alone in its step replay CUDA graphs (``--no-graphs``: eager). --engine
    transformers serves transformers' own model classes (--arch llama or qwen) on the same scheduler, paged cache
    and graphs (valve.engine.hf). --timeline PATH writes where each streamed request's time to first token went
    (one JSON line per request, valve.engine.timeline). --kv-elastic-bytes N: the KV cache is a KVPool of up to
    N bytes that keeps --kv-base-bytes mapped, maps what queued requests need before each step (with --valve after
    asking the arbiter, valve.runtime.memory.online) and gives the rest back after --kv-idle-release-s idle
    (valve.engine.elastic); /stats then reports it under "memory"."""
    import sys

    from valve.engine.choice import require_engine

    require_engine(engine, arch, "valve.engine.server")  # before torch is imported or a model built
    import uvicorn

    from valve.engine.config import get_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    signal = resolve_online_signal(valve)
    sys.setswitchinterval(0.0005)  # the engine thread and the event loop hand the GIL over quickly
    worker = build_worker(model, device, num_blocks, block_size, max_batch_tokens, max_seqs, seed, graphs,
                          graph_max_batch, graph_max_context, warmup_max_prompt, engine, arch, kv_elastic_bytes,
                          kv_chunk_bytes)
    warmup(worker.engine, sweep=warmup_max_prompt)  # again through the graphs, and every prefill size
    elastic = None
    if kv_elastic_bytes:
        elastic = make_elastic(worker, kv_base_bytes, valve, kv_idle_release_s)
    g = worker.engine.graphs
    log.info("decode graphs: %s", f"{len(g.graphs)} captured in {g.capture_seconds:.1f} s" if g else "off")
    tl = None
    if timeline:  # where each request's time to first token goes (valve.engine.timeline)
        from valve.engine.timeline import Timeline

        tl = Timeline(timeline, worker.engine.model.device.type == "cuda")
        worker.engine.timing = True
        worker.on_idle = tl.idle if elastic is None else (lambda: (tl.idle(), elastic.on_idle()))
    worker.start()
    app = create_app(worker, model, ByteTokenizer(get_config(model).vocab), signal, timeline=tl, elastic=elastic)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    if ready_file:
        import asyncio
        import pathlib

        async def serve():
            task = asyncio.create_task(server.serve())
            while not server.started:
                if task.done():
                    return await task
                await asyncio.sleep(0.05)
            pathlib.Path(ready_file).write_text(json.dumps({"port": port, "pid": __import__("os").getpid()}))
            await task

        asyncio.run(serve())
    else:
        server.run()
    worker.stop()
    if tl is not None:
        tl.close()


if __name__ == "__main__":
    import typer

    typer.run(main)
