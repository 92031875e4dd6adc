"""The offline runner resumes from its output checkpoint without duplicates or gaps."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

from valve.engine.config import get_config  # noqa: E402
from valve.engine.engine import Engine  # noqa: E402
from valve.engine.model import build_model  # noqa: E402
from valve.engine.offline import OfflineRunner, recover_output  # noqa: E402
from valve.engine.tokenizer import ByteTokenizer  # noqa: E402


def write_prompts(path, n, seed=0, max_tokens=(3, 12)):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = [rng.randrange(256) for _ in range(rng.randint(4, 40))]
            f.write(json.dumps({"id": f"p{i}", "prompt": prompt, "max_tokens": rng.randint(*max_tokens)}) + "\n")


def read_records(path):
    return [json.loads(line) for line in open(path)]


def make_runner(inp, out, **kw):
    model = build_model(get_config("tiny"), device="cpu", seed=0)
    eng = Engine.create(model, num_blocks=128, block_size=8, max_batch_tokens=128, max_seqs=8)
    return OfflineRunner(eng, inp, out, ByteTokenizer(256), **kw)


def test_resume_in_process_after_torn_write(tmp_path):
    inp, out, ref = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    write_prompts(inp, 30)
    full = make_runner(inp, ref).run()
    assert full.records == 30 and full.generated_tokens == sum(r["completion_tokens"] for r in read_records(ref))

    first = make_runner(inp, out).run(max_records=11)
    assert first.records == 11
    with open(out, "a") as f:  # a record torn by a crash mid-write
        f.write('{"id": "p29", "tokens": [1, 2')
    assert len(recover_output(out)) == 11
    second = make_runner(inp, out).run()
    assert second.skipped == 11 and second.records == 19
    got = {r["id"]: r for r in read_records(out)}
    assert len(read_records(out)) == 30 == len(got)  # no duplicates
    want = {r["id"]: r for r in read_records(ref)}
    assert got.keys() == want.keys()  # no gaps
    assert all(got[k]["tokens"] == want[k]["tokens"] for k in want)


def test_kill_and_restart_loses_nothing(tmp_path):
    inp, out, progress = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "progress.jsonl"
    write_prompts(inp, 60, seed=1, max_tokens=(20, 40))
    cmd = [sys.executable, "-m", "valve.engine.offline", "--input", str(inp), "--output", str(out),
           "--model", "tiny", "--device", "cpu", "--num-blocks", "256", "--block-size", "8",
           "--max-batch-tokens", "64", "--max-seqs", "4", "--progress", str(progress)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 240  # a bound, not a timing claim: torch starts slowly on a loaded machine
    while not (out.exists() and len(out.read_text().splitlines()) >= 5):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "runner made no progress"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait(10)
    killed_at = len(read_records(out))
    assert 5 <= killed_at < 60
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=200)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == killed_at and summary["records"] == 60 - killed_at
    assert summary["tokens_per_s"] > 0
    ids = [r["id"] for r in read_records(out)]
    assert len(ids) == len(set(ids)) == 60
    assert set(ids) == {f"p{i}" for i in range(60)}
    prompts = {json.loads(line)["id"]: json.loads(line) for line in open(inp)}
    assert all(r["completion_tokens"] == prompts[r["id"]]["max_tokens"] == len(r["tokens"])
               for r in read_records(out))
    assert json.loads(progress.read_text().splitlines()[-1])["final"] is True
