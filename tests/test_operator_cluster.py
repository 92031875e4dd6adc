"""The same end-to-end checks against a real cluster (KUBECONFIG set, CRD installed; skipped otherwise).

    kubectl apply -f crds/ && kubectl create namespace valve-e2e
    KUBECONFIG=~/.kube/config pytest -m cluster tests/test_operator_cluster.py

The operator runs in-process (namespace-scoped to VALVE_E2E_NAMESPACE, default valve-e2e). With nodes that
advertise valve.io/online-gpu (the Valve device plugin), the online pod is created and pinned; without, the
pair waits Pending with NoCapacity and nothing is created.
"""

from __future__ import annotations

import os

import pytest

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.asyncio,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="needs a real cluster through KUBECONFIG"),
]
pytest.importorskip("kopf")
pytest_asyncio = pytest.importorskip("pytest_asyncio")

from operator_harness import Harness, pair_body  # noqa: E402

from valve.api import colocation as c  # noqa: E402
from valve.api.contract import ONLINE_RESOURCE  # noqa: E402

NS = os.environ.get("VALVE_E2E_NAMESPACE", "valve-e2e")
PAIRS = f"/apis/{c.API_VERSION}/namespaces/{NS}/{c.PLURAL}"


@pytest_asyncio.fixture
async def env():
    h = Harness(None, namespace=NS)
    code, _ = await h.api.call("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{c.PLURAL}.{c.GROUP}")
    if code != 200:
        pytest.skip("the ColocationPair CRD is not installed (kubectl apply -f crds/)")
    for name in ("e2e-valid", "e2e-invalid"):
        await h.api.delete(f"{PAIRS}/{name}")
    try:
        yield h
    finally:
        await h.stop_operator()
        for name in ("e2e-valid", "e2e-invalid"):
            await h.api.delete(f"{PAIRS}/{name}")


async def test_invalid_pair_is_refused_by_the_api_server(env):
    body = pair_body("e2e-invalid", NS)
    body["spec"]["runtime"]["reserve"]["minBytes"] = -1
    code, resp = await env.api.create_pair(body, NS)
    assert code == 422 and "minBytes" in str(resp)


async def test_valid_pair_is_placed_or_waits_for_capacity(env):
    code, nodes = await env.api.call("GET", "/api/v1/nodes")
    assert code == 200
    has_slots = any(int((n.get("status", {}).get("allocatable") or {}).get(ONLINE_RESOURCE, "0")) > 0
                    for n in nodes["items"])
    await env.start_operator(resync_seconds=1.0)
    code, body = await env.api.create_pair(pair_body("e2e-valid", NS), NS)
    assert code in (200, 201), body
    if not has_slots:
        pair = await env.until_phase("Pending", "e2e-valid")
        await env.until(lambda: _no_capacity(env), "NoCapacity")
        assert await env.api.pods(NS, "valve.io/pair=e2e-valid") == []
        return
    online = await env.until(lambda: env.pod("e2e-valid-online"), "online pod")
    pair = await env.api.get_pair("e2e-valid", NS)
    assert online["metadata"]["ownerReferences"][0]["uid"] == pair["metadata"]["uid"]
    assert online["spec"]["containers"][0]["resources"]["requests"][ONLINE_RESOURCE] == "1"
    assert pair["status"]["node"]


async def _no_capacity(env):
    pair = await env.api.get_pair("e2e-valid", NS)
    conds = ((pair or {}).get("status") or {}).get("conditions") or []
    return any(cd["type"] == "Placed" and cd["reason"] == "NoCapacity" for cd in conds)
