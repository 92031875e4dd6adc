"""The server's --timeline: each streamed request's time to first token, split into parts that add up."""

import json

import pytest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from tests.support.serving import serving  # noqa: E402
from tests.support.waiting import until  # noqa: E402
from valve.engine.engine import StepTiming  # noqa: E402
from valve.engine.server import build_worker, create_app  # noqa: E402
from valve.engine.timeline import Timeline, components  # noqa: E402
from valve.engine.tokenizer import ByteTokenizer  # noqa: E402

PARTS = ("signal", "queue", "host_prep", "more_steps", "sync", "deliver")


def test_parts_add_up_for_one_and_several_prefill_steps():
    first = StepTiming(start=10.0, launch=10.2, launched=10.3, done=10.9)
    one = components(arrive=9.0, submitted=9.1, admitted=first, first=first, sent=11.0, clock=None)
    assert one["queue"] == pytest.approx(0.9) and one["host_prep"] == pytest.approx(0.2)
    assert one["more_steps"] == 0 and one["sync"] == pytest.approx(0.7) and one["gpu"] is None
    assert sum(one[k] for k in PARTS) == pytest.approx(one["server_ttft"]) == pytest.approx(2.0)
    later = StepTiming(start=12.0, launch=12.1, launched=12.2, done=12.5)
    two = components(arrive=9.0, submitted=9.1, admitted=first, first=later, sent=12.6, clock=None)
    assert two["more_steps"] == pytest.approx(12.1 - 10.2) and two["sync"] == pytest.approx(0.4)
    assert sum(two[k] for k in PARTS) == pytest.approx(two["server_ttft"]) == pytest.approx(3.6)


@pytest.fixture()
def served(tmp_path):
    worker = build_worker("tiny", "cpu", num_blocks=256, block_size=8, max_batch_tokens=64, max_seqs=16)
    path = tmp_path / "timeline.jsonl"
    tl = Timeline(str(path), cuda=False)
    worker.engine.timing = True
    worker.on_idle = tl.idle
    worker.start()
    app = create_app(worker, "tiny", ByteTokenizer(256), timeline=tl)
    with serving(app) as url:
        yield url, path
    worker.stop()
    tl.close()


def test_streamed_requests_get_a_timeline_record(served):
    url, path = served
    prompts = {"a": list(range(10)), "b": list(range(1, 150))}  # b: 149 tokens over 64-token steps
    for rid, prompt in prompts.items():
        with httpx.stream("POST", url + "/v1/completions", headers={"X-Request-Id": rid}, timeout=60,
                          json={"prompt": prompt, "max_tokens": 3, "stream": True}) as r:
            assert r.status_code == 200
            r.read()
    # a non-streamed request has no first chunk to time: no record
    httpx.post(url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}, timeout=60)
    until(lambda: len(path.read_text().splitlines()) >= 2, "two timeline records", 30)
    recs = {r["rid"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert set(recs) == {"a", "b"}
    for rid, r in recs.items():
        assert r["prompt_tokens"] == len(prompts[rid])
        assert all(r[k] >= 0 for k in PARTS), r
        assert sum(r[k] for k in PARTS) == pytest.approx(r["server_ttft"], abs=1e-6)
        assert r["gpu"] is None and r["sm_mhz_arrival"] is None  # CPU: no device clock, no NVML
    assert recs["a"]["more_steps"] == 0 and recs["b"]["more_steps"] > 0  # b's prefill took three steps
