"""Paged engine path against the unpaged reference forward (float32, CPU, same random weights)."""

import random

import pytest

torch = pytest.importorskip("torch")

from engine_checks import check_against_reference  # noqa: E402

from valve.engine.config import get_config  # noqa: E402
from valve.engine.engine import Engine  # noqa: E402
from valve.engine.kvcache import OutOfBlocks, PagedKVCache, TorchBlockAllocator  # noqa: E402
from valve.engine.model import build_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return build_model(get_config("tiny"), device="cpu", seed=3)


def test_paged_decode_matches_reference(model):
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (5, 17, 33, 1, 40)]
    engine = Engine.create(model, num_blocks=64, block_size=4, max_batch_tokens=512, keep_logits=True)
    check_against_reference(model, engine, prompts, max_tokens=9)


def test_chunked_prefill_and_preemption_match_reference(model):
    rng = random.Random(1)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (30, 23, 41)]
    # a small token budget forces chunked prefill; few blocks force preemption and recompute
    engine = Engine.create(model, num_blocks=14, block_size=8, max_batch_tokens=16, keep_logits=True)
    check_against_reference(model, engine, prompts, max_tokens=12)
    assert engine.scheduler.preemptions > 0
    assert engine.cache.free_blocks() == 14


def test_block_reuse_after_free_and_remap(model):
    alloc = TorchBlockAllocator(8)
    cache = PagedKVCache(model.cfg, alloc, torch.float32, block_size=4)
    cache.ensure("a", 9)
    assert cache.tables["a"] == [0, 1, 2]
    with pytest.raises(OutOfBlocks):
        cache.ensure("b", 33)
    assert alloc.free_blocks() == 5  # a failed ensure allocates nothing
    cache.remap({1: 7})
    assert cache.tables["a"] == [0, 7, 2]
    cache.free("a")
    assert alloc.free_blocks() == 8
