"""charts/valve: helm lint, helm template (default and every-option values), schema validation offline.

Needs helm: `bash scripts/install-chart-tools.sh` puts Helm 3 and Helm 4 into .tools/bin (CI runs it);
the tests that need helm skip without it. Validators: kubernetes-validate, cloudcoil-models-prometheus-operator.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import chartcheck as cc
import pytest
import yaml

from valve.api.contract import ENV_METRICS_ADDR, LABEL_NODE_ENABLED, PRELOAD_LIBRARY

ROOT = Path(__file__).resolve().parent.parent

HELMS = cc.find_helms()
helms = pytest.mark.parametrize(
    "helm",
    HELMS
    or [
        pytest.param(
            None, marks=pytest.mark.skip(reason="helm not installed (scripts/install-chart-tools.sh)")
        )
    ],
    ids=lambda h: h.name if h else "no-helm",
)
VALUES = {"default": (), "all-on": (cc.ALL_ON_VALUES,)}
ALL_ON = yaml.safe_load(cc.ALL_ON_VALUES.read_text())
DEFAULTS = yaml.safe_load((cc.CHART / "values.yaml").read_text())


@cache
def render(helm: Path, values: tuple = (), sets: tuple = (), api_versions: tuple = ()) -> tuple:
    return tuple(cc.template(helm, values, sets, api_versions))


def by_kind(objs, kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs, kind: str, component: str | None = None) -> dict:
    found = [
        o
        for o in by_kind(objs, kind)
        if component is None or o["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {kind} {component or ''}, got {len(found)}"
    return found[0]


def workloads(objs) -> list[dict]:
    return by_kind(objs, "Deployment") + by_kind(objs, "DaemonSet")


# ---- lint and render ----------------------------------------------------------------------------------


@helms
@pytest.mark.parametrize("values", VALUES, ids=str)
def test_helm_lint_strict(helm, values):
    out = cc.lint(helm, VALUES[values])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


@helms
def test_lint_rejects_values_outside_the_schema(helm):
    bad = cc.helm(helm, "lint", str(cc.CHART), "--set", "metrics.serviceMonitor.enabled=sometimes")
    assert bad.returncode != 0
    typo = cc.helm(helm, "lint", str(cc.CHART), "--set", "operator.replica=2")
    assert typo.returncode != 0 and "replica" in typo.stdout + typo.stderr


@helms
@pytest.mark.parametrize("values", VALUES, ids=str)
def test_rendered_objects_validate_against_kubernetes_and_prometheus_schemas(helm, values):
    pytest.importorskip("kubernetes_validate")
    pytest.importorskip("cloudcoil.models.prometheus_operator")
    objs = render(helm, VALUES[values], api_versions=cc.MONITOR_APIS if values == "all-on" else ())
    kinds = {o["kind"] for o in objs}
    assert {
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "DaemonSet",
        "Service",
        "ServiceAccount",
        "ConfigMap",
    } <= kinds
    if values == "all-on":
        assert {"ServiceMonitor", "PodMonitor"} <= kinds
    assert cc.validate_rendered(objs) == []


def test_validators_reject_invalid_objects():
    """The validators used above do fail on bad input (so a pass means something)."""
    pytest.importorskip("kubernetes_validate")
    pytest.importorskip("cloudcoil.models.prometheus_operator")
    deploy = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            },
        },
    }
    assert cc.validate_k8s(deploy) == []
    typo = copy.deepcopy(deploy)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    assert any("imagePullPolcy" in e for e in cc.validate_k8s(typo))
    wrong_type = copy.deepcopy(deploy)
    wrong_type["spec"]["replicas"] = "two"
    assert cc.validate_k8s(wrong_type)

    sm = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "endpoints": [{"port": "metrics", "interval": "15s"}],
        },
    }
    assert cc.validate_monitor(sm) == []
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    assert cc.validate_monitor(sm) == [".spec.endpoints[0].intervall: unknown field"]
    del sm["spec"]["selector"]
    assert any("selector" in e for e in cc.validate_monitor(sm))


# ---- behaviour of the templates -----------------------------------------------------------------------


@helms
def test_service_and_pod_monitors_follow_the_prometheus_operator_api(helm):
    monitors = {"ServiceMonitor", "PodMonitor"}

    def kinds(sets=(), api=()):
        return {o["kind"] for o in render(helm, (), tuple(sets), tuple(api))} & monitors

    assert kinds() == set()  # "auto" and no Prometheus Operator
    assert kinds(api=cc.MONITOR_APIS) == monitors  # "auto" and the CRDs are served
    assert kinds(api=cc.MONITOR_APIS[:1]) == {"ServiceMonitor"}
    off = ("metrics.serviceMonitor.enabled=false", "metrics.podMonitor.enabled=false")
    assert kinds(off, cc.MONITOR_APIS) == set()
    on = ("metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true")
    assert kinds(on) == monitors


@helms
def test_least_privilege_security_contexts(helm):
    objs = render(helm)
    for w in workloads(objs):
        pod = w["spec"]["template"]["spec"]
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, w["metadata"]["name"]
            assert sc["readOnlyRootFilesystem"] is True, w["metadata"]["name"]
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
            assert not sc.get("privileged")
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    operator = one(objs, "Deployment", "operator")["spec"]["template"]["spec"]
    assert operator["securityContext"]["runAsNonRoot"] is True
    assert operator["securityContext"]["runAsUser"] != 0
    # the one root pod: the device plugin (kubelet's root-owned socket folder; docs/install.md "Security")
    root = [w["metadata"]["name"] for w in workloads(objs)
            if w["spec"]["template"]["spec"]["securityContext"].get("runAsUser", 0) == 0]
    assert root == [one(objs, "DaemonSet", "device-plugin")["metadata"]["name"]]
    # The operator's API access is its own ServiceAccount's, bound to the ClusterRole.
    binding = one(objs, "ClusterRoleBinding", "operator")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": operator["serviceAccountName"], "namespace": "valve-system"}
    ]
    assert binding["roleRef"]["name"] == one(objs, "ClusterRole", "operator")["metadata"]["name"]


@helms
def test_device_plugin_daemonset_on_gpu_nodes(helm):
    objs = render(helm)
    ds = one(objs, "DaemonSet", "device-plugin")
    pod = ds["spec"]["template"]["spec"]
    dp = DEFAULTS["devicePlugin"]
    assert pod["priorityClassName"] == "system-node-critical"
    # opt-in per node (never next to NVIDIA's plugin by default), and a GPU node as well
    assert pod["nodeSelector"] == {LABEL_NODE_ENABLED: "true"} and pod["affinity"] == dp["affinity"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert {e["key"] for t in terms for e in t["matchExpressions"]} == {
        "nvidia.com/gpu.present",
        "feature.node.kubernetes.io/pci-10de.present",
    }
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # API access only to annotate pods (devicePlugin.annotate; tests/test_chart_rbac.py checks the rules)
    assert pod["automountServiceAccountToken"] is True
    assert "--annotate" in pod["containers"][0]["args"]
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    # libvalvegate.so onto the node, where "preload" pairs' pods mount it (the operator's path)
    (init,) = pod["initContainers"]
    lib_dir = host.pop(init["volumeMounts"][0]["name"])
    assert lib_dir == str(Path(PRELOAD_LIBRARY).parent)
    assert init["volumeMounts"][0]["mountPath"] in init["command"][-1] and Path(PRELOAD_LIBRARY).name in init["command"][-1]
    assert sorted(host.values()) == sorted(
        [dp["devicePluginDir"], dp["runtimeDir"], dp["stateDir"], str(Path(dp["podResourcesSocket"]).parent)]
    )
    off = one(render(helm, (), ("devicePlugin.installPreloadLibrary=false",)), "DaemonSet", "device-plugin")
    assert "initContainers" not in off["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    for name, path in host.items():
        assert mounts[name] == path  # same path inside and outside: sockets are announced by path
    assert container["args"][:2] == ["device-plugin", f"--backend={dp['backend']}"]
    port = next(p for p in container["ports"] if p["name"] == "metrics")["containerPort"]
    svc = one(objs, "Service", "device-plugin")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == ds["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["port"] == port


@helms
def test_metrics_bind_to_the_pod_ip_unless_told_otherwise(helm):
    def envs_and_args(*sets):
        objs = render(helm, (), sets)
        out = {}
        for w in workloads(objs):
            c = w["spec"]["template"]["spec"]["containers"][0]
            out[w["metadata"]["labels"]["app.kubernetes.io/component"]] = (
                {e["name"]: e for e in c["env"]}, c["args"])
        return out

    pod_ip = {"name": ENV_METRICS_ADDR, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    for component, (env, args) in envs_and_args().items():
        assert env[ENV_METRICS_ADDR] == pod_ip, component
        assert not [a for a in args if "metrics-addr" in a]  # the sidecars: the operator's default, the pod IP
    for component, (env, args) in envs_and_args("metrics.bindAddress=0.0.0.0").items():
        assert env[ENV_METRICS_ADDR] == {"name": ENV_METRICS_ADDR, "value": "0.0.0.0"}, component
        assert [a for a in args if "metrics-addr" in a] == (
            ["--sidecar-metrics-addr=0.0.0.0"] if component == "operator" else [])


@helms
def test_device_plugin_pid_map_is_off_by_default_and_takes_the_hosts_pid_namespace_only_when_on(helm, tmp_path):
    def plugin(values=()):
        return one(render(helm, values), "DaemonSet", "device-plugin")

    off = plugin()["spec"]["template"]["spec"]
    assert "hostPID" not in off and not [a for a in off["containers"][0]["args"] if a.startswith("--pid-map")]
    assert DEFAULTS["devicePlugin"]["pidMap"] == {"enabled": False, "intervalSeconds": 1}
    values = tmp_path / "pidmap.yaml"
    values.write_text("devicePlugin:\n  pidMap:\n    enabled: true\n    intervalSeconds: 0.5\n")
    ds = plugin((values,))
    on = ds["spec"]["template"]["spec"]
    assert on["hostPID"] is True
    assert [a for a in on["containers"][0]["args"] if a.startswith("--pid-map")] == [
        "--pid-map", "--pid-map-interval=0.5"]
    # nothing else changes: still no capability, no privilege, the same folders
    assert on["containers"][0]["securityContext"] == off["containers"][0]["securityContext"]
    assert on["volumes"] == off["volumes"]
    pytest.importorskip("kubernetes_validate")
    assert cc.validate_rendered([ds]) == []
    bad = cc.helm(helm, "lint", str(cc.CHART), "--set", "devicePlugin.pidMap.intervalSeconds=0")
    assert bad.returncode != 0


@helms
def test_device_plugin_opt_in_label_can_be_dropped_or_changed(helm):
    def selector(*sets):
        return one(render(helm, (), sets), "DaemonSet", "device-plugin")["spec"]["template"]["spec"].get("nodeSelector")

    assert selector("devicePlugin.nodeSelector.valve\\.io/enabled=null") is None
    assert selector("devicePlugin.nodeSelector.pool=gpu-a") == {LABEL_NODE_ENABLED: "true", "pool": "gpu-a"}


@helms
def test_operator_mounts_the_runtime_dir_the_device_plugin_creates(helm):
    def arg(w, name):
        (value,) = [a.split("=", 1)[1] for a in w["spec"]["template"]["spec"]["containers"][0]["args"]
                    if a.startswith(name + "=")]
        return value

    for sets in ((), ("devicePlugin.runtimeDir=/run/gpu-valve",)):
        objs = render(helm, (), sets)
        ds, op = one(objs, "DaemonSet", "device-plugin"), one(objs, "Deployment", "operator")
        assert arg(op, "--runtime-dir") == arg(ds, "--runtime-root") == (sets[0].split("=")[1] if sets else
                                                                          DEFAULTS["devicePlugin"]["runtimeDir"])


@helms
def test_sidecar_images_come_from_the_chart_values(helm):
    def env_and_args(values):
        op = one(render(helm, values), "Deployment", "operator")["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value") for e in op["env"]}, op["args"]

    env, args = env_and_args(())
    assert env["VALVE_IMAGE"] == op_image(()) and not [a for a in args if "allowed-sidecar-image" in a]
    env, args = env_and_args((cc.ALL_ON_VALUES,))
    assert env["VALVE_IMAGE"] == ALL_ON["operator"]["sidecarImage"]
    assert [a.split("=", 1)[1] for a in args if a.startswith("--allowed-sidecar-image=")] == \
        ALL_ON["operator"]["allowedSidecarImages"]


def op_image(values) -> str:
    return one(render(HELMS[0], values), "Deployment", "operator")["spec"]["template"]["spec"]["containers"][0]["image"]


@helms
def test_every_scheduling_and_image_value_is_overridable(helm):
    objs = render(helm, (cc.ALL_ON_VALUES,), (), cc.MONITOR_APIS)
    image = f"{ALL_ON['image']['repository']}@{ALL_ON['image']['digest']}"
    for w in workloads(objs):
        component = w["metadata"]["labels"]["app.kubernetes.io/component"]
        vals = ALL_ON["operator" if component == "operator" else "devicePlugin"]
        pod = w["spec"]["template"]["spec"]
        # Helm merges maps: the device plugin keeps its opt-in label next to the extra ones
        opt_in = {LABEL_NODE_ENABLED: "true"} if component != "operator" else {}
        assert pod["nodeSelector"] == {**opt_in, **vals["nodeSelector"]}
        assert pod["affinity"] == vals["affinity"]
        assert pod["tolerations"] == vals["tolerations"]
        assert pod["imagePullSecrets"] == ALL_ON["imagePullSecrets"]
        c = pod["containers"][0]
        assert c["image"] == image and c["imagePullPolicy"] == ALL_ON["image"]["pullPolicy"]
        extra = vals["extraArgs"]
        assert extra and c["args"][-len(extra) :] == extra
        assert {"name": "EXTRA", "value": "1"} in c["env"]
        assert (
            pod["securityContext"]
            == DEFAULTS["operator" if component == "operator" else "devicePlugin"]["podSecurityContext"]
        )
        assert vals["podLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        assert w["metadata"]["labels"]["team"] == ALL_ON["commonLabels"]["team"]
    assert one(objs, "DaemonSet")["spec"]["template"]["spec"]["runtimeClassName"] == "nvidia"
    sm = one(objs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == ALL_ON["metrics"]["serviceMonitor"]["labels"]["release"]
    assert sm["spec"]["endpoints"][0]["interval"] == ALL_ON["metrics"]["serviceMonitor"]["interval"]
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True  # the per-policy series' own namespace label
    # The ServiceMonitor selects exactly the two metrics Services.
    selected = [
        s
        for s in by_kind(objs, "Service")
        if sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        and s["metadata"]["labels"]["app.kubernetes.io/component"]
        in sm["spec"]["selector"]["matchExpressions"][0]["values"]
    ]
    assert sorted(s["metadata"]["labels"]["app.kubernetes.io/component"] for s in selected) == [
        "device-plugin",
        "operator",
    ]
    assert all(p["name"] == "metrics" for s in selected for p in s["spec"]["ports"])
    cm = one(objs, "ConfigMap", "dashboard")
    assert cm["metadata"]["namespace"] == ALL_ON["metrics"]["dashboard"]["namespace"]
    assert cm["metadata"]["annotations"] == ALL_ON["metrics"]["dashboard"]["annotations"]


@helms
def test_components_can_be_turned_off(helm):
    objs = render(helm, (), ("operator.enabled=false", "metrics.dashboard.enabled=false"), cc.MONITOR_APIS)
    assert not by_kind(objs, "Deployment") and not by_kind(objs, "ConfigMap")
    assert [r["metadata"]["name"] for r in by_kind(objs, "ClusterRole")] == ["valve-device-plugin"]
    assert by_kind(objs, "DaemonSet")
    sm = one(objs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchExpressions"][0]["values"] == ["device-plugin"]
    none = render(helm, (), ("operator.enabled=false", "devicePlugin.enabled=false"), cc.MONITOR_APIS)
    assert not by_kind(none, "ServiceMonitor") and not workloads(none)


@helms
def test_dashboard_configmap_carries_the_dashboard_file(helm):
    cm = one(render(helm), "ConfigMap", "dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (key,) = cm["data"]
    assert json.loads(cm["data"][key]) == json.loads((cc.CHART / "dashboards" / "valve.json").read_text())


# ---- CRDs and examples --------------------------------------------------------------------------------


def test_chart_crds_are_a_copy_of_crds_dir():
    """The chart installs CRDs from its crds/ folder; it must hold exactly the generated crds/*.yaml."""
    src = {p.name: p.read_text() for p in sorted((ROOT / "crds").glob("*.yaml"))}
    chart = {p.name: p.read_text() for p in sorted((cc.CHART / "crds").glob("*.yaml"))}
    assert src, "crds/ is empty: run `valve crds generate`"
    assert chart == src, "charts/valve/crds/ differs from crds/: run scripts/sync-chart-crds.sh"


def crds() -> list[dict]:
    return cc.load_yaml_docs(sorted((cc.CHART / "crds").glob("*.yaml")))


def test_crds_validate_and_define_colocationpairs():
    pytest.importorskip("kubernetes_validate")
    docs = crds()
    assert docs
    for crd in docs:
        assert crd["kind"] == "CustomResourceDefinition"
        assert cc.validate_k8s(crd) == []
    names = {c["spec"]["names"]["plural"] + "." + c["spec"]["group"] for c in docs}
    assert "colocationpairs.valve.io" in names


EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def test_examples_exist():
    assert (ROOT / "examples" / "vllm-online-batch-offline.yaml") in EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate_against_their_schemas(path):
    pytest.importorskip("jsonschema")
    pytest.importorskip("kubernetes_validate")
    docs = cc.load_yaml_docs([path])
    assert docs
    for obj in docs:
        assert cc.validate_example(obj, crds()) == [], obj["metadata"]["name"]


def test_crd_schema_check_rejects_bad_custom_resources():
    pytest.importorskip("kubernetes_validate")
    docs = crds()
    assert docs
    pair = next(o for o in cc.load_yaml_docs(EXAMPLES) if o["kind"] == "ColocationPair")
    assert cc.validate_custom(pair, docs) == []
    unknown = copy.deepcopy(pair)
    unknown["spec"]["onlineServer"] = {}
    assert any("onlineServer" in e for e in cc.validate_custom(unknown, docs))
    missing = copy.deepcopy(pair)
    del missing["spec"]["offline"]
    assert any("offline" in e for e in cc.validate_custom(missing, docs))
    typo = copy.deepcopy(pair)  # the CRD's templates carry Kubernetes' own PodSpec schema
    typo["spec"]["offline"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert any("volumeMount" in e for e in cc.validate_custom(typo, docs))
    assert any("volumeMount" in e for e in cc.validate_example(typo, docs))
    wrong = copy.deepcopy(pair)
    wrong["apiVersion"] = "valve.io/v9"
    assert cc.validate_custom(wrong, docs) == ["no CRD serves valve.io/v9 ColocationPair"]
