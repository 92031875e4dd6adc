"""The dependency split in pyproject.toml matches the code.

Imports are followed through valve's own modules (ast, not importing them): the in-engine client must import
with the base install, and each command or component must import only what its extra declares. The `valve`
launcher's table of extras must name the same packages as pyproject.toml.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from valve import __version__, launcher

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# the in-engine client: imported by the engine's process, so the base install must do
CLIENT = ("valve.runtime.gate.offline", "valve.runtime.online.signal", "valve.runtime.control")
# the modules that define each `valve` command (besides valve.cli, which imports all of them)
COMMAND_MODULES = {
    "operator": ("valve.operator.cli",),
    "device-plugin": ("valve.device_plugin.cli",),
    "dra-driver": ("valve.dra.cli", "valve.dra.server", "valve.dra.driver", "valve.dra.slices", "valve.dra.metrics"),
    "runtime": ("valve.runtime.cli",),
    "crds": ("valve.api.cli",),
    "pod-init": ("valve.operator.podinit",),
    "demo": ("valve.demo", "valve.demo_node"),
    "top": ("valve.top",),
    "simulate": ("valve.simulate.cli",),
}
# entry points that are not `valve` commands: `python -m ...` processes and libraries, by extra
EXTRA_MODULES = {
    "engine": ("valve.engine.server", "valve.engine.offline"),
    "cuda": ("valve.runtime.memory.client", "valve.runtime.gate.cuda"),
    # bench/ runs from a checkout (it is not installed); the extra is what it needs
    "bench": ("bench.colocation", "bench.harness.loadgen"),
}
# GPU and model backends: imported inside functions only, from the `torch`, `cuda` and `transformers` extras the
# machine chooses (--engine transformers checks for transformers and names the fix)
GPU = {"torch", "cuda", "transformers"}


def normalise(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def declared(extra: str | None) -> set[str]:
    """Distributions the base install plus `extra` brings (directly), following valve[...] references."""
    out, todo, seen = set(), [*PYPROJECT["dependencies"]], set()
    if extra:
        todo += PYPROJECT["optional-dependencies"][extra]
    while todo:
        m = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", todo.pop())
        name, extras = normalise(m.group(1)), m.group(2)
        if name != "valve":
            out.add(name)
            continue
        for e in (x.strip() for x in extras.split(",")):
            if e not in seen:
                seen.add(e)
                todo += PYPROJECT["optional-dependencies"][e]
    return out


@cache
def dists() -> dict[str, set[str]]:
    return {top: {normalise(d) for d in ds} for top, ds in packages_distributions().items()}


def provided_by(module: str) -> set[str]:
    """Distributions that install the top-level package of `module` (its own name if none is installed)."""
    top = module.split(".")[0]
    return dists().get(top, {normalise(top)})


def module_path(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for p in (base / "__init__.py", base.with_suffix(".py")):
        if p.is_file():
            return p
    return None


def imports(name: str, module_level: bool) -> set[str]:
    """Absolute names `name` imports: at module level, or anywhere (functions' lazy imports too)."""
    path = module_path(name)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                out.add(base)
                out.update(f"{base}.{a.name}" for a in child.names if module_path(f"{base}.{a.name}"))
            if not (module_level and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)):
                visit(child)

    visit(ast.parse(path.read_text()))
    return out


def third_party(entries, module_level: bool) -> dict[str, str]:
    """Top-level non-stdlib imports reachable from `entries` through valve's (and bench's) modules: {name: first importer}."""
    missing = [e for e in entries if module_path(e) is None]
    assert not missing, f"no such modules (renamed?): {missing}"
    seen: set[str] = set()
    todo = list(entries)
    found: dict[str, str] = {}
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c imports a and a.b first
            mod = ".".join(parts[:i])
            if mod in seen or module_path(mod) is None:
                continue
            seen.add(mod)
            for imp in imports(mod, module_level):
                top = imp.split(".")[0]
                if top in ("valve", "bench"):
                    todo.append(imp)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, mod)
    return found


def undeclared(found: dict[str, str], extra: str | None, gpu: bool) -> list[str]:
    allowed = declared(extra)
    return sorted(f"{m} (imported by {by})" for m, by in found.items()
                  if not (gpu and m in GPU) and not provided_by(m) & allowed)


def test_the_in_engine_client_imports_with_the_base_install():
    assert undeclared(third_party(CLIENT, module_level=True), None, gpu=False) == []
    assert undeclared(third_party(CLIENT, module_level=False), None, gpu=True) == []


def test_the_base_install_is_the_standard_library():
    assert PYPROJECT["dependencies"] == []


@pytest.mark.parametrize("command", sorted(COMMAND_MODULES))
def test_each_command_imports_only_what_its_extra_declares(command):
    extra = launcher.COMMANDS[command]
    found = third_party(["valve.cli"], module_level=True) | third_party(COMMAND_MODULES[command], module_level=False)
    assert undeclared(found, extra, gpu=True) == [], f"valve {command} imports packages valve[{extra}] lacks"


@pytest.mark.parametrize("extra", sorted(EXTRA_MODULES))
def test_each_component_imports_only_what_its_extra_declares(extra):
    assert undeclared(third_party(EXTRA_MODULES[extra], module_level=False), extra, gpu=True) == []


def test_the_walk_sees_lazy_imports_and_undeclared_packages():
    found = third_party(["valve.runtime.online.proxy"], module_level=False)
    assert {"aiohttp", "yarl", "prometheus_client"} <= set(found)
    assert "torch" in third_party(["valve.runtime.gate.offline"], module_level=False)
    assert "torch" not in third_party(["valve.runtime.gate.offline"], module_level=True)
    assert undeclared(found, "demo", gpu=True)  # the demo extra has no aiohttp


def test_every_command_has_an_extra_in_the_launcher():
    import typer.main

    from valve.cli import app

    commands = set(typer.main.get_command(app).commands) - {"version"}
    assert commands == set(launcher.COMMANDS) == set(COMMAND_MODULES)
    assert set(launcher.COMMANDS.values()) <= set(launcher.EXTRAS)


@pytest.mark.parametrize("extra", sorted(launcher.EXTRAS))
def test_the_launchers_extras_are_pyprojects(extra):
    """The launcher checks a module of every package the extra declares, and only those."""
    want = declared(extra)
    modules = launcher.EXTRAS[extra]
    assert [m for m in modules if not provided_by(m) & want] == []
    assert want - set().union(*(provided_by(m) for m in modules)) == set()


def run_without_site_packages(*code: str) -> subprocess.CompletedProcess:
    """Python with only the standard library and this checkout: what `pip install valve` gives the engine."""
    return subprocess.run([sys.executable, "-S", "-c", *code], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT)})


def test_the_client_imports_without_site_packages():
    r = run_without_site_packages("import valve.runtime.gate.offline, valve.runtime.online.signal, valve.runtime.control")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("argv", "code", "stream", "text"), [
    (["operator"], 2, "stderr", "valve operator needs the 'node' extra: pip install 'valve[node]'\n"),
    (["runtime", "proxy", "--help"], 2, "stderr", "valve runtime needs the 'node' extra: pip install 'valve[node]'\n"),
    (["demo"], 2, "stderr", "valve demo needs the 'demo' extra: pip install 'valve[demo]'\n"),
    (["version"], 0, "stdout", f"valve {__version__}\n"),
    (["--help"], 0, "stdout", "usage: valve COMMAND"),
    ([], 2, "stderr", "usage: valve COMMAND"),
])
def test_the_cli_starts_with_the_base_install(argv, code, stream, text):
    r = run_without_site_packages("import sys; from valve.launcher import main; sys.exit(main(sys.argv[1:]))", *argv)
    assert r.returncode == code, r.stderr
    assert getattr(r, stream).startswith(text)


def test_the_cli_names_the_missing_extra_when_one_package_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(launcher, "installed", lambda m: m != "kopf")
    assert launcher.main(["operator", "--help"]) == 2
    assert capsys.readouterr().err == "valve operator needs the 'node' extra: pip install 'valve[node]'\n"


def test_the_cli_runs_the_command_when_its_extra_is_installed(capsys):
    with pytest.raises(SystemExit) as e:
        launcher.main(["version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"valve {__version__}\n"
