"""The Grafana dashboard: generated file up to date, valid PromQL, and only metric names the code exports.

Exported names are collected from the source: every Counter/Gauge/Histogram/Summary/Info/Enum (and the
*MetricFamily classes of custom collectors) created in valve/ with a literal name, or a module constant.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import dashboard as gen
import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "charts" / "valve" / "dashboards" / "valve.json"

METRIC_CLASSES = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
NAME_RE = re.compile(r"\bvalve_[a-z0-9_]+\b")


def exported_series(source_root: Path = ROOT / "valve") -> dict[str, str]:
    """{series name Prometheus will see: metric type} for the metrics created in the code under source_root."""
    out: dict[str, str] = {}
    for path in sorted(source_root.rglob("*.py")):
        for name, kind in metrics_in_source(path.read_text()):
            for series in series_names(name, kind):
                out[series] = kind
    return out


def metrics_in_source(source: str) -> list[tuple[str, str]]:
    """(name, type) of each prometheus_client metric constructed in a module's source."""
    tree = ast.parse(source)
    constants = {
        t.id: node.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for t in node.targets
        if isinstance(t, ast.Name)
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        kind = func.removesuffix("MetricFamily") if func.endswith("MetricFamily") else func
        if kind.startswith("Gauge") and kind != "Gauge":
            kind = "Gauge"  # GaugeHistogramMetricFamily etc. are rare; treat as gauges
        if kind not in METRIC_CLASSES:
            continue
        args = {kw.arg: kw.value for kw in node.keywords}
        name_node = node.args[0] if node.args else args.get("name")
        name = _string(name_node, constants)
        if name is None:
            continue
        prefix = [_string(args.get(k), constants) for k in ("namespace", "subsystem")]
        name = "_".join([p for p in prefix if p] + [name])
        found.append((name, kind.lower()))
    return found


def _string(node, constants: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    return None


def series_names(name: str, kind: str) -> list[str]:
    """What prometheus_client exposes for a metric: counters end in _total, histograms have _bucket etc."""
    if kind == "counter":
        base = name.removesuffix("_total")
        return [base + "_total", base + "_created"]
    if kind == "histogram":
        return [name + s for s in ("_bucket", "_sum", "_count", "_created")]
    if kind == "summary":
        return [name, *(name + s for s in ("_sum", "_count", "_created"))]
    if kind == "info":
        return [name.removesuffix("_info") + "_info"]
    return [name]


def dashboard_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def documented_series() -> set[str]:
    """Series names of the metrics listed in docs/metrics.md."""
    rows = re.findall(
        r"^\| `(valve_[a-z0-9_]+)` \| (\w+) \|", (ROOT / "docs" / "metrics.md").read_text(), re.M
    )
    assert rows, "docs/metrics.md lists no metrics"
    return {s for name, kind in rows for s in series_names(name, kind)}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_file_is_generated_by_the_script():
    assert DASHBOARD.read_text() == gen.render(), "run: python scripts/dashboard.py"


def test_metric_collection_understands_prometheus_client_calls():
    source = """
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
NAME = "valve_x_seconds"
a = Counter("valve_a_total", "doc", ["gpu"])
b = Histogram(NAME, "doc")
c = prometheus_client.Gauge(name="valve_c", documentation="doc", registry=r)
d = Counter("reqs", "doc", namespace="valve", subsystem="proxy")
e = GaugeMetricFamily("valve_e", "doc", labels=["gpu"])
f = Counter(make_name(), "doc")  # not a literal: ignored
"""
    assert metrics_in_source(source) == [
        ("valve_a_total", "counter"),
        ("valve_x_seconds", "histogram"),
        ("valve_c", "gauge"),
        ("valve_proxy_reqs", "counter"),
        ("valve_e", "gauge"),
    ]
    assert series_names("valve_a_total", "counter")[0] == "valve_a_total"
    assert series_names("valve_a", "counter")[0] == "valve_a_total"
    assert "valve_x_seconds_bucket" in series_names("valve_x_seconds", "histogram")


def test_dashboard_uses_only_metrics_the_code_exports(dashboard):
    used = {n for e in dashboard_exprs(dashboard) for n in NAME_RE.findall(e)}
    assert used
    exported = exported_series()
    missing = sorted(used - exported.keys())
    assert not missing, (
        f"the dashboard queries series no code in valve/ exports: {missing}; "
        f"exported valve_* series: {sorted(n for n in exported if not n.endswith('_created'))}"
    )


def test_dashboard_uses_documented_names_with_their_types(dashboard):
    used = {n for e in dashboard_exprs(dashboard) for n in NAME_RE.findall(e)}
    assert used <= documented_series()
    for expr in dashboard_exprs(dashboard):
        for name in NAME_RE.findall(expr):
            # rate()/increase() only on counters and histogram parts; buckets through histogram_quantile, or one
            # bucket (an `le` selector) over the count: the share of observations under that bound
            rated = re.search(rf"rate\({name}(\{{[^}}]*\}})?\[", expr)
            if name.endswith("_bucket"):
                one_bucket = re.search(rf'{name}\{{[^}}]*le="[0-9.]+"', expr) and f"{name[:-7]}_count" in expr
                assert (expr.startswith("histogram_quantile(") or one_bucket) and rated, expr
            if rated:
                assert name.endswith(("_total", "_bucket", "_sum", "_count")), expr


def test_dashboard_has_the_required_panels(dashboard):
    required = {
        "valve_online_ttft_seconds_bucket": "online TTFT",
        "valve_online_tpot_seconds_bucket": "online TPOT",
        "valve_preemptions_total": "preemptions",
        "valve_gate_closed_seconds_total": "gate-closed time",
        "valve_reclaimed_bytes_total": "reclaimed bytes",
        "valve_reclaim_latency_seconds_bucket": "reclaim latency",
        "valve_gpu_utilization_ratio": "per-GPU utilisation",
        "valve_pairs": "pair status",
        "valve_policy_online_pods": "policy online pods",
        "valve_policy_harvested_gpus": "policy harvested GPUs",
        "valve_policy_offline_pods": "policy offline pods by phase",
    }
    used = {n for e in dashboard_exprs(dashboard) for n in NAME_RE.findall(e)}
    assert not {k: v for k, v in required.items() if k not in used}


def test_dashboard_structure(dashboard):
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "namespace", "pair", "node", "gpu"]
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']} overlaps another"
                cells.add((x, y))
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
            assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])


def selector_names(promql, tree) -> set[str]:
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql.VectorSelector):
            names.add(node.name)

    promql.walk(tree, visit)
    return names


def test_dashboard_promql_parses(dashboard):
    promql = pytest.importorskip("promql_parser")
    for expr in dashboard_exprs(dashboard):
        # Grafana replaces $__rate_interval and $__range(_s) before the query reaches Prometheus.
        ast_ = promql.parse(expr.replace("$__rate_interval", "1m").replace("$__range_s", "300").replace("$__range", "5m"))
        assert sorted(selector_names(promql, ast_)) == sorted(set(NAME_RE.findall(expr))), expr
    with pytest.raises(ValueError):
        promql.parse("sum(rate(valve_preemptions_total[1m])")


def test_every_panel_follows_the_variables(dashboard):
    """Picking a namespace, pair, node or GPU narrows every panel that has those labels, not only the per-pair row:
    each selector names the variables its component's series carry."""
    operator_only = {"valve_placement_latency_seconds_bucket", "valve_reconcile_errors_total"}
    for expr in dashboard_exprs(dashboard):
        for name, labels in re.findall(r"(valve_[a-z0-9_]+)(\{[^}]*\})?", expr):
            if name in operator_only:
                continue
            assert labels, f"{name} in {expr!r} ignores the dashboard's variables"
            wanted = {"node"} if name.startswith(("valve_device", "valve_allocations")) else (
                {"namespace"} if name == "valve_pairs" or name.startswith("valve_policy_") else
                {"namespace", "pair"} if name.startswith(("valve_online_ttft", "valve_online_tpot",
                                                           "valve_online_requests")) else
                {"node", "gpu"} if name == "valve_gpu_utilization_ratio" else {"namespace", "pair", "node", "gpu"})
            used = set(re.findall(r'(\w+)=~"\$(\w+)"', labels))
            assert {(v, v) for v in wanted} <= used, f"{name} in {expr!r}: {labels}"


def test_slo_share_uses_a_real_bucket_bound(dashboard):
    from valve.runtime.online.proxy import TTFT_BUCKETS

    bounds = {float(b) for e in dashboard_exprs(dashboard) for b in re.findall(r'le="([0-9.]+)"', e)}
    assert bounds and bounds <= set(TTFT_BUCKETS)


def _labels_in_source(source: str) -> dict[str, list[str]]:
    """Metric name -> label names, for metrics constructed with a literal list of labels."""
    out = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
            continue
        labels = node.args[2] if len(node.args) > 2 else {k.arg: k.value for k in node.keywords}.get("labelnames")
        if isinstance(node.args[0].value, str) and isinstance(labels, ast.List | ast.Tuple):
            out[node.args[0].value] = [e.value for e in labels.elts if isinstance(e, ast.Constant)]
    return out


def test_every_metric_the_code_exports_is_documented_with_its_type_and_labels():
    rows = re.findall(r"^\| `(valve_[a-z0-9_]+)` \| (\w+) \| ([^|]+) \|", (ROOT / "docs" / "metrics.md").read_text(),
                      re.M)
    def key(name: str, kind: str) -> str:  # prometheus_client adds a counter's _total
        return name.removesuffix("_total") if kind == "counter" else name

    docs = {key(name, kind): (kind, [x.strip() for x in labels.split(",") if x.strip() not in ("", "-")])
            for name, kind, labels in rows}
    for path in sorted((ROOT / "valve").rglob("*.py")):
        source = path.read_text()
        labels = _labels_in_source(source)
        for full, kind in metrics_in_source(source):
            name = key(full, kind)
            assert name in docs, f"{name} ({path.relative_to(ROOT)}) is not listed in docs/metrics.md"
            assert docs[name][0] == kind, f"{name}: docs/metrics.md says {docs[name][0]}, the code makes a {kind}"
            if full in labels:
                assert docs[name][1] == labels[full], f"{name}: labels {labels[full]} in the code"
