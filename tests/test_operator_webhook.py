"""The admission webhook: its decision on real AdmissionReview objects (every mutated pod checked against the
Kubernetes Pod schema), and kopf serving it over HTTPS inside the operator (a real POST of an AdmissionReview).
"""

from __future__ import annotations

import base64
import copy
import json
import shutil
import ssl
import subprocess

import pytest

from bench.harness.procs import free_port
from valve.api import colocation as c
from valve.api import policy as pol
from valve.api.contract import LABEL_PAIR, LABEL_POLICY, ONLINE, ONLINE_RESOURCE
from valve.operator.pods import OperatorConfig, render_pod
from valve.operator.webhook import admit

CFG = OperatorConfig(sidecar_image="valve:t")
NS = "serving"


def policy(name: str = "chat", selector: dict | None = None, **spec) -> dict:
    body = {"selector": selector or {"matchLabels": {"app": "chat"}},
            "offline": {"template": {"spec": {"containers": [{"name": "batch", "image": "batch:1"}]}}}, **spec}
    return {"apiVersion": pol.API_VERSION, "kind": pol.KIND, "metadata": {"name": name, "namespace": NS},
            "spec": body}


def review(pod: dict, uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002") -> dict:
    """An AdmissionReview as the API server sends it for a ReplicaSet's pod create."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": NS,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "uid": "6b3d3b5e", "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def replica(labels: dict | None = None, gpus: int | str | None = 1, **spec) -> dict:
    res = {"limits": {ONLINE_RESOURCE: str(gpus)}, "requests": {"cpu": "4"}} if gpus is not None else {}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "chat-7d9f6c-", "namespace": NS,
                         "labels": labels or {"app": "chat", "pod-template-hash": "7d9f6c"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "chat-7d9f6c",
                                              "uid": "0f7e", "controller": True, "blockOwnerDeletion": True}]},
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.6.0", "resources": res,
                                     "args": ["--port", "8000"], "ports": [{"containerPort": 8000, "name": "http"}]}],
                     **spec}}


def validate(pod: dict) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    body = copy.deepcopy(pod)
    body["metadata"]["name"] = body["metadata"].pop("generateName", "x-") + "abcde"
    kubernetes_validate.validate(body, kubernetes_validate.latest_version(), strict=True)


def test_a_selected_pod_gets_the_pairs_proxy_runtime_dir_and_env():
    pod = review(replica())["request"]["object"]
    validate(pod)
    new, warnings = admit(pod, [policy(online={"proxy": {"port": 9100, "upstreamPort": 8000}})], CFG)
    assert warnings == [] and new is not None
    validate(new)
    # the same parts a pair's online pod gets, from the same functions
    pair = {"metadata": {"name": "p", "namespace": NS, "uid": "u"}}
    spec = c.ColocationPairSpec.model_validate({
        "online": {"template": {"spec": {"containers": [{"name": "vllm", "image": "x"}]}},
                   "proxy": {"port": 9100, "upstreamPort": 8000}},
        "offline": {"template": {"spec": {"containers": [{"name": "b", "image": "y"}]}}}})
    reference = render_pod(pair, spec, ONLINE, "node-a", CFG)["spec"]
    assert new["spec"]["containers"][1:] == reference["containers"][1:]
    assert new["spec"]["initContainers"] == reference["initContainers"]
    assert new["spec"]["volumes"] == reference["volumes"]
    proxy = new["spec"]["containers"][1]
    assert proxy["name"] == "valve-proxy" and "--listen" in proxy["args"] and ":9100" in proxy["args"]
    assert {e["name"] for e in proxy["env"]} >= {"VALVE_ROLE", "VALVE_GPU_UUID", "VALVE_RUNTIME_DIR"}
    # the workload's own parts are untouched: its container, resources, owner, no node pinning
    assert new["spec"]["containers"][0] == pod["spec"]["containers"][0]
    assert new["metadata"]["ownerReferences"] == pod["metadata"]["ownerReferences"]
    assert "affinity" not in new["spec"] and "nodeName" not in new["spec"]
    assert new["metadata"]["labels"] == {**pod["metadata"]["labels"], LABEL_POLICY: "chat", LABEL_PAIR: "chat"}
    assert pod == review(replica())["request"]["object"]  # the input is not changed


@pytest.mark.parametrize("pod, policies, warning", [
    (replica(labels={"app": "web"}), [policy()], None),  # not selected
    (replica(), [], None),  # no policy in the namespace
    (replica(), [policy(selector={"matchExpressions": [{"key": "tier", "operator": "Exists"}]})], None),
    (replica(gpus=None), [policy()], "requests no valve.io/online-gpu"),
    (replica(gpus="a"), [policy()], "not an integer"),
    (replica(volumes=[{"name": "valve-links", "emptyDir": {}}]), [policy()], "valve-links"),
    (replica(), [policy(online={"proxy": {"image": "evil:1"}})], "not allowed"),
    (replica(labels={"app": "chat", "app.kubernetes.io/managed-by": "valve-operator"}), [policy()], None),
    (replica(labels={"app": "chat", LABEL_POLICY: "chat"}), [policy()], None),  # a reinvocation
])
def test_other_pods_are_admitted_untouched(pod, policies, warning):
    new, warnings = admit(pod, policies, CFG)
    assert new is None
    if warning is None:
        assert warnings == []
    else:
        (text,) = warnings
        assert warning in text and "admitted without Valve's sidecar" in text


def test_an_invalid_or_deleting_policy_selects_nothing():
    bad = policy()
    bad["spec"]["selector"] = {}
    gone = policy("old")
    gone["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert admit(replica(), [bad, gone], CFG) == (None, [])


def test_two_policies_selecting_one_pod_the_first_by_name_wins_with_a_warning():
    new, warnings = admit(replica(), [policy("zeta"), policy("alpha")], CFG)
    assert new["metadata"]["labels"][LABEL_POLICY] == "alpha"
    (text,) = warnings
    assert "alpha, zeta" in text


def test_label_selector_semantics():
    sel = pol.LabelSelector.model_validate({"matchLabels": {"app": "chat"}, "matchExpressions": [
        {"key": "tier", "operator": "In", "values": ["gold", "silver"]},
        {"key": "canary", "operator": "DoesNotExist"},
        {"key": "zone", "operator": "NotIn", "values": ["b"]}]})
    assert sel.matches({"app": "chat", "tier": "gold"})
    assert sel.matches({"app": "chat", "tier": "silver", "zone": "a"})
    assert not sel.matches({"app": "chat", "tier": "bronze"})
    assert not sel.matches({"app": "chat", "tier": "gold", "canary": "1"})
    assert not sel.matches({"app": "chat", "tier": "gold", "zone": "b"})
    assert not sel.matches({"tier": "gold"})
    with pytest.raises(ValueError, match="empty selector"):
        pol.LabelSelector.model_validate({})
    with pytest.raises(ValueError, match="needs values"):
        pol.LabelSelector.model_validate({"matchExpressions": [{"key": "a", "operator": "In"}]})


# ---- kopf serving the webhook over HTTPS, inside the operator, against kmock ----------------------------------


def _self_signed(folder) -> None:
    """tls.crt / tls.key for 127.0.0.1, as cert-manager or the chart put them in the webhook's Secret."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make the test's certificate"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=valve-webhook",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(folder / "tls.key"), "-out", str(folder / "tls.crt")],
                   check=True, capture_output=True)


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_kopf_serves_the_webhook_over_https_and_its_patch_gives_the_injected_pod(tmp_path):
    pytest.importorskip("kmock")
    import aiohttp
    import jsonpatch
    from operator_harness import emulated

    from valve.operator.main import webhook_server
    from valve.operator.policy_handlers import WEBHOOK_ID

    _self_signed(tmp_path)
    port = free_port()
    context = ssl.create_default_context(cafile=str(tmp_path / "tls.crt"))
    url = f"https://127.0.0.1:{port}/{WEBHOOK_ID}"
    async with emulated() as env:
        env.namespace = NS
        await env.start_operator(cfg=CFG, webhook=webhook_server(port, str(tmp_path), addr="127.0.0.1"))
        code, body = await env.api.call("POST", f"/apis/{pol.API_VERSION}/namespaces/{NS}/{pol.PLURAL}", policy())
        assert code in (200, 201), body

        async with aiohttp.ClientSession() as session:
            async def answer(request: dict) -> dict:
                async with session.post(url, json=request, ssl=context) as resp:
                    assert resp.status == 200
                    return await resp.json()

            async def patched():  # once the server listens and the operator's index holds the policy
                try:
                    got = await answer(review(replica(), uid="u-1"))
                except aiohttp.ClientConnectorError:
                    return None
                return got if "patch" in got["response"] else None
            got = await env.until(patched, "a patched admission response")
            response = got["response"]
            assert got["kind"] == "AdmissionReview" and response["uid"] == "u-1" and response["allowed"] is True
            assert response["patchType"] == "JSONPatch"
            ops = json.loads(base64.b64decode(response["patch"]))
            new = jsonpatch.apply_patch(replica(), ops)
            assert new == admit(replica(), [policy()], CFG)[0]
            validate(new)

            # not selected: allowed, no patch; selected but not servable: allowed, no patch, a warning
            plain = (await answer(review(replica(labels={"app": "web"}))))["response"]
            assert plain["allowed"] is True and "patch" not in plain and "warnings" not in plain
            warned = (await answer(review(replica(gpus=None))))["response"]
            assert warned["allowed"] is True and "patch" not in warned
            assert any("requests no valve.io/online-gpu" in w for w in warned["warnings"])
            # garbage in the pod: still allowed (fail open), untouched
            broken = replica()
            broken["spec"]["containers"] = "not-a-list"
            odd = (await answer(review(broken)))["response"]
            assert odd["allowed"] is True and "patch" not in odd
