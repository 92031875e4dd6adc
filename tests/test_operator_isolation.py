"""A pair reaches only its own GPU: the sidecars mount one GPU folder of the host, templates cannot use Valve's
annotations, volume or container names, and sidecar images come from the operator's configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from operator_harness import pair_body

from valve.api import colocation as c
from valve.api.contract import (
    ANN_GPU,
    ENV_GPU_UUID,
    ENV_METRICS_ADDR,
    OFFLINE,
    ONLINE,
    PODINFO_FILE,
    SIDECAR_GPU_DIR,
)
from valve.operator.pods import SIDECAR_UID, OperatorConfig, render_pod
from valve.operator.reconcile import plan
from valve.runtime.control import control_path

ROOT = Path(__file__).resolve().parent.parent
CFG = OperatorConfig(sidecar_image="valve:t", allowed_images=("valve:canary",))
NOW = "2026-01-01T00:00:00Z"


def body(**spec_extra):
    b = pair_body(**spec_extra)
    b["metadata"].update(uid="uid-1", generation=1)
    return b


def rendered(role: str) -> dict:
    b = body()
    return render_pod(b, c.ColocationPairSpec.model_validate(b["spec"]), role, "n1", CFG)


@pytest.mark.parametrize("role", [ONLINE, OFFLINE])
def test_sidecars_mount_only_their_own_gpu_folder_of_the_host(role):
    pod = rendered(role)
    spec = pod["spec"]
    (host,) = [v for v in spec["volumes"] if "hostPath" in v]
    assert host["name"] == "valve-runtime" and host["hostPath"]["path"] == "/var/run/valve"
    mounts = [(ct["name"], m) for ct in spec["containers"] + spec["initContainers"]
              for m in ct.get("volumeMounts", []) if m["name"] == "valve-runtime"]
    # one mount of the host folder, at the pod's own GPU's subfolder (the env from the GPU annotation)
    assert [(name, m.get("subPathExpr"), m["mountPath"]) for name, m in mounts] == \
        [(spec["containers"][1]["name"], f"$({ENV_GPU_UUID})", SIDECAR_GPU_DIR)]
    side = spec["containers"][1]
    assert {"name": ENV_GPU_UUID, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{ANN_GPU}']"}}} \
        in side["env"]
    # the init container waits for the annotation (so the env is set when the sidecar starts) and links
    (init,) = spec["initContainers"]
    assert init["name"] == "valve-gpu-dir" and init["image"] == "valve:t"
    assert init["args"] == ["pod-init", "--gpu-from", PODINFO_FILE, "--links", "/var/run/valve",
                            "--target", SIDECAR_GPU_DIR]
    links = {m["name"]: m for m in side["volumeMounts"]}["valve-links"]
    assert links["mountPath"] == "/var/run/valve" and links["readOnly"]


@pytest.mark.parametrize("role", [ONLINE, OFFLINE])
def test_rendered_pods_validate_against_the_kubernetes_pod_schema(role):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    pod = rendered(role)
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("role", [ONLINE, OFFLINE])
def test_valves_containers_run_non_root_without_capabilities(role):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    b = body()
    # a pair whose pod runs as root, with a capability on its own container: Valve's containers stay locked down
    tmpl = b["spec"][role]["template"]["spec"]
    tmpl["securityContext"] = {"runAsUser": 0, "runAsNonRoot": False}
    tmpl["containers"][0]["securityContext"] = {"capabilities": {"add": ["SYS_PTRACE"]}}
    pod = render_pod(b, c.ColocationPairSpec.model_validate(b["spec"]), role, "n1", CFG)
    spec = pod["spec"]
    valve_containers = spec["containers"][1:] + spec["initContainers"]
    assert sorted(ct["name"] for ct in valve_containers) == sorted(
        ["valve-gpu-dir", "valve-proxy" if role == ONLINE else "valve-arbiter"])
    for ct in valve_containers:
        sc = ct["securityContext"]
        # container-level settings win over the pod's runAsUser 0
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == SIDECAR_UID != 0, ct["name"]
        assert sc["runAsGroup"] == SIDECAR_UID and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert sc["readOnlyRootFilesystem"] is True and not sc.get("privileged")
    # the pair's own settings are its own
    assert spec["securityContext"] == {"runAsUser": 0, "runAsNonRoot": False}
    assert spec["containers"][0]["securityContext"] == {"capabilities": {"add": ["SYS_PTRACE"]}}
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("role", [ONLINE, OFFLINE])
def test_sidecars_bind_metrics_to_the_pod_ip_unless_configured(role):
    def addr_env(cfg):
        b = body()
        pod = render_pod(b, c.ColocationPairSpec.model_validate(b["spec"]), role, "n1", cfg)
        (side,) = pod["spec"]["containers"][1:]
        return [e for e in side["env"] if e["name"] == ENV_METRICS_ADDR]

    assert addr_env(CFG) == [{"name": ENV_METRICS_ADDR, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    assert addr_env(OperatorConfig(sidecar_image="valve:t", metrics_addr="0.0.0.0")) == \
        [{"name": ENV_METRICS_ADDR, "value": "0.0.0.0"}]


def test_sidecar_uid_is_the_images_user():
    dockerfile = pytest.importorskip("dockerfile")
    users = [cmd.value[0] for cmd in dockerfile.parse_file(str(ROOT / "Dockerfile")) if cmd.cmd.upper() == "USER"]
    assert users[-1] == f"{SIDECAR_UID}:{SIDECAR_UID}"


def _pod_init(tmp_path, annotations: str, *extra: str):
    podinfo = tmp_path / "annotations"
    podinfo.write_text(annotations)
    links = tmp_path / "links"
    links.mkdir(exist_ok=True)
    target = tmp_path / "host" / "GPU-a"  # what the sidecar's subPathExpr mount shows
    target.mkdir(parents=True, exist_ok=True)
    (tmp_path / "host" / "GPU-b").mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "valve.cli", "pod-init", "--gpu-from", str(podinfo),
                           "--links", str(links), "--target", str(target), *extra],
                          capture_output=True, text=True, timeout=60)
    return proc, links, target


def test_pod_init_links_the_pods_gpu_folder_where_the_runtime_looks(tmp_path):
    proc, links, target = _pod_init(tmp_path, f'{ANN_GPU}="GPU-a"\nother="x"\n')
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(links) == ["GPU-a"]  # no other GPU is reachable through the runtime dir
    path = control_path("GPU-a", links)
    path.write_bytes(b"x")
    assert (target / "control").read_bytes() == b"x"
    # a second run (the init container restarted) replaces the link
    again, _, _ = _pod_init(tmp_path, f'{ANN_GPU}="GPU-a"\n')
    assert again.returncode == 0 and os.listdir(links) == ["GPU-a"]


@pytest.mark.parametrize("annotations, needle", [
    (f'{ANN_GPU}="GPU-a,GPU-b"\n', "several GPUs"),
    (f'{ANN_GPU}=".."\n', "not a GPU UUID"),
    ("other=\"x\"\n", "did not appear"),
    ("garbage\n", "expected key"),
])
def test_pod_init_fails_with_one_line(tmp_path, annotations, needle):
    proc, links, _ = _pod_init(tmp_path, annotations, "--gpu-wait-seconds", "0")
    assert proc.returncode == 2 and os.listdir(links) == []
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("valve pod-init: ")


def _template(role_spec: dict) -> dict:
    return role_spec["template"]


@pytest.mark.parametrize("mutate, needle", [
    (lambda s: _template(s["online"])["metadata"].setdefault("annotations", {}).update({ANN_GPU: "GPU-x"}),
     "valve.io/gpu-uuid"),
    (lambda s: _template(s["offline"]).setdefault("metadata", {}).setdefault("annotations", {}).update({"valve.io/node": "n"}),
     "valve.io/node"),
    (lambda s: _template(s["offline"])["spec"]["volumes"].append({"name": "valve-runtime", "emptyDir": {}}),
     "valve-runtime"),
    (lambda s: _template(s["online"])["spec"]["containers"][0].update(
        volumeMounts=[{"name": "valve-podinfo", "mountPath": "/x"}]), "valve-podinfo"),
    (lambda s: _template(s["offline"])["spec"].update(initContainers=[
        {"name": "i", "image": "i", "volumeMounts": [{"name": "valve-links", "mountPath": "/y"}]}]), "valve-links"),
    (lambda s: _template(s["online"])["spec"]["containers"].append({"name": "valve-proxy", "image": "evil"}),
     "valve-proxy"),
    (lambda s: s["online"].update(proxy={"port": 8000, "upstreamPort": 8000}), "proxy would forward to itself"),
])
def test_templates_may_not_use_what_valve_reserves(mutate, needle):
    b = body()
    mutate(b["spec"])
    out = plan(b, {ONLINE: None, OFFLINE: None}, node="n1", cfg=CFG, now=NOW)
    placed, ready = out.status["conditions"]
    assert out.status["phase"] == "Failed" and out.actions == []
    assert placed["reason"] == ready["reason"] == "InvalidSpec" and needle in placed["message"]
    assert [e.type for e in out.events] == ["Warning"]


def test_a_disabled_proxy_may_share_the_port():
    b = body()
    b["spec"]["online"]["proxy"] = {"enabled": False, "port": 8000, "upstreamPort": 8000}
    assert plan(b, {ONLINE: None, OFFLINE: None}, node="n1", cfg=CFG, now=NOW).status["phase"] == "Placed"


@pytest.mark.parametrize("where, image, allowed", [
    ("proxy", "valve:t", True),
    ("proxy", "valve:canary", True),
    ("arbiter", "evil:latest", False),
    ("proxy", "evil:latest", False),
])
def test_sidecar_images_are_the_operators_choice(where, image, allowed):
    b = body()
    role = "online" if where == "proxy" else "offline"
    b["spec"][role][where] = {"image": image}
    out = plan(b, {ONLINE: None, OFFLINE: None}, node="n1", cfg=CFG, now=NOW)
    if allowed:
        (create,) = out.actions
        assert out.status["phase"] == "Placed" and create.pod["spec"]["containers"][1]["image"] == image
    else:
        placed, ready = out.status["conditions"]
        assert out.status["phase"] == "Failed" and out.actions == [] and placed["reason"] == "ImageNotAllowed"
        assert image in placed["message"] and "valve:canary" in placed["message"]


def test_allowed_sidecar_images_reach_the_operator_config(monkeypatch):
    from typer.testing import CliRunner

    from valve.cli import app

    seen = {}

    async def fake_run(*, cfg, **_):
        seen["cfg"] = cfg

    monkeypatch.setattr("valve.operator.main.run_operator", fake_run)
    monkeypatch.setattr("valve.operator.kube.load_api_client", lambda: None)
    result = CliRunner().invoke(app, ["operator", "--metrics-port", "0", "--sidecar-image", "valve:1",
                                      "--allowed-sidecar-image", "valve:2", "--allowed-sidecar-image", "valve:3",
                                      "--sidecar-metrics-addr", "[::]"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].sidecar_image == "valve:1" and seen["cfg"].allowed_images == ("valve:2", "valve:3")
    assert seen["cfg"].metrics_addr == "::"  # checked and unbracketed
    assert json.dumps(seen["cfg"].image_allowed("valve:4")) == "false"
