"""Preemption benchmark: online latency next to offline work on one GPU, with and without Valve's gate.

    python3 bench/preemption.py [--quick] [--out DIR] [--device cuda|cpu] [--variants ...]

All variants run in one process tree, one call, side by side:

- ``alone``: online bursts with no offline work (the baseline);
- ``nogate``: offline runs too, no gate (plain time-slicing between the two processes);
- ``gate``: offline gated by Valve (``valve.runtime.gate.offline.Gate`` + ``attach`` at attention/MLP blocks, bounded
  queue-ahead; Valve's arbiter in its own process; online signals through ``OnlineSignal``);
- ``graph_memop`` / ``graph_spin``: offline runs as one CUDA graph per forward with a capturable gate inside
  (the batch-memop wait node of ``gate_cuda``, or a one-thread spin kernel polling the mapped word);
- ``mps`` (and ``mps_gate`` in full runs): the same under MPS, last (daemon started and stopped here; skipped with
  the reason when the control binary is missing or we are not root);
- ``mps_prio``: MPS, offline ungated, online bursts on a high-priority CUDA stream: the block scheduler prefers
  the online blocks as SMs free up (a bound at block granularity, not at a gate), with no Valve in the path.

Offline: a stack of bf16 Llama-style decoder layers (hidden 4096) on a batch that fills the GPU, in its own process;
its throughput alone is measured first in each variant, then under contention. Online: bursts of one decode
step of a small (~0.6 B) transformer for 32 sequences, as a CUDA graph, with Poisson arrivals and idle gaps, in
its own process; the first bursts of each variant are warm-up, not counted. Reported: online burst latency
p50/p99 and their ratios to ``alone``; preemption latency p50/p99 = online arrival (the gate closes there) -> start
of the first online kernel (a one-thread CuPy kernel launched first in the burst writes to mapped host memory;
the online thread polls it: one host clock); offline tokens/s and the ratio to offline alone; the SM clock at
each arrival (NVML) and the offline sub-layer GPU times, which bound the gate's preemption latency.
``--device cpu`` runs the same orchestration on CPU with tiny models and the host gate backend (CI smoke test; no
preemption timestamps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import env, mps, output, procs  # noqa: E402  (after the path line: run as `python3 bench/...`)
from valve import stats  # noqa: E402

# graph_spin before graph_memop: a failed memop-node capture could leave the offline context unusable
ALL_VARIANTS = ("alone", "nogate", "gate", "gate_linear", "graph_spin", "graph_memop", "mps", "mps_gate", "mps_prio")
QUICK_SKIP = ("gate_linear", "mps_gate", "mps_prio")  # --quick: < 60 s
HIGH_PRIORITY = {"mps_prio"}  # online bursts on a high-priority stream
GATED = {"gate": "eager", "gate_linear": "eager_linear", "graph_memop": "graph_memop", "graph_spin": "graph_spin", "mps_gate": "eager"}
GPU_ONLY = {"graph_memop", "graph_spin", "mps", "mps_gate", "mps_prio"}
TARGET_P99_MS = 0.25  # the goal: gated online p99 within 0.25 ms of online-alone p99 (results before: 0.5 ms)
GPU_UUID = "GPU-bench"
LINEAR_PATTERN = r"\.(q|k|v|o|gate|up|down)$"  # gate before every linear: finer than attention/MLP

KERNELS = r"""
extern "C" __global__ void valve_ts(unsigned long long* out) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    *out = t | 1ull;  // mapped host memory: the host polls for non-zero
    __threadfence_system();
}
extern "C" __global__ void valve_spin_gate(const volatile unsigned int* gate, unsigned int open) {
    while (*gate != open) { __nanosleep(1000); }
}
"""


# ---------------------------------------------------------------------------------------------------------
# plain functions (tested on CPU)
# ---------------------------------------------------------------------------------------------------------
def percentile(xs, q: float) -> float:
    """``valve.stats.percentile`` of the samples that are there (None and NaN dropped: a missed mark)."""
    return stats.percentile([float(x) for x in xs if x is not None and not math.isnan(float(x))], q)


def arrival_times(seconds: float, mean_gap_ms: float, idle_every: int, idle_ms: float, seed: int) -> list[float]:
    """Burst start offsets (s): exponential gaps (Poisson arrivals), and every ``idle_every`` bursts on average
    an idle gap of ``idle_ms`` (online goes quiet, the gate reopens, offline runs at full speed)."""
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(1000.0 / mean_gap_ms)
        if idle_every and rng.random() < 1.0 / idle_every:
            t += idle_ms / 1000.0
        if t >= seconds:
            return out
        out.append(t)


def summarize(online: dict | None, offline: dict | None, base: dict | None, off_base: float | None) -> dict:
    """One variant's row: online latency and preemption percentiles, ratios to alone, offline throughput."""
    row: dict = {}
    if online:
        lat, pre = online["lat_ms"], online.get("preempt_us") or []
        gpu, mhz = online.get("gpu_ms") or [], [m for m in online.get("sm_mhz") or [] if m is not None]
        row.update(bursts=len(lat), online_p50_ms=percentile(lat, 50), online_p99_ms=percentile(lat, 99),
                   preempt_p50_us=percentile(pre, 50), preempt_p99_us=percentile(pre, 99),
                   gate_closed_bursts=online.get("closed", 0), warmup_bursts=online.get("warmup", 0),
                   gpu_p50_ms=percentile(gpu, 50), gpu_p99_ms=percentile(gpu, 99),
                   sm_mhz_p50=percentile(mhz, 50), sm_mhz_min=min(mhz) if mhz else None)
        if base:
            row["online_p50_ratio"] = row["online_p50_ms"] / base["online_p50_ms"]
            row["online_p99_ratio"] = row["online_p99_ms"] / base["online_p99_ms"]
            row["p99_over_alone_ms"] = row["online_p99_ms"] - base["online_p99_ms"]
            # alone's "preemption" is the bare launch cost: the excess is what offline work adds
            row["preempt_p50_over_alone_us"] = row["preempt_p50_us"] - base["preempt_p50_us"]
            row["preempt_p99_over_alone_us"] = row["preempt_p99_us"] - base["preempt_p99_us"]
    if offline:
        row.update(offline_tok_s=offline.get("tok_s"), offline_solo_tok_s=offline.get("solo_tok_s"))
        if off_base and offline.get("tok_s") is not None:
            row["offline_ratio"] = offline["tok_s"] / off_base
        if offline.get("tok_s") is not None and offline.get("solo_tok_s"):
            row["offline_ratio_own_solo"] = offline["tok_s"] / offline["solo_tok_s"]
    return row


def verdict(rows: dict) -> dict:
    """The target: gated p99 within ``TARGET_P99_MS`` of alone p99 (recorded as ``target_ms``), and below the
    no-gate and MPS variants."""
    out = {}
    for v in ("gate", "gate_linear", "graph_memop", "graph_spin", "mps_gate", "mps_prio"):
        r = rows.get(v)
        if not r or "p99_over_alone_ms" not in r:
            continue
        over = r["p99_over_alone_ms"]
        others = {k: rows[k]["online_p99_ms"] for k in ("nogate", "mps") if k in rows and "online_p99_ms" in rows[k]}
        out[v] = {"p99_over_alone_ms": over, "target_ms": TARGET_P99_MS, "within_target": over <= TARGET_P99_MS,
                  "missed_by_ms": max(0.0, over - TARGET_P99_MS),
                  "below": {k: r["online_p99_ms"] < p for k, p in others.items()}}
    return out


def clock_effect(rows: dict) -> dict:
    """Did the GPU run ``alone`` at lower SM clocks than the contended variants (it idles between bursts)?
    Compares the SM clock sampled at burst arrival and the online GPU time per burst (CUDA events)."""
    a = rows.get("alone") or {}
    if a.get("sm_mhz_p50") is None or (isinstance(a["sm_mhz_p50"], float) and math.isnan(a["sm_mhz_p50"])):
        return {"measured": False, "note": "no SM clock samples (NVML missing or CPU run)"}
    per = {v: {"sm_mhz_p50": r.get("sm_mhz_p50"), "sm_mhz_min": r.get("sm_mhz_min"), "gpu_p50_ms": r.get("gpu_p50_ms")}
           for v, r in rows.items() if r.get("sm_mhz_p50") is not None}
    others = [r["sm_mhz_p50"] for v, r in per.items() if v != "alone" and not math.isnan(r["sm_mhz_p50"])]
    top = max(others) if others else a["sm_mhz_p50"]
    drop = a["sm_mhz_p50"] < 0.9 * top
    note = (f"alone: SM clock p50 {a['sm_mhz_p50']:.0f} MHz (min {a['sm_mhz_min']}) at burst arrival vs up to "
            f"{top:.0f} MHz with offline running; ")
    if drop:
        note += ("the idle GPU clocks down between bursts, so alone is slowed by the clock and ratios to it flatter "
                 "the contended variants")
    else:
        note += "no clock drop between bursts: alone is a fair baseline"
        low = [v for v, r in per.items() if v != "alone" and r["sm_mhz_p50"] < 0.95 * a["sm_mhz_p50"]]
        if low:
            note += (f"; {', '.join(low)} ran at lower SM clocks (power limit with offline running): their online "
                     "slowdown includes that")
    return {"measured": True, "alone_clock_drop": drop, "note": note, "per_variant": per}


fmt = output.fmt


def table(rows: dict, skipped: dict) -> str:
    head = (f"{'variant':<12} {'bursts':>6} {'p50 ms':>7} {'p99 ms':>7} {'p50 x':>6} {'p99 x':>6} "
            f"{'pre p50 us':>10} {'pre p99 us':>10} {'off tok/s':>10} {'off x':>6} {'gpu ms':>6} {'SM MHz':>6}")
    lines = [head, "-" * len(head)]
    for v, r in rows.items():
        lines.append(
            f"{v:<12} {fmt(r.get('bursts'), 'd'):>6} {fmt(r.get('online_p50_ms'), '.3f'):>7} "
            f"{fmt(r.get('online_p99_ms'), '.3f'):>7} {fmt(r.get('online_p50_ratio'), '.2f'):>6} "
            f"{fmt(r.get('online_p99_ratio'), '.2f'):>6} {fmt(r.get('preempt_p50_us'), '.1f'):>10} "
            f"{fmt(r.get('preempt_p99_us'), '.1f'):>10} {fmt(r.get('offline_tok_s'), '.0f'):>10} "
            f"{fmt(r.get('offline_ratio'), '.2f'):>6} {fmt(r.get('gpu_p50_ms'), '.3f'):>6} "
            f"{fmt(r.get('sm_mhz_p50'), '.0f'):>6}")
    for v, why in skipped.items():
        lines.append(f"{v:<12} skipped: {why}")
    lines.append("x = ratio to online alone (online) / to offline alone without gate (offline); "
                 "pre = online arrival -> first online kernel start;\n"
                 "gpu ms = online GPU time per burst p50 (CUDA events); SM MHz = SM clock p50 at burst arrival")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# models (torch): Llama-style blocks; attention and MLP blocks are the gated sub-layers
# ---------------------------------------------------------------------------------------------------------
def build_stack(layers: int, hidden: int, ffn: int, heads: int, device: str, dtype):
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    class AttnBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.RMSNorm(hidden, device=device, dtype=dtype)
            self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden, bias=False, device=device, dtype=dtype)
                                              for _ in range(4))

        def forward(self, x):
            b, s, _ = x.shape
            h = self.norm(x)
            q, k, v = (p(h).view(b, s, heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o(a.transpose(1, 2).reshape(b, s, hidden))

    class MLPBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.RMSNorm(hidden, device=device, dtype=dtype)
            self.gate = nn.Linear(hidden, ffn, bias=False, device=device, dtype=dtype)
            self.up = nn.Linear(hidden, ffn, bias=False, device=device, dtype=dtype)
            self.down = nn.Linear(ffn, hidden, bias=False, device=device, dtype=dtype)

        def forward(self, x):
            h = self.norm(x)
            return self.down(F.silu(self.gate(h)) * self.up(h))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn, self.mlp = AttnBlock(), MLPBlock()

        def forward(self, x):
            x = x + self.self_attn(x)
            return x + self.mlp(x)

    torch.manual_seed(0)
    model = nn.Sequential(*(Layer() for _ in range(layers))).eval()
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dim() == 2:
            p.normal_(0.0, 0.02)  # keep activations finite through the stack (norm weights stay 1)
    return model


# ---------------------------------------------------------------------------------------------------------
# worker plumbing: JSON lines on stdout to the orchestrator, commands on stdin
# ---------------------------------------------------------------------------------------------------------
def emit(**kw) -> None:
    procs.emit(kw)


def env_info(device: str) -> dict:
    import torch

    return env.record(device, gpu=torch.cuda.get_device_name() if device == "cuda" else device)


class Stamps:
    """Kernel-start marks: a one-thread CuPy kernel writes ``%globaltimer`` (never 0) into pinned host memory
    mapped into the device (``cuMemHostAlloc(DEVICEMAP)``); the online thread polls that word and takes the host
    time it appears. One clock (the host's): the GPU's globaltimer drifts from host time by milliseconds.
    Also holds the spin-gate kernel of ``graph_spin``."""

    def __init__(self, n: int) -> None:
        import ctypes

        import torch

        from valve.runtime.cuda import check, driver

        try:
            import cupy as cp
        except ImportError as e:
            raise RuntimeError("preemption timestamps need CuPy on the GPU machine") from e
        self.cp, self.torch, self.n = cp, torch, n
        try:
            mod = cp.RawModule(code=KERNELS)
            self.ts_k, self.spin_k = mod.get_function("valve_ts"), mod.get_function("valve_spin_gate")
        except Exception as e:
            raise RuntimeError(f"compiling the %globaltimer/spin kernels with CuPy (NVRTC) failed: {e}") from e
        torch.empty(1, device="cuda")  # torch's primary context current on this thread for the driver calls
        cu = driver()
        try:
            flags = getattr(cu, "CU_MEMHOSTALLOC_DEVICEMAP", 2) | getattr(cu, "CU_MEMHOSTALLOC_PORTABLE", 1)
            self.host_ptr = int(check(cu.cuMemHostAlloc(8 * n, flags)))
            self.dptr = int(check(cu.cuMemHostGetDevicePointer(self.host_ptr, 0)))
        except RuntimeError as e:
            raise RuntimeError(f"mapped host memory for kernel-start marks ({8 * n} bytes): {e}") from e
        self.host = (ctypes.c_uint64 * n).from_address(self.host_ptr)
        self._streams: dict = {}
        self.reset()

    def reset(self) -> None:
        import ctypes

        ctypes.memset(self.host_ptr, 0, 8 * self.n)

    def _stream(self):
        """CuPy view of torch's current stream (cached: creating one per launch costs tens of us)."""
        h = self.torch.cuda.current_stream().cuda_stream
        s = self._streams.get(h)
        if s is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # ExternalStream: still the portable spelling
                s = self._streams[h] = self.cp.cuda.ExternalStream(h)
        return s

    def stamp(self, i: int) -> None:
        self.ts_k((1,), (1,), (self.cp.uint64(self.dptr + 8 * i),), stream=self._stream())

    def seen_ns(self, i: int, timeout_s: float = 5.0) -> tuple[int | None, bool]:
        """(host perf_counter_ns when mark ``i`` appeared or None on timeout, whether it was there at once)."""
        h, end = self.host, time.perf_counter_ns() + int(timeout_s * 1e9)
        if h[i]:
            return time.perf_counter_ns(), True
        while not h[i]:
            if time.perf_counter_ns() > end:
                return None, False
        return time.perf_counter_ns(), False

    def spin(self, gate_dptr: int, open_value: int) -> None:
        self.spin_k((1,), (1,), (self.cp.uint64(gate_dptr), self.cp.uint32(open_value)), stream=self._stream())


def setup_torch(device: str):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine, or --device cpu for the orchestration only")
    if device == "cpu":
        torch.set_num_threads(1)
    return torch


# ---------------------------------------------------------------------------------------------------------
# online worker
# ---------------------------------------------------------------------------------------------------------
class SMClock:
    """The SM clock (MHz) from NVML, sampled at each burst arrival: the GPU lowers its clocks while it idles
    between bursts (``alone``) and keeps them up while offline work runs, which flatters the contended variants.
    ``read()`` is None where NVML is missing."""

    def __init__(self, device: str) -> None:
        self.nvml, self.h = None, None
        if device != "cuda":
            return
        try:
            import pynvml
            import torch

            pynvml.nvmlInit()
            self.h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self.nvml = pynvml
        except Exception as e:  # noqa: BLE001 - the bench runs without it, the JSON says why
            print(f"[online] no SM clock samples (NVML: {type(e).__name__}: {e})", file=sys.stderr)

    def read(self) -> int | None:
        if self.nvml is None:
            return None
        try:
            return int(self.nvml.nvmlDeviceGetClockInfo(self.h, self.nvml.NVML_CLOCK_SM))
        except Exception:  # noqa: BLE001
            return None


def online_step(model, x, dev: str, use_graph: bool):
    """The online unit of work: one forward of the small model, as a CUDA graph (like an engine's decode step)
    where possible. Returns a callable that enqueues it on the current stream."""
    import torch

    if dev != "cuda" or not use_graph:
        return lambda: model(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            model(x)
    except Exception as e:
        raise RuntimeError(f"capturing the online forward into a CUDA graph failed: {e}") from e
    return g.replay


def online_worker(cfg: dict) -> None:
    torch = setup_torch(cfg["device"])

    from valve.runtime.control import ControlBlock
    from valve.runtime.online.signal import OnlineSignal

    dev = cfg["device"]
    cuda = dev == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    o = cfg["online"]
    model = build_stack(o["layers"], o["hidden"], o["ffn"], o["heads"], dev, dtype)
    x = torch.randn(o["batch"], o["seq"], o["hidden"], device=dev, dtype=dtype)
    n_max = len(arrival_times(cfg["seconds"], cfg["mean_gap_ms"], cfg["idle_every"], cfg["idle_ms"], cfg["seed"]))
    n_max = n_max * 2 + 64
    stamps, mark_error = None, None
    if cuda:
        try:
            stamps = Stamps(n_max)
        except RuntimeError as e:  # run without preemption marks rather than not at all; the JSON says why
            mark_error = str(e)
            print(f"[online] no preemption marks: {e}", file=sys.stderr)
    with torch.no_grad():
        step = online_step(model, x, dev, o.get("graph", True))
        for i in range(5):
            if stamps:
                stamps.stamp(i)  # load the mark kernel now, not in the first burst
            step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    clock = SMClock(dev)
    sig = OnlineSignal(ControlBlock.open(cfg["ctl"]))
    emit(event="ready", info=env_info(dev),
         online_graph=cuda and o.get("graph", True), nvml_clocks=clock.nvml is not None, mark_error=mark_error)
    cmds = procs.commands()
    while True:
        c = cmds.get()
        if c["cmd"] == "exit":
            sig.close()
            return
        arr = arrival_times(c["seconds"], cfg["mean_gap_ms"], cfg["idle_every"], cfg["idle_ms"], c["seed"])
        # the bursts' stream: torch's default one (priority 0, as offline's), or a high-priority one (-1; a graph
        # replay takes the priority of the stream it is launched into)
        stream = torch.cuda.Stream(priority=-1) if cuda and c.get("high") else None
        lat, pre, pre_at_once, gpu_ms, sm_mhz, closed = [], [], 0, [], [], []
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
               for _ in arr] if cuda else []
        if stamps:
            stamps.reset()
        t0 = time.perf_counter()
        with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()):
            for i, at in enumerate(arr):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                sm_mhz.append(clock.read())  # before the arrival: not in the measured latency
                p0 = time.perf_counter_ns()
                closed.append(sig.begin())  # the gate closes here (client fast path) or at the arbiter's next step
                try:
                    mark = stamps is not None and i < stamps.n
                    if mark:
                        stamps.stamp(i)
                    if evs:
                        evs[i][0].record()
                    for _ in range(o["burst"]):
                        step()
                    if evs:
                        evs[i][1].record()
                    if mark:  # the first online kernel started (host clock); an upper bound if it had already
                        seen, at_once = stamps.seen_ns(i, timeout_s=2.0)
                        pre.append(None if seen is None else (seen - p0) / 1e3)
                        pre_at_once += at_once
                        if seen is None:  # the mapped write never showed: stop polling, say so
                            mark_error = f"kernel-start mark {i} not seen within 2 s"
                            stamps = None
                    sync()
                finally:
                    sig.end()
                lat.append((time.perf_counter_ns() - p0) / 1e6)
        if evs:
            gpu_ms = [a.elapsed_time(b) for a, b in evs]
        w = min(c.get("warmup", 0), len(lat))  # warm-up bursts: run, not counted
        emit(event="bursts", label=c["label"], lat_ms=lat[w:], preempt_us=pre[w:], gpu_ms=gpu_ms[w:],
             sm_mhz=sm_mhz[w:], closed=sum(closed[w:]), warmup=w, preempt_seen_at_once=pre_at_once,
             mark_error=mark_error)


# ---------------------------------------------------------------------------------------------------------
# offline worker
# ---------------------------------------------------------------------------------------------------------
class CaptureGate:
    """A gate for CUDA-graph capture: the memop node (gate_cuda) or the spin kernel, put into the graph."""

    def __init__(self, kind: str, backend, stamps: Stamps | None) -> None:
        from valve.runtime.control import GATE_OPEN

        self.kind, self.backend, self.stamps, self.open = kind, backend, stamps, GATE_OPEN

    def gate(self) -> None:
        if self.kind == "graph_memop":
            self.backend.wait()  # under capture: a batch-memop wait node
        else:
            self.stamps.spin(self.backend.gate_dptr, self.open)


def sublayer_ms(model, x, runs: int = 3) -> dict:
    """GPU time (ms, CUDA events, the last of ``runs`` forwards) of the longest attention block, MLP block and
    linear: what a gate at those boundaries cannot cut short."""
    import torch

    spans: dict = {}

    def pre(name):
        def f(m, args):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            spans[name] = [ev, None]
        return f

    def post(name):
        def f(m, args, out):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            spans[name][1] = ev
        return f

    kinds = {"attn_block_ms": r"\.self_attn$", "mlp_block_ms": r"\.mlp$", "linear_ms": LINEAR_PATTERN}
    mods = [(n, m) for n, m in model.named_modules() if any(re.search(rx, n) for rx in kinds.values())]
    hs = [h for n, m in mods for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n)))]
    try:
        with torch.no_grad():
            for _ in range(runs):
                model(x)
        torch.cuda.synchronize()
    finally:
        for h in hs:
            h.remove()
    out = {}
    for k, rx in kinds.items():
        t = [a.elapsed_time(b) for n, (a, b) in spans.items() if re.search(rx, n)]
        out[k] = {"max": max(t), "p50": percentile(t, 50)} if t else None
    return out


def offline_worker(cfg: dict) -> None:
    torch = setup_torch(cfg["device"])

    from valve.runtime.control import ControlBlock
    from valve.runtime.gate.offline import Gate

    dev = cfg["device"]
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    o = cfg["offline"]
    model = build_stack(o["layers"], o["hidden"], o["ffn"], o["heads"], dev, dtype)
    x = torch.randn(o["batch"], o["seq"], o["hidden"], device=dev, dtype=dtype)
    tokens = o["batch"] * o["seq"]
    cb = ControlBlock.open(cfg["ctl"])
    gate = Gate(cb, backend="cuda" if dev == "cuda" else "host", queue_ahead=cfg["queue_ahead"])
    cuda = dev == "cuda"
    sub = None
    if cuda:
        try:
            sub = sublayer_ms(model, x)
        except Exception as e:  # noqa: BLE001 - a diagnostic only
            sub = {"error": f"{type(e).__name__}: {e}"}
    emit(event="ready", info=env_info(dev), sublayer_ms=sub)
    cmds = procs.commands()
    while True:
        c = cmds.get()
        if c["cmd"] == "exit":
            return
        if c["cmd"] != "run":  # a late mark/stop for a mode that already failed
            continue
        if run_mode(c, cmds, model, x, tokens, gate, cuda):
            return


def run_mode(c: dict, cmds: queue.Queue, model, x, tokens: int, gate, cuda: bool) -> bool:
    """Run one offline mode: alone for ``solo_s`` (reported), then until ``stop``. Returns True on ``exit``."""
    import torch

    from valve.runtime.gate.offline import attach

    mode = c["mode"]  # "none", "eager", "eager_linear", "graph_memop", "graph_spin"
    handle, exiting = None, False
    b0, f0, launched = gate.boundaries, gate.forced_opens, 0

    def wait(ev) -> None:  # poll, so a dead arbiter's closed gate is opened after the lease
        while ev is not None and not ev.query():
            gate.check_lease()
            time.sleep(50e-6)

    try:
        with torch.no_grad():
            graph = None
            if mode == "eager":
                handle = attach(model, gate=gate)
            elif mode == "eager_linear":
                handle = attach(model, pattern=LINEAR_PATTERN, gate=gate)
            elif mode.startswith("graph"):
                handle = attach(model, gate=CaptureGate(mode, gate.backend, Stamps(1) if mode == "graph_spin" else None))
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(2):
                        model(x)  # warm-up outside capture (the gate is open: the waits pass)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    model(x)
            run = graph.replay if graph is not None else (lambda: model(x))

            def step() -> None:
                nonlocal launched
                run()
                launched += 1

            for _ in range(2):
                step()
            if cuda:
                torch.cuda.synchronize()
            pending: deque = deque()
            completed, t_solo = 0, time.perf_counter()
            contend: tuple[float, int] | None = None
            solo_sent = False
            while True:
                try:
                    c2 = cmds.get_nowait()["cmd"]
                except queue.Empty:
                    c2 = None
                if c2 in ("stop", "exit"):
                    exiting = c2 == "exit"
                    break
                if c2 == "mark":
                    contend = (time.perf_counter(), completed)
                if not solo_sent and time.perf_counter() - t_solo >= c["solo_s"]:
                    solo_sent = True
                    emit(event="solo", mode=mode, tok_s=completed * tokens / (time.perf_counter() - t_solo))
                step()
                ev = None
                if cuda:
                    ev = torch.cuda.Event()
                    ev.record()
                pending.append(ev)
                while len(pending) > 1:  # like an engine: at most one step queued ahead
                    wait(pending.popleft())
                    completed += 1
            while pending:
                wait(pending.popleft())
                completed += 1
            t_end = time.perf_counter()
            t_c, n_c = contend or (t_end, completed)
            emit(event="stopped", mode=mode, tok_s=(completed - n_c) * tokens / max(t_end - t_c, 1e-9),
                 steps=completed - n_c, seconds=t_end - t_c, steps_total=launched,
                 gate_boundaries=gate.boundaries - b0, forced_opens=gate.forced_opens - f0)
    except Exception as e:  # noqa: BLE001 - report, stay alive for the next variant
        emit(event="error", mode=mode, error=f"{type(e).__name__}: {e}")
    finally:
        if handle is not None:
            handle.remove()
    return exiting


# ---------------------------------------------------------------------------------------------------------
# arbiter process (Valve's own Arbiter on the bench's control block)
# ---------------------------------------------------------------------------------------------------------
def arbiter_worker(cfg: dict) -> None:
    from valve.api.runtime import RuntimeSpec
    from valve.runtime.arbiter.loop import Arbiter
    from valve.runtime.control import ControlBlock

    cb, _ = ControlBlock.open_or_create(cfg["ctl"])
    spec = RuntimeSpec(idle_hysteresis_ms=cfg["hysteresis_ms"], queue_ahead=cfg["queue_ahead"],
                       max_preemptions_per_second=cfg["max_preemptions_per_second"])
    arb = Arbiter(cb, spec)
    stop = threading.Event()
    t = threading.Thread(target=arb.run, args=(stop, cfg["arbiter_period_ms"] / 1000.0), daemon=True)
    t.start()
    emit(event="ready")
    cmds = procs.commands()
    while cmds.get()["cmd"] != "exit":
        pass
    stop.set()
    t.join(5)
    lat = arb.preemption_latencies_ns
    emit(event="stopped", steps=arb.steps, preemptions=arb.policy.preemptions,
         parked_latency_us=[v / 1e3 for v in lat])


# ---------------------------------------------------------------------------------------------------------
# orchestrator
# ---------------------------------------------------------------------------------------------------------
def worker(role: str, cfg: dict, env: dict | None = None) -> procs.Worker:
    """This script with ``--role``: JSON lines on stdout to the orchestrator, commands on stdin."""
    return procs.Worker(f"{role} worker", [sys.executable, str(Path(__file__).resolve()), "--role", role, "--cfg", json.dumps(cfg)],
                        env=env)


def run_phase(variants: list[str], cfg: dict, results: dict, info: dict, env: dict | None = None) -> None:
    """One set of worker processes (arbiter, online, offline) running `variants` in order; `info` gets the
    environment the workers report (filled in place, so it survives a failure)."""
    workers: list[procs.Worker] = []
    try:
        # all three start at once (imports dominate); the control block exists already
        arb, on, off = (worker(r, cfg, env) for r in ("arbiter", "online", "offline"))
        workers += [arb, on, off]
        arb.expect("ready", timeout=120)
        ready = on.expect("ready", timeout=300)
        oready = off.expect("ready", timeout=300)
        info["offline_sublayer_ms"] = oready.get("sublayer_ms")
        info.update(ready["info"], mark_error=ready.get("mark_error"), online_graph=ready.get("online_graph"), nvml_clocks=ready.get("nvml_clocks"))
        for v in variants:
            print(f"[bench] {v} ...", file=sys.stderr, flush=True)
            offline = None
            if v.endswith("alone"):
                online = on_bursts(on, v, cfg)
            else:
                off.send(cmd="run", mode=GATED.get(v, "none"), solo_s=cfg["solo_seconds"])
                msg = off.expect("solo", "error", timeout=300)
                if msg["event"] == "error":
                    results["skipped"][v] = f"offline failed: {msg['error']}"
                    continue
                solo = msg["tok_s"]
                off.send(cmd="mark")
                try:
                    online = on_bursts(on, v, cfg)
                finally:
                    off.send(cmd="stop")
                stopped = off.expect("stopped", "error", timeout=120)
                if stopped["event"] == "error":
                    results["skipped"][v] = f"offline failed: {stopped['error']}"
                    continue
                offline = dict(stopped, solo_tok_s=solo)
            results["raw"][v] = {"online": online, "offline": offline}
    finally:
        stats = None
        for w in reversed(workers):
            if w.name == "arbiter worker" and w.proc.poll() is None:
                try:
                    w.send(cmd="exit")
                    stats = w.expect("stopped", timeout=15)
                except (RuntimeError, OSError, ValueError):
                    pass
            w.stop()
        if stats:
            info["arbiter"] = {"steps": stats["steps"], "preemptions": stats["preemptions"]}


def on_bursts(on: procs.Worker, label: str, cfg: dict) -> dict:
    """The same arrival pattern (seed) in every variant."""
    on.send(cmd="bursts", label=label, seconds=cfg["seconds"], seed=cfg["seed"], warmup=cfg["warmup"],
            high=label in HIGH_PRIORITY)
    msg = on.expect("bursts", timeout=cfg["seconds"] * 10 + 120)
    return {k: msg[k] for k in ("lat_ms", "preempt_us", "gpu_ms", "sm_mhz", "closed", "warmup",
                                "preempt_seen_at_once", "mark_error")}


def orchestrate(args) -> dict:
    from valve.runtime.control import ControlBlock, control_path

    quick = args.quick
    cfg = {
        "device": args.device,
        "seconds": args.seconds if args.seconds else (2.5 if quick else 8.0),
        "solo_seconds": args.solo_seconds if args.solo_seconds else (0.5 if quick else 1.5),
        "warmup": args.warmup if args.warmup is not None else (10 if quick else 20),
        "seed": args.seed,
        "mean_gap_ms": args.mean_gap_ms, "idle_every": args.idle_every, "idle_ms": args.idle_ms,
        "hysteresis_ms": args.hysteresis_ms, "queue_ahead": args.queue_ahead, "arbiter_period_ms": 0.5,
        "max_preemptions_per_second": args.max_preemptions,
        "offline": {"layers": args.offline_layers, "hidden": args.offline_hidden, "ffn": args.offline_ffn,
                    "heads": args.offline_heads, "batch": args.offline_batch, "seq": args.offline_seq},
        "online": {"layers": args.online_layers, "hidden": args.online_hidden, "ffn": args.online_ffn,
                   "heads": args.online_heads, "batch": args.online_batch, "seq": args.online_seq,
                   "burst": args.burst, "graph": not args.online_eager},
    }
    if args.device == "cpu":  # tiny models: the CI smoke test of the orchestration
        cfg["offline"] = {"layers": 2, "hidden": 64, "ffn": 128, "heads": 4, "batch": 2, "seq": 16}
        cfg["online"] = {"layers": 1, "hidden": 32, "ffn": 64, "heads": 2, "batch": 1, "seq": 8, "burst": 1, "graph": False}
    variants = list(args.variants or ALL_VARIANTS)
    results: dict = {"raw": {}, "skipped": {}}
    if quick and not args.variants:
        variants = [v for v in variants if v not in QUICK_SKIP]
        results["skipped"].update({v: "left out of --quick" for v in QUICK_SKIP})
    for v in [v for v in variants if v in GPU_ONLY and args.device != "cuda"]:
        results["skipped"][v] = "needs a CUDA device"
    base = Path(tempfile.mkdtemp(prefix="valve-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    info: dict = {}
    t_start = time.perf_counter()
    try:
        cfg["ctl"] = str(control_path(GPU_UUID, base))
        ControlBlock.create(cfg["ctl"]).close()
        plain = [v for v in variants if not v.startswith("mps") and v not in results["skipped"]]
        if "alone" not in plain:
            plain.insert(0, "alone")
        run_phase(plain, cfg, results, info)
        mps_vars = [v for v in variants if v.startswith("mps") and v not in results["skipped"]]
        if mps_vars:
            why = mps.missing(args.device)
            if why:
                for v in mps_vars:
                    results["skipped"][v] = why
            else:
                try:
                    with mps.Daemon(base) as daemon:
                        pre = [] if quick else ["mps_alone"]  # online alone under MPS (the ratios use `alone`)
                        info["mps"] = {}
                        run_phase(pre + mps_vars, cfg, results, info["mps"], env={**os.environ, **daemon.env})
                except RuntimeError as e:
                    for v in mps_vars:
                        results["skipped"].setdefault(v, f"MPS run failed: {e}")
    except RuntimeError as e:  # a worker died or hung: keep what was measured, say why the rest is missing
        results["error"] = str(e)
        print(f"[bench] error: {e}", file=sys.stderr)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    raw = results["raw"]
    alone = summarize(raw["alone"]["online"], None, None, None) if "alone" in raw else None
    off_base = (raw.get("nogate") or {}).get("offline", {}) or {}
    off_base = off_base.get("solo_tok_s")
    rows = {v: summarize(r["online"], r["offline"], alone, off_base) for v, r in raw.items()}
    out = {"bench": "preemption", "gpu": info.get("gpu", args.device), "env": info, "settings": cfg,
           "quick": quick, "wall_s": time.perf_counter() - t_start, "variants": rows,
           "skipped": results["skipped"], "target": verdict(rows), "clock_effect": clock_effect(rows),
           "error": results.get("error"), "raw": raw}
    out["table"] = table(rows, results["skipped"])
    return out


def build_parser() -> argparse.ArgumentParser:
    from valve.api.runtime import RuntimeSpec

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run, < 60 s")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--variants", nargs="*", choices=ALL_VARIANTS)
    ap.add_argument("--seconds", type=float, default=0.0,
                    help="online bursts per variant (default 8: ~300 bursts; quick 2.5)")
    ap.add_argument("--solo-seconds", type=float, default=0.0,
                    help="offline alone per variant (default 1.5, quick 0.5)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="first bursts of each variant run but not counted (default 20, quick 10)")
    ap.add_argument("--mean-gap-ms", type=float, default=20.0)
    ap.add_argument("--idle-every", type=int, default=25, help="an idle gap every N bursts on average")
    ap.add_argument("--idle-ms", type=float, default=150.0)
    # the runtime's own defaults: what a pair gets unless its spec says otherwise
    spec = RuntimeSpec()
    ap.add_argument("--hysteresis-ms", type=float, default=spec.idle_hysteresis_ms)
    ap.add_argument("--queue-ahead", type=int, default=spec.queue_ahead)
    ap.add_argument("--max-preemptions", type=float, default=spec.max_preemptions_per_second,
                    help="the arbiter's rate cap (per second)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--offline-layers", type=int, default=8)
    ap.add_argument("--offline-hidden", type=int, default=4096)
    ap.add_argument("--offline-ffn", type=int, default=11008)
    ap.add_argument("--offline-heads", type=int, default=32)
    ap.add_argument("--offline-batch", type=int, default=8)
    ap.add_argument("--offline-seq", type=int, default=256)
    # online: a decode step of a ~0.6 B-parameter model for 32 sequences (~0.5-1 ms of GPU work), CUDA graph
    ap.add_argument("--online-layers", type=int, default=12)
    ap.add_argument("--online-hidden", type=int, default=2048)
    ap.add_argument("--online-ffn", type=int, default=5632)
    ap.add_argument("--online-heads", type=int, default=16)
    ap.add_argument("--online-batch", type=int, default=32)
    ap.add_argument("--online-seq", type=int, default=1)
    ap.add_argument("--online-eager", action="store_true", help="launch the online forward eagerly (no CUDA graph)")
    ap.add_argument("--burst", type=int, default=1, help="online forwards (decode steps) per burst")
    ap.add_argument("--role", choices=("online", "offline", "arbiter"), help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.role:
        {"online": online_worker, "offline": offline_worker, "arbiter": arbiter_worker}[a.role](json.loads(a.cfg))
        return 0
    output.checked_out(ap, a.out)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup (workers, MPS) when killed
    res = orchestrate(a)
    out = Path(a.out)
    name = f"preemption_{output.slug(res['gpu'])}{'_quick' if a.quick else ''}"
    raw = res.pop("raw")
    output.write(out, name, res, res["table"])
    output.write_json(out / f"{name}_raw.json", raw, indent=None)  # per-burst samples
    print(res["table"])
    print(f"[bench] wrote {out / name}.json ({res['wall_s']:.0f} s)")
    if res["error"]:
        print(f"[bench] incomplete: {res['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
