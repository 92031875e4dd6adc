"""End-to-end colocation benchmark: online LLM serving next to offline batch inference on one GPU.

    python3 bench/colocation.py [--quick] [--out bench/results] [--device cuda|cpu] [--variants a,b,...]

Writes ``colocation_<gpu>.json``, ``.png`` and ``.txt`` under --out; ratios to the solo runs with p50 and p99.

On one device, in one call, each variant runs real engine processes: the online server
(``valve.engine.server``, loaded over HTTP/SSE by the open-loop generator in this process) and the offline runner
(``valve.engine.offline``). Variants, in order:

- ``online-alone``: the server alone (the rate for the target busy fraction is calibrated here);
- ``offline-alone``: the runner alone;
- ``time-slicing``: both, nothing between them (the driver time-slices the two contexts);
- ``valve``: both, with Valve's arbiter, the offline gate (``valve.runtime.gate.offline.attach``), the online signal
  (``online_request()``) and the offline KV cache in the runtime's ``KVPool``;
- ``mps``: both under an MPS daemon started for the run (CUDA, root and ``nvidia-cuda-mps-control`` only; last);
- ``time-slicing-mem``, ``valve-mem``, ``mps-mem`` (``--memory-pressure`` adds them): memory pressure, the online
  KV cache elastic (under Valve it asks the arbiter before it maps), the offline pool filling the free memory
  (``memory_plan``); reclaims, bytes, reclaim time, online KV mappings refused, online requests failed (and
  of those, out of memory: any allocation of the engine), waits, evictions in ``memory_rows``.

Every variant sends the same seeded request trace. Offline tokens/s is measured over the load window from the
runner's progress records. On CPU (``--device cpu``) the same harness runs a tiny model in a few seconds.
See docs/engine.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import typer  # noqa: E402  (after the path line: run as `python3 bench/colocation.py`)

from bench import colocation_report as report  # noqa: E402
from bench.harness import env, mps, output  # noqa: E402
from bench.harness.gpu import UtilSampler  # noqa: E402
from bench.harness.loadgen import Arrivals, LengthDist, make_trace, run_trace  # noqa: E402
from bench.harness.procs import Child, ChildFailed, child_env, free_port, wait_for  # noqa: E402
from valve.api.contract import ENV_GPU_UUID, ENV_RUNTIME_DIR  # noqa: E402
from valve.outpath import check_dir  # noqa: E402

VARIANTS = ("online-alone", "offline-alone", "time-slicing", "valve", "mps")
# memory-pressure variants (--memory-pressure, or by name): the same trace, the online KV cache elastic (it maps
# what queued requests need and gives it back when idle), the offline pool taking the free device memory
MEM_VARIANTS = ("time-slicing-mem", "valve-mem", "mps-mem")
ALL_VARIANTS = ("online-alone", "offline-alone", "time-slicing", "valve", "time-slicing-mem", "valve-mem", "mps",
                "mps-mem")  # the order they run in: online-alone first (calibration), MPS last
KNOB_SEP, SET_SEP = "@", "+"  # valve@queue_ahead=1+near_online.window_ms=200: Valve with RuntimeSpec settings


def parse_variant(name: str) -> tuple[str, dict]:
    """A variant name's base (one of ALL_VARIANTS) and the RuntimeSpec settings after ``@`` (Valve variants only:
    ``valve@idle_hysteresis_ms=25+near_online.max_batch_tokens=512``, dotted keys for nested fields). Raises
    ValueError with a one-line reason on an unknown variant, key or value."""
    base, _, knobs = name.partition(KNOB_SEP)
    if base not in ALL_VARIANTS:
        raise ValueError(f"unknown variant {base!r}; expected some of {', '.join(ALL_VARIANTS)}")
    if not knobs:
        return base, {}
    if not base.startswith("valve"):
        raise ValueError(f"{name}: only Valve variants take RuntimeSpec settings")
    spec: dict = {}
    for item in knobs.split(SET_SEP):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"{name}: {item!r} is not key=value")
        *parents, leaf = key.split(".")
        node = spec
        for k in parents:
            node = node.setdefault(k, {})
        try:
            node[leaf] = json.loads(value)
        except ValueError:  # a bare word: a string (eviction_policy=fifo)
            node[leaf] = value
    from valve.api.runtime import RuntimeSpec

    try:
        RuntimeSpec.model_validate(spec)
    except Exception as e:  # noqa: BLE001 - pydantic's message, on one line
        raise ValueError(f"{name}: {' '.join(str(e).split())}") from None
    return base, spec


def merge(a: dict, b: dict) -> dict:
    """``a`` with ``b``'s settings over it (nested dicts merged)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Settings:
    device: str = "cuda"
    online_model: str = "llama-1b"
    offline_model: str = "llama-1b"
    engine: str = "ours"  # ours or transformers (both tenants)
    arch: str = "llama"  # transformers' architecture: llama or qwen
    seconds: float = 45.0  # load window per variant (unless ``requests`` sets it)
    requests: int | None = None  # online requests per variant: the window becomes requests / rate
    repeats: int = 1  # every variant again, in the same order, with a new trace each time (interleaved repeats)
    busy: float = 0.4  # target online busy fraction (used when rate is None)
    rate: float | None = None  # online requests/s
    arrival: str = "poisson"
    cv: float = 1.0
    prompt_mean: float = 400
    prompt_cv: float = 0.6
    prompt_max: int = 2048
    output_mean: float = 128
    output_cv: float = 0.7
    output_max: int = 512
    block_size: int = 16
    online_blocks: int = 4096
    online_batch_tokens: int = 2048
    online_max_seqs: int = 64
    offline_prompt_mean: int = 512
    offline_output: int = 256
    offline_prompts: int = 4000
    offline_batch_tokens: int = 4096
    offline_max_seqs: int = 128
    offline_kv_bytes: int = 8 << 30
    variants: tuple[str, ...] = VARIANTS
    seed: int = 0
    startup_timeout: float = 300.0
    progress_interval: float = 0.25
    offline_warmup: float = 10.0  # seconds of offline steps before the window (kernels loaded, batch full)
    graphs: bool = True  # the online server replays CUDA graphs for decode steps (CUDA only)
    keep_logs: bool = False  # copy the children's logs to <out>/colocation_logs/<variant>/
    # memory-pressure variants (None: sized by memory_plan from the device and the model shapes)
    mem_device_bytes: int | None = None  # CPU: the simulated device's memory (GPU: the real one)
    mem_chunk_bytes: int | None = None  # both pools' mapping unit
    mem_online_bytes: int | None = None  # the most the online KV pool may map
    mem_online_base_bytes: int | None = None  # what it keeps mapped
    mem_leave_bytes: int | None = None  # free memory the offline pool leaves when it fills up
    mem_reserve_bytes: int | None = None  # the arbiter's reserve floor (RuntimeSpec.reserve.min_bytes)
    mem_idle_release_s: float | None = None  # online idle time before it gives its burst memory back

    def offline_blocks(self, kv_bytes_per_token: int) -> int:
        return max(1, self.offline_kv_bytes // (kv_bytes_per_token * self.block_size))

    def gpu_bytes(self) -> int:
        """Both tenants' weights and KV caches (bf16): what must fit on the GPU at once."""
        from valve.engine.config import get_config

        on, off = get_config(self.online_model), get_config(self.offline_model)
        weights = 2 * (on.params() + off.params())
        online_kv = self.online_blocks * self.block_size * on.kv_bytes_per_token()
        return weights + online_kv + self.offline_kv_bytes


def memory_plan(s: Settings, gpu_total_bytes: int | None) -> dict:
    """Sizes of the memory-pressure variants, in units of the pools' mapping chunk. The offline pool may map the
    whole device and fills the free memory but ``leave_bytes`` (without Valve) or what the arbiter grants (with
    Valve: free beyond the reserve and its hysteresis); the online pool keeps ``online_base_bytes`` and may grow to
    what ``online_max_seqs`` requests of the longest shape need (a device that refuses it is an online OOM: the
    requests then wait for blocks). On a GPU the arbiter's reserve floor and what the offline pool leaves free are
    RuntimeSpec's 1 GiB floor (256 MiB left the H200's online engine no room for its own, non-KV allocations: every
    request failed), but the reserve's recent-peak memory is short (``decay_s``, not RuntimeSpec's 60 s), so online
    bursts need memory that offline holds. On CPU the device
    is a simulated one of ``device_bytes`` (VALVE_SIM_DEVICE, shared by the processes) sized to the tiny model."""
    from valve.api.runtime import RuntimeSpec
    from valve.engine.config import get_config

    cpu = s.device == "cpu"
    KiB, MiB = 1 << 10, 1 << 20
    chunk = s.mem_chunk_bytes or (16 * KiB if cpu else 8 * MiB)
    per_token = get_config(s.online_model).kv_bytes_per_token(4 if cpu else 2)
    need = s.online_max_seqs * (s.prompt_max + s.output_max) * per_token
    device = s.mem_device_bytes or (8 * MiB if cpu else None)

    floor = RuntimeSpec().reserve.min_bytes

    def pick(value, cpu_default, gpu_default):
        return value if value is not None else cpu_default if cpu else gpu_default

    return {"chunk_bytes": chunk, "online_max_bytes": s.mem_online_bytes or -(-need // chunk) * chunk,
            # one request of the longest shape always fits: without memory from offline, requests queue, never hang
            "online_base_bytes": s.mem_online_base_bytes or -(-(s.prompt_max + s.output_max) * per_token // chunk) * chunk,
            # GPU: room for the tenants' own activations (torch allocations outside the pools)
            "leave_bytes": pick(s.mem_leave_bytes, 0, floor),
            # the offline engine's activations (outside the pool) grow with its contexts: fill once they peaked
            "fill_after_steps": 3 if cpu else 200,
            "reserve_bytes": pick(s.mem_reserve_bytes, chunk, floor), "hysteresis_bytes": pick(None, 0, 8 * chunk),
            "decay_s": 0.3 if cpu else 5.0,
            "idle_release_s": pick(s.mem_idle_release_s, 0.1, 1.0),
            "device_bytes": device, "offline_max_bytes": device or gpu_total_bytes or (8 << 30)}


def check_settings(s: Settings, gpu_total_bytes: int | None) -> None:
    """ValueError with one line naming the fix, before any child process starts."""
    from valve.engine.choice import check_engine
    from valve.engine.config import CONFIGS

    for which, name in (("online", s.online_model), ("offline", s.offline_model)):
        if name not in CONFIGS:
            raise ValueError(f"unknown {which} model {name!r}: use --model {' or --model '.join(CONFIGS)}")
    check_engine(s.engine, s.arch)
    need = s.gpu_bytes()
    if gpu_total_bytes and need > 0.9 * gpu_total_bytes:  # activations, graphs and the CUDA contexts need the rest
        raise ValueError(f"{s.online_model} online + {s.offline_model} offline need {need / 2**30:.0f} GiB of "
                         f"weights and KV cache, more than 90% of this GPU's {gpu_total_bytes / 2**30:.0f} GiB: "
                         "pick a smaller --model or lower offline_kv_bytes")


def preset(device: str, quick: bool) -> Settings:
    """GPU: llama-1b shapes for both tenants. CPU: the tiny shape, short requests (tests and CI)."""
    if device == "cpu":
        return Settings(device="cpu", online_model="tiny", offline_model="tiny", seconds=1.5 if quick else 8.0,
                        busy=0.3, prompt_mean=32, prompt_max=128, output_mean=8, output_max=32, block_size=8,
                        online_blocks=512, online_batch_tokens=256, online_max_seqs=16, offline_prompt_mean=24,
                        offline_output=64, offline_prompts=20000, offline_batch_tokens=128,
                        offline_max_seqs=8, offline_kv_bytes=32 << 20, startup_timeout=60.0, rate=6.0,
                        offline_warmup=0.3)
    # chat-like online requests short enough for >= 100 of them per 60 s window at ~35% busy; a prefill-heavy
    # offline batch job (long documents, short answers) that keeps the GPU busy, as a real batch engine would
    return Settings(seconds=8.0 if quick else 60.0, busy=0.4, prompt_mean=256, output_mean=64,
                    offline_prompt_mean=1024, offline_output=128, offline_batch_tokens=8192,
                    offline_prompts=3000 if quick else 8000, offline_warmup=3.0 if quick else 12.0)


def detect_device() -> str:
    return "cuda" if env.has_gpu() else "cpu"


# ---- environment ------------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    """GPU name, UUID, driver, torch/CUDA versions (NVML in this process: no CUDA context here)."""
    return env.record(device, gpu="cpu", gpu_uuid="GPU-cpu-sim")


def busy_fraction(results, seconds: float) -> float:
    """Fraction of [0, seconds] with at least one online request in flight (send -> last token)."""
    spans = sorted((r.t_send, r.t_send + r.e2e) for r in results if r.e2e is not None)
    covered, end = 0.0, 0.0
    for a, b in spans:
        a, b = max(a, end), min(b, seconds)
        if b > a:
            covered += b - a
        end = max(end, b)
    return covered / seconds if seconds > 0 else 0.0


def host_share(a: dict, b: dict) -> float | None:
    """The part of the engine's time in steps between two records (progress or /stats) that was host work, not
    waiting for the GPU: near 0 for a GPU-bound tenant."""
    steps = b.get("step_seconds", 0.0) - a.get("step_seconds", 0.0)
    return 1 - (b.get("sync_seconds", 0.0) - a.get("sync_seconds", 0.0)) / steps if steps > 0 else None


def join_timeline(results, path: Path) -> list[dict]:
    """The server's timeline records of the window's requests, each with the client's TTFT and what it adds to
    the server's (``client``: HTTP, the client's event loop). Milliseconds."""
    recs = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        recs[r["rid"]] = r
    out = []
    for res in results:
        r = recs.get(res.rid)
        if r is None:
            continue
        row = {"rid": res.rid, "prompt_tokens": r["prompt_tokens"], "ttft": res.ttft * 1e3}
        for k in report.SERVER_PARTS + ("server_ttft",):
            row[k] = r[k] * 1e3 if r.get(k) is not None else None
        row["client"] = row["ttft"] - row["server_ttft"]
        row.update({k: r.get(k) for k in ("sm_mhz_arrival", "sm_mhz_mean", "power_w_arrival", "power_w_mean")})
        out.append(row)
    return out


def http_json(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def read_progress(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return out


def tokens_at(records: list[dict], t: float) -> float:
    """Generated tokens at wall time ``t``, interpolated between progress records."""
    pts = [(r["time"], r["generated_tokens"]) for r in records]
    if not pts:
        return 0.0
    if t <= pts[0][0]:
        return float(pts[0][1])
    for (t0, g0), (t1, g1) in zip(pts, pts[1:], strict=False):
        if t0 <= t <= t1:
            return g0 + (g1 - g0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
    return float(pts[-1][1])


def offline_rate(records: list[dict], t0: float, t1: float) -> float:
    return (tokens_at(records, t1) - tokens_at(records, t0)) / (t1 - t0) if t1 > t0 else float("nan")


def write_offline_prompts(path: Path, s: Settings, vocab: int) -> None:
    import random

    rng = random.Random(s.seed + 1)
    dist = LengthDist(s.offline_prompt_mean, 0.3, 4, 4 * s.offline_prompt_mean)
    distinct = [[rng.randrange(vocab) for _ in range(dist.sample(rng))] for _ in range(min(500, s.offline_prompts))]
    lo, hi = max(1, s.offline_output // 4), max(1, s.offline_output * 7 // 4)  # mean offline_output
    with open(path, "w") as f:  # more records than any window consumes; the prompts repeat, the ids do not
        for i in range(s.offline_prompts):
            # varied output lengths: sequences finish at different steps, so the batch stays full and the
            # rate is steady instead of moving in synchronised prefill/decode waves
            rec = {"id": i, "prompt": distinct[i % len(distinct)], "max_tokens": rng.randint(lo, hi)}
            f.write(json.dumps(rec) + "\n")


# ---- processes --------------------------------------------------------------------------------------------------
def server_cmd(s: Settings, port: int, ready: Path, valve: bool, timeline: Path | None = None,
               mem: dict | None = None) -> list[str]:
    elastic = [] if mem is None else [
        "--kv-elastic-bytes", str(mem["online_max_bytes"]), "--kv-base-bytes", str(mem["online_base_bytes"]),
        "--kv-chunk-bytes", str(mem["chunk_bytes"]), "--kv-idle-release-s", str(mem["idle_release_s"])]
    return [sys.executable, "-m", "valve.engine.server"] + elastic + (["--timeline", str(timeline)] if timeline else []) + [ "--model", s.online_model, "--device", s.device,
            "--engine", s.engine, "--arch", s.arch,
            "--port", str(port), "--num-blocks", str(s.online_blocks), "--block-size", str(s.block_size),
            "--max-batch-tokens", str(s.online_batch_tokens), "--max-seqs", str(s.online_max_seqs),
            "--ready-file", str(ready), "--seed", str(s.seed), "--graph-max-context",
            str(s.prompt_max + s.output_max), "--warmup-max-prompt", str(s.prompt_max)] + (["--valve"] if valve else []) + ([] if s.graphs else ["--no-graphs"])


def offline_cmd(s: Settings, inp: Path, out: Path, progress: Path, valve: bool, n_blocks: int,
                mem: dict | None = None, reclaim_log: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "valve.engine.offline", "--input", str(inp), "--output", str(out),
           "--model", s.offline_model, "--device", s.device, "--block-size", str(s.block_size),
           "--engine", s.engine, "--arch", s.arch,
           "--num-blocks", str(n_blocks), "--max-batch-tokens", str(s.offline_batch_tokens),
           "--max-seqs", str(s.offline_max_seqs), "--max-tokens", str(s.offline_output),
           "--progress", str(progress), "--progress-interval", str(s.progress_interval), "--seed", str(s.seed + 1)]
    if mem is not None:  # the pool under every variant; it fills the free memory (less leave_bytes)
        cmd += ["--kv-pool", "--kv-pool-bytes", str(mem["offline_max_bytes"]), "--kv-chunk-bytes",
                str(mem["chunk_bytes"]), "--kv-pool-fill", "--kv-pool-leave-bytes", str(mem["leave_bytes"]),
                "--kv-pool-fill-after-steps", str(mem["fill_after_steps"])]
        cmd += ["--gate"] if valve else []
        cmd += ["--reclaim-log", str(reclaim_log)] if reclaim_log else []
    elif valve:
        cmd += ["--gate", "--kv-pool", "--kv-pool-bytes", str(s.offline_kv_bytes)]
    return cmd


def arbiter_cmd(gpu_uuid: str, runtime_dir: Path, metrics_port: int, spec: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "valve.cli", "runtime", "arbiter", "--gpu", gpu_uuid,
            "--runtime-dir", str(runtime_dir), "--metrics-port", str(metrics_port)] + (
        ["--spec", str(spec)] if spec else [])


def runtime_spec(mem: dict) -> dict:
    """The arbiter's RuntimeSpec for a memory-pressure variant: the reserve of the plan."""
    return {"reserve": {"min_bytes": mem["reserve_bytes"], "hysteresis_bytes": mem["hysteresis_bytes"],
                        "decay_seconds": mem["decay_s"]}}


def valve_missing() -> str | None:
    """Why the Valve variant cannot run here (a runtime module missing), or None."""
    import importlib.util

    for mod in ("valve.runtime.gate.offline", "valve.runtime.online.signal", "valve.runtime.arbiter.loop"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not available"
    return None


mps_missing = mps.missing


# ---- one variant ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """State shared by the variants of one benchmark call."""

    s: Settings
    workdir: Path
    env_info: dict
    trace: list | None = None
    rate: float | None = None
    calibration: dict = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)
    vocab: int = 0
    window: float | None = None  # seconds of load per variant, once the trace is made
    repeat: int = 0

    def seconds(self) -> float:
        return self.window if self.window is not None else self.s.seconds


def http_complete(url: str, prompt: list[int], max_tokens: int, timeout: float) -> float:
    """One streaming request, returns its end-to-end seconds (warm-up and calibration)."""
    import httpx

    t0 = time.perf_counter()
    with httpx.Client(timeout=timeout) as c:
        with c.stream("POST", url + "/v1/completions",
                      json={"prompt": prompt, "max_tokens": max_tokens, "stream": True}) as r:
            if r.status_code != 200:
                raise ChildFailed(f"online server answered HTTP {r.status_code}: {r.read()[:300]!r}")
            for _ in r.iter_bytes():
                pass
    return time.perf_counter() - t0


def calibrate(run: Run, url: str, vocab: int) -> None:
    """Rate for the target busy fraction: busy / (service time of a mean-length request alone)."""
    s = run.s
    prompt = [(7 * i) % vocab for i in range(int(s.prompt_mean))]
    times = sorted(http_complete(url, prompt, int(s.output_mean), 120) for _ in range(3))
    service = times[1]
    run.rate = s.rate if s.rate else s.busy / service
    run.calibration = {"service_s": service, "rate_per_s": run.rate, "target_busy": s.busy if not s.rate else None}
    run.vocab = vocab
    new_trace(run, s.seed)


def new_trace(run: Run, seed: int) -> None:
    """The online trace of one repeat at the calibrated rate: ``seconds`` long, or the first ``requests``
    arrivals (the window then ends at the last one)."""
    s = run.s
    arr = Arrivals(s.arrival, run.rate, s.cv)
    prompt, output = LengthDist(s.prompt_mean, s.prompt_cv, 1, s.prompt_max), LengthDist(
        s.output_mean, s.output_cv, 1, s.output_max)
    if not s.requests:
        run.trace = make_trace(arr, s.seconds, prompt, output, run.vocab, seed)
        return
    span = 1.25 * s.requests / run.rate
    while len(trace := make_trace(arr, span, prompt, output, run.vocab, seed)) < s.requests:
        span *= 1.5
    run.trace = trace[:s.requests]
    run.window = max(run.trace[-1].t, 0.5)


def run_variant(run: Run, name: str, tick=None) -> dict:
    from valve.engine.config import get_config

    # a directory per repeat: the last repeat's ready file, timeline and progress must not be read as this one's
    s, wd = run.s, run.workdir / f"repeat{run.repeat + 1}" / name
    wd.mkdir(parents=True, exist_ok=True)
    online, offline = name != "offline-alone", name != "online-alone"
    kind, knobs = parse_variant(name)
    base = kind.removesuffix("-mem")
    mem = memory_plan(s, run.env_info.get("gpu_total_bytes")) if kind in MEM_VARIANTS else None
    valve = base == "valve"
    on_cfg, off_cfg = get_config(s.online_model), get_config(s.offline_model)
    extra: dict = {}
    children: list[Child] = []
    util = UtilSampler(s.device)
    stack = ExitStack()
    try:
        if base == "mps":
            extra.update(stack.enter_context(mps.Daemon(wd)).env)
        if mem is not None and mem["device_bytes"]:  # CPU: one simulated device for the three processes
            from valve.runtime.memory.sim import ENV_SIM_DEVICE, SharedSimGPU

            SharedSimGPU(wd / "sim-device", mem["device_bytes"], mem["chunk_bytes"])
            extra[ENV_SIM_DEVICE] = str(wd / "sim-device")
        if valve:
            rdir = wd / "runtime"
            uuid = run.env_info["gpu_uuid"]
            extra.update({ENV_GPU_UUID: uuid, ENV_RUNTIME_DIR: str(rdir)})
            from valve.runtime.control import ControlBlock, control_path

            # created here so that the engines may start beside the arbiter (which reuses a valid block)
            ControlBlock.create(control_path(uuid, rdir)).close()
            cenv = child_env(extra, one_thread=s.device == "cpu")
            spec = None
            settings = merge(runtime_spec(mem) if mem is not None else {}, knobs)
            if settings:
                spec = wd / "runtime-spec.json"
                spec.write_text(json.dumps(settings))
            children.append(Child("arbiter", arbiter_cmd(uuid, rdir, free_port(), spec), cenv,
                                  wd / "arbiter.log"))
        cenv = child_env(extra, one_thread=s.device == "cpu")
        url = None
        if online:
            port, ready = free_port(), wd / "server.ready"
            timeline = wd / "timeline.jsonl"
            if valve and mem is not None:  # the server's memory client maps the control block: arbiter first
                wait_for("the arbiter's heartbeat", lambda: heartbeat(control_path(uuid, rdir)), 60, children)
            children.append(Child("online server", server_cmd(s, port, ready, valve, timeline, mem), cenv,
                                  wd / "server.log"))
            url = f"http://127.0.0.1:{port}"
        progress, reclaims = wd / "progress.jsonl", wd / "reclaims.jsonl"
        if online and mem is not None:  # the offline pool fills what the server (weights, warm-up) left free
            wait_for("the online server", ready.exists, s.startup_timeout, children)
        if offline:
            inp = run.workdir / "offline_prompts.jsonl"
            n_blocks = s.offline_blocks(off_cfg.kv_bytes_per_token(2 if s.device == "cuda" else 4))
            children.append(Child("offline runner", offline_cmd(s, inp, wd / "completions.jsonl", progress, valve,
                                                                n_blocks, mem, reclaims if valve else None),
                                  cenv, wd / "offline.log"))
        run.pids += [c.pid for c in children]
        if valve:
            wait_for("the arbiter's heartbeat", lambda: heartbeat(control_path(uuid, rdir)), 60, children)
        if online:
            wait_for("the online server", ready.exists, s.startup_timeout, children)
            warm = [(11 * i) % on_cfg.vocab for i in range(int(s.prompt_mean))]
            http_complete(url, warm, int(s.output_mean), 120)  # kernels for trace-sized shapes
            if run.trace is None:
                calibrate(run, url, on_cfg.vocab)
        if offline:
            wait_for("the offline runner's warm-up", lambda: offline_warm(read_progress(progress), s.offline_warmup),
                     s.startup_timeout, children)
        if tick:
            tick(0.2)
        util.start()
        t0 = time.time()
        results = []
        if online:
            stats0 = http_json(url + "/stats")
            results = asyncio.run(run_trace(url, run.trace, s.online_model))
            stats1 = http_json(url + "/stats")
            trace_end = time.time()  # past the window when the requests ran late (a loaded host)
        t1 = t0 + run.seconds()
        while time.time() < t1:
            for c in children:
                c.check()
            time.sleep(0.05)
        gpu_util = util.stop()
        out: dict = {"gpu_util": gpu_util}
        if offline:
            wait_for("offline progress past the window",
                     lambda: any(r["time"] >= t1 for r in read_progress(progress)), 60 + run.seconds(), children)
            recs = read_progress(progress)
            out["offline_tokens_per_s"] = offline_rate(recs, t0, t1)
            out["offline_progress"] = [[round(r["time"] - t0, 3), r["generated_tokens"]] for r in recs
                                       if t0 - 2 <= r["time"] <= t1 + 1]
            window = [r for r in recs if t0 <= r["time"] <= t1]
            out["offline_small_steps"] = recs[-1].get("small_steps", 0) if recs else 0  # near-online budget
            out["offline_host_share"] = host_share(window[0], window[-1]) if len(window) > 1 else None
        if online:
            ok = [r for r in results if r.error is None and r.ttft is not None]
            out["ttft_ms"] = [r.ttft * 1e3 for r in ok]
            out["tpot_ms"] = [r.tpot * 1e3 for r in ok if r.tpot is not None]
            out["errors"] = len(results) - len(ok)
            out["oom_errors"] = report.oom_errors(r.error for r in results)  # every one, not only the samples
            out["error_samples"] = sorted({r.error for r in results if r.error})[:3]
            out["busy_fraction"] = busy_fraction(ok, run.seconds())
            out["online_host_share"] = host_share(stats0, stats1)
            out["timeline"] = join_timeline(ok, timeline)
        if valve:
            out["control"] = read_control(control_path(uuid, rdir))
        if mem is not None:
            # the reclaims over the span the online asks were counted in (stats0 to stats1), not only the window
            out.update(memory_figures(stats0.get("memory", {}), stats1.get("memory", {}), read_progress(reclaims),
                                      t0, max(t1, trace_end)))
        return out
    finally:
        util.stop()
        for c in reversed(children):
            c.stop()
        stack.close()  # the MPS daemon, after its clients
        if tick:
            tick(1.0)


def memory_figures(before: dict, after: dict, reclaims: list[dict], t0: float, t1: float) -> dict:
    """A memory-pressure variant's figures from ``t0`` to ``t1`` (the load window, or the online trace's end if
    later): the offline pool's reclaims (count, bytes, host time of each, sequences evicted and their tokens to
    recompute) and the online pool (failed device allocations, waits for memory it asked for, peak). ``mem_*``
    keys, so repeats pool like the other figures."""
    win = [r for r in reclaims if t0 <= r["time"] <= t1 and r["released_bytes"] > 0]
    waits = after.get("ask_wait_s", [])[len(before.get("ask_wait_s", [])):]
    return {
        "mem_reclaims": len(win), "mem_reclaimed_bytes": sum(r["released_bytes"] for r in win),
        "mem_reclaim_ms": [r["seconds"] * 1e3 for r in win],
        "mem_evicted": sum(r["evicted"] for r in win), "mem_recomputed_tokens": sum(r["evicted_tokens"] for r in win),
        "mem_online_ooms": after.get("ooms", 0) - before.get("ooms", 0),
        "mem_online_device_ooms": after.get("device_ooms", 0) - before.get("device_ooms", 0),
        "mem_online_grows": after.get("grows", 0) - before.get("grows", 0),
        "mem_online_grown_bytes": after.get("grown_bytes", 0) - before.get("grown_bytes", 0),
        "mem_online_peak_bytes": after.get("peak_bytes", 0), "mem_ask_wait_ms": [w * 1e3 for w in waits],
    }


def offline_warm(records: list[dict], warmup_s: float) -> bool:
    """The runner has finished a sequence and stepped for ``warmup_s`` seconds since its first record."""
    return bool(records) and records[-1]["records"] >= 1 and records[-1]["time"] - records[0]["time"] >= warmup_s


def clip(text: str, head: int = 600, tail: int = 2400) -> str:
    """A long error: its start (what failed) and its end (the exception), not the middle."""
    return text if len(text) <= head + tail else f"{text[:head]}\n[...]\n{text[-tail:]}"


def heartbeat(path: Path) -> bool:
    from valve.runtime.control import ControlBlock

    cb = ControlBlock.open(path)
    beat = int(cb.fields.heartbeat_ns) > 0
    try:
        cb.close()
    except BufferError:
        pass
    return beat


def read_control(path: Path) -> dict:
    """The Valve counters at the end of the run (preemptions, gate closed time, reclaims, evictions)."""
    try:
        from valve.runtime.control import ControlBlock

        cb = ControlBlock.open(path)
    except Exception as e:  # the counters are a bonus; the latency numbers stand without them
        return {"error": str(e)}
    out = {k: int(getattr(cb.fields, k)) for k in ("preemptions", "gate_closed_ns", "online_requests", "offline_progress",
                                          "forced_opens", "reclaim_ack_seq", "evicted_sequences",
                                          "recomputed_tokens", "offline_pool_bytes", "queue_ahead",
                                          "near_online_ns", "near_online_tokens")}
    try:
        cb.close()
    except BufferError:  # a ctypes view still alive: the mapping goes with the process
        pass
    return out


# ---- the whole benchmark ----------------------------------------------------------------------------------------
def run_benchmark(s: Settings, out_dir: Path, progress=None, console=None, resume: dict | None = None) -> dict:
    """Every variant in order, ``repeats`` times (interleaved); writes ``colocation_<gpu>.json``, ``.txt`` and
    ``.png`` under ``out_dir`` after each repeat (a run cut short keeps its finished repeats); returns the result
    (``rows``, ``skipped``, ``files``; ``variants`` for one repeat, ``repeats`` and ``repeat_rows`` for more).
    ``resume``: the result of a run of the same settings cut short; its repeats are kept, its rate reused, and the
    run goes on with the repeats it lacks."""
    from valve.engine.config import get_config

    env_info = environment(s.device)
    check_settings(s, env_info.get("gpu_total_bytes"))
    skipped: dict[str, str] = {}
    todo = []
    for v in s.variants:
        base = parse_variant(v)[0].removesuffix("-mem")
        why = valve_missing() if base == "valve" else mps_missing(s.device) if base == "mps" else None
        if why:
            skipped[v] = why
        else:
            todo.append(v)
    todo.sort(key=lambda v: ALL_VARIANTS.index(parse_variant(v)[0]))  # online-alone first (calibration), mps last
    reps: list[dict[str, dict]] = []
    started, earlier = time.time(), 0.0
    if resume:
        reps = [dict(v) for v in resume.get("repeats") or [resume["variants"]]]
        skipped.update(resume.get("skipped", {}))
        earlier = resume.get("seconds_total", 0.0)
    steps = len(todo) * s.repeats
    result: dict = {}
    # in shared memory: the control block must be (cuMemHostRegister refuses file-backed pages on disk)
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="valve-colocation-", dir=shm) as tmp:
        run = Run(s, Path(tmp), env_info)
        write_offline_prompts(run.workdir / "offline_prompts.jsonl", s, get_config(s.offline_model).vocab)
        if resume and resume.get("calibration"):
            run.calibration = resume["calibration"]
            run.rate, run.vocab = run.calibration["rate_per_s"], get_config(s.online_model).vocab
        for r in range(len(reps), s.repeats):
            if run.rate:  # the same rate, a new trace: repeats sample different request mixes
                new_trace(run, s.seed + r)
            variants: dict[str, dict] = {}
            run.repeat = r
            for i, name in enumerate(todo):
                def tick(frac, k=r * len(todo) + i, name=name, r=r):
                    if progress:
                        progress(name + (f" (repeat {r + 1}/{s.repeats})" if s.repeats > 1 else ""),
                                 (k + frac) / steps)

                tick(0.0)
                t_var = time.time()
                try:
                    variants[name] = run_variant(run, name, tick)
                    variants[name]["wall_s"] = time.time() - t_var
                except ChildFailed as e:
                    if name in ("online-alone", "offline-alone"):
                        raise
                    key = name if s.repeats == 1 else f"{name} (repeat {r + 1})"
                    skipped[key] = f"failed: {clip(str(e))}"
                    if console:
                        console.print(f"[red]{key} failed[/red]: {clip(str(e))}")
            reps.append(variants)
            result = write_result(s, run, env_info, reps, skipped, earlier + time.time() - started, out_dir)
        if s.keep_logs:
            for log in Path(tmp).glob("*/*/*.log"):
                dst = out_dir / "colocation_logs" / log.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log, dst)
    return result


def write_result(s: Settings, run: Run, env_info: dict, reps: list[dict[str, dict]], skipped: dict,
                 seconds_total: float, out_dir: Path) -> dict:
    """The JSON, table and plots of the repeats so far. One repeat keeps the single-run layout (``variants``);
    more keep every repeat's raw data under ``repeats`` and summarise them in ``rows`` (median of the repeats,
    with the spread)."""
    pooled = report.pool(reps)
    result = {
        "benchmark": "colocation", "env": env_info, "settings": asdict(s), "calibration": run.calibration,
        "window_s": run.seconds(), "seconds_total": seconds_total, "skipped": dict(skipped),
        "pids": list(run.pids), "tenants": tenants(pooled),
    }
    mem_rows = report.memory_rows(pooled)
    if mem_rows:  # only runs with memory-pressure variants carry these (older results load as they were)
        result["memory_plan"] = memory_plan(s, env_info.get("gpu_total_bytes"))
        result["memory_rows"] = mem_rows
    if len(reps) == 1:
        result.update(variants=reps[0], rows=report.rows(reps[0]), breakdown=report.breakdown(reps[0]))
    else:
        repeat_rows = [report.rows(v) for v in reps]
        result.update(repeats=reps, repeat_rows=repeat_rows, rows=report.summarize(repeat_rows),
                      breakdown=report.mean_breakdown([report.breakdown(v) for v in reps]))
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = env_info["gpu"].lower().replace("nvidia ", "").replace(" ", "-") if s.device == "cuda" else "cpu"
    if s.device == "cuda":  # one file per engine and shape: runs of a session sit side by side
        slug += f"_{s.engine}" + (f"-{s.arch}" if s.engine != "ours" else "") + f"_{s.online_model}"
        slug += f"_{s.offline_model}" if s.offline_model != s.online_model else ""
        slug += f"_{s.repeats}x" if s.repeats > 1 else ""
    stem = out_dir / f"colocation_{slug}"
    title = (f"{s.online_model} online + {s.offline_model} offline on {env_info['gpu']}, "
             f"{run.rate or 0:.2f} req/s {s.arrival}" + (f", {len(reps)} repeats" if len(reps) > 1 else ""))
    result["files"] = [str(stem) + ".json", str(stem) + ".png", str(stem) + "_breakdown.png"]
    result["title"] = title
    sweep = sum(parse_variant(r["variant"])[0] == "valve" for r in result["rows"]) > 1  # Valve at several settings
    if sweep:
        result["tradeoff"] = report.tradeoff_points(result["rows"])
        result["files"].append(str(stem) + "_tradeoff.png")
    output.write(out_dir, stem.name, result, table_text(result), lambda p: report.plot(pooled, str(p), title))
    report.plot_breakdown(result["breakdown"], str(stem) + "_breakdown.png", title)
    if sweep:
        report.plot_tradeoff(result["rows"], str(stem) + "_tradeoff.png", title)
    return result


def tenants(variants: dict) -> dict:
    """How GPU-bound each tenant was alone: NVML utilisation and the host's share of its step time."""
    on, off = variants.get("online-alone", {}), variants.get("offline-alone", {})
    return {"online": {"gpu_util": on.get("gpu_util"), "host_share": on.get("online_host_share"),
                       "busy_fraction": on.get("busy_fraction")},
            "offline": {"gpu_util": off.get("gpu_util"), "host_share": off.get("offline_host_share")}}


def table_text(result: dict) -> str:
    from rich.console import Console

    con = Console(width=200, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    con.print(report.render_table(result["rows"], result.get("title", "colocation")))
    if result.get("memory_rows"):  # rebuilt from the variants: a result written before a column was added has it
        pooled = result["variants"] if "variants" in result else report.pool(result["repeats"])
        con.print(report.render_memory_table(report.memory_rows(pooled), "memory pressure (load window; reclaim "
                                             "time: the offline pool's, host)"))
    for k, v in result["skipped"].items():
        con.print(f"skipped {k}: {v.splitlines()[0] if v else ''}")
    for name, d in result.get("breakdown", {}).items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in d["mean_ms"].items() if v is not None and k != "ttft")
        con.print(f"{name}: mean TTFT {d['mean_ms']['ttft']:.2f} ms = {parts}")
    for who, t in result.get("tenants", {}).items():
        util, host = t.get("gpu_util"), t.get("host_share")
        con.print(f"{who} alone: GPU util {'-' if util is None else f'{util:.0f}%'}, host share of step time "
                  f"{'-' if host is None else f'{host:.2f}'}")
    return con.export_text()


def load_resume(path: Path, s: Settings) -> dict:
    """The result to resume, checked: a run of these settings (the repeat count aside) with repeats left."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read --resume {path}: {e}") from None
    if doc.get("benchmark") != "colocation":
        raise ValueError(f"--resume {path} is not a colocation result")
    ours = {k: v for k, v in json.loads(json.dumps(asdict(s))).items() if k not in ("repeats", "keep_logs")}
    theirs = doc.get("settings", {})
    # a setting added since that run is as it was then when it has its default
    defaults = json.loads(json.dumps(asdict(Settings())))
    diff = sorted(k for k in ours if theirs.get(k, defaults.get(k)) != ours[k])
    if diff:
        raise ValueError(f"--resume {path} ran other settings ({', '.join(diff)}): pass the same options")
    done = len(doc.get("repeats") or [doc.get("variants")])
    if done >= s.repeats:
        raise ValueError(f"--resume {path} already has {done} repeats: ask for more with --repeats")
    return doc


def settings_from(device: str | None, quick: bool, **overrides) -> Settings:
    dev = device or detect_device()
    s = preset(dev, quick)
    return replace(s, **{k: v for k, v in overrides.items() if v is not None})


def with_memory_variants(chosen: tuple[str, ...]) -> tuple[str, ...]:
    """``chosen`` plus the memory-pressure variant of each colocated one (time-slicing and valve when none is)."""
    mem = [f"{v}-mem" for v in chosen if f"{v}-mem" in MEM_VARIANTS] or ["time-slicing-mem", "valve-mem"]
    return tuple(dict.fromkeys((*chosen, *mem)))


# ---- command line -----------------------------------------------------------------------------------------------
def colocation(
    quick: bool = typer.Option(False, "--quick", help="Short windows (GPU < 90 s, CPU a few seconds)."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Directory for the JSON, PNG and table."),
    device: str | None = typer.Option(None, help="cuda or cpu (default: cuda when NVML sees a GPU)."),
    model: str | None = typer.Option(None, help="Both tenants' model shape: llama-1b (GPU default), llama-8b."),
    engine: str | None = typer.Option(None, help="ours (default) or transformers (its own model classes)."),
    arch: str | None = typer.Option(None, help="With --engine transformers: llama (default) or qwen."),
    online_model: str | None = typer.Option(None, help="Online model shape (llama-1b on GPU, tiny on CPU)."),
    offline_model: str | None = typer.Option(None, help="Offline model shape."),
    seconds: float | None = typer.Option(None, min=0.5, help="Load window per variant, seconds."),
    requests: int | None = typer.Option(None, min=1, help="Online requests per variant (sets the window from "
                                                            "the calibrated rate; overrides --seconds)."),
    repeats: int | None = typer.Option(None, min=1, help="Run every variant this many times, interleaved "
                                                         "(a new trace each time); the table shows the median."),
    busy: float | None = typer.Option(None, min=0.01, max=0.95, help="Target online busy fraction."),
    rate: float | None = typer.Option(None, min=0.01, help="Online requests/s (skips calibration)."),
    arrival: str | None = typer.Option(None, help="poisson, gamma or onoff."),
    cv: float | None = typer.Option(None, help="Gamma arrivals: CV of the gaps."),
    variants: str | None = typer.Option(None, help="Comma list (default: all but the memory-pressure ones): "
                                                   "online-alone, offline-alone, time-slicing, valve, mps, "
                                                   "time-slicing-mem, valve-mem, mps-mem."),
    memory_pressure: bool = typer.Option(False, "--memory-pressure", help="Add the memory-pressure variants of "
                                         "the chosen ones (time-slicing-mem, valve-mem, mps-mem): elastic online "
                                         "KV cache, offline pool filling the free memory."),
    mem_device_bytes: int | None = typer.Option(None, help="Memory variants on CPU: the simulated device's bytes."),
    mem_online_bytes: int | None = typer.Option(None, help="Memory variants: the online KV pool's most bytes."),
    mem_leave_bytes: int | None = typer.Option(None, help="Memory variants: free bytes the filling offline pool "
                                               "leaves (GPU default: RuntimeSpec's reserve floor, 1 GiB)."),
    mem_reserve_bytes: int | None = typer.Option(None, help="Memory variants: the arbiter's reserve floor "
                                                 "(GPU default: RuntimeSpec's, 1 GiB)."),
    seed: int | None = typer.Option(None, help="Seed of the request trace and the weights."),
    output_mean: float | None = typer.Option(None, help="Mean online output tokens."),
    prompt_mean: float | None = typer.Option(None, help="Mean online prompt tokens."),
    offline_warmup: float | None = typer.Option(None, help="Offline seconds before each window."),
    graphs: bool | None = typer.Option(None, "--graphs/--no-graphs", help="Online decode through CUDA graphs."),
    keep_logs: bool = typer.Option(False, "--keep-logs", help="Copy the children's logs under --out."),
    resume: Path | None = typer.Option(None, "--resume", help="A result JSON of a run cut short: keep its "
                                                              "repeats, run the ones it lacks (same settings)."),
) -> None:
    """Online + offline LLM inference on one device: alone, time-slicing, Valve, MPS; TTFT/TPOT and tokens/s."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    chosen = tuple(v.strip() for v in variants.split(",") if v.strip()) if variants else None
    if memory_pressure:
        chosen = with_memory_variants(chosen or VARIANTS)
    s = settings_from(device, quick, online_model=online_model or model, offline_model=offline_model or model,
                      engine=engine, arch=arch, seconds=seconds, requests=requests, repeats=repeats,
                      busy=busy, rate=rate, arrival=arrival, cv=cv, variants=chosen, seed=seed,
                      output_mean=output_mean, prompt_mean=prompt_mean, offline_warmup=offline_warmup,
                      graphs=graphs, keep_logs=keep_logs or None, mem_device_bytes=mem_device_bytes,
                      mem_online_bytes=mem_online_bytes, mem_leave_bytes=mem_leave_bytes,
                      mem_reserve_bytes=mem_reserve_bytes)
    try:
        check_dir(out)
        check_settings(s, environment(s.device).get("gpu_total_bytes"))
        earlier = load_resume(resume, s) if resume else None
    except ValueError as e:  # one line, before any child process starts
        typer.echo(f"colocation: {e}", err=True)
        raise typer.Exit(2) from None
    console = Console()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("colocation", total=1.0)

        def progress(name: str, frac: float) -> None:
            bar.update(task, completed=frac, description=f"colocation: {name}")

        try:
            result = run_benchmark(s, out, progress, console, earlier)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from e
    typer.echo(table_text(result), nl=False)
    typer.echo("wrote " + ", ".join(result["files"]))


if __name__ == "__main__":
    typer.run(colocation)
