"""`valve simulate ...`: fleet simulation."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Simulations.", no_args_is_help=True)


@app.command()
def cluster(
    gpus: int = typer.Option(8054, min=1, help="GPUs in the fleet."),
    gpus_per_node: int = typer.Option(8, min=1, help="GPUs per node."),
    hours: float = typer.Option(24.0, min=0.1, help="Simulated horizon (synthetic traces)."),
    bin_minutes: float = typer.Option(1.0, min=0.01, help="Time bin (synthetic traces)."),
    services: int = typer.Option(240, min=1, help="Online services (synthetic traces)."),
    online_fraction: float = typer.Option(0.5, min=0.0, max=1.0,
                                          help="Share of today's GPUs serving online (synthetic traces)."),
    burst_cv: float | None = typer.Option(None, min=0.0, help="CV of the per-bin burst factor, all classes "
                                          "(default: per class)."),
    arrival_cv: float | None = typer.Option(None, min=0.0, help="CV of request inter-arrival times, all "
                                            "classes (default: per class)."),
    trace: Path | None = typer.Option(None, help="CSV of per-service request rates instead of synthetic traces."),
    gpu_seconds_per_request: float = typer.Option(0.05, min=1e-6,
                                                  help="CSV default GPU-busy seconds per request."),
    slo: float = typer.Option(5.0, min=1.0, help="Online p99 latency bound, as a multiple of unloaded p99."),
    offline_backlog: float = typer.Option(2.0, min=0.0, help="Offline work, in horizons of today's offline GPUs."),
    offline_job_hours: float = typer.Option(1.0, min=1e-3, help="Mean offline job size (GPU-hours)."),
    offline_job_sigma: float = typer.Option(0.5, min=0.0, help="Lognormal sigma of offline job sizes."),
    seed: int = typer.Option(0, help="Random seed (runs are reproducible under a seed)."),
    results_dir: Path = typer.Option(Path("bench/results"), help="Where the GPU benchmark JSON is read from."),
    calibration: Path | None = typer.Option(None, help="JSON {field: value} that overrides the calibration."),
    out_dir: Path = typer.Option(Path("bench/results"), help="Where cluster_<name>.json/.png are written."),
    name: str = typer.Option("default", help="Output name: cluster_<name>.json and cluster_<name>.png."),
    plot: bool = typer.Option(True, help="Write the PNG figure."),
) -> None:
    """Simulate a GPU fleet: dedicated GPUs vs naive sharing (time-slicing) vs Valve."""
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    import time

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from valve.simulate import fleet, report, traces
    from valve.simulate.calibration import load_calibration

    console = Console()
    t0 = time.perf_counter()
    try:
        cal, notes = load_calibration(results_dir, calibration)
    except ValueError as e:
        console.print(f"[red]valve simulate cluster: {e}[/red]")
        raise typer.Exit(code=2) from e
    console.print(report.calibration_table(cal, notes))
    cfg = fleet.FleetConfig(gpus=gpus, gpus_per_node=gpus_per_node, online_fraction=online_fraction, slo=slo,
                            offline_backlog=offline_backlog, offline_job_hours=offline_job_hours,
                            offline_job_sigma=offline_job_sigma, seed=seed)
    with Progress(TextColumn("{task.description:<48}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: float, total: float) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total or 1.0)
            bar.update(tasks[stage], completed=done, total=total or 1.0)

        try:
            progress("online traces", 0, 1)
            if trace is not None:
                work = traces.read_csv(trace, gpu_s_per_request=gpu_seconds_per_request)
            else:
                work = traces.synthetic(services, hours, bin_minutes, seed, burst_cv=burst_cv, arrival_cv=arrival_cv)
                work = fleet.scale_to_online_gpus(work, int(round(gpus * online_fraction)), slo, cfg.min_replicas)
            progress("online traces", 1, 1)
            res = fleet.simulate(work, cfg, cal, progress)
        except ValueError as e:  # TraceError included
            bar.stop()
            console.print(f"[red]valve simulate cluster: {e}[/red]")
            raise typer.Exit(code=2) from e
        res["trace"] = str(trace) if trace is not None else "synthetic"
        res["calibration_notes"] = notes
        res["options"] = options
        json_path = out_dir / f"cluster_{name}.json"
        png_path = out_dir / f"cluster_{name}.png"
        if plot:
            progress("plots", 0, 1)
            report.plot(res, png_path)
            progress("plots", 1, 1)
        res["wall_seconds"] = round(time.perf_counter() - t0, 2)
        report.write_json(res, json_path)
    console.print(report.results_table(res))
    console.print(f"placement round: {res['placement']['pairs']:,} pairs on {res['fleet']['nodes']:,} nodes in "
                  f"{res['placement']['seconds'] * 1000:.1f} ms; wall time {res['wall_seconds']:.1f} s")
    console.print(f"wrote {json_path}" + (f" and {png_path}" if plot else ""))
