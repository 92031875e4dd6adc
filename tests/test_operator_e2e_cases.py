"""The operator against kmock: invalid pairs, divergent GPUs, capacity (see test_operator_e2e.py).

Each test starts the emulator and the operator (in a thread), drives a fake scheduler/kubelet/device plugin
(FakeNodes) and waits for the operator's reactions with bounded polling (no timing asserts).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("kopf")
pytest.importorskip("kmock")
pytest_asyncio = pytest.importorskip("pytest_asyncio")

from operator_harness import emulated, gpu_node, operator_requests, pair_body  # noqa: E402

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
NS = "default"


@pytest_asyncio.fixture
async def env():
    async with emulated() as e:
        yield e


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: s["runtime"]["reserve"].update(minBytes=-1), "minBytes"),
    (lambda s: s["runtime"].update(evictionPolicy="random"), "evictionPolicy"),
    (lambda s: s["offline"].pop("template"), "template"),
    (lambda s: s["offline"].update(enforce="kill"), "enforce"),
])
async def test_invalid_pair_is_refused_by_the_schema(env, mutate, needle):
    body = pair_body()
    mutate(body["spec"])
    code, resp = await env.api.create_pair(body, NS)
    assert code == 422 and needle in json.dumps(resp)
    assert await env.api.get_pair("chat", NS) is None


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: s["runtime"]["reserve"].update(minBytes=-1), "spec.runtime.reserve.minBytes"),
    (lambda s: s["runtime"].update(evictionPolicy="random"), "spec.runtime.evictionPolicy"),
    (lambda s: s["offline"].pop("template"), "spec.offline.template"),
    (lambda s: s["offline"].update(enforce="kill"), "spec.offline.enforce"),
])
async def test_invalid_pair_past_the_schema_fails_clearly_and_creates_nothing(env, mutate, needle):
    env.kube.validate_crs = False  # e.g. an older CRD without the validation
    env.add_node("gpu-a", 1)
    await env.start_operator()
    body = pair_body()
    mutate(body["spec"])
    await env.api.create_pair(body, NS)
    pair = await env.until_phase("Failed")
    (placed,) = [cd for cd in pair["status"]["conditions"] if cd["type"] == "Placed"]
    assert placed["status"] == "False" and placed["reason"] == "InvalidSpec" and needle in placed["message"]
    await env.resyncs()
    assert env.pod_creations() == [] and await env.api.pods(NS) == []
    assert "Failed" in [e["reason"] for e in env.events() if e["type"] == "Warning"]


async def _new_offline(env, old_uid):
    pod = await env.pod("chat-offline")
    return pod if pod is not None and pod["metadata"]["uid"] != old_uid else None


async def _divergent_pair(env):
    """A pair whose offline pod the 'plugin' puts on another GPU than its online pod."""
    env.add_node("gpu-a", 2)
    await env.start_operator()
    env.nodes.force_gpu["chat-offline"] = "GPU-gpu-a-1"
    await env.api.create_pair(pair_body(), NS)
    online = await env.until(lambda: env.pod("chat-online"), "online pod")
    assert await env.nodes.start(online) == "GPU-gpu-a-0"
    offline = await env.until(lambda: env.pod("chat-offline"), "offline pod")
    await env.nodes.start(offline)
    return offline


async def test_gpu_divergence_is_degraded_then_repaired_by_recreating_the_offline_pod(env):
    offline = await _divergent_pair(env)
    new = await env.until(lambda: _new_offline(env, offline["metadata"]["uid"]), "offline pod recreated")
    assert "Degraded" in env.status_phases()
    (warning,) = [e for e in env.events() if e["reason"] == "DeletingPod"]
    assert "GPUMismatch" in warning["message"] and warning["type"] == "Warning"
    assert new["metadata"]["annotations"]["valve.io/want-gpu"] == "GPU-gpu-a-0"
    env.nodes.release(offline["metadata"]["uid"])
    del env.nodes.force_gpu["chat-offline"]
    assert await env.nodes.start(new) == "GPU-gpu-a-0"  # the plugin follows the wish
    pair = await env.until_phase("Running")
    assert pair["status"]["gpuUUID"] == "GPU-gpu-a-0"


async def test_a_pair_that_keeps_landing_on_two_gpus_stays_degraded_with_the_reason(env):
    from valve.operator.handlers import MAX_REPAIRS

    offline = await _divergent_pair(env)
    for _ in range(MAX_REPAIRS):
        uid = offline["metadata"]["uid"]
        new = await env.until(lambda uid=uid: _new_offline(env, uid), "offline pod recreated")
        env.nodes.release(uid)
        await env.nodes.start(new)
        offline = new
    pair = await env.until_phase("Degraded")
    await env.resyncs()
    assert (await env.pod("chat-offline"))["metadata"]["uid"] == offline["metadata"]["uid"]  # no more repairs
    assert env.pod_creations().count("chat-offline") == 1 + MAX_REPAIRS
    paired = next(cd for cd in pair["status"]["conditions"] if cd["type"] == "Paired")
    assert paired["status"] == "False" and paired["reason"] == "GPUMismatch"
    assert "GPU-gpu-a-0" in paired["message"] and "GPU-gpu-a-1" in paired["message"]


async def test_no_capacity_waits_pending_then_places_when_a_node_appears(env):
    env.add_node("cpu-only", 0)
    await env.start_operator()
    await env.api.create_pair(pair_body(), NS)

    async def no_capacity():
        pair = await env.api.get_pair("chat", NS)
        conds = ((pair or {}).get("status") or {}).get("conditions") or []
        return any(cd["type"] == "Placed" and cd["reason"] == "NoCapacity" for cd in conds)
    await env.until(no_capacity, "NoCapacity")
    assert await env.phase() == "Pending" and env.pod_creations() == []

    code, _ = await env.api.call("POST", "/api/v1/nodes", gpu_node("gpu-b", 1))
    assert code in (200, 201)
    await env.until(lambda: env.pod("chat-online"), "online pod on the new node")

    async def placed():  # the status patch naming the node may land after the pod's create
        pair = await env.api.get_pair("chat", NS)
        return ((pair or {}).get("status") or {}).get("node")
    assert await env.until(placed, "status.node set") == "gpu-b"


async def test_two_pairs_never_share_a_gpu_slot(env):
    env.add_node("gpu-a", 1)
    env.add_node("gpu-b", 1)
    await env.start_operator()
    await env.api.create_pair(pair_body("one"), NS)
    await env.api.create_pair(pair_body("two"), NS)
    await env.api.create_pair(pair_body("three"), NS)
    placed = await env.until(lambda: _placed(env, ["one", "two", "three"]), "two pairs placed")
    assert sorted(placed.values()) == ["gpu-a", "gpu-b"]
    waiting = {"one", "two", "three"} - set(placed)
    (left,) = waiting
    pair = await env.api.get_pair(left, NS)
    assert pair["status"]["phase"] == "Pending"


async def _placed(env, names):
    out = {}
    for name in names:
        pair = await env.api.get_pair(name, NS)
        node = ((pair or {}).get("status") or {}).get("node")
        if node:
            out[name] = node
    return out if len(out) == 2 else None


# ---- refused pairs, refused pod creates, pairs being deleted ------------------------------------------------


def _cond(pair: dict, kind: str) -> dict:
    (cond,) = [cd for cd in pair["status"]["conditions"] if cd["type"] == kind]
    return cond


async def test_a_pair_naming_an_image_the_operator_does_not_allow_takes_no_gpu(env):
    env.add_node("gpu-a", 1)
    await env.start_operator()
    bad = pair_body("bad", NS)
    bad["spec"]["offline"]["arbiter"] = {"image": "evil:latest"}
    await env.api.create_pair(bad, NS)
    pair = await env.until_phase("Failed", "bad")
    placed = _cond(pair, "Placed")
    assert placed["status"] == "False" and placed["reason"] == "ImageNotAllowed" and "evil:latest" in placed["message"]
    async def warned():  # the event is posted beside the status write, not before it
        return ("Warning", "Failed") in [(e["type"], e["reason"]) for e in env.events()]
    assert await env.until(warned, "a Warning event")
    await env.run_pair("good")  # the node's one GPU was not claimed by the refused pair
    assert sorted(env.pod_creations()) == ["good-offline", "good-online"]


PSA = ('pods "bad-online" is forbidden: violates PodSecurity "baseline:latest": hostPath volumes '
       '(volume "valve-runtime")')


async def test_a_refused_pod_create_says_why_warns_once_and_releases_the_gpu(env):
    env.add_node("gpu-a", 1)
    env.kube.refuse["bad-online"] = (403, PSA)
    await env.start_operator()
    await env.api.create_pair(pair_body("bad", NS), NS)

    async def refused():
        pair = await env.api.get_pair("bad", NS)
        conds = {cd["type"]: cd for cd in ((pair or {}).get("status") or {}).get("conditions") or []}
        return pair if conds.get("Placed", {}).get("reason") == "PodCreateFailed" else None
    pair = await env.until(refused, "Placed=False/PodCreateFailed")
    placed, ready = _cond(pair, "Placed"), _cond(pair, "Ready")
    assert placed["status"] == "False" and placed["message"] == PSA
    assert ready["status"] == "False" and ready["reason"] == "PodCreateFailed"
    assert pair["status"]["phase"] == "Pending" and "node" not in pair["status"]
    await env.resyncs()  # retried on each resync pass: refused again, told once
    assert [e["message"] for e in env.events() if e["reason"] == "PodCreateFailed"] == [PSA]
    assert {e["type"] for e in env.events() if e["reason"] == "PodCreateFailed"} == {"Warning"}
    await env.run_pair("good")  # the GPU was released
    creates = [r for r in operator_requests(env.kube) if r.method.value == "POST" and r.resource is not None
               and r.resource.plural == "pods"]
    assert creates and all(r.params.get("fieldValidation") == "Strict" for r in creates)
    assert _cond(await env.api.get_pair("good", NS), "Ready")["status"] == "True"


async def test_a_pair_being_deleted_never_gets_pods_again(env):
    env.add_node("gpu-a", 1)
    await env.start_operator()
    await env.run_pair()
    # a finalizer (someone else's) holds the pair: deletionTimestamp set, the pair still there
    path = f"/apis/valve.io/v1alpha1/namespaces/{NS}/colocationpairs/chat"
    assert await env.api.patch(path, {"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}) == 200
    for name in ("chat-online", "chat-offline"):
        await env.api.delete(f"{env.pods_path}/{name}")
    await env.resyncs()
    assert sorted(env.pod_creations()) == ["chat-offline", "chat-online"] and await env.api.pods(NS) == []


async def test_pods_gone_before_the_pairs_deleted_event_are_not_recreated(env):
    import kmock

    env.add_node("gpu-a", 1)
    await env.start_operator()
    await env.run_pair()
    # the pair is gone from the API, its DELETED event not delivered yet; its pods' deletions arrive first
    env.kube.objects[kmock.resource("valve.io/v1alpha1/colocationpairs"), NS, "chat"].delete()
    for name in ("chat-online", "chat-offline"):
        await env.api.delete(f"{env.pods_path}/{name}")
    await env.resyncs()
    assert sorted(env.pod_creations()) == ["chat-offline", "chat-online"] and await env.api.pods(NS) == []


async def test_a_pair_with_enforce_pause_gets_a_shared_pid_namespace_and_a_kill_capable_arbiter(env):
    env.add_node("gpu-a", 1)
    await env.start_operator()
    body = pair_body()
    body["spec"]["offline"]["enforce"] = "pause"
    code, resp = await env.api.create_pair(body, NS)
    assert code in (200, 201), resp
    online = await env.until(lambda: env.pod("chat-online"), "online pod")
    await env.nodes.start(online)
    offline = await env.until(lambda: env.pod("chat-offline"), "offline pod")
    assert offline["spec"]["shareProcessNamespace"] is True and "shareProcessNamespace" not in online["spec"]
    (arbiter,) = [ct for ct in offline["spec"]["containers"] if ct["name"] == "valve-arbiter"]
    assert arbiter["args"][arbiter["args"].index("--enforce") + 1] == "pause"
    assert arbiter["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["KILL"]}
    await env.nodes.start(offline)
    await env.until_phase("Running")
