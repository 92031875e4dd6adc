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


class Run:
    """One variant on a fresh simulated GPU: the callbacks its events run and what they measure."""

    def __init__(self, variant: str, w: Workload, seed: int) -> None:
        self.w = w
        self.gpu = SimGPU(seed=seed, jitter=0.05)
        self.res = Result(variant)
        self.gated = variant == "valve"
        self.cb: ControlBlock | None = None
        self.arbiter: Arbiter | None = None
        self.sig: OnlineSignal | None = None
        self.gate: Gate | None = None
        self.off = self.on = None  # the offline and online contexts
        self.sublayers_done = 0
        self.queued = 0  # offline sub-layers launched and not done (ungated variants)
        self.pending_close: list[int] = []  # gate closed, no online kernel started since

    def start_runtime(self) -> None:
        """The real runtime pieces on the simulated clock: arbiter and online signal (the gate comes with offline)."""
        self.cb = ControlBlock.anonymous()
        spec = RuntimeSpec(idle_hysteresis_ms=self.w.idle_hysteresis_ns / MS,
                           max_preemptions_per_second=self.w.max_preemptions_per_second)
        self.arbiter = Arbiter(self.cb, spec)
        self.sig = OnlineSignal(self.cb, clock=lambda: self.gpu.now)
        self.gpu.at(0, self.arbiter_step)

    def arbiter_step(self, now: int) -> None:
        due = self.arbiter.step(now)
        if due is not None:
            self.gpu.at(due, self.arbiter_step)

    def start_offline(self) -> None:
        self.off = self.gpu.context("offline")
        if self.gated:
            self.gate = Gate(self.cb, backend=SimGateBackend(self.off, on_mark=self.enqueue),
                             queue_ahead=self.w.offline_queue_ahead)
        self.enqueue(0)

    def enqueue(self, now: int) -> None:
        """Launch offline sub-layers: behind the gate's waits, or up to the queue-ahead without a gate."""
        if self.gated:
            while self.gate.poll():
                self.gate()
                self.off.launch(self.w.offline_kernel_ns, "offline", on_done=self.sublayer_done)
            return
        while self.queued < self.w.offline_queue_ahead:
            self.off.launch(self.w.offline_kernel_ns, "offline", on_done=self.sublayer_done)
            self.queued += 1

    def sublayer_done(self, now: int) -> None:
        self.sublayers_done += 1
        self.queued -= 1
        self.enqueue(now)

    def start_online(self, requests: list[tuple[int, int, int]]) -> None:
        self.on = self.gpu.context("online")
        for a, p, o in requests:
            Request(self, a, p, o).start()

    def online_kernel_started(self, t: int) -> None:
        if self.pending_close:
            self.res.preempt_latency_ms.append((t - self.pending_close.pop()) / MS)

    def advance(self, end_ns: int, progress=None) -> None:
        """Run the GPU to end_ns in 50 slices, reporting progress after each."""
        step_ns = max(1, end_ns // 50)
        for t in range(step_ns, end_ns + step_ns, step_ns):
            self.gpu.run_until(min(t, end_ns))
            if progress:
                progress(min(t, end_ns) / end_ns)

    def finish(self, seconds: float) -> Result:
        res, end_ns = self.res, int(seconds * 1e9)
        if self.off is not None:
            res.offline_tokens_per_s = self.sublayers_done * self.w.offline_tokens_per_sublayer / seconds
        if self.gated:
            self.arbiter.step(self.gpu.now)
            res.preemptions = self.arbiter.policy.preemptions
            res.gate_closed_fraction = self.arbiter.policy.closed_time(self.gpu.now) / end_ns
        res.context_switches = self.gpu.switches
        return res


class Request:
    """One online request: the online signal at arrival (valve), a prefill, then decode steps, one per token."""

    def __init__(self, run: Run, arrival: int, prompt: int, output: int) -> None:
        self.run = run
        self.arrival = arrival
        self.output = output
        self.token_times: list[int] = []
        w = run.w
        self.per_kernel = max(1 * US, w.prefill_ns_per_token * prompt // w.prefill_kernels)

    def start(self) -> None:
        run = self.run
        if run.gated:
            run.gpu.at(self.arrival, self.signal)
            run.gpu.at(self.arrival + run.w.arbiter_delay_ns, run.arbiter_step)
        run.gpu.at(self.arrival, self.prefill)

    def signal(self, now: int) -> None:
        run, on = self.run, self.run.on
        if run.sig.begin():  # the online client closes the gate itself (the arbiter allows it)
            head = on.queue[0] if on.queue else None
            if run.gpu.owner is on and getattr(head, "start_ns", -1) >= 0:
                run.res.preempt_latency_ms.append(0.0)  # online already holds the GPU
            else:
                run.pending_close[:] = [now]

    def prefill(self, now: int) -> None:
        self.launch(self.run.w.prefill_kernels, self.per_kernel)

    def decode(self, now: int) -> None:
        self.launch(self.run.w.decode_kernels, self.run.w.decode_kernel_ns)

    def launch(self, kernels: int, dur: int) -> None:
        run = self.run
        for i in range(kernels):
            last = i == kernels - 1
            run.on.launch(
                dur,
                "online",
                on_start=run.online_kernel_started if run.gated else None,
                on_done=self.token if last else None,
            )

    def token(self, now: int) -> None:
        run, times = self.run, self.token_times
        times.append(now)
        if len(times) == 1:
            run.res.ttft_ms.append((now - self.arrival) / MS)
        if len(times) < self.output:
            run.gpu.after(run.w.decode_cpu_gap_ns, self.decode)
            return
        if len(times) > 1:
            run.res.tpot_ms.append((times[-1] - times[0]) / (len(times) - 1) / MS)
        if run.gated:
            run.sig.end()
            run.gpu.after(run.w.arbiter_delay_ns, run.arbiter_step)


def simulate(variant: str, w: Workload, seconds: float, seed: int, progress=None) -> Result:
    """Run one variant on a fresh simulated GPU and return its measurements."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    run = Run(variant, w, seed)
    if run.gated:
        run.start_runtime()
    if variant != "online-alone":
        run.start_offline()
    if variant != "offline-alone":
        run.start_online(arrivals(w, seconds, random.Random(seed)))
    run.advance(int(seconds * 1e9), progress)
    return run.finish(seconds)


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


def add_gpu(m: Result, r: Result, gpus: int) -> None:
    """Merge one GPU's result of a variant into the node's: latencies pooled, throughput and fractions averaged."""
    m.ttft_ms += r.ttft_ms
    m.tpot_ms += r.tpot_ms
    m.preempt_latency_ms += r.preempt_latency_ms
    m.offline_tokens_per_s += r.offline_tokens_per_s / gpus
    m.preemptions += r.preemptions
    m.gate_closed_fraction += r.gate_closed_fraction / gpus
    m.context_switches += r.context_switches


def cell(row: dict, key: str) -> str:
    """A latency percentile and its ratio to online-alone, or "-" where there is none."""
    v, ratio = row[f"{key}_ms"], row[f"{key}_ratio"]
    return "-" if v != v else f"{v:.2f} (x{ratio:.2f})"


def results_table(rows: list[dict]):
    """The demo's table (a rich Table) of summarize()'s rows."""
    from rich.table import Table

    table = Table(title="online latency vs online-alone, offline throughput vs offline-alone")
    for col in ("variant", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms", "offline tok/s",
                "preemptions", "preempt p99"):
        table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=col == "variant")
    for row in rows:
        off = row["offline_tokens_per_s"]
        table.add_row(
            row["variant"], cell(row, "ttft_p50"), cell(row, "ttft_p99"), cell(row, "tpot_p50"),
            cell(row, "tpot_p99"), "-" if not off else f"{off:,.0f} (x{row['offline_ratio']:.2f})",
            str(row["preemptions"]),
            "-" if row["preempt_latency_p99_ms"] != row["preempt_latency_p99_ms"]
            else f"{row['preempt_latency_p99_ms']:.3f} ms",
        )
    return table


def run_demo(seconds: float = 60.0, seed: int = 0, gpus: int = 1, json_out: str | None = None,
             workload: Workload | None = None) -> list[dict]:
    from rich.console import Console
    from rich.progress import Progress

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
                add_gpu(merged[variant], simulate(variant, w, seconds, seed * 1000 + g, progress=tick), gpus)
    rows = summarize(merged)
    console.print(results_table(rows))
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"workload": asdict(w), "seconds": seconds, "seed": seed, "gpus": gpus, "rows": rows}, f,
                      indent=2)
        console.print(f"wrote {json_out}")
    return rows
