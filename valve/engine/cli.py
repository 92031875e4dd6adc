"""`valve bench ...`: end-to-end benchmarks."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Benchmarks.", no_args_is_help=True)


def colocation(
    quick: bool = typer.Option(False, "--quick", help="Short windows (GPU < 90 s, CPU a few seconds)."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Directory for the JSON, PNG and table."),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when NVML sees a GPU)."),
    online_model: str | None = typer.Option(None, help="Online model shape (llama-1b on GPU, tiny on CPU)."),
    offline_model: str | None = typer.Option(None, help="Offline model shape."),
    seconds: float | None = typer.Option(None, min=0.5, help="Load window per variant, seconds."),
    busy: float | None = typer.Option(None, min=0.01, max=0.95, help="Target online busy fraction."),
    rate: float | None = typer.Option(None, min=0.01, help="Online requests/s (skips calibration)."),
    arrival: str | None = typer.Option(None, help="poisson, gamma or onoff."),
    cv: float | None = typer.Option(None, help="Gamma arrivals: CV of the gaps."),
    variants: str | None = typer.Option(None, help="Comma list (default: all): online-alone, offline-alone, "
                                                   "time-slicing, valve, mps."),
    seed: int | None = typer.Option(None, help="Seed of the request trace and the weights."),
    output_mean: float | None = typer.Option(None, help="Mean online output tokens."),
    prompt_mean: float | None = typer.Option(None, help="Mean online prompt tokens."),
    offline_warmup: float | None = typer.Option(None, help="Offline seconds before each window."),
    graphs: bool | None = typer.Option(None, "--graphs/--no-graphs", help="Online decode through CUDA graphs."),
    keep_logs: bool = typer.Option(False, "--keep-logs", help="Copy the children's logs under --out."),
) -> None:
    """Online + offline LLM inference on one device: alone, time-slicing, Valve, MPS; TTFT/TPOT and tokens/s."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from valve.engine.colocation import run_benchmark, settings_from, table_text

    chosen = tuple(v.strip() for v in variants.split(",") if v.strip()) if variants else None
    s = settings_from(device, quick, online_model=online_model, offline_model=offline_model, seconds=seconds,
                      busy=busy, rate=rate, arrival=arrival, cv=cv, variants=chosen, seed=seed,
                      output_mean=output_mean, prompt_mean=prompt_mean, offline_warmup=offline_warmup,
                      graphs=graphs, keep_logs=keep_logs or None)
    console = Console()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("colocation", total=1.0)

        def progress(name: str, frac: float) -> None:
            bar.update(task, completed=frac, description=f"colocation: {name}")

        try:
            result = run_benchmark(s, out, progress, console)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
    typer.echo(table_text(result), nl=False)
    typer.echo("wrote " + ", ".join(result["files"]))


app.command("colocation")(colocation)


@app.command("list")
def list_benchmarks() -> None:
    """List the benchmarks."""
    typer.echo("colocation  online + offline LLM serving on one GPU (TTFT, TPOT, offline tokens/s)")
