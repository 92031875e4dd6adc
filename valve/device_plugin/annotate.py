"""Write each pod's Valve GPU onto the pod, where the operator and the sidecars can read it.

`Allocate` sets `VALVE_GPU_UUID` only inside the container that requests the GPU; the API server never sees
it. So the plugin reads the kubelet PodResources API (List: namespace, name and device IDs of every pod on
this node) and patches, on every pod holding a Valve device, the annotations `valve.io/gpu-uuid` (the GPU
UUIDs, comma-separated; on a pod holding several, also `valve.io/gpu-uuid-<i>`, one per GPU, in the list's
order) and `valve.io/role` (online|offline) when they are missing or different. The
operator confirms the pair's GPU from them; the sidecars read them through a downward-API volume.

A pass runs every `interval_s` (catches plugin restarts and missed allocations) and, for `kick_window_s`
after each Allocate, every `fast_interval_s` re-checking every pod (a pod recreated under the same name
gets a new allocation). API errors are logged and retried on the next pass; they never stop the plugin.
API calls: get and patch on pods (valve/device_plugin/rbac.py).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from valve import __version__
from valve.api.contract import ANN_GPU, ANN_ROLE, ROLES, ann_gpu_index
from valve.device_plugin.allocation import PodResourcesUnavailable, list_pod_resources, pending_wishes
from valve.kubeclient import load_api_client

log = logging.getLogger(__name__)

USER_AGENT = f"valve-device-plugin/{__version__}"
MERGE_PATCH = "application/merge-patch+json"

Key = tuple[str, str]  # (namespace, name)


def annotate_by_default(flag: bool | None, environ: Mapping[str, str] | None = None) -> bool:
    """`--annotate/--no-annotate` when given, else on inside a cluster (KUBERNETES_SERVICE_HOST is set)."""
    if flag is not None:
        return flag
    environ = os.environ if environ is None else environ
    return bool(environ.get("KUBERNETES_SERVICE_HOST"))


@dataclass(frozen=True)
class PodDevices:
    """A pod holding Valve devices, from PodResources."""

    namespace: str
    name: str
    gpus: tuple[str, ...]
    roles: tuple[str, ...]

    @property
    def key(self) -> Key:
        return self.namespace, self.name

    def annotations(self) -> dict[str, str]:
        out = {ANN_GPU: ",".join(self.gpus), ANN_ROLE: ",".join(self.roles)}
        if len(self.gpus) > 1:  # one per GPU too, in the list's order: a sidecar mounts each GPU's folder by it
            out.update({ann_gpu_index(i): gpu for i, gpu in enumerate(self.gpus)})
        return out


def pods_with_devices(resp: Any, resources: Mapping[str, str]) -> list[PodDevices]:
    """The pods of a ListPodResourcesResponse that hold devices of `resources` (resource name -> role)."""
    out = []
    for pod in resp.pod_resources:
        gpus: set[str] = set()
        roles: set[str] = set()
        for container in pod.containers:
            for dev in container.devices:
                role = resources.get(dev.resource_name)
                if role:
                    roles.add(role)
                    gpus.update(dev.device_ids)
        if gpus:
            out.append(PodDevices(pod.namespace, pod.name, tuple(sorted(gpus)),
                                  tuple(r for r in ROLES if r in roles)))
    return out


def annotation_patch(current: Mapping[str, str] | None, wanted: Mapping[str, str],
                     uid: str | None = None) -> dict[str, Any] | None:
    """The merge patch that sets `wanted` over `current`; None when nothing differs.

    With `uid`, the API server refuses the patch (409) if the pod was replaced since it was read.
    """
    current = current or {}
    diff = {k: v for k, v in wanted.items() if current.get(k) != v}
    if not diff:
        return None
    meta: dict[str, Any] = {"annotations": diff}
    if uid:
        meta["uid"] = uid
    return {"metadata": meta}


@dataclass(frozen=True)
class PodInfo:
    uid: str
    node: str | None
    annotations: dict[str, str]


class PodClient:
    """get and patch on pods through the kubernetes client (in-cluster config, else KUBECONFIG, or `host`)."""

    def __init__(self, host: str | None = None, timeout_s: float = 5.0) -> None:
        self.host = host
        self.timeout_s = timeout_s  # per request: a hung API server must not stall the plugin's stop
        self._core: Any = None

    def _api(self) -> Any:
        if self._core is None:  # lazily, so a missing config is an error of one pass, retried
            from kubernetes import client

            self._core = client.CoreV1Api(load_api_client(self.host or None, USER_AGENT))
        return self._core

    def get(self, namespace: str, name: str) -> PodInfo | None:
        from kubernetes.client.exceptions import ApiException

        try:
            resp = self._api().read_namespaced_pod(name, namespace, _preload_content=False,
                                                   _request_timeout=self.timeout_s)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        pod = json.loads(resp.data)
        meta = pod.get("metadata") or {}
        return PodInfo(uid=meta.get("uid", ""), node=(pod.get("spec") or {}).get("nodeName"),
                       annotations=dict(meta.get("annotations") or {}))

    def list_node(self, node: str) -> list[dict[str, Any]]:
        """The pods bound to `node` (for the pending pods' GPU wishes)."""
        resp = self._api().list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}",
                                                       _preload_content=False, _request_timeout=self.timeout_s)
        items = json.loads(resp.data).get("items") or []
        return [p for p in items if (p.get("spec") or {}).get("nodeName") == node]

    def node_capacity(self, node: str) -> dict[str, str]:
        """The Node's status.capacity (resource name -> quantity); ApiException if it cannot be read."""
        resp = self._api().read_node(node, _preload_content=False, _request_timeout=self.timeout_s)
        return dict((json.loads(resp.data).get("status") or {}).get("capacity") or {})

    def patch(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        self._api().patch_namespaced_pod(name, namespace, body, _content_type=MERGE_PATCH,
                                         _preload_content=False, _request_timeout=self.timeout_s)


def wishes_from_api(pods: Any, node: str, socket: Path, resources: Mapping[str, str]) -> Any:
    """resource -> GPUs the node's pending pods ask for: pods from the API, minus those PodResources lists."""
    def wishes(resource: str) -> list[str]:
        allocated = {p.key for p in pods_with_devices(list_pod_resources(socket, timeout=2.0), resources)}
        return pending_wishes(pods.list_node(node), resource, allocated)

    return wishes


@dataclass
class SyncResult:
    pods: list[Key] = field(default_factory=list)  # pods holding Valve devices
    patched: list[Key] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Annotator:
    def __init__(
        self,
        socket: Path,
        resources: Mapping[str, str],
        pods: Any,
        node_name: str | None = None,
        interval_s: float = 2.0,
        fast_interval_s: float = 0.5,
        kick_window_s: float = 5.0,
        recheck_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.socket = Path(socket)
        self.resources = dict(resources)  # resource name -> role
        self.pods = pods  # PodClient or a fake with get/patch
        self.node_name = node_name
        self.interval_s = interval_s
        self.fast_interval_s = fast_interval_s
        self.kick_window_s = kick_window_s
        self.recheck_s = recheck_s
        self.clock = clock
        self._done: dict[Key, tuple[dict[str, str], float]] = {}  # annotations confirmed, and when
        self._kicked_at: float | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_problem = ""

    def kick(self) -> None:
        """An Allocate happened: check every pod now and often for a few seconds."""
        self._kicked_at = self.clock()
        self._wake.set()

    def busy(self) -> bool:
        return self._kicked_at is not None and self.clock() - self._kicked_at < self.kick_window_s

    def sync(self) -> SyncResult:
        """One pass: annotate every pod on this node holding a Valve device where needed."""
        result = SyncResult()
        verify_all = self.busy()
        try:
            resp = list_pod_resources(self.socket, timeout=2.0)
        except PodResourcesUnavailable as e:
            self._problem(f"{e}; pods are not annotated until it answers")
            result.errors.append(str(e))
            return result
        pods = pods_with_devices(resp, self.resources)
        live = {p.key for p in pods}
        for key in [k for k in self._done if k not in live]:
            del self._done[key]
        for p in pods:
            result.pods.append(p.key)
            wanted = p.annotations()
            done = self._done.get(p.key)
            if not verify_all and done and done[0] == wanted and self.clock() - done[1] < self.recheck_s:
                continue
            try:
                self._apply(p, wanted, result)
            except Exception as e:  # noqa: BLE001 - any API failure: log, retry on the next pass
                msg = f"could not annotate pod {p.namespace}/{p.name}: {_short(e)}"
                self._problem(f"{msg}; retrying")
                result.errors.append(msg)
        if not result.errors:
            self._problem("")
        return result

    def _apply(self, p: PodDevices, wanted: dict[str, str], result: SyncResult) -> None:
        pod = self.pods.get(p.namespace, p.name)
        if pod is None:
            log.debug("pod %s/%s is not in the API server (yet)", p.namespace, p.name)
            return
        if self.node_name and pod.node and pod.node != self.node_name:
            log.warning("pod %s/%s runs on %s, not on this node %s: left alone", p.namespace, p.name, pod.node,
                        self.node_name)
            return
        patch = annotation_patch(pod.annotations, wanted, pod.uid)
        if patch is not None:
            self.pods.patch(p.namespace, p.name, patch)
            result.patched.append(p.key)
            log.info("annotated pod %s/%s: %s", p.namespace, p.name, patch["metadata"]["annotations"])
        self._done[p.key] = (wanted, self.clock())

    def _problem(self, text: str) -> None:
        """Log a problem when it changes (not every pass), and its end."""
        if text != self._last_problem:
            if text:
                log.warning("%s", text)
            elif self._last_problem:
                log.info("pod annotation works again")
            self._last_problem = text

    def run(self) -> None:
        """Passes until stop(); never raises."""
        where = f"node {self.node_name}" if self.node_name else "this node (NODE_NAME unset: node not checked)"
        log.info("annotating pods with Valve devices on %s from %s every %.1fs", where, self.socket,
                 self.interval_s)
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception:
                log.exception("pod annotation pass failed")
            self._wake.wait(self.fast_interval_s if self.busy() else self.interval_s)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


def _short(e: Exception) -> str:
    status, reason = getattr(e, "status", None), getattr(e, "reason", None)
    if status is not None:
        return f"HTTP {status} {reason or ''}".strip()
    return f"{type(e).__name__}: {e}"
