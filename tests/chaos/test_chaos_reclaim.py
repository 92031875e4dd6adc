"""Chaos: the offline runner SIGKILLed in the middle of answering a memory reclaim, then restarted.

The arbiter is the real ``Arbiter`` with its ``MemoryController``, in this process on a control file; the offline
runner is a real process (``valve.engine.offline --kv-pool``, tiny model, CPU: its KV pool is on the simulated
memory backend), started through ``tests/support/offline_mid_reclaim.py``, which publishes what the process has
mapped and, in the first run, holds the first reclaim answer just before its chunks are unmapped until the kill.
The GPU's memory as the arbiter reads it (NVML on a GPU) is ``Device``: the online side's allocations plus what
the offline process has mapped, for as long as that process exists (the driver frees a dead process's memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from chaos import GPU, ms, write_prompts
from waiting import until

from valve.api.contract import ENV_GPU_UUID, ENV_RUNTIME_DIR
from valve.api.runtime import ReclaimLimits, ReservePolicy, RuntimeSpec
from valve.runtime.arbiter.loop import Arbiter
from valve.runtime.arbiter.memory_control import MemoryController
from valve.runtime.control import ControlBlock, control_path
from valve.runtime.memory.backend import MemorySnapshot

MiB = 1 << 20
POOL = 128 * MiB  # --kv-pool-bytes: one chunk of the pool's default size
ONLINE = 512 * MiB  # what the online request needs
RESERVE, HYST = 32 * MiB, 16 * MiB
DECAY_S = 0.2  # the online peak's half-life: offline grows back within a second of the online request's end
CAPACITY = ONLINE + 64 * MiB  # online fits only once the offline pool is (mostly) gone, reserve and hysteresis kept
WRAPPER = Path(__file__).resolve().parent.parent / "support" / "offline_mid_reclaim.py"
ROOT = WRAPPER.parents[2]


class Device:
    """GpuMemoryInfo of the simulated GPU: online's allocations and what the live offline process has mapped."""

    def __init__(self, path: Path) -> None:
        self.path, self.proc = path, None
        self.online = 0
        self.min_free = CAPACITY

    def offline(self) -> int:
        try:
            pid, nbytes = map(int, self.path.read_text().split())
        except (OSError, ValueError):  # nothing mapped yet
            return 0
        return nbytes if self.proc is not None and pid == self.proc.pid and self.proc.poll() is None else 0

    def free(self) -> int:
        return CAPACITY - self.online - self.offline()

    def snapshot(self) -> MemorySnapshot:
        free = self.free()
        self.min_free = min(self.min_free, free)
        return MemorySnapshot(CAPACITY, free, self.online)


def test_offline_killed_mid_reclaim_resumes_and_online_gets_its_memory(tmp_path, figures):
    pytest.importorskip("torch")
    inp, out, marker = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "mid-reclaim"
    n = 60
    write_prompts(inp, n, seed=11)
    cb = ControlBlock.create(control_path(GPU, tmp_path))
    f = cb.fields
    spec = RuntimeSpec(reserve=ReservePolicy(min_bytes=RESERVE, margin_ratio=0.0, hysteresis_bytes=HYST,
                                                 decay_seconds=DECAY_S),
                       reclaim=ReclaimLimits(grow_bytes_per_second=8 << 30))
    dev = Device(tmp_path / "device-bytes")
    # a long answer timeout: what ends the wait here must be the withdrawal, not the timeout (test_memory_control
    # covers the timeout, the fallback when the dead process's memory does not come back)
    ctl = MemoryController(spec, dev, ack_timeout_s=60.0)
    arb, stop = Arbiter(cb, spec, memory=ctl), threading.Event()
    loop = threading.Thread(target=arb.run, args=(stop,), daemon=True)
    loop.start()
    args = ["--input", str(inp), "--output", str(out), "--model", "tiny", "--device", "cpu", "--kv-pool",
            "--kv-pool-bytes", str(POOL), "--block-size", "8", "--max-batch-tokens", "64", "--max-seqs", "4"]
    env = {**os.environ, ENV_GPU_UUID: GPU, ENV_RUNTIME_DIR: str(tmp_path), "PYTHONUNBUFFERED": "1",
           "VALVE_TEST_DEVICE_BYTES": str(dev.path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def records() -> int:
        return len(out.read_text().splitlines()) if out.exists() else 0

    online_answered = threading.Event()

    def online_request() -> None:
        """Report the demand, allocate once the device has room, answer, release."""
        f.online_mem_bytes = ONLINE
        until(lambda: dev.free() >= ONLINE, "room for the online request", timeout=60, poll=0.001)
        dev.online = ONLINE
        online_answered.set()

    proc = None
    try:
        log = tmp_path / "offline-1.log"
        proc = dev.proc = subprocess.Popen([sys.executable, str(WRAPPER), *args], stdout=subprocess.DEVNULL,
                                           stderr=log.open("w"), env={**env, "VALVE_TEST_MID_RECLAIM": str(marker)})
        until(lambda: records() >= 3 and f.offline_pool_bytes == POOL or proc.poll() is not None,
              "the runner's pool mapped and records written", timeout=120)
        assert proc.poll() is None, log.read_text()
        online = threading.Thread(target=online_request, daemon=True)
        online.start()
        until(marker.exists, "the runner stopped inside its reclaim answer", timeout=60)
        req = ctl.outstanding
        assert req is not None and int(marker.read_text()) == req.nbytes > 0
        assert f.reclaim_ack_seq < req.seq == f.reclaim_req_seq and not online_answered.is_set()
        killed = time.monotonic_ns()
        proc.kill()
        proc.wait(10)
        # the driver freed the pool; the arbiter withdraws its request (a 0-byte one supersedes it) on its next
        # memory step, and online allocates what it asked for
        until(lambda: ctl.withdrawn == 1, "the arbiter to withdraw the unanswered request", timeout=30, poll=0.001)
        withdrawn = time.monotonic_ns()
        until(online_answered.is_set, "the online request answered", timeout=30, poll=0.001)
        answered = time.monotonic_ns()
        assert ctl.outstanding is None and ctl.abandoned == 0 and ctl.acks == 0
        assert f.reclaim_req_seq > req.seq and f.reclaim_req_seq % 2 == 0 and f.reclaim_req_bytes == 0
        assert f.reclaim_ack_seq < req.seq  # the dead runner never answered
        before = records()
        # restart while online still holds its memory: the new runner answers the withdrawal and must not grow
        # into room its dead predecessor's (stale) pool figure made look free
        restarted = time.monotonic_ns()
        progress = tmp_path / "progress.jsonl"
        proc = dev.proc = subprocess.Popen(
            [sys.executable, str(WRAPPER), *args, "--progress", str(progress),
             "--progress-interval", "0.05"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        until(lambda: f.reclaim_ack_seq == f.reclaim_req_seq or proc.poll() is not None,
              "the restarted runner to answer the withdrawal", timeout=120)
        acked = time.monotonic_ns()
        assert f.reclaim_ack_bytes == 0
        until(lambda: ctl.seen_ack == f.reclaim_ack_seq, "the arbiter to take the answer", timeout=10)
        assert ctl.acks == 1 and ctl.reclaimed_bytes == 0 and ctl.outstanding is None
        # two progress records: the runner has stepped for 50 ms past its first answer; with online holding its
        # memory there is no room for a chunk, so it must not have mapped one nor computed a token
        steps = until(lambda: progress.exists() and len(lines := progress.read_text().splitlines()) >= 2 and lines
                      or proc.poll() is not None, "the restarted runner's progress", timeout=60)
        assert proc.poll() is None and json.loads(steps[-1])["computed_tokens"] == 0, (
            [json.loads(x)["computed_tokens"] for x in steps], dev.offline(), int(f.offline_pool_bytes), int(f.offline_limit_bytes))
        assert f.offline_pool_bytes == 0 == dev.offline() and dev.min_free >= 0
        dev.online, f.online_mem_bytes = 0, 0  # the online request ends: offline may grow again
        released = time.monotonic_ns()
        until(lambda: records() > before or proc.poll() is not None, "a record after the restart", timeout=120)
        first = time.monotonic_ns()
        stdout, stderr = proc.communicate(timeout=200)
        assert proc.returncode == 0, stderr
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stop.set()
        loop.join(10)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [r["id"] for r in lines]
    assert len(ids) == len(set(ids)) == n and set(ids) == {f"p{i}" for i in range(n)}  # no duplicates, no gaps
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["skipped"] == before and summary["records"] == n - before
    assert dev.min_free >= 0, f"the device was over-committed by {-dev.min_free} bytes"
    figures.update(records=n, records_before_kill=before, reclaim_asked_mib=req.nbytes // MiB,
                   kill_to_withdrawn_ms=ms(withdrawn - killed), kill_to_online_answered_ms=ms(answered - killed),
                   restart_to_answer_ms=ms(acked - restarted), online_end_to_first_new_record_ms=ms(first - released),
                   peak_half_life_ms=DECAY_S * 1000)
