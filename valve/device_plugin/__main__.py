"""`python -m valve.device_plugin ...`: the same as `valve device-plugin ...`."""

import typer

from valve.device_plugin.cli import register

app = typer.Typer(add_completion=False)
register(app)

if __name__ == "__main__":
    app()
