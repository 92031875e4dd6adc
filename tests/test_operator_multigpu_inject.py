"""An online replica with several GPUs (tensor parallel) admitted by the webhook: the proxy mounts each of its
GPUs' folders and only those, the init container links each, and the proxy's signal reaches every GPU's control
block. The kubelet's part (downward-API env and file, subPathExpr mounts) is emulated on tmp folders; pod-init and
the signal are the real ones."""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest

from valve.api import policy as pol
from valve.api.contract import ANN_GPU, ENV_GPU_UUID, ONLINE, ONLINE_RESOURCE, PODINFO_FILE, SIDECAR_GPU_DIR
from valve.device_plugin.annotate import PodDevices
from valve.operator.pods import OperatorConfig
from valve.operator.webhook import admit
from valve.runtime.control import ControlBlock
from valve.runtime.online.proxy import make_signal

CFG = OperatorConfig(sidecar_image="valve:t")
NS = "serving"
HOST_GPUS = ("GPU-a", "GPU-b", "GPU-c", "GPU-d")


def policy() -> dict:
    return {"apiVersion": pol.API_VERSION, "kind": pol.KIND, "metadata": {"name": "chat", "namespace": NS},
            "spec": {"selector": {"matchLabels": {"app": "chat"}},
                     "offline": {"template": {"spec": {"containers": [{"name": "batch", "image": "batch:1"}]}}}}}


def replica(gpus: int) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "chat-7d9f6c-x1", "namespace": NS, "labels": {"app": "chat"}},
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.6.0",
                                     "args": ["--tensor-parallel-size", str(gpus)],
                                     "resources": {"limits": {ONLINE_RESOURCE: str(gpus)}}}]}}


def injected(gpus: int) -> dict:
    new, warnings = admit(replica(gpus), [policy()], CFG)
    assert warnings == [] and new is not None
    return new


@pytest.mark.parametrize("gpus", [2, 4])
def test_a_multi_gpu_replica_gets_the_proxy_with_one_folder_per_gpu(gpus):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    pod = injected(gpus)
    kubernetes_validate.validate(copy.deepcopy(pod), kubernetes_validate.latest_version(), strict=True)
    vllm, proxy = pod["spec"]["containers"]
    assert vllm == replica(gpus)["spec"]["containers"][0] and proxy["name"] == "valve-proxy"
    runtime = [(m["mountPath"], m["subPathExpr"]) for ct in pod["spec"]["containers"] + pod["spec"]["initContainers"]
               for m in ct.get("volumeMounts", []) if m["name"] == "valve-runtime"]
    assert runtime == [(f"{SIDECAR_GPU_DIR}-{i}", f"$({ENV_GPU_UUID}_{i})") for i in range(gpus)]
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in proxy["env"]}
    assert env[ENV_GPU_UUID] == f"metadata.annotations['{ANN_GPU}']"  # the whole list: the proxy signals each
    assert [env[f"{ENV_GPU_UUID}_{i}"] for i in range(gpus)] == \
        [f"metadata.annotations['valve.io/gpu-uuid-{i}']" for i in range(gpus)]
    (init,) = pod["spec"]["initContainers"]
    assert init["args"][-2:] == ["--gpus", str(gpus)]
    (host,) = [v for v in pod["spec"]["volumes"] if "hostPath" in v]
    assert host["hostPath"]["path"] == "/var/run/valve"


def kubelet_env(container: dict, annotations: dict[str, str]) -> dict[str, str]:
    """The container's env as the kubelet resolves it (values and downward-API annotation fieldRefs)."""
    out = {}
    for e in container.get("env", []):
        path = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
        if m := re.fullmatch(r"metadata\.annotations\['(.+)'\]", path):
            out[e["name"]] = annotations.get(m.group(1), "")
        elif "value" in e:
            out[e["name"]] = e["value"]
    return out


def test_the_proxy_of_a_two_gpu_replica_reaches_each_of_its_gpus_and_no_other(tmp_path):
    pod = injected(2)
    host = tmp_path / "host"  # the node's /var/run/valve, an arbiter's control block on each GPU
    blocks = {g: ControlBlock.create(host / g / "control") for g in HOST_GPUS}
    annotations = PodDevices(NS, "chat-7d9f6c-x1", ("GPU-b", "GPU-d"), (ONLINE,)).annotations()
    podinfo = tmp_path / "podinfo"
    podinfo.write_text("".join(f'{k}="{v}"\n' for k, v in annotations.items()))
    sidecar_root = tmp_path / "sidecar"  # the proxy container's file system, where its mounts are
    links = sidecar_root / CFG.runtime_dir.lstrip("/")  # the links emptyDir, the proxy's runtime dir
    links.mkdir(parents=True)

    # the kubelet: the init container runs with its args (paths in the sidecar's file system mapped to tmp)
    (init,) = pod["spec"]["initContainers"]
    args = [str(podinfo) if a == PODINFO_FILE else str(sidecar_root) + a if a.startswith("/") else a
            for a in init["args"]]
    proc = subprocess.run([sys.executable, "-m", "valve.cli", *args, "--gpu-wait-seconds", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # ... then mounts the proxy's GPU folders by their subPathExpr, with the env resolved from the annotations
    proxy = pod["spec"]["containers"][1]
    env = kubelet_env(proxy, annotations)
    for m in proxy["volumeMounts"]:
        if m["name"] == "valve-runtime":
            sub = re.sub(r"\$\((\w+)\)", lambda v: env[v.group(1)], m["subPathExpr"])
            assert sub in ("GPU-b", "GPU-d")  # never empty (the whole root) nor another GPU
            mount = sidecar_root / m["mountPath"].lstrip("/")
            mount.parent.mkdir(parents=True, exist_ok=True)
            mount.symlink_to(host / sub)
    assert sorted(p.name for p in links.iterdir()) == ["GPU-b", "GPU-d"]  # no other GPU reachable

    # the proxy, as its args and env start it: one request closes and counts on both GPUs, none on the others
    sig = make_signal(env[ENV_GPU_UUID], str(links))
    for cb in blocks.values():
        cb.fields.flags |= 1  # FLAG_CLOSE_ALLOWED, the arbiters alive
        cb.fields.heartbeat_ns = 2**62
    sig.begin()
    assert {g: cb.inflight() for g, cb in blocks.items()} == {"GPU-a": 0, "GPU-b": 1, "GPU-c": 0, "GPU-d": 1}
    sig.end()
    assert all(cb.inflight() == 0 for cb in blocks.values())
    sig.close()


@pytest.mark.parametrize("annotations, needle", [
    ({ANN_GPU: "GPU-b"}, "expect 2 GPUs"),  # the plugin gave fewer GPUs than the sidecars were built for
    ({ANN_GPU: "GPU-b,GPU-d"}, "did not appear"),  # a plugin that does not write the per-GPU annotations
    ({ANN_GPU: "GPU-b,GPU-d", "valve.io/gpu-uuid-0": "GPU-d", "valve.io/gpu-uuid-1": "GPU-b"}, "not valve.io/gpu"),
    ({ANN_GPU: "GPU-b,GPU-d", "valve.io/gpu-uuid-0": "GPU-b", "valve.io/gpu-uuid-1": ".."}, "not a GPU UUID"),
])
def test_pod_init_of_several_gpus_refuses_what_does_not_add_up(tmp_path, annotations, needle):
    podinfo = tmp_path / "podinfo"
    podinfo.write_text("".join(f'{k}="{v}"\n' for k, v in annotations.items()))
    links = tmp_path / "links"
    links.mkdir()
    proc = subprocess.run([sys.executable, "-m", "valve.cli", "pod-init", "--gpu-from", str(podinfo), "--links",
                           str(links), "--target", str(tmp_path / "gpu"), "--gpus", "2", "--gpu-wait-seconds", "0"],
                          capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert list(links.iterdir()) == []  # nothing linked
