"""The chart's alert rules: a PrometheusRule or a ConfigMap rules file by the cluster's APIs, `promtool check
rules` and `promtool test rules` (tests/fixtures/alerts: a unit test per alert) on what helm renders, only
metrics the code exports and documents, and a runbook section in docs/metrics.md for every alert."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import chartcheck as cc
import pytest
import yaml
from test_chart_dashboard import NAME_RE, documented_series, exported_series

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "alerts"
PROMTOOL = shutil.which("promtool")
ALERTS = {
    "ValveOnlineTTFTHigh", "ValveOnlineTPOTHigh", "ValveGateForcedOpen", "ValveGateViolation", "ValveReserveShortfall",
    "ValveReclaimTimeouts", "ValveReclaimSlow", "ValvePreemptionsCapped", "ValveGPUUnhealthy",
    "ValveOperatorReconcileErrors", "ValveDevicePluginNotRegistered",
}
RULE_API = "monitoring.coreos.com/v1/PrometheusRule"
needs_helm = pytest.mark.skipif(not cc.find_helms(), reason="helm not installed (scripts/install-chart-tools.sh)")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


def render_rules(values: tuple[Path, ...] = (), api_versions: tuple[str, ...] = (), sets=()) -> list[dict]:
    objs = cc.template(cc.find_helms()[0], values, sets, api_versions, include_crds=False)
    return [o for o in objs if o["metadata"]["name"].endswith("-alerts")]


def rules_file(values: tuple[Path, ...] = ()) -> str:
    """The plain rules file the chart ships without the Prometheus Operator."""
    (cm,) = render_rules(values)
    assert cm["kind"] == "ConfigMap"
    return cm["data"]["valve-alerts.yaml"]


def all_rules(text: str) -> list[dict]:
    return [r for g in yaml.safe_load(text)["groups"] for r in g["rules"]]


@needs_helm
def test_prometheus_rule_with_the_operator_else_a_rules_file():
    (rule,) = render_rules(api_versions=(RULE_API,))
    assert rule["kind"] == "PrometheusRule" and cc.validate_monitor(rule) == []
    assert rule["spec"] == yaml.safe_load(rules_file())  # the same groups either way
    (cm,) = render_rules(sets=("metrics.alerts.prometheusRule=true",))
    assert cm["kind"] == "PrometheusRule"
    (cm,) = render_rules(api_versions=(RULE_API,), sets=("metrics.alerts.prometheusRule=false",))
    assert cm["kind"] == "ConfigMap"
    assert render_rules(sets=("metrics.alerts.enabled=false",)) == []


@needs_helm
def test_every_alert_is_there_once_per_threshold():
    rules = all_rules(rules_file())
    assert {r["alert"] for r in rules} == ALERTS and len(rules) == len(ALERTS)
    per_pair = all_rules(rules_file((FIXTURES / "values.yaml",)))
    assert len(per_pair) == len(ALERTS) + 2  # chat gets its own TTFT and TPOT rules
    exprs = [r["expr"] for r in per_pair if r["alert"] == "ValveOnlineTTFTHigh"]
    assert exprs[0].endswith("> 2") and '{pair!~"chat"}' in exprs[0]
    assert exprs[1].endswith("> 0.5") and '{pair="chat"}' in exprs[1]


@needs_helm
def test_rules_use_exported_documented_metrics_and_have_runbooks():
    exported, documented = exported_series(), documented_series()
    docs = (ROOT / "docs" / "metrics.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.*)$", docs, re.M)}
    for rule in all_rules(rules_file()):
        names = set(NAME_RE.findall(rule["expr"]))
        assert names and names <= exported.keys() and names <= documented, rule["expr"]
        anchor = rule["annotations"]["runbook_url"].split("#")[1]
        assert anchor == rule["alert"].lower() and anchor in anchors, f"no runbook section for {rule['alert']}"
        assert rule["labels"]["severity"] and rule["annotations"]["summary"]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@needs_helm
@needs_promtool
@pytest.mark.parametrize("values", ["default", "per-pair"])
def test_promtool_check_rules(tmp_path, values):
    (tmp_path / "valve-alerts.yaml").write_text(rules_file(() if values == "default" else (FIXTURES / "values.yaml",)))
    out = promtool("check", "rules", "valve-alerts.yaml", cwd=tmp_path)
    assert out.returncode == 0 and "inconsisten" not in out.stderr, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERTS) + (2 if values == 'per-pair' else 0)} rules found" in out.stdout


@needs_helm
@needs_promtool
def test_promtool_unit_tests_fire_each_alert(tmp_path):
    tests = FIXTURES / "valve-alerts.test.yaml"
    covered = {t["alertname"] for case in yaml.safe_load(tests.read_text())["tests"] for t in case["alert_rule_test"]}
    assert covered == ALERTS
    (tmp_path / "valve-alerts.yaml").write_text(rules_file((FIXTURES / "values.yaml",)))
    shutil.copy(tests, tmp_path)
    out = promtool("test", "rules", tests.name, cwd=tmp_path)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    # and they can fail: a rule file without the per-pair threshold does not fire for chat
    (tmp_path / "valve-alerts.yaml").write_text(rules_file())
    out = promtool("test", "rules", tests.name, cwd=tmp_path)
    assert out.returncode != 0 and "pair=\"chat\"" in out.stdout + out.stderr
