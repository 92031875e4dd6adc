"""`valve operator`: the kopf operator that places ColocationPairs (see docs/operator.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from valve.api.contract import ENV_IMAGE, ENV_METRICS_ADDR, PODINFO_FILE, RUNTIME_DIR, SIDECAR_GPU_DIR

GC_YOUNG = 50_000  # allocations between young collections (Python's default: 700)


def tune_gc() -> None:
    """Fewer garbage collections for the operator process. Each watch event allocates thousands of short-lived
    objects (kopf's per-event state, parsed JSON): at Python's default threshold they survive into the older
    generations and trigger full collections over every stored object, about half the operator's CPU at 1,000
    pairs. Objects made at start (modules, the client) are frozen out of the collector's walks."""
    import gc

    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


def register(app: typer.Typer) -> None:
    @app.command("operator")
    def operator(
        namespace: list[str] = typer.Option(
            [], "--namespace", "-n", help="Watch only this namespace (repeatable). Default: all namespaces."
        ),
        all_namespaces: bool = typer.Option(
            False, "--all-namespaces", "-A", help="Watch every namespace (the default; excludes --namespace)."
        ),
        metrics_port: int = typer.Option(9090, min=0, max=65535, help="Prometheus /metrics port (0: off)."),
        health_port: int = typer.Option(8080, min=0, max=65535, help="Liveness /healthz port (0: off)."),
        metrics_addr: str = typer.Option("0.0.0.0", envvar=ENV_METRICS_ADDR,
                                         help="Bind address of /metrics (an IP address or host name; the chart: "
                                              "the pod IP)."),
        health_addr: str | None = typer.Option(None, envvar=ENV_METRICS_ADDR,
                                               help="Bind address of /healthz (default: --metrics-addr)."),
        log_level: str = typer.Option("info", help="debug, info, warning or error."),
        sidecar_image: str = typer.Option(
            "valve:0.1.0", envvar=ENV_IMAGE, help="Image of the proxy and arbiter sidecars."
        ),
        allowed_sidecar_image: list[str] = typer.Option(
            [], "--allowed-sidecar-image",
            help="An image a pair may name for its sidecars besides --sidecar-image (repeatable); any other is "
                 "refused (ImageNotAllowed).",
        ),
        sidecar_metrics_port: int = typer.Option(9400, min=1, max=65535, help="/metrics port of the sidecars."),
        sidecar_metrics_addr: str = typer.Option(
            "", help="Bind address of the sidecars' /metrics (empty: each pod's IP, from the downward API)."),
        runtime_dir: str = typer.Option(RUNTIME_DIR, help="Host folder of the per-GPU control blocks."),
        resync_seconds: float = typer.Option(30.0, min=0.1, help="Reconcile every pair this often."),
        peering: str | None = typer.Option(
            None, help="kopf peering name for several replicas (needs kopf's peering CRDs). Default: standalone."
        ),
        webhook_port: int = typer.Option(
            0, min=0, max=65535,
            help="Serve the pod-injection admission webhook for ColocationPolicies over HTTPS on this port (0: off).",
        ),
        webhook_cert_dir: str | None = typer.Option(
            None, help="Folder with the webhook's tls.crt and tls.key (re-read when they change)."
        ),
    ) -> None:
        """Run the colocation operator (kopf): places ColocationPairs, creates their pods, writes status."""
        import asyncio
        import logging

        from valve.operator.main import run_operator
        from valve.operator.pods import OperatorConfig

        level = getattr(logging, log_level.upper(), None)
        if not isinstance(level, int):
            raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
        if all_namespaces and namespace:
            raise typer.BadParameter("use either --namespace or --all-namespaces", param_hint="--namespace")
        from valve.netaddr import check_host, host_port

        try:
            metrics_addr = check_host(metrics_addr, "--metrics-addr")
            health_addr = check_host(health_addr, "--health-addr") if health_addr else metrics_addr
            sidecar_metrics_addr = check_host(sidecar_metrics_addr, "--sidecar-metrics-addr") \
                if sidecar_metrics_addr else ""
        except ValueError as e:
            typer.echo(f"valve operator: {e}", err=True)
            raise typer.Exit(code=2) from None
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if metrics_port:
            from prometheus_client import start_http_server

            try:
                start_http_server(metrics_port, addr=metrics_addr)
            except OSError as e:
                typer.echo(f"valve operator: --metrics-port: cannot listen on {host_port(metrics_addr, metrics_port)}: "
                           f"{e.strerror or e}", err=True)
                raise typer.Exit(code=2) from None
        liveness = f"http://{host_port(health_addr, health_port)}/healthz" if health_port else None
        if health_port:
            from valve.netaddr import check_bindable

            try:
                check_bindable(health_addr, health_port)
            except OSError as e:
                typer.echo(f"valve operator: --health-port: cannot listen on {host_port(health_addr, health_port)}: "
                           f"{e.strerror or e}", err=True)
                raise typer.Exit(code=2) from None
        webhook = None
        if webhook_port:
            from valve.operator.main import webhook_server

            try:
                webhook = webhook_server(webhook_port, webhook_cert_dir)
            except ValueError as e:
                typer.echo(f"valve operator: --webhook-cert-dir: {e}", err=True)
                raise typer.Exit(code=2) from None
        from valve.operator.kube import load_api_client

        try:
            api_client = load_api_client()
        except Exception as e:  # no in-cluster config and no usable kubeconfig: one line, not a traceback
            typer.echo(f"valve operator: no Kubernetes API access: {str(e).splitlines()[0] if str(e) else e!r}",
                       err=True)
            raise typer.Exit(code=2) from None
        cfg = OperatorConfig(sidecar_image=sidecar_image, runtime_dir=runtime_dir, metrics_port=sidecar_metrics_port,
                             metrics_addr=sidecar_metrics_addr, allowed_images=tuple(allowed_sidecar_image))
        tune_gc()
        asyncio.run(run_operator(cfg=cfg, namespaces=namespace, api_client=api_client, resync_seconds=resync_seconds,
                                 liveness_endpoint=liveness, peering=peering, webhook=webhook))

    @app.command("pod-init")
    def pod_init(
        gpu_from: Path = typer.Option(Path(PODINFO_FILE), help="The pod's downward-API annotations file."),
        links: Path = typer.Option(Path(RUNTIME_DIR), help="Folder to write the link <gpu-uuid> in."),
        target: Path = typer.Option(Path(SIDECAR_GPU_DIR), help="Where the sidecars mount their GPU's folder."),
        gpu_wait_seconds: float = typer.Option(300.0, min=0.0, help="How long to wait for the GPU annotation."),
        gpus: int = typer.Option(1, min=1, help="GPUs the pod holds; several: link each to <target>-<i>."),
    ) -> None:
        """Init container of Valve's and injected pods: wait for the GPU annotation(s), link the sidecars' GPU
        folder(s)."""
        from valve.operator.podinit import indexed_target, run

        try:
            uuids = run(gpu_from, links, target, gpu_wait_seconds, gpus=gpus)
        except (OSError, TimeoutError, ValueError) as e:
            typer.echo(f"valve pod-init: {e}", err=True)
            raise typer.Exit(code=2) from None
        if gpus == 1:
            typer.echo(f"valve pod-init: {links / uuids} -> {target}")
        for i, uuid in enumerate(uuids.split(",") if gpus > 1 else ()):
            typer.echo(f"valve pod-init: {links / uuid} -> {indexed_target(target, i)}")
