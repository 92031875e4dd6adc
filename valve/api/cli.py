"""`valve crds ...`: CRDs generated from the pydantic models (issue 7)."""

import typer

app = typer.Typer(help="Custom resource definitions.", no_args_is_help=True)


@app.command()
def generate() -> None:
    """Write crds/*.yaml from the models in valve.api."""
    from valve.cli import not_yet

    not_yet(7, "valve crds generate")
