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
    names = [d["metadata"]["name"] for d in yaml.safe_load_all(result.output)]
    assert names == ["colocationpairs.valve.io", "colocationpolicies.valve.io"]


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
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields") \
            or node.get("x-kubernetes-int-or-string"), node
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


# ---- the templates' real PodSpec schema and the CEL rules -----------------------------------------------------


@pytest.mark.parametrize("mutate, needle", [
    (lambda t: t["spec"]["containers"][0].update(resoruces={"limits": {"cpu": "1"}}), "resoruces"),
    (lambda t: t["spec"].update(restartPolicy=42), "42"),
    (lambda t: t["spec"]["containers"][0].update(ports=[{"containerPort": "http"}]), "http"),
    (lambda t: t["spec"].update(containers=[]), "non-empty"),
])
def test_crd_refuses_a_misspelt_or_mistyped_pod_template_field(mutate, needle):
    body = _example("colocationpair.yaml")
    assert list(crd_validator().iter_errors(body)) == []
    mutate(body["spec"]["online"]["template"])
    errors = list(crd_validator().iter_errors(body))
    assert errors and any(needle in e.message for e in errors), [e.message for e in errors]


def test_crd_keeps_quantities_and_int_or_string_ports():
    body = _example("colocationpair.yaml")
    ct = body["spec"]["online"]["template"]["spec"]["containers"][0]
    ct["resources"] = {"limits": {"cpu": 2, "memory": "4Gi"}}
    ct["readinessProbe"] = {"httpGet": {"path": "/health", "port": "http"}}
    assert list(crd_validator().iter_errors(body)) == []


def _rules(schema: dict) -> list[tuple[dict, dict]]:
    """(node, rule) for every CEL rule in the schema."""
    from valve.api.schema import iter_nodes

    return [(node, r) for node in iter_nodes(schema) for r in node.get("x-kubernetes-validations", [])]


def _cel(rule: str, value) -> bool:
    celpy = pytest.importorskip("celpy")
    env = celpy.Environment()
    program = env.program(env.compile(rule))
    return bool(program.evaluate({"self": celpy.json_to_cel(value)}))


def _spec_schema() -> dict:
    return crds.colocationpair_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _template_rules(part: str) -> list[str]:
    node = _spec_schema()["properties"]["online"]["properties"]["template"]["properties"][part]
    return [r["rule"] for r in node["x-kubernetes-validations"]]


POD = {"containers": [{"name": "server", "image": "vllm:1", "volumeMounts": [{"name": "data", "mountPath": "/d"}]}],
       "volumes": [{"name": "data", "emptyDir": {}}]}


@pytest.mark.parametrize("mutate", [
    lambda p: p["volumes"].append({"name": "valve-runtime", "emptyDir": {}}),
    lambda p: p["containers"][0]["volumeMounts"].append({"name": "valve-links", "mountPath": "/x"}),
    lambda p: p["containers"].append({"name": "valve-arbiter", "image": "x"}),
    lambda p: p.update(initContainers=[{"name": "i", "image": "i",
                                        "volumeMounts": [{"name": "valve-podinfo", "mountPath": "/p"}]}]),
    lambda p: p.update(initContainers=[{"name": "valve-gpu-dir", "image": "i"}]),
])
def test_cel_rules_refuse_valves_reserved_names_as_the_model_does(mutate):
    import copy

    from pydantic import ValidationError

    rules = _template_rules("spec")
    assert all(_cel(r, POD) for r in rules)
    pod = copy.deepcopy(POD)
    mutate(pod)
    assert not all(_cel(r, pod) for r in rules)
    with pytest.raises(ValidationError, match="reserved"):
        c.PodSpec.model_validate(pod)


@pytest.mark.parametrize("annotations, ok", [({}, True), ({"app": "x"}, True), ({"valve.io/gpu-uuid": "GPU-1"}, False),
                                             ({"example.com/valve.io": "x"}, True)])
def test_cel_rule_refuses_valve_annotations_in_templates(annotations, ok):
    (rule,) = _template_rules("metadata")
    assert _cel(rule, {"annotations": annotations}) is ok and _cel(rule, {}) is True


@pytest.mark.parametrize("proxy, ok", [
    ({}, True), ({"port": 8000}, False), ({"upstreamPort": 9000}, False), ({"port": 8000, "upstreamPort": 8000}, False),
    ({"port": 8000, "upstreamPort": 8000, "enabled": False}, True), ({"port": 9001, "upstreamPort": 8000}, True),
])
def test_cel_rule_refuses_a_proxy_forwarding_to_itself_as_the_model_does(proxy, ok):
    from pydantic import ValidationError

    (rule,) = [r["rule"] for r in _spec_schema()["properties"]["online"]["properties"]["proxy"]
               ["x-kubernetes-validations"]]
    assert _cel(rule, proxy) is ok
    if ok:
        c.ProxySidecar.model_validate(proxy)
    else:
        with pytest.raises(ValidationError, match="forward to itself"):
            c.ProxySidecar.model_validate(proxy)


def test_every_cel_rule_compiles_and_is_tested():
    celpy = pytest.importorskip("celpy")
    env = celpy.Environment()
    rules = [r["rule"] for _, r in _rules(_spec_schema())]
    for rule in rules:
        env.compile(rule)
    tested = set(_template_rules("spec")) | set(_template_rules("metadata")) | {
        r["rule"] for r in _spec_schema()["properties"]["online"]["properties"]["proxy"]["x-kubernetes-validations"]}
    key_bounds = {r for r in rules if r.startswith("self.all(k, size(k) <=")}  # test_label_keys_are_bounded_...
    assert set(rules) == tested | key_bounds


def test_the_pod_spec_schema_file_is_kubernetes_own_and_fresh():
    pytest.importorskip("kubernetes_validate")
    import podspec_schema

    from valve.api.podspec import SCHEMA_FILE

    assert SCHEMA_FILE.read_text() == podspec_schema.render(podspec_schema.build()), \
        "stale: run python scripts/podspec_schema.py, then valve crds generate"
