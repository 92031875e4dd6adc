"""`valve simulate ...`: fleet simulation (issue 9)."""

import typer

app = typer.Typer(help="Simulations.", no_args_is_help=True)


@app.command()
def cluster() -> None:
    """Simulate colocation savings on a GPU fleet."""
    from valve.cli import not_yet

    not_yet(9, "valve simulate cluster")
