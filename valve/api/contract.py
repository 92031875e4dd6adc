"""The names Valve's processes agree on, in one place: the contract between the device plugin, the operator, the
pods it creates (their engines and the proxy/arbiter sidecars) and the runtime.

Each constant says who writes it and who reads it. A leaf module (no imports), so every component may use it.
The Helm chart spells some of these in YAML; tests/test_contract.py checks the chart's values against them.
"""

from __future__ import annotations

# ---- Kubernetes: API group, extended resources, roles --------------------------------------------------------
GROUP = "valve.io"  # the ColocationPair CRD's API group (valve.api.colocation); prefix of every key below

# The device plugin advertises each GPU once under each name; the operator's pods request one of them.
ONLINE_RESOURCE = f"{GROUP}/online-gpu"
OFFLINE_RESOURCE = f"{GROUP}/offline-gpu"

# The two tenants of a GPU: values of ENV_ROLE, LABEL_ROLE and ANN_ROLE.
ONLINE = "online"
OFFLINE = "offline"
ROLES = (ONLINE, OFFLINE)

# ---- Pod labels and annotations ------------------------------------------------------------------------------
LABEL_PAIR = f"{GROUP}/pair"  # operator writes (the pair's name) and selects its pods by it; the chart's PodMonitor too
LABEL_NODE_ENABLED = f"{GROUP}/enabled"  # the admin sets "true" on a node; the chart's device-plugin nodeSelector
LABEL_ROLE = f"{GROUP}/role"  # operator writes (a role); operator reads
# operator's webhook writes on the online pods it injects, the operator on a policy's offline pods (the policy's name)
LABEL_POLICY = f"{GROUP}/policy"
ANN_GPU = f"{GROUP}/gpu-uuid"  # device plugin's annotator writes (UUIDs, comma-separated); operator and sidecars read
# device plugin's annotator writes, on a pod holding several GPUs, one annotation per GPU as well: ann_gpu_index(i)
# names the i-th UUID of ANN_GPU's list; the operator's sidecars take each as an env (one folder mount per GPU)
ANN_GPU_INDEX_PREFIX = f"{GROUP}/gpu-uuid-"
ANN_ROLE = f"{GROUP}/role"  # device plugin's annotator writes (roles, comma-separated); operator reads
ANN_NODE = f"{GROUP}/node"  # operator writes (the node it placed the pod on); operator reads
# operator writes on an offline pod (the GPU its online partner got); the device plugin's preferred allocation reads
ANN_WANT_GPU = f"{GROUP}/want-gpu"
ANN_ONLINE_POD = f"{GROUP}/online-pod"  # operator writes on a policy's offline pod (the online pod's uid); reads
ANN_HASH = f"{GROUP}/pod-spec-hash"  # operator writes (hash of the rendered pod); operator reads: a change recreates

# ---- Files on the node and in the pods -----------------------------------------------------------------------
# Host folder of the per-GPU runtime dirs <RUNTIME_DIR>/<gpu-uuid>: the device plugin creates each and mounts it
# into the GPU's containers, the operator mounts it into the sidecars; the runtime's default without ENV_RUNTIME_DIR.
RUNTIME_DIR = "/var/run/valve"
CONTROL_FILE = "control"  # <runtime dir>/<gpu-uuid>/control: the arbiter creates it, online and offline clients map it
PAIR_FILE = "pair"  # <runtime dir>/<gpu-uuid>/pair: the arbiter writes its pair's name (ENV_PAIR); `valve top` reads
# <runtime dir>/<gpu-uuid>/pids.json: the device plugin writes it with --pid-map (the GPU's compute processes: host
# pid, pid in its own namespace, pod UID), the arbiter's NVML enforcement reads it to find its tenant's host pid
PIDS_FILE = "pids.json"
PIDS_FORMAT_VERSION = 1  # its "version": the device plugin writes, the arbiter reads only this one
ONLINE_SLOTS_DIR = "online-slots"  # <runtime dir>/<gpu-uuid>/online-slots/<i>.lock: online clients flock, arbiter reaps
# libvalvegate.so (valve/preload) on the node, the image builds it into the same path: the operator mounts it
# (hostPath) into the offline container of a pair with spec.offline.gate "preload" and names it in LD_PRELOAD.
PRELOAD_LIBRARY = "/opt/valve/lib/libvalvegate.so"
PODINFO_DIR = "/etc/valve/podinfo"  # operator mounts the pod's downward-API annotations volume here
PODINFO_FILE = f"{PODINFO_DIR}/annotations"  # kubelet writes (key="value" lines); sidecars read it (--gpu-from)
# In a sidecar: the host folder of its own GPU only (<RUNTIME_DIR>/<gpu-uuid>, a hostPath subPathExpr mount), and
# the folder the operator's init container fills with one link <gpu-uuid> -> SIDECAR_GPU_DIR (an emptyDir mounted
# at the runtime dir), so the runtime finds <runtime dir>/<gpu-uuid>/control without seeing other GPUs' folders.
SIDECAR_GPU_DIR = "/var/run/valve-gpu"

# A sidecar of a pod holding several GPUs mounts the i-th GPU's folder at sidecar_gpu_dir(i) (and the init
# container links <gpu-uuid> -> there), instead of SIDECAR_GPU_DIR.

# Volume and container names the operator adds to a pair's pods; a pair's templates may not use them.
VOLUME_RUNTIME = "valve-runtime"  # hostPath RUNTIME_DIR, mounted only at the pod's own GPU folder
VOLUME_LINKS = "valve-links"  # emptyDir at the runtime dir in the sidecars: the link to SIDECAR_GPU_DIR
VOLUME_PODINFO = "valve-podinfo"  # downward API: the pod's annotations, updated live by the kubelet
VOLUME_PRELOAD = "valve-gate-lib"  # hostPath PRELOAD_LIBRARY
RESERVED_VOLUMES = (VOLUME_RUNTIME, VOLUME_LINKS, VOLUME_PODINFO, VOLUME_PRELOAD)
RESERVED_CONTAINERS = ("valve-proxy", "valve-arbiter", "valve-gpu-dir")

# ---- Environment variables -----------------------------------------------------------------------------------
ENV_GPU_UUID = "VALVE_GPU_UUID"  # device plugin's Allocate sets it; engines' Gate/online_request and sidecars read it
ENV_ROLE = "VALVE_ROLE"  # device plugin's Allocate and the operator (sidecars) set it; tells a container its role
ENV_RUNTIME_DIR = "VALVE_RUNTIME_DIR"  # device plugin's Allocate and the operator (sidecars) set it; runtime reads it
ENV_PAIR = "VALVE_PAIR"  # operator sets it on the arbiter sidecar (from the pod's pair label); the arbiter reads it
ENV_POD_UID = "VALVE_POD_UID"  # operator sets it on the arbiter sidecar (downward API metadata.uid); arbiter reads
ENV_RUNTIME_SPEC = "VALVE_RUNTIME_SPEC"  # operator sets it on the arbiter sidecar (RuntimeSpec JSON); the arbiter reads it
ENV_GATE_CONTROL = "VALVE_GATE_CONTROL"  # people/benchmarks set it; libvalvegate reads it (else the two above)
ENV_GATE_QUEUE_AHEAD = "VALVE_GATE_QUEUE_AHEAD"  # people set it (N or "published"); libvalvegate bounds launches
# Kubernetes' own name for an indexed Job pod's index (env and annotation); the operator sets both on a policy's
# offline pods, a checkpointed runner reads the env to resume its index's work.
ENV_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"
ANN_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
ENV_IMAGE = "VALVE_IMAGE"  # the chart sets it on the operator; the operator reads it (its sidecars' image)
ENV_METRICS_ADDR = "VALVE_METRICS_ADDR"  # the chart and the operator (sidecars) set it, to the pod IP by default;
# every component's --metrics-addr reads it (the operator's --health-addr too)

EVENT_COMPONENT = f"{GROUP}/operator"  # operator writes it as its Events' reportingComponent; people read it

# ---- Ports ---------------------------------------------------------------------------------------------------
METRICS_PORT_NAME = "valve-metrics"  # operator names the sidecars' /metrics container port so; the chart's PodMonitor reads

# ---- Kubelet (its names; the device plugin and the chart's host mounts follow them) ---------------------------
DEVICE_PLUGIN_DIR = "/var/lib/kubelet/device-plugins"  # kubelet's socket and the plugin's sockets
KUBELET_SOCKET = "kubelet.sock"  # in DEVICE_PLUGIN_DIR: kubelet serves Registration; the device plugin registers there
POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"  # kubelet serves PodResources; device plugin reads


def plugin_socket(resource: str) -> str:
    """The device plugin's socket for a resource in DEVICE_PLUGIN_DIR, which it registers with the kubelet:
    valve.io/online-gpu -> valve.io-online-gpu.sock."""
    return resource.replace("/", "-") + ".sock"


def ann_gpu_index(i: int) -> str:
    """The annotation with the i-th GPU of a pod holding several: valve.io/gpu-uuid-0, valve.io/gpu-uuid-1, ..."""
    return f"{ANN_GPU_INDEX_PREFIX}{i}"


def sidecar_gpu_dir(i: int, base: str = SIDECAR_GPU_DIR) -> str:
    """Where a sidecar of a pod holding several GPUs mounts the i-th one's folder: /var/run/valve-gpu-0, ...
    (``base``: the single-GPU folder, pod-init's --target)."""
    return f"{base}-{i}"
