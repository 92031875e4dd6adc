"""The `valve` command line. Each component owns its sub-commands in `valve/<component>/cli.py`."""

from __future__ import annotations

import typer

from valve import __version__
from valve.api.cli import app as crds_app
from valve.device_plugin.cli import register as register_device_plugin
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
register_operator(app)


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
) -> None:
    """Run online + offline on a simulated GPU node, with and without Valve's gate."""
    from valve.demo import run_demo

    run_demo(seconds=seconds, seed=seed, gpus=gpus, json_out=json_out)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
