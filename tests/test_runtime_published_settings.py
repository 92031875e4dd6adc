"""RuntimeSpec settings that the offline client applies travel from the ColocationPair to it through the
arbiter's control block: the operator renders the spec into the arbiter sidecar, the arbiter publishes it, the
offline Gate and reclaim handler read it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from waiting import until

from valve.api.contract import ENV_RUNTIME_SPEC, OFFLINE
from valve.api.runtime import EvictionPolicy
from valve.operator.pods import OperatorConfig, render_pod
from valve.operator.reconcile import parse_spec
from valve.runtime.control import EVICTION_CODES, FLAG_ARBITER, ControlBlock, control_path
from valve.runtime.gate.offline import DEFAULT_QUEUE_AHEAD, Gate, published_granularity
from valve.runtime.memory.client import ReclaimHandler
from valve.runtime.memory.evict import POLICIES
from valve.runtime.memory.pool import KVPool
from valve.runtime.memory.sim import SimBackend

GPU = "GPU-99999999-2222-4333-8444-555555555555"


def pair(runtime: dict) -> dict:
    return {"apiVersion": "valve.io/v1alpha1", "kind": "ColocationPair",
            "metadata": {"name": "chat", "namespace": "default", "uid": "u1"},
            "spec": {"online": {"template": {"spec": {"containers": [{"name": "s", "image": "vllm:1"}]}}},
                     "offline": {"template": {"spec": {"containers": [{"name": "b", "image": "batch:1"}]}}},
                     "runtime": runtime}}


def arbiter_env(body: dict) -> dict[str, str]:
    """The environment the operator gives the offline pod's arbiter sidecar."""
    spec, why = parse_spec(body)
    assert spec is not None, why
    pod = render_pod(body, spec, OFFLINE, "node-a", OperatorConfig())
    (arbiter,) = [c for c in pod["spec"]["containers"] if c["name"] == "valve-arbiter"]
    return {e["name"]: e["value"] for e in arbiter["env"] if "value" in e}


def test_every_eviction_policy_has_a_control_block_code():
    assert set(EVICTION_CODES) == set(POLICIES) == {p.value for p in EvictionPolicy}


@pytest.mark.parametrize(("queue_ahead", "policy"), [(5, "fifo"), (3, "selective")])
def test_pair_settings_reach_the_offline_client(tmp_path: Path, queue_ahead: int, policy: str) -> None:
    granularity = "linear" if policy == "fifo" else "block"
    env = arbiter_env(pair({"queueAhead": queue_ahead, "evictionPolicy": policy, "gateGranularity": granularity,
                            "nearOnline": {"windowMs": 250 * queue_ahead, "maxBatchTokens": 100 * queue_ahead}}))
    assert json.loads(env[ENV_RUNTIME_SPEC])["queue_ahead"] == queue_ahead
    proc = subprocess.Popen(
        [sys.executable, "-m", "valve.cli", "runtime", "arbiter", "--gpu", GPU, "--runtime-dir", str(tmp_path),
         "--no-memory"], env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        path = control_path(GPU, tmp_path)
        cb = until(lambda: _open(path), "the arbiter's control block", timeout=30)
        until(lambda: cb.fields.flags & FLAG_ARBITER, "the arbiter's first step", timeout=30)
        gate = Gate(cb, backend="host")
        handler = ReclaimHandler(KVPool(SimBackend(), block_bytes=2 << 20, chunk_bytes=32 << 20,
                                        max_bytes=1 << 30), cb)
        assert (gate.queue_ahead, handler.policy) == (queue_ahead, policy)
        assert published_granularity(gate) == granularity  # what attach() puts its gates before
        # smaller offline steps near online: the window and the budget the engine's step hook reads
        assert (cb.fields.near_online_ns, cb.fields.near_online_tokens) == (250 * queue_ahead * 10**6,
                                                                           100 * queue_ahead)
        # an explicit argument still wins over the published value
        assert Gate(cb, backend="host", queue_ahead=1).queue_ahead == 1
        other = "selective" if policy == "fifo" else "fifo"
        assert ReclaimHandler(handler.pool, cb, policy=other).policy == other
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, out


def test_without_an_arbiter_the_client_defaults_apply():
    cb = ControlBlock.anonymous()
    pool = KVPool(SimBackend(), block_bytes=2 << 20, chunk_bytes=32 << 20, max_bytes=1 << 30, policy="fifo")
    assert Gate(cb, backend="host").queue_ahead == DEFAULT_QUEUE_AHEAD
    assert ReclaimHandler(pool, cb).policy == "fifo"


def _open(path: Path) -> ControlBlock | None:
    try:
        return ControlBlock.open(path) if path.exists() else None
    except Exception:  # noqa: BLE001  (being created: size or magic not there yet)
        return None
