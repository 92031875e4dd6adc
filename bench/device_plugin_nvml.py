"""Serve the real GPUs (NVML backend) to a fake kubelet and show the exchange.

    python3 bench/device_plugin_nvml.py [--quick] [--out DIR]   # on a GPU machine
    python3 bench/device_plugin_nvml.py --backend sim           # the same steps on simulated GPUs (CPU only)

Prints what NVML discovered (UUID, name, memory, PCI bus id, NUMA node), the kubelet registrations, the
ListAndWatch device lists, a GetPreferredAllocation + Allocate pair for one GPU, the runtime dir, a CUDA
process started with the Allocate env (it must see exactly the allocated GPU), the NVML usage metrics while it
runs, a kubelet restart and the clean stop. Writes <out>/device_plugin_<gpu>.txt (the printed log) and .json.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import redirect_stdout
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})

from bench.harness import output  # noqa: E402
from bench.harness.env import record as environment  # noqa: E402
from valve.api.contract import OFFLINE_RESOURCE as OFFLINE  # noqa: E402
from valve.api.contract import ONLINE_RESOURCE as ONLINE  # noqa: E402
from valve.device_plugin.api import pb  # noqa: E402
from valve.device_plugin.config import PluginConfig  # noqa: E402
from valve.device_plugin.fake_kubelet import FakeKubelet  # noqa: E402
from valve.device_plugin.server import DevicePlugin  # noqa: E402

CUDA_PROBE = """
import os, time, torch
n = torch.cuda.device_count()
p = torch.cuda.get_device_properties(0)
print(f"probe: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} device_count={n} name={p.name} "
      f"uuid={getattr(p, 'uuid', '?')} total_mem={p.total_memory}", flush=True)
a = torch.randn(8192, 8192, device="cuda")
end = time.time() + float(os.environ.get("PROBE_SECONDS", "4"))
while time.time() < end:
    b = a @ a
torch.cuda.synchronize()
print("probe: done", flush=True)
"""


def pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def metric_lines(port: int) -> list[str]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return [ln for ln in body.splitlines() if ln.startswith("valve_")]


def call(kubelet: FakeKubelet, resource: str, method: str, request):
    stub, channel = kubelet.stub(resource)
    with channel:
        return getattr(stub, method)(request, timeout=5)


class Tee:
    """Write to several streams (the console and the .txt report)."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", choices=["nvml", "sim"], default="nvml")
    ap.add_argument("--probe-seconds", type=float, default=None, help="CUDA probe length (default 4; --quick 2)")
    ap.add_argument("--quick", action="store_true", help="shorter CUDA probe")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    output.checked_out(ap, args.out)
    if args.probe_seconds is None:
        args.probe_seconds = 2.0 if args.quick else 4.0
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"bench": "device_plugin", "backend": args.backend, "settings": {"quick": args.quick,
                                                                                 "probe_seconds": args.probe_seconds}}
    txt = args.out / f"device_plugin_{args.backend}.tmp.txt"
    with open(txt, "w") as f, redirect_stdout(Tee(sys.stdout, f)):
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                            format="  log %(levelname)s %(name)s: %(message)s")
        rc = run(args, report)
    gpu = report.get("gpus", [{}])[0].get("name", args.backend) if report.get("gpus") else args.backend
    name = "device_plugin_" + ("sim" if args.backend == "sim" else output.slug(gpu, "-"))
    txt.rename(args.out / f"{name}.txt")
    report["rc"] = rc
    output.write_json(args.out / f"{name}.json", report, strict=False)
    print(f"wrote {args.out / name}.json and .txt")
    return rc


def make_backend(args: argparse.Namespace, report: dict):
    report["env"] = environment("cuda" if args.backend == "nvml" else "cpu", gpu="sim")
    print(f"python {report['env']['python']}  grpcio {pkg('grpcio')}  protobuf {pkg('protobuf')}  "
          f"nvidia-ml-py {pkg('nvidia-ml-py')}  prometheus-client {pkg('prometheus-client')}")
    if args.backend == "nvml":
        from valve.device_plugin.nvml import NvmlBackend

        backend = NvmlBackend()
        import pynvml

        print(f"driver {report['env'].get('driver')}  NVML {pynvml.nvmlSystemGetNVMLVersion()}")
        report["driver"] = report["env"].get("driver")
    else:
        from valve.device_plugin.backend import SimBackend

        backend = SimBackend(2)
    return backend


def discover(backend, report: dict) -> list:
    gpus = backend.discover()
    report["versions"] = {p: pkg(p) for p in ("grpcio", "protobuf", "nvidia-ml-py", "prometheus-client")}
    report["gpus"] = [asdict(g) for g in gpus]
    print(f"\n== discovery ({backend.name}): {len(gpus)} GPU(s)")
    for g in gpus:
        print(f"  [{g.index}] uuid={g.uuid} name={g.name!r} memory={g.memory_bytes} B ({g.memory_bytes / 2**30:.1f} GiB)"
              f" pci={g.pci_bus_id} numa={g.numa_node}")
    return gpus


def register(kubelet: FakeKubelet, plugin: DevicePlugin, report: dict) -> None:
    t0 = time.monotonic()
    plugin.start()
    regs = kubelet.wait_registrations(2)
    report["registration_s"] = time.monotonic() - t0
    report["registrations"] = [{"version": r.version, "endpoint": r.endpoint, "resource": r.resource_name}
                               for r in regs]
    print(f"\n== registration ({time.monotonic() - t0:.3f} s after start)")
    for r in regs:
        print(f"  version={r.version} endpoint={r.endpoint} resource={r.resource_name} "
              f"options={{pre_start_required: {r.options.pre_start_required}, "
              f"get_preferred_allocation_available: {r.options.get_preferred_allocation_available}}}")


def list_and_watch(kubelet: FakeKubelet, gpus: list, report: dict) -> None:
    print("\n== ListAndWatch (first list on the kubelet's stream)")
    for resource in (ONLINE, OFFLINE):
        lst = kubelet.wait_list(resource, lambda r: len(r.devices) == len(gpus))
        for d in lst.devices:
            print(f"  {resource}: ID={d.ID} health={d.health} numa={[n.ID for n in d.topology.nodes]}")
        report.setdefault("list_and_watch", {})[resource] = [
            {"id": d.ID, "health": d.health, "numa": [n.ID for n in d.topology.nodes]} for d in lst.devices]


def allocate(kubelet: FakeKubelet, gpus: list, report: dict) -> dict:
    """Preferred allocation and Allocate for each resource; a bogus ID must be refused. Returns the envs."""
    uuids = [g.uuid for g in gpus]
    print("\n== GetPreferredAllocation + Allocate (online, then offline)")
    envs = {}
    for resource in (ONLINE, OFFLINE):
        req = pb.PreferredAllocationRequest(container_requests=[
            pb.ContainerPreferredAllocationRequest(available_deviceIDs=uuids, allocation_size=1)])
        chosen = list(call(kubelet, resource, "GetPreferredAllocation", req).container_responses[0].deviceIDs)
        resp = call(kubelet, resource, "Allocate",
                    pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=chosen)]))
        c = resp.container_responses[0]
        envs[resource] = dict(c.envs)
        report.setdefault("allocations", {})[resource] = {"preferred": chosen, "envs": dict(c.envs),
                                                           "mounts": [m.host_path for m in c.mounts]}
        print(f"  {resource}: preferred={chosen}")
        for k in sorted(c.envs):
            print(f"    env {k}={c.envs[k]}")
        for m in c.mounts:
            mode = stat.S_IMODE(os.stat(m.host_path).st_mode)
            print(f"    mount host={m.host_path} container={m.container_path} read_only={m.read_only} "
                  f"mode={mode:o}")
    try:
        call(kubelet, ONLINE, "Allocate",
             pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=["GPU-bogus"])]))
    except Exception as e:  # grpc.RpcError
        print(f"  bad ID -> {e.code().name}: {e.details()}")
        report["bad_id"] = e.code().name
    return envs


def cuda_probe(plugin: DevicePlugin, alloc_env: dict, probe_seconds: float, report: dict) -> None:
    """A CUDA process with the offline Allocate env, and NVML usage metrics while it runs."""
    print("\n== CUDA process with the offline Allocate env, and NVML usage metrics while it runs")
    env = {**os.environ, **alloc_env, "PROBE_SECONDS": str(probe_seconds)}
    probe = subprocess.Popen([sys.executable, "-c", CUDA_PROBE], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    time.sleep(min(probe_seconds, 3.0))
    plugin.update_usage()
    busy = [ln for ln in metric_lines(plugin.metrics.port) if ln.startswith("valve_gpu_")]
    out, _ = probe.communicate(timeout=120)
    print("  " + out.strip().replace("\n", "\n  "))
    print(f"  probe exit code {probe.returncode}")
    report["cuda_probe"] = {"rc": probe.returncode, "output": out.strip(), "metrics_during": busy}
    for ln in busy:
        print(f"  during probe: {ln}")


def metrics_and_health(plugin: DevicePlugin) -> None:
    plugin.update_usage()
    print("\n== /metrics (valve_*)")
    for ln in metric_lines(plugin.metrics.port):
        print(f"  {ln}")

    _, states = plugin.table.snapshot()
    print("\n== health after the run: " + ", ".join(
        f"{st.gpu.uuid}={'Healthy' if st.healthy else 'Unhealthy'}{' (' + st.reason + ')' if st.reason else ''}"
        for st in states))


def kubelet_restart(kubelet: FakeKubelet, report: dict) -> None:
    print("\n== kubelet restart (kubelet.sock and plugin sockets deleted, kubelet.sock recreated)")
    t0 = time.monotonic()
    kubelet.restart()
    kubelet.wait_registrations(4, timeout=5.0)
    report["reregistration_s"] = time.monotonic() - t0
    print(f"  re-registered both resources in {report['reregistration_s']:.3f} s")


def run(args: argparse.Namespace, report: dict) -> int:
    backend = make_backend(args, report)
    gpus = discover(backend, report)
    base = Path(tempfile.mkdtemp(prefix="vdp", dir="/tmp"))
    kubelet = FakeKubelet(base / "dp").start()
    config = PluginConfig(
        device_plugin_dir=base / "dp",
        runtime_root=base / "run",
        state_dir=base / "state",
        pod_resources_socket=None,
        metrics_port=0,
        metrics_addr="127.0.0.1",
    )
    plugin = DevicePlugin(config, backend)
    rc = 0
    try:
        register(kubelet, plugin, report)
        list_and_watch(kubelet, gpus, report)
        envs = allocate(kubelet, gpus, report)
        if args.backend == "nvml":
            cuda_probe(plugin, envs[OFFLINE], args.probe_seconds, report)
        metrics_and_health(plugin)
        kubelet_restart(kubelet, report)
    except Exception as e:
        print(f"FAILED: {type(e).__name__}: {e}")
        rc = 1
    finally:
        t0 = time.monotonic()
        plugin.stop()
        left = sorted(p.name for p in (base / "dp").iterdir())
        print(f"\n== stop: {time.monotonic() - t0:.3f} s; left in the device-plugin dir: {left}")
        report["left_after_stop"] = left
        kubelet.stop()
        shutil.rmtree(base, ignore_errors=True)
    return rc

if __name__ == "__main__":
    sys.exit(main())
