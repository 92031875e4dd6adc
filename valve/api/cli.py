"""`valve crds ...`: CRDs generated from the pydantic models."""

from pathlib import Path

import typer

app = typer.Typer(help="Custom resource definitions.", no_args_is_help=True)


@app.command()
def generate(
    out: Path = typer.Option(Path("crds"), "--out", "-o", help="Folder to write the CRD YAML files into."),
    check: bool = typer.Option(False, "--check", help="Write nothing; exit 1 if the files in --out are stale."),
) -> None:
    """Write crds/*.yaml from the models in valve.api."""
    from valve.api import crds

    if check:
        stale = crds.stale(out)
        for name in stale:
            typer.echo(f"stale: {out / name} (run `valve crds generate`)", err=True)
        raise typer.Exit(code=1 if stale else 0)
    from valve.outpath import check_dir

    try:
        check_dir(out)
    except ValueError as e:
        typer.echo(f"valve crds generate: {e}", err=True)
        raise typer.Exit(code=2) from None
    for path in crds.generate(out):
        typer.echo(f"wrote {path}")


@app.command()
def show() -> None:
    """Print the CRDs as YAML to stdout (e.g. `valve crds show | kubectl apply -f -`)."""
    from valve.api import crds

    typer.echo("---\n".join(crds.render(crd) for crd in crds.all_crds().values()), nl=False)
