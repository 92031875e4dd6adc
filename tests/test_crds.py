"""The checked-in CRDs are what `valve crds generate` writes, and they are structural and complete."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from operator_harness import crd_validator
from typer.testing import CliRunner

from valve.api import colocation as c
from valve.api import crds
from valve.api.schema import iter_nodes
from valve.cli import app

ROOT = Path(__file__).resolve().parent.parent


def test_checked_in_crds_are_up_to_date(tmp_path):
    written = crds.generate(tmp_path)
    assert written, "no CRD generated"
    for path in written:
        checked_in = ROOT / "crds" / path.name
        assert checked_in.exists(), f"crds/{path.name} missing: run `valve crds generate`"
        assert checked_in.read_text() == path.read_text(), f"crds/{path.name} is stale: run `valve crds generate`"
    assert crds.stale(ROOT / "crds") == []


def test_check_flag_detects_a_stale_file(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["crds", "generate", "--out", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["crds", "generate", "--out", str(tmp_path), "--check"]).exit_code == 0
    (tmp_path / "colocationpairs.valve.io.yaml").write_text("# edited\n")
    result = runner.invoke(app, ["crds", "generate", "--out", str(tmp_path), "--check"])
    assert result.exit_code == 1 and "stale" in result.output


def test_show_prints_the_crd():
    result = CliRunner().invoke(app, ["crds", "show"])
    assert result.exit_code == 0
    assert yaml.safe_load(result.output)["metadata"]["name"] == "colocationpairs.valve.io"


def test_crd_names_columns_and_status_subresource():
    crd = crds.colocationpair_crd()
    spec = crd["spec"]
    assert spec["group"] == "valve.io" and spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["cpair"] and spec["names"]["kind"] == "ColocationPair"
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    cols = {col["name"]: col["jsonPath"] for col in version["additionalPrinterColumns"]}
    assert cols == {"Phase": ".status.phase", "Node": ".status.node", "GPU": ".status.gpuUUID",
                    "Age": ".metadata.creationTimestamp"}


def test_schema_is_structural():
    schema = crds.colocationpair_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for node in iter_nodes(schema["properties"]["spec"]):
        assert "$ref" not in node and "anyOf" not in node and "allOf" not in node
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), node
        assert not ("properties" in node and "additionalProperties" in node), node
    spec = schema["properties"]["spec"]
    assert set(spec["required"]) == {"online", "offline"}
    runtime = spec["properties"]["runtime"]["properties"]
    assert runtime["evictionPolicy"]["enum"] == ["selective", "fifo"]
    assert runtime["reserve"]["properties"]["minBytes"]["minimum"] == 0
    assert runtime["maxPreemptionsPerSecond"]["exclusiveMinimum"] is True
    phase = schema["properties"]["status"]["properties"]["phase"]
    assert set(phase["enum"]) >= {p.value for p in c.Phase}


def _example(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if d]
    return next(d for d in docs if d.get("kind") == c.KIND)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")
                                        if "ColocationPair" in p.read_text()))
def test_examples_are_valid(name):
    pytest.importorskip("jsonschema")
    body = _example(name)
    assert list(crd_validator().iter_errors(body)) == []
    c.ColocationPairSpec.model_validate(body["spec"])


# values past the bounds: (mutation, the field path pydantic reports, the CRD field name)
OUT_OF_RANGE_PATHS = [
    (lambda s: s["runtime"].setdefault("reserve", {}).update(minBytes=2**70), "runtime.reserve.minBytes"),
    (lambda s: s["runtime"].setdefault("reserve", {}).update(hysteresisBytes=2**64), "runtime.reserve.hysteresisBytes"),
    (lambda s: s["runtime"].setdefault("reclaim", {}).update(bytesPerSecond=2**60), "runtime.reclaim.bytesPerSecond"),
    (lambda s: s["runtime"].setdefault("reclaim", {}).update(requestsPerSecond=1e9),
     "runtime.reclaim.requestsPerSecond"),
    (lambda s: s["runtime"].update(heartbeatLeaseMs=0.001), "runtime.heartbeatLeaseMs"),
    (lambda s: s["runtime"].update(heartbeatLeaseMs=1e12), "runtime.heartbeatLeaseMs"),
    (lambda s: s["runtime"].update(maxPreemptionsPerSecond=1e9), "runtime.maxPreemptionsPerSecond"),
    (lambda s: s["runtime"].setdefault("reserve", {}).update(decaySeconds=1e9), "runtime.reserve.decaySeconds"),
    (lambda s: s["online"]["template"]["spec"]["containers"][0].update(image="r/" + "x" * 2000),
     "online.template.spec.containers.0.image"),
    (lambda s: s["offline"].update(arbiter={"image": "r/" + "x" * 2000}), "offline.arbiter.image"),
    (lambda s: s["online"]["template"].setdefault("metadata", {}).update(labels={"app": "x" * 64}),
     "online.template.metadata.labels.app"),
    (lambda s: s["online"]["template"].setdefault("metadata", {}).update(labels={"app": "-bad-"}),
     "online.template.metadata.labels.app"),
    (lambda s: s.update(nodeSelector={"k": "v" * 100}), "nodeSelector.k"),
]
OUT_OF_RANGE = OUT_OF_RANGE_PATHS  # the CRD validator reports the same path (under spec.)


@pytest.mark.parametrize("mutate, path", OUT_OF_RANGE_PATHS)
def test_model_refuses_out_of_range_values_with_the_field_path(mutate, path):
    from pydantic import ValidationError

    body = _example("colocationpair.yaml")
    c.ColocationPairSpec.model_validate(body["spec"])
    mutate(body["spec"])
    with pytest.raises(ValidationError) as e:
        c.ColocationPairSpec.model_validate(body["spec"])
    assert path in [".".join(map(str, err["loc"])) for err in e.value.errors()]


def test_label_keys_are_bounded_by_the_model_and_a_crd_rule():
    from pydantic import ValidationError

    body = _example("colocationpair.yaml")
    body["spec"]["nodeSelector"] = {"k" * 400: "v"}
    with pytest.raises(ValidationError, match="nodeSelector"):
        c.ColocationPairSpec.model_validate(body["spec"])
    spec = crds.colocationpair_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = spec["properties"]["nodeSelector"]["x-kubernetes-validations"]
    assert rules[0]["rule"] == "self.all(k, size(k) <= 317)"


@pytest.mark.parametrize("mutate, where", [
    (lambda s: s["runtime"].setdefault("reserve", {}).update(minBytes=-1), "minBytes"),
    (lambda s: s["runtime"].update(evictionPolicy="lifo"), "evictionPolicy"),
    (lambda s: s["online"].pop("template"), "template"),
    (lambda s: s["offline"]["template"]["spec"].update(containers=[]), "containers"),
    (lambda s: s["online"]["proxy"].update(port=70000), "port"),
    (lambda s: s["runtime"].update(idleHysteresisMs=-1), "idleHysteresisMs"),
    (lambda s: s["offline"].update(gate="ptrace"), "gate"),
] + OUT_OF_RANGE)
def test_schema_refuses_invalid_pairs(mutate, where):
    pytest.importorskip("jsonschema")
    body = _example("colocationpair.yaml")
    mutate(body["spec"])
    errors = list(crd_validator().iter_errors(body))
    assert errors and any(where in ".".join(map(str, e.absolute_path)) or where in e.message for e in errors)
