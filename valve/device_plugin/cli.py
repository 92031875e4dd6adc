"""`valve device-plugin`: the kubelet device plugin (issue 6)."""

import typer


def register(app: typer.Typer) -> None:
    @app.command("device-plugin")
    def device_plugin() -> None:
        """Run the kubelet device plugin."""
        from valve.cli import not_yet

        not_yet(6, "valve device-plugin")
