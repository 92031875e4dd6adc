"""`valve operator`: the kopf operator (issue 7)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("operator")
    def operator() -> None:
        """Run the colocation operator."""
        from valve.cli import not_yet

        not_yet(7, "valve operator")
