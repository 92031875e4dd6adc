"""Arrival processes and length distributions of the load generator (no torch needed)."""

import random
import statistics

import pytest

from bench.harness.loadgen import Arrivals, LengthDist, make_trace, parse_sse_line, percentile


def gaps(ts):
    return [b - a for a, b in zip(ts, ts[1:], strict=False)]


def cv(xs):
    return statistics.pstdev(xs) / statistics.fmean(xs)


def test_poisson_rate_and_cv():
    ts = Arrivals("poisson", rate=50).times(200, random.Random(0))
    assert len(ts) == pytest.approx(10_000, rel=0.05)
    assert cv(gaps(ts)) == pytest.approx(1.0, abs=0.05)
    assert all(0 <= t < 200 for t in ts) and ts == sorted(ts)


@pytest.mark.parametrize("target", [0.5, 2.0, 4.0])
def test_gamma_gaps_have_the_requested_cv(target):
    ts = Arrivals("gamma", rate=20, cv=target).times(1000, random.Random(1))
    assert len(ts) / 1000 == pytest.approx(20, rel=0.1)
    assert cv(gaps(ts)) == pytest.approx(target, rel=0.1)


def test_onoff_keeps_the_mean_rate_and_is_bursty():
    ts = Arrivals("onoff", rate=10, on_s=1.0, off_s=3.0).times(2000, random.Random(2))
    assert len(ts) / 2000 == pytest.approx(10, rel=0.1)
    assert cv(gaps(ts)) > 1.5  # silences between bursts
    with pytest.raises(ValueError):
        Arrivals("weibull").times(1, random.Random(0))


def test_lengths_and_trace():
    d = LengthDist(mean=300, cv=0.6, min=16, max=4096)
    xs = [d.sample(random.Random(i)) for i in range(4000)]
    assert statistics.fmean(xs) == pytest.approx(300, rel=0.05)
    assert cv(xs) == pytest.approx(0.6, rel=0.15)
    assert LengthDist(mean=7).sample(random.Random(0)) == 7
    tr = make_trace(Arrivals("poisson", rate=5), 10, LengthDist(20, 0.5, 4, 40), LengthDist(8), vocab=100, seed=3)
    assert tr == make_trace(Arrivals("poisson", rate=5), 10, LengthDist(20, 0.5, 4, 40), LengthDist(8),
                            vocab=100, seed=3)
    assert all(4 <= len(r.prompt) <= 40 and r.max_tokens == 8 for r in tr)
    assert all(0 <= t < 100 for r in tr for t in r.prompt)


def test_sse_parsing_and_percentiles():
    assert parse_sse_line(b'data: {"a": 1}\n') == {"a": 1}
    assert parse_sse_line(b"data: [DONE]\n") == "[DONE]"
    assert parse_sse_line(b"\n") is None and parse_sse_line(b": keepalive\n") is None
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 99) == 99
