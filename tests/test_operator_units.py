"""Pure parts of the operator: pod rendering, status, the reconcile plan, capacity, RBAC verbs, CLI."""

from __future__ import annotations

import json

import pytest
from operator_harness import gpu_node, pair_body
from typer.testing import CliRunner

from valve.api import colocation as c
from valve.api.contract import ANN_GPU, ANN_HASH, ANN_ROLE, OFFLINE, ONLINE, PODINFO_FILE, PRELOAD_LIBRARY
from valve.operator import rbac, reconcile, status
from valve.operator.capacity import Claim, NodeView, build_nodes, node_view
from valve.operator.pods import (
    OperatorConfig,
    PodView,
    pod_view,
    render_pod,
    spec_hash,
)
from valve.operator.reconcile import Create, Delete, plan

CFG = OperatorConfig(sidecar_image="valve:t")
NOW = "2026-01-01T00:00:00Z"


def pair(**status) -> dict:
    body = pair_body()
    body["metadata"].update(uid="uid-1", generation=3)
    if status:
        body["status"] = status
    return body


def view(pod: dict, phase="Pending", ready=False, gpu=None, node=None, uid="u") -> PodView:
    pod = json.loads(json.dumps(pod))
    pod["metadata"]["uid"] = uid
    if gpu:
        pod["metadata"]["annotations"][ANN_GPU] = gpu
    if node:
        pod["spec"]["nodeName"] = node
    pod["status"] = {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    return pod_view(pod)


def rendered(role: str, body=None) -> dict:
    body = body or pair()
    return render_pod(body, c.ColocationPairSpec.model_validate(body["spec"]), role, "n1", CFG)


def test_render_is_deterministic_and_hash_tracks_the_spec():
    assert rendered(ONLINE) == rendered(ONLINE)
    other = pair()
    other["spec"]["online"]["template"]["spec"]["containers"][0]["image"] = "vllm:2"
    assert rendered(ONLINE, other)["metadata"]["annotations"][ANN_HASH] != \
        rendered(ONLINE)["metadata"]["annotations"][ANN_HASH]


def test_proxy_can_be_disabled_and_sidecar_image_overridden():
    body = pair()
    body["spec"]["online"]["proxy"] = {"enabled": False}
    body["spec"]["offline"]["arbiter"] = {"image": "arb:9"}
    online, offline = rendered(ONLINE, body), rendered(OFFLINE, body)
    assert [x["name"] for x in online["spec"]["containers"]] == ["server"]
    assert "volumes" not in online["spec"]
    assert offline["spec"]["containers"][1]["image"] == "arb:9"


def test_preload_gate_puts_the_node_library_into_ld_preload_of_the_offline_worker_only():
    body = pair()
    assert "LD_PRELOAD" not in json.dumps(rendered(OFFLINE, body))  # default "hooks": pods as before
    body["spec"]["offline"]["gate"] = "preload"
    worker = body["spec"]["offline"]["template"]["spec"]["containers"][0]
    worker["env"] = [{"name": "LD_PRELOAD", "value": "/lib/other.so"}]
    pod = rendered(OFFLINE, body)
    main, arbiter = pod["spec"]["containers"][:2]
    assert {"name": "LD_PRELOAD", "value": f"{PRELOAD_LIBRARY}:/lib/other.so"} in main["env"]
    assert {"name": "valve-gate-lib", "mountPath": PRELOAD_LIBRARY, "readOnly": True} in main["volumeMounts"]
    assert {"name": "valve-gate-lib", "hostPath": {"path": PRELOAD_LIBRARY, "type": "File"}} in pod["spec"]["volumes"]
    assert "LD_PRELOAD" not in json.dumps(arbiter) and "LD_PRELOAD" not in json.dumps(rendered(ONLINE, body))
    assert pod["metadata"]["annotations"][ANN_HASH] != rendered(OFFLINE)["metadata"]["annotations"][ANN_HASH]


@pytest.mark.parametrize("role", [ONLINE, OFFLINE])
def test_sidecars_read_the_gpu_from_a_downward_api_volume(role):
    pod = rendered(role)
    side = pod["spec"]["containers"][1]
    assert side["name"] == ("valve-proxy" if role == ONLINE else "valve-arbiter")
    i = side["args"].index("--gpu-from")
    assert side["args"][i + 1] == PODINFO_FILE == "/etc/valve/podinfo/annotations"
    assert "--gpu" not in side["args"] and not any("VALVE_GPU_UUID" in a for a in side["args"])
    assert {"name": "VALVE_ROLE", "value": role} in side["env"]
    # the GPU env only from the annotation (resolved at start, after the init container waited for it)
    (gpu_env,) = [e for e in side["env"] if e["name"] == "VALVE_GPU_UUID"]
    assert gpu_env == {"name": "VALVE_GPU_UUID",
                       "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['valve.io/gpu-uuid']"}}}
    (vol,) = [v for v in pod["spec"]["volumes"] if v["name"] == "valve-podinfo"]
    assert vol == {"name": "valve-podinfo", "downwardAPI": {"items": [
        {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}}
    assert {"name": "valve-podinfo", "mountPath": "/etc/valve/podinfo", "readOnly": True} in side["volumeMounts"]
    assert all(m["name"] != "valve-podinfo" for m in pod["spec"]["containers"][0].get("volumeMounts", []))


def test_device_plugin_annotations_do_not_change_the_spec_hash():
    pod = rendered(OFFLINE)
    annotated = json.loads(json.dumps(pod))
    annotated["metadata"]["annotations"].update({ANN_GPU: "GPU-1", ANN_ROLE: OFFLINE})
    assert spec_hash(annotated) == spec_hash(pod) == pod["metadata"]["annotations"][ANN_HASH]
    annotated["metadata"]["annotations"]["user"] = "x"
    assert spec_hash(annotated) != spec_hash(pod)


def test_pod_view_reads_requests_roles_and_gpu():
    v = view(rendered(OFFLINE), phase="Running", ready=True, gpu="GPU-7", node="n1")
    assert (v.role, v.offline, v.online, v.gpu, v.node, v.target, v.started, v.ready) == \
        (OFFLINE, 1, 0, "GPU-7", "n1", "n1", True, True)


def test_status_pairing_conditions():
    on = view(rendered(ONLINE), "Running", True, "GPU-1", "n1")
    off_same = view(rendered(OFFLINE), "Running", True, "GPU-1", "n1")
    off_other = view(rendered(OFFLINE), "Running", True, "GPU-2", "n1")
    assert status.pairing(on, off_same, "n1").reason == "SameGPU"
    assert status.pairing(on, off_other, "n1").reason == "GPUMismatch"
    assert status.pairing(on, view(rendered(OFFLINE), "Running", True, None, "n2"), "n1").reason == "NodeMismatch"
    assert status.pairing(on, None, "n1").status == "Unknown"
    placed = status.Cond(c.ConditionType.Placed, "True", "NodeSelected")
    phase, _, gpu = status.compute(node="n1", pods={ONLINE: on, OFFLINE: off_other}, placed=placed)
    assert phase is c.Phase.Degraded and gpu is None
    phase, _, gpu = status.compute(node="n1", pods={ONLINE: on, OFFLINE: off_same}, placed=placed)
    assert phase is c.Phase.Running and gpu == "GPU-1"


def test_merge_conditions_moves_transition_time_only_on_change():
    first = status.merge_conditions([], [status.Cond(c.ConditionType.Placed, "False", "NoCapacity")], 1, "t1")
    same = status.merge_conditions(first, [status.Cond(c.ConditionType.Placed, "False", "Other")], 2, "t2")
    flipped = status.merge_conditions(same, [status.Cond(c.ConditionType.Placed, "True", "NodeSelected")], 2, "t3")
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["observedGeneration"] == 2
    assert flipped[0]["lastTransitionTime"] == "t3"


def test_plan_first_sight_places_at_once_and_pends_only_without_a_node():
    p = plan(pair(), {ONLINE: None, OFFLINE: None}, node="n1", cfg=CFG, now=NOW)
    assert p.phase is c.Phase.Placed and [a.role for a in p.actions] == [ONLINE]
    assert p.status["observedGeneration"] == 3 and [e.reason for e in p.events] == ["Placed"]
    p = plan(pair(), {ONLINE: None, OFFLINE: None}, node=None, cfg=CFG, now=NOW)
    assert p.phase is c.Phase.Pending and p.actions == [] and p.events[0].type == "Warning"


def test_plan_creates_online_first_then_offline_once_online_started():
    body = pair(phase="Pending")
    p = plan(body, {ONLINE: None, OFFLINE: None}, node="n1", cfg=CFG, now=NOW)
    assert [(type(a), a.role) for a in p.actions] == [(Create, ONLINE)] and p.phase is c.Phase.Placed
    pending = view(rendered(ONLINE))
    assert plan(body, {ONLINE: pending, OFFLINE: None}, node="n1", cfg=CFG, now=NOW).actions == []
    started = view(rendered(ONLINE), "Running", False, None, "n1")
    assert plan(body, {ONLINE: started, OFFLINE: None}, node="n1", cfg=CFG, now=NOW).actions == []  # GPU unknown
    started = view(rendered(ONLINE), "Running", False, "GPU-0", "n1")
    p = plan(body, {ONLINE: started, OFFLINE: None}, node="n1", cfg=CFG, now=NOW)
    assert [(type(a), a.role) for a in p.actions] == [(Create, OFFLINE)]
    assert p.actions[0].pod["metadata"]["annotations"]["valve.io/want-gpu"] == "GPU-0"
    # another offline pod on the node still waits for its GPU: this one waits its turn
    assert plan(body, {ONLINE: started, OFFLINE: None}, node="n1", cfg=CFG, now=NOW, offline_gate=False).actions == []


def test_plan_recreates_a_misplaced_offline_pod_a_bounded_number_of_times():
    body = pair(phase="Running", node="n1")
    on = view(rendered(ONLINE), "Running", True, "GPU-0", "n1", uid="on")
    off = view(rendered(OFFLINE), "Running", True, "GPU-1", "n1", uid="off")
    p = plan(body, {ONLINE: on, OFFLINE: off}, node="n1", cfg=CFG, now=NOW)
    assert p.phase is c.Phase.Degraded and p.actions == [Delete(OFFLINE, "chat-offline", "off", "GPUMismatch")]
    p = plan(body, {ONLINE: on, OFFLINE: off}, node="n1", cfg=CFG, now=NOW, repairs_left=0)
    assert p.phase is c.Phase.Degraded and p.actions == []
    # pending, asking for the GPU of an online pod that is gone: it would land on the wrong GPU
    asks = rendered(OFFLINE)
    asks["metadata"]["annotations"]["valve.io/want-gpu"] = "GPU-7"
    p = plan(body, {ONLINE: on, OFFLINE: view(asks, uid="off")}, node="n1", cfg=CFG, now=NOW)
    assert p.actions == [Delete(OFFLINE, "chat-offline", "off", "GPUMismatch")]


def test_plan_replaces_failed_or_changed_pods():
    body = pair(phase="Running", node="n1")
    on = view(rendered(ONLINE), "Running", True, "GPU-0", "n1", uid="on")
    failed_off = view(rendered(OFFLINE), "Failed", False, "GPU-0", "n1", uid="off")
    p = plan(body, {ONLINE: on, OFFLINE: failed_off}, node="n1", cfg=CFG, now=NOW)
    assert p.actions == [Delete(OFFLINE, "chat-offline", "off", "PodFailed")]
    changed = pair(phase="Running", node="n1")
    changed["spec"]["online"]["template"]["spec"]["containers"][0]["image"] = "vllm:2"
    off = view(rendered(OFFLINE), "Running", True, "GPU-0", "n1", uid="off")
    p = plan(changed, {ONLINE: on, OFFLINE: off}, node="n1", cfg=CFG, now=NOW)
    # The offline pod stays: a new online pod joins its GPU (and if not, it is recreated then, once).
    assert {(a.role, a.why) for a in p.actions} == {(ONLINE, "SpecChanged")}
    p = plan(changed, {ONLINE: None, OFFLINE: off}, node="n1", cfg=CFG, now=NOW)
    assert [(type(a), a.role) for a in p.actions] == [(Create, ONLINE)]


def test_plan_invalid_spec_fails_without_actions():
    body = pair(phase="Pending")
    body["spec"]["runtime"]["evictionPolicy"] = "random"
    p = plan(body, {ONLINE: None, OFFLINE: None}, node="n1", cfg=CFG, now=NOW)
    assert p.phase is c.Phase.Failed and p.actions == []
    assert "spec.runtime.evictionPolicy" in p.status["conditions"][0]["message"]
    assert p.events[0].type == "Warning"


def test_plan_long_name_fails():
    body = pair(phase="Pending")
    body["metadata"]["name"] = "x" * 64
    assert plan(body, {ONLINE: None, OFFLINE: None}, node="n1", cfg=CFG, now=NOW).phase is c.Phase.Failed


def test_action_events():
    create = Create(ONLINE, rendered(ONLINE))
    assert reconcile.action_event(create, {}, "n1") is None  # told by the Placed event
    assert reconcile.action_event(create, {"onlinePod": "chat-online"}, "n1").reason == "RecreatedPod"
    assert reconcile.action_event(Delete(ONLINE, "x", "u", "PodFailed"), {}, "n1").type == "Warning"


def test_capacity_from_nodes_pods_and_claims():
    nodes = [node_view(gpu_node("a", 2)), node_view(gpu_node("b", 2, ready=False)),
             NodeView("c", 4, 4, True, {"zone": "x"})]
    assert nodes[0].online_allocatable == 2 and not nodes[1].schedulable
    pods = [view(rendered(ONLINE), "Running", True, "GPU-a0", "a"),
            view(rendered(OFFLINE), "Running", True, "GPU-a0", "a")]
    built = {n.name: n for n in build_nodes(nodes, pods, [Claim("c", (ONLINE, OFFLINE))])}
    assert built["a"].free_pairs == 1 and not built["b"].schedulable and built["c"].free_pairs == 3
    # a lone offline tenant on another GPU takes that GPU out too
    lone = view(rendered(OFFLINE), "Running", True, "GPU-a1", "a")
    assert {n.name: n for n in build_nodes(nodes, [*pods, lone])}["a"].free_pairs == 0
    assert [n.name for n in build_nodes(nodes, pods, selector={"zone": "x"})] == ["c"]


@pytest.mark.parametrize("method, name, params, verb", [
    ("GET", None, {}, "list"), ("GET", None, {"watch": "true"}, "watch"), ("GET", "p", {}, "get"),
    ("POST", None, {}, "create"), ("PATCH", "p", {}, "patch"), ("DELETE", "p", {}, "delete"),
    ("DELETE", None, {}, "deletecollection"), ("PUT", "p", {}, "update"),
])
def test_request_verbs(method, name, params, verb):
    assert rbac.request_verb(method, name, params) == verb


def test_rules_allow():
    assert rbac.allows(rbac.RULES, "", "pods", "create")
    assert not rbac.allows(rbac.RULES, "", "pods", "patch")
    assert not rbac.allows(rbac.RULES, "", "secrets", "get")


def test_metrics_count_pairs_by_phase():
    from prometheus_client import REGISTRY

    from valve.operator import metrics
    metrics.set_pairs(["Running", "Running", "Pending"])
    assert REGISTRY.get_sample_value("valve_pairs", {"phase": "Running"}) == 2
    assert REGISTRY.get_sample_value("valve_pairs", {"phase": "Failed"}) == 0
    assert REGISTRY.get_sample_value("valve_reconcile_errors_total") is not None


def test_cli_passes_options_to_the_operator(monkeypatch):
    from valve.cli import app
    from valve.operator import main

    seen = {}

    async def fake_run(**kw):
        seen.update(kw)
    monkeypatch.setattr(main, "run_operator", fake_run)
    monkeypatch.setattr("valve.operator.kube.load_api_client", lambda: None)
    result = CliRunner().invoke(app, ["operator", "--metrics-port", "0", "--health-port", "8081",
                                      "--log-level", "debug", "-n", "a", "-n", "b", "--sidecar-image", "img:1"])
    assert result.exit_code == 0, result.output
    assert seen["namespaces"] == ["a", "b"] and seen["cfg"].sidecar_image == "img:1"
    assert seen["liveness_endpoint"] == "http://0.0.0.0:8081/healthz" and seen["peering"] is None


@pytest.mark.parametrize("args", [["--log-level", "loud"], ["-n", "a", "--all-namespaces"]])
def test_cli_refuses_bad_options(monkeypatch, args):
    from valve.cli import app
    from valve.operator import main

    async def fake_run(**kw):
        raise AssertionError("must not start")
    monkeypatch.setattr(main, "run_operator", fake_run)
    result = CliRunner().invoke(app, ["operator", "--metrics-port", "0", *args])
    assert result.exit_code == 2


@pytest.mark.parametrize("phase, conds, want", [
    (c.Phase.Running, [], ("True", "Running")),
    (c.Phase.Pending, [status.Cond(c.ConditionType.Placed, "False", "NoCapacity", "no node")], ("False", "NoCapacity")),
    (c.Phase.Placed, [status.Cond(c.ConditionType.Placed, "True", "NodeSelected"),
                      status.Cond(c.ConditionType.OnlineReady, "False", "PodPending", "pending")], ("False", "PodPending")),
])
def test_ready_summarises_the_first_condition_that_is_not_true(phase, conds, want):
    ready = status.summary(phase, conds)
    assert ready.type is c.ConditionType.Ready and (ready.status, ready.reason) == want


def test_a_pair_being_deleted_gets_no_pods_and_a_refused_create_says_why():
    deleting = pair()
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert plan(deleting, {ONLINE: None, OFFLINE: None}, node="n1", cfg=CFG, now=NOW).actions == []
    p = plan(pair(), {ONLINE: None, OFFLINE: None}, node=None, cfg=CFG, now=NOW, create_failed="forbidden: x")
    placed = {cd["type"]: cd for cd in p.status["conditions"]}["Placed"]
    assert p.actions == [] and p.phase is c.Phase.Pending
    assert (placed["status"], placed["reason"], placed["message"]) == ("False", "PodCreateFailed", "forbidden: x")
    assert ("Warning", "PodCreateFailed") in [(e.type, e.reason) for e in p.events]
    again = plan(pair(**p.status), {ONLINE: None, OFFLINE: None}, node=None, cfg=CFG, now=NOW,
                 create_failed="forbidden: x")
    assert again.events == []  # told once


def _valve(*args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "valve.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_valve_version_flag():
    from valve import __version__

    proc = _valve("--version")
    assert proc.returncode == 0 and proc.stdout == f"valve {__version__}\n" and proc.stderr == ""


def test_operator_without_kubeconfig_fails_in_one_line(tmp_path):
    env = {"KUBECONFIG": str(tmp_path / "missing"), "HOME": str(tmp_path), "KUBERNETES_SERVICE_HOST": "",
           "KUBERNETES_SERVICE_PORT": ""}
    proc = _valve("operator", "--metrics-port", "0", "--health-port", "0", env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("valve operator: no Kubernetes API access: ")
