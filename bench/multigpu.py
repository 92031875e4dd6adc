"""Multi-GPU node run: one online/offline pair per GPU, all GPUs at once.

    python3 bench/multigpu.py [--gpus N] [--quick] [--out DIR]        real GPUs (NVML backend)
    python3 bench/multigpu.py --sim --gpus 8 [--quick] [--out DIR]    a simulated N-GPU node (CPU only)

Steps: the device plugin (NVML or sim backend) serves a fake kubelet (real gRPC on unix sockets) and must advertise
every GPU with its NUMA node; N online then N offline allocations, kubelet style (GetPreferredAllocation over the
free slots, then Allocate), must put each online/offline pair on one GPU (asserted); one arbiter per GPU; then
every GPU runs an online burst workload and an offline workload at once, each in its own process with the env the
plugin's Allocate returned (CUDA_VISIBLE_DEVICES = that GPU's UUID). Online latency p50/p99 per GPU is reported as
a ratio to that GPU's online-alone, without and with the gate, plus each GPU's gated ratio with only its own pair
running (gate-one): equal ratios mean no cross-GPU interference through the host or the runtime.

Phases on GPUs: alone (each GPU's online alone, one GPU at a time), alone-all (every online at once, no offline),
offline-alone (every offline at once), nogate (all pairs, offline ungated), gate (all pairs, Valve's gate),
gate-one (one pair at a time, gated). The sim path runs the simulated GPU model per GPU (valve.demo.simulate) in
one process per GPU; its GPUs are independent by construction, so it checks the plumbing, not interference.
Writes <out>/multigpu_<gpu>x<N>.json and .txt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import output, procs  # noqa: E402  (after the path line: run as `python3 bench/multigpu.py`)
from bench.harness.env import record as environment  # noqa: E402
from valve.api.contract import ENV_GPU_UUID  # noqa: E402
from valve.runtime.control import GATE_OPEN  # noqa: E402
from valve.stats import percentile  # noqa: E402

# NVLink multicast off in every process we start (the device machines require it).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(SAFE_ENV)

ONLINE, OFFLINE = "valve.io/online-gpu", "valve.io/offline-gpu"
MSG = "@@"  # prefix of protocol lines on a worker's stdout (anything else there is ignored)
GPU_PHASES = ("alone", "alone-all", "nogate", "gate", "gate-one")
SIM_VARIANTS = {"alone": "online-alone", "nogate": "time-slicing", "gate": "valve"}


class BenchError(procs.ChildFailed):
    """A step of the run failed; the message says which and why."""


# ---------------------------------------------------------------------------------------------------------
# statistics and the report
# ---------------------------------------------------------------------------------------------------------
def ratio(a: float, b: float) -> float:
    return a / b if b == b and b > 0 and a == a else float("nan")


def gpu_rows(latency: dict[str, dict[str, list[float]]], uuids: list[str], skip: int = 0) -> list[dict]:
    """Per GPU: p50/p99 (ms) of each phase and its ratio to that GPU's `alone`. `latency[phase][uuid]` are
    per-burst latencies in ms; the first `skip` of each are warm-up and dropped."""
    rows = []
    for i, u in enumerate(uuids):
        row: dict = {"index": i, "uuid": u, "phases": {}}
        base = latency.get("alone", {}).get(u, [])[skip:]
        b50, b99 = percentile(base, 50), percentile(base, 99)
        for phase, per_gpu in latency.items():
            xs = per_gpu.get(u)
            if xs is None:
                continue
            xs = xs[skip:]
            p50, p99 = percentile(xs, 50), percentile(xs, 99)
            row["phases"][phase] = {"n": len(xs), "p50_ms": p50, "p99_ms": p99,
                                    "p50_ratio": ratio(p50, b50), "p99_ratio": ratio(p99, b99)}
        rows.append(row)
    return rows


def interference_summary(rows: list[dict]) -> dict:
    """How far each GPU's gated ratio with all pairs running is from its gated ratio alone (gate-one), and the
    spread of gated ratios across GPUs."""

    def values(phase: str, key: str) -> list[float]:
        return [r["phases"][phase][key] for r in rows if phase in r["phases"]]

    out: dict = {}
    for key in ("p50_ratio", "p99_ratio"):
        g = [v for v in values("gate", key) if v == v]
        out[f"gate_{key}_min"] = min(g, default=float("nan"))
        out[f"gate_{key}_max"] = max(g, default=float("nan"))
        pairs = [(r["phases"]["gate"][key], r["phases"]["gate-one"][key]) for r in rows
                 if "gate" in r["phases"] and "gate-one" in r["phases"]]
        out[f"gate_all_over_one_{key}"] = [ratio(a, b) for a, b in pairs]
    return out


fmt = output.fmt


def table(rows: list[dict], phases: list[str], offline: dict[str, dict], discovery: dict[str, dict]) -> str:
    head = ["GPU", "NUMA", "alone p50/p99 ms"]
    head += [f"{p} x p50/p99" for p in phases if p != "alone"]
    head += ["offline gate/alone", "offline nogate/alone", "preempt"]
    lines = []
    for r in rows:
        ph = r["phases"]
        a = ph.get("alone", {})
        cells = [str(r["index"]), str(discovery.get(r["uuid"], {}).get("numa_node", "-")),
                 f"{fmt(a.get('p50_ms', float('nan')), '.3f')}/{fmt(a.get('p99_ms', float('nan')), '.3f')}"]
        for p in phases:
            if p == "alone":
                continue
            x = ph.get(p)
            cells.append("-" if x is None else f"{fmt(x['p50_ratio'])}/{fmt(x['p99_ratio'])}")
        off = offline.get(r["uuid"], {})
        cells += [fmt(off.get("gate_ratio", float("nan"))), fmt(off.get("nogate_ratio", float("nan"))),
                  str(off.get("preemptions", "-"))]
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in lines]
    return "\n".join(out)


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'Valve Simulated GPU' -> 'sim'."""
    if "simulated" in name.lower():
        return "sim"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu").lower()


# ---------------------------------------------------------------------------------------------------------
# the node: device plugin + fake kubelet, discovery and pairing
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Node:
    base: Path
    kubelet: object
    plugin: object
    backend: object
    runtime_root: Path
    log: list[str] = field(default_factory=list)

    def stop(self) -> None:
        self.plugin.stop()
        self.kubelet.stop()


def start_node(backend, base: Path) -> Node:
    from valve.device_plugin.config import PluginConfig
    from valve.device_plugin.fake_kubelet import FakeKubelet
    from valve.device_plugin.server import DevicePlugin

    kubelet = FakeKubelet(base / "dp").start()
    config = PluginConfig(device_plugin_dir=base / "dp", runtime_root=base / "run", state_dir=base / "state",
                          pod_resources_socket=None, metrics_port=None)
    plugin = DevicePlugin(config, backend)
    try:
        plugin.start()
        kubelet.wait_registrations(2, timeout=10.0)
    except Exception:
        plugin.stop()
        kubelet.stop()
        raise
    return Node(base, kubelet, plugin, backend, config.runtime_root)


def discovery(node: Node) -> list[dict]:
    """What the backend found and what ListAndWatch advertised, checked against each other."""
    gpus = node.backend.discover()
    lists = {}
    for res in (ONLINE, OFFLINE):
        lst = node.kubelet.wait_list(res, lambda r, n=len(gpus): len(r.devices) == n, timeout=10.0)
        lists[res] = {d.ID: d for d in lst.devices}
    out = []
    for g in gpus:
        entry = {"index": g.index, "uuid": g.uuid, "name": g.name, "memory_bytes": g.memory_bytes,
                 "pci_bus_id": g.pci_bus_id, "numa_node": g.numa_node}
        for res, devs in lists.items():
            d = devs.get(g.uuid)
            if d is None:
                raise BenchError(f"{res} does not advertise GPU {g.uuid}")
            numa = [n.ID for n in d.topology.nodes]
            want = [] if g.numa_node is None else [g.numa_node]
            if numa != want or d.health != "Healthy":
                raise BenchError(f"{res} advertises {g.uuid} as {d.health} NUMA {numa}, NVML says NUMA {want}")
        out.append(entry)
    return out


def _call(kubelet, resource: str, method: str, request):
    stub, channel = kubelet.stub(resource)
    with channel:
        return getattr(stub, method)(request, timeout=10)


def schedule_pairs(kubelet, uuids: list[str], n: int, seed: int = 0) -> tuple[dict[str, dict], list[dict]]:
    """N pairs in two waves (half the pairs, then the rest); each wave is its online pods then its offline pods,
    scheduled as the kubelet does: GetPreferredAllocation over the free slots (in a shuffled order: the kubelet
    promises none), then Allocate. In the first wave an offline pod could land on an empty GPU, so the plugin's
    pairing is what keeps each pair on one GPU. Returns {uuid: {role: Allocate env}} and the steps; raises
    BenchError after a wave unless each GPU used holds exactly one online and one offline tenant."""
    from valve.device_plugin.api import pb

    rng = random.Random(seed)
    taken: dict[str, list[str]] = {ONLINE: [], OFFLINE: []}
    envs: dict[str, dict] = {}
    steps = []
    first = (n + 1) // 2
    for k in (first, n - first):
        for resource in [ONLINE] * k + [OFFLINE] * k:
            free = [u for u in uuids if u not in taken[resource]]
            rng.shuffle(free)
            req = pb.PreferredAllocationRequest(container_requests=[
                pb.ContainerPreferredAllocationRequest(available_deviceIDs=free, allocation_size=1)])
            chosen = list(_call(kubelet, resource, "GetPreferredAllocation", req).container_responses[0].deviceIDs)
            resp = _call(kubelet, resource, "Allocate",
                         pb.AllocateRequest(container_requests=[pb.ContainerAllocateRequest(devices_ids=chosen)]))
            env = dict(resp.container_responses[0].envs)
            (uuid,) = chosen
            taken[resource].append(uuid)
            envs.setdefault(uuid, {})[env.get("VALVE_ROLE", "?")] = env
            steps.append({"resource": resource, "offered": len(free), "chosen": uuid,
                          "mounts": [m.host_path for m in resp.container_responses[0].mounts]})
        check_pairs(envs, len(taken[ONLINE]))
    return envs, steps


def check_pairs(envs: dict[str, dict], n: int) -> None:
    """Each of the N GPUs holds one online and one offline tenant, each with that GPU (and only it) visible."""
    if len(envs) != n:
        raise BenchError(f"{n} pairs landed on {len(envs)} GPUs, not one GPU each: {sorted(envs)}")
    for uuid, roles in envs.items():
        if set(roles) != {"online", "offline"}:
            raise BenchError(f"GPU {uuid} holds {sorted(roles)}, not one online and one offline tenant")
        for role, env in roles.items():
            for key in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "VALVE_GPU_UUID"):
                if env.get(key) != uuid:
                    raise BenchError(f"{role} on {uuid}: Allocate gave {key}={env.get(key)!r}")


# ---------------------------------------------------------------------------------------------------------
# arbiters, one per GPU
# ---------------------------------------------------------------------------------------------------------
def child_env(extra: dict | None = None) -> dict:
    return procs.child_env({**SAFE_ENV, **(extra or {})})


def read_control(root: Path, uuid: str) -> dict | None:
    """The counters of a GPU's control block, or None if it is not there (yet)."""
    from valve.runtime.control import ControlBlock, ControlBlockError, control_path

    try:
        cb = ControlBlock.open(control_path(uuid, root))
    except ControlBlockError:
        return None
    f = cb.fields
    slots = cb.claimed_slots()
    out = {"gate": f.gate, "heartbeat_ns": f.heartbeat_ns, "preemptions": f.preemptions,
           "online_requests": f.online_requests, "offline_progress": f.offline_progress,
           "forced_opens": f.forced_opens, "gate_closed_ns": f.gate_closed_ns,
           # written by the online clients themselves, so they cannot lag behind the arbiter
           "inflight": cb.inflight(), "started": sum(s.started for s in slots),
           "last_end_ns": max((s.end_ns for s in slots), default=0)}
    del f, slots  # a live ctypes view keeps the mapping from closing
    cb.close()
    return out


def settled(c: dict | None) -> bool:
    """Whether the arbiter has accounted everything online did: nothing in flight, the gate open again (only
    the arbiter reopens it, after adopting every closure), and a step begun after the last request ended."""
    return (c is not None and c["inflight"] == 0 and c["gate"] == GATE_OPEN
            and c["heartbeat_ns"] > c["last_end_ns"])


def wait_settled(root: Path, uuids: list[str], timeout: float = 30.0) -> dict[str, dict]:
    """Every GPU's counters once its arbiter has accounted the phase. The arbiter adopts closures and counts
    preemptions asynchronously, so counters read before this can still move: a later phase would see them
    move and read it as interference. Settled twice with a newer heartbeat: the step seen first has ended."""
    end = time.monotonic() + timeout
    first: dict[str, dict] = {}
    while True:
        now = {u: read_control(root, u) for u in uuids}
        if all(settled(c) for c in now.values()):
            if first and all(now[u]["heartbeat_ns"] > first[u]["heartbeat_ns"] for u in uuids):
                return now
            first = first or now
        else:
            first = {}
        if time.monotonic() > end:
            busy = [u for u, c in now.items() if not settled(c)]
            raise BenchError(f"arbiters of {busy} did not settle within {timeout:.0f} s (gate stuck closed?)")
        time.sleep(0.005)


class Arbiters:
    """`python3 -m valve.cli runtime arbiter --gpu UUID --runtime-dir ROOT` per GPU ("cli"), or in-process
    `valve.runtime.arbiter.Arbiter` threads ("thread")."""

    def __init__(self, mode: str, root: Path, logs: Path) -> None:
        self.mode, self.root, self.logs = mode, root, logs
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.fallback: str | None = None

    def start(self, uuids: list[str], timeout: float = 30.0) -> None:
        """Start one arbiter per GPU; if the CLI ones fail, say why and use in-process threads instead."""
        try:
            self._start(uuids, timeout)
        except BenchError as e:
            if self.mode != "cli":
                raise
            print(f"[multigpu] WARNING: CLI arbiters failed, using in-process arbiter threads: {e}", flush=True)
            self.fallback = str(e)[-2000:]
            self.stop()
            self.procs, self.ports, self.mode = {}, {}, "thread"
            self._stop = threading.Event()
            self._start(uuids, timeout)

    def _start(self, uuids: list[str], timeout: float) -> None:
        if self.mode == "none":
            return
        for u in uuids:
            if self.mode == "cli":
                self.ports[u] = procs.free_port()
                cmd = [sys.executable, "-m", "valve.cli", "runtime", "arbiter", "--gpu", u, "--runtime-dir",
                       str(self.root), "--metrics-port", str(self.ports[u]), "--no-memory"]
                log = open(self.logs / f"arbiter-{u}.log", "w")  # noqa: SIM115 (closed with the process)
                self.procs[u] = subprocess.Popen(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL)
            else:
                self._start_thread(u)
        for u in uuids:
            self._wait_ready(u, timeout)

    def _start_thread(self, uuid: str) -> None:
        try:
            from valve.api.runtime import RuntimeSpec
            from valve.runtime.arbiter.loop import Arbiter
            from valve.runtime.control import ControlBlock, control_path
        except ImportError as e:
            raise BenchError(f"in-process arbiter unavailable ({e}); is valve.runtime.arbiter there?") from e
        cb, _ = ControlBlock.open_or_create(control_path(uuid, self.root))
        arb = Arbiter(cb, RuntimeSpec())
        t = threading.Thread(target=arb.run, args=(self._stop,), name=f"arbiter-{uuid[:12]}", daemon=True)
        t.start()
        self._threads.append(t)

    def _wait_ready(self, uuid: str, timeout: float) -> None:
        """The control block exists and its heartbeat moves."""
        end, first = time.monotonic() + timeout, None
        while time.monotonic() < end:
            p = self.procs.get(uuid)
            if p is not None and p.poll() is not None:
                log = (self.logs / f"arbiter-{uuid}.log").read_text()[-2000:]
                raise BenchError(f"arbiter for {uuid} exited with {p.returncode}:\n{log}")
            c = read_control(self.root, uuid)
            if c is not None and c["heartbeat_ns"]:
                if first is None:
                    first = c["heartbeat_ns"]
                elif c["heartbeat_ns"] != first:
                    return
            time.sleep(0.05)
        raise BenchError(f"arbiter for {uuid}: no control block with a live heartbeat under {self.root} after "
                         f"{timeout:.0f} s")

    def stop(self) -> None:
        self._stop.set()
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in self._threads:
            t.join(timeout=5)


# ---------------------------------------------------------------------------------------------------------
# worker processes and their line protocol
# ---------------------------------------------------------------------------------------------------------
def emit(obj: dict) -> None:
    procs.emit(obj, MSG)


def worker(name: str, args: list[str], env: dict, logs: Path) -> procs.Worker:
    """This script in a worker role: JSON commands on stdin, JSON answers on stdout prefixed with MSG."""
    return procs.Worker(name, [sys.executable, str(Path(__file__).resolve()), *args], env=child_env(env),
                        log=logs / f"{name}.log", prefix=MSG, quit_cmd="quit")


def check_visible_gpu(torch, device: str) -> dict:
    """The process sees exactly one GPU, the one its Allocate env names (CUDA_VISIBLE_DEVICES = its UUID)."""
    if device == "cpu":
        torch.set_num_threads(1)
        return {"name": "cpu", "uuid": os.environ.get(ENV_GPU_UUID, ""), "uuid_match": True}
    want = os.environ.get(ENV_GPU_UUID, "")
    n = torch.cuda.device_count()
    if n != 1:
        raise BenchError(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')} shows {n} GPUs, not 1")
    props = torch.cuda.get_device_properties(0)
    got = str(getattr(props, "uuid", ""))
    return {"name": props.name, "uuid": got, "total_memory": props.total_memory,
            "uuid_match": got.lower().removeprefix("gpu-") == want.lower().removeprefix("gpu-")}


def open_control():
    """This worker's control block: the one the device plugin's Allocate names in its environment."""
    from valve.runtime.control import ControlBlock, resolve_control_path

    path = resolve_control_path()
    if path is None:
        raise BenchError(f"{ENV_GPU_UUID} is not set: the worker has no GPU from Allocate")
    return ControlBlock.open(path)


def serve(handlers: dict, ready: dict) -> None:
    """Worker main loop: announce readiness, then answer commands until quit."""
    emit({"ready": True, **ready})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        try:
            emit(handlers[cmd["cmd"]](**{k: v for k, v in cmd.items() if k != "cmd"}))
        except Exception as e:  # noqa: BLE001 (reported to the orchestrator, which stops the run)
            emit({"error": f"{type(e).__name__}: {e}"})


def online_worker(a: argparse.Namespace) -> None:
    """Bursts of a small transformer forward, each inside online_request(), with idle gaps between them."""
    import torch

    from valve.runtime.online.signal import online_request

    info = check_visible_gpu(torch, a.device)
    cb = open_control()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(a.hidden, a.heads, 4 * a.hidden, batch_first=True, dropout=0.0)
    model = torch.nn.TransformerEncoder(layer, a.layers, enable_nested_tensor=False).to(a.device, dtype).eval()
    x = torch.randn(1, a.tokens, a.hidden, device=a.device, dtype=dtype)

    def burst() -> None:
        with torch.inference_mode():
            for _ in range(a.passes):
                model(x)
        if a.device == "cuda":
            torch.cuda.current_stream().synchronize()

    for _ in range(10):
        burst()

    def run(seconds: float, seed: int, gap_ms: float) -> dict:
        rng = random.Random(seed)
        lat = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(rng.expovariate(1.0 / gap_ms) / 1e3)
            t0 = time.perf_counter_ns()
            with online_request(cb):
                burst()
            lat.append((time.perf_counter_ns() - t0) / 1e6)
        return {"latency_ms": lat}

    serve({"run": run}, info)


def offline_worker(a: argparse.Namespace) -> None:
    """A stack of bf16 decoder layers (attention + MLP sub-layers) run back to back; gated through
    valve.runtime.offline (Gate + attach) or not."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    info = check_visible_gpu(torch, a.device)
    cb = open_control()
    cuda = a.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32

    class Attention(nn.Module):
        def __init__(self, h: int, heads: int) -> None:
            super().__init__()
            self.heads, self.norm = heads, nn.RMSNorm(h)
            self.qkv, self.out = nn.Linear(h, 3 * h, bias=False), nn.Linear(h, h, bias=False)

        def forward(self, x):
            b, s, h = x.shape
            q, k, v = self.qkv(self.norm(x)).view(b, s, 3, self.heads, h // self.heads).transpose(1, 3).unbind(2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return x + self.out(y.transpose(1, 2).reshape(b, s, h))

    class Mlp(nn.Module):
        def __init__(self, h: int) -> None:
            super().__init__()
            self.norm, self.up, self.down = nn.RMSNorm(h), nn.Linear(h, 4 * h, bias=False), nn.Linear(4 * h, h, bias=False)

        def forward(self, x):
            return x + self.down(F.gelu(self.up(self.norm(x))))

    class Block(nn.Module):
        def __init__(self, h: int, heads: int) -> None:
            super().__init__()
            self.self_attn, self.mlp = Attention(h, heads), Mlp(h)

        def forward(self, x):
            return self.mlp(self.self_attn(x))

    torch.manual_seed(0)
    model = nn.Sequential(*[Block(a.hidden, a.heads) for _ in range(a.layers)]).to(a.device, dtype).eval()
    x = torch.randn(a.batch, a.tokens, a.hidden, device=a.device, dtype=dtype) * 0.1

    def warm() -> None:
        with torch.inference_mode():
            for _ in range(3):
                model(x)
        if cuda:
            torch.cuda.synchronize()

    warm()
    from valve.runtime.gate.offline import Gate, attach

    # the Gate and the gated path's first use happen here, before any phase: a one-off cost is no phase's figure
    state: dict = {"gate": Gate(cb, backend="cuda" if cuda else "host", queue_ahead=a.queue_ahead)}
    t_warm = time.perf_counter()
    handle = attach(model, gate=state["gate"])
    warm()
    handle.remove()
    info["gated_warmup_s"] = time.perf_counter() - t_warm

    def loop(gated: bool, stop: threading.Event, out: dict) -> None:
        try:
            handle = attach(model, gate=state["gate"]) if gated else None
            marks, n, t0 = [], 0, time.perf_counter()
            t_late, n_late = None, 0  # the rate after the first second: a stall at the start shows as a gap
            with torch.inference_mode():
                while not stop.is_set():
                    model(x)
                    n += 1
                    if t_late is None and time.perf_counter() - t0 >= 1.0:
                        t_late, n_late = time.perf_counter(), n
                    if cuda:  # at most two forwards queued ahead, gated or not
                        ev = torch.cuda.Event()
                        ev.record()
                        marks.append(ev)
                        if len(marks) > 2:
                            marks.pop(0).synchronize()
            if cuda:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            out["sublayers_per_s"] = n * 2 * a.layers / (t1 - t0)
            if t_late is not None and t1 > t_late:
                out["after_1s_sublayers_per_s"] = (n - n_late) * 2 * a.layers / (t1 - t_late)
            if handle is not None:
                handle.remove()
        except Exception as e:  # noqa: BLE001
            where = " <- ".join(f"{f.name}:{f.lineno}" for f in reversed(traceback.extract_tb(e.__traceback__)[-4:]))
            out["error"] = f"offline loop: {type(e).__name__}: {e} (at {where})"

    def start(gated: bool) -> dict:
        stop, out = threading.Event(), {}
        t = threading.Thread(target=loop, args=(gated, stop, out), daemon=True)
        state["run"] = (t, stop, out, cb.fields.forced_opens)
        t.start()
        return {"started": True}

    def stop() -> dict:
        t, ev, out, forced = state.pop("run")
        ev.set()
        t.join(timeout=60)
        if t.is_alive():
            raise BenchError("the offline loop did not stop within 60 s (gate stuck closed?)")
        return {**out, "forced_opens": cb.fields.forced_opens - forced}

    serve({"start": start, "stop": stop}, info)


def sim_worker(a: argparse.Namespace) -> None:
    """One simulated GPU (valve.demo.simulate): online alone, time-slicing, Valve's gate, offline alone."""
    from valve.demo import Workload, simulate

    uuid = os.environ[ENV_GPU_UUID]
    ctl = None
    if a.check_control:
        cb = open_control()
        ctl = {"path": str(cb.path), "gate": cb.fields.gate}
        cb.close()

    def run(seconds: float, seed: int) -> dict:
        w = Workload()
        lat, offline, preempt = {}, {}, 0
        for phase, variant in SIM_VARIANTS.items():
            r = simulate(variant, w, seconds, seed)
            lat[phase] = r.ttft_ms
            offline[phase] = r.offline_tokens_per_s
            if phase == "gate":
                preempt = r.preemptions
        offline["alone"] = simulate("offline-alone", w, seconds, seed).offline_tokens_per_s
        return {"latency_ms": lat, "offline": offline, "preemptions": preempt}

    serve({"run": run}, {"uuid": uuid, "control": ctl, "name": "Valve Simulated GPU"})


# ---------------------------------------------------------------------------------------------------------
# the runs
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    sim: bool
    gpus: int | None
    seconds: float
    seed: int
    arbiter: str
    out: Path
    skip: int = 0
    quick_one: bool = False  # gate-one on the first GPU only
    device: str = "cuda"
    online: dict = field(default_factory=dict)
    offline: dict = field(default_factory=dict)


def run_phase_all(online: dict, offline: dict, uuids: list[str], s: Settings, seed: int,
                  gated: bool | None, root: Path) -> tuple[dict, dict, dict]:
    """Onlines of `uuids` at once; with offline (gated or not) on the same GPUs unless `gated` is None.
    Returns latencies, offline rates, and every GPU's preemptions during the phase (settled counters, so
    a closure is counted in the phase that made it)."""
    all_uuids = list(online)
    before = wait_settled(root, all_uuids)
    if gated is not None:
        for u in uuids:
            offline[u].send(cmd="start", gated=gated)
        for u in uuids:
            offline[u].recv(60)
        time.sleep(0.5)  # offline reaches steady state
    for i, u in enumerate(uuids):
        online[u].send(cmd="run", seconds=s.seconds, seed=seed * 1000 + i, gap_ms=s.online["gap_ms"])
    lat = {u: online[u].recv(s.seconds + 120) for u in uuids}
    off = {}
    if gated is not None:
        for u in uuids:
            offline[u].send(cmd="stop")
        off = {u: offline[u].recv(120) for u in uuids}
    after = wait_settled(root, all_uuids)
    moved = {u: {k: after[u][k] - before[u][k] for k in ("preemptions", "started")} for u in all_uuids}
    return lat, off, moved


def cross_talk_of(phase_uuids: list[str], moved: dict) -> list[str]:
    """GPUs outside the phase whose online requests or preemptions moved during it."""
    out = [v for v, d in moved.items() if v not in phase_uuids and (d["preemptions"] or d["started"])]
    return [f"online on {phase_uuids} moved the counters of {out}"] if out else []


def worker_args(role: str, sizes: dict, device: str) -> list[str]:
    args = [role, "--device", device]
    for k, v in sizes.items():
        if k != "gap_ms":
            args += ["--" + k.replace("_", "-"), str(v)]
    return args


def run_gpu(s: Settings, work: Path) -> dict:
    if s.device == "cuda":
        from valve.device_plugin.nvml import NvmlBackend

        backend = NvmlBackend()
    else:  # dry run on CPU: simulated GPUs for the plugin, CPU torch for the workers
        from valve.device_plugin.backend import SimBackend

        backend = SimBackend(count=s.gpus or 2, node="multigpu-cpu", gpu_name="cpu")
    node = start_node(backend, work)
    arbiters = Arbiters(s.arbiter, node.runtime_root, work)
    workers: list[procs.Worker] = []
    try:
        found = discovery(node)
        all_uuids = [g["uuid"] for g in found]
        n = min(s.gpus or len(all_uuids), len(all_uuids))
        envs, steps = schedule_pairs(node.kubelet, all_uuids, n, s.seed)
        uuids = [u for u in all_uuids if u in envs]
        print(f"[multigpu] {len(found)} GPU(s) found; pairs on {n}: " + ", ".join(
            f"{g['index']}:{g['uuid'][:12]}(numa {g['numa_node']})" for g in found if g["uuid"] in envs), flush=True)
        arbiters.start(uuids)
        online = {u: worker(f"online-{i}", worker_args("online-worker", s.online, s.device), envs[u]["online"],
                            work) for i, u in enumerate(uuids)}
        workers += online.values()
        offline = {u: worker(f"offline-{i}", worker_args("offline-worker", s.offline, s.device),
                             envs[u]["offline"], work) for i, u in enumerate(uuids)}
        workers += offline.values()
        ready = {w.name: w.recv(300) for w in workers}
        cross_talk: list[str] = []
        wrong = [name for name, r in ready.items() if not r.get("uuid_match", True)]
        if wrong:  # recorded, not fatal: torch's UUID formatting may differ from NVML's
            cross_talk.append(f"workers whose visible GPU UUID differs from Allocate's: {wrong}")
            print(f"[multigpu] WARNING: {cross_talk[-1]}", flush=True)
        print(f"[multigpu] {len(workers)} workers ready", flush=True)

        latency: dict[str, dict[str, list[float]]] = {p: {} for p in GPU_PHASES}
        preempt: dict[str, dict[str, int]] = {p: {} for p in GPU_PHASES}
        off_runs: dict[str, dict[str, dict]] = {"alone": {}, "nogate": {}, "gate": {}}  # each loop's own figures

        def record(phase: str, lat: dict, off: dict, moved: dict, off_key: str | None = None) -> None:
            for u, r in lat.items():
                latency[phase][u] = r["latency_ms"]
                preempt[phase][u] = moved[u]["preemptions"]
            cross_talk.extend(cross_talk_of(list(lat), moved))
            if off_key:
                off_runs[off_key].update(off)

        root = node.runtime_root
        t_phase = time.monotonic()
        for i, u in enumerate(uuids):  # each online alone, the node otherwise idle
            record("alone", *run_phase_all(online, offline, [u], s, 1 + i, None, root))
        record("alone-all", *run_phase_all(online, offline, uuids, s, 100, None, root))
        for u in uuids:
            offline[u].send(cmd="start", gated=True)
        for u in uuids:
            offline[u].recv(60)
        time.sleep(s.seconds)
        for u in uuids:
            offline[u].send(cmd="stop")
        for u in uuids:
            off_runs["alone"][u] = offline[u].recv(120)
        record("nogate", *run_phase_all(online, offline, uuids, s, 200, False, root), "nogate")
        record("gate", *run_phase_all(online, offline, uuids, s, 300, True, root), "gate")
        one = uuids if not s.quick_one else uuids[:1]
        for i, u in enumerate(one):
            record("gate-one", *run_phase_all(online, offline, [u], s, 400 + i, True, root))
        print(f"[multigpu] phases done in {time.monotonic() - t_phase:.1f} s", flush=True)

        rows = gpu_rows(latency, uuids, s.skip)

        def rate(key: str, u: str) -> float:
            return off_runs[key].get(u, {}).get("sublayers_per_s", float("nan"))

        offline_summary = {
            u: {"alone_sublayers_per_s": off_runs["alone"].get(u, {}).get("sublayers_per_s"),
                "gate_ratio": ratio(rate("gate", u), rate("alone", u)),
                "nogate_ratio": ratio(rate("nogate", u), rate("alone", u)),
                "preemptions": preempt["gate"].get(u)}
            for u in uuids}
        first = next(iter(ready.values()))
        return {"gpu_name": first["name"], "found": found, "uuids": uuids, "pairs": envs, "schedule": steps,
                "workers": ready, "rows": rows, "offline": offline_summary, "preemptions": preempt,
                "cross_talk": cross_talk, "phases": list(GPU_PHASES), "offline_runs": off_runs,
                "control": {u: read_control(node.runtime_root, u) for u in uuids},
                "arbiter_metrics": scrape_arbiters(arbiters),
                "arbiters": {"mode": arbiters.mode, "fallback": arbiters.fallback}}
    finally:
        for w in workers:
            w.stop()
        arbiters.stop()
        node.stop()


def scrape_arbiters(arbiters: Arbiters) -> dict:
    """valve_* samples from each arbiter's /metrics (cli arbiters only; empty where unreachable)."""
    import urllib.request

    out = {}
    for u, port in arbiters.ports.items():
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            out[u] = [ln for ln in body.splitlines() if ln.startswith(("valve_preemptions_total",
                                                                       "valve_gate_closed_seconds_total"))]
        except OSError as e:
            out[u] = [f"unreachable: {e}"]
    return out


def run_sim(s: Settings, work: Path) -> dict:
    from valve.device_plugin.backend import SimBackend

    n = s.gpus or 8
    backend = SimBackend(count=n, node="multigpu-sim")
    node = start_node(backend, work)
    arbiters = Arbiters(s.arbiter, node.runtime_root, work)
    workers: dict[str, procs.Worker] = {}
    try:
        found = discovery(node)
        uuids = [g["uuid"] for g in found]
        envs, steps = schedule_pairs(node.kubelet, uuids, n, s.seed)
        arbiters.start(uuids)
        check = ["--check-control"] if s.arbiter != "none" else []
        for i, u in enumerate(uuids):
            workers[u] = worker(f"sim-{i}", ["sim-worker", *check], envs[u]["online"], work)
        ready = {u: w.recv(60) for u, w in workers.items()}
        for i, u in enumerate(uuids):
            workers[u].send(cmd="run", seconds=s.seconds, seed=s.seed * 1000 + i)
        res = {u: w.recv(s.seconds * 20 + 60) for u, w in workers.items()}
        latency = {p: {u: res[u]["latency_ms"][p] for u in uuids} for p in SIM_VARIANTS}
        rows = gpu_rows(latency, uuids)
        offline_summary = {
            u: {"alone_tokens_per_s": r["offline"]["alone"],
                "gate_ratio": ratio(r["offline"]["gate"], r["offline"]["alone"]),
                "nogate_ratio": ratio(r["offline"]["nogate"], r["offline"]["alone"]),
                "preemptions": r["preemptions"]}
            for u, r in res.items()}
        return {"gpu_name": found[0]["name"], "found": found, "uuids": uuids, "pairs": envs, "schedule": steps,
                "workers": ready, "rows": rows, "offline": offline_summary, "cross_talk": [],
                "phases": list(SIM_VARIANTS), "arbiters": {"mode": arbiters.mode, "fallback": arbiters.fallback},
                "control": {u: read_control(node.runtime_root, u) for u in uuids} if s.arbiter != "none" else {}}
    finally:
        for w in workers.values():
            w.stop()
        arbiters.stop()
        node.stop()


def mode_label(s: Settings) -> str:
    return "simulated GPUs" if s.sim else "real GPUs" if s.device == "cuda" else "CPU dry run, sim plugin backend"


def write_report(result: dict, s: Settings) -> tuple[Path, str]:
    n = len(result["uuids"])
    name = f"multigpu_{gpu_slug(result['gpu_name'])}x{n}"
    disc = {g["uuid"]: g for g in result["found"]}
    text = table(result["rows"], result["phases"], result["offline"], disc)
    summary = interference_summary(result["rows"])
    head = (f"multi-GPU node: {n} x {result['gpu_name']} ({mode_label(s)}), "
            f"{s.seconds:g} s per phase, online latency as ratio to that GPU's online-alone (p50/p99)")
    text = head + "\n" + text
    if result.get("cross_talk"):
        text += "\nCROSS-TALK: " + "; ".join(result["cross_talk"])
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(s).items()}
    doc = {"bench": "multigpu", "mode": "sim" if s.sim else s.device, "n_gpus": n, "settings": settings,
           "versions": environment("cpu" if s.sim else s.device, gpu="sim" if s.sim else s.device), "summary": summary, **result}
    path = output.write(s.out, name, doc, text, strict=False)[0]
    return path, text


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", nargs="?", default="main",
                    choices=["main", "online-worker", "offline-worker", "sim-worker"], help=argparse.SUPPRESS)
    ap.add_argument("--sim", action="store_true", help="simulated GPUs (CPU only)")
    ap.add_argument("--gpus", type=int, default=None, help="pairs to place (default: every GPU; sim: 8)")
    ap.add_argument("--quick", action="store_true", help="short phases (smoke run)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per phase")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arbiter", choices=["cli", "thread", "none"], default="cli",
                    help="arbiter per GPU: CLI subprocess, in-process thread, or none (sim only)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    # worker settings
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--queue-ahead", type=int, default=2)
    ap.add_argument("--check-control", action="store_true")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: the GPU path's steps on CPU torch with the sim plugin backend (a dry run)")
    a = ap.parse_args(argv)
    if a.role == "main":
        output.checked_out(ap, a.out)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.role != "main":
        {"online-worker": online_worker, "offline-worker": offline_worker, "sim-worker": sim_worker}[a.role](a)
        return 0
    if a.sim and a.gpus is not None and a.gpus < 1:
        raise SystemExit("--gpus must be at least 1")
    seconds = a.seconds or ((4.0 if a.quick else 20.0) if a.sim else (2.0 if a.quick else 8.0))
    if a.device == "cuda":
        online = {"hidden": 1024, "heads": 16, "layers": 4, "tokens": 256, "passes": 2, "gap_ms": 10.0}
        offline = {"hidden": 4096, "heads": 32, "layers": 4, "batch": 4, "tokens": 512, "queue_ahead": 2}
    else:  # tiny models: the CPU dry run checks the steps, not the numbers
        online = {"hidden": 64, "heads": 4, "layers": 2, "tokens": 16, "passes": 1, "gap_ms": 10.0}
        offline = {"hidden": 128, "heads": 4, "layers": 2, "batch": 2, "tokens": 32, "queue_ahead": 2}
    s = Settings(sim=a.sim, gpus=a.gpus, seconds=seconds, seed=a.seed, arbiter=a.arbiter, out=a.out,
                 skip=0 if a.sim or a.device == "cpu" else 5, online=online, offline=offline, quick_one=a.quick,
                 device=a.device)
    # short (unix socket paths) and on tmpfs: CUDA cannot register a page of a disk-backed file (the control block)
    work = Path(tempfile.mkdtemp(prefix="vmg", dir="/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"))
    # SIGTERM from the caller: unwind through the finally blocks, which stop every child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    try:
        result = (run_sim if s.sim else run_gpu)(s, work)
        path, text = write_report(result, s)
    except Exception as e:  # noqa: BLE001 (any failure: say what, keep the logs, exit 1)
        msg = str(e) if isinstance(e, procs.ChildFailed) else traceback.format_exc()
        print(f"[multigpu] FAILED: {msg}", file=sys.stderr, flush=True)
        keep = s.out / "multigpu_logs"
        shutil.copytree(work, keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock", "control"))
        print(f"[multigpu] logs kept in {keep}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    print(f"[multigpu] wrote {path} ({time.monotonic() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
