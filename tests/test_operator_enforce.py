"""`spec.offline.enforce` (off | report | pause) through the operator: the arbiter sidecar's `--enforce`, and for
pause the offline pod's shared process namespace and the arbiter's one capability, for pairs (both placements)
and for a policy's offline pods. Pure rendering; every pod is checked against Kubernetes' Pod schema (the
PodSecurity level pause needs: tests/test_podsecurity.py)."""

from __future__ import annotations

import pytest
from operator_harness import pair_body
from pydantic import ValidationError

from valve.api import colocation as c
from valve.api import policy as pol
from valve.api.contract import ENV_POD_UID, OFFLINE, ONLINE
from valve.operator.pods import SIDECAR_UID, OperatorConfig, render_pod, render_policy_offline_pod
from valve.runtime.arbiter.policy import ENFORCE_MODES

CFG = OperatorConfig(sidecar_image="valve:t")
MODES = ["off", "report", "pause"]


def validate_pod(pod: dict) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


def pair_pod(role: str, enforce: str | None, placement: str = "devicePlugin") -> dict:
    b = pair_body(placement=placement)
    b["metadata"].update(uid="uid-1", generation=1)
    if enforce is not None:
        b["spec"]["offline"]["enforce"] = enforce
    return render_pod(b, c.ColocationPairSpec.model_validate(b["spec"]), role, "" if placement == "dra" else "n1",
                      CFG)


def policy_pod(enforce: str) -> dict:
    policy = {"apiVersion": pol.API_VERSION, "kind": pol.KIND,
              "metadata": {"name": "chat", "namespace": "llm", "uid": "p-uid"},
              "spec": {"selector": {"matchLabels": {"app": "chat"}},
                       "offline": {"enforce": enforce, "template": {"spec": {"containers": [
                           {"name": "batch", "image": "batch:1"}]}}}}}
    spec = pol.ColocationPolicySpec.model_validate(policy["spec"])
    return render_policy_offline_pod(policy, spec.offline, spec.runtime, spec.offline.template, node="n1",
                                     gpu="GPU-1", online_uid="u-1", index=0, cfg=CFG)


def arbiter(pod: dict) -> dict:
    (side,) = [ct for ct in pod["spec"]["containers"] if ct["name"] == "valve-arbiter"]
    return side


def test_the_models_know_the_arbiters_modes_and_default_to_report():
    assert tuple(MODES) == ENFORCE_MODES
    for model, body in ((c.OfflineRole, {"template": pair_body()["spec"]["offline"]["template"]}),
                        (pol.OfflineSide, {"jobRef": {"name": "batch"}})):
        assert model.model_validate(body).enforce == "report"
        with pytest.raises(ValidationError, match="enforce"):
            model.model_validate({**body, "enforce": "kill"})


def test_an_unknown_mode_is_refused_with_its_field_path():
    b = pair_body()
    b["spec"]["offline"]["enforce"] = "kill"
    with pytest.raises(ValidationError) as err:
        c.ColocationPairSpec.model_validate(b["spec"])
    (e,) = err.value.errors()
    assert e["loc"] == ("offline", "enforce") and "'off', 'report' or 'pause'" in e["msg"]


@pytest.mark.parametrize("placement", ["devicePlugin", "dra"])
@pytest.mark.parametrize("enforce", MODES)
def test_the_arbiter_gets_the_pairs_mode(enforce, placement):
    pod = pair_pod(OFFLINE, enforce, placement)
    validate_pod(pod)
    args = arbiter(pod)["args"]
    # report is the arbiter's own default: left out, so pairs that do not set it keep their pods' spec hash
    assert args.count("--enforce") == (enforce != "report")
    if enforce != "report":
        assert args[args.index("--enforce") + 1] == enforce
    assert pod["spec"].get("shareProcessNamespace", False) is (enforce == "pause")
    # the online pod does not depend on the offline side's mode
    assert pair_pod(ONLINE, enforce, placement) == pair_pod(ONLINE, None, placement)


def test_unset_is_report_and_each_mode_has_its_own_spec_hash():
    assert pair_pod(OFFLINE, None) == pair_pod(OFFLINE, "report")
    hashes = {pair_pod(OFFLINE, m)["metadata"]["annotations"]["valve.io/pod-spec-hash"] for m in MODES}
    assert len(hashes) == 3  # a changed mode recreates the offline pod (shareProcessNamespace is immutable)


@pytest.mark.parametrize("render", [lambda m: pair_pod(OFFLINE, m), lambda m: pair_pod(OFFLINE, m, "dra"),
                                    policy_pod], ids=["pair", "pair-dra", "policy"])
def test_pause_runs_only_the_arbiter_as_root_with_kill_as_its_one_capability(render):
    pod = render("pause")
    validate_pod(pod)
    assert pod["spec"]["shareProcessNamespace"] is True
    assert "--enforce" in arbiter(pod)["args"]
    sc = arbiter(pod)["securityContext"]
    assert sc["runAsUser"] == 0 and sc["runAsGroup"] == 0 and sc["runAsNonRoot"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["KILL"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"} and not sc.get("privileged")
    # everything else Valve adds stays as in report mode
    report = render("report")
    for key in ("initContainers", "volumes"):
        assert pod["spec"].get(key) == report["spec"].get(key)
    for ct in pod["spec"].get("initContainers", []):
        assert ct["securityContext"]["runAsUser"] == SIDECAR_UID
    others = [ct for ct in pod["spec"]["containers"] if ct["name"] != "valve-arbiter"]
    assert others == [ct for ct in report["spec"]["containers"] if ct["name"] != "valve-arbiter"]
    assert arbiter(report)["securityContext"]["runAsUser"] == SIDECAR_UID


@pytest.mark.parametrize("enforce", ["off", "report"])
def test_the_policy_offline_pod_without_pause_shares_nothing(enforce):
    pod = policy_pod(enforce)
    validate_pod(pod)
    assert "shareProcessNamespace" not in pod["spec"]
    assert arbiter(pod)["securityContext"]["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("render", [lambda m: pair_pod(OFFLINE, m), lambda m: pair_pod(OFFLINE, m, "dra"),
                                    policy_pod], ids=["pair", "pair-dra", "policy"])
@pytest.mark.parametrize("enforce", MODES)
def test_the_arbiter_learns_its_pods_uid_from_the_downward_api(render, enforce):
    # NVML enforcement maps the tenant's pid to the host's through the device plugin's pid map, by pod UID
    pod = render(enforce)
    validate_pod(pod)
    env = {e["name"]: e for e in arbiter(pod)["env"]}
    assert env[ENV_POD_UID] == {"name": ENV_POD_UID, "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}
    assert all(ENV_POD_UID not in {e["name"] for e in ct.get("env", [])}
               for ct in pod["spec"]["containers"] if ct["name"] != "valve-arbiter")
