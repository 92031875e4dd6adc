"""The `ColocationPair` custom resource (valve.io/v1alpha1): pydantic models, source of the CRD schema.

Field names follow the Kubernetes API conventions (camelCase). `spec.runtime` is the shared
`valve.api.runtime.RuntimeSpec` seen through camelCase aliases; `runtime_spec()` converts it back.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from valve.api.contract import GROUP, OFFLINE_RESOURCE, ONLINE_RESOURCE, RESERVED_CONTAINERS, RESERVED_VOLUMES
from valve.api.runtime import NearOnlinePolicy, ReclaimLimits, ReservePolicy, RuntimeSpec

VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ColocationPair"
PLURAL = "colocationpairs"
SINGULAR = "colocationpair"
SHORT_NAMES = ["cpair"]
CATEGORIES = ["valve"]

_CAMEL = ConfigDict(
    extra="forbid",
    alias_generator=to_camel,
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
)
# Kubernetes' own limits: a label value is at most 63 characters of this form, a key a 253-character DNS prefix, a
# slash and a 63-character name; annotations together hold at most 256 KiB.
LabelKey = Annotated[str, Field(min_length=1, max_length=317)]
LabelValue = Annotated[str, Field(max_length=63, pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=64)]
Annotations = Annotated[dict[LabelKey, Annotated[str, Field(max_length=65536)]], Field(max_length=64)]
IMAGE_MAX = 1024

# Parts of a pod template are Kubernetes' own types: check what Valve relies on, keep the rest as is.
_OPEN = ConfigDict(extra="allow", alias_generator=to_camel, validate_by_name=True, validate_by_alias=True)



class Container(BaseModel):
    """A container of the pod template (only `name` and `image` are checked here)."""

    model_config = _OPEN

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    image: str = Field(min_length=1, max_length=IMAGE_MAX)


class PodSpec(BaseModel):
    """A Kubernetes PodSpec; at least one container."""

    model_config = _OPEN

    containers: list[Container] = Field(min_length=1)

    @model_validator(mode="after")
    def _no_reserved_names(self) -> PodSpec:
        """The operator adds volumes and containers of these names: a template naming one could reach the
        host's runtime folder (another GPU's control block) through them."""
        extra = self.model_extra or {}
        volumes = [v.get("name") for v in extra.get("volumes") or [] if isinstance(v, dict)]
        containers = [*self.containers, *(extra.get("initContainers") or [])]
        mounts = []
        for ct in containers:
            more = ct.model_extra if isinstance(ct, BaseModel) else ct
            mounts += [m.get("name") for m in (more or {}).get("volumeMounts") or [] if isinstance(m, dict)]
        names = [ct.name if isinstance(ct, BaseModel) else (ct or {}).get("name") for ct in containers]
        used = sorted({n for n in volumes + mounts if n in RESERVED_VOLUMES}
                      | {n for n in names if n in RESERVED_CONTAINERS})
        if used:
            raise ValueError(f"{', '.join(used)}: reserved for the containers and volumes Valve adds")
        return self


class TemplateMeta(BaseModel):
    model_config = _CAMEL

    labels: Labels = Field(default_factory=dict)
    annotations: Annotations = Field(default_factory=dict)

    @field_validator("annotations")
    @classmethod
    def _no_valve_annotations(cls, value: dict[str, str]) -> dict[str, str]:
        """valve.io/* annotations on a pod are written by the operator and the device plugin (the GPU one
        picks the sidecars' GPU folder): a template may not set them."""
        ours = sorted(k for k in value if k.startswith(f"{GROUP}/"))
        if ours:
            raise ValueError(f"{', '.join(ours)}: {GROUP}/ annotations are set by Valve, not by the template")
        return value


class PodTemplate(BaseModel):
    """A PodTemplateSpec: the pod the operator creates for a role (it adds the Valve parts)."""

    model_config = _CAMEL

    metadata: TemplateMeta = Field(default_factory=TemplateMeta)
    spec: PodSpec


class ProxySidecar(BaseModel):
    """The Valve proxy in front of the online server (`valve runtime proxy`)."""

    model_config = _CAMEL

    enabled: bool = Field(True, description="Add the proxy sidecar to the online pod.")
    image: str | None = Field(None, max_length=IMAGE_MAX,
                              description="Sidecar image; the operator's --sidecar-image when unset. Only an image "
                              "the operator allows (--allowed-sidecar-image).")
    port: int = Field(9000, ge=1, le=65535, description="Port the proxy listens on.")
    upstream_port: int = Field(8000, ge=1, le=65535, description="Port of the online server in the pod.")

    @model_validator(mode="after")
    def _ports_differ(self) -> ProxySidecar:
        if self.enabled and self.port == self.upstream_port:
            raise ValueError(f"port and upstreamPort are both {self.port}: the proxy would forward to itself")
        return self


class ArbiterSidecar(BaseModel):
    """The per-GPU arbiter next to the offline worker (`valve runtime arbiter`)."""

    model_config = _CAMEL

    image: str | None = Field(None, max_length=IMAGE_MAX,
                              description="Sidecar image; the operator's --sidecar-image when unset. Only an image "
                              "the operator allows (--allowed-sidecar-image).")


EnforceMode = Literal["off", "report", "pause"]  # the arbiter's --enforce (valve.runtime.arbiter.policy.ENFORCE_MODES)
ENFORCE_HELP = (
    "What the arbiter does when the offline process works while the gate is closed: off, report (a metric, a log "
    "line and the control block's violation count) or pause (also SIGSTOP until the gate opens; the offline pod "
    "then shares its process namespace and the arbiter sidecar runs as root with only the KILL capability, so the "
    "namespace needs PodSecurity baseline at least)."
)


class OnlineRole(BaseModel):
    model_config = _CAMEL

    template: PodTemplate = Field(description="Pod template of the latency-critical online server.")
    proxy: ProxySidecar = Field(default_factory=ProxySidecar)


class OfflineRole(BaseModel):
    model_config = _CAMEL

    template: PodTemplate = Field(description="Pod template of the offline batch worker.")
    arbiter: ArbiterSidecar = Field(default_factory=ArbiterSidecar)
    gate: Literal["hooks", "preload", "none"] = Field(
        "hooks",
        description="How the offline worker is gated: hooks (the engine calls Valve's Gate/attach itself), preload "
        "(libvalvegate.so in LD_PRELOAD gates every kernel launch of an unmodified engine; the library must be on "
        "the node) or none.",
    )
    enforce: EnforceMode = Field("report", description=ENFORCE_HELP)


class ReserveSettings(ReservePolicy):
    model_config = _CAMEL


class ReclaimSettings(ReclaimLimits):
    model_config = _CAMEL


class NearOnlineSettings(NearOnlinePolicy):
    model_config = _CAMEL


class RuntimeSettings(RuntimeSpec):
    """`spec.runtime`: the arbiter's settings (valve.api.runtime.RuntimeSpec in camelCase)."""

    model_config = _CAMEL

    reserve: ReserveSettings = Field(default_factory=ReserveSettings)
    reclaim: ReclaimSettings = Field(default_factory=ReclaimSettings)
    near_online: NearOnlineSettings = Field(default_factory=NearOnlineSettings)

    def runtime_spec(self) -> RuntimeSpec:
        return RuntimeSpec.model_validate(self.model_dump(by_alias=False))


class ColocationPairSpec(BaseModel):
    model_config = _CAMEL

    online: OnlineRole
    offline: OfflineRole
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    node_selector: Labels = Field(
        default_factory=dict, description="Only nodes with these labels are considered for placement."
    )
    placement: Literal["devicePlugin", "dra"] = Field(
        "devicePlugin",
        description=f"devicePlugin: the operator picks the node and the pods request Valve's extended resources "
        f"({ONLINE_RESOURCE}, {OFFLINE_RESOURCE}). dra: the operator creates one ResourceClaim (DeviceClass "
        f"gpu.{GROUP}, requests online and offline on one GPU) that both pods reference; the scheduler places "
        "them (Kubernetes 1.34+, the Valve DRA driver).",
    )


class Phase(StrEnum):
    Pending = "Pending"
    Placed = "Placed"
    Running = "Running"
    Degraded = "Degraded"
    Failed = "Failed"


class ConditionType(StrEnum):
    Placed = "Placed"
    OnlineReady = "OnlineReady"
    OfflineReady = "OfflineReady"
    Paired = "Paired"
    Ready = "Ready"  # summary: True exactly when the phase is Running (`kubectl wait --for=condition=Ready`)


class Condition(BaseModel):
    """A status condition in the Kubernetes convention (metav1.Condition)."""

    model_config = _CAMEL

    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    observed_generation: int | None = Field(None, ge=0)
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    reason: str = Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field("", max_length=32768)


class ColocationPairStatus(BaseModel):
    model_config = _CAMEL

    phase: Phase | None = None
    node: str | None = Field(None, max_length=253, description="Node both pods are bound to.")
    gpu_uuid: str | None = Field(None, alias="gpuUUID", max_length=128,
                                 description="GPU both pods share, once confirmed.")
    online_pod: str | None = Field(None, max_length=253)
    resource_claim: str | None = Field(None, max_length=253,
                                       description="placement dra: the ResourceClaim both pods share.")
    offline_pod: str | None = Field(None, max_length=253)
    message: str | None = Field(None, max_length=32768)
    observed_generation: int | None = Field(None, ge=0)
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )

