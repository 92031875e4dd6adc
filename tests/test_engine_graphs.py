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


def test_prefill_graph_path_matches_plain_steps(model):
    """A prompt alone in its step runs the static prefill path (padded to its bucket): same tokens and logits as
    the plain packed path; prompts in a shared step, or longer than the largest bucket, run eagerly."""
    rng = random.Random(2)
    plain = Engine.create(model, num_blocks=64, block_size=8, max_batch_tokens=256, max_seqs=8, keep_logits=True)
    fast = Engine.create(model, num_blocks=64, block_size=8, max_batch_tokens=256, max_seqs=8, keep_logits=True)
    fast.enable_graphs(max_batch=8, max_context=64, capture=False, prefill_tokens=128)
    pg = fast.prefill_graphs
    assert pg.sizes == [64, 128] and fast.cache.tables[PAD_SEQ] == [pg.pad_block]
    calls = []
    orig = pg.run
    pg.run = lambda plan: calls.append(plan[0].n_tokens) or orig(plan)
    for n in (5, 64, 100, 200):  # 5 -> bucket 64, 64 exact, 100 -> 128, 200 too long: eager
        prompt = [rng.randrange(256) for _ in range(n)]
        want_out, want_logits = run(plain, [prompt], [3])
        got_out, got_logits = run(fast, [prompt], [3])
        assert got_out == want_out, n
        for a, b in zip(got_logits[0], want_logits[0], strict=True):
            assert float((a - b).abs().max()) < 1e-4, n
    assert calls == [5, 64, 100]
    # two fresh prompts in one step: not this path
    calls.clear()
    run(fast, [[1] * 10, [2] * 12], [2, 2])
    assert calls == []


def test_prefill_buckets():
    from valve.engine.graphs import prefill_buckets

    assert prefill_buckets(128) == [64, 128]
    assert prefill_buckets(100) == [64, 128]
    b = prefill_buckets(2048)
    assert b[:8] == [64 * i for i in range(1, 9)] and b[8] == 640 and b[-1] == 2048
    assert all(y - x <= 128 for x, y in zip(b, b[1:], strict=False))
