"""The DRA driver against an API server (kmock): its ResourceSlice, the claims it reads, and exactly the RBAC it
needs; the DRA objects validated against the Kubernetes 1.34+ schemas."""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("kmock")
pytest_asyncio = pytest.importorskip("pytest_asyncio")

import kmock  # noqa: E402
from operator_harness import VERBS, ValveKube, permission  # noqa: E402

from valve.api import dra  # noqa: E402
from valve.api.colocation import RuntimeSettings  # noqa: E402
from valve.device_plugin.backend import GpuInfo, SimBackend  # noqa: E402
from valve.dra import rbac  # noqa: E402
from valve.dra.slices import SlicePublisher, publish_loop, resource_slice  # noqa: E402

pytestmark = [pytest.mark.timeout(60)]
AGENT = "valve-dra-driver"
K8S = ("1.34", "latest")  # resource.k8s.io/v1 is served from 1.34


def serve_dra(kube: ValveKube) -> None:
    kube.resources["resource.k8s.io/v1/resourceslices"] = kmock.ResourceInfo(
        namespaced=False, kind="ResourceSlice", verbs=VERBS)
    kube.resources["resource.k8s.io/v1/resourceclaims"] = kmock.ResourceInfo(
        namespaced=True, kind="ResourceClaim", verbs=VERBS, subresources={"status"})


def client(kube):
    from valve import kubeclient

    return kubeclient.load_api_client(str(kube.url).rstrip("/"), AGENT)


def driver_requests(kube) -> set:
    return {p for r in kube._requests if r.headers.get("User-Agent", "").startswith(AGENT)
            if (p := permission(r)) is not None}


def slices(kube) -> list[dict]:
    return kube.live("resource.k8s.io/v1/resourceslices")


def validate(obj: dict) -> None:
    import kubernetes_validate

    for v in K8S:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version() if v == "latest" else v, strict=True)


# ---- shapes ------------------------------------------------------------------------------------------------


def test_resource_slice_has_one_device_per_gpu_with_its_attributes_and_validates() -> None:
    pytest.importorskip("kubernetes_validate")
    gpus = [*SimBackend(2, node="n1", numa_nodes=2).discover(),
            GpuInfo(index=2, uuid="GPU-0a1b2c3d-0000-4000-8000-000000000002", name="NVIDIA H200",
                    memory_bytes=150_000_000_000, pci_bus_id="00000000:1A:00.0", numa_node=None)]
    body = resource_slice("n1", gpus, "580.159.04", generation=7)
    validate(body)
    spec = body["spec"]
    assert body["metadata"]["name"] == dra.slice_name("n1") and spec["driver"] == dra.DRIVER
    assert spec["nodeName"] == "n1" and spec["pool"] == {"name": "n1", "generation": 7, "resourceSliceCount": 1}
    assert [d["name"] for d in spec["devices"]] == [g.uuid.lower() for g in gpus]
    first, last = spec["devices"][0], spec["devices"][2]
    assert first["attributes"] == {"uuid": {"string": gpus[0].uuid}, "productName": {"string": gpus[0].name},
                                   "index": {"int": 0}, "pciBusID": {"string": gpus[0].pci_bus_id},
                                   "numaNode": {"int": 0}, "driverVersion": {"string": "580.159.04"}}
    assert "numaNode" not in last["attributes"]  # no NUMA affinity reported: no attribute
    assert last["capacity"]["memory"]["value"] == "150000000000"
    assert all(d["allowMultipleAllocations"] and d["capacity"][dra.TENANTS]["value"] == "2"
               for d in spec["devices"])
    assert dra.uuid_of(first["name"]) == gpus[0].uuid  # the device name is the UUID


def test_device_class_and_pair_claim_validate_and_the_config_is_the_crds_runtime_model() -> None:
    pytest.importorskip("kubernetes_validate")
    from valve.api.crds import spec_schema
    from valve.api.schema import structural_schema

    validate(dra.device_class())
    config = dra.claim_config("preload", RuntimeSettings(idle_hysteresis_ms=3))
    claim = dra.pair_claim("chat-gpu", "team", config)
    validate(claim)
    requests = claim["spec"]["devices"]["requests"]
    assert [r["name"] for r in requests] == ["online", "offline"]
    assert all(r["exactly"]["deviceClassName"] == dra.DEVICE_CLASS for r in requests)
    assert claim["spec"]["devices"]["constraints"] == [{"requests": ["online", "offline"],
                                                        "matchAttribute": dra.ATTR_UUID}]
    params = claim["spec"]["devices"]["config"][0]["opaque"]["parameters"]
    assert params["apiVersion"] == "valve.io/v1alpha1" and params["gate"] == "preload"
    assert params["runtime"]["idleHysteresisMs"] == 3
    assert dra.ClaimConfig.model_validate(params).runtime.idle_hysteresis_ms == 3
    # One model, one schema: the claim config's runtime is the ColocationPair's spec.runtime.
    assert structural_schema(dra.ClaimConfig)["properties"]["runtime"] == spec_schema()["properties"]["runtime"]


def test_allocation_reads_node_and_gpu_of_each_request() -> None:
    uuid = "GPU-5d0c7f3e-2a51-4b8e-9b51-6c2f0d7a9e10"
    claim = {"status": {"allocation": {
        "devices": {"results": [{"request": r, "driver": dra.DRIVER, "pool": "n1", "device": uuid.lower()}
                                for r in ("online", "offline")]},
        "nodeSelector": {"nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In",
                                                                 "values": ["n1"]}]}]}}}}
    got = dra.allocation(claim)
    assert got["node"] == "n1" and got["gpus"] == {"online": uuid, "offline": uuid}
    assert dra.allocation({"status": {}}) == {} and dra.allocation(None) == {}


# ---- against the API ---------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_publisher_creates_updates_and_deletes_its_slice_with_exactly_its_rbac() -> None:
    async with ValveKube() as kube, kmock.Server(kube):
        serve_dra(kube)
        publisher = SlicePublisher(client(kube))
        gpus = SimBackend(4, node="n1").discover()
        body = resource_slice("n1", gpus, "sim", generation=1)
        assert await asyncio.to_thread(publisher.publish, body) == "created"
        [stored] = slices(kube)
        assert [d["name"] for d in stored["spec"]["devices"]] == [dra.device_name(g.uuid) for g in gpus]

        smaller = resource_slice("n1", gpus[:2], "sim", generation=2)  # a driver restarted with fewer GPUs
        assert await asyncio.to_thread(publisher.publish, smaller) == "updated"
        [stored] = slices(kube)
        assert stored["spec"]["pool"]["generation"] == 2 and len(stored["spec"]["devices"]) == 2

        assert await asyncio.to_thread(publisher.publish, resource_slice("n1", [], "sim", 3)) == "deleted"
        assert slices(kube) == []
        assert await asyncio.to_thread(publisher.publish, resource_slice("n1", [], "sim", 4)) == "absent"

        # Claims, read as the driver reads them (valve.dra.driver.KubeClaims).
        from valve.dra.driver import KubeClaims

        claim = dra.pair_claim("chat-gpu", "team", dra.claim_config("hooks", RuntimeSettings()))
        kube.objects[kmock.resource("resource.k8s.io/v1/resourceclaims"), "team", "chat-gpu"] = claim
        claims = KubeClaims(client(kube))
        assert (await asyncio.to_thread(claims.get, "team", "chat-gpu"))["metadata"]["name"] == "chat-gpu"
        assert await asyncio.to_thread(claims.get, "team", "nope") is None

        granted = {(g, res, v) for rule in rbac.RULES for g in rule["apiGroups"] for res in rule["resources"]
                   for v in rule["verbs"]}
        assert driver_requests(kube) == granted  # every call allowed, every rule used


@pytest.mark.asyncio
async def test_publish_loop_retries_until_the_api_answers() -> None:
    async with ValveKube() as kube, kmock.Server(kube):
        serve_dra(kube)
        real = SlicePublisher(client(kube))

        class Flaky:
            """The API refuses until `up` is set (an API server not reachable yet, RBAC not bound yet)."""

            up, attempts = threading.Event(), 0

            def publish(self, body):
                self.attempts += 1
                if not self.up.is_set():
                    raise ConnectionError("connection refused")
                return real.publish(body)

        flaky = Flaky()
        body = resource_slice("n1", SimBackend(1, node="n1").discover(), "sim", generation=1)
        stop, published = threading.Event(), threading.Event()
        loop = threading.Thread(target=publish_loop, args=(flaky, body, stop, published),
                                kwargs={"retry_s": 0.02, "refresh_s": 60}, daemon=True)
        loop.start()
        try:
            await kube_until(lambda: flaky.attempts >= 3)  # it keeps trying
            assert not published.is_set() and slices(kube) == []
            flaky.up.set()
            assert await asyncio.to_thread(published.wait, 10)
            assert [s["metadata"]["name"] for s in slices(kube)] == [dra.slice_name("n1")]
        finally:
            stop.set()
            await asyncio.to_thread(loop.join, 5)
        assert not loop.is_alive()


async def kube_until(check, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
