"""charts/valve: the pod-injection webhook (MutatingWebhookConfiguration, Service, certificate) as rendered.

Certificates: without cert-manager the chart generates a CA and a serving certificate (checked here with openssl:
the caBundle verifies the Secret's certificate for the Service's DNS name); with cert-manager it renders a
Certificate (and a self-signed Issuer unless one is named) whose Secret the operator mounts, and the CA injector
annotation. cert-manager objects are checked against cert-manager's models; nothing here ran in a cluster.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from functools import cache

import chartcheck as cc
import pytest

from valve.operator.policy_handlers import WEBHOOK_ID

HELMS = cc.find_helms()
pytestmark = pytest.mark.skipif(not HELMS, reason="helm not installed (scripts/install-chart-tools.sh)")
NS = "valve-system"


@cache
def render(*sets: str) -> tuple[dict, ...]:
    return tuple(cc.template(HELMS[0], sets=list(sets)))


def only(objs, kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def operator_container(objs) -> tuple[dict, dict]:
    pod = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def test_the_webhook_fails_open_and_reaches_the_operators_handler():
    objs = render()
    (hook,) = only(objs, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["failurePolicy"] == "Ignore" and hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"] and hook["timeoutSeconds"] == 5
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    # the operator's own namespace and kube-system never go through it
    (expr,) = hook["namespaceSelector"]["matchExpressions"]
    assert expr["operator"] == "NotIn" and set(expr["values"]) == {"kube-system", NS}
    # Service -> operator pods' webhook port -> kopf's route for the handler id
    ref = hook["clientConfig"]["service"]
    assert ref["path"] == f"/{WEBHOOK_ID}" and ref["namespace"] == NS
    service = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == ref["name"])
    (port,) = service["spec"]["ports"]
    assert port["port"] == ref["port"] == 443 and port["targetPort"] == "webhook"
    pod, container = operator_container(objs)
    deployment = next(o for o in objs if o["kind"] == "Deployment")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["webhook"] == 9443 and "--webhook-port=9443" in container["args"]
    # the certificate's Secret is mounted where --webhook-cert-dir points
    (cert_dir,) = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--webhook-cert-dir=")]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == cert_dir)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == only(objs, "Secret")["metadata"]["name"]


def test_the_chart_generated_ca_verifies_the_serving_certificate_for_the_service(tmp_path):
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to check the generated certificate"
    objs = render()
    secret = only(objs, "Secret")
    (hook,) = only(objs, "MutatingWebhookConfiguration")["webhooks"]
    assert secret["type"] == "kubernetes.io/tls"
    assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (tmp_path / key).write_bytes(base64.b64decode(secret["data"][key]))
    ok = subprocess.run([openssl, "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "tls.crt")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    sans = subprocess.run([openssl, "x509", "-noout", "-ext", "subjectAltName", "-in", str(tmp_path / "tls.crt")],
                          capture_output=True, text=True, check=True).stdout
    service = hook["clientConfig"]["service"]
    assert f"DNS:{service['name']}.{NS}.svc" in sans  # the name the API server calls
    # the key belongs to the certificate
    pub = [subprocess.run([openssl, *args], capture_output=True, check=True).stdout for args in (
        ["x509", "-noout", "-pubkey", "-in", str(tmp_path / "tls.crt")],
        ["pkey", "-pubout", "-in", str(tmp_path / "tls.key")])]
    assert pub[0] == pub[1]


def test_cert_manager_issues_the_secret_the_operator_mounts_and_injects_the_ca():
    pytest.importorskip("cloudcoil.models.cert_manager")
    objs = render("webhook.certManager.enabled=true")
    assert not [o for o in objs if o["kind"] == "Secret"]
    cert, issuer = only(objs, "Certificate"), only(objs, "Issuer")
    config = only(objs, "MutatingWebhookConfiguration")
    (hook,) = config["webhooks"]
    assert "caBundle" not in hook["clientConfig"]
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{NS}/{cert['metadata']['name']}"
    assert cert["spec"]["issuerRef"] == {"name": issuer["metadata"]["name"], "kind": "Issuer",
                                         "group": "cert-manager.io"}
    assert f"{hook['clientConfig']['service']['name']}.{NS}.svc" in cert["spec"]["dnsNames"]
    pod, _ = operator_container(objs)
    assert {v["name"]: v.get("secret", {}).get("secretName") for v in pod["volumes"]}["webhook-tls"] \
        == cert["spec"]["secretName"]
    assert cc.validate_rendered([cert, issuer]) == []
    bad = {**cert, "spec": {**cert["spec"], "dnsName": ["x"]}}
    assert any("dnsName" in e for e in cc.validate_rendered([bad]))  # the check does fail on a typo

    named = render("webhook.certManager.enabled=true", "webhook.certManager.issuerRef.name=corp",
                   "webhook.certManager.issuerRef.kind=ClusterIssuer")
    assert not [o for o in named if o["kind"] == "Issuer"]
    assert only(named, "Certificate")["spec"]["issuerRef"] == {"name": "corp", "kind": "ClusterIssuer",
                                                               "group": "cert-manager.io"}


def test_webhook_off_renders_none_of_it():
    objs = render("webhook.enabled=false")
    kinds = {o["kind"] for o in objs}
    assert not kinds & {"MutatingWebhookConfiguration", "Secret", "Certificate", "Issuer"}
    pod, container = operator_container(objs)
    assert not [a for a in container["args"] if a.startswith("--webhook")]
    assert "webhook" not in {p["name"] for p in container["ports"]}
    assert "webhook-tls" not in {v["name"] for v in pod["volumes"]}


def test_selectors_from_values_narrow_the_webhook():
    objs = render("webhook.objectSelector.matchLabels.valve\\.io/colocate=on",
                  "webhook.namespaceSelector.matchLabels.team=ml")
    (hook,) = only(objs, "MutatingWebhookConfiguration")["webhooks"]
    assert hook["objectSelector"] == {"matchLabels": {"valve.io/colocate": "on"}}
    assert hook["namespaceSelector"]["matchLabels"] == {"team": "ml"}
    assert hook["namespaceSelector"]["matchExpressions"][0]["key"] == "kubernetes.io/metadata.name"
