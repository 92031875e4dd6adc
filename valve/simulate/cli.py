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
                                                  help="--trace default GPU-busy seconds per request."),
    requests: Path | None = typer.Option(None, help="CSV with one row per request: arrival_s, prompt_tokens, "
                                         "output_tokens[, service] (see docs/simulate.md)."),
    slo: float = typer.Option(5.0, min=1.0, help="Online p99 latency bound, as a multiple of unloaded p99."),
    offline_backlog: float = typer.Option(2.0, min=0.0, help="Offline work, in horizons of today's offline GPUs."),
    offline_job_hours: float = typer.Option(1.0, min=1e-3, help="Mean offline job size (GPU-hours)."),
    offline_job_sigma: float = typer.Option(0.5, min=0.0, help="Lognormal sigma of offline job sizes."),
    seed: int = typer.Option(0, help="Random seed (runs are reproducible under a seed)."),
    calibration: Path | None = typer.Option(None, help="Calibration JSON (default: the packaged "
                                            "valve/simulate/calibration_h100.json)."),
    out: Path = typer.Option(..., help="Directory for cluster_<name>.json/.png (and the sweep's files)."),
    name: str = typer.Option("default", help="Output name: cluster_<name>.json and cluster_<name>.png."),
    plot: bool = typer.Option(True, help="Write the PNG figure."),
    sweep: bool = typer.Option(False, help="Sensitivity sweep instead (synthetic traces): writes "
                               "cluster_<name>_sweep.json/.png."),
) -> None:
    """Simulate a GPU fleet: dedicated GPUs vs time-slicing vs MPS vs Valve."""
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in locals().items()}
    import time

    from valve.outpath import check_dir

    try:  # before the run: a long simulation must not end on an unwritable folder
        check_dir(out)
    except ValueError as e:
        typer.echo(f"valve simulate cluster: {e}", err=True)
        raise typer.Exit(code=2) from None

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from valve.simulate import calibration as calib
    from valve.simulate import fleet, report, traces
    from valve.simulate import sweep as sweeps

    console = Console()
    t0 = time.perf_counter()
    if sweep and (trace is not None or requests is not None):
        console.print("[red]valve simulate cluster: --sweep varies the synthetic traces; drop --trace/--requests[/red]")
        raise typer.Exit(code=2)
    try:
        cal = calib.load(calibration)
    except ValueError as e:
        console.print(f"[red]valve simulate cluster: {e}[/red]")
        raise typer.Exit(code=2) from e
    console.print(f"calibration: {cal.path}" + (" (packaged default)" if calibration is None else ""))
    console.print(f"output: {out.resolve()}")
    console.print(report.calibration_table(cal))
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
            if sweep:
                base = sweeps.Setting(cfg, cal, services, hours, bin_minutes, burst_cv, online_fraction)
                res = sweeps.run(base, lambda stage, d, n: progress(stage, d, n))
                res["options"] = options
                json_path, png_path = out / f"cluster_{name}_sweep.json", out / f"cluster_{name}_sweep.png"
                if plot:
                    sweeps.plot(res, png_path)
                res["wall_seconds"] = round(time.perf_counter() - t0, 2)
                report.write_json(res, json_path)
                bar.stop()
                console.print(report.sweep_table(res))
                console.print(f"wrote {json_path}" + (f" and {png_path}" if plot else ""))
                return
            progress("online traces", 0, 1)
            if requests is not None:
                work = traces.read_requests(requests, bin_minutes)
            elif trace is not None:
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
        res["trace"] = str(requests or trace or "synthetic")
        res["options"] = options
        json_path = out / f"cluster_{name}.json"
        png_path = out / f"cluster_{name}.png"
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
