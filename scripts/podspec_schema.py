"""Write valve/api/podspec.json: core/v1 PodSpec from kubernetes-validate's JSON schemas as a structural CRD schema.

Structural as CRDs require: `$ref`s inlined, `type: [X, null]` to X (the API server prunes nulls), IntOrString and
Quantity to `x-kubernetes-int-or-string`, no `additionalProperties: false` (unknown fields are pruned, or refused
under fieldValidation=Strict, kubectl's default), no descriptions (the CRD stays small). Run from a checkout with
the dev extra: `python scripts/podspec_schema.py`, then `valve crds generate`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

K8S_SCHEMA = "v1.37.0-local-strict"  # pinned: a newer kubernetes-validate must not change the CRD by itself
INT_OR_STRING = ("io.k8s.apimachinery.pkg.util.intstr.IntOrString", "io.k8s.apimachinery.pkg.api.resource.Quantity")
OUT = Path(__file__).resolve().parent.parent / "valve" / "api" / "podspec.json"


def _definitions() -> dict[str, Any]:
    import kubernetes_validate

    path = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / K8S_SCHEMA / "_definitions.json"
    return json.loads(path.read_text())["$defs"]


def build() -> dict[str, Any]:
    return _convert({"$ref": "#/$defs/io.k8s.api.core.v1.PodSpec"}, _definitions(), ())


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=1, sort_keys=True) + "\n"


def _convert(node: dict[str, Any], defs: dict[str, Any], seen: tuple[str, ...]) -> dict[str, Any]:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        if name in INT_OR_STRING:
            return {"x-kubernetes-int-or-string": True}
        if name in seen:
            raise ValueError(f"recursive type {name} in the pod schema")
        return _convert(defs[name], defs, (*seen, name))
    out: dict[str, Any] = {}
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind is not None:
        out["type"] = kind
    if "format" in node and node["format"] in ("int32", "int64", "double", "byte", "date-time"):
        out["format"] = node["format"]
    for key in ("enum", "required", "minimum", "maximum", "minItems", "maxItems", "minLength", "maxLength",
                "pattern"):
        if key in node:
            out[key] = [v for v in node[key] if v is not None] if key == "enum" else node[key]
    if "properties" in node:
        out["properties"] = {k: _convert(v, defs, seen) for k, v in node["properties"].items()}
        out.setdefault("type", "object")
    elif isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _convert(node["additionalProperties"], defs, seen)
    elif out.get("type") == "object":
        out["x-kubernetes-preserve-unknown-fields"] = True  # a free-form object (e.g. FieldsV1)
    if "items" in node:
        out["items"] = _convert(node["items"], defs, seen)
    if "type" not in out and "x-kubernetes-int-or-string" not in out:
        raise ValueError(f"schema node without a type: {node}")
    return out




if __name__ == "__main__":
    OUT.write_text(render(build()))
    print(f"wrote {OUT}")
