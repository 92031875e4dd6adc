"""The two pods of a pair: rendering (pure) and a small read-only view of observed pods."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from valve.api import colocation as c
from valve.api.contract import (
    ANN_COMPLETION_INDEX,
    ANN_GPU,
    ANN_HASH,
    ANN_NODE,
    ANN_ONLINE_POD,
    ANN_ROLE,
    ANN_WANT_GPU,
    ENV_COMPLETION_INDEX,
    ENV_GPU_UUID,
    ENV_METRICS_ADDR,
    ENV_PAIR,
    ENV_POD_UID,
    ENV_ROLE,
    ENV_RUNTIME_DIR,
    ENV_RUNTIME_SPEC,
    GROUP,
    LABEL_PAIR,
    LABEL_POLICY,
    LABEL_ROLE,
    METRICS_PORT_NAME,
    OFFLINE,
    OFFLINE_RESOURCE,
    ONLINE,
    ONLINE_RESOURCE,
    PODINFO_DIR,
    PODINFO_FILE,
    PRELOAD_LIBRARY,
    RUNTIME_DIR,
    SIDECAR_GPU_DIR,
    VOLUME_LINKS,
    VOLUME_PODINFO,
    VOLUME_PRELOAD,
    VOLUME_RUNTIME,
    ann_gpu_index,
    sidecar_gpu_dir,
)

RESOURCE = {ONLINE: ONLINE_RESOURCE, OFFLINE: OFFLINE_RESOURCE}

MANAGED_BY = "valve-operator"
LABEL_MANAGED = "app.kubernetes.io/managed-by"

RUNTIME_VOLUME = VOLUME_RUNTIME
PODINFO_VOLUME = VOLUME_PODINFO
PRELOAD_VOLUME = VOLUME_PRELOAD
LINKS_VOLUME = VOLUME_LINKS
INIT_CONTAINER = "valve-gpu-dir"
# The Valve image's USER (Dockerfile). Set on the sidecars explicitly: a pair's pod-level securityContext (or
# another sidecar image) must not make them root, and runAsNonRoot needs a numeric uid to check.
SIDECAR_UID = 65532
CLAIM_REF = "valve-gpu"  # placement dra: the pod's name for the pair's ResourceClaim


def claim_name(pair_name: str) -> str:
    """placement dra: the ResourceClaim of a pair (both pods reference it)."""
    return f"{pair_name}-gpu"


@dataclass(frozen=True)
class OperatorConfig:
    sidecar_image: str = "valve:0.1.0"
    runtime_dir: str = RUNTIME_DIR  # host folder with the per-GPU control blocks
    sidecar_cpu: str = "100m"
    sidecar_memory: str = "128Mi"
    metrics_port: int = 9400  # /metrics of the proxy and arbiter sidecars (port name `valve-metrics`)
    metrics_addr: str = ""  # their bind address; empty: the pod's IP (downward API), not every interface
    allowed_images: tuple[str, ...] = ()  # images a pair may name for its sidecars, besides sidecar_image
    # A policy's failed offline pod is recreated after base seconds, doubling per failure in a row up to cap (the
    # kubelet's CrashLoopBackOff: 10 s to 5 min); a failure 2 x cap after the last retry counts as the first again.
    offline_backoff_s: tuple[float, float] = (10.0, 300.0)

    def image_allowed(self, image: str | None) -> bool:
        return image is None or image == self.sidecar_image or image in self.allowed_images


def pod_name(pair_name: str, role: str) -> str:
    return f"{pair_name}-{role}"


def owner_reference(pair: dict[str, Any]) -> dict[str, Any]:
    meta = pair["metadata"]
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def render_pod(
    pair: dict[str, Any], spec: c.ColocationPairSpec, role: str, node: str, cfg: OperatorConfig,
    want_gpu: str | None = None,
) -> dict[str, Any]:
    """The pod for one role of a pair, pinned to `node`, with the Valve sidecar and device request.

    `want_gpu`: the GPU the device plugin should give it (the offline pod: its online partner's GPU).
    placement dra: no node (the scheduler places the pod by the pair's ResourceClaim) and no extended resource;
    the first container and the sidecar reference the claim's request named after the role, and the DRA
    driver's CDI spec gives them the GPU, VALVE_GPU_UUID, VALVE_ROLE, the GPU's runtime folder and (gate
    preload) LD_PRELOAD, so no init container, host folder or annotation volume is added.
    """
    role_spec = spec.online if role == ONLINE else spec.offline
    template = role_spec.template
    meta = pair["metadata"]
    dra = spec.placement == "dra"
    body_spec = template.spec.model_dump(by_alias=True, exclude_unset=True)
    body_spec = copy.deepcopy(body_spec)
    containers = body_spec["containers"]
    if dra:
        _claim_gpu(containers[0], role)
        body_spec.setdefault("resourceClaims", []).append({"name": CLAIM_REF,
                                                           "resourceClaimName": claim_name(meta["name"])})
    else:
        _request_gpu(containers[0], RESOURCE[role])
    if role == OFFLINE and spec.offline.gate == "preload" and not dra:
        _preload(containers[0], body_spec)

    if role == ONLINE:
        sidecar = proxy_sidecar(spec.online.proxy, cfg, dra)
    else:
        sidecar = arbiter_sidecar(spec.offline.arbiter.image, spec.runtime, cfg, dra, enforce=spec.offline.enforce)
    if sidecar is not None and dra:
        containers.append(sidecar)
        _claim_gpu(sidecar, role)
    elif sidecar is not None:
        add_sidecar(body_spec, sidecar, cfg)
    if role == OFFLINE:
        share_pids(body_spec, spec.offline.enforce)
    if dra:
        if spec.node_selector:
            body_spec["nodeSelector"] = {**body_spec.get("nodeSelector", {}), **spec.node_selector}
    else:
        body_spec["affinity"] = _pin_to(node, body_spec.get("affinity"))

    labels = {**template.metadata.labels, LABEL_MANAGED: MANAGED_BY, LABEL_PAIR: meta["name"], LABEL_ROLE: role}
    # the models refuse valve.io/* template annotations; dropped here too, as the sidecars trust these
    annotations = {k: v for k, v in template.metadata.annotations.items() if not k.startswith(f"{GROUP}/")}
    if node:
        annotations[ANN_NODE] = node
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(meta["name"], role),
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(pair)],
        },
        "spec": body_spec,
    }
    pod["metadata"]["annotations"][ANN_HASH] = spec_hash(pod)
    if want_gpu:
        pod["metadata"]["annotations"][ANN_WANT_GPU] = want_gpu
    return pod


def add_sidecar(body_spec: dict[str, Any], sidecar: dict[str, Any], cfg: OperatorConfig, gpus: int = 1) -> None:
    """A Valve sidecar in a pod spec (changed in place), with the init container that links its GPU's folder (each
    of its `gpus` GPUs' folders) and the three volumes it mounts (the host's runtime root, the links emptyDir, the
    downward-API annotations)."""
    body_spec["containers"].append(sidecar)
    body_spec.setdefault("initContainers", []).append(_pod_init(sidecar["image"], cfg, gpus))
    volumes = body_spec.setdefault("volumes", [])
    volumes.append({
        "name": RUNTIME_VOLUME,
        "hostPath": {"path": cfg.runtime_dir, "type": "DirectoryOrCreate"},
    })
    volumes.append({"name": LINKS_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
    volumes.append({
        "name": PODINFO_VOLUME,
        "downwardAPI": {"items": [{"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]},
    })


# Labels the API server puts on a Job's pod template: copied onto pods Valve owns, they would make the Job
# controller count them as its own.
JOB_LABELS = ("batch.kubernetes.io/controller-uid", "controller-uid", "batch.kubernetes.io/job-name", "job-name")


def policy_owner_reference(policy: dict[str, Any]) -> dict[str, Any]:
    from valve.api import policy as pol

    meta = policy["metadata"]
    return {"apiVersion": pol.API_VERSION, "kind": pol.KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def policy_pod_name(policy_name: str, index: int) -> str:
    return f"{policy_name}-offline-{index}"


def render_policy_offline_pod(
    policy: dict[str, Any], offline: Any, runtime: c.RuntimeSettings, template: c.PodTemplate, *, node: str,
    gpu: str, online_uid: str, index: int, cfg: OperatorConfig,
) -> dict[str, Any]:
    """The offline pod of a policy for one harvested GPU: the template (the policy's or its Job's) with the
    offline-gpu request, the arbiter sidecar and its volumes (as a pair's offline pod), pinned to the online
    pod's node and asking the device plugin for the online pod's GPU; its index in env and annotation."""
    meta = policy["metadata"]
    body_spec = copy.deepcopy(template.spec.model_dump(by_alias=True, exclude_unset=True))
    containers = body_spec["containers"]
    _request_gpu(containers[0], OFFLINE_RESOURCE)
    if offline.gate == "preload":
        _preload(containers[0], body_spec)
    for container in containers:
        env = [e for e in container.get("env") or [] if e.get("name") != ENV_COMPLETION_INDEX]
        container["env"] = [*env, {"name": ENV_COMPLETION_INDEX, "value": str(index)}]
    add_sidecar(body_spec, arbiter_sidecar(offline.arbiter.image, runtime, cfg, enforce=offline.enforce), cfg)
    share_pids(body_spec, offline.enforce)
    body_spec["affinity"] = _pin_to(node, body_spec.get("affinity"))
    labels = {k: v for k, v in template.metadata.labels.items() if k not in JOB_LABELS}
    labels.update({LABEL_MANAGED: MANAGED_BY, LABEL_PAIR: meta["name"], LABEL_POLICY: meta["name"],
                   LABEL_ROLE: OFFLINE})
    annotations = {k: v for k, v in template.metadata.annotations.items() if not k.startswith(f"{GROUP}/")}
    annotations.update({ANN_NODE: node, ANN_COMPLETION_INDEX: str(index)})
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": policy_pod_name(meta["name"], index), "namespace": meta["namespace"],
                     "labels": labels, "annotations": annotations,
                     "ownerReferences": [policy_owner_reference(policy)]},
        "spec": body_spec,
    }
    # the hash covers what the policy decides (template, sidecar, node, index), not which online pod it serves
    annotations[ANN_HASH] = spec_hash(pod)
    annotations[ANN_WANT_GPU] = gpu
    annotations[ANN_ONLINE_POD] = online_uid
    return pod


def inject_online(pod: dict[str, Any], policy_name: str, proxy: c.ProxySidecar, cfg: OperatorConfig,
                  gpus: int = 1) -> dict[str, Any]:
    """An online pod of a policy as the webhook admits it (a new dict): the proxy sidecar, its init container and
    volumes, exactly as a pair's online pod has them, and the policy's labels. Resources and node are the
    workload's own (its scheduler and the device plugin place it). `gpus` > 1 (tensor parallel): the proxy mounts
    each of the pod's GPU folders (and only those) and signals every GPU per request."""
    out = copy.deepcopy(pod)
    sidecar = proxy_sidecar(proxy, cfg, gpus=gpus)
    if sidecar is not None:
        add_sidecar(out.setdefault("spec", {}), sidecar, cfg, gpus)
    labels = out.setdefault("metadata", {}).setdefault("labels", {})
    labels.update({LABEL_POLICY: policy_name, LABEL_PAIR: policy_name})
    return out


def spec_hash(pod: dict[str, Any]) -> str:
    """Hash of what the operator controls in a pod (spec, labels, template annotations)."""
    meta = pod["metadata"]
    ann = {k: v for k, v in meta.get("annotations", {}).items() if k not in (ANN_HASH, ANN_GPU, ANN_ROLE, ANN_WANT_GPU)}
    text = json.dumps([pod["spec"], meta.get("labels", {}), ann], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def share_pids(body_spec: dict[str, Any], enforce: str) -> None:
    """enforce pause: one process namespace for the offline pod, so the pid the offline Gate publishes (its own
    namespace's) is the pid the arbiter sidecar signals. Only then: a shared namespace lets every container of
    the pod see the others' processes (and their environment, to the same uid)."""
    if enforce == "pause":
        body_spec["shareProcessNamespace"] = True


def _request_gpu(container: dict[str, Any], resource: str) -> None:
    res = container.setdefault("resources", {})
    for kind in ("requests", "limits"):
        res.setdefault(kind, {})[resource] = "1"


def _claim_gpu(container: dict[str, Any], role: str) -> None:
    container.setdefault("resources", {}).setdefault("claims", []).append({"name": CLAIM_REF, "request": role})


def _preload(container: dict[str, Any], body_spec: dict[str, Any]) -> None:
    """LD_PRELOAD libvalvegate.so from the node. Set here, not by the device plugin: Allocate is not told which
    pod (so which pair's gate mode) it serves. hostPath type File: a node without the library fails the pod's
    start with a clear event instead of running it ungated."""
    env = container.setdefault("env", [])
    old = next((e for e in env if e.get("name") == "LD_PRELOAD"), None)
    if old is None:
        env.append({"name": "LD_PRELOAD", "value": PRELOAD_LIBRARY})
    elif PRELOAD_LIBRARY not in old.get("value", ""):
        old["value"] = f"{PRELOAD_LIBRARY}:{old['value']}" if old.get("value") else PRELOAD_LIBRARY
    container.setdefault("volumeMounts", []).append(
        {"name": PRELOAD_VOLUME, "mountPath": PRELOAD_LIBRARY, "readOnly": True})
    body_spec.setdefault("volumes", []).append(
        {"name": PRELOAD_VOLUME, "hostPath": {"path": PRELOAD_LIBRARY, "type": "File"}})


def _pin_to(node: str, affinity: dict[str, Any] | None) -> dict[str, Any]:
    """Require the node by name (scheduler still checks resources, taints and the device count)."""
    affinity = copy.deepcopy(affinity or {})
    node_aff = affinity.setdefault("nodeAffinity", {})
    node_aff["requiredDuringSchedulingIgnoredDuringExecution"] = {
        "nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
        ]
    }
    return affinity


def _gpu_from(dra: bool) -> list[str]:
    return [] if dra else ["--gpu-from", PODINFO_FILE]


def _annotation_env(name: str, annotation: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{annotation}']"}}}


def _gpu_env(i: int) -> str:
    """The env a sidecar of a pod with several GPUs has the i-th GPU's UUID in (its folder's subPathExpr)."""
    return f"{ENV_GPU_UUID}_{i}"


def _sidecar_env(role: str, dra: bool = False, gpus: int = 1) -> list[dict[str, Any]]:
    if dra:
        return [{"name": ENV_ROLE, "value": role}]  # VALVE_GPU_UUID: from the CDI spec
    # The GPU from its annotation: a downward-API env is fixed at container start, which is after the init
    # container has waited for the annotation; it names the one GPU folder the sidecar mounts (subPathExpr).
    # Several GPUs: VALVE_GPU_UUID lists them all (the proxy signals each), one env per GPU names its folder.
    env = [{"name": ENV_ROLE, "value": role}, _annotation_env(ENV_GPU_UUID, ANN_GPU)]
    return env + ([_annotation_env(_gpu_env(i), ann_gpu_index(i)) for i in range(gpus)] if gpus > 1 else [])


def _security() -> dict[str, Any]:
    """Valve's containers in a pair's pods (the init container and the sidecars): non-root, no capabilities,
    RuntimeDefault seccomp, read-only root. Container-level only: the pair's own containers keep theirs. They need
    no more: the GPU folder is world-writable with the sticky bit (devicePlugin.runtimeDirMode), the link
    folder is an emptyDir, and the default ports (proxy 9000, metrics 9400) are above 1023 (a proxy port below 1024
    binds only where the container runtime sets net.ipv4.ip_unprivileged_port_start=0)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": SIDECAR_UID,
        "runAsGroup": SIDECAR_UID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pause_security() -> dict[str, Any]:
    """The arbiter of enforce pause: SIGSTOP/SIGCONT to the offline process, whatever its uid, needs CAP_KILL.
    A capability added to a non-root container is not effective (containerd and CRI-O put it in the bounding and
    inheritable sets only, not the ambient one: kubernetes/kubernetes#56374), so this one container runs as uid 0
    with KILL as its only capability: no DAC_OVERRIDE, FOWNER or CHOWN, so it reads and writes as any other
    tenant of the GPU folder does. PodSecurity baseline admits it; restricted refuses uid 0 and KILL."""
    return {**_security(), "runAsNonRoot": False, "runAsUser": 0, "runAsGroup": 0,
            "capabilities": {"drop": ["ALL"], "add": ["KILL"]}}


def _resources(cfg: OperatorConfig) -> dict[str, Any]:
    return {"requests": {"cpu": cfg.sidecar_cpu, "memory": cfg.sidecar_memory},
            "limits": {"memory": cfg.sidecar_memory}}


def _pod_init(image: str, cfg: OperatorConfig, gpus: int = 1) -> dict[str, Any]:
    """Waits for the GPU annotation, then links <runtime dir>/<uuid> to the sidecars' GPU folder (several GPUs:
    each <uuid_i> to the i-th folder, once the per-GPU annotations are there)."""
    return {
        "name": INIT_CONTAINER,
        "image": image,
        "command": ["valve"],
        "args": ["pod-init", "--gpu-from", PODINFO_FILE, "--links", cfg.runtime_dir, "--target", SIDECAR_GPU_DIR,
                 *(["--gpus", str(gpus)] if gpus > 1 else [])],
        "resources": _resources(cfg),
        "volumeMounts": [{"name": LINKS_VOLUME, "mountPath": cfg.runtime_dir},
                         {"name": PODINFO_VOLUME, "mountPath": PODINFO_DIR, "readOnly": True}],
        "securityContext": _security(),
    }


def _sidecar_base(name: str, image: str, cfg: OperatorConfig, dra: bool = False, gpus: int = 1) -> dict[str, Any]:
    if dra:  # the GPU, its folder and VALVE_GPU_UUID come from the claim's CDI spec
        return {"name": name, "image": image, "resources": _resources(cfg), "securityContext": _security()}
    # Only this pod's GPU folder of the host (not the whole runtime root), reached through the init container's
    # link at the runtime dir; several GPUs: each GPU's folder, and only those.
    gpu_dirs = [{"name": RUNTIME_VOLUME, "mountPath": SIDECAR_GPU_DIR, "subPathExpr": f"$({ENV_GPU_UUID})"}] \
        if gpus == 1 else [{"name": RUNTIME_VOLUME, "mountPath": sidecar_gpu_dir(i), "subPathExpr": f"$({_gpu_env(i)})"}
                           for i in range(gpus)]
    return {
        "name": name,
        "image": image,
        "resources": _resources(cfg),
        "volumeMounts": [*gpu_dirs,
                         {"name": LINKS_VOLUME, "mountPath": cfg.runtime_dir, "readOnly": True},
                         {"name": PODINFO_VOLUME, "mountPath": PODINFO_DIR, "readOnly": True}],
        "securityContext": _security(),
    }


def _metrics_port(cfg: OperatorConfig) -> dict[str, Any]:
    return {"name": METRICS_PORT_NAME, "containerPort": cfg.metrics_port}


def _metrics_addr(cfg: OperatorConfig) -> dict[str, Any]:
    """The sidecars' --metrics-addr, through its env: Prometheus scrapes the pod IP, so nothing else needs it."""
    if cfg.metrics_addr:
        return {"name": ENV_METRICS_ADDR, "value": cfg.metrics_addr}
    return {"name": ENV_METRICS_ADDR, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def proxy_sidecar(proxy: c.ProxySidecar, cfg: OperatorConfig, dra: bool = False,
                  gpus: int = 1) -> dict[str, Any] | None:
    """The proxy in front of the online server (None when the proxy is disabled); `gpus`: the pod's GPUs."""
    if not proxy.enabled:
        return None
    side = _sidecar_base("valve-proxy", proxy.image or cfg.sidecar_image, cfg, dra, gpus)
    side["args"] = ["runtime", "proxy", "--listen", f":{proxy.port}",
                    "--upstream", f"http://127.0.0.1:{proxy.upstream_port}", *_gpu_from(dra),
                    "--metrics-port", str(cfg.metrics_port)]
    side["command"] = ["valve"]
    side["env"] = [*_sidecar_env(ONLINE, dra, gpus), {"name": ENV_RUNTIME_DIR, "value": cfg.runtime_dir},
                   _metrics_addr(cfg)]
    side["ports"] = [{"name": "valve-proxy", "containerPort": proxy.port}, _metrics_port(cfg)]
    return side


def arbiter_sidecar(image: str | None, runtime: c.RuntimeSettings, cfg: OperatorConfig,
                    dra: bool = False, enforce: str = "report") -> dict[str, Any]:
    """The GPU's arbiter, next to the offline worker; ENV_PAIR comes from the pod's LABEL_PAIR. ``enforce``: the
    pair's `spec.offline.enforce` (pause also needs :func:`share_pids` on the pod)."""
    side = _sidecar_base("valve-arbiter", image or cfg.sidecar_image, cfg, dra)
    side["command"] = ["valve"]
    # The arbiter reads its RuntimeSpec from ENV_RUNTIME_SPEC.
    side["args"] = ["runtime", "arbiter", *_gpu_from(dra), "--metrics-port", str(cfg.metrics_port)]
    if enforce != "report":  # the arbiter's default: pods of pairs that leave it unset keep their spec hash
        side["args"] += ["--enforce", enforce]
    if enforce == "pause":
        side["securityContext"] = _pause_security()
    side["ports"] = [_metrics_port(cfg)]
    side["env"] = [
        *_sidecar_env(OFFLINE, dra),
        {"name": ENV_RUNTIME_DIR, "value": cfg.runtime_dir},
        _metrics_addr(cfg),
        {"name": ENV_RUNTIME_SPEC, "value": runtime.runtime_spec().model_dump_json()},
        # the pair's name, for `valve top` on the node (through the GPU folder)
        {"name": ENV_PAIR, "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{LABEL_PAIR}']"}}},
        # the pod's UID: NVML enforcement finds the tenant's host pid in the device plugin's pid map by it
        {"name": ENV_POD_UID, "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
    ]
    if dra:  # one source: the claim's configuration, which the DRA driver's CDI spec sets as this env
        side["env"] = [e for e in side["env"] if e["name"] != ENV_RUNTIME_SPEC]
    return side


@dataclass(frozen=True)
class PodView:
    """What the operator needs to know about an observed pod."""

    name: str
    uid: str
    role: str | None
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    ready: bool
    node: str | None  # spec.nodeName (bound) or None
    target: str | None  # node the operator pinned it to
    gpu: str | None
    deleting: bool
    hash: str | None
    online: int = 0  # ONLINE_RESOURCE requested
    offline: int = 0
    want: str | None = None  # the GPU the operator asked the device plugin for

    @property
    def admitting(self) -> bool:
        """Not started yet and not going away: its device allocation may still be to come."""
        return not self.started and not self.terminal and not self.deleting

    @property
    def terminal(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def started(self) -> bool:
        """Past admission: the kubelet has allocated its devices."""
        return self.phase in ("Running", "Succeeded")


def pod_view(pod: dict[str, Any]) -> PodView:
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {}) or {}
    status = pod.get("status", {}) or {}
    ann = meta.get("annotations") or {}
    ready = any(cond.get("type") == "Ready" and cond.get("status") == "True"
                for cond in status.get("conditions") or [])
    online = offline = 0
    for container in spec.get("containers") or []:
        res = container.get("resources") or {}
        amounts = {**(res.get("limits") or {}), **(res.get("requests") or {})}
        online += _count(amounts.get(ONLINE_RESOURCE))
        offline += _count(amounts.get(OFFLINE_RESOURCE))
    return PodView(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        role=(meta.get("labels") or {}).get(LABEL_ROLE),
        phase=status.get("phase") or "Pending",
        ready=ready,
        node=spec.get("nodeName"),
        target=ann.get(ANN_NODE),
        gpu=ann.get(ANN_GPU),
        deleting=bool(meta.get("deletionTimestamp")),
        hash=ann.get(ANN_HASH),
        online=online,
        offline=offline,
        want=ann.get(ANN_WANT_GPU),
    )


def _count(value: Any) -> int:
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError):
        return 0
