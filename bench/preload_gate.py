"""The launch-level gate (libvalvegate.so) on unmodified offline programs, next to an online burst workload.

    python3 bench/preload_gate.py [--quick] [--out DIR] [--programs eager,graphs,hf] [--device cuda|cpu]

Offline programs (this file's ``--offline KIND`` role; they contain no Valve code, only torch / transformers):

- ``eager``: PyTorch eager, bf16 matmuls (cuBLAS/cuBLASLt) and scaled-dot-product attention. ``--chunks`` sweeps
  the offline kernel length: each GEMM runs as row chunks of that many tokens (attention as whole sequences,
  enough of them to cover the chunk), so a closed gate finds a kernel boundary sooner, at some cost in throughput;
- ``graphs``: the same step (unchunked) captured once into a CUDA graph and replayed (the gate acts per graph
  launch);
- ``hf``: a ``transformers`` Llama built from a config (random weights) generating tokens.

Each program runs in one process without the library and one per ``--paces`` value with
``LD_PRELOAD=libvalvegate.so`` (built here with gcc) and ``VALVE_GATE_EVERY_US`` set to it (0: a wait before
every launch). All processes start at once and stay up; every measurement is one command to them. Online: bursts
of a small model's forward (a CUDA graph) with Poisson arrivals, in its own process; in the gated variant it
closes the control block's gate when a burst arrives and opens it when the burst is done (the arbiter's client
fast path), and it keeps the arbiter heartbeat fresh (the library's lease would open the gate otherwise).

Variants per program (and, for ``eager``, per chunk): ``nolib`` (online next to the program without the library),
``open`` (with the library, the gate never closed: its cost; unchunked only), ``gated`` (with the library, the
gate closed for each burst); and online alone. Each is measured ``--repeats`` times, interleaved (every repeat
runs every variant, in a shuffled order, with that repeat's burst arrivals), ``--bursts`` online bursts per
variant in all. Offline throughput alone is measured per repeat for each process and chunk (the library's
overhead with the gate open: ``lib`` alone against ``nolib`` alone).

Reported per variant: online burst latency p50/p99 over all repeats' bursts, its ratio to online alone (target
gated p99 <= 1.10x), the per-repeat p99 ratios' median and spread (min-max), offline throughput next to online
and alone (median over repeats, spread), overhead with the gate open (target <= 2%), the library's counters
(launches seen, waits inserted) and, for ``eager``, the longest offline kernel at each chunk. JSON, a Markdown
table and a plot (online p99 against offline kernel length) under ``--out``.

``--device cpu`` is a dry run of every step on CPU torch with tiny models (the library is preloaded and checked
to be mapped, but with no CUDA it gates nothing; the numbers mean nothing). ``cuda`` needs a CUDA GPU, torch,
gcc, /dev/shm (tmpfs) and transformers for ``hf``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from importlib.util import find_spec
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import procs  # noqa: E402
from bench.harness.output import fmt  # noqa: E402
from valve.stats import percentile  # noqa: E402

PROGRAMS = ("eager", "graphs", "hf")
FULL = 0  # chunk "full": the GEMMs unsplit
TARGET_P99_RATIO = 1.10
TARGET_OVERHEAD = 0.02
STANDARD_BURSTS, STANDARD_REPEATS = 300, 3
WARMUP_BURSTS = 3
STARTUP_S = 60.0  # worst case seen for the processes' parallel start (hf builds its model on the GPU)


# ---- offline programs: no Valve code ---------------------------------------------------------------------
def _sync(dev: str):
    import torch

    return torch.cuda.synchronize if dev == "cuda" else (lambda: None)


def eager_program(dev: str, chunks: list[int]):
    """(step(chunk), longest_kernel_ms(chunk), steps per call) for the eager transformer-like step."""
    import torch

    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    b, s, h, heads, layers = (8, 1024, 2048, 16, 4) if dev == "cuda" else (2, 16, 64, 4, 2)
    n, hd = b * s, h // heads
    g = torch.Generator(device=dev).manual_seed(0)

    def w(i, o):
        return torch.randn(i, o, device=dev, dtype=dt, generator=g) / i**0.5

    ws = [(w(h, 3 * h), w(h, h), w(h, 4 * h), w(4 * h, h)) for _ in range(layers)]
    x = torch.randn(b, s, h, device=dev, dtype=dt, generator=g)

    def mm(a, wt, chunk):
        if not chunk or chunk >= a.shape[0]:
            return a @ wt
        out = torch.empty(a.shape[0], wt.shape[1], device=dev, dtype=dt)
        for i in range(0, a.shape[0], chunk):
            torch.matmul(a[i:i + chunk], wt, out=out[i:i + chunk])
        return out

    def attention(q, k, v, chunk):
        per = b if not chunk else max(1, math.ceil(chunk / s))  # whole sequences
        if per >= b:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(q[i:i + per], k[i:i + per],
                                                                           v[i:i + per], is_causal=True)
                          for i in range(0, b, per)])

    def step(chunk: int = FULL):
        y = x
        for wqkv, wo, w1, w2 in ws:
            q, k, v = mm(y.view(n, h), wqkv, chunk).view(b, s, 3, heads, hd).permute(2, 0, 3, 1, 4)
            a = attention(q, k, v, chunk)
            y = y + mm(a.transpose(1, 2).reshape(n, h), wo, chunk).view(b, s, h)
            y = y + mm(torch.nn.functional.silu(mm(y.view(n, h), w1, chunk)), w2, chunk).view(b, s, h)
        return y

    def longest_kernel_ms(chunk: int) -> float:
        """The longest single kernel of a step at this chunk: the widest GEMM's chunk or the attention call."""
        rows = n if not chunk else min(chunk, n)
        per = b if not chunk else min(b, max(1, math.ceil(chunk / s)))
        a, q = x.view(n, h)[:rows], torch.randn(per, heads, s, hd, device=dev, dtype=dt, generator=g)
        ops = (lambda: a @ ws[0][2], lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
        return max(_time_ms(op, dev) for op in ops)

    for c in chunks:  # cuBLAS picks its kernels per shape: not inside a measurement
        step(c)
    _sync(dev)()
    return step, longest_kernel_ms, 1


def _time_ms(op, dev: str, reps: int = 20) -> float:
    import torch

    op()
    if dev != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            op()
        return (time.perf_counter() - t0) * 1e3 / reps
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        op()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) / reps


def offline_main(kind: str, dev: str, chunks: list[int]) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    sync = _sync(dev)
    kernel_ms = None
    if kind in ("eager", "graphs"):
        step, kernel_ms, per = eager_program(dev, chunks if kind == "eager" else [FULL])
        unit = "steps"
        if kind == "graphs" and dev == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()

            def work(chunk):  # noqa: ARG001 - one captured shape
                graph.replay()
        elif kind == "graphs":  # CPU dry run: no graphs on CPU, the step runs eagerly

            def work(chunk):  # noqa: ARG001
                step()
        else:
            work = step
    elif kind == "hf":
        import transformers

        if dev == "cuda":
            cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                           num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                                           max_position_embeddings=2048)
            batch, prompt, new, dt = 16, 128, 16, torch.bfloat16
        else:
            cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
            batch, prompt, new, dt = 2, 8, 4, torch.float32
        torch.manual_seed(0)
        with torch.device(dev):  # initialised in place: a 1B model's CPU init takes long
            model = transformers.LlamaForCausalLM(cfg)
        model = model.to(dt).eval()
        ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=dev)

        def work(chunk):  # noqa: ARG001
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=0)

        unit, per = "tokens", batch * new
    else:
        raise SystemExit(f"unknown offline program {kind!r}")
    for _ in range(2):
        work(FULL)
    sync()
    q = procs.commands()
    procs.emit({"event": "ready", "unit": unit, "preloaded": preloaded()})
    while True:
        cmd = q.get()
        if cmd["cmd"] == "exit":
            return
        if cmd["cmd"] == "kernel":
            procs.emit({"event": "kernel", "ms": kernel_ms(cmd["chunk"]) if kernel_ms else None})
            continue
        # run: for "seconds", or until a "stop" command (next to online bursts)
        chunk, seconds, stopped = cmd.get("chunk", FULL), cmd.get("seconds"), False
        procs.emit({"event": "started"})
        n, t0 = 0, time.perf_counter()
        while not stopped:
            work(chunk)
            sync()
            n += per
            if seconds is not None:
                stopped = time.perf_counter() - t0 >= seconds
            elif not q.empty():
                stopped = q.get()["cmd"] in ("stop", "exit")
        procs.emit({"event": "done", "rate": n / (time.perf_counter() - t0), "unit": unit})


def preloaded() -> bool:
    """libvalvegate.so is mapped into this process."""
    try:
        return "libvalvegate.so" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


# ---- online: bursts, closing the gate around each -------------------------------------------------------
def online_main(ctl: str, dev: str) -> None:
    import torch

    from bench.preemption import online_step
    from valve.runtime.control import GATE_CLOSED, GATE_OPEN, ControlBlock  # stdlib only

    torch.set_grad_enabled(False)
    cb = ControlBlock.open(ctl)
    f = cb.fields
    f.lease_ns = 500_000_000
    stop = threading.Event()

    def heartbeat():
        while not stop.is_set():
            f.heartbeat_ns = time.monotonic_ns()
            stop.wait(0.01)

    threading.Thread(target=heartbeat, daemon=True).start()
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    h, rows = (1024, 32) if dev == "cuda" else (64, 4)
    layers = [torch.nn.Sequential(torch.nn.Linear(h, 4 * h), torch.nn.GELU(), torch.nn.Linear(4 * h, h))
              for _ in range(8)]
    model = torch.nn.Sequential(*layers).to(dev, dt).eval()
    x = torch.randn(rows, h, device=dev, dtype=dt)
    sync = _sync(dev)
    forward = online_step(model, x, dev, use_graph=True)  # a CUDA graph, like an engine's decode step
    sync()
    q = procs.commands()
    procs.emit({"event": "ready"})
    while True:
        cmd = q.get()
        if cmd["cmd"] == "exit":
            break
        rng = random.Random(cmd["seed"])
        lat: list[float] = []
        time.sleep(cmd.get("delay_s", 0.0))  # let the offline side get going
        t0, at = time.perf_counter(), 0.0
        while len(lat) < cmd["n"] + WARMUP_BURSTS:
            at += rng.expovariate(1.0 / cmd["mean_gap_s"])
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            p0 = time.perf_counter_ns()
            if cmd["gate"]:
                f.gate = GATE_CLOSED
            for _ in range(cmd["burst"]):
                forward()
            sync()
            f.gate = GATE_OPEN
            lat.append((time.perf_counter_ns() - p0) / 1e6)
        procs.emit({"event": "bursts", "lat_ms": lat[WARMUP_BURSTS:]})
    stop.set()
    f.gate = GATE_OPEN


# ---- the plan: which measurements, how long ---------------------------------------------------------------
def parse_chunks(text: str) -> list[int]:
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "full":
            out.append(FULL)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise ValueError(f"--chunks: {part!r} is neither 'full' nor a whole number of tokens > 0")
    if not out:
        raise ValueError("--chunks: give at least one size")
    return list(dict.fromkeys(out))


def parse_paces(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"--paces: {text!r} is not a list of whole numbers of microseconds (0: every launch)")
    return list(dict.fromkeys(int(p) for p in parts))


def chunk_label(chunk: int) -> str:
    return "full" if chunk == FULL else str(chunk)


def plan(programs: list[str], chunks: list[int], paces: list[int]) -> list[dict]:
    """One repeat's measurements (in a fixed order; each repeat shuffles it)."""
    items: list[dict] = [{"what": "alone"}]
    for prog in programs:
        for chunk in (chunks if prog == "eager" else [FULL]):
            items.append({"what": "solo", "program": prog, "chunk": chunk, "pace": None})
            items.append({"what": "contended", "program": prog, "chunk": chunk, "mode": "nolib", "pace": None})
            for pace in paces:
                items.append({"what": "solo", "program": prog, "chunk": chunk, "pace": pace})
                items.append({"what": "contended", "program": prog, "chunk": chunk, "mode": "gated", "pace": pace})
                if chunk == FULL:
                    items.append({"what": "contended", "program": prog, "chunk": chunk, "mode": "open",
                                  "pace": pace})
    return items


def estimate_s(items: list[dict], repeats: int, bursts_per_repeat: int, gap_ms: float, solo_s: float,
               startup_s: float = STARTUP_S) -> float:
    """Expected wall time: start-up, then per repeat each contended variant's bursts (with warm-up and the
    offline side's start and stop, ~0.4 s) and each solo run."""
    contended = sum(it["what"] in ("alone", "contended") for it in items)
    solos = sum(it["what"] == "solo" for it in items)
    per_burst_s = gap_ms / 1e3 + 0.002
    per_repeat = contended * ((bursts_per_repeat + WARMUP_BURSTS) * per_burst_s + 0.4) + solos * (solo_s + 0.1)
    return startup_s + repeats * per_repeat


def another_repeat(done: int, elapsed_s: float, startup_s: float, budget_s: float | None) -> bool:
    """Start repeat ``done + 1``? Always the first; later ones only if one more (as long as the mean so far)
    ends within ``budget_s`` of the start."""
    if not budget_s or not done:
        return True
    return elapsed_s + (elapsed_s - startup_s) / done <= budget_s


# ---- statistics ------------------------------------------------------------------------------------------
def spread(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": percentile(xs, 50), "min": min(xs), "max": max(xs), "n": len(xs)}


def latency(lat: list[float]) -> dict:
    return {"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "n": len(lat)}


def summarize(raw: dict) -> dict:
    """Rows from the raw per-repeat measurements (``raw``: alone / contended / solo lists keyed by variant)."""
    alone_reps = raw["alone"]
    alone = latency([x for rep in alone_reps for x in rep])
    rows = []
    modes = {"nolib": 0, "open": 1, "gated": 2}
    for key, reps in sorted(raw["contended"].items(), key=lambda kv: (
            PROGRAMS.index(kv[0][0]), kv[0][1] != FULL, -kv[0][1], modes[kv[0][2]], kv[0][3] or 0)):
        prog, chunk, mode, pace = key
        lats = [r["lat_ms"] for r in reps]
        pooled = latency([x for rep in lats for x in rep])
        per_rep_ratio = [percentile(lt, 99) / percentile(alone_reps[i], 99) for i, lt in enumerate(lats)
                         if i < len(alone_reps) and lt and alone_reps[i]]
        solo = raw["solo"].get((prog, chunk, pace), [])
        solo_nolib = raw["solo"].get((prog, chunk, None), [])
        row = {"program": prog, "chunk": chunk_label(chunk), "mode": mode, "pace_us": pace,
               "online": pooled, "p99_ratio": pooled["p99_ms"] / alone["p99_ms"] if alone["n"] else None,
               "p50_ratio": pooled["p50_ms"] / alone["p50_ms"] if alone["n"] else None,
               "p99_ratio_repeats": spread(per_rep_ratio),
               "p99_ms_repeats": spread([percentile(lt, 99) for lt in lats if lt]),
               "offline_contended": spread([r["rate"] for r in reps]),
               "offline_alone": spread(solo),
               "unit": reps[0]["unit"],
               "counters": {"launches": sum(r["launches"] for r in reps), "waits": sum(r["waits"] for r in reps)},
               "kernel_ms": raw["kernel_ms"].get((prog, chunk))}
        if mode != "nolib":
            row["overhead_gate_open"] = spread([1 - lib / no for lib, no in zip(solo, solo_nolib, strict=False)])
        if mode == "gated":
            row["preempt_excess_ms"] = {"p50": pooled["p50_ms"] - alone["p50_ms"],
                                        "p99": pooled["p99_ms"] - alone["p99_ms"]}
        rows.append(row)
    n_min = min([alone["n"]] + [r["online"]["n"] for r in rows])
    reps_done = len(alone_reps)
    return {"online_alone": {**alone, "p99_ms_repeats": spread([percentile(a, 99) for a in alone_reps if a])},
            "rows": rows,
            "standard": {"bursts_per_variant_min": n_min, "repeats": reps_done,
                         "met": n_min >= STANDARD_BURSTS and reps_done >= STANDARD_REPEATS,
                         "asks": f">= {STANDARD_BURSTS} bursts per variant, >= {STANDARD_REPEATS} repeats"}}


# ---- orchestration ---------------------------------------------------------------------------------------
def preflight(programs: list[str], device: str = "cuda") -> None:
    """Fail fast, naming what is missing."""
    problems = []
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        problems.append("gcc (builds libvalvegate.so)")
    if not Path("/dev/shm").is_dir():
        problems.append("/dev/shm (the control block must be on tmpfs)")
    if find_spec("torch") is None:  # found, not imported: the workers import it (seconds each)
        problems.append("torch")
    elif device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append("a CUDA GPU visible to torch (or --device cpu for a dry run)")
    if "hf" in programs and find_spec("transformers") is None:
        problems.append("transformers (for the hf program; or leave it out with --programs eager,graphs)")
    if problems:
        raise SystemExit("bench/preload_gate.py needs: " + "; ".join(problems))


def _worker(name: str, args: list[str], env: dict, out: Path) -> procs.Worker:
    return procs.Worker(name, [sys.executable, str(Path(__file__).resolve()), *args], env=env,
                        log=out / f"{name}.log")


def orchestrate(args, items: list[dict], on_repeat=None) -> dict:
    from valve.preload.build import build
    from valve.runtime.control import ControlBlock

    # the library and the children's logs go beside the results, not among them: a device call returns only a
    # few files from its output folder, and the logs must not crowd out the JSON
    work = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="valve-preload-bench-work-"))
    print(f"[bench] library and logs in {work}", flush=True)
    lib = build(work / "lib")
    shm = Path(tempfile.mkdtemp(prefix="valve-preload-bench-", dir="/dev/shm"))
    cb = ControlBlock.create(shm / "control")
    base = procs.child_env({"OMP_NUM_THREADS": "1"} if args.device == "cpu" else None)
    base = {k: v for k, v in base.items() if k != "LD_PRELOAD" and not k.startswith("VALVE_")}
    dev = ["--device", args.device]
    chunks_arg = ["--chunks", ",".join(chunk_label(c) for c in args.chunks)]
    workers: dict = {}
    raw: dict = {"alone": [], "contended": {}, "solo": {}, "kernel_ms": {}}
    t_start = time.monotonic()
    try:
        workers["online"] = _worker("online", ["--online", str(cb.path), *dev], base, work)
        for prog in args.programs:
            workers[(prog, None)] = _worker(f"offline-{prog}-nolib", ["--offline", prog, *dev, *chunks_arg], base,
                                            work)
            for pace in args.paces:
                env = {**base, "LD_PRELOAD": str(lib), "VALVE_GATE_CONTROL": str(cb.path),
                       "VALVE_GATE_EVERY_US": str(pace)}
                workers[(prog, pace)] = _worker(f"offline-{prog}-lib-pace{pace}",
                                                ["--offline", prog, *dev, *chunks_arg], env, work)
        ready = {k: w.expect("ready", timeout=args.start_timeout) for k, w in workers.items()}
        not_loaded = [k for k, r in ready.items() if k != "online" and r["preloaded"] != (k[1] is not None)]
        if not_loaded:
            raise procs.ChildFailed(f"libvalvegate.so mapped where it should not be, or missing where it should: "
                                    f"{not_loaded}")
        units = {k: r.get("unit") for k, r in ready.items()}
        for chunk in args.chunks if "eager" in args.programs else []:
            w = workers[("eager", None)]
            w.send(cmd="kernel", chunk=chunk)
            raw["kernel_ms"][("eager", chunk)] = w.expect("kernel", timeout=120)["ms"]
        print(f"[bench] {len(workers)} processes ready after {time.monotonic() - t_start:.0f} s", flush=True)

        per_rep = math.ceil(args.bursts / args.repeats)
        online = workers["online"]

        def bursts(seed: int, gate: bool) -> list[float]:
            online.send(cmd="run", n=per_rep, seed=seed, mean_gap_s=args.gap_ms / 1e3, burst=args.burst, gate=gate,
                        delay_s=0.1)
            return online.expect("bursts", timeout=per_rep * args.gap_ms / 1e3 * 5 + 120)["lat_ms"]

        def offline_run(w: procs.Worker, **cmd) -> None:
            w.send(cmd="run", **cmd)
            w.expect("started", timeout=120)

        started = time.monotonic()
        for rep in range(args.repeats):
            if not another_repeat(rep, time.monotonic() - t_start, started - t_start, args.budget_s):
                print(f"[bench] stopping after {rep} repeat(s): another would pass --budget-s {args.budget_s:.0f}",
                      flush=True)
                break
            order = list(items)
            random.Random(1000 + rep).shuffle(order)  # interleaved: every repeat runs every variant
            seed = 7 + rep  # one arrival pattern per repeat, the same for each variant (paired comparison)
            for it in order:
                if it["what"] == "alone":
                    raw["alone"].append(bursts(seed, gate=False))
                    continue
                prog, chunk, pace = it["program"], it["chunk"], it["pace"]
                w = workers[(prog, pace)]
                if it["what"] == "solo":
                    offline_run(w, seconds=args.solo_seconds, chunk=chunk)
                    raw["solo"].setdefault((prog, chunk, pace), []).append(w.expect("done", timeout=600)["rate"])
                    continue
                f = cb.fields
                l0, w0 = f.preload_launches, f.preload_waits
                offline_run(w, chunk=chunk)
                lat = bursts(seed, gate=it["mode"] == "gated")
                w.send(cmd="stop")
                done = w.expect("done", timeout=600)
                raw["contended"].setdefault((prog, chunk, it["mode"], pace), []).append(
                    {"lat_ms": lat, "rate": done["rate"], "unit": units[(prog, pace)],
                     "launches": int(f.preload_launches - l0), "waits": int(f.preload_waits - w0)})
            print(f"[bench] repeat {rep + 1}/{args.repeats} done at {time.monotonic() - t_start:.0f} s", flush=True)
            if on_repeat:
                on_repeat(raw)
    finally:
        for w in workers.values():  # all at once: they exit in parallel
            try:
                w.send(cmd="exit")
            except procs.ChildFailed:
                pass
        for w in workers.values():
            w.stop()
        counters = {k: int(getattr(cb.fields, k)) for k in
                    ("preload_launches", "preload_waits", "preload_captured", "forced_opens")}
        shutil.rmtree(shm, ignore_errors=True)
    raw["counters_total"] = counters
    raw["wall_s"] = time.monotonic() - t_start
    return raw


def result(args, raw: dict, estimate: float) -> dict:
    from bench.harness import env

    doc = summarize(raw)
    doc.update({"settings": {"device": args.device, "programs": args.programs, "paces_us": args.paces,
                             "chunks": [chunk_label(c) for c in args.chunks], "bursts_per_variant": args.bursts,
                             "repeats": args.repeats, "gap_ms": args.gap_ms, "burst": args.burst,
                             "solo_seconds": args.solo_seconds, "quick": args.quick},
                "env": env.record(args.device), "estimate_s": estimate, "wall_s": raw.get("wall_s"),
                "counters_total": raw.get("counters_total"),
                "targets": {"p99_ratio": TARGET_P99_RATIO, "overhead": TARGET_OVERHEAD}})
    return doc


def table(doc: dict) -> str:
    a = doc["online_alone"]
    r_ = a["p99_ms_repeats"]
    st = doc["standard"]
    rows = [f"online alone: p50 {fmt(a['p50_ms'], '.3f')} ms, p99 {fmt(a['p99_ms'], '.3f')} ms ({a['n']} bursts; "
            f"p99 per repeat median {fmt(r_['median'], '.3f')} [{fmt(r_['min'], '.3f')}-{fmt(r_['max'], '.3f')}])",
            f"measurement standard ({st['asks']}): {'met' if st['met'] else 'NOT met'} "
            f"(min {st['bursts_per_variant_min']} bursts per variant, {st['repeats']} repeats)", "",
            "| program | chunk | longest offline kernel ms | library | online p50 / p99 ms | p99 x alone "
            "| p99 x alone per repeat: median [min-max] | offline next to online | offline alone "
            "| overhead, gate open: median [min-max] | waits / launches | bursts |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lib = "none" if r["mode"] == "nolib" else f"{r['mode']}, every {r['pace_us']} us"
        pr, oc, oa = r["p99_ratio_repeats"], r["offline_contended"], r["offline_alone"]
        ov = r.get("overhead_gate_open")
        ovs = "" if ov is None else (f"{100 * ov['median']:+.1f}% [{100 * ov['min']:+.1f}..{100 * ov['max']:+.1f}%]"
                                     if ov["n"] else "-")
        rows.append(
            f"| {r['program']} | {r['chunk']} | {fmt(r['kernel_ms'], '.3f')} | {lib} "
            f"| {fmt(r['online']['p50_ms'])} / {fmt(r['online']['p99_ms'])} | x{fmt(r['p99_ratio'])} "
            f"| x{fmt(pr['median'])} [{fmt(pr['min'])}-{fmt(pr['max'])}] "
            f"| {fmt(oc['median'], '.1f')} {r['unit']}/s | {fmt(oa['median'], '.1f')} [{fmt(oa['min'], '.1f')}-"
            f"{fmt(oa['max'], '.1f')}] | {ovs} | {r['counters']['waits']:,} / {r['counters']['launches']:,} "
            f"| {r['online']['n']} |")
    rows.append(f"\ntargets: gated p99 <= {TARGET_P99_RATIO}x alone; overhead with the gate open <= "
                f"{100 * TARGET_OVERHEAD:.0f}%. Offline rates: median over repeats (alone: [min-max]).")
    return "\n".join(rows)


def plot(doc: dict, path: Path) -> None:
    from bench.harness.output import pyplot

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    sweep = [r for r in doc["rows"] if r["program"] == "eager" and r["kernel_ms"] is not None]
    series: dict = {}
    for r in sweep:
        series.setdefault((r["mode"], r["pace_us"]), []).append(r)
    for (mode, pace), rs in sorted(series.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        rs = sorted(rs, key=lambda r: r["kernel_ms"])
        xs = [r["kernel_ms"] for r in rs]
        med = [r["p99_ratio_repeats"]["median"] for r in rs]
        lo = [m - r["p99_ratio_repeats"]["min"] for m, r in zip(med, rs, strict=True)]
        hi = [r["p99_ratio_repeats"]["max"] - m for m, r in zip(med, rs, strict=True)]
        label = "no library" if mode == "nolib" else f"{mode}, wait every {pace} us"
        ax1.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=label)
        if mode != "open":
            ax2.plot(xs, [r["offline_alone"]["median"] for r in rs], marker="o", label=label)
    ax1.axhline(TARGET_P99_RATIO, color="grey", ls="--", lw=1, label=f"target x{TARGET_P99_RATIO}")
    ax1.set(xscale="log", xlabel="longest offline kernel (ms, eager program, by chunk)",
            ylabel="online p99 / alone (median, min-max over repeats)", title="online tail vs offline kernel length")
    ax2.set(xscale="log", xlabel="longest offline kernel (ms)", ylabel="offline steps/s alone (median)",
            title="offline throughput vs kernel length")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, doc: dict) -> list[Path]:
    from bench.harness.output import write_json

    files = [write_json(out / "preload_gate.json", doc)]
    text = table(doc)
    (out / "preload_gate.md").write_text(text + "\n")
    files.append(out / "preload_gate.md")
    if any(r["kernel_ms"] is not None for r in doc["rows"]):
        try:
            plot(doc, out / "preload_gate.png")
            files.append(out / "preload_gate.png")
        except ImportError as e:  # the numbers are on disk; --from-json draws the plot later
            print(f"[bench] no plot ({e}): redraw it with --from-json {out / 'preload_gate.json'}", flush=True)
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--offline", choices=PROGRAMS, help=argparse.SUPPRESS)
    ap.add_argument("--online", metavar="CONTROL", help=argparse.SUPPRESS)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a dry run of every step on CPU torch, tiny models (numbers mean nothing)")
    ap.add_argument("--quick", action="store_true",
                    help="60 bursts per variant, 1 repeat, chunks full,512 (below the measurement standard)")
    ap.add_argument("--out", default="bench/results/preload_gate")
    ap.add_argument("--programs", default=",".join(PROGRAMS))
    ap.add_argument("--bursts", type=int, default=None,
                    help=f"online bursts per variant over all repeats (default {STANDARD_BURSTS}, --quick 60)")
    ap.add_argument("--repeats", type=int, default=None, help=f"interleaved repeats (default {STANDARD_REPEATS}, "
                                                              "--quick 1)")
    ap.add_argument("--chunks", default=None, help="eager program: GEMM row chunks in tokens, 'full' = unsplit "
                                                   "(default full,2048,512,128; --quick full,512)")
    ap.add_argument("--logs", default=None, help="folder for the built library and the children's logs (default: a "
                    "new temporary folder, printed; not --out)")
    ap.add_argument("--paces", default="0,100", help="VALVE_GATE_EVERY_US of the library's processes, one process "
                                                      "per value per program (0: a wait before every launch)")
    ap.add_argument("--solo-seconds", type=float, default=None, help="offline alone, per measurement (default 1.5, "
                                                                     "--quick 1)")
    ap.add_argument("--gap-ms", type=float, default=20.0, help="mean gap between online bursts")
    ap.add_argument("--burst", type=int, default=4, help="online forwards per burst")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no repeat that would end after this many seconds (results so far are written)")
    ap.add_argument("--start-timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    ap.add_argument("--from-json", metavar="FILE", help="no run: the table and plot again from a result file, "
                                                       "into --out")
    args = ap.parse_args(argv)
    if args.from_json:
        from bench.harness.output import checked_out

        out = checked_out(ap, args.out)
        try:
            doc = json.loads(Path(args.from_json).read_text())
        except (OSError, ValueError) as e:
            ap.error(f"--from-json: cannot read {args.from_json}: {e}")
        write(out, doc)  # the JSON too (the same document)
        print(table(doc))
        return 0
    if args.offline or args.online:
        try:
            chunks = parse_chunks(args.chunks or "full")
        except ValueError as e:
            ap.error(str(e))
        if args.offline:
            offline_main(args.offline, args.device, chunks)
        else:
            online_main(args.online, args.device)
        return 0
    args.programs = [p for p in args.programs.split(",") if p]
    unknown = set(args.programs) - set(PROGRAMS)
    if unknown or not args.programs:
        ap.error(f"--programs: unknown {sorted(unknown)}; choose from {', '.join(PROGRAMS)}")
    try:
        args.chunks = parse_chunks(args.chunks or ("full,512" if args.quick else "full,2048,512,128"))
        args.paces = parse_paces(args.paces)
    except ValueError as e:
        ap.error(str(e))
    args.bursts = args.bursts or (60 if args.quick else STANDARD_BURSTS)
    args.repeats = args.repeats or (1 if args.quick else STANDARD_REPEATS)
    args.solo_seconds = args.solo_seconds or (1.0 if args.quick else 1.5)
    if args.bursts < 1 or args.repeats < 1:
        ap.error("--bursts and --repeats must be >= 1")
    from bench.harness.output import checked_out

    out = checked_out(ap, args.out)
    preflight(args.programs, args.device)
    items = plan(args.programs, args.chunks, args.paces)
    est = estimate_s(items, args.repeats, math.ceil(args.bursts / args.repeats), args.gap_ms, args.solo_seconds)
    print(f"[bench] {len(items)} measurements per repeat x {args.repeats} repeats, "
          f"{math.ceil(args.bursts / args.repeats)} bursts per variant per repeat: about {est:.0f} s", flush=True)

    def partial(raw: dict) -> None:  # each finished repeat is on disk, figure included (survives a timeout)
        write(out, result(args, raw, est))

    raw = orchestrate(args, items, on_repeat=partial)
    doc = result(args, raw, est)
    write(out, doc)
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
