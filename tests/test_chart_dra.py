"""charts/valve with dra.enabled: the DRA driver's DaemonSet, the DeviceClass and least-privilege RBAC, every
object valid for Kubernetes 1.34 (the first with resource.k8s.io/v1) and the newest kubernetes-validate knows."""

from __future__ import annotations

from functools import cache

import chartcheck as cc
import pytest
from test_chart_image import cli_options
from test_chart_rbac import account_of, granted_to, permissions

from valve.api import dra
from valve.api.contract import ENV_METRICS_ADDR
from valve.dra import rbac as dra_rbac
from valve.operator import rbac as op_rbac

HELMS = cc.find_helms()
pytestmark = pytest.mark.skipif(not HELMS, reason="helm not installed (scripts/install-chart-tools.sh)")
K8S = ("1.34", "latest")


@cache
def rendered(*sets: str) -> tuple[dict, ...]:
    return tuple(cc.template(HELMS[0], sets=["dra.enabled=true", *sets]))


def driver(objs) -> dict:
    [ds] = [o for o in objs if o["kind"] == "DaemonSet"
            and o["metadata"]["labels"]["app.kubernetes.io/component"] == "dra-driver"]
    return ds


def test_off_by_default() -> None:
    objs = cc.template(HELMS[0])
    assert not [o for o in objs if o["kind"] == "DeviceClass" or "dra-driver" in o["metadata"]["name"]]
    assert op_rbac.DRA_RULES[0]["resources"][0] not in str(objs)  # no resourceclaims access either


def test_every_object_validates_for_kubernetes_with_resource_v1() -> None:
    pytest.importorskip("kubernetes_validate")
    objs = rendered()
    assert {"DeviceClass", "DaemonSet", "ClusterRole", "ServiceAccount"} <= {o["kind"] for o in objs}
    errors = [f"{o['kind']}/{o['metadata']['name']}: {e}" for o in objs for e in cc.validate_k8s(o, K8S)]
    assert errors == []


def test_device_class_is_the_one_the_code_defines() -> None:
    [cls] = [o for o in rendered() if o["kind"] == "DeviceClass"]
    want = dra.device_class()
    assert cls["metadata"]["name"] == want["metadata"]["name"] and cls["spec"] == want["spec"]


def test_driver_and_operator_get_exactly_the_rules_their_code_uses() -> None:
    objs = rendered()
    assert granted_to(objs, driver(objs)["spec"]["template"]["spec"]["serviceAccountName"]) == \
        permissions(dra_rbac.RULES)
    assert granted_to(objs, account_of(objs, "Deployment")) == permissions(op_rbac.RULES + op_rbac.DRA_RULES)


def test_driver_flags_exist_and_it_runs_apart_from_the_device_plugin() -> None:
    objs = rendered()
    pod = driver(objs)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args = container["args"]
    assert args[0] == "dra-driver"
    assert {a.split("=", 1)[0] for a in args if a.startswith("--")} <= cli_options(["dra-driver"])
    assert pod["nodeSelector"] == {"valve.io/dra": "true"}  # not the device plugin's valve.io/enabled
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/var/lib/kubelet/plugins_registry", "/var/lib/kubelet/plugins/gpu.valve.io", "/var/run/cdi",
            "/var/run/valve"} <= mounts
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in container["env"]


def test_lint_strict_with_dra_and_its_values_are_checked() -> None:
    ok = cc.helm(HELMS[0], "lint", "--strict", str(cc.CHART), "--set", "dra.enabled=true")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    typo = cc.helm(HELMS[0], "lint", str(cc.CHART), "--set", "dra.enable=true")
    assert typo.returncode != 0 and "enable" in typo.stdout + typo.stderr


def test_driver_serves_metrics_on_the_pod_ip_at_the_port_it_announces() -> None:
    pod = driver(rendered("dra.metricsPort=9555"))["spec"]["template"]
    [container] = pod["spec"]["containers"]
    assert "--metrics-port=9555" in container["args"]
    assert {"name": "metrics", "containerPort": 9555, "protocol": "TCP"} in container["ports"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9555"
    [addr] = [e for e in container["env"] if e["name"] == ENV_METRICS_ADDR]
    assert addr["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    quiet = driver(rendered("metrics.scrapeAnnotations=false"))["spec"]["template"]["metadata"]
    assert "annotations" not in quiet
