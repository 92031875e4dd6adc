"""The DRA examples: examples/dra-shared-claim.yaml (an online Deployment and an offline Job sharing one named
ResourceClaim, written by hand) and examples/colocationpair-dra.yaml (`spec.placement: dra`). Every object is
checked against the Kubernetes schema (strict) for 1.34 and the newest version kubernetes-validate ships; the
claim against the names valve/api/dra.py defines and the driver expects; the claim, once allocated as a
scheduler would, is prepared by the real driver; the pair goes through the operator's plan.

No cluster here: nothing says a 1.34 scheduler allocates this claim (docs/dra.md, What was and was not run)."""

from __future__ import annotations

import json
from pathlib import Path

import chartcheck as cc
import pytest
import yaml
from test_dra_driver import NODE, Claims, edits, make_driver

from valve.api import colocation as c
from valve.api import dra
from valve.api.contract import OFFLINE, ONLINE, ROLES
from valve.device_plugin.backend import SimBackend
from valve.dra import cdi
from valve.dra.driver import ClaimRef
from valve.operator.pods import OperatorConfig, arbiter_sidecar, proxy_sidecar
from valve.operator.reconcile import Create, CreateClaim, plan_dra

kubernetes_validate = pytest.importorskip("kubernetes_validate")
ROOT = Path(__file__).resolve().parent.parent
K8S = ("1.34", "latest")
NS = "llm"


def objects(name: str) -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d
            for d in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if d}


@pytest.fixture(scope="module")
def shared() -> dict[str, dict]:
    return objects("dra-shared-claim.yaml")


def pod_specs(shared: dict[str, dict]) -> dict[str, dict]:
    """The pod template of each role: the Deployment's is online, the Job's offline."""
    return {ONLINE: shared["Deployment/chat"]["spec"]["template"]["spec"],
            OFFLINE: shared["Job/chat-batch"]["spec"]["template"]["spec"]}


def test_every_object_of_the_shared_claim_example_validates_for_kubernetes_with_resource_v1(shared) -> None:
    assert set(shared) == {"ResourceClaim/chat-gpu", "Deployment/chat", "Job/chat-batch"}
    errors = [f"{key}: {e}" for key, obj in shared.items() for e in cc.validate_k8s(obj, K8S)]
    assert errors == []
    # The examples' own check (tests/test_chart.py) picks these versions for them, not the chart's oldest.
    assert {cc.k8s_versions(o) for o in shared.values()} == {cc.DRA_K8S_VERSIONS}


def test_the_claim_asks_for_one_gpu_per_role_of_the_driver_class_as_the_driver_expects(shared) -> None:
    devices = shared["ResourceClaim/chat-gpu"]["spec"]["devices"]
    assert [r["name"] for r in devices["requests"]] == list(dra.REQUESTS)
    for r in devices["requests"]:
        assert r["exactly"] == {"deviceClassName": dra.DEVICE_CLASS, "allocationMode": "ExactCount", "count": 1}
    # The same requests and constraint as the claim the operator creates for a pair.
    made = dra.pair_claim("x", NS, {})["spec"]["devices"]
    assert devices["requests"] == made["requests"] and devices["constraints"] == made["constraints"]
    assert devices["constraints"][0]["matchAttribute"] == dra.ATTR_UUID
    [config] = devices["config"]
    assert config["opaque"]["driver"] == dra.DRIVER
    parsed = dra.ClaimConfig.model_validate(config["opaque"]["parameters"])  # strict: an unknown field fails
    assert parsed.gate == "hooks" and parsed.runtime.idle_hysteresis_ms == 5


def test_both_workloads_reference_the_one_named_claim_each_container_with_its_role(shared) -> None:
    deployment = shared["Deployment/chat"]["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"] == {"type": "Recreate"}
    job = shared["Job/chat-batch"]["spec"]
    assert job["parallelism"] == job["completions"] == 1
    for role, spec in pod_specs(shared).items():
        [ref] = spec["resourceClaims"]
        assert ref == {"name": ref["name"], "resourceClaimName": "chat-gpu"}  # the named claim, no template
        for container in spec["containers"]:
            assert container["resources"]["claims"] == [{"name": ref["name"], "request": role}], container["name"]


def test_the_hand_written_sidecars_are_what_the_operator_gives_a_dra_pair(shared) -> None:
    cfg = OperatorConfig(sidecar_image="valve:0.1.0")
    specs = pod_specs(shared)
    want = {ONLINE: proxy_sidecar(c.ProxySidecar(port=9000, upstreamPort=8000), cfg, dra=True),
            OFFLINE: arbiter_sidecar(None, c.RuntimeSettings(), cfg, dra=True)}
    for role in ROLES:
        [got] = [ct for ct in specs[role]["containers"] if ct["name"] == want[role]["name"]]
        w = want[role]
        for key in ("image", "command", "args", "ports", "securityContext"):
            assert got[key] == w[key], (role, key)
        assert {k: v for k, v in got["resources"].items() if k != "claims"} == \
            {k: v for k, v in w["resources"].items() if k != "claims"}
        # VALVE_PAIR: the operator takes it from the pod's pair label; the example, without a pair, names it.
        assert {e["name"] for e in got["env"]} == {e["name"] for e in w["env"]}
        assert [e for e in got["env"] if e["name"] != "VALVE_PAIR"] == \
            [e for e in w["env"] if e["name"] != "VALVE_PAIR"]


def test_the_driver_prepares_the_example_claim_once_allocated(shared, short_dir) -> None:
    """The claim as a scheduler would leave it (both requests on one GPU of this node, the claim's config copied
    into the allocation), prepared by the real driver: each request gets its role on the same GPU."""
    gpu = SimBackend(2, node=NODE).discover()[1]
    claim = json.loads(json.dumps(shared["ResourceClaim/chat-gpu"]))
    claim["metadata"].update(namespace=NS, uid="uid-chat")
    results = [{"request": r["name"], "driver": dra.DRIVER, "pool": NODE, "device": dra.device_name(gpu.uuid)}
               for r in claim["spec"]["devices"]["requests"]]
    config = [{"source": "FromClaim", **entry} for entry in claim["spec"]["devices"]["config"]]
    claim["status"] = {"allocation": {"devices": {"results": results, "config": config}}}
    claims = Claims()
    claims.add(claim)
    driver = make_driver(short_dir, [gpu], claims)
    prepared = driver.prepare(ClaimRef(NS, "uid-chat", "chat-gpu"))
    assert sorted(d.request for d, _ in prepared) == sorted(ROLES)
    assert {d.uuid for d, _ in prepared} == {gpu.uuid}
    spec = json.loads(cdi.spec_path(short_dir / "cdi", "uid-chat").read_text())
    for role in ROLES:
        env = edits(spec, role, "uid-chat")["env"]
        assert env["VALVE_ROLE"] == role and env["VALVE_GPU_UUID"] == gpu.uuid
        assert "LD_PRELOAD" not in env  # gate: hooks
        assert json.loads(env["VALVE_RUNTIME_SPEC"])["max_preemptions_per_second"] == 100


def test_the_dra_pair_example_becomes_a_claim_and_two_pods_that_validate() -> None:
    [pair] = objects("colocationpair-dra.yaml").values()
    spec = c.ColocationPairSpec.model_validate(pair["spec"])
    assert spec.placement == "dra"
    pair["metadata"].update(namespace=NS, uid="uid-pair", generation=1)
    plan = plan_dra(pair, {ONLINE: None, OFFLINE: None}, None, cfg=OperatorConfig(sidecar_image="valve:0.1.0"),
                    now="t")
    [claim] = [a.claim for a in plan.actions if isinstance(a, CreateClaim)]
    pods = {a.role: a.pod for a in plan.actions if isinstance(a, Create)}
    assert set(pods) == set(ROLES)
    errors = [f"{o['kind']}/{o['metadata']['name']}: {e}" for o in [claim, *pods.values()]
              for e in cc.validate_k8s(o, K8S)]
    assert errors == []
    params = dra.ClaimConfig.model_validate(claim["spec"]["devices"]["config"][0]["opaque"]["parameters"])
    assert params.gate == "hooks" and params.runtime.max_preemptions_per_second == 100
    for role, pod in pods.items():
        assert pod["spec"]["resourceClaims"][0]["resourceClaimName"] == claim["metadata"]["name"]
        assert pod["spec"]["containers"][0]["resources"]["claims"][0]["request"] == role
