"""The `valve` command. Standard library only: the base install (the in-engine client) has no CLI packages, so
this names the extra a command needs before `valve.cli` imports typer and the command's modules."""

from __future__ import annotations

import sys
from importlib.util import find_spec

# extra -> the modules its packages provide (tests/test_install.py checks this against pyproject.toml)
EXTRAS = {
    "node": ("typer", "kopf", "kubernetes", "grpc", "google.protobuf", "pynvml", "pydantic", "prometheus_client",
             "yaml", "aiohttp", "yarl", "numpy"),
    "demo": ("typer", "rich", "pydantic", "prometheus_client"),
    "simulate": ("typer", "rich", "numpy", "pydantic", "matplotlib"),
}

# command -> the extra it needs; `version` needs none
COMMANDS = {
    "operator": "node",
    "device-plugin": "node",
    "dra-driver": "node",
    "runtime": "node",
    "crds": "node",
    "pod-init": "node",
    "demo": "demo",
    "top": "demo",
    "simulate": "simulate",
}


def installed(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def missing(extra: str) -> list[str]:
    return [m for m in EXTRAS[extra] if not installed(m)]


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: valve COMMAND [ARGS]...", "",
             "Colocate latency-critical online LLM inference with offline batch inference on one GPU.",
             "This install is the in-engine client only; each command needs an extra:", ""]
    lines += [f"  {c:<{width}}  pip install 'valve[{e}]'" for c, e in COMMANDS.items()]
    lines.append(f"  {'version':<{width}}  (no extra)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The exit status (the console script exits with it); with typer installed, `valve.cli` takes over."""
    args = sys.argv[1:] if argv is None else argv
    command = next((a for a in args if not a.startswith("-")), None)
    extra = COMMANDS.get(command)
    if extra and missing(extra):
        print(f"valve {command} needs the '{extra}' extra: pip install 'valve[{extra}]'", file=sys.stderr)
        return 2
    if installed("typer"):
        from valve.cli import app

        app(args=args, prog_name="valve")
        return 0
    if command == "version":
        from valve import __version__

        print(f"valve {__version__}")
        return 0
    if command is None and {"--help", "-h"} & set(args):
        print(usage())
        return 0
    print(usage(), file=sys.stderr)
    return 2
