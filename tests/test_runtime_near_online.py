"""Smaller offline steps near online (RuntimeSpec.near_online): the budget rule, and an offline engine that
takes the published budget between steps."""

import os

import pytest

from valve.runtime.control import GATE_CLOSED, GATE_OPEN, ControlBlock
from valve.runtime.gate.budget import NearOnlineBudget, step_budget

MS = 1_000_000


@pytest.mark.parametrize(("gate_open", "reopen", "now", "window", "near", "want"), [
    (False, 0, 10 * MS, 0, 64, 4096),  # window 0: off, even with online active
    (False, 0, 10 * MS, 200 * MS, 0, 4096),  # budget 0: off
    (False, 0, 10**12, 200 * MS, 64, 64),  # online active (gate closed): small however long ago it reopened
    (True, 100 * MS, 250 * MS, 200 * MS, 64, 64),  # reopened 150 ms ago, window 200 ms: still small
    (True, 100 * MS, 300 * MS, 200 * MS, 64, 4096),  # the window has passed: full
    (False, 0, 0, 200 * MS, 8192, 4096),  # a budget above the engine's own never grows it
])
def test_step_budget(gate_open, reopen, now, window, near, want):
    assert step_budget(gate_open, reopen, now, window, near, 4096) == want


def block(gate: int, reopen_ns: int, window_ns: int, tokens: int) -> ControlBlock:
    cb = ControlBlock.anonymous()
    f = cb.fields
    f.gate, f.reopen_ns, f.near_online_ns, f.near_online_tokens = gate, reopen_ns, window_ns, tokens
    return cb


class Scheduler:
    max_batch_tokens = 4096


def test_the_hook_follows_the_published_settings_and_restores_the_full_budget():
    now = [0]
    cb = block(GATE_CLOSED, 0, 200 * MS, 256)
    sched = Scheduler()
    hook = NearOnlineBudget(sched, cb, clock=lambda: now[0])
    hook()
    assert sched.max_batch_tokens == 256 and hook.small_steps == 1
    cb.fields.gate, cb.fields.reopen_ns, now[0] = GATE_OPEN, 1_000 * MS, 1_100 * MS
    hook()
    assert sched.max_batch_tokens == 256  # 100 ms after the reopen
    now[0] = 1_300 * MS
    hook()
    assert sched.max_batch_tokens == 4096 and hook.small_steps == 2
    cb.fields.near_online_ns = 0  # an arbiter with the setting off
    cb.fields.gate = GATE_CLOSED
    hook()
    assert sched.max_batch_tokens == 4096


def test_a_bad_block_leaves_the_full_budget(tmp_path):
    from valve.runtime.control import control_path

    path = control_path("GPU-1", tmp_path)
    cb = ControlBlock.create(path)
    cb.fields.gate, cb.fields.near_online_ns, cb.fields.near_online_tokens = GATE_CLOSED, 200 * MS, 16
    sched = Scheduler()
    hook = NearOnlineBudget(sched, cb)
    hook()
    assert sched.max_batch_tokens == 16
    os.truncate(path, 0)  # a block gone bad under the mapping: never read; the engine runs as it would alone
    hook()
    assert sched.max_batch_tokens == 4096


def test_an_offline_engine_steps_within_the_near_online_budget(tmp_path):
    pytest.importorskip("torch")
    from tests.test_engine_offline import make_runner, write_prompts

    def run(cb, name):
        inp, out = tmp_path / f"{name}.in.jsonl", tmp_path / f"{name}.out.jsonl"  # one output each: no resume
        write_prompts(inp, 16)
        runner = make_runner(inp, out)  # the engine's own budget: 128 tokens a step
        sizes = []
        step = runner.engine.step

        def counted():
            res = step()
            sizes.append(res.n_tokens)
            return res

        runner.engine.step = counted
        runner.step_hook = NearOnlineBudget(runner.engine.scheduler, cb)
        stats = runner.run()
        assert stats.records == 16
        return sizes, stats

    sizes, stats = run(block(GATE_CLOSED, 0, 200 * MS, 12), "near")  # online active: every step at most 12 tokens
    assert max(sizes) <= 12 and stats.small_steps == len(sizes)
    sizes, stats = run(block(GATE_OPEN, 0, 200 * MS, 12), "far")  # reopened long ago: the engine's own steps
    assert max(sizes) > 12 and stats.small_steps == 0
