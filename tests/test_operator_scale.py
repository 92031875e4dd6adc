"""Many pairs created at once (kmock, kopf's real handlers, FakeNodes admitting pods in a random order).

FakeNodes picks each pod's GPU with the device plugin's own rule from what the plugin can know (the node's
pending pods' wishes and its taken slots), not from the pod being admitted: an operator that let two offline
pods of one node wait for admission at once would show pairs split over two GPUs here.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

pytest.importorskip("kopf")
pytest.importorskip("kmock")
pytest_asyncio = pytest.importorskip("pytest_asyncio")

from operator_harness import emulated, operator_requests, pair_body  # noqa: E402

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(240)]
NS = "default"


@pytest_asyncio.fixture
async def env():
    async with emulated() as e:
        yield e


class Kubelets:
    """Bind every new pod at once, admit the bound ones in a random order; free the slots of deleted pods."""

    def __init__(self, env, seed: int) -> None:
        self.env, self.rng = env, random.Random(seed)
        self.seen: set[str] = set()

    async def step(self) -> int:
        pods = await self.env.api.pods(NS)
        live = {p["metadata"]["uid"] for p in pods}
        for uid in [u for u in self.env.nodes.placed if u not in live]:
            self.env.nodes.release(uid)
        new = [p for p in pods if p["metadata"]["uid"] not in self.seen]
        for pod in new:
            self.seen.add(pod["metadata"]["uid"])
            await self.env.nodes.bind(pod)
        self.rng.shuffle(new)
        for pod in new:
            await self.env.nodes.start(pod)
        return len(new)


async def done(env, names) -> dict[str, dict] | None:
    pairs = {n: await env.api.get_pair(n, NS) for n in names}
    phases = {n: ((p or {}).get("status") or {}).get("phase") for n, p in pairs.items()}
    return pairs if all(ph in ("Running", "Degraded") for ph in phases.values()) else None


async def run_until_done(env, kubelets, names, timeout=150.0):
    async def check():
        await kubelets.step()
        return await done(env, names)
    return await env.until(check, f"{len(names)} pairs Running or Degraded", timeout=timeout)


def assert_paired(env, pairs):
    assert {n: p["status"]["phase"] for n, p in pairs.items() if p["status"]["phase"] != "Running"} == {}
    gpus: dict[str, dict[str, str]] = {}
    for _, _, name, role, gpu in env.nodes.placed.values():
        gpus.setdefault(name.rsplit("-", 1)[0], {})[role] = gpu
    assert sorted(gpus) == sorted(pairs)
    for name, p in pairs.items():
        assert gpus[name]["online"] == gpus[name]["offline"] == p["status"]["gpuUUID"], name
    per_gpu = [g["online"] for g in gpus.values()]
    assert len(per_gpu) == len(set(per_gpu))  # no GPU holds two pairs


async def create_at_once(env, nodes: int, pairs: int) -> list[str]:
    """`nodes` nodes of 8 GPUs, the operator, then `pairs` pairs created all at once; returns their names."""
    for i in range(nodes):
        env.add_node(f"n{i}", 8)
    # Resync every 30 s: progress must come from watch events, not from the safety net.
    await env.start_operator(resync_seconds=30)
    names = [f"p{i:02d}" for i in range(pairs)]
    await asyncio.gather(*(env.api.create_pair(pair_body(n, NS), NS) for n in names))
    return names


async def test_forty_pairs_at_once_land_each_on_one_gpu_whatever_the_admission_order(env):
    names = await create_at_once(env, nodes=6, pairs=40)
    pairs = await run_until_done(env, Kubelets(env, seed=7), names)
    assert_paired(env, pairs)
    creates = env.pod_creations()
    assert len(creates) == len(set(creates)) == 80  # no pod created twice, none recreated
    kinds = Counter(f"{r.method.value} {r.resource.plural if r.resource else ''}/{r.subresource or ''}"
                    for r in operator_requests(env.kube))
    assert sum(kinds.values()) <= 6 * len(names) + 20, kinds  # + kopf's lists, watches, discovery


async def test_operator_restart_mid_batch_finishes_without_conflicts(env):
    names = await create_at_once(env, nodes=4, pairs=30)
    kubelets = Kubelets(env, seed=3)

    async def some_running():
        await kubelets.step()
        pairs = [await env.api.get_pair(n, NS) for n in names]
        return sum(((p or {}).get("status") or {}).get("phase") == "Running" for p in pairs) >= 10
    await env.until(some_running, "10 pairs Running", timeout=120)
    await env.stop_operator()
    await kubelets.step()  # pods start while no operator runs
    mark = len(env.pod_creations())
    await env.start_operator(resync_seconds=30)
    pairs = await run_until_done(env, kubelets, names)
    assert_paired(env, pairs)
    creates = env.pod_creations()
    assert len(set(creates)) == 60
    refused = [n for n in creates[mark:] if n in creates[:mark]]
    assert refused == []  # the restarted operator learnt what exists before creating
