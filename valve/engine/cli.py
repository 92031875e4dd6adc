"""`valve bench ...`: end-to-end benchmarks (issue 5)."""

import typer

app = typer.Typer(help="Benchmarks.", no_args_is_help=True)


@app.command()
def colocation() -> None:
    """Online + offline colocation benchmark."""
    from valve.cli import not_yet

    not_yet(5, "valve bench colocation")
