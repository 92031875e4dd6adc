"""The ColocationPair models: camelCase API, the runtime spec the sidecar gets, validation messages."""

from __future__ import annotations

import pytest
from operator_harness import pair_body
from pydantic import ValidationError

from valve.api import colocation as c
from valve.api.runtime import EvictionPolicy, RuntimeSpec


def test_runtime_settings_convert_to_the_runtime_spec():
    spec = c.ColocationPairSpec.model_validate(pair_body()["spec"])
    rt = spec.runtime.runtime_spec()
    assert isinstance(rt, RuntimeSpec)
    assert rt.idle_hysteresis_ms == 7 and rt.eviction_policy is EvictionPolicy.fifo and rt.reserve.min_bytes == 1024
    # untouched fields keep RuntimeSpec's defaults
    assert rt.max_preemptions_per_second == RuntimeSpec().max_preemptions_per_second
    assert rt.reclaim == RuntimeSpec().reclaim


def test_runtime_settings_cover_every_runtime_spec_field():
    assert set(c.RuntimeSettings.model_fields) == set(RuntimeSpec.model_fields)
    dumped = c.RuntimeSettings().model_dump(by_alias=True)
    assert "idleHysteresisMs" in dumped and "minBytes" in dumped["reserve"]


def test_defaults_of_roles():
    spec = c.ColocationPairSpec.model_validate(pair_body()["spec"])
    assert spec.online.proxy.enabled and spec.online.proxy.port == 9000 and spec.online.proxy.upstream_port == 8000
    assert spec.offline.arbiter.image is None and spec.node_selector == {}


def test_pod_template_keeps_unknown_kubernetes_fields():
    body = pair_body()
    body["spec"]["online"]["template"]["spec"]["tolerations"] = [{"key": "gpu", "operator": "Exists"}]
    spec = c.ColocationPairSpec.model_validate(body["spec"])
    dumped = spec.online.template.spec.model_dump(by_alias=True, exclude_unset=True)
    assert dumped["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert dumped["containers"][0]["ports"] == [{"containerPort": 8000}]


@pytest.mark.parametrize("mutate, loc", [
    (lambda s: s["runtime"]["reserve"].update(minBytes=-5), ("runtime", "reserve", "minBytes")),
    (lambda s: s["runtime"].update(evictionPolicy="random"), ("runtime", "evictionPolicy")),
    (lambda s: s["offline"].pop("template"), ("offline", "template")),
    (lambda s: s["online"]["template"]["spec"]["containers"][0].update(name="Bad_Name"),
     ("online", "template", "spec", "containers", 0, "name")),
    (lambda s: s["runtime"].update(unknownKnob=1), ("runtime", "unknownKnob")),
])
def test_invalid_specs_name_the_field(mutate, loc):
    body = pair_body()
    mutate(body["spec"])
    with pytest.raises(ValidationError) as info:
        c.ColocationPairSpec.model_validate(body["spec"])
    assert loc in [err["loc"] for err in info.value.errors()]


def test_status_serialises_in_camel_case():
    status = c.ColocationPairStatus(phase=c.Phase.Running, gpu_uuid="GPU-1", online_pod="p-online")
    out = status.model_dump(by_alias=True, exclude_none=True)
    assert out == {"phase": "Running", "gpuUUID": "GPU-1", "onlinePod": "p-online", "conditions": []}
