"""The GPU-identity path end to end, against kmock: the operator creates the pair; the fake node binds and
allocates but does NOT write the GPU; the device plugin's real annotator (PodResources over gRPC -> get/patch
pods) writes `valve.io/gpu-uuid`; the operator sets Paired from it; a sidecar waiting on the downward-API file
(rendered by a fake kubelet from the pod's annotations) gets the GPU.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

pytest.importorskip("kopf")
pytest.importorskip("kmock")
pytest_asyncio = pytest.importorskip("pytest_asyncio")

from operator_harness import emulated, pair_body  # noqa: E402

from valve.api.contract import ANN_GPU, ANN_ROLE  # noqa: E402
from valve.device_plugin.annotate import Annotator, PodClient  # noqa: E402
from valve.device_plugin.fake_kubelet import FakePodResources  # noqa: E402
from valve.runtime.podinfo import resolve_gpu  # noqa: E402

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]
NS = "default"
RESOURCES = {"valve.io/online-gpu": "online", "valve.io/offline-gpu": "offline"}


@pytest_asyncio.fixture
async def env():
    d = Path(tempfile.mkdtemp(prefix="vann", dir="/tmp"))  # short: unix socket path
    async with emulated() as e:
        e.nodes.annotate = False  # the annotator below does it
        e.kubelet_pods = FakePodResources(d / "pr.sock").start()
        e.annotator = Annotator(e.kubelet_pods.socket, RESOURCES, PodClient(str(e.kube.url).rstrip("/")),
                                node_name="gpu-a", interval_s=0.1)
        e.dir = d
        thread = threading.Thread(target=e.annotator.run, daemon=True)
        thread.start()
        try:
            yield e
        finally:
            e.annotator.stop()
            thread.join(5)
            e.kubelet_pods.stop()
            shutil.rmtree(d, ignore_errors=True)


def kubelet_file(annotations: dict[str, str]) -> str:
    def go_quote(v: str) -> str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return "\n".join(f"{k}={go_quote(v)}" for k, v in sorted(annotations.items()))


async def test_annotator_closes_the_gpu_identity_gap(env):
    env.add_node("gpu-a", 2)
    await env.start_operator()
    await env.api.create_pair(pair_body(), NS)
    online = await env.until(lambda: env.pod("chat-online"), "online pod")
    gpu = await env.nodes.start(online)

    # The online pod's proxy sidecar starts before its GPU is known and waits on its podinfo file.
    podinfo = env.dir / "online-annotations"
    podinfo.write_text(kubelet_file((await env.pod("chat-online"))["metadata"]["annotations"]))
    sidecar = asyncio.create_task(asyncio.to_thread(resolve_gpu, None, str(podinfo), 30.0, single=True))
    # It can only return the GPU once the file names it (below): returning it proves that it waited.
    assert not sidecar.done()
    assert ANN_GPU not in (await env.pod("chat-online"))["metadata"]["annotations"]

    env.kubelet_pods.assigned = env.nodes.pod_resources("gpu-a")  # the kubelet now lists the allocation

    async def annotated(name: str):
        pod = await env.pod(name)
        return pod if pod and ANN_GPU in pod["metadata"]["annotations"] else None
    pod = await env.until(lambda: annotated("chat-online"), "the annotator on the online pod")
    assert pod["metadata"]["annotations"][ANN_GPU] == gpu and pod["metadata"]["annotations"][ANN_ROLE] == "online"

    # The kubelet refreshes the downward-API volume (atomic swap); the sidecar proceeds with the GPU.
    tmp = podinfo.with_suffix(".new")
    tmp.write_text(kubelet_file(pod["metadata"]["annotations"]))
    tmp.rename(podinfo)
    assert await asyncio.wait_for(sidecar, 10) == gpu

    offline = await env.until(lambda: env.pod("chat-offline"), "offline pod")
    assert await env.nodes.start(offline) == gpu
    env.kubelet_pods.assigned = env.nodes.pod_resources("gpu-a")
    pod = await env.until(lambda: annotated("chat-offline"), "the annotator on the offline pod")
    assert pod["metadata"]["annotations"][ANN_ROLE] == "offline"

    await env.until_phase("Running")  # Running can come before the second annotation is seen: wait for Paired

    async def paired():
        pair = await env.api.get_pair("chat", env.namespace)
        conds = {cd["type"]: cd for cd in (pair.get("status") or {}).get("conditions") or []}
        return pair if conds.get("Paired", {}).get("status") == "True" else None
    pair = await env.until(paired, "Paired=True")
    assert pair["status"]["phase"] == "Running" and pair["status"]["gpuUUID"] == gpu
    # Annotations do not count as a spec change: nothing is recreated.
    await env.resyncs()
    assert sorted(env.pod_creations()) == ["chat-offline", "chat-online"]


async def test_without_the_annotation_the_pair_waits_unpaired(env):
    env.add_node("gpu-a", 1)
    await env.start_operator()

    await env.api.create_pair(pair_body(), NS)
    online = await env.until(lambda: env.pod("chat-online"), "online pod")
    await env.nodes.start(online)
    # no GPU reported: the offline pod comes without a wish, after the operator's grace period
    offline = await env.until(lambda: env.pod("chat-offline"), "offline pod", timeout=30)
    assert "valve.io/want-gpu" not in offline["metadata"]["annotations"]
    await env.nodes.start(offline)  # PodResources lists nothing: no annotation

    async def not_reported():
        pair = await env.api.get_pair("chat", NS)
        conds = {cd["type"]: cd for cd in ((pair or {}).get("status") or {}).get("conditions") or []}
        return pair if conds.get("Paired", {}).get("reason") == "GPUNotReported" else None
    pair = await env.until(not_reported, "Paired=Unknown/GPUNotReported")
    assert not pair["status"].get("gpuUUID")
    for name in ("chat-online", "chat-offline"):
        assert ANN_GPU not in (await env.pod(name))["metadata"]["annotations"]
