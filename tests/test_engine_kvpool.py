"""The engine's KV cache on the runtime's KVPool (simulated backend): same tokens as the plain cache, through
compaction, eviction and the reclaim protocol of the offline runner."""

import json
import random

import pytest

torch = pytest.importorskip("torch")

from valve.engine.config import get_config  # noqa: E402
from valve.engine.engine import Engine  # noqa: E402
from valve.engine.model import build_model  # noqa: E402
from valve.engine.offline import OfflineRunner, reclaim_hook  # noqa: E402
from valve.engine.tokenizer import ByteTokenizer  # noqa: E402
from valve.runtime.control import ControlBlock  # noqa: E402
from valve.runtime.memory.sim import SimBackend  # noqa: E402

BLOCK = 8
CHUNK = 16 << 10  # 4 blocks of the tiny shape (4 KiB each) per chunk: reclaims must move blocks


@pytest.fixture(scope="module")
def model():
    return build_model(get_config("tiny"), device="cpu", seed=5)


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(5, 30))] for _ in range(n)]


def make_pool(model, max_bytes=1 << 20):
    from valve.engine.kvcache import PagedKVCache
    from valve.runtime.memory.pool import KVPool

    block_bytes = model.cfg.kv_bytes_per_token(4) * BLOCK
    assert block_bytes == 4096
    pool = KVPool(backend=SimBackend(granularity=CHUNK), block_bytes=block_bytes, chunk_bytes=CHUNK,
                  max_bytes=max_bytes)
    return PagedKVCache(model.cfg, pool, model.dtype, BLOCK), pool


def reference_outputs(model, ps, max_tokens):
    eng = Engine.create(model, num_blocks=512, block_size=BLOCK, max_batch_tokens=64, max_seqs=6)
    seqs = [eng.add_request(i, p, max_tokens) for i, p in enumerate(ps)]
    eng.run_to_completion()
    return {s.req_id: s.output for s in seqs}


def test_pool_cache_gives_the_same_tokens(model):
    ps = prompts(10)
    want = reference_outputs(model, ps, 12)
    cache, pool = make_pool(model)
    eng = Engine(model, cache, max_batch_tokens=64, max_seqs=6)
    seqs = [eng.add_request(i, p, 12) for i, p in enumerate(ps)]
    eng.run_to_completion()
    assert {s.req_id: s.output for s in seqs} == want
    assert pool.used_blocks() == 0 and pool.stats()["grows"] >= 1
    pool.check()


def test_reclaim_mid_run_moves_and_evicts_without_changing_tokens(model):
    ps = prompts(12, seed=1)
    want = reference_outputs(model, ps, 16)
    cache, pool = make_pool(model)
    eng = Engine(model, cache, max_batch_tokens=64, max_seqs=6)
    seqs = [eng.add_request(i, p, 16) for i, p in enumerate(ps)]
    moved = evicted = 0
    step = 0
    while eng.has_work():
        eng.step()
        step += 1
        if step in (6, 14) and pool.mapped_bytes > CHUNK:
            res = pool.reclaim(pool.mapped_bytes - CHUNK)  # keep one chunk: forces eviction and moves
            requeued = eng.apply_reclaim(res)
            assert {s.req_id for s in requeued} == set(res.evicted)
            moved += len(res.moved)
            evicted += len(res.evicted)
            pool.set_limit(pool.max_bytes)  # let it grow again
            pool.check()
    assert evicted >= 1
    assert moved + evicted >= 2
    assert {s.req_id: s.output for s in seqs} == want  # nothing lost, nothing changed
    assert sum(s.recomputed for s in seqs) > 0


def test_offline_runner_answers_reclaim_requests(model, tmp_path):
    inp, ref_out, out = tmp_path / "in.jsonl", tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    with open(inp, "w") as f:
        for i, p in enumerate(prompts(16, seed=2)):
            f.write(json.dumps({"id": i, "prompt": p, "max_tokens": 10}) + "\n")
    plain = Engine.create(model, num_blocks=512, block_size=BLOCK, max_batch_tokens=64, max_seqs=6)
    OfflineRunner(plain, inp, ref_out, ByteTokenizer(256)).run()

    cache, pool = make_pool(model)
    eng = Engine(model, cache, max_batch_tokens=64, max_seqs=6)
    cb = ControlBlock.anonymous()
    hook = reclaim_hook(pool, eng, cb)
    f = cb.fields
    calls = []

    def step_hook(engine):
        calls.append(len(calls))
        if len(calls) == 5:  # the arbiter posts "give back everything but two chunks"
            assert pool.mapped_bytes >= 4 * CHUNK
            f.reclaim_req_bytes = pool.mapped_bytes - 2 * CHUNK
            f.reclaim_req_seq = 2
        if len(calls) == 12:  # ... and later lets the pool grow again
            f.offline_limit_bytes = pool.max_bytes
        hook(engine)

    stats = OfflineRunner(eng, inp, out, ByteTokenizer(256), step_hook=step_hook).run()
    assert f.reclaim_ack_seq == 2 and f.reclaim_ack_bytes >= 2 * CHUNK
    assert hook.handled == 1 and f.evicted_sequences == len(hook.last.evicted) >= 1
    assert stats.records == 16
    got = {json.loads(line)["id"]: json.loads(line)["tokens"] for line in open(out)}
    want = {json.loads(line)["id"]: json.loads(line)["tokens"] for line in open(ref_out)}
    assert got == want
