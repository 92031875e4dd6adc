"""docs/install.md "PodSecurity" says which Pod Security level each of Valve's pods needs and which namespace label
follows; the chart's rendered pods and the operator's pods are checked against it with the standard's checks
(tests/support/podsecurity.py), so the docs, the chart and the operator cannot drift apart."""

from __future__ import annotations

import copy
import re
from functools import cache

import chartcheck as cc
import pytest
from markdown import section, tables
from operator_harness import pair_body
from podsecurity import LEVELS, strictest_level, violations

from valve.api import colocation as c
from valve.api.contract import OFFLINE, ONLINE
from valve.operator.pods import OperatorConfig, render_pod

DOC = section("docs/install.md", "## PodSecurity")
HELMS = cc.find_helms()
needs_helm = pytest.mark.skipif(not HELMS, reason="helm not installed (scripts/install-chart-tools.sh)")

# the smallest pod spec the restricted level admits
RESTRICTED = {
    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    "containers": [{"name": "app", "image": "app:1", "securityContext": {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
    "volumes": [{"name": "scratch", "emptyDir": {}}],
}


def claimed() -> dict[str, tuple[str, str]]:
    """docs table: pods -> (namespace, level)."""
    (table,) = tables(DOC)
    assert table[0][:3] == ["pods", "namespace", "strictest level they meet"]
    return {row[0]: (row[1], row[2]) for row in table[1:]}


def labels() -> dict[str, str]:
    """The docs' `kubectl label namespace NS pod-security.kubernetes.io/enforce=LEVEL` lines: NS -> LEVEL."""
    return dict(re.findall(r"kubectl label namespace (\S+) pod-security\.kubernetes\.io/enforce=(\w+)", DOC))


def with_(spec: dict, path: str, value) -> dict:
    """A copy of `spec` with `value` at `path` (dots; a number indexes a list)."""
    out = copy.deepcopy(spec)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = out
    for p in parents:
        node = node[p] if isinstance(p, int) else node.setdefault(p, {})
    node[last] = value
    return out


@pytest.mark.parametrize("path, value, level", [
    ("hostNetwork", True, "privileged"),
    ("hostPID", True, "privileged"),
    ("volumes.0", {"name": "h", "hostPath": {"path": "/x"}}, "privileged"),
    ("containers.0.securityContext.privileged", True, "privileged"),
    ("containers.0.securityContext.capabilities.add", ["SYS_ADMIN"], "privileged"),
    ("containers.0.ports", [{"containerPort": 80, "hostPort": 80}], "privileged"),
    ("containers.0.securityContext.seccompProfile", {"type": "Unconfined"}, "privileged"),
    ("containers.0.securityContext.procMount", "Unmasked", "privileged"),
    ("securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}], "privileged"),
    ("containers.0.securityContext.capabilities.add", ["CHOWN"], "baseline"),
    ("containers.0.securityContext.capabilities.drop", [], "baseline"),
    ("containers.0.securityContext.allowPrivilegeEscalation", True, "baseline"),
    ("securityContext.runAsNonRoot", False, "baseline"),
    ("containers.0.securityContext.runAsUser", 0, "baseline"),
    ("securityContext.seccompProfile", {}, "baseline"),
    ("volumes.0", {"name": "n", "nfs": {"server": "s", "path": "/"}}, "baseline"),
    ("containers.0.securityContext.capabilities.add", ["NET_BIND_SERVICE"], "restricted"),
    ("volumes.0", {"name": "t", "projected": {"sources": []}}, "restricted"),
])
def test_each_check_of_the_standard(path, value, level):
    assert strictest_level(RESTRICTED) == "restricted"
    assert strictest_level(with_(RESTRICTED, path, value)) == level


def test_the_docs_label_each_namespace_for_its_least_strict_pod():
    rows = claimed()
    assert set(labels()) == {"valve-system", "llm"}
    for ns, label in labels().items():
        mine = [level for where, level in rows.values() if (ns == "valve-system") == ("release" in where)]
        assert mine and label == max(mine, key=LEVELS.index), ns


@needs_helm
@pytest.mark.parametrize("values", [(), (cc.ALL_ON_VALUES,)], ids=["default", "all-on"])
def test_the_charts_pods_meet_the_level_the_docs_claim(values):
    objs = chart(values)
    pods = {w["metadata"]["labels"]["app.kubernetes.io/component"]: w["spec"]["template"]["spec"]
            for w in objs if w["kind"] in ("Deployment", "DaemonSet")}
    rows = claimed()
    assert sorted(pods) == ["device-plugin", "operator"]
    for component, spec in pods.items():
        assert strictest_level(spec) == rows[component.replace("-", " ")][1], (component, violations(spec, "baseline"))
    # the device plugin is privileged for its host folders only: nothing else in it needs more than baseline
    dp = pods["device-plugin"]
    assert {v.split(":")[0] for v in violations(dp, "baseline")} == \
        {f"volume {v['name']}" for v in dp["volumes"] if "hostPath" in v}


@cache
def chart(values: tuple) -> list[dict]:
    return list(cc.template(HELMS[0], values))


@pytest.mark.parametrize("role", [ONLINE, OFFLINE])
@pytest.mark.parametrize("gate", ["hooks", "preload"])
def test_a_pairs_pods_need_privileged_only_for_valves_host_folders(role, gate):
    b = pair_body()
    b["metadata"].update(uid="u", generation=1)
    for r in (ONLINE, OFFLINE):
        template = b["spec"][r]["template"]
        template["spec"] = {**copy.deepcopy(RESTRICTED), **{k: v for k, v in template["spec"].items()
                                                            if k not in RESTRICTED}}
        template["spec"]["containers"][0]["ports"] = [{"containerPort": 8000}]
    if gate == "preload":
        b["spec"]["offline"]["gate"] = "preload"
    pod = render_pod(b, c.ColocationPairSpec.model_validate(b["spec"]), role, "n1",
                     OperatorConfig(sidecar_image="valve:t"))
    spec = pod["spec"]
    assert strictest_level(spec) == claimed()["a pair's online and offline pods"][1]
    # a restricted template stays restricted but for the host folders the operator mounts
    host = {f"volume {v['name']}: hostPath" for v in spec["volumes"] if "hostPath" in v}
    assert host and set(violations(spec, "restricted")) == host
    assert len(host) == (2 if (role, gate) == (OFFLINE, "preload") else 1)


@pytest.mark.parametrize("placement", ["devicePlugin", "dra"])
def test_enforce_pause_needs_baseline_for_the_arbiters_uid_and_kill_capability(placement):
    """The pause arbiter runs as uid 0 with KILL: baseline admits it, restricted refuses exactly that. With
    placement dra (no hostPath) the offline pod then needs the level the docs give; with devicePlugin it is
    privileged for the host folder anyway, and pause adds nothing baseline refuses."""
    b = pair_body(placement=placement)
    b["metadata"].update(uid="u", generation=1)
    template = b["spec"][OFFLINE]["template"]
    template["spec"] = {**copy.deepcopy(RESTRICTED), **{k: v for k, v in template["spec"].items()
                                                        if k not in RESTRICTED}}
    levels = {}
    for mode in ("report", "pause"):
        b["spec"][OFFLINE]["enforce"] = mode
        pod = render_pod(b, c.ColocationPairSpec.model_validate(b["spec"]), OFFLINE,
                         "" if placement == "dra" else "n1", OperatorConfig(sidecar_image="valve:t"))
        levels[mode] = strictest_level(pod["spec"])
    host = {v for v in violations(pod["spec"], "restricted") if "hostPath" in v}
    assert sorted(set(violations(pod["spec"], "restricted")) - host) == [
        "container valve-arbiter: capabilities.add ['KILL']", "container valve-arbiter: runAsNonRoot not true",
        "container valve-arbiter: runAsUser 0"]
    assert set(violations(pod["spec"], "baseline")) == host
    if placement == "dra":
        assert levels == {"report": "restricted", "pause": claimed()["an offline pod with enforce: pause, placement dra"][1]}
    else:
        assert levels == {"report": "privileged", "pause": claimed()["a pair's online and offline pods"][1]}
