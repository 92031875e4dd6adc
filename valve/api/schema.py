"""Turn a pydantic JSON schema into a structural OpenAPI v3 schema, as CRDs require.

Kubernetes accepts a subset of OpenAPI v3.0 in `openAPIV3Schema`: no `$ref`, a `type` on every node,
`nullable` instead of `anyOf: [..., {type: null}]`, boolean `exclusiveMinimum`, no `additionalProperties`
next to `properties`. Open objects (pydantic `extra="allow"`) keep unknown fields through
`x-kubernetes-preserve-unknown-fields`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

_DROP = {"title", "additionalProperties", "$defs", "discriminator"}


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return convert(raw, raw.get("$defs", {}))


def convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Convert one schema node (recursively), inlining `$ref`s from `defs`."""
    node = _inline(node, defs)
    any_of = node.get("anyOf")
    if any_of is not None:
        options = [o for o in any_of if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"only Optional[X] unions are supported in CRD schemas, got {any_of}")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        out = convert({**_inline(options[0], defs), **rest}, defs)
        if len(options) < len(any_of):
            out["nullable"] = True
            if out.get("default", 0) is None:
                del out["default"]
        return out

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: convert(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = convert(value, defs)
        elif key == "const":
            out["enum"] = [value]
        elif key == "propertyNames":  # not in a CRD schema: the key bound becomes a CEL rule
            if "maxLength" in value:
                out.setdefault("x-kubernetes-validations", []).append(
                    {"rule": f"self.all(k, size(k) <= {value['maxLength']})",
                     "message": f"keys are at most {value['maxLength']} characters"})
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value

    extra = node.get("additionalProperties")
    if extra is True:
        out["x-kubernetes-preserve-unknown-fields"] = True
    elif isinstance(extra, dict) and "properties" not in node:
        out["additionalProperties"] = convert(extra, defs)
    if "type" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        raise ValueError(f"schema node has no type: {node}")
    return out


def _inline(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        node = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def iter_nodes(schema: dict[str, Any]):
    """Yield every schema node (for checks)."""
    yield schema
    for sub in schema.get("properties", {}).values():
        yield from iter_nodes(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from iter_nodes(schema[key])
