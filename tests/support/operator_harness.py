"""Test support: a kmock Kubernetes emulator with the API-server behaviour the operator relies on.

kmock's `KubernetesEmulator` stores objects and streams watch events. This adds, as a real API server does:
uids, resourceVersions, generations and timestamps on create; `generateName`; the status subresource
(status patches change only status, main patches never change status and bump `generation` when the spec
changes); delete preconditions; garbage collection of dependents through ownerReferences; the pod
`binding` subresource; and, optionally, validation of custom resources against their CRD schema.

Test support, not shipped: needs the dev extra (kmock, jsonschema). Tests import it through pytest's pythonpath.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp.web
import jsonschema
import kmock
import yaml

from valve.api import colocation as c
from valve.api import policy as pol
from valve.api.contract import (
    ANN_GPU,
    ANN_NODE,
    LABEL_ROLE,
    OFFLINE,
    OFFLINE_RESOURCE,
    ONLINE,
    ONLINE_RESOURCE,
)
from valve.api.crds import colocationpair_crd, colocationpolicy_crd
from valve.operator.pods import RESOURCE, pod_view


def openapi_to_jsonschema(schema: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """A Draft 4 JSON schema with the same meaning (for validating objects without an API server).

    OpenAPI v3.0's boolean `exclusiveMinimum` is Draft 4's; only `nullable` needs rewriting. `strict`: unknown
    fields are errors, as under fieldValidation=Strict (kubectl's default) rather than pruned.
    """
    out = copy.deepcopy(schema)
    stack = [out]
    while stack:
        node = stack.pop()
        if strict and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        stack.extend(node.get("properties", {}).values())
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                stack.append(node[key])
    return out


def crd_validator(crd: dict[str, Any] | None = None):
    """A jsonschema validator for objects of the CRD's (first) version."""
    crd = crd or colocationpair_crd()
    schema = openapi_to_jsonschema(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    return jsonschema.Draft4Validator(schema)


RESOURCES = {
    "v1/pods": dict(namespaced=True, kind="Pod", subresources={"status", "binding"}),
    "v1/nodes": dict(namespaced=False, kind="Node", subresources={"status"}),
    "v1/events": dict(namespaced=True, kind="Event"),
    # Discovery only: kopf waits for these to be served before it starts watching (it never lists them
    # while `settings.scanning.disabled` is set).
    "v1/namespaces": dict(namespaced=False, kind="Namespace"),
    "apiextensions.k8s.io/v1/customresourcedefinitions": dict(namespaced=False, kind="CustomResourceDefinition"),
    f"{c.API_VERSION}/{c.PLURAL}": dict(namespaced=True, kind=c.KIND, subresources={"status"}),
    f"{pol.API_VERSION}/{pol.PLURAL}": dict(namespaced=True, kind=pol.KIND, subresources={"status"}),
    "batch/v1/jobs": dict(namespaced=True, kind="Job", subresources={"status"}),
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _fast_membership() -> None:
    """kmock decides which reaction serves a request with `request in view`, which walks every request recorded
    so far (O(requests) per request, so O(N^2) over a run with thousands of pods). For the plain chains the
    emulator uses (root, priority, filter), membership of the request being served is the filters' criteria:
    answer that directly, else fall back to kmock's own walk."""
    from kmock._internal import dsl, rendering

    original = dsl.View.__contains__
    if getattr(original, "valve_fast", False):
        return

    def sees(view: Any, request: Any) -> bool | None:
        if isinstance(view, dsl.Root):
            return True
        if type(view) is dsl.Priority:
            return sees(view._source, request)
        if type(view) is dsl.Filter:
            up = sees(view._source, request)
            return None if up is None else up and bool(view.criteria(request))
        return None

    def contains(self: Any, item: Any) -> bool:
        if isinstance(item, rendering.Request):
            fast = sees(self, item)
            if fast is not None:
                return fast
        return original(self, item)

    contains.valve_fast = True  # type: ignore[attr-defined]
    dsl.View.__contains__ = contains  # type: ignore[method-assign]


_fast_membership()


def status_error(code: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=code, reason=reason, message=message, details={})


class ValveKube(kmock.KubernetesEmulator):
    """The emulator used by the operator's end-to-end tests."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for name, info in RESOURCES.items():
            self.resources[name] = kmock.ResourceInfo(verbs=VERBS, **info)
        self.validate_crs = True
        self._versions = itertools.count(1)
        self._validators = {c.PLURAL: crd_validator(), pol.PLURAL: crd_validator(colocationpolicy_crd())}
        self._live: dict[str, Any] = {}  # uid -> key of objects created through the API and not deleted
        self._owned: dict[str, set[Any]] = {}  # owner uid -> keys of its dependents
        self.refuse: dict[str, tuple[int, str]] = {}  # pod name -> (code, message): admission refuses its create

    def live(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        res = kmock.resource(resource)
        return [o.raw for (r, ns, _), o in self.objects.items()
                if r == res and not o.deleted and (namespace is None or ns == namespace)]

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        if res is not None and res.plural is not None:
            if request.method == "POST" and request.subresource == "binding":
                return await self._bind(request)
            if request.method == "PUT" and request.name is not None and request.subresource is None:
                return await self._replace(request)  # kmock serves no PUT
            if request.action == kmock.action.CREATE:
                self._on_create(request)
            elif request.action == kmock.action.UPDATE and isinstance(request.data, dict):
                self._on_patch(request)
            elif request.action == kmock.action.DELETE and request.name is not None:
                self._check_preconditions(request)
        gone = self._stored(request) if res is not None and request.name is not None else None
        response = await super()._handle(request)
        if response.status < 300 and (request.action == kmock.action.CREATE
                                      or (request.action == kmock.action.DELETE and request.name is not None)):
            # After a create too: an object created for an owner that is gone by then (the operator recreating
            # a pod from a stale view of a pair just deleted) is collected, as the garbage collector does.
            await self._collect_dependents(request, (gone or {}).get("metadata", {}).get("uid")
                                           if request.action == kmock.action.DELETE else None)
        return response

    def _KubernetesEmulator__get_objs(self, request: kmock.Request, strict: bool) -> list[Any]:
        """kmock finds the object a request names by walking every stored object (O(objects) per request, so
        O(N^2) over a run with thousands of pods): a named request is one dict lookup on the same key kmock
        stores it under; lists and watches (no name) still walk."""
        if request.name is not None and request.resource is not None and (strict or request.namespace is not None):
            obj = self.objects._objects.get((request.resource, request.namespace, request.name))
            return [] if obj is None else [obj]
        check = self._KubernetesEmulator__check
        return [o for (r, ns, n), o in self.objects.items() if check(request, r, ns, n, strict)]

    def _stored(self, request: kmock.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def _on_create(self, request: kmock.Request) -> None:
        data = request.data
        meta = data.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if request.resource.plural == "pods" and meta.get("name") in self.refuse:
            code, message = self.refuse[meta["name"]]
            raise status_error(code, "Forbidden" if code == 403 else "Invalid", message)
        if request.resource.group == c.GROUP and self.validate_crs:
            validator = self._validators[request.resource.plural]
            errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
            if errors:
                text = "; ".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
                raise status_error(422, "Invalid", f"{data.get('kind')}.{c.GROUP} {meta.get('name')!r} is invalid: "
                                   f"{text}")
        if request.namespace:
            meta["namespace"] = request.namespace
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = str(next(self._versions))
        meta["generation"] = 1
        meta["creationTimestamp"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if request.resource.group == c.GROUP:
            data.pop("status", None)  # the status subresource: status is not set on create
        elif request.resource.plural == "pods":
            data["status"] = {"phase": "Pending"}

    def _on_patch(self, request: kmock.Request) -> None:
        current = self._stored(request)
        if current is None:
            return  # kmock answers 404
        data = request.data
        uid = (data.get("metadata") or {}).get("uid")
        if uid and uid != current["metadata"].get("uid"):  # a uid in a patch is a precondition
            raise status_error(409, "Conflict", f"precondition failed: UID in object meta: {uid}, "
                               f"UID in stored object: {current['metadata'].get('uid')}")
        info = self.resources[request.resource]
        if "status" in info.subresources:
            if request.subresource == "status":
                for key in list(data):
                    if key != "status":
                        del data[key]
            else:
                data.pop("status", None)
                if "spec" in data and merge_patch(current.get("spec"), data["spec"]) != current.get("spec"):
                    data.setdefault("metadata", {})["generation"] = current["metadata"].get("generation", 1) + 1
        data.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))

    def _check_preconditions(self, request: kmock.Request) -> None:
        current = self._stored(request)
        wanted = ((request.data or {}).get("preconditions") or {}).get("uid") if isinstance(request.data, dict) else None
        if current is not None and wanted and current["metadata"].get("uid") != wanted:
            raise status_error(409, "Conflict", f"precondition failed: uid {wanted} does not match")

    async def _replace(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """PUT: replace the object (an unconditional update without metadata.resourceVersion); uid and
        creation time stay, status stays where it is a subresource, the generation moves with the spec."""
        current = self._stored(request)
        if current is None:
            raise status_error(404, "NotFound", f"{request.resource.plural} {request.name!r} not found")
        data = copy.deepcopy(request.data)
        meta = data.setdefault("metadata", {})
        wanted = meta.get("resourceVersion")
        if wanted and wanted != current["metadata"].get("resourceVersion"):
            raise status_error(409, "Conflict", f"the object has been modified (resourceVersion {wanted})")
        old = current["metadata"]
        meta.update(name=request.name, uid=old.get("uid"), creationTimestamp=old.get("creationTimestamp"),
                    resourceVersion=str(next(self._versions)),
                    generation=old.get("generation", 1) + (data.get("spec") != current.get("spec")))
        if request.namespace:
            meta["namespace"] = request.namespace
        if "status" in self.resources[request.resource].subresources:
            data.pop("status", None)
            if "status" in current:
                data["status"] = current["status"]
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            self.objects[key].create(data)  # a new version: the whole object, not a merge
            await self._buses[request.resource].put({"type": "MODIFIED", "object": self.objects[key].raw})
        return aiohttp.web.json_response(data, status=200)

    async def _bind(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        current = self._stored(request)
        if current is None:
            raise status_error(404, "NotFound", f"pods {request.name!r} not found")
        if current.get("spec", {}).get("nodeName"):
            raise status_error(409, "Conflict", f"pod {request.name} is already assigned to a node")
        node = request.data["target"]["name"]
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            self.objects[key].patch({"spec": {"nodeName": node},
                                     "metadata": {"resourceVersion": str(next(self._versions))}})
            await self._buses[request.resource].put({"type": "MODIFIED", "object": self.objects[key].raw})
        return aiohttp.web.json_response({"apiVersion": "v1", "kind": "Status", "status": "Success", "code": 201},
                                         status=201)

    async def _collect_dependents(self, request: kmock.Request, gone_uid: str | None) -> None:
        """Delete objects whose owners are gone (the garbage collector, in the foreground).

        Kept O(dependents) per request with a uid -> key map and an owner -> dependents map (a scan of every
        object per create made the emulator dominate at thousands of pods).
        """
        stack: list[str] = []
        if request.action == kmock.action.CREATE:
            meta = (request.data or {}).get("metadata") or {}
            key = (request.resource, request.namespace, meta.get("name"))
            uid = meta.get("uid")
            if uid:
                self._live[uid] = key
            owners = [ref.get("uid") for ref in meta.get("ownerReferences") or []]
            for owner in owners:
                self._owned.setdefault(owner, set()).add(key)
            if owners and not any(o in self._live for o in owners):
                async with self._lock:
                    o = self.objects[key] if key in self.objects else None
                    if o is not None and not o.deleted:
                        raw = o.raw
                        o.delete()
                        await self._buses[request.resource].put({"type": "DELETED", "object": raw})
                        stack.append(uid)
        elif gone_uid:
            stack.append(gone_uid)
        while stack:
            uid = stack.pop()
            self._live.pop(uid, None)
            for key in self._owned.pop(uid, set()):
                async with self._lock:
                    o = self.objects[key] if key in self.objects else None
                    if o is None or o.deleted:
                        continue
                    refs = o.raw.get("metadata", {}).get("ownerReferences") or []
                    if any(ref.get("uid") in self._live for ref in refs):
                        continue
                    raw = o.raw
                    o.delete()
                    await self._buses[key[0]].put({"type": "DELETED", "object": raw})
                stack.append(raw.get("metadata", {}).get("uid"))


# --- Test harness: API access, fake scheduler/kubelet/device plugin, request log ------------------

TEST_AGENT = "valve-test"
PAIRS_PATH = f"/apis/{c.API_VERSION}/namespaces/{{ns}}/{c.PLURAL}"


class Api:
    """Plain JSON requests through a kubernetes ApiClient (works against kmock and a real cluster)."""

    def __init__(self, api_client: Any) -> None:
        self.client = api_client
        self.host = api_client.configuration.host.rstrip("/")

    async def call(self, method: str, path: str, body: Any = None,
                   content_type: str = "application/json") -> tuple[int, Any]:
        from kubernetes.client.exceptions import ApiException

        cfg = self.client.configuration
        headers = {"Content-Type": content_type, "Accept": "application/json", "User-Agent": TEST_AGENT}
        auth = (cfg.api_key or {}).get("authorization")
        if auth:
            headers["Authorization"] = auth
        try:
            resp = await asyncio.to_thread(self.client.rest_client.request, method, self.host + path,
                                           headers=headers, body=body)
        except ApiException as e:
            return e.status, _json(e.body)
        data = resp.read() if hasattr(resp, "read") else resp.data
        return resp.status, _json(data)

    async def create_pair(self, pair: dict[str, Any], namespace: str = "default") -> tuple[int, Any]:
        return await self.call("POST", PAIRS_PATH.format(ns=namespace), pair)

    async def get_pair(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        code, body = await self.call("GET", PAIRS_PATH.format(ns=namespace) + f"/{name}")
        return body if code == 200 else None

    async def delete(self, path: str) -> int:
        return (await self.call("DELETE", path))[0]

    async def pods(self, namespace: str = "default", selector: str | None = None) -> list[dict[str, Any]]:
        from urllib.parse import quote

        query = f"?labelSelector={quote(selector)}" if selector else ""
        code, body = await self.call("GET", f"/api/v1/namespaces/{namespace}/pods{query}")
        return [p for p in (body or {}).get("items", []) if not p["metadata"].get("deletionTimestamp")] \
            if code == 200 else []

    async def patch(self, path: str, patch: dict[str, Any]) -> int:
        return (await self.call("PATCH", path, patch, "application/merge-patch+json"))[0]


def _json(data: Any) -> Any:
    if data in (None, b"", ""):
        return None
    try:
        return json.loads(data)
    except (TypeError, ValueError):
        return data


def gpu_node(name: str, gpus: int, ready: bool = True, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A Node as the device plugin leaves it: `gpus` online and `gpus` offline slots."""
    alloc = {ONLINE_RESOURCE: str(gpus), OFFLINE_RESOURCE: str(gpus), "cpu": "32", "memory": "256Gi"}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "spec": {},
        "status": {"allocatable": alloc, "capacity": dict(alloc),
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


class FakeNodes:
    """The scheduler, kubelets and Valve device plugins of fake GPU nodes, driven by the test.

    `bind(pod)` is the scheduler: it binds a pending pod to the node the operator pinned it to; the pod then
    waits for its kubelet. `start(pod)` is that kubelet admitting it (binding it first if needed): it picks
    the pod's GPU with the device plugin's own rule (`preferred_allocation`) from what the plugin can know,
    which is not the pod being admitted: the GPU wishes (`valve.io/want-gpu`) of all the node's bound pods
    not started yet (`pending_wishes`) and the taken slots. It writes the `valve.io/gpu-uuid` and
    `valve.io/role` annotations as the plugin's annotator does (unless `annotate` is False: then a real
    `valve.device_plugin.annotate.Annotator` fed by `pod_resources()` must) and marks it Running and Ready.
    """

    def __init__(self, api: Api, gpus: dict[str, int], annotate: bool = True) -> None:
        self.api = api
        self.gpus = {node: [f"GPU-{node}-{i}" for i in range(n)] for node, n in gpus.items()}
        self.taken: dict[tuple[str, str], str] = {}  # (gpu, role) -> pod uid
        self.force_gpu: dict[str, str] = {}  # pod name -> GPU, to emulate a divergent allocation
        self.annotate = annotate
        self.placed: dict[str, tuple[str, str, str, str, str]] = {}  # uid -> (node, namespace, name, role, gpu)
        self.bound: dict[str, dict[str, dict[str, Any]]] = {}  # node -> uid -> pod bound, not started

    def pick(self, node: str, role: str, count: int = 1) -> list[str]:
        from valve.device_plugin.allocation import pending_wishes, preferred_allocation

        gpus = self.gpus[node]
        free = [g for g in gpus if (g, role) not in self.taken]
        if len(free) < count:
            raise RuntimeError(f"no {count} {role} slot(s) left on {node}")
        taken = {r: {g for g in gpus if (g, r) in self.taken} for r in (ONLINE, OFFLINE)}
        wanted = pending_wishes(self.bound.get(node, {}).values(), RESOURCE[role])
        return preferred_allocation(role, free, [], count, taken, gpus, wanted)

    async def bind(self, pod: dict[str, Any], node: str | None = None) -> None:
        """`node`: for a pod the operator did not pin (a workload's own pod, which its scheduler places)."""
        meta = pod["metadata"]
        node = node or meta["annotations"][ANN_NODE]
        if meta["uid"] in self.bound.get(node, {}):
            return
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"]},
                   "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
        await self.api.call("POST", path + "/binding", binding)
        self.bound.setdefault(node, {})[meta["uid"]] = pod

    async def start(self, pod: dict[str, Any], ready: bool = True, node: str | None = None,
                    role: str | None = None) -> str:
        meta = pod["metadata"]
        node = node or meta["annotations"][ANN_NODE]
        role = role or meta["labels"][LABEL_ROLE]
        await self.bind(pod, node)
        view = pod_view(pod)  # a pod asking for several GPUs (tensor parallel) gets that many
        count = max(1, view.online if role == ONLINE else view.offline)
        picked = [self.force_gpu[meta["name"]]] if meta["name"] in self.force_gpu else self.pick(node, role, count)
        gpu = ",".join(sorted(picked))  # as the annotator lists them; start() returns it
        self.bound[node].pop(meta["uid"], None)
        for one in picked:
            self.taken[(one, role)] = meta["uid"]
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        self.placed[meta["uid"]] = (node, meta["namespace"], meta["name"], role, gpu)
        if self.annotate:
            from valve.device_plugin.annotate import PodDevices, annotation_patch

            wanted = PodDevices(meta["namespace"], meta["name"], tuple(sorted(picked)), (role,)).annotations()
            assert wanted[ANN_GPU] == gpu
            patch = annotation_patch(meta.get("annotations"), wanted, meta["uid"])
            if patch is not None:
                await self.api.patch(path, patch)
        await self.api.patch(path + "/status", {"status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        }})
        return gpu

    def release(self, uid: str) -> None:
        placed = self.placed.pop(uid, None)
        if placed is not None:
            for gpu in placed[4].split(","):
                self.taken.pop((gpu, placed[3]), None)
        for pods in self.bound.values():
            pods.pop(uid, None)

    def pod_resources(self, node: str) -> list[tuple[str, list[str], str, str]]:
        """What the node's kubelet PodResources API lists: (resource, device IDs, namespace, name) per pod,
        the shape `valve.device_plugin.fake_kubelet.FakePodResources.assigned` takes."""
        return [(RESOURCE[role], gpu.split(","), ns, name)
                for n, ns, name, role, gpu in self.placed.values() if n == node]


def write_kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig for `server` (the emulator's URL, no credentials), for a `valve operator` run as a process."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "k",
        "clusters": [{"name": "k", "cluster": {"server": server.rstrip("/")}}], "users": [{"name": "u", "user": {}}],
        "contexts": [{"name": "k", "context": {"cluster": "k", "user": "u"}}]}))
    return path


def operator_requests(kube: kmock.KubernetesEmulator) -> list[kmock.Request]:
    """Requests the operator made (kopf's and its own client's), not the test's."""
    out = []
    for req in kube._requests:
        agent = req.headers.get("User-Agent", "")
        if agent.startswith(("kopf/", "valve-operator/")):
            out.append(req)
    return out


def permission(req: kmock.Request) -> tuple[str, str, str] | None:
    """(apiGroup, resource[/subresource], verb) of a resource request; None for discovery."""
    from valve.operator.rbac import request_verb

    if req.resource is None or req.resource.plural is None:
        return None
    resource = req.resource.plural + (f"/{req.subresource}" if req.subresource else "")
    return req.resource.group or "", resource, request_verb(str(req.method.value), req.name, dict(req.params))


def pair_body(name: str = "chat", namespace: str = "default", **spec_extra: Any) -> dict[str, Any]:
    """A small valid ColocationPair for tests."""
    spec: dict[str, Any] = {
        "online": {"template": {"metadata": {"labels": {"app": "chat"}},
                                "spec": {"containers": [{"name": "server", "image": "vllm:1",
                                                         "ports": [{"containerPort": 8000}]}]}}},
        "offline": {"template": {"spec": {"containers": [{"name": "batch", "image": "batch:1"}],
                                          "volumes": [{"name": "data", "emptyDir": {}}]}}},
        "runtime": {"idleHysteresisMs": 7, "evictionPolicy": "fifo", "reserve": {"minBytes": 1024}},
    }
    spec.update(spec_extra)
    return {"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": name, "namespace": namespace},
            "spec": spec}


class Harness:
    """An API server (the emulator, or a real cluster when `kube` is None), the operator in a thread, polling.

    The operator runs in a thread with its own event loop: kopf cancels every task of its loop when it exits.
    """

    def __init__(self, kube: ValveKube | None, namespace: str = "default", api_client: Any = None) -> None:
        from valve.operator.kube import load_api_client

        self.kube = kube
        self.namespace = namespace
        self.client_factory = (lambda: load_api_client(str(kube.url).rstrip("/"))) if kube is not None \
            else (lambda: api_client or load_api_client())
        self.api = Api(self.client_factory())
        self.nodes = FakeNodes(self.api, {})
        self.thread: Any = None
        self.stop: Any = None

    @property
    def pods_path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods"

    def add_node(self, name: str, gpus: int, **kw: Any) -> None:
        assert self.kube is not None, "fake nodes exist only in the emulator"
        self.kube.objects[kmock.resource("v1/nodes"), None, name] = gpu_node(name, gpus, **kw)
        self.nodes.gpus[name] = [f"GPU-{name}-{i}" for i in range(gpus)]

    async def start_operator(self, **kw: Any) -> None:
        import threading

        from valve.operator.main import run_operator
        from valve.operator.pods import OperatorConfig

        self.stop, ready = threading.Event(), threading.Event()
        kw.setdefault("resync_seconds", 0.3)
        kw.setdefault("cfg", OperatorConfig(sidecar_image="valve:t"))
        if self.kube is None:
            kw.setdefault("namespaces", [self.namespace])
        main = run_operator(api_client=self.client_factory(), stop_flag=self.stop, ready_flag=ready, **kw)

        async def in_named_threads() -> None:
            # The operator's blocking client calls run in threads named valve-op-*: its CPU can be told apart.
            from concurrent.futures import ThreadPoolExecutor

            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(thread_name_prefix="valve-op"))
            await main
        self.thread = threading.Thread(target=asyncio.run, args=(in_named_threads(),), name="valve-operator",
                                       daemon=True)
        self.thread.start()
        if not await asyncio.to_thread(ready.wait, 20):
            raise AssertionError("the operator did not start within 20 s")

    async def stop_operator(self) -> None:
        if self.thread is not None:
            self.stop.set()
            await asyncio.to_thread(self.thread.join, 20)
            alive, self.thread = self.thread.is_alive(), None
            if alive:
                raise AssertionError("the operator did not stop within 20 s")

    async def until(self, check: Any, what: str, timeout: float = 60.0) -> Any:
        """Poll the coroutine function `check` until it returns something truthy."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            got = await check()
            if got:
                return got
            if loop.time() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            await asyncio.sleep(0.05)

    async def resyncs(self, count: int = 3) -> None:
        """Until the operator has completed `count` more resync passes over every pair: after them, whatever
        the operator would still do on its own has been done (a check that nothing more happens)."""
        from prometheus_client import REGISTRY

        def done() -> float:
            return REGISTRY.get_sample_value("valve_operator_resyncs_total") or 0.0

        target = done() + count

        async def check() -> bool:
            return done() >= target
        await self.until(check, f"{count} resync passes")

    async def pod(self, name: str) -> dict[str, Any] | None:
        return {p["metadata"]["name"]: p for p in await self.api.pods(self.namespace)}.get(name)

    async def phase(self, name: str = "chat") -> str | None:
        pair = await self.api.get_pair(name, self.namespace)
        return ((pair or {}).get("status") or {}).get("phase")

    async def until_phase(self, phase: str, name: str = "chat") -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            pair = await self.api.get_pair(name, self.namespace)
            return pair if ((pair or {}).get("status") or {}).get("phase") == phase else None
        return await self.until(check, f"phase {phase} of {name}")

    def pod_creations(self) -> list[str]:
        """Names in every pod-create request the operator sent (emulator only)."""
        return [r.data["metadata"]["name"] for r in operator_requests(self.kube)
                if r.method.value == "POST" and r.resource is not None and r.resource.plural == "pods"
                and r.subresource is None]

    def status_phases(self) -> list[str]:
        """Every phase the operator wrote, in order, consecutive repeats folded (emulator only)."""
        out: list[str] = []
        for r in operator_requests(self.kube):
            if r.subresource == "status" and r.method.value == "PATCH":
                phase = (r.data.get("status") or {}).get("phase")
                if phase and (not out or out[-1] != phase):
                    out.append(phase)
        return out

    def events(self) -> list[dict[str, Any]]:
        assert self.kube is not None
        return self.kube.live("v1/events", self.namespace)

    async def run_pair(self, name: str = "chat") -> tuple[dict[str, Any], dict[str, Any]]:
        """Create a pair and start both pods as the operator creates them; returns (online, offline)."""
        code, body = await self.api.create_pair(pair_body(name, self.namespace), self.namespace)
        assert code in (200, 201), body
        online = await self.until(lambda: self.pod(f"{name}-online"), "online pod")
        await self.nodes.start(online)
        offline = await self.until(lambda: self.pod(f"{name}-offline"), "offline pod")
        await self.nodes.start(offline)
        await self.until_phase("Running", name)
        return online, offline


@contextlib.asynccontextmanager
async def emulated() -> AsyncIterator[Harness]:
    """A Harness on a fresh emulator served by kmock; the operator is stopped on the way out."""
    async with ValveKube() as kube, kmock.Server(kube):
        harness = Harness(kube)
        try:
            yield harness
        finally:
            await harness.stop_operator()
