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


@pytest.mark.parametrize("mutate, where", [
    (lambda s: s["runtime"].setdefault("reserve", {}).update(minBytes=-1), "minBytes"),
    (lambda s: s["runtime"].update(evictionPolicy="lifo"), "evictionPolicy"),
    (lambda s: s["online"].pop("template"), "template"),
    (lambda s: s["offline"]["template"]["spec"].update(containers=[]), "containers"),
    (lambda s: s["online"]["proxy"].update(port=70000), "port"),
    (lambda s: s["runtime"].update(idleHysteresisMs=-1), "idleHysteresisMs"),
    (lambda s: s["offline"].update(gate="ptrace"), "gate"),
])
def test_schema_refuses_invalid_pairs(mutate, where):
    pytest.importorskip("jsonschema")
    body = _example("colocationpair.yaml")
    mutate(body["spec"])
    errors = list(crd_validator().iter_errors(body))
    assert errors and any(where in ".".join(map(str, e.absolute_path)) or where in e.message for e in errors)
