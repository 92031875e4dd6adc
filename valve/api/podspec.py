"""The real Kubernetes PodSpec schema for the CRD's pod templates, from kubernetes-validate's JSON schemas.

Made structural as CRDs require: `$ref`s inlined, `type: [X, null]` to X (the API server prunes nulls),
IntOrString and Quantity to `x-kubernetes-int-or-string`, no `additionalProperties: false` (unknown fields are
pruned, or refused under fieldValidation=Strict, kubectl's default), no descriptions (the CRD stays small).
Generation needs the dev extra (kubernetes-validate); the generated CRD in crds/ does not.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from valve.api.contract import GROUP, RESERVED_CONTAINERS, RESERVED_VOLUMES

K8S_SCHEMA = "v1.37.0-local-strict"  # pinned: a newer kubernetes-validate must not change the CRD by itself
INT_OR_STRING = ("io.k8s.apimachinery.pkg.util.intstr.IntOrString", "io.k8s.apimachinery.pkg.api.resource.Quantity")
NAME_MAX = 63  # DNS labels; bounded so the CEL rules over them have a bounded cost


@cache
def _definitions() -> dict[str, Any]:
    try:
        import kubernetes_validate
    except ImportError:
        raise RuntimeError("generating the CRD needs kubernetes-validate (pip install -e '.[dev]')") from None
    path = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / K8S_SCHEMA / "_definitions.json"
    return json.loads(path.read_text())["$defs"]


def pod_spec_schema() -> dict[str, Any]:
    """core/v1 PodSpec as a structural CRD schema."""
    return _convert({"$ref": "#/$defs/io.k8s.api.core.v1.PodSpec"}, _definitions(), ())


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


def _cel_list(names: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{n}'" for n in names) + "]"


VOLUMES, CONTAINERS = _cel_list(RESERVED_VOLUMES), _cel_list(RESERVED_CONTAINERS)
_MOUNTS = f"(!has(c.volumeMounts) || c.volumeMounts.all(m, !(m.name in {VOLUMES})))"
# CEL rules the API server checks (x-kubernetes-validations); the operator's models check the same (valve.api.colocation)
POD_SPEC_RULES = [
    {"rule": f"!has(self.volumes) || self.volumes.all(v, !(v.name in {VOLUMES}))",
     "message": f"volume names {', '.join(RESERVED_VOLUMES)} are reserved for the volumes Valve adds"},
    {"rule": f"self.containers.all(c, !(c.name in {CONTAINERS}) && {_MOUNTS})",
     "message": f"container names {', '.join(RESERVED_CONTAINERS)} and mounts of Valve's volumes are reserved"},
    {"rule": f"!has(self.initContainers) || self.initContainers.all(c, !(c.name in {CONTAINERS}) && {_MOUNTS})",
     "message": f"container names {', '.join(RESERVED_CONTAINERS)} and mounts of Valve's volumes are reserved"},
]
TEMPLATE_META_RULES = [
    {"rule": f"!has(self.annotations) || self.annotations.all(k, !k.startsWith('{GROUP}/'))",
     "message": f"{GROUP}/ annotations are set by Valve, not by the template"},
]
PROXY_RULES = [
    {"rule": "(has(self.enabled) && !self.enabled) || "
             "(has(self.port) ? self.port : 9000) != (has(self.upstreamPort) ? self.upstreamPort : 8000)",
     "message": "port and upstreamPort must differ: the proxy would forward to itself"},
]


def template_pod_spec(image_max: int) -> dict[str, Any]:
    """The PodSpec of a pair's template: Kubernetes' own, bounded where the rules iterate, with Valve's rules."""
    spec = pod_spec_schema()
    props = spec["properties"]
    for key in ("containers", "initContainers"):
        props[key]["maxItems"] = 64
        item = props[key]["items"]
        item["properties"]["name"].update(maxLength=NAME_MAX, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
        item["properties"]["volumeMounts"]["maxItems"] = 256
        item["properties"]["volumeMounts"]["items"]["properties"]["name"]["maxLength"] = NAME_MAX
    props["containers"]["minItems"] = 1
    props["containers"]["items"]["required"] = ["name", "image"]
    props["containers"]["items"]["properties"]["image"].update(minLength=1, maxLength=image_max)
    props["volumes"]["maxItems"] = 256
    props["volumes"]["items"]["properties"]["name"]["maxLength"] = NAME_MAX
    spec["x-kubernetes-validations"] = POD_SPEC_RULES
    return spec
