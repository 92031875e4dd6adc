"""valve.api.contract is the one home of the names Valve's processes agree on, and the chart agrees with it."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from valve.api import contract as k

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "valve"
# the contract's values that no other module should spell (the short, generic ones are common words)
GENERIC = {"ONLINE", "OFFLINE", "GROUP", "CONTROL_FILE", "PAIR_FILE", "ONLINE_SLOTS_DIR", "KUBELET_SOCKET"}
VALUES = {v for n, v in vars(k).items() if n.isupper() and isinstance(v, str) and n not in GENERIC} | {k.GROUP + "/"}


def test_wire_values() -> None:
    """Running clusters, the chart and the docs use these values: changing one is a breaking change."""
    assert (k.ONLINE_RESOURCE, k.OFFLINE_RESOURCE) == ("valve.io/online-gpu", "valve.io/offline-gpu")
    assert (k.ANN_GPU, k.ANN_ROLE, k.LABEL_PAIR) == ("valve.io/gpu-uuid", "valve.io/role", "valve.io/pair")
    assert (k.ENV_GPU_UUID, k.ENV_RUNTIME_DIR) == ("VALVE_GPU_UUID", "VALVE_RUNTIME_DIR")
    assert (k.RUNTIME_DIR, k.CONTROL_FILE, k.PODINFO_FILE) == ("/var/run/valve", "control",
                                                              "/etc/valve/podinfo/annotations")
    assert k.plugin_socket(k.ONLINE_RESOURCE) == "valve.io-online-gpu.sock"


def test_contract_is_a_leaf() -> None:
    tree = ast.parse((ROOT / "valve" / "api" / "contract.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"__future__"} and not any(isinstance(n, ast.Import) for n in ast.walk(tree))


def spelled_outside_the_contract() -> list[str]:
    """String literals (docstrings aside) in valve/ and scripts/ that spell a contract name."""
    found = []
    for path in sorted([*(ROOT / "valve").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]):
        if path.name == "contract.py" or "proto" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and ast.get_docstring(n, clean=False) is not None}
        found += [f"{path.relative_to(ROOT)}:{n.lineno}: {n.value!r}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
                  and any(v in n.value for v in VALUES)]
    return found


def test_names_are_spelled_only_in_the_contract() -> None:
    assert spelled_outside_the_contract() == []


def test_chart_values_follow_the_contract() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    plugin = values["devicePlugin"]
    assert plugin["runtimeDir"] == k.RUNTIME_DIR
    assert plugin["devicePluginDir"] == k.DEVICE_PLUGIN_DIR
    assert plugin["podResourcesSocket"] == k.POD_RESOURCES_SOCKET
    monitor = values["metrics"]["podMonitor"]
    assert [e["key"] for e in monitor["selector"]["matchExpressions"]] == [k.LABEL_PAIR]
    assert monitor["port"] == k.METRICS_PORT_NAME
    assert f"- name: {k.ENV_IMAGE}" in (CHART / "templates" / "operator-deployment.yaml").read_text()
