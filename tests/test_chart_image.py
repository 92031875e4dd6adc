"""The image and the chart agree with the code: Dockerfile user and entrypoint, the build context, the
commands and flags the chart passes to `valve`, and the host paths shared by the device plugin and operator.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import chartcheck as cc
import pytest
import typer.main
import yaml

ROOT = Path(__file__).resolve().parent.parent

HELMS = cc.find_helms()
needs_helm = pytest.mark.skipif(not HELMS, reason="helm not installed (scripts/install-chart-tools.sh)")
VALUES = yaml.safe_load((cc.CHART / "values.yaml").read_text())


def final_stage(commands) -> list:
    """Instructions of the last build stage."""
    starts = [i for i, c in enumerate(commands) if c.cmd.upper() == "FROM"]
    return list(commands[starts[-1] :])


def test_dockerfile_runs_valve_as_the_charts_non_root_user():
    dockerfile = pytest.importorskip("dockerfile")
    commands = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    last = final_stage(commands)
    users = [c.value[0] for c in last if c.cmd.upper() == "USER"]
    assert users, "the final stage sets no USER (it would run as root)"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (runAsNonRoot checks it)"
    pod = VALUES["operator"]["podSecurityContext"]
    assert (int(uid), int(gid or uid)) == (pod["runAsUser"], pod["runAsGroup"])
    entry = [c for c in last if c.cmd.upper() == "ENTRYPOINT"]
    assert entry and entry[-1].json and list(entry[-1].value) == ["valve"]


def test_build_context_has_what_the_dockerfile_copies():
    dockerfile = pytest.importorskip("dockerfile")
    commands = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    included = [
        line[1:].strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    sources = [
        src
        for c in commands
        if c.cmd.upper() == "COPY" and not any(f.startswith("--from") for f in c.flags)
        for src in c.value[:-1]
    ]
    assert sources
    for src in sources:
        assert src.rstrip("/") in included, f"{src} is excluded from the build context by .dockerignore"
        if src != "README.md":  # written by the lead with the README merge
            assert (ROOT / src).exists(), src
    # pip builds the wheel from pyproject.toml: every package it installs must be in the context.
    assert "valve" in included and "pyproject.toml" in included


def cli_options(argv: list[str]) -> set[str]:
    """Long option names of the `valve` sub-command named by the leading words of argv."""
    from valve.cli import app

    command = typer.main.get_command(app)
    for word in argv:
        if word.startswith("-"):
            break
        command = command.commands[word]
    return {opt for p in command.params for opt in (*p.opts, *getattr(p, "secondary_opts", ())) if opt.startswith("--")}


@needs_helm
@pytest.mark.parametrize("values", [(), (cc.ALL_ON_VALUES,)], ids=["default", "all-on"])
def test_chart_commands_and_flags_exist_in_the_cli(values):
    objs = cc.template(HELMS[0], values)
    workloads = [o for o in objs if o["kind"] in ("Deployment", "DaemonSet")]
    assert len(workloads) == 2
    for w in workloads:
        for c in w["spec"]["template"]["spec"]["containers"]:
            assert "command" not in c  # the image's ENTRYPOINT is `valve`
            args = c["args"]
            words = [a for a in args if not a.startswith("-")]
            known = cli_options(words)
            flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
            assert flags <= known, (
                f"{w['kind']} passes flags `valve {' '.join(words)}` lacks: {flags - known}"
            )


def test_cli_options_reads_the_real_cli():
    assert "--backend" in cli_options(["device-plugin"])
    with pytest.raises(KeyError):
        cli_options(["no-such-command"])


def test_device_plugin_and_operator_share_the_runtime_dir():
    """The per-GPU folders the plugin creates are the ones the operator mounts into the sidecars."""
    from valve.device_plugin.config import PluginConfig

    pods = pytest.importorskip("valve.operator.pods")
    assert VALUES["devicePlugin"]["runtimeDir"] == str(PluginConfig().runtime_root) == pods.OperatorConfig().runtime_dir


def test_chart_crds_are_what_the_api_models_generate():
    """crds/ is generated from valve.api; the chart's copy must be current too (not only equal to crds/)."""
    from valve.api import crds

    assert crds.stale(ROOT / "charts" / "valve" / "crds") == [], (
        "charts/valve/crds/ is stale: run `valve crds generate` then scripts/sync-chart-crds.sh"
    )


def module_cli_options(module: str) -> set[str]:
    """Long options of `python -m <module>` for modules that end in `typer.run(main)`."""
    mod = importlib.import_module(module)
    app = typer.Typer()
    app.command()(mod.main)
    command = typer.main.get_command(app)
    return {o for p in command.params for o in [*p.opts, *p.secondary_opts] if o.startswith("--")}


def example_containers() -> list[dict]:
    out = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ColocationPair":
                for role in ("online", "offline"):
                    out += doc["spec"][role]["template"]["spec"]["containers"]
    return out


def test_example_offline_job_uses_options_valve_engine_offline_has():
    runs = [c for c in example_containers() if c.get("command", [])[-1:] == ["valve.engine.offline"]]
    assert runs, "no example runs valve.engine.offline"
    known = module_cli_options("valve.engine.offline")
    assert {"--gate", "--kv-pool"} <= known
    for c in runs:
        flags = {a.split("=", 1)[0] for a in c["args"] if a.startswith("--")}
        assert flags <= known, f"example passes options valve.engine.offline lacks: {flags - known}"


def test_module_cli_options_reads_the_real_cli():
    assert "--input" in module_cli_options("valve.engine.offline")
    assert "--no-such-option" not in module_cli_options("valve.engine.offline")


def test_pod_monitor_finds_the_metrics_port_of_the_sidecars_the_operator_injects():
    """The PodMonitor scrapes paired pods by label and port name: the operator's pods must carry both."""
    pods = pytest.importorskip("valve.operator.pods")
    from valve.api import colocation as c
    from valve.api.contract import ROLES

    pm = VALUES["metrics"]["podMonitor"]
    pair = next(
        d
        for d in yaml.safe_load_all((ROOT / "examples" / "vllm-online-batch-offline.yaml").read_text())
        if d and d["kind"] == "ColocationPair"
    )
    pair["metadata"] |= {"namespace": "llm", "uid": "0000"}
    spec = c.ColocationPairSpec.model_validate(pair["spec"])
    for role in ROLES:
        pod = pods.render_pod(pair, spec, role, "node-1", pods.OperatorConfig())
        labels = pod["metadata"]["labels"]
        for e in pm["selector"]["matchExpressions"]:
            assert e["operator"] == "Exists" and e["key"] in labels, (role, e)
        sidecars = [x for x in pod["spec"]["containers"] if x["name"].startswith("valve-")]
        assert sidecars, role
        for x in sidecars:
            ports = {p["name"]: p["containerPort"] for p in x.get("ports", [])}
            assert pm["port"] in ports, f"{role} sidecar {x['name']} has no port named {pm['port']!r}: {ports}"
            args = x.get("args", [])
            for i, a in enumerate(args):  # the port it serves /metrics on is the one it declares
                if a == "--metrics-port":
                    assert args[i + 1] == str(ports[pm["port"]])
                elif a.startswith("--metrics-port="):
                    assert a.split("=", 1)[1] == str(ports[pm["port"]])


def test_runtime_dir_mode_lets_the_images_non_root_user_in():
    """The plugin creates <runtimeDir>/<uuid> as root; the Valve image's sidecars (non-root) create and open the
    control block in it."""
    mode = int(VALUES["devicePlugin"]["runtimeDirMode"], 8)
    uid = VALUES["operator"]["podSecurityContext"]["runAsUser"]
    assert uid != 0
    assert mode & 0o003 == 0o003, f"{oct(mode)}: uid {uid} can neither create nor open files in the folder"
    assert mode & 0o1000, "without the sticky bit one tenant can delete the other's control block"
