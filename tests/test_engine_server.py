"""The online server streams valid OpenAI-style SSE and signals Valve around each request."""

import contextlib
import json
import threading

import pytest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")

from tests.support.serving import serving  # noqa: E402
from valve.engine.server import build_worker, create_app  # noqa: E402
from valve.engine.tokenizer import ByteTokenizer  # noqa: E402


class Signal:
    """Counts online_request() entries/exits like Valve's online client would."""

    def __init__(self):
        self.inflight = self.entered = self.exited = 0
        self.max_inflight = 0

    @contextlib.contextmanager
    def __call__(self):
        self.entered += 1
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            yield
        finally:
            self.inflight -= 1
            self.exited += 1


@pytest.fixture(scope="module")
def served():
    worker = build_worker("tiny", "cpu", num_blocks=256, block_size=8, max_batch_tokens=256, max_seqs=16).start()
    signal = Signal()
    with serving(create_app(worker, "tiny", ByteTokenizer(256), signal)) as url:
        yield url, signal, worker
    worker.stop()


def parse_sse(raw: str) -> list[str]:
    events = raw.split("\n\n")
    assert events[-1] == "", "stream must end with a blank line"
    datas = []
    for ev in events[:-1]:
        lines = ev.split("\n")
        assert all(line.startswith("data: ") for line in lines), ev
        datas.append("\n".join(line[len("data: "):] for line in lines))
    return datas


def test_stream_is_valid_sse(served):
    url, signal, _ = served
    before = signal.exited
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", f"{url}/v1/completions",
                      json={"model": "tiny", "prompt": [5, 6, 7, 8, 9], "max_tokens": 7, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            raw = "".join(r.iter_text())
    datas = parse_sse(raw)
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    texts = [c["choices"][0]["text"] for c in chunks]
    finish = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finish[:-1] == [None] * 7 and finish[-1] == "length"
    assert all(t.startswith(" t") for t in texts[:-1]) and texts[-1] == ""
    assert all(c["object"] == "text_completion" for c in chunks)
    assert signal.exited == before + 1 and signal.inflight == 0


def test_stream_matches_non_stream_and_concurrent(served):
    url, signal, _ = served
    body = {"prompt": "hello valve", "max_tokens": 5}
    with httpx.Client(timeout=30) as c:
        full = c.post(f"{url}/v1/completions", json=body).json()
        assert full["usage"] == {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16}

        results = [None] * 4

        def one(i):
            with c.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
                results[i] = "".join(r.iter_text())

        ths = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(30)
    for raw in results:
        chunks = [json.loads(d) for d in parse_sse(raw)[:-1]]
        # greedy decoding: batched streams give the same text as one request alone
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == full["choices"][0]["text"]
    assert signal.inflight == 0 and signal.entered == signal.exited


def test_bad_requests_are_rejected(served):
    url, signal, _ = served
    with httpx.Client(timeout=30) as c:
        for body in ({"prompt": []}, {"prompt": [1, 999]}, {"prompt": "x", "max_tokens": 0},
                     {"prompt": "x", "stream": "yes"}, {"max_tokens": 3}):
            r = c.post(f"{url}/v1/completions", json=body)
            assert r.status_code == 400, body
            assert "error" in r.json()
        assert c.get(f"{url}/health").json()["status"] == "ok"
        assert c.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny"
    assert signal.inflight == 0
