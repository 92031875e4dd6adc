"""`valve runtime ...`: the in-pod runtime (issue 3)."""

import typer

app = typer.Typer(help="The in-pod runtime: per-GPU arbiter and online proxy.", no_args_is_help=True)


@app.command()
def arbiter() -> None:
    """Run the per-GPU arbiter sidecar."""
    from valve.cli import not_yet

    not_yet(3, "valve runtime arbiter")


@app.command()
def proxy() -> None:
    """Run the online reverse proxy sidecar."""
    from valve.cli import not_yet

    not_yet(3, "valve runtime proxy")
