"""`valve demo`: online and offline LLM-shaped work on a simulated GPU node, with and without Valve's gate.

Online requests are a prefill then a decode loop (a CPU gap between steps, as in a real engine); offline is a
large-batch engine whose sub-layers each sit behind a gate wait, with bounded queue-ahead. The valve variant runs
the real runtime on the simulated clock: the online client (``OnlineSignal``) closes the gate at request start,
the ``Arbiter`` (``GatePolicy``) reopens it after the idle hysteresis, and the offline ``Gate`` (sim backend)
enqueues its waits on the simulated stream.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field

from valve.api.runtime import RuntimeSpec
from valve.runtime.arbiter.loop import Arbiter
from valve.runtime.control import ControlBlock
from valve.runtime.gate.offline import Gate
from valve.runtime.gate.sim import SimGateBackend
from valve.runtime.online.signal import OnlineSignal
from valve.runtime.sim import MS, US, SimGPU
from valve.stats import percentile

VARIANTS = ("online-alone", "offline-alone", "time-slicing", "valve")


@dataclass(frozen=True)
class Workload:
    rate_per_s: float = 8.0  # online arrivals (Poisson)
    prompt_tokens: int = 256  # mean prompt length (log-normal)
    output_tokens: int = 64  # mean output length (geometric-ish)
    prefill_kernels: int = 8
    prefill_ns_per_token: int = 14 * US  # per kernel, scaled by prompt length
    decode_kernels: int = 4
    decode_kernel_ns: int = 120 * US
    decode_cpu_gap_ns: int = 100 * US  # sampling + scheduling between decode steps
    offline_kernel_ns: int = 500 * US  # one offline sub-layer (large batch)
    offline_queue_ahead: int = 2  # sub-layers the offline CPU thread may run ahead of the GPU
    offline_tokens_per_sublayer: float = 256 / 32  # batch 256, 16 layers x 2 sub-layers per step
    arbiter_delay_ns: int = 10 * US  # online signal -> gate word flipped
    idle_hysteresis_ns: int = 5 * MS
    max_preemptions_per_second: float = 100.0


@dataclass
class Result:
    variant: str
    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    offline_tokens_per_s: float = 0.0
    preemptions: int = 0
    preempt_latency_ms: list[float] = field(default_factory=list)
    gate_closed_fraction: float = 0.0
    context_switches: int = 0


def arrivals(w: Workload, seconds: float, rng: random.Random) -> list[tuple[int, int, int]]:
    """(arrival ns, prompt tokens, output tokens) for an open-loop Poisson stream."""
    out, t = [], 0.0
    while True:
        t += rng.expovariate(w.rate_per_s)
        if t >= seconds:
            return out
        prompt = max(16, int(rng.lognormvariate(math.log(w.prompt_tokens), 0.5)))
        output = max(2, min(4 * w.output_tokens, int(rng.expovariate(1 / w.output_tokens)) + 2))
        out.append((int(t * 1e9), prompt, output))


def simulate(variant: str, w: Workload, seconds: float, seed: int, progress=None) -> Result:
    """Run one variant on a fresh simulated GPU and return its measurements."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    rng = random.Random(seed)
    gpu = SimGPU(seed=seed, jitter=0.05)
    res = Result(variant)
    end_ns = int(seconds * 1e9)
    online_on = variant != "offline-alone"
    offline_on = variant != "online-alone"
    gated = variant == "valve"
    arbiter = sig = gate = None
    if gated:  # the real runtime pieces on the simulated clock: arbiter, online signal, offline gate
        cb = ControlBlock.anonymous()
        spec = RuntimeSpec(idle_hysteresis_ms=w.idle_hysteresis_ns / MS,
                           max_preemptions_per_second=w.max_preemptions_per_second)
        arbiter = Arbiter(cb, spec)
        sig = OnlineSignal(cb, clock=lambda: gpu.now)

        def arbiter_step(now: int) -> None:
            due = arbiter.step(now)
            if due is not None:
                gpu.at(due, arbiter_step)

        gpu.at(0, arbiter_step)

    if offline_on:
        off = gpu.context("offline")
        done = [0]
        queued = [0]

        def sublayer_done(now: int) -> None:
            done[0] += 1
            queued[0] -= 1
            enqueue(now)

        def enqueue(now: int) -> None:
            if gated:
                while gate.poll():
                    gate()
                    off.launch(w.offline_kernel_ns, "offline", on_done=sublayer_done)
                return
            while queued[0] < w.offline_queue_ahead:
                off.launch(w.offline_kernel_ns, "offline", on_done=sublayer_done)
                queued[0] += 1

        if gated:
            gate = Gate(cb, backend=SimGateBackend(off, on_mark=enqueue), queue_ahead=w.offline_queue_ahead)
        enqueue(0)

    if online_on:
        on = gpu.context("online")
        pending_close: list[int] = []  # gate closed, no online kernel started since

        def online_kernel_started(t: int) -> None:
            if pending_close:
                res.preempt_latency_ms.append((t - pending_close.pop()) / MS)

        def start_request(arrival: int, prompt: int, output: int) -> None:
            if gated:
                def signal(now: int) -> None:
                    if sig.begin():  # the online client closes the gate itself (the arbiter allows it)
                        head = on.queue[0] if on.queue else None
                        if gpu.owner is on and getattr(head, "start_ns", -1) >= 0:
                            res.preempt_latency_ms.append(0.0)  # online already holds the GPU
                        else:
                            pending_close[:] = [now]
                gpu.at(arrival, signal)
                gpu.at(arrival + w.arbiter_delay_ns, arbiter_step)
            token_times: list[int] = []
            per_kernel = max(1 * US, w.prefill_ns_per_token * prompt // w.prefill_kernels)

            def step(now: int, kernels: int, dur: int) -> None:
                for i in range(kernels):
                    last = i == kernels - 1
                    on.launch(
                        dur,
                        "online",
                        on_start=online_kernel_started if gated else None,
                        on_done=token if last else None,
                    )

            def token(now: int) -> None:
                token_times.append(now)
                if len(token_times) == 1:
                    res.ttft_ms.append((now - arrival) / MS)
                if len(token_times) < output:
                    gpu.after(w.decode_cpu_gap_ns, lambda t: step(t, w.decode_kernels, w.decode_kernel_ns))
                    return
                if len(token_times) > 1:
                    res.tpot_ms.append((token_times[-1] - token_times[0]) / (len(token_times) - 1) / MS)
                if gated:
                    sig.end()
                    gpu.after(w.arbiter_delay_ns, arbiter_step)

            gpu.at(arrival, lambda t: step(t, w.prefill_kernels, per_kernel))

        for a, p, o in arrivals(w, seconds, rng):
            start_request(a, p, o)

    step_ns = max(1, end_ns // 50)
    for t in range(step_ns, end_ns + step_ns, step_ns):
        gpu.run_until(min(t, end_ns))
        if progress:
            progress(min(t, end_ns) / end_ns)
    if offline_on:
        res.offline_tokens_per_s = done[0] * w.offline_tokens_per_sublayer / seconds
    if gated:
        arbiter.step(gpu.now)
        res.preemptions = arbiter.policy.preemptions
        res.gate_closed_fraction = arbiter.policy.closed_time(gpu.now) / end_ns
    res.context_switches = gpu.switches
    return res


def summarize(results: dict[str, Result]) -> list[dict]:
    """Rows of the demo table: latency percentiles and their ratio to online-alone."""
    base = results.get("online-alone")
    off_base = results.get("offline-alone")
    rows = []
    for name, r in results.items():
        row = {"variant": name}
        for metric in ("ttft", "tpot"):
            xs = getattr(r, f"{metric}_ms")
            for q in (50, 99):
                v = percentile(xs, q)
                row[f"{metric}_p{q}_ms"] = v
                ref = percentile(getattr(base, f"{metric}_ms"), q) if base else float("nan")
                row[f"{metric}_p{q}_ratio"] = v / ref if xs and ref == ref and ref > 0 else float("nan")
        row["offline_tokens_per_s"] = r.offline_tokens_per_s
        ref = off_base.offline_tokens_per_s if off_base else 0.0
        row["offline_ratio"] = r.offline_tokens_per_s / ref if ref else float("nan")
        row["preemptions"] = r.preemptions
        row["preempt_latency_p99_ms"] = percentile(r.preempt_latency_ms, 99)
        row["gate_closed_fraction"] = r.gate_closed_fraction
        rows.append(row)
    return rows


def run_demo(seconds: float = 60.0, seed: int = 0, gpus: int = 1, json_out: str | None = None,
             workload: Workload | None = None) -> list[dict]:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    w = workload or Workload()
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough that the table is never cut
        console = Console(width=150)
    console.print(f"[bold]Valve demo[/]: simulated node with {gpus} GPU(s), {seconds:g} s of traffic per variant, "
                  f"online {w.rate_per_s:g} req/s, time slice 2 ms, seed {seed}")
    merged: dict[str, Result] = {v: Result(v) for v in VARIANTS}
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("simulating", total=len(VARIANTS) * gpus)
        for g in range(gpus):
            for i, variant in enumerate(VARIANTS):
                def tick(frac: float, base=g * len(VARIANTS) + i) -> None:
                    bar.update(task, completed=base + frac)
                r = simulate(variant, w, seconds, seed * 1000 + g, progress=tick)
                m = merged[variant]
                m.ttft_ms += r.ttft_ms
                m.tpot_ms += r.tpot_ms
                m.preempt_latency_ms += r.preempt_latency_ms
                m.offline_tokens_per_s += r.offline_tokens_per_s / gpus
                m.preemptions += r.preemptions
                m.gate_closed_fraction += r.gate_closed_fraction / gpus
                m.context_switches += r.context_switches
    rows = summarize(merged)
    table = Table(title="online latency vs online-alone, offline throughput vs offline-alone")
    for col in ("variant", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "offline tok/s",
                "preemptions", "preempt p99"):
        table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=col == "variant")

    def cell(row: dict, key: str) -> str:
        v, ratio = row[f"{key}_ms"], row[f"{key}_ratio"]
        return "-" if v != v else f"{v:.2f} (x{ratio:.2f})"

    for row in rows:
        off = row["offline_tokens_per_s"]
        table.add_row(
            row["variant"], cell(row, "ttft_p50"), cell(row, "ttft_p99"), cell(row, "tpot_p50"),
            cell(row, "tpot_p99"), "-" if not off else f"{off:,.0f} (x{row['offline_ratio']:.2f})",
            str(row["preemptions"]),
            "-" if row["preempt_latency_p99_ms"] != row["preempt_latency_p99_ms"]
            else f"{row['preempt_latency_p99_ms']:.3f} ms",
        )
    console.print(table)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"workload": asdict(w), "seconds": seconds, "seed": seed, "gpus": gpus, "rows": rows}, f,
                      indent=2)
        console.print(f"wrote {json_out}")
    return rows
