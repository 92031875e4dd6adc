"""The decode-graph fast path (static buffers, padded buckets) against the plain engine step (float32, CPU)."""

import random

import pytest

torch = pytest.importorskip("torch")

from engine_checks import run_engine as run  # noqa: E402

from valve.engine.config import get_config  # noqa: E402
from valve.engine.engine import Engine  # noqa: E402
from valve.engine.graphs import PAD_SEQ, buckets, pick  # noqa: E402
from valve.engine.model import build_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return build_model(get_config("tiny"), device="cpu", seed=5)


def test_buckets_and_pick():
    assert buckets(5) == [1, 2, 4, 8] and buckets(8) == [1, 2, 4, 8] and buckets(1) == [1]
    assert buckets(20, start=8) == [8, 16, 32]
    assert pick([1, 2, 4], 3) == 4 and pick([1, 2, 4], 5) is None


def test_graph_path_matches_plain_steps(model):
    rng = random.Random(1)
    # 5 sequences (bucket 8: three padding rows), one long enough to leave the graphs' context (eager fallback)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (5, 17, 30, 9, 60)]
    max_tokens = [12, 20, 7, 25, 15]
    plain = Engine.create(model, num_blocks=64, block_size=8, max_batch_tokens=64, max_seqs=8, keep_logits=True)
    fast = Engine.create(model, num_blocks=64, block_size=8, max_batch_tokens=64, max_seqs=8, keep_logits=True)
    g = fast.enable_graphs(max_batch=8, max_context=64, capture=False)
    assert g.batch_sizes == [1, 2, 4, 8] and g.widths == [8] and g.max_context == 64
    assert fast.cache.tables[PAD_SEQ] == [g.pad_block]
    calls = []
    orig = g.run
    g.run = lambda plan: calls.append(len(plan)) or orig(plan)
    want_out, want_logits = run(plain, prompts, max_tokens)
    got_out, got_logits = run(fast, prompts, max_tokens)
    assert got_out == want_out
    for rid, rows in want_logits.items():
        assert len(got_logits[rid]) == len(rows)
        for a, b in zip(got_logits[rid], rows, strict=True):
            assert float((a - b).abs().max()) < 1e-4, rid
    assert calls and max(calls) == 5 and 2 in calls  # padded buckets (5 -> 8) and exact ones were used
    # the long sequence (60 prompt + 15 output > 64) finished its last steps eagerly
    assert sum(calls) < sum(max_tokens) - len(prompts)


def test_fits_rejects_prefill_and_oversize(model):
    eng = Engine.create(model, num_blocks=32, block_size=8, max_batch_tokens=64, max_seqs=4)
    g = eng.enable_graphs(max_batch=2, max_context=16, capture=False)
    eng.add_request("a", [1, 2, 3], 4)
    plan = eng.scheduler.schedule()
    assert not g.fits(plan)  # a prefill chunk
    assert not g.fits([])
