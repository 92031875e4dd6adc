"""`valve runtime ...`: the in-pod runtime (per-GPU arbiter, online proxy)."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import typer

from valve.api.contract import (
    ANN_GPU,
    ENV_GPU_UUID,
    ENV_METRICS_ADDR,
    ENV_PAIR,
    ENV_POD_UID,
    ENV_RUNTIME_DIR,
    ENV_RUNTIME_SPEC,
    PIDS_FILE,
    PODINFO_FILE,
    RUNTIME_DIR,
)

app = typer.Typer(help="The in-pod runtime: per-GPU arbiter and online proxy.", no_args_is_help=True)
log = logging.getLogger("valve.runtime")
METRICS_ADDR_HELP = (f"Bind address of /metrics, an IP address or host name (the operator's sidecars: the pod IP, "
                     f"through {ENV_METRICS_ADDR}).")


def load_spec(path: str | None, env: str | None = None):
    """The RuntimeSpec from a JSON/YAML file, else from VALVE_RUNTIME_SPEC (JSON), else defaults.
    Raises ValueError with the source and pydantic's reasons on a bad spec."""
    import yaml
    from pydantic import ValidationError

    from valve.api.runtime import RuntimeSpec

    env = os.environ.get(ENV_RUNTIME_SPEC) if env is None else env
    if path and path.startswith("env:"):  # --config env:NAME (what the operator passes)
        name, path = path[4:], None
        env = os.environ.get(name, "")
        if not env:
            raise ValueError(f"runtime spec: environment variable {name} is not set or empty")
    if path:
        source, text = path, Path(path).read_text()
    elif env:
        source, text = ENV_RUNTIME_SPEC, env
    else:
        return RuntimeSpec()
    try:
        data = yaml.safe_load(text) if path and not path.endswith(".json") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ValueError(f"runtime spec from {source} is not valid {'YAML' if path else 'JSON'}: {e}") from None
    if data is None:
        data = {}
    try:
        return RuntimeSpec.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"invalid runtime spec from {source}:\n{e}") from None


def gpu_memory_info(uuid: str):
    """NVML memory info for the GPU when available, else the shared simulated device of VALVE_SIM_DEVICE, else a
    simulated GPU of its own (memory arbitration is then inert)."""
    try:
        from valve.runtime.memory.cuda import NvmlGpuInfo

        info = NvmlGpuInfo(uuid)
        info.snapshot()
        return info, "nvml"
    except Exception as e:  # noqa: BLE001 - no NVML, no driver, unknown UUID: fall back, say why
        from valve.runtime.memory.sim import SharedSimGpuInfo, SimGpuInfo, shared_sim_gpu
        from valve.runtime.sim import SimGPU

        shared = shared_sim_gpu()
        if shared is not None:  # CPU runs: the device the tenants' pools allocate from (VALVE_SIM_DEVICE)
            log.info("NVML memory info unavailable for %s: using the simulated device %s", uuid, shared.path)
            return SharedSimGpuInfo(shared), "shared-sim"
        log.warning("NVML memory info unavailable for %s (%s): using a simulated GPU", uuid, e)
        return SimGpuInfo(SimGPU(uuid=uuid)), "sim"


def check_enforce(mode: str, busy: str) -> None:
    """ValueError for an --enforce or --enforce-busy value that does not exist (before anything is created)."""
    from valve.runtime.arbiter.policy import EnforcePolicy

    EnforcePolicy(mode)
    if busy not in ("auto", "nvml", "cpu", "none"):
        raise ValueError(f"--enforce-busy {busy!r}: expected auto, nvml, cpu or none")


def make_enforcement(mode: str, busy: str, gpu: str, grace_ms: float, threshold: float, period_ms: float,
                     metrics, pids=None):
    """The arbiter's enforcement (None: off). ``busy``: where busy samples come from (``auto``: NVML when it
    answers for this GPU, else none: gate marks only). ``pids``: the published pid -> the pids NVML names
    (arbiter/pidmap.py; None: the same pid). Raises ValueError on a bad choice."""
    from valve.runtime.arbiter.enforce import CpuTimeSampler, Enforcement, NvmlBusySampler
    from valve.runtime.arbiter.policy import MS, EnforcePolicy

    policy = EnforcePolicy(mode, grace_ns=int(grace_ms * MS), busy_threshold=threshold)
    if mode == "off":
        return None
    if busy not in ("auto", "nvml", "cpu", "none"):
        raise ValueError(f"--enforce-busy {busy!r}: expected auto, nvml, cpu or none")
    sampler = None
    if busy == "cpu":
        sampler = CpuTimeSampler()
    elif busy in ("auto", "nvml"):
        try:
            sampler = NvmlBusySampler(gpu, pids=pids)
        except Exception as e:  # noqa: BLE001 - no pynvml, no driver, unknown GPU
            if busy == "nvml":
                raise ValueError(f"--enforce-busy nvml: NVML unavailable for {gpu}: {e}") from None
            log.warning("enforcement: no NVML for %s (%s): gate marks only", gpu, e)
    return Enforcement(policy, sampler, metrics=metrics, period_ns=int(period_ms * MS))


GPU_FROM_HELP = (f"Downward-API annotations file (key=\"value\" lines, e.g. {PODINFO_FILE}): "
                 f"wait for {ANN_GPU} there when --gpu is not given.")


def gpu_or_exit(command: str, gpu: str | None, gpu_from: str | None, wait_s: float, required: bool,
                single: bool) -> str | None:
    """--gpu, else the annotation in --gpu-from (waiting up to wait_s); exits 2 with the reason otherwise."""
    from valve.runtime.podinfo import resolve_gpu

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        got = resolve_gpu(gpu, gpu_from, wait_s, single=single)
    except (ValueError, TimeoutError, OSError) as e:
        typer.echo(f"valve runtime {command}: {e}", err=True)
        raise typer.Exit(code=2) from None
    if got is None and required:
        typer.echo(f"valve runtime {command}: give --gpu UUID (or {ENV_GPU_UUID}) or --gpu-from FILE", err=True)
        raise typer.Exit(code=2)
    return got


@app.command()
def arbiter(
    gpu: str | None = typer.Option(None, "--gpu", envvar=ENV_GPU_UUID, help="GPU UUID this arbiter owns."),
    gpu_from: str | None = typer.Option(None, "--gpu-from", help=GPU_FROM_HELP),
    gpu_wait_seconds: float = typer.Option(300.0, "--gpu-wait-seconds", min=0.0,
                                           help="How long --gpu-from waits for the annotation."),
    runtime_dir: str | None = typer.Option(None, "--runtime-dir", envvar=ENV_RUNTIME_DIR,
                                           help=f"Runtime directory (default {RUNTIME_DIR})."),
    metrics_port: int = typer.Option(9400, "--metrics-port", min=0, max=65535,
                                     help="Prometheus port (0: no metrics server)."),
    metrics_addr: str = typer.Option("0.0.0.0", "--metrics-addr", envvar=ENV_METRICS_ADDR, help=METRICS_ADDR_HELP),
    spec_file: str | None = typer.Option(None, "--spec", "--config", help="RuntimeSpec as a JSON or YAML file, "
                                         f"or env:NAME (JSON in that variable; default: {ENV_RUNTIME_SPEC})."),
    period_ms: float = typer.Option(1.0, "--period-ms", min=0.05, max=1000.0, help="Decision loop period."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Run the memory reserve controller."),
    pair: str | None = typer.Option(None, "--pair", envvar=ENV_PAIR,
                                    help="The pair's name, written next to the control block for `valve top`."),
    enforce: str = typer.Option("report", "--enforce", help="Offline work behind a closed gate: off, report "
                                "(metric, log, control block) or pause (also SIGSTOP until the gate opens)."),
    enforce_busy: str = typer.Option("auto", "--enforce-busy", help="Busy samples of the offline process: auto "
                                     "(NVML if available), nvml, cpu (/proc, for the host gate backend), none."),
    enforce_grace_ms: float = typer.Option(50.0, "--enforce-grace-ms", min=0.0, max=60_000.0,
                                           help="Time after a closure for queued offline work to drain."),
    enforce_threshold: float = typer.Option(0.2, "--enforce-threshold", min=0.0, max=1.0,
                                            help="Busy share of the offline process that counts as working."),
    enforce_period_ms: float = typer.Option(20.0, "--enforce-period-ms", min=1.0, max=60_000.0,
                                            help="How often a busy sample is taken."),
    pod_uid: str | None = typer.Option(None, "--pod-uid", envvar=ENV_POD_UID,
                                       help=f"This pod's UID (the operator: downward API metadata.uid): NVML "
                                       f"samples find the tenant's host pid through the device plugin's "
                                       f"{PIDS_FILE}. Unset: the published pid is taken as the host's."),
) -> None:
    """Run the per-GPU arbiter sidecar: owns the control block and decides when offline runs."""
    from prometheus_client import CollectorRegistry, start_http_server

    from valve.netaddr import check_host, host_port
    from valve.runtime.arbiter.loop import Arbiter
    from valve.runtime.arbiter.metrics import GateMetrics
    from valve.runtime.arbiter.pidmap import pid_mapping
    from valve.runtime.control import ControlBlock, control_path, write_pair
    from valve.signals import stop_on_signals

    try:  # before waiting for the GPU: a bad address is the one line a failed start prints
        metrics_addr = check_host(metrics_addr)
    except ValueError as e:
        typer.echo(f"valve runtime arbiter: {e}", err=True)
        raise typer.Exit(code=2) from None
    gpu = gpu_or_exit("arbiter", gpu, gpu_from, gpu_wait_seconds, required=True, single=True)
    registry = CollectorRegistry()
    metrics = GateMetrics(registry, gpu)
    try:
        spec = load_spec(spec_file)
        path = control_path(gpu, runtime_dir)
        check_enforce(enforce, enforce_busy)
    except (ValueError, OSError) as e:
        typer.echo(f"valve runtime arbiter: {e}", err=True)
        raise typer.Exit(code=2) from None
    # Before the block exists: whoever sees it (a kubelet stopping the pod, a test) may signal at once, and a
    # stop must still open the gate on the way out.
    stop = threading.Event()
    stop_on_signals(stop)
    try:
        cb, reason = ControlBlock.open_or_create(path)
    except OSError as e:  # e.g. a directory another uid made with a narrow mode
        typer.echo(f"valve runtime arbiter: cannot create the control block {path}: {e.strerror} "
                   f"({e.filename}; running as uid {os.geteuid()})", err=True)
        raise typer.Exit(code=2) from None
    if reason:
        log.warning("re-initialised the control block: %s", reason)
    try:  # after the block: a bad runtime directory is the one line a failed start prints
        enforcement = make_enforcement(enforce, enforce_busy, gpu, enforce_grace_ms, enforce_threshold,
                                       enforce_period_ms, metrics, pids=pid_mapping(path.parent, pod_uid))
    except ValueError as e:
        typer.echo(f"valve runtime arbiter: {e}", err=True)
        raise typer.Exit(code=2) from None
    if pair:
        write_pair(path.parent, pair)
    controller = None
    if memory:
        from valve.runtime.arbiter.memory_control import MemoryController
        from valve.runtime.arbiter.memory_metrics import MemoryMetrics

        info, kind = gpu_memory_info(gpu)
        controller = MemoryController(spec, info, MemoryMetrics(registry, gpu))
        log.info("memory reserve controller on (%s)", kind)
    if metrics_port:
        try:
            start_http_server(metrics_port, addr=metrics_addr, registry=registry)
        except OSError as e:
            typer.echo(f"valve runtime arbiter: --metrics-port: cannot listen on {host_port(metrics_addr, metrics_port)}: "
                       f"{e.strerror or e}", err=True)
            raise typer.Exit(code=2) from None
        log.info("metrics on %s/metrics", host_port(metrics_addr, metrics_port))
    arb = Arbiter(cb, spec, memory=controller, metrics=metrics, enforce=enforcement)
    log.info("arbiter for %s on %s: hysteresis %.1f ms, cap %g/s, lease %.0f ms, enforce %s", gpu, path,
             spec.idle_hysteresis_ms, spec.max_preemptions_per_second, spec.heartbeat_lease_ms, enforce)
    arb.run(stop, period_s=period_ms / 1000.0)
    log.info("arbiter stopped: gate left open")


@app.command()
def proxy(
    listen: str = typer.Option(":9000", help="Address to listen on, [host]:port."),
    upstream: str = typer.Option("http://127.0.0.1:8000", help="The online engine's HTTP base URL."),
    gpu: str | None = typer.Option(None, "--gpu", envvar=ENV_GPU_UUID,
                                   help="GPU UUID, or several comma-separated (each request signals each GPU)."),
    gpu_from: str | None = typer.Option(None, "--gpu-from", help=GPU_FROM_HELP),
    gpu_wait_seconds: float = typer.Option(300.0, "--gpu-wait-seconds", min=0.0,
                                           help="How long --gpu-from waits for the annotation."),
    runtime_dir: str | None = typer.Option(None, "--runtime-dir", envvar=ENV_RUNTIME_DIR),
    metrics_port: int = typer.Option(9401, "--metrics-port", min=0, max=65535, help="Prometheus port (0: none)."),
    metrics_addr: str | None = typer.Option(None, "--metrics-addr", envvar=ENV_METRICS_ADDR,
                                            help=METRICS_ADDR_HELP + " Default: --listen's host."),
    upstream_connections: int = typer.Option(0, "--upstream-connections", min=0,
                                             help="Most concurrent upstream connections (0: no cap)."),
    upstream_read_timeout: float = typer.Option(600.0, "--upstream-read-timeout", min=0.0,
                                                help="Seconds of upstream silence (before the headers or between "
                                                "body chunks) before the request fails (0: wait forever)."),
) -> None:
    """Run the online reverse proxy sidecar (signals request start/end, measures TTFT/TPOT)."""
    from valve.netaddr import check_host
    from valve.runtime.online.proxy import ListenError, check_upstream, parse_listen, proxy_command
    from valve.runtime.online.signal import control_paths

    try:  # before waiting for the GPU: a bad address is the one line a failed start prints
        parse_listen(listen)
        check_upstream(upstream)
        metrics_addr = check_host(metrics_addr) if metrics_addr else None
    except ValueError as e:
        typer.echo(f"valve runtime proxy: {e}", err=True)
        raise typer.Exit(code=2) from None
    if gpu_from and not gpu:
        gpu = gpu_or_exit("proxy", gpu, gpu_from, gpu_wait_seconds, required=False, single=False)  # a list: each GPU
    try:
        control_paths(gpu, runtime_dir)
    except ValueError as e:
        typer.echo(f"valve runtime proxy: --gpu: {e}", err=True)
        raise typer.Exit(code=2) from None
    try:
        proxy_command(listen=listen, upstream=upstream, gpu=gpu, runtime_dir=runtime_dir,
                      metrics_port=metrics_port or None, metrics_addr=metrics_addr,
                      max_connections=upstream_connections,
                      read_timeout=upstream_read_timeout)
    except ListenError as e:
        typer.echo(f"valve runtime proxy: {e}", err=True)
        raise typer.Exit(code=2) from None
