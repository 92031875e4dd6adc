"""The valve::gate_ op on the GPU: a transformers Llama (random weights) under torch.compile, gated.

    python3 bench/compile_gate.py [--out DIR]

Two compiled forms of the same attached model: ``fullgraph`` (``torch.compile(fullgraph=True)``: the op's Python
runs per gated module per forward, enqueueing the memop wait) and ``cudagraphs`` (``mode="reduce-overhead"``: the
op runs once at capture, recording the wait as a graph memop node; replays wait on the live gate word without
Python). For each: outputs equal eager; with the gate closed a forward's work is held on the GPU (its end event
not reached) until the gate opens; gate calls per forward (host); forward time with and without the gates.
Needs a CUDA GPU, torch, transformers and cuda-python (``valve[cuda]``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def preflight() -> None:
    missing = []
    for mod in ("torch", "transformers", "cuda.bindings.driver"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if not missing:
        import torch

        if not torch.cuda.is_available():
            missing.append("a CUDA GPU")
    if missing:
        raise SystemExit(f"bench/compile_gate.py needs: {', '.join(missing)}")


def timed(fn, x, n=20) -> float:
    import torch

    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def held_while_closed(cb, fn, x, in_thread: bool) -> dict:
    """Close the gate, run a forward, see that its end is not reached; open the gate; it completes. In a thread
    where the gate op runs on the host (its queue-ahead bound may make the host wait too); on this thread for
    CUDA-graph replay (cudagraph trees keep per-thread state, and replay only enqueues: the wait is on the GPU)."""
    import torch

    from valve.runtime.control import GATE_CLOSED, GATE_OPEN

    torch.cuda.synchronize()
    ev, done = torch.cuda.Event(), threading.Event()

    def run():
        fn(x)
        ev.record()
        done.set()

    cb.fields.gate = GATE_CLOSED
    t = threading.Thread(target=run, daemon=True)
    try:
        t.start() if in_thread else run()
        time.sleep(0.2)  # the GPU had time to run the forward if nothing held it
        held = not (done.is_set() and ev.query())
    finally:
        cb.fields.gate = GATE_OPEN
    if in_thread:
        t.join(60)
    ev.synchronize()
    return {"held_while_closed": held, "completed_after_open": done.is_set() and ev.query()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/compile_gate")
    args = ap.parse_args(argv)
    from bench.harness.output import checked_out

    checked_out(ap, args.out)
    preflight()
    import torch
    import transformers

    from valve.runtime.control import ControlBlock
    from valve.runtime.gate.cuda import CudaGateBackend
    from valve.runtime.gate.offline import Gate, attach

    cb = ControlBlock.create(Path(tempfile.mkdtemp(dir="/dev/shm")) / "GPU-bench" / "control")
    stop = threading.Event()

    def heartbeat():  # a live "arbiter": the lease must not open the gate during the hold checks
        while not stop.is_set():
            cb.fields.heartbeat_ns = time.monotonic_ns()
            stop.wait(0.01)

    threading.Thread(target=heartbeat, daemon=True).start()
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                   num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (8, 256), device="cuda")
    res: dict = {"torch": torch.__version__, "transformers": transformers.__version__,
                 "gpu": torch.cuda.get_device_name()}

    def fwd(m):
        return lambda i: m(input_ids=i, use_cache=False).logits

    with torch.no_grad():
        eager = fwd(model)(ids).clone()
        for name, kw in (("fullgraph", {"fullgraph": True}), ("cudagraphs", {"fullgraph": True,
                                                                              "mode": "reduce-overhead"})):
            r: dict = {}
            try:
                torch._dynamo.reset()
                r["ms_ungated"] = timed(fwd(torch.compile(model, **kw)), ids)
                torch._dynamo.reset()
                g = Gate(cb, backend=CudaGateBackend(cb), lease_ms=60_000)
                h = attach(model, gate=g)
                f = fwd(torch.compile(model, **kw))
                out = f(ids).clone()
                r["matches_eager"] = bool(torch.allclose(out.float(), eager.float(), atol=0.1, rtol=0.05))
                r["ms_gated"] = timed(f, ids)
                n = g.boundaries
                f(ids)
                r["gate_calls_per_forward"] = g.boundaries - n  # 16 (Python per module) or 0 (graph replay)
                hold = held_while_closed(cb, f, ids, in_thread=r["gate_calls_per_forward"] > 0)
                r["held_while_closed"] = hold["held_while_closed"]
                r["completed_after_open"] = hold["completed_after_open"]
                r["gated_modules"] = len(h.names)
                h.remove()
            except Exception as e:  # noqa: BLE001 - report each form, keep going
                r["error"] = f"{type(e).__name__}: {e}"
            res[name] = r
            print(f"[compile_gate] {name}: {r}", flush=True)
    stop.set()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_gate.json").write_text(json.dumps(res, indent=2))
    ok = all(res[k].get("held_while_closed") and res[k].get("completed_after_open") and res[k].get("matches_eager")
             for k in ("fullgraph", "cudagraphs"))
    print(f"[compile_gate] {'OK' if ok else 'NOT OK'}: {json.dumps(res)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
