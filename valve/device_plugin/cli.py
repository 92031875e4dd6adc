"""`valve device-plugin`: the kubelet device plugin."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import NoReturn

import typer

from valve.api.contract import (
    ANN_GPU,
    ANN_ROLE,
    DEVICE_PLUGIN_DIR,
    ENV_METRICS_ADDR,
    OFFLINE_RESOURCE,
    ONLINE_RESOURCE,
    PIDS_FILE,
    POD_RESOURCES_SOCKET,
    RUNTIME_DIR,
)


class BackendName(StrEnum):
    nvml = "nvml"
    sim = "sim"


def register(app: typer.Typer) -> None:
    @app.command("device-plugin")
    def device_plugin(
        backend: BackendName = typer.Option(BackendName.nvml, help="GPU discovery: NVML, or simulated GPUs."),
        sim_gpus: int = typer.Option(4, min=1, max=64, help="Virtual GPUs of the sim backend."),
        sim_node: str = typer.Option("sim-node", help="Seed of the sim backend's stable UUIDs."),
        sim_mig: str = typer.Option("", help="Sim backend: indexes of GPUs in MIG mode (skipped), e.g. 0,2."),
        device_plugin_dir: Path = typer.Option(
            Path(DEVICE_PLUGIN_DIR), help="Where kubelet.sock is and our sockets go."
        ),
        online_resource: str = typer.Option(ONLINE_RESOURCE, help="Resource name of the online slots."),
        offline_resource: str = typer.Option(OFFLINE_RESOURCE, help="Resource name of the offline slots."),
        runtime_root: Path = typer.Option(
            Path(RUNTIME_DIR), help="Per-GPU runtime dirs <root>/<uuid>, mounted into the pods."
        ),
        runtime_dir_mode: str = typer.Option("0700", help="Octal mode of each <root>/<uuid> directory."),
        state_dir: Path = typer.Option(
            Path("/var/lib/valve/device-plugin"), help="Where the allocation record (allocations.json) is kept."
        ),
        pod_resources_socket: str = typer.Option(
            POD_RESOURCES_SOCKET,
            help="Kubelet PodResources socket for taken slots; 'none' uses only the allocation record.",
        ),
        disable_xids: str = typer.Option(
            "", envvar="DP_DISABLE_HEALTHCHECKS",
            help="XIDs to ignore on top of 13,31,43,45,68,109 (comma-separated; 'all' ignores every XID).",
        ),
        enable_xids: str = typer.Option(
            "", envvar="DP_ENABLE_HEALTHCHECKS",
            help="XIDs that always mark a GPU unhealthy, even if ignored by default ('all': every XID).",
        ),
        metrics_port: int = typer.Option(9402, min=0, max=65535, help="Prometheus port; 0 disables metrics."),
        metrics_addr: str = typer.Option("0.0.0.0", envvar=ENV_METRICS_ADDR,
                                         help="Prometheus bind address (an IP address or host name; the chart: "
                                              "the pod IP)."),
        metrics_interval: float = typer.Option(5.0, min=0.1, help="Seconds between NVML usage samples."),
        annotate: bool | None = typer.Option(
            None, "--annotate/--no-annotate",
            help=f"Annotate pods holding a Valve device with {ANN_GPU} and {ANN_ROLE} (from PodResources; "
                 "needs get/patch on pods). Default: on inside a cluster (KUBERNETES_SERVICE_HOST set).",
        ),
        node_name: str | None = typer.Option(
            None, envvar="NODE_NAME", help="This node's name; pods bound to another node are not annotated."
        ),
        annotate_interval: float = typer.Option(2.0, min=0.1, help="Seconds between pod annotation passes."),
        pid_map: bool = typer.Option(
            False, "--pid-map/--no-pid-map", envvar="VALVE_PID_MAP",
            help=f"Write <runtime-root>/<uuid>/{PIDS_FILE} (each GPU's compute processes: host pid, pid in its own "
                 "namespace, pod UID) for the arbiters' NVML enforcement. Needs the host's pid namespace "
                 "(hostPID: true; the chart's devicePlugin.pidMap).",
        ),
        pid_map_interval: float = typer.Option(1.0, min=0.1, max=60.0, help="Seconds between pid map passes."),
        log_level: str = typer.Option("info", help="debug, info, warning or error."),
        allow_nvidia_plugin: bool | None = typer.Option(
            None, "--allow-nvidia-plugin/--refuse-nvidia-plugin",
            help="Start even if this Node already advertises nvidia.com/gpu (NVIDIA's device plugin serves it). "
                 "Default: refuse inside a cluster (reads the Node NODE_NAME; needs get on nodes), allow outside.",
        ),
        fail_on_init_error: bool = typer.Option(
            True, "--fail-on-init-error/--no-fail-on-init-error",
            help="No NVML or no GPU to advertise: exit 2 with the reason (default), or keep running without "
                 "advertising anything (valve_device_plugin_init_error 1, like NVIDIA's plugin).",
        ),
    ) -> None:
        """Run the kubelet device plugin: one online and one offline slot per GPU."""
        import logging
        import threading

        from valve.device_plugin.annotate import annotate_by_default
        from valve.device_plugin.config import PluginConfig
        from valve.device_plugin.health import XidPolicy
        from valve.device_plugin.server import DevicePlugin, InitError, run_idle
        from valve.netaddr import check_host
        from valve.signals import stop_on_signals

        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            policy = XidPolicy.from_strings(disable_xids, enable_xids)
            try:
                mode = int(runtime_dir_mode, 8)
            except ValueError:
                raise ValueError(f"--runtime-dir-mode {runtime_dir_mode!r}: expected an octal mode, e.g. 0700") from None
            metrics_addr = check_host(metrics_addr, "--metrics-addr")
        except ValueError as e:
            fail(str(e))
        if online_resource == offline_resource:
            fail("--online-resource and --offline-resource must differ")
        pr_socket = None if pod_resources_socket.lower() in ("", "none") else Path(pod_resources_socket)
        if annotate and pr_socket is None:
            fail("--annotate needs the PodResources socket (--pod-resources-socket)")
        annotate = annotate_by_default(annotate) and pr_socket is not None
        config = PluginConfig(
            device_plugin_dir=device_plugin_dir,
            online_resource=online_resource,
            offline_resource=offline_resource,
            runtime_root=runtime_root,
            runtime_dir_mode=mode,
            state_dir=state_dir,
            pod_resources_socket=pr_socket,
            xid_policy=policy,
            metrics_port=metrics_port or None,
            metrics_addr=metrics_addr,
            metrics_interval_s=metrics_interval,
            annotate=annotate,
            node_name=node_name or None,
            annotate_interval_s=annotate_interval,
            pid_map=pid_map,
            pid_map_interval_s=pid_map_interval,
        )
        if not (allow_nvidia_plugin if allow_nvidia_plugin is not None else not annotate_by_default(None)):
            from valve.device_plugin.annotate import PodClient
            from valve.device_plugin.coexist import nvidia_plugin_conflict

            conflict = nvidia_plugin_conflict(PodClient(), node_name)
            if conflict:
                fail(conflict)
        stop = threading.Event()

        stop_on_signals(stop, on_signal=lambda signum: logging.getLogger("valve.device_plugin").info(
            "signal %d: stopping", signum))

        def init_failed(reason: str, metrics=None) -> NoReturn:
            if fail_on_init_error:
                fail(f"{reason}; --backend sim runs without a GPU, --no-fail-on-init-error keeps the plugin up "
                     "advertising nothing")
            try:
                run_idle(config, reason, stop, metrics)
            except OSError as e:  # its metrics port in use
                fail(f"cannot start: {first_line(e)}")
            raise typer.Exit(0)

        if backend is BackendName.sim:
            from valve.device_plugin.backend import SimBackend

            try:
                gpu_backend = SimBackend(count=sim_gpus, node=sim_node,
                                         mig=[int(i) for i in sim_mig.split(",") if i.strip()])
            except ValueError as e:
                fail(f"--sim-mig {sim_mig!r}: {e}")
        else:
            try:
                from valve.device_plugin.nvml import NvmlBackend

                gpu_backend = NvmlBackend()
            except Exception as e:  # no pynvml, no libnvidia-ml, no driver: NVIDIA's own message, in one line
                init_failed(f"NVML is not available ({first_line(e)}): run it on a GPU node with the NVIDIA "
                            "driver, in a pod the NVIDIA container runtime starts (runtimeClassName: nvidia)")
        plugin = DevicePlugin(config, gpu_backend)
        try:
            plugin.start()
        except InitError as e:
            plugin.stop()
            init_failed(str(e), plugin.metrics)
        except OSError as e:  # a metrics port in use, a runtime root it may not write
            plugin.stop()
            fail(f"cannot start: {first_line(e)}")
        try:
            stop.wait()
        finally:
            plugin.stop()


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def fail(message: str) -> NoReturn:
    """One line on stderr and exit 2: a bad option or a node this plugin cannot serve."""
    typer.echo(f"valve device-plugin: {message}", err=True)
    raise typer.Exit(code=2)
