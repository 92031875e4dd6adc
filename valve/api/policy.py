"""The `ColocationPolicy` custom resource (valve.io/v1alpha1): colocate the workloads people already deploy.

A policy selects the online pods of any controller (a Deployment behind a Service, a StatefulSet, ...) by label in
its namespace; the operator's admission webhook gives each of them the proxy sidecar, and the operator runs one
offline pod on each GPU those pods hold, from a pod template or from an existing (suspended) Job's template.
The parts shared with `ColocationPair` (proxy, arbiter, gate mode, runtime settings, pod template) are its models.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from valve.api.colocation import (
    _CAMEL,
    ENFORCE_HELP,
    ArbiterSidecar,
    Condition,
    EnforceMode,
    Labels,
    LabelValue,
    PodTemplate,
    ProxySidecar,
    RuntimeSettings,
)
from valve.api.contract import ENV_COMPLETION_INDEX, GROUP

VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ColocationPolicy"
PLURAL = "colocationpolicies"
SINGULAR = "colocationpolicy"
SHORT_NAMES = ["cpol"]
CATEGORIES = ["valve"]
MAX_SLOTS = 512  # status.slots: one per harvested GPU, bounded for the object's size
NAME_MAX = 50  # the policy's name prefixes its offline pods' names (<name>-offline-<index>) and is a label value


class SelectorRequirement(BaseModel):
    """A metav1.LabelSelectorRequirement."""

    model_config = _CAMEL

    key: str = Field(min_length=1, max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[LabelValue] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _values_fit_operator(self) -> SelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs values")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self


class LabelSelector(BaseModel):
    """A metav1.LabelSelector; an empty one would select every pod of the namespace and is refused."""

    model_config = _CAMEL

    match_labels: Labels = Field(default_factory=dict)
    match_expressions: list[SelectorRequirement] = Field(default_factory=list, max_length=32)

    @model_validator(mode="after")
    def _not_empty(self) -> LabelSelector:
        if not self.match_labels and not self.match_expressions:
            raise ValueError("an empty selector would select every pod of the namespace")
        return self

    def matches(self, labels: dict[str, str]) -> bool:
        """Kubernetes' semantics: every matchLabels pair and every requirement hold."""
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            has = req.key in labels
            if req.operator == "In" and not (has and labels[req.key] in req.values):
                return False
            if req.operator == "NotIn" and has and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not has:
                return False
            if req.operator == "DoesNotExist" and has:
                return False
        return True


class OnlineSide(BaseModel):
    model_config = _CAMEL

    proxy: ProxySidecar = Field(default_factory=ProxySidecar)


class JobRef(BaseModel):
    model_config = _CAMEL

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
                      description="An existing Job in the policy's namespace, kept suspended: its pod template "
                      "(and completions, when Indexed) is what Valve runs on the harvested GPUs.")


class OfflineSide(BaseModel):
    """Exactly one of `template` and `jobRef`."""

    model_config = _CAMEL

    template: PodTemplate | None = Field(None, description="Pod template of the offline worker.")
    job_ref: JobRef | None = Field(None, description="Take the pod template from this Job instead.")
    completions: int | None = Field(
        None, ge=1, le=100_000,
        description=f"Indexes 0..completions-1 (env {ENV_COMPLETION_INDEX}); a succeeded index is never run again. "
        "Unset: the Job's completions (Indexed Job), else no bound.")
    arbiter: ArbiterSidecar = Field(default_factory=ArbiterSidecar)
    gate: Literal["hooks", "preload", "none"] = Field(
        "hooks", description="How the offline worker is gated (as in ColocationPair).")
    enforce: EnforceMode = Field("report", description=ENFORCE_HELP)

    @model_validator(mode="after")
    def _one_source(self) -> OfflineSide:
        if (self.template is None) == (self.job_ref is None):
            raise ValueError("set exactly one of template and jobRef")
        return self


class ColocationPolicySpec(BaseModel):
    model_config = _CAMEL

    selector: LabelSelector = Field(description="The online pods, in the policy's namespace.")
    online: OnlineSide = Field(default_factory=OnlineSide)
    offline: OfflineSide
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)


class PolicyConditionType(StrEnum):
    Matched = "Matched"  # the selector matches online pods
    OfflineWorkload = "OfflineWorkload"  # the offline template (or Job) is usable
    Harvesting = "Harvesting"  # every harvestable GPU has a running offline pod
    Ready = "Ready"  # summary: the three above are True


class PolicyCondition(Condition):
    """metav1.Condition, as the pair's, with the policy's condition types."""

    type: PolicyConditionType  # type: ignore[assignment]


class Slot(BaseModel):
    """One harvested GPU: the online pod holding it and the offline pod running next to it."""

    model_config = _CAMEL

    online_pod: str = Field(max_length=253)
    node: str | None = Field(None, max_length=253)
    gpu_uuid: str | None = Field(None, alias="gpuUUID", max_length=128)
    offline_pod: str | None = Field(None, max_length=253)
    index: int | None = Field(None, ge=0)
    offline_phase: str | None = Field(None, max_length=32)
    failures: int | None = Field(None, ge=1, description="Offline pods of this GPU that failed in a row (their "
                                 "recreation backs off).")
    retry_after: str | None = Field(None, max_length=64, json_schema_extra={"format": "date-time"},
                                    description="No offline pod is created for this GPU before this time.")
    failed_pod_uid: str | None = Field(None, alias="failedPodUID", max_length=64,
                                       description="The last failed offline pod counted (each failure counts once).")


class ColocationPolicyStatus(BaseModel):
    model_config = _CAMEL

    online_pods: int | None = Field(None, ge=0, description="Online pods the selector matches.")
    harvested_gpus: int | None = Field(None, alias="harvestedGPUs", ge=0,
                                        description="GPUs of matched, injected, running online pods.")
    offline_pods: int | None = Field(None, ge=0)
    offline_running: int | None = Field(None, ge=0)
    completed_indexes: list[int] = Field(default_factory=list, max_length=100_000,
                                         description="Indexes whose offline pod succeeded.")
    slots: list[Slot] = Field(default_factory=list, max_length=MAX_SLOTS)
    message: str | None = Field(None, max_length=32768)
    observed_generation: int | None = Field(None, ge=0)
    conditions: list[PolicyCondition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
