"""`spec.placement: dra`: the operator's real kopf handlers against kmock create one ResourceClaim that both pods
reference, and report the claim's allocation; the plan and the pods are checked on their own too."""

from __future__ import annotations

import pytest

pytest.importorskip("kopf")
pytest.importorskip("kmock")
pytest_asyncio = pytest.importorskip("pytest_asyncio")

from operator_harness import emulated, operator_requests, pair_body, permission  # noqa: E402

from valve.api import colocation as c  # noqa: E402
from valve.api import dra  # noqa: E402
from valve.api.contract import ANN_NODE, OFFLINE_RESOURCE, ONLINE_RESOURCE  # noqa: E402
from valve.operator import rbac  # noqa: E402
from valve.operator.pods import CLAIM_REF, OperatorConfig, pod_view, render_pod  # noqa: E402
from valve.operator.reconcile import Create, CreateClaim, Delete, plan_dra  # noqa: E402

NS = "default"
UUID = "GPU-5d0c7f3e-2a51-4b8e-9b51-6c2f0d7a9e10"
CLAIMS = f"/apis/resource.k8s.io/v1/namespaces/{NS}/resourceclaims"
CFG = OperatorConfig(sidecar_image="valve:t")


def dra_pair(name: str = "chat", **extra) -> dict:
    body = pair_body(name, placement="dra", **extra)
    body["spec"]["offline"]["gate"] = "preload"
    body["metadata"].update(uid="uid-pair", generation=1)
    return body


def allocation(node: str = "gpu-a", uuid: str = UUID) -> dict:
    return {"allocation": {
        "devices": {"results": [{"request": r, "driver": dra.DRIVER, "pool": node, "device": uuid.lower()}
                                for r in ("online", "offline")]},
        "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In",
                                                                 "values": [node]}]}]}}}


# ---- pure ------------------------------------------------------------------------------------------------


def test_default_placement_is_the_device_plugin_and_unchanged() -> None:
    spec = c.ColocationPairSpec.model_validate(pair_body()["spec"])
    assert spec.placement == "devicePlugin"
    pod = render_pod({**pair_body(), "metadata": {"name": "chat", "namespace": NS, "uid": "u"}}, spec, "online",
                     "gpu-a", CFG)
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {ONLINE_RESOURCE: "1"}
    assert "resourceClaims" not in pod["spec"]


def test_dra_pods_reference_the_claim_request_of_their_role_and_validate() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    pair = dra_pair(nodeSelector={"pool": "h200"})
    spec = c.ColocationPairSpec.model_validate(pair["spec"])
    for role in ("online", "offline"):
        pod = render_pod(pair, spec, role, None, CFG)
        for version in ("1.34", kv.latest_version()):
            kv.validate(pod, version, strict=True)
        body = pod["spec"]
        assert body["resourceClaims"] == [{"name": CLAIM_REF, "resourceClaimName": "chat-gpu"}]
        main, sidecar = body["containers"][0], body["containers"][-1]
        assert main["resources"]["claims"] == sidecar["resources"]["claims"] == [{"name": CLAIM_REF,
                                                                                  "request": role}]
        assert ONLINE_RESOURCE not in str(pod) and OFFLINE_RESOURCE not in str(pod)
        assert "affinity" not in body and body["nodeSelector"] == {"pool": "h200"}
        assert "initContainers" not in body and "--gpu-from" not in sidecar["args"]
        assert ANN_NODE not in pod["metadata"]["annotations"]
        # The claim's CDI spec sets these: one source, the claim's configuration.
        assert all(e.get("name") != "LD_PRELOAD" for e in main.get("env") or [])
        assert all(e["name"] not in ("VALVE_RUNTIME_SPEC", "VALVE_GPU_UUID") for e in sidecar["env"])
        assert pod_view(pod).online == pod_view(pod).offline == 0  # no device-plugin slot counted


def test_plan_dra_creates_the_claim_and_both_pods_then_only_what_changed() -> None:
    pair = dra_pair()
    empty = {"online": None, "offline": None}
    todo = plan_dra(pair, empty, None, cfg=CFG, now="t")
    [claim] = [a.claim for a in todo.actions if isinstance(a, CreateClaim)]
    assert sorted(a.role for a in todo.actions if isinstance(a, Create)) == ["offline", "online"]
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "uid-pair"
    params = claim["spec"]["devices"]["config"][0]["opaque"]["parameters"]
    assert params["gate"] == "preload" and params["runtime"]["idleHysteresisMs"] == 7
    assert todo.status["phase"] == "Pending" and todo.status["resourceClaim"] == "chat-gpu"

    pods = {role: pod_view({**a.pod, "metadata": {**a.pod["metadata"], "uid": f"u-{a.role}"}})
            for a in todo.actions if isinstance(a, Create) for role in [a.role]}
    claim["status"] = allocation()
    again = plan_dra(pair, pods, claim, cfg=CFG, now="t")
    assert again.actions == []
    assert again.status["node"] == "gpu-a" and again.status["gpuUUID"] == UUID
    assert again.status["phase"] == "Placed"  # allocated, pods not ready yet

    template = {"spec": {"containers": [{"name": "batch", "image": "batch:2"}]}}
    changed = {**pair, "spec": {**pair["spec"], "offline": {**pair["spec"]["offline"], "template": template}},
               "metadata": {**pair["metadata"], "generation": 2}}
    assert [(a.role, a.why) for a in plan_dra(changed, pods, claim, cfg=CFG, now="t").actions
            if isinstance(a, Delete)] == [("offline", "SpecChanged")]

    bad = {**pair, "spec": {**pair["spec"], "placement": "somewhere"}}
    refused = plan_dra(bad, empty, None, cfg=CFG, now="t")
    assert refused.actions == [] and refused.status["phase"] == "Failed"


# ---- the operator against kmock ---------------------------------------------------------------------------


@pytest_asyncio.fixture
async def env():
    import kmock
    from operator_harness import VERBS

    async with emulated() as e:
        e.kube.resources["resource.k8s.io/v1/resourceclaims"] = kmock.ResourceInfo(
            namespaced=True, kind="ResourceClaim", verbs=VERBS, subresources={"status"})
        yield e


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_dra_pair_shares_one_claim_and_reports_its_allocation(env) -> None:
    await env.start_operator()
    code, body = await env.api.create_pair(pair_body(placement="dra"), NS)
    assert code in (200, 201), body

    async def both():
        pods = [await env.pod("chat-online"), await env.pod("chat-offline")]
        return pods if all(pods) else None
    online, offline = await env.until(both, "both pods, created together")

    async def claim():
        code, got = await env.api.call("GET", f"{CLAIMS}/chat-gpu")
        return got if code == 200 else None
    created = await env.until(claim, "the pair's ResourceClaim")
    assert [r["name"] for r in created["spec"]["devices"]["requests"]] == ["online", "offline"]
    pair = await env.until_phase("Pending")
    assert pair["status"]["resourceClaim"] == "chat-gpu"
    placed = {cd["type"]: cd for cd in pair["status"]["conditions"]}["Placed"]
    assert (placed["status"], placed["reason"]) == ("False", "ClaimPending")
    for pod in (online, offline):
        assert pod["spec"]["resourceClaims"] == [{"name": CLAIM_REF, "resourceClaimName": "chat-gpu"}]
        assert not pod["spec"].get("nodeName")

    # The scheduler allocates the claim and binds both pods; their kubelet starts them.
    assert (await env.api.call("PATCH", f"{CLAIMS}/chat-gpu/status", {"status": allocation()},
                               "application/merge-patch+json"))[0] == 200
    for pod in (online, offline):
        path = f"{env.pods_path}/{pod['metadata']['name']}"
        await env.api.call("POST", path + "/binding", {
            "apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod["metadata"]["name"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": "gpu-a"}})
        await env.api.patch(path + "/status", {"status": {"phase": "Running",
                                                          "conditions": [{"type": "Ready", "status": "True"}]}})
    pair = await env.until_phase("Running")
    status = pair["status"]
    assert status["node"] == "gpu-a" and status["gpuUUID"] == UUID and status["resourceClaim"] == "chat-gpu"
    conds = {cd["type"]: (cd["status"], cd["reason"]) for cd in pair["status"]["conditions"]}
    assert conds["Paired"] == ("True", "SharedClaim") and conds["Placed"] == ("True", "ClaimAllocated")
    assert sorted(env.pod_creations()) == ["chat-offline", "chat-online"]  # each pod once
    await env.stop_operator()

    used = {p for r in operator_requests(env.kube) if (p := permission(r)) is not None}
    granted = {(g, res, v) for rule in rbac.RULES + rbac.DRA_RULES for g in rule["apiGroups"]
               for res in rule["resources"] for v in rule["verbs"]}
    dra_granted = {(g, res, v) for rule in rbac.DRA_RULES for g in rule["apiGroups"] for res in rule["resources"]
                   for v in rule["verbs"]}
    assert used - granted == set(), "requests not covered by RULES + DRA_RULES"
    assert dra_granted <= used, "DRA_RULES grants more than dra mode uses"
