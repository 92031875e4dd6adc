"""The chart's RBAC is least privilege: each component gets exactly the RULES its code uses
(`valve.operator.rbac`, `valve.device_plugin.rbac`).

The ClusterRoles are written out in charts/valve/templates/operator-rbac.yaml and device-plugin-rbac.yaml; these
tests render the chart and compare them, permission by permission, with RULES.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache
from pathlib import Path

import chartcheck as cc
import pytest

ROOT = Path(__file__).resolve().parent.parent

HELMS = cc.find_helms()
pytestmark = pytest.mark.skipif(not HELMS, reason="helm not installed (scripts/install-chart-tools.sh)")

# Verbs that let a subject grant itself more than it has, and resources that hold credentials.
ESCALATING_VERBS = {"escalate", "bind", "impersonate", "*"}
SENSITIVE_RESOURCES = {"secrets", "serviceaccounts/token", "*", "clusterroles", "clusterrolebindings"}


def permissions(rules) -> set[tuple[str, str, str]]:
    """Expand PolicyRules into (apiGroup, resource, verb) triples: equal sets grant the same access."""
    out = set()
    for rule in rules:
        assert not rule.get("nonResourceURLs"), rule
        assert not rule.get("resourceNames"), "RULES with resourceNames need a comparison that keeps them"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


@cache
def rendered() -> tuple[dict, ...]:
    """The chart with default values, rendered once for this module (the tests only read it)."""
    return tuple(cc.template(HELMS[0], api_versions=cc.MONITOR_APIS))


def test_permissions_expand_rules():
    rules = [{"apiGroups": ["", "apps"], "resources": ["pods"], "verbs": ["get", "list"]}]
    assert permissions(rules) == {
        ("", "pods", "get"),
        ("", "pods", "list"),
        ("apps", "pods", "get"),
        ("apps", "pods", "list"),
    }


def granted_to(objs, account: str) -> set:
    """Permissions the chart binds to one ServiceAccount (through any of its role bindings)."""
    roles = {o["metadata"]["name"]: o for o in objs if o["kind"] in ("ClusterRole", "Role")}
    names = {b["roleRef"]["name"] for b in objs if b["kind"].endswith("RoleBinding")
             if any(s["name"] == account for s in b["subjects"])}
    return set().union(set(), *(permissions(roles[n]["rules"]) for n in names))


def account_of(objs, kind: str) -> str:
    return next(o for o in objs if o["kind"] == kind)["spec"]["template"]["spec"]["serviceAccountName"]


@pytest.mark.parametrize("kind, module", [("Deployment", "valve.operator.rbac"),
                                          ("DaemonSet", "valve.device_plugin.rbac")])
def test_each_component_gets_exactly_the_rules_its_code_uses(kind, module):
    rbac = importlib.import_module(module)
    objs = rendered()
    granted = granted_to(objs, account_of(objs, kind))
    wanted = permissions(rbac.RULES)
    assert granted - wanted == set(), f"the chart grants {kind} more than its code uses"
    assert wanted - granted == set(), f"the {kind} code uses permissions the chart does not grant"


def test_no_role_grants_what_no_component_uses():
    from valve.device_plugin import rbac as dp
    from valve.operator import rbac as op

    roles = [o for o in rendered() if o["kind"] in ("ClusterRole", "Role")]
    granted = set().union(*(permissions(r["rules"]) for r in roles))
    assert granted == permissions(op.RULES) | permissions(dp.RULES)


def test_no_wildcards_no_escalation_no_cluster_admin():
    objs = rendered()
    roles = [o for o in objs if o["kind"] in ("ClusterRole", "Role")]
    assert roles
    for role in roles:
        assert "aggregationRule" not in role
        for group, resource, verb in permissions(role["rules"]):
            assert "*" not in (group, resource, verb), (group, resource, verb)
            assert verb not in ESCALATING_VERBS, (group, resource, verb)
            assert resource not in SENSITIVE_RESOURCES, (group, resource, verb)
    role_names = {r["metadata"]["name"] for r in roles}
    for binding in (o for o in objs if o["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        assert binding["roleRef"]["name"] not in {"cluster-admin", "admin", "edit"}
        assert binding["roleRef"]["name"] in role_names  # only roles this chart defines
        assert all(s["kind"] == "ServiceAccount" for s in binding["subjects"])


def test_nodes_are_read_only():
    roles = [o for o in rendered() if o["kind"] in ("ClusterRole", "Role")]
    node_verbs = {v for r in roles for g, res, v in permissions(r["rules"]) if (g, res) == ("", "nodes")}
    assert node_verbs and node_verbs <= {"get", "list", "watch"}


def test_api_access_only_where_the_code_needs_it():
    objs = rendered()
    bound = {s["name"] for b in objs if b["kind"].endswith("RoleBinding") for s in b["subjects"]}
    accounts = {o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"}
    assert bound == {account_of(objs, "Deployment"), account_of(objs, "DaemonSet")}
    for other in accounts - bound:
        sa = next(o for o in objs if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == other)
        assert sa.get("automountServiceAccountToken") is False


def test_device_plugin_api_access_follows_its_options():
    def access(*sets):
        objs = cc.template(HELMS[0], sets=list(sets))
        pod = next(o for o in objs if o["kind"] == "DaemonSet")["spec"]["template"]["spec"]
        return pod["automountServiceAccountToken"], pod["containers"][0]["args"], granted_to(objs, account_of(
            objs, "DaemonSet"))

    # No annotation: only its own Node, read once to refuse a node NVIDIA's plugin serves.
    token, args, granted = access("devicePlugin.annotate=false")
    assert token is True and "--no-annotate" in args and "--refuse-nvidia-plugin" in args
    assert granted == {("", "nodes", "get")}
    # Neither: no API access at all.
    token, args, granted = access("devicePlugin.annotate=false", "devicePlugin.allowNvidiaPlugin=true")
    assert token is False and "--allow-nvidia-plugin" in args and granted == set()
    token, args, granted = access("devicePlugin.allowNvidiaPlugin=true")
    assert token is True and granted == {("", "pods", v) for v in ("get", "list", "patch")}
    assert "--fail-on-init-error" in args
    assert "--no-fail-on-init-error" in access("devicePlugin.failOnInitError=false")[1]
