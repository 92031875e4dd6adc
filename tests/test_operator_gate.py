"""The operator's per-node offline gate (Operator.wake), kopf's index readiness gate (valve.operator.kopfgate) and
the operator process's garbage collection, without an API: the parts that decided whether a burst of events costs
O(N) or O(N^2), or never ends."""

from __future__ import annotations

import asyncio
import json

import pytest
from operator_harness import gpu_node, pair_body

from valve.api import colocation as c
from valve.api.contract import ANN_GPU, OFFLINE, ONLINE
from valve.operator import kopfgate
from valve.operator.capacity import node_view
from valve.operator.handlers import Operator
from valve.operator.pods import OperatorConfig, pod_view, render_pod

pytestmark = pytest.mark.timeout(60)
CFG = OperatorConfig(sidecar_image="valve:t")


class NoApi:
    """Records what the operator would send."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def create_pod(self, pod):
        self.sent.append(f"create {pod['metadata']['name']}")
        return pod

    async def patch_status(self, namespace, name, status, plural=c.PLURAL):
        self.sent.append(f"status {name}")

    async def post_event(self, pair, type, reason, message):
        self.sent.append(f"event {pair['metadata']['name']} {reason}")


def pair(name: str) -> dict:
    body = pair_body(name)
    body["metadata"].update(uid=f"uid-{name}", generation=1, resourceVersion="1")
    body["status"] = {"node": "n1"}
    return body


def pod(body: dict, role: str, phase: str, gpu: str | None = None):
    raw = json.loads(json.dumps(render_pod(body, c.ColocationPairSpec.model_validate(body["spec"]), role, "n1", CFG,
                                           want_gpu=gpu if role == OFFLINE else None)))
    raw["metadata"]["uid"] = f"{body['metadata']['name']}-{role}"
    raw["spec"]["nodeName"] = "n1"
    if gpu and phase == "Running":
        raw["metadata"]["annotations"][ANN_GPU] = gpu
    raw["status"] = {"phase": phase, "conditions": [{"type": "Ready", "status": str(phase == "Running")}]}
    return pod_view(raw)


@pytest.mark.asyncio
async def test_a_pair_held_again_by_the_gate_ends_the_wake_round():
    """Pair a's offline pod waits for admission; pair b (online pod running on GPU 1) waits for the gate. An
    event that wakes the node must reconcile b once, leave it waiting and return (it used to take b again
    and again without awaiting anything: the operator's event loop stood still)."""
    a, b = pair("a"), pair("b")
    pods = {"a": [pod(a, ONLINE, "Running", "GPU-n1-0"), pod(a, OFFLINE, "Pending", "GPU-n1-0")],
            "b": [pod(b, ONLINE, "Running", "GPU-n1-1")]}
    api = NoApi()
    op = Operator(api, CFG)  # type: ignore[arg-type]
    op.indices.update({
        "valve_pairs": {("default", n): [body] for n, body in (("a", a), ("b", b))},
        "valve_pods": {("node", "n1"): pods["a"] + pods["b"],
                       **{("pair", "default", n): views for n, views in pods.items()}},
        "valve_nodes": {"n1": [node_view(gpu_node("n1", 8))]},
    })
    op.waiting["n1"] = {("default", "b")}
    rounds = 0
    reconcile = op.reconcile

    async def counted(body, resync=False):
        nonlocal rounds
        rounds += 1
        assert rounds < 5, "wake reconciled the same held pair again and again"
        await reconcile(body, resync)
    op.reconcile = counted  # type: ignore[method-assign]
    await op.wake("n1")
    assert rounds == 1
    assert op.waiting["n1"] == {("default", "b")}
    assert not any(s.startswith("create") for s in api.sent)


@pytest.fixture
def toggles():
    pytest.importorskip("kopf")
    assert kopfgate.install()
    from kopf._cogs.aiokits import aiotoggles

    return aiotoggles


@pytest.mark.asyncio
async def test_counting_gate_keeps_kopf_semantics(toggles):
    gate = toggles.ToggleSet(all)
    assert gate.valve_counting and gate.is_on()  # no toggles: all() of nothing
    t1 = await gate.make_toggle(name="one")
    t2 = await gate.make_toggle(True, name="two")
    assert gate.is_off() and len(gate) == 2 and t1 in gate
    waiter = asyncio.create_task(gate.wait_for(True))
    await asyncio.sleep(0)
    await t1.turn_to(True)
    await asyncio.wait_for(waiter, 1)
    assert gate.is_on()
    await t2.turn_to(False)
    assert gate.is_off()
    await gate.drop_toggle(t2)
    assert gate.is_on()
    await gate.drop_toggle(t2)  # twice: no change
    assert gate.is_on() and len(gate) == 1

    paused = toggles.ToggleSet(any)
    assert paused.is_off()
    p = await paused.make_toggle(name="peer")
    assert paused.is_off()
    await p.turn_to(True)
    assert paused.is_on()
    await paused.drop_toggles([p])
    assert paused.is_off() and len(paused) == 0


@pytest.mark.asyncio
async def test_counting_gate_wakes_its_waiters_once_not_per_object(toggles):
    """N objects seen at start: each has a toggle, each worker waits for the set. Waiters are woken when the set
    turns on, not at every toggle added or dropped (kopf's own set: N wake-ups per drop, N^2 in all)."""
    gate = toggles.ToggleSet(all)
    wakeups = 0
    n = 300
    marks = [await gate.make_toggle(name=str(i)) for i in range(n)]

    async def worker() -> None:
        nonlocal wakeups

        def check() -> bool:
            nonlocal wakeups
            wakeups += 1
            return gate.is_on()
        async with gate._condition:
            await gate._condition.wait_for(check)
    workers = [asyncio.create_task(worker()) for _ in range(n)]
    await asyncio.sleep(0)
    for mark in marks:
        await gate.drop_toggle(mark)
        await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*workers), 5)
    assert wakeups <= 3 * n  # one check on entry, one when the set turns on (kopf's: about n * n / 2)


def test_the_operator_process_collects_young_objects_rarely():
    """`valve operator` raises the young-generation threshold and freezes what it made at start (full collections
    over every stored object were half its CPU at 1,000 pairs); run in a process of its own, as the CLI does."""
    import subprocess
    import sys

    code = ("import gc; from valve.operator.cli import GC_YOUNG, tune_gc; tune_gc(); "
            "print(gc.get_threshold()[0] == GC_YOUNG > 700, gc.get_freeze_count() > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["True", "True"]
