"""Render, lint and validate charts/valve offline; used by tests/test_chart*.py and runnable by hand.

    bash scripts/install-chart-tools.sh   # once: helm (3 and 4) into .tools/bin, Python validators
    python scripts/chartcheck.py          # lint + render (default and every-option values) + validate

Validation:
  * every rendered Kubernetes object against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
    unknown fields are errors) for the oldest and newest Kubernetes versions checked;
  * ServiceMonitor/PodMonitor against the Prometheus Operator's models (cloudcoil-models-prometheus-operator),
    unknown fields included;
  * custom resources (examples/*.yaml) against their CRD's own openAPIV3Schema.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
import typing
from collections.abc import Iterable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "valve"
ALL_ON_VALUES = CHART / "ci" / "all-on-values.yaml"
TOOLS_BIN = ROOT / ".tools" / "bin"
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.26", "latest")
# Objects that use Dynamic Resource Allocation (resource.k8s.io/v1, pods with resourceClaims): 1.34 made it GA.
DRA_K8S_VERSIONS = ("1.34", "latest")
MONITOR_APIS = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PodMonitor",
                "monitoring.coreos.com/v1/PrometheusRule")
MONITOR_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")
CERT_MANAGER_KINDS = ("Certificate", "Issuer")  # cert-manager.io/v1: the webhook's certificate (webhook.certManager)


# ---- helm ---------------------------------------------------------------------------------------------


def find_helms() -> list[Path]:
    """Helm binaries to test with: $VALVE_HELM, else .tools/bin/helm and .tools/bin/helm4, else helm on PATH."""
    if os.environ.get("VALVE_HELM"):
        return [Path(p) for p in os.environ["VALVE_HELM"].split(os.pathsep) if p]
    found = [TOOLS_BIN / n for n in ("helm", "helm4") if (TOOLS_BIN / n).is_file()]
    if not found and shutil.which("helm"):
        found = [Path(shutil.which("helm"))]
    return found


def helm(binary: Path, *args: str) -> subprocess.CompletedProcess:
    # Keep helm off the user's config and caches; nothing here talks to a cluster or a repository.
    env = {**os.environ, "HELM_CACHE_HOME": "/nonexistent-cache", "HELM_CONFIG_HOME": "/nonexistent-config"}
    env.pop("KUBECONFIG", None)
    return subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=120)


def lint(binary: Path, values: Iterable[Path] = ()) -> subprocess.CompletedProcess:
    args = ["lint", "--strict", str(CHART)]
    for v in values:
        args += ["-f", str(v)]
    return helm(binary, *args)


def template(
    binary: Path,
    values: Iterable[Path] = (),
    sets: Iterable[str] = (),
    api_versions: Iterable[str] = (),
    release: str = "valve",
    namespace: str = "valve-system",
    include_crds: bool = True,
) -> list[dict]:
    """`helm template` the chart; return the rendered objects (raises on a helm error)."""
    args = ["template", release, str(CHART), "--namespace", namespace]
    if include_crds:
        args.append("--include-crds")
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    for a in api_versions:
        args += ["--api-versions", a]
    out = helm(binary, *args)
    if out.returncode != 0:
        raise RuntimeError(f"helm template failed:\n{out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


# ---- Kubernetes OpenAPI schemas -----------------------------------------------------------------------


def validate_k8s(obj: dict, versions: Iterable[str] = K8S_VERSIONS) -> list[str]:
    """Errors of one built-in object against the Kubernetes OpenAPI schema (strict), per version."""
    import kubernetes_validate

    errors = []
    for v in versions:
        version = kubernetes_validate.latest_version() if v == "latest" else v
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"k8s {version}: {'.'.join(str(p) for p in e.path)}: {e.message}")
    return errors


# ---- Prometheus Operator objects ----------------------------------------------------------------------


def _model_classes(annotation) -> list[type]:
    """Pydantic model classes inside an annotation (Optional/List/Dict/Annotated unwrapped)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type] = []
    if typing.get_origin(annotation) is not None or isinstance(annotation, types.UnionType):
        for arg in typing.get_args(annotation):
            out += _model_classes(arg)
    return out


def unknown_fields(model: type, data, path: str = "") -> list[str]:
    """Keys in `data` that `model` (a pydantic model of a Kubernetes object) does not define, recursively.

    The models accept and drop unknown keys; the API server with strict field validation rejects them.
    """
    if isinstance(data, list):
        return [e for i, item in enumerate(data) for e in unknown_fields(model, item, f"{path}[{i}]")]
    if not isinstance(data, dict):
        return []
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    errors = []
    for key, value in data.items():
        field = fields.get(key)
        if field is None:
            errors.append(f"{path}.{key}: unknown field")
            continue
        for sub in _model_classes(field.annotation):
            errors += unknown_fields(sub, value, f"{path}.{key}")
    return errors


def validate_monitor(obj: dict) -> list[str]:
    """Errors of a ServiceMonitor/PodMonitor/PrometheusRule against the Prometheus Operator's v1 models."""
    from cloudcoil.models.prometheus_operator import v1

    return _model_errors({k: getattr(v1, k) for k in MONITOR_KINDS}[obj["kind"]], obj)


def _model_errors(model: type, obj: dict) -> list[str]:
    from pydantic import ValidationError

    try:
        model.model_validate(obj)
    except ValidationError as e:
        return [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    return unknown_fields(model, obj)


def validate_cert_manager(obj: dict) -> list[str]:
    """Errors of a cert-manager Certificate/Issuer against cert-manager's v1 models."""
    from cloudcoil.models.cert_manager import v1

    return _model_errors(getattr(v1, obj["kind"]), obj)


# ---- custom resources against their CRD -----------------------------------------------------------------


def crd_json_schema(schema: dict) -> dict:
    """A CRD's openAPIV3Schema as JSON Schema, with the API server's strict field validation.

    Objects with `properties` reject unknown keys unless x-kubernetes-preserve-unknown-fields is set;
    x-kubernetes-int-or-string and nullable are spelled out. CEL rules (x-kubernetes-validations) are not run.
    """
    def walk(node):
        if isinstance(node, list):
            return [walk(n) for n in node]
        if not isinstance(node, dict):
            return node
        node = {k: walk(v) if k not in ("enum", "default", "example") else v for k, v in node.items()}
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        return node

    out = walk(schema)  # new dicts and lists throughout: the CRD is not modified
    # metadata is validated by the API server, not by the CRD schema.
    out.setdefault("properties", {})["metadata"] = {"type": "object"}
    return out


def crd_versions(crd: dict) -> dict[tuple[str, str], dict]:
    """{(apiVersion, kind): openAPIV3Schema} for each served version of a CRD."""
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    return {
        (f"{group}/{v['name']}", kind): v["schema"]["openAPIV3Schema"]
        for v in crd["spec"]["versions"]
        if v.get("served", True)
    }


def validate_custom(obj: dict, crds: Iterable[dict]) -> list[str]:
    """Errors of a custom resource against the CRD (from `crds`) that defines its apiVersion and kind."""
    import jsonschema

    schemas = {k: s for crd in crds for k, s in crd_versions(crd).items()}
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in schemas:
        return [f"no CRD serves {key[0]} {key[1]}"]
    validator = jsonschema.Draft7Validator(crd_json_schema(schemas[key]))
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]


def pair_pods(pair: dict) -> list[dict]:
    """The pod templates of a ColocationPair as Pods, so that kubernetes-validate checks their specs
    (the CRD keeps pod specs open: x-kubernetes-preserve-unknown-fields)."""
    pods = []
    for role in ("online", "offline"):
        template = pair.get("spec", {}).get(role, {}).get("template", {})
        meta = {"name": f"{pair['metadata']['name']}-{role}", **template.get("metadata", {})}
        pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template.get("spec", {})})
    return pods


def policy_pods(policy: dict) -> list[dict]:
    """The offline pod template of a ColocationPolicy as a Pod (when it has one rather than a Job reference)."""
    template = policy.get("spec", {}).get("offline", {}).get("template")
    if template is None:
        return []
    meta = {"name": f"{policy['metadata']['name']}-offline-0", **template.get("metadata", {})}
    return [{"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template.get("spec", {})}]


# Kueue's objects (kueue.x-k8s.io/v1beta1) as far as Valve's examples use them: Kueue's CRDs are not available
# here, so these are the fields of its v1beta1 API the examples set, strict (a misspelt field is an error).
_QUANTITY = {"type": ["integer", "string"]}
_STRICT = {"additionalProperties": False, "type": "object"}
KUEUE_SCHEMAS = {
    "ResourceFlavor": {**_STRICT, "properties": {"nodeLabels": {"type": "object"}, "nodeTaints": {"type": "array"},
                                                  "tolerations": {"type": "array"}}},
    "LocalQueue": {**_STRICT, "required": ["clusterQueue"], "properties": {
        "clusterQueue": {"type": "string"}, "stopPolicy": {"enum": ["None", "Hold", "HoldAndDrain"]}}},
    "ClusterQueue": {**_STRICT, "properties": {
        "namespaceSelector": {"type": "object"}, "cohort": {"type": "string"},
        "queueingStrategy": {"enum": ["StrictFIFO", "BestEffortFIFO"]},
        "resourceGroups": {"type": "array", "items": {**_STRICT, "required": ["coveredResources", "flavors"],
                                                      "properties": {
            "coveredResources": {"type": "array", "items": {"type": "string"}},
            "flavors": {"type": "array", "items": {**_STRICT, "required": ["name", "resources"], "properties": {
                "name": {"type": "string"},
                "resources": {"type": "array", "items": {**_STRICT, "required": ["name", "nominalQuota"],
                                                         "properties": {
                    "name": {"type": "string"}, "nominalQuota": _QUANTITY, "borrowingLimit": _QUANTITY,
                    "lendingLimit": _QUANTITY}}}}}}}}}}},
}


def validate_kueue(obj: dict) -> list[str]:
    """Errors of a Kueue object's spec against KUEUE_SCHEMAS (not Kueue's own schema)."""
    import jsonschema

    if obj.get("apiVersion") != "kueue.x-k8s.io/v1beta1" or obj.get("kind") not in KUEUE_SCHEMAS:
        return [f"not checked: {obj.get('apiVersion')} {obj.get('kind')}"]
    validator = jsonschema.Draft7Validator(KUEUE_SCHEMAS[obj["kind"]])
    return [f"spec.{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(obj.get("spec", {}))]


def validate_example(obj: dict, crds: Iterable[dict]) -> list[str]:
    """Errors of one example object: custom resources by their CRD (and pair and policy pod templates by the
    Pod schema), built-in objects by the Kubernetes schema, Kueue's by KUEUE_SCHEMAS."""
    group = obj.get("apiVersion", "").split("/")[0]
    if group.endswith("valve.io"):
        errors = validate_custom(obj, crds)
        pods = pair_pods(obj) if obj.get("kind") == "ColocationPair" else policy_pods(obj)
        if not errors:
            for pod in pods:
                errors += [f"{pod['metadata']['name']} pod template: {e}" for e in validate_k8s(pod)]
        return errors
    if group == "kueue.x-k8s.io":
        return validate_kueue(obj)
    return validate_k8s(obj, k8s_versions(obj))


def k8s_versions(obj: dict) -> tuple[str, ...]:
    """The Kubernetes versions an example object is checked for: from 1.34 if it uses DRA, else K8S_VERSIONS."""
    uses_dra = obj.get("apiVersion", "").startswith("resource.k8s.io/") or "'resourceClaims'" in repr(obj)
    return DRA_K8S_VERSIONS if uses_dra else K8S_VERSIONS


# ---- everything ---------------------------------------------------------------------------------------


def load_yaml_docs(paths: Iterable[Path]) -> list[dict]:
    return [d for p in paths for d in yaml.safe_load_all(p.read_text()) if d]


def validate_rendered(objs: Iterable[dict]) -> list[str]:
    """Errors of every rendered object: built-ins by OpenAPI schema, monitors by the Prometheus models."""
    errors = []
    for obj in objs:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("kind") in MONITOR_KINDS:
            errs = validate_monitor(obj)
        elif obj.get("kind") in CERT_MANAGER_KINDS and obj.get("apiVersion", "").startswith("cert-manager.io/"):
            errs = validate_cert_manager(obj)
        else:
            errs = validate_k8s(obj)
        errors += [f"{name}: {e}" for e in errs]
    return errors


def main() -> int:
    helms = find_helms()
    if not helms:
        print("no helm found: run bash scripts/install-chart-tools.sh", file=sys.stderr)
        return 2
    failed = 0
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    crds = load_yaml_docs(sorted((CHART / "crds").glob("*.yaml")))
    for binary in helms:
        version = helm(binary, "version", "--short").stdout.strip()
        for values in ([], [ALL_ON_VALUES]):
            label = f"{binary.name} {version} {'all-on values' if values else 'default values'}"
            out = lint(binary, values)
            ok = out.returncode == 0
            print(f"{'ok  ' if ok else 'FAIL'} lint     {label}")
            if not ok:
                print(out.stdout + out.stderr)
            failed += not ok
            objs = template(binary, values, api_versions=MONITOR_APIS if values else ())
            errors = validate_rendered(objs)
            print(f"{'ok  ' if not errors else 'FAIL'} template {label}: {len(objs)} objects validated")
            print("".join(f"     {e}\n" for e in errors), end="")
            failed += bool(errors)
    for obj, path in ((o, p) for p in examples for o in load_yaml_docs([p])):
        errors = validate_example(obj, crds)
        print(
            f"{'ok  ' if not errors else 'FAIL'} example  {path.name}: {obj['kind']}/{obj['metadata']['name']}"
        )
        print("".join(f"     {e}\n" for e in errors), end="")
        failed += bool(errors)
    print("all checks passed" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
