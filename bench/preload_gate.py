"""The launch-level gate (libvalvegate.so) on unmodified offline programs, next to an online burst workload.

    python3 bench/preload_gate.py [--quick] [--out DIR] [--programs eager,graphs,hf]

Offline programs (this file's ``--offline KIND`` role; they contain no Valve code, only torch / transformers):

- ``eager``: PyTorch eager, bf16 matmuls (cuBLAS/cuBLASLt) and scaled-dot-product attention;
- ``graphs``: the same step captured once into a CUDA graph and replayed (the gate acts per graph launch);
- ``hf``: a ``transformers`` Llama built from a config (random weights) generating tokens.

Each program runs in two processes: one without the library, one with ``LD_PRELOAD=libvalvegate.so`` (built here
with gcc). Online: bursts of a small model's forward (a CUDA graph) with Poisson arrivals, in its own process; it
closes the control block's gate when a burst arrives and opens it when the burst is done (the arbiter's client
fast path), and keeps the arbiter heartbeat fresh (a lease in the library would open the gate otherwise).

Reported per program: online burst latency p50/p99 alone, next to the ungated program, next to the gated one
(ratio to alone; target gated p99 <= 1.10x); the excess of gated over alone p50/p99 (what preemption costs the
online side: the gate stops the offline stream at its next launch, a running kernel or graph finishes first);
offline throughput alone without the library, alone with it and the gate always open (overhead, target <= 2%),
and under contention without / with the gate; the library's counters (launches seen, waits inserted). JSON and a
table under ``--out``. Needs: a CUDA GPU, torch, gcc, /dev/shm (tmpfs), transformers for ``hf``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ("eager", "graphs", "hf")
TARGET_P99_RATIO = 1.10
TARGET_OVERHEAD = 0.02


# ---- offline programs: no Valve code ---------------------------------------------------------------------
def offline_main(kind: str) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    dev, dt = "cuda", torch.bfloat16
    if kind in ("eager", "graphs"):
        b, s, h, heads, layers = 8, 1024, 2048, 16, 4
        ws = [(torch.randn(h, 3 * h, device=dev, dtype=dt) / h**0.5, torch.randn(h, h, device=dev, dtype=dt) / h**0.5,
               torch.randn(h, 4 * h, device=dev, dtype=dt) / h**0.5, torch.randn(4 * h, h, device=dev, dtype=dt) / h**0.5)
              for _ in range(layers)]
        x = torch.randn(b, s, h, device=dev, dtype=dt)

        def step():
            y = x
            for wqkv, wo, w1, w2 in ws:
                q, k, v = (y @ wqkv).view(b, s, 3, heads, h // heads).permute(2, 0, 3, 1, 4)
                a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                y = y + a.transpose(1, 2).reshape(b, s, h) @ wo
                y = y + torch.nn.functional.silu(y @ w1) @ w2
            return y

        unit = "steps"
        if kind == "graphs":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            work, per = g.replay, 1
        else:
            work, per = step, 1
    elif kind == "hf":
        import transformers

        cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                       num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                                       max_position_embeddings=2048)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).to(dev, dt).eval()
        ids = torch.randint(0, cfg.vocab_size, (16, 128), device=dev)
        new = 32

        def work():
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=0)

        unit, per = "tokens", 16 * new
    else:
        raise SystemExit(f"unknown offline program {kind!r}")
    for _ in range(2):
        work()
    torch.cuda.synchronize()
    print(json.dumps({"event": "ready", "unit": unit}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "exit":
            return
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < cmd["seconds"]:
            work()
            torch.cuda.synchronize()
            n += per
        print(json.dumps({"event": "done", "rate": n / (time.perf_counter() - t0), "unit": unit}), flush=True)


# ---- online: bursts, closing the gate around each -------------------------------------------------------
def online_main(ctl: str) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from valve.runtime.control import GATE_CLOSED, GATE_OPEN, ControlBlock  # stdlib only

    cb = ControlBlock.open(ctl)
    f = cb.fields
    f.lease_ns = 500_000_000
    stop = threading.Event()

    def heartbeat():
        while not stop.is_set():
            f.heartbeat_ns = time.monotonic_ns()
            stop.wait(0.01)

    threading.Thread(target=heartbeat, daemon=True).start()
    dev, dt = "cuda", torch.bfloat16
    h = 1024
    layers = [torch.nn.Sequential(torch.nn.Linear(h, 4 * h), torch.nn.GELU(), torch.nn.Linear(4 * h, h))
              for _ in range(8)]
    model = torch.nn.Sequential(*layers).to(dev, dt).eval()
    x = torch.randn(32, h, device=dev, dtype=dt)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            model(x)
    torch.cuda.synchronize()
    print(json.dumps({"event": "ready"}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "exit":
            break
        rng = random.Random(cmd["seed"])
        lat, t0, at = [], time.perf_counter(), 0.0
        while True:
            at += rng.expovariate(1.0 / cmd["mean_gap_s"])
            if at > cmd["seconds"]:
                break
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            p0 = time.perf_counter_ns()
            if cmd["gate"]:
                f.gate = GATE_CLOSED
            for _ in range(cmd["burst"]):
                g.replay()
            torch.cuda.synchronize()
            f.gate = GATE_OPEN
            lat.append((time.perf_counter_ns() - p0) / 1e6)
        w = min(cmd["warmup"], len(lat))
        print(json.dumps({"event": "bursts", "lat_ms": lat[w:]}), flush=True)
    stop.set()
    f.gate = GATE_OPEN


# ---- orchestration ---------------------------------------------------------------------------------------
class Proc:
    def __init__(self, args: list[str], env: dict, log: Path, timeout: float) -> None:
        self.log = log.open("w")
        self.p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=str(ROOT))
        self.name = " ".join(args)
        self.ready = self.read(timeout)

    def read(self, timeout: float) -> dict:
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(self.p.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not out or not out[0]:
            self.p.kill()
            raise RuntimeError(f"{self.name}: no answer within {timeout:.0f} s (exit {self.p.poll()}); "
                               f"see {self.log.name}")
        return json.loads(out[0])

    def send(self, **cmd) -> None:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()

    def close(self) -> None:
        try:
            self.send(cmd="exit")
            self.p.wait(30)
        except Exception:  # noqa: BLE001 - best effort at the end
            self.p.kill()
        self.log.close()


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def preflight(programs: list[str]) -> None:
    """Fail fast, naming what is missing."""
    problems = []
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        problems.append("gcc (builds libvalvegate.so)")
    if not Path("/dev/shm").is_dir():
        problems.append("/dev/shm (the control block must be on tmpfs)")
    try:
        import torch

        if not torch.cuda.is_available():
            problems.append("a CUDA GPU visible to torch")
    except ImportError:
        problems.append("torch")
    if "hf" in programs:
        try:
            import transformers  # noqa: F401
        except ImportError:
            problems.append("transformers (for the hf program; or leave it out with --programs eager,graphs)")
    if problems:
        raise SystemExit("bench/preload_gate.py needs: " + "; ".join(problems))


def orchestrate(args) -> dict:
    sys.path.insert(0, str(ROOT))
    from valve.preload.build import build
    from valve.runtime.control import ControlBlock

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lib = build(out / "lib")
    shm = Path(tempfile.mkdtemp(prefix="valve-preload-bench-", dir="/dev/shm"))
    cb = ControlBlock.create(shm / "control")
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD",) and not k.startswith("VALVE_")}
    gated_env = {**base, "LD_PRELOAD": str(lib), "VALVE_GATE_CONTROL": str(cb.path)}
    sec, warm = args.seconds, 3
    res: dict = {"seconds": sec, "library": str(lib), "programs": {}}
    online = Proc(["--online", str(cb.path)], base, out / "online.log", 300)

    def bursts(label: str, gate: bool) -> list[float]:
        online.send(cmd="run", seconds=sec, seed=len(label), mean_gap_s=args.gap_ms / 1e3, burst=args.burst,
                    gate=gate, warmup=warm)
        got = online.read(sec + 120)["lat_ms"]
        print(f"[bench] {label}: {len(got)} bursts, p50 {pct(got, 50):.3f} ms, p99 {pct(got, 99):.3f} ms", flush=True)
        return got

    try:
        alone = bursts("online alone", gate=False)
        res["online_alone"] = {"p50_ms": pct(alone, 50), "p99_ms": pct(alone, 99), "n": len(alone)}
        for prog in args.programs:
            r: dict = {}
            for label, env in (("nolib", base), ("lib", gated_env)):
                p = Proc(["--offline", prog], env, out / f"offline-{prog}-{label}.log", 600)
                try:
                    p.send(cmd="run", seconds=sec)
                    r[f"solo_{label}"] = p.read(sec + 300)["rate"]  # alone; with the library the gate stays open
                    launches0, waits0 = cb.fields.preload_launches, cb.fields.preload_waits
                    p.send(cmd="run", seconds=sec + 2)
                    lat = bursts(f"{prog} {label}", gate=label == "lib")
                    r[f"contended_{label}"] = p.read(sec + 300)["rate"]
                    r[f"online_{label}"] = {"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "n": len(lat)}
                    if label == "lib":
                        r["library_counters_contended"] = {"launches": cb.fields.preload_launches - launches0,
                                                           "waits": cb.fields.preload_waits - waits0}
                    r["unit"] = p.ready["unit"]
                finally:
                    p.close()
            a = res["online_alone"]
            g = r["online_lib"]
            r["overhead_gate_open"] = 1 - r["solo_lib"] / r["solo_nolib"]
            r["p99_ratio_gated"] = g["p99_ms"] / a["p99_ms"]
            r["p99_ratio_ungated"] = r["online_nolib"]["p99_ms"] / a["p99_ms"]
            r["preempt_excess_ms"] = {"p50": g["p50_ms"] - a["p50_ms"], "p99": g["p99_ms"] - a["p99_ms"]}
            r["intercepted"] = r["library_counters_contended"]["waits"] > 0
            res["programs"][prog] = r
            print(f"[bench] {prog}: {json.dumps(r)}", flush=True)
            (out / "preload_gate.partial.json").write_text(json.dumps(res, indent=2))  # survives a timeout
    finally:
        online.close()
        res["counters_total"] = {k: int(getattr(cb.fields, k)) for k in
                                 ("preload_launches", "preload_waits", "preload_captured", "forced_opens")}
        shutil.rmtree(shm, ignore_errors=True)
    return res


def table(res: dict) -> str:
    a = res["online_alone"]
    rows = [f"online alone: p50 {a['p50_ms']:.3f} ms  p99 {a['p99_ms']:.3f} ms  ({a['n']} bursts)", "",
            "| program | online p99 ungated (x alone) | online p99 gated (x alone) | gated-alone p50/p99 ms "
            "| offline alone | +lib, gate open (overhead) | contended ungated | contended gated | waits/launches |",
            "|---|---|---|---|---|---|---|---|---|"]
    for prog, r in res["programs"].items():
        c = r["library_counters_contended"]
        rows.append(
            f"| {prog} | {r['online_nolib']['p99_ms']:.2f} ({r['p99_ratio_ungated']:.2f}x) "
            f"| {r['online_lib']['p99_ms']:.2f} ({r['p99_ratio_gated']:.2f}x) "
            f"| {r['preempt_excess_ms']['p50']:.2f} / {r['preempt_excess_ms']['p99']:.2f} "
            f"| {r['solo_nolib']:.1f} {r['unit']}/s | {r['solo_lib']:.1f} ({100 * r['overhead_gate_open']:+.1f}%) "
            f"| {r['contended_nolib']:.1f} | {r['contended_lib']:.1f} | {c['waits']}/{c['launches']} |")
    rows.append(f"\ntargets: gated p99 <= {TARGET_P99_RATIO}x alone; overhead with the gate open <= "
                f"{100 * TARGET_OVERHEAD:.0f}%")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--offline", choices=PROGRAMS, help=argparse.SUPPRESS)
    ap.add_argument("--online", metavar="CONTROL", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="shorter runs (about 5 minutes in all)")
    ap.add_argument("--out", default="bench/results/preload_gate")
    ap.add_argument("--programs", default=",".join(PROGRAMS))
    ap.add_argument("--seconds", type=float, default=None, help="per measurement (default 20, --quick 8)")
    ap.add_argument("--gap-ms", type=float, default=40.0, help="mean gap between online bursts")
    ap.add_argument("--burst", type=int, default=4, help="online forwards per burst")
    args = ap.parse_args(argv)
    if args.offline:
        offline_main(args.offline)
        return 0
    if args.online:
        online_main(args.online)
        return 0
    args.programs = [p for p in args.programs.split(",") if p]
    unknown = set(args.programs) - set(PROGRAMS)
    if unknown:
        raise SystemExit(f"unknown program(s) {sorted(unknown)}; choose from {', '.join(PROGRAMS)}")
    args.seconds = args.seconds or (8.0 if args.quick else 20.0)
    sys.path.insert(0, str(ROOT))
    from bench.harness.output import checked_out

    checked_out(ap, args.out)
    preflight(args.programs)
    res = orchestrate(args)
    out = Path(args.out)
    (out / "preload_gate.json").write_text(json.dumps(res, indent=2))
    text = table(res)
    (out / "preload_gate.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
