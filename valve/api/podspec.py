"""The real Kubernetes PodSpec schema for the CRD's pod templates, and the CEL rules Valve adds to it.

`podspec.json` is core/v1 PodSpec from kubernetes-validate's JSON schemas, made structural by
`scripts/podspec_schema.py` (which needs the dev extra; tests/test_crds.py checks the file is fresh), so the CRD
is generated without kubernetes-validate installed.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from valve.api.contract import GROUP, RESERVED_CONTAINERS, RESERVED_VOLUMES

NAME_MAX = 63  # DNS labels; bounded so the CEL rules over them have a bounded cost
SCHEMA_FILE = Path(__file__).with_name("podspec.json")


@cache
def _pod_spec() -> str:
    return SCHEMA_FILE.read_text()


def pod_spec_schema() -> dict[str, Any]:
    """core/v1 PodSpec as a structural CRD schema (a fresh copy)."""
    return json.loads(_pod_spec())


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
