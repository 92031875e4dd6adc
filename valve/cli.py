"""The `valve` command line. Each component owns its sub-commands in `valve/<component>/cli.py`."""

from __future__ import annotations

import typer

from valve import __version__
from valve.api.cli import app as crds_app
from valve.api.contract import ENV_RUNTIME_DIR, RUNTIME_DIR
from valve.device_plugin.cli import register as register_device_plugin
from valve.dra.cli import register as register_dra_driver
from valve.operator.cli import register as register_operator
from valve.runtime.cli import app as runtime_app
from valve.simulate.cli import app as simulate_app

app = typer.Typer(
    name="valve",
    help="Colocate latency-critical online LLM inference with offline batch inference on one GPU.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(runtime_app, name="runtime")
app.add_typer(crds_app, name="crds")
app.add_typer(simulate_app, name="simulate")
register_device_plugin(app)
register_dra_driver(app)
register_operator(app)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"valve {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print Valve's version and exit.")) -> None:
    """Colocate latency-critical online LLM inference with offline batch inference on one GPU."""


@app.command()
def version() -> None:
    """Print Valve's version."""
    typer.echo(f"valve {__version__}")


@app.command()
def demo(
    seconds: float = typer.Option(60.0, min=1.0, help="Simulated seconds of traffic per variant."),
    seed: int = typer.Option(0, help="Random seed (runs are deterministic under a seed)."),
    gpus: int = typer.Option(1, min=1, max=16, help="Virtual GPUs on the simulated node."),
    json_out: str | None = typer.Option(None, "--json", help="Also write the results as JSON to this path."),
    serve: bool = typer.Option(False, "--serve", help="Instead: keep a simulated node running in real time "
                               "(control blocks under --runtime-dir) until interrupted, for `valve top`."),
    runtime_dir: str | None = typer.Option(None, "--runtime-dir", envvar=ENV_RUNTIME_DIR,
                                           help="With --serve: the runtime root (default: a new temporary folder)."),
    rate: float = typer.Option(8.0, "--rate", min=0.01, help="With --serve: online requests/s per GPU."),
) -> None:
    """Run online + offline on a simulated GPU node, with and without Valve's gate."""
    if serve:
        serve_node(runtime_dir, gpus, rate, seed)
        return
    if json_out:
        from valve.outpath import check_file

        try:
            check_file(json_out, "--json")
        except ValueError as e:
            typer.echo(f"valve demo: {e}", err=True)
            raise typer.Exit(code=2) from None
    from valve.demo import run_demo

    run_demo(seconds=seconds, seed=seed, gpus=gpus, json_out=json_out)


def serve_node(runtime_dir: str | None, gpus: int, rate: float, seed: int) -> None:
    import tempfile
    import threading

    from valve.demo_node import serve as serve_sim
    from valve.signals import stop_on_signals

    root = runtime_dir or tempfile.mkdtemp(prefix="valve-demo-")
    stop = threading.Event()
    stop_on_signals(stop)
    typer.echo(f"simulated node: {gpus} GPU(s) under {root}; watch it with: valve top --runtime-dir {root}",
               err=True)
    serve_sim(root, gpus, rate, seed, stop)


@app.command()
def top(
    runtime_dir: str = typer.Option(RUNTIME_DIR, "--runtime-dir", envvar=ENV_RUNTIME_DIR,
                                    help="The node's runtime root (one folder per GPU)."),
    interval: float = typer.Option(1.0, "--interval", min=0.05, help="Seconds between refreshes (and between "
                                   "the two reads --once takes for rates)."),
    once: bool = typer.Option(False, "--once", help="One view (two reads --interval apart), then exit."),
    json_out: bool = typer.Option(False, "--json", help="With --once: print JSON instead of a table."),
) -> None:
    """A live view of this node's GPUs: gate, online, preemptions, offline progress, pool, heartbeat."""
    from valve import top as t

    if json_out and not once:
        typer.echo("valve top: --json needs --once", err=True)
        raise typer.Exit(code=2)
    if json_out:
        import json

        typer.echo(json.dumps(t.snapshot(runtime_dir, interval), indent=2))
    elif once:
        t.once(runtime_dir, interval)
    else:
        t.live(runtime_dir, interval)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
