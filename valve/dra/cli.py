"""`valve dra-driver`: the DRA kubelet plugin for Valve's GPUs."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

from valve.api.contract import ENV_METRICS_ADDR, PRELOAD_LIBRARY, RUNTIME_DIR
from valve.api.dra import DRIVER
from valve.device_plugin.cli import BackendName

METRICS_PORT = 9403  # the device plugin's is 9402: the two never run on one node, but apart they are clearer
PLUGIN_DIR = f"/var/lib/kubelet/plugins/{DRIVER}"
REGISTRY_DIR = "/var/lib/kubelet/plugins_registry"
CDI_DIR = "/var/run/cdi"


def register(app: typer.Typer) -> None:
    @app.command("dra-driver")
    def dra_driver(
        backend: BackendName = typer.Option(BackendName.nvml, help="GPU discovery: NVML, or simulated GPUs."),
        sim_gpus: int = typer.Option(4, min=1, max=64, help="Virtual GPUs of the sim backend."),
        sim_node: str = typer.Option("sim-node", help="Seed of the sim backend's stable UUIDs."),
        node_name: str | None = typer.Option(None, envvar="NODE_NAME",
                                             help="This node's name: the ResourceSlice's node and pool."),
        plugin_dir: Path = typer.Option(Path(PLUGIN_DIR), help="Where the DRA socket (dra.sock) goes."),
        registry_dir: Path = typer.Option(Path(REGISTRY_DIR),
                                          help=f"The kubelet's plugin registry; {DRIVER}-reg.sock goes there."),
        cdi_dir: Path = typer.Option(Path(CDI_DIR), help="Where the container runtime reads CDI specs."),
        gpu_cdi_kind: str = typer.Option(
            "nvidia.com/gpu", help="CDI kind of the GPU itself (NVIDIA's spec, from `nvidia-ctk cdi generate`), "
            "added as <kind>=<uuid>; 'none': only Valve's spec (env, mounts)."),
        runtime_root: Path = typer.Option(Path(RUNTIME_DIR), help="Per-GPU runtime dirs <root>/<uuid>, mounted "
                                          "into the claim's containers."),
        runtime_dir_mode: str = typer.Option("0700", help="Octal mode of each <root>/<uuid> directory."),
        preload_library: str = typer.Option(PRELOAD_LIBRARY, help="libvalvegate.so on the node, for claims "
                                            "whose config asks for gate: preload."),
        state_dir: Path = typer.Option(Path("/var/lib/valve/dra"), help="Where checkpoint.json is kept."),
        publish: bool = typer.Option(True, "--publish/--no-publish",
                                     help="Publish this node's ResourceSlice (needs the RBAC in valve.dra.rbac)."),
        metrics_port: int = typer.Option(METRICS_PORT, min=0, max=65535, help="Prometheus port; 0 disables "
                                         "metrics."),
        metrics_addr: str = typer.Option("0.0.0.0", envvar=ENV_METRICS_ADDR,
                                         help="Prometheus bind address (an IP address or host name; the chart: "
                                              "the pod IP)."),
        log_level: str = typer.Option("info", help="debug, info, warning or error."),
    ) -> None:
        """Run the DRA kubelet plugin: one device per GPU in a ResourceSlice; claims prepared through CDI."""
        import logging
        import threading
        import time

        from valve.signals import stop_on_signals

        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            mode = int(runtime_dir_mode, 8)
        except ValueError:
            fail(f"--runtime-dir-mode {runtime_dir_mode!r}: expected an octal mode, e.g. 0700")
        if not node_name:
            fail("no node name: set NODE_NAME (the chart passes spec.nodeName) or --node-name")
        from valve.netaddr import check_host

        try:
            metrics_addr = check_host(metrics_addr, "--metrics-addr")
        except ValueError as e:
            fail(str(e))

        from valve import kubeclient
        from valve.api.dra import device_name
        from valve.dra.driver import Driver, DriverConfig, KubeClaims, first_line
        from valve.dra.metrics import DraMetrics
        from valve.dra.server import DraPlugin
        from valve.dra.slices import SlicePublisher, publish_loop, resource_slice

        if backend is BackendName.sim:
            from valve.device_plugin.backend import SimBackend

            gpu_backend = SimBackend(count=sim_gpus, node=sim_node)
        else:
            try:
                from valve.device_plugin.nvml import NvmlBackend

                gpu_backend = NvmlBackend()
            except Exception as e:
                fail(f"NVML is not available ({first_line(e)}): run it on a GPU node with the NVIDIA driver, "
                     "or --backend sim")
        gpus = gpu_backend.discover()
        if not gpus:
            fail("no GPU to offer (none found, or every GPU is in MIG mode)")
        try:
            api_client = kubeclient.load_api_client(user_agent="valve-dra-driver")
        except Exception as e:
            fail(f"no Kubernetes API access ({first_line(e)}): it reads ResourceClaims to prepare them")
        cfg = DriverConfig(node_name=node_name, cdi_dir=cdi_dir, runtime_root=runtime_root, state_dir=state_dir,
                           runtime_dir_mode=mode, preload_library=preload_library,
                           gpu_cdi_kind=None if gpu_cdi_kind.lower() in ("", "none") else gpu_cdi_kind)
        try:
            driver = Driver(cfg, gpus, KubeClaims(api_client), device_name)
        except (RuntimeError, ValueError) as e:  # an unreadable checkpoint, a UUID that makes no device name
            fail(str(e))
        metrics = DraMetrics()
        if metrics_port:
            try:
                metrics.serve(metrics_port, metrics_addr)
            except OSError as e:  # "--metrics-port: cannot listen on ...: Address already in use"
                fail(f"cannot serve: {first_line(e)}")
        plugin = DraPlugin(driver, plugin_dir, registry_dir, metrics=metrics)
        stop = threading.Event()
        stop_on_signals(stop)
        try:
            plugin.start()
        except (OSError, ValueError, RuntimeError) as e:
            metrics.close()
            fail(f"cannot serve: {first_line(e)}")
        threads = []
        if publish:
            body = resource_slice(node_name, gpus, gpu_backend.driver_version(), generation=int(time.time()))
            t = threading.Thread(target=publish_loop, args=(SlicePublisher(api_client), body, stop,
                                                            threading.Event()),
                                 kwargs={"metrics": metrics}, name="dra-slice", daemon=True)
            t.start()
            threads.append(t)
        try:
            stop.wait()
        finally:
            plugin.stop()
            for t in threads:
                t.join(5)
            gpu_backend.close()
            metrics.close()


def fail(message: str) -> NoReturn:
    """One line on stderr and exit 2."""
    typer.echo(f"valve dra-driver: {message}", err=True)
    raise typer.Exit(code=2)
