"""Is the engine GPU-bound? Offline throughput, GPU utilisation and model FLOPs utilisation (MFU) of a
prefill-heavy batch job; online TTFT and TPOT at low load against the GPU time of the same prefill and decode step.

    python3 bench/engine.py [--out bench/results] [--models llama-1b,llama-8b] [--engines ours,transformers]
                            [--seconds 20] [--device cuda|cpu]

One process, one engine at a time, in-process (no HTTP: the colocation benchmark measures the server). Writes
``engine_<gpu>.json``, ``.txt`` (the table) and ``.png`` under --out.

- offline: prompts of 768-1280 tokens, answers of 32-224, 8192 tokens per step, 128 sequences (the colocation
  benchmark's batch job); GPU utilisation is the NVML mean over the window, ``host share`` the part of the wall time
  the host was not waiting for the GPU, MFU the model FLOPs of the window's steps over the measured bf16 GEMM rate
  (and over the datasheet's 989 TFLOP/s);
- prefill: steps of 8 fresh 1024-token prompts, wall time and GPU time (kernel time summed by the profiler);
- online: one request at a time (256-token prompts): TTFT against the GPU time of its prefill step, then decode steps
  at batch 1, 8 and 32: TPOT against the GPU time of one decode step. The server's settings: CUDA graphs for decode
  steps and for a prompt alone in its step.

``--engines transformers`` runs transformers' own Llama classes (``valve.engine.hf``) on the same scheduler and cache.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import typer  # noqa: E402

from bench.harness import env, output  # noqa: E402
from bench.harness.gpu import UtilSampler  # noqa: E402
from valve.engine.choice import build_engine_model, check_engine  # noqa: E402
from valve.engine.config import CONFIGS, ModelConfig, get_config  # noqa: E402

DATASHEET_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16
TARGETS = {"gpu_util": 85.0, "ttft_over_gpu": 1.5, "tpot_over_gpu": 1.3}


# ---- model FLOPs ------------------------------------------------------------------------------------------------
def flops_per_token(cfg: ModelConfig) -> int:
    """Dense FLOPs of one token through the decoder layers (2 per multiply-add; no embedding, no LM head)."""
    hd = cfg.head_dim
    attn = cfg.hidden * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    return 2 * cfg.n_layers * (attn + 3 * cfg.hidden * cfg.mlp_hidden)


def step_flops(cfg: ModelConfig, spans, sampled: int) -> int:
    """Model FLOPs of one step: ``spans`` (tokens cached before, new tokens) per sequence; ``sampled`` rows
    through the LM head. Attention: QK^T and PV over each new token's causal context."""
    dense = attn = 0
    for start, n in spans:
        dense += n
        attn += n * start + n * (n + 1) // 2  # context lengths start+1 .. start+n
    return (dense * flops_per_token(cfg) + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * attn
            + 2 * cfg.hidden * cfg.vocab * sampled)


# ---- engines ----------------------------------------------------------------------------------------------------
def check_inputs(engines: list[str], models: list[str]) -> None:
    """One-line errors before anything is built."""
    for m in models:
        if m not in CONFIGS:
            raise typer.BadParameter(f"unknown model {m!r}; expected one of {', '.join(CONFIGS)}")
    for e in engines:
        try:
            check_engine(e, "llama")
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def gpu_ms(fn, device: str, reps: int) -> float | None:
    """Kernel time per call of ``fn`` (the profiler's device time, summed): the GPU time without launch gaps."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        sync(device)
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / 1000 / reps


def gemm_tflops(device: str) -> float | None:
    """The bf16 matrix rate measured here (8192^3 products, median of 20): MFU's ceiling."""
    if device != "cuda":
        return None
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    for i in range(25):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        if i >= 5:
            times.append(s.elapsed_time(e) / 1000)
    return 2 * 8192 ** 3 / statistics.median(times) / 1e12


def kv_blocks(cfg: ModelConfig, device: str, tokens: int, block_size: int = 16) -> int:
    """Blocks for ``tokens`` tokens of KV cache, capped at half the free GPU memory."""
    n = -(-tokens // block_size) + 64
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        n = min(n, int(free * 0.5) // (cfg.kv_bytes_per_token() * block_size))
    return n


def correctness(model, cfg: ModelConfig, device: str) -> dict:
    """The paged engine against the model's own full forward: chunked prefill (later chunks read the cache),
    decodes in one packed step; relative error of the last logits and whether greedy tokens agree."""
    import torch

    from valve.engine.engine import Engine

    eng = Engine.create(model, num_blocks=512, max_batch_tokens=256, max_seqs=8, keep_logits=True)
    rng = random.Random(3)
    seqs = [eng.add_request(i, [rng.randrange(cfg.vocab) for _ in range(min(n, cfg.max_seq_len // 2))], 6)
            for i, n in enumerate((100, 300, 700))]
    eng.run_to_completion()
    errs, same = [], True
    for s in seqs:
        ref = model.forward_reference(torch.tensor([s.prompt + s.output[:-1]], device=model.device))[0]
        got = eng.last_logits[s.req_id].to(ref.device)
        errs.append(float((got - ref[-1]).norm() / ref[-1].norm()))
        same &= int(ref[-1].argmax()) == s.output[-1]
    return {"max_rel_err": max(errs), "last_token_agrees": same}


# ---- offline ----------------------------------------------------------------------------------------------------
class Job:
    """The prefill-heavy batch job: fresh prompts of 768-1280 tokens, answers of 32-224 tokens."""

    def __init__(self, engine, cfg: ModelConfig, prompt=(768, 1280), answer=(32, 224), seed: int = 0) -> None:
        hi = min(prompt[1], cfg.max_seq_len - answer[1])  # the small test shapes have short contexts
        self.engine, self.cfg, self.prompt, self.answer = engine, cfg, (min(prompt[0], hi), hi), answer
        self.rng, self.n = random.Random(seed), 0

    def top_up(self, depth: int) -> None:
        sch = self.engine.scheduler
        while len(sch.waiting) + len(sch.running) < depth:
            length = self.rng.randint(*self.prompt)
            self.engine.add_request(f"job-{self.n}", [self.rng.randrange(self.cfg.vocab) for _ in range(length)],
                                    self.rng.randint(*self.answer))
            self.n += 1


def offline(model, cfg: ModelConfig, device: str, seconds: float, warmup: float, tokens_per_step: int,
            max_seqs: int, peak: float | None) -> dict:
    from valve.engine.engine import Engine

    eng = Engine.create(model, num_blocks=kv_blocks(cfg, device, 2 * max_seqs * 1600), max_batch_tokens=tokens_per_step,
                        max_seqs=max_seqs)
    job = Job(eng, cfg)
    t0, finished = time.perf_counter(), 0
    while time.perf_counter() - t0 < warmup or not finished:  # past the first all-prefill wave
        job.top_up(2 * max_seqs)
        finished += len(eng.step().finished)
    sync(device)
    util = UtilSampler(device).start()
    steps = computed = generated = flops = 0
    sync0, t0 = eng.sync_seconds, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        job.top_up(2 * max_seqs)
        res = eng.step()
        steps += 1
        computed += res.n_tokens
        generated += len(res.tokens)
        flops += step_flops(cfg, res.spans, len(res.tokens))
    sync(device)
    wall = time.perf_counter() - t0
    waited = eng.sync_seconds - sync0
    out = {"seconds": wall, "steps": steps, "ms_per_step": 1000 * wall / steps, "generated_tokens_per_s": generated / wall,
           "computed_tokens_per_s": computed / wall, "gpu_util": util.stop(), "host_share": 1 - waited / wall,
           "model_tflops": flops / wall / 1e12, "tokens_per_step": tokens_per_step, "max_seqs": max_seqs}
    out.update(mfu(out["model_tflops"], peak))
    return out


def mfu(tflops: float, peak: float | None) -> dict:
    return {"mfu_measured_peak": tflops / peak if peak else None, "mfu_datasheet": tflops / DATASHEET_BF16_TFLOPS}


def prefill(model, cfg: ModelConfig, device: str, prompts: int, length: int, reps: int, peak: float | None) -> dict:
    """Steps of ``prompts`` fresh prompts of ``length`` tokens, nothing else in the step."""
    from valve.engine.engine import Engine

    eng = Engine.create(model, num_blocks=kv_blocks(cfg, device, prompts * (length + 16)),
                        max_batch_tokens=prompts * length, max_seqs=prompts)
    rng = random.Random(1)

    def one():
        for i in range(prompts):
            eng.add_request(f"p{i}", [rng.randrange(cfg.vocab) for _ in range(length)], 1)
        eng.step()

    one()
    walls = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        one()
        sync(device)
        walls.append(time.perf_counter() - t)
    wall_ms = 1000 * statistics.median(walls)
    g = gpu_ms(one, device, 3)
    flops = step_flops(cfg, [(0, length)] * prompts, prompts)
    out = {"prompts": prompts, "length": length, "wall_ms": wall_ms, "gpu_ms": g,
           "model_tflops": flops / (g or wall_ms) / 1e9}
    out.update(mfu(out["model_tflops"], peak))
    return out


# ---- online -----------------------------------------------------------------------------------------------------
def online(model, cfg: ModelConfig, device: str, engine: str, prompt_len: int, reps: int,
           batches=(1, 8, 32)) -> dict:
    from valve.engine.engine import Engine
    from valve.engine.server import warmup

    eng = Engine.create(model, num_blocks=kv_blocks(cfg, device, 64 * 2048), max_batch_tokens=2048, max_seqs=64)
    graphs = device == "cuda"
    if graphs:
        eng.enable_graphs(32, 4096, prefill_tokens=2048)
    warmup(eng, sweep=min(2048, prompt_len + 64))
    rng = random.Random(2)
    prompt = [rng.randrange(cfg.vocab) for _ in range(prompt_len)]
    ids = iter(range(10 ** 9))

    def first_token() -> float:
        eng.add_request(f"o{next(ids)}", prompt, 1)
        t = time.perf_counter()
        while not eng.step().tokens:
            pass
        return time.perf_counter() - t

    ttft = [first_token() for _ in range(reps)]
    g_prefill = gpu_ms(first_token, device, 5)
    out = {"prompt_tokens": prompt_len, "graphs": graphs, "ttft_ms_p50": 1000 * statistics.median(ttft),
           "prefill_gpu_ms": g_prefill}
    out["ttft_over_gpu"] = out["ttft_ms_p50"] / g_prefill if g_prefill else None
    out["decode"] = []
    for b in batches:
        for i in range(b):
            eng.add_request(f"d{b}-{i}", prompt, 10 ** 6 // prompt_len)
        while any(s.computed < len(s.prompt) for s in eng.scheduler.running + list(eng.scheduler.waiting)):
            eng.step()
        for _ in range(3):
            eng.step()
        walls = []
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            eng.step()
            walls.append(time.perf_counter() - t)
        g = gpu_ms(eng.step, device, 10)
        tpot = 1000 * statistics.median(walls)
        out["decode"].append({"batch": b, "tpot_ms_p50": tpot, "step_gpu_ms": g,
                              "tpot_over_gpu": tpot / g if g else None})
        for s in list(eng.scheduler.running):
            eng.scheduler.finish(s)
    return out


# ---- report -----------------------------------------------------------------------------------------------------
def fmt(x, spec: str = ".1f") -> str:
    return output.fmt(x, spec)


def table_text(doc: dict) -> str:
    rows = ["| engine | model | offline util % | host share | offline tok/s | MFU (window) | prefill MFU | "
            "TTFT ms (GPU ms) | TPOT b1 ms (GPU ms) | TPOT b32 ms (GPU ms) |", "|" + "---|" * 10]
    for r in doc["runs"]:
        if "error" in r:
            rows.append(f"| {r['engine']} | {r['model']} | failed: {r['error'][:80]} |" + " |" * 7)
            continue
        o, p, on = r["offline"], r["prefill"], r["online"]
        d = {x["batch"]: x for x in on["decode"]}
        b1, b32 = d.get(1, {}), d.get(32, {})
        rows.append(
            f"| {r['engine']} | {r['model']} | {fmt(o['gpu_util'])} | {fmt(o['host_share'], '.2f')} | "
            f"{fmt(o['generated_tokens_per_s'], '.0f')} | {fmt(o['mfu_measured_peak'], '.2f')} | "
            f"{fmt(p['mfu_measured_peak'], '.2f')} | {fmt(on['ttft_ms_p50'], '.2f')} ({fmt(on['prefill_gpu_ms'], '.2f')}) | "
            f"{fmt(b1.get('tpot_ms_p50'), '.2f')} ({fmt(b1.get('step_gpu_ms'), '.2f')}) | "
            f"{fmt(b32.get('tpot_ms_p50'), '.2f')} ({fmt(b32.get('step_gpu_ms'), '.2f')}) |")
    return "\n".join(rows)


def plot(doc: dict, path: Path) -> None:
    plt = output.pyplot()
    runs = [r for r in doc["runs"] if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['engine']}\n{r['model']}" for r in runs]
    axes[0].bar(labels, [r["offline"]["gpu_util"] or 0 for r in runs])
    axes[0].axhline(TARGETS["gpu_util"], ls="--", c="k")
    axes[0].set_ylabel("offline-alone GPU utilisation (%)")
    x = range(len(runs))
    ttft = [r["online"]["ttft_over_gpu"] or 0 for r in runs]
    tpot = [next((d["tpot_over_gpu"] or 0 for d in r["online"]["decode"] if d["batch"] == 1), 0) for r in runs]
    axes[1].bar([i - 0.2 for i in x], ttft, 0.4, label="TTFT / prefill GPU time")
    axes[1].bar([i + 0.2 for i in x], tpot, 0.4, label="TPOT (batch 1) / decode GPU time")
    axes[1].set_xticks(list(x), labels)
    axes[1].axhline(1.0, c="k", lw=0.5)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_all(engines: list[str], models: list[str], device: str, seconds: float, warmup: float, reps: int,
            tokens_per_step: int = 8192, max_seqs: int = 128, prompt_len: int = 256, progress=print) -> dict:
    peak = gemm_tflops(device)
    doc = {"environment": env.record(device, gpu="cpu", gpu_uuid="GPU-cpu-sim"),
           "settings": {"engines": engines, "models": models, "device": device, "seconds": seconds, "warmup": warmup,
                        "reps": reps, "tokens_per_step": tokens_per_step, "max_seqs": max_seqs,
                        "online_prompt_tokens": prompt_len},
           "gemm_tflops_measured": peak, "targets": TARGETS, "runs": []}
    for name in models:
        cfg = get_config(name)
        for engine in engines:
            progress(f"{engine} {name}")
            run, model = {"engine": engine, "model": name}, None
            try:
                model = build_engine_model(engine, "llama", cfg, device=device)
                run["check"] = correctness(model, cfg, device)
                run["offline"] = offline(model, cfg, device, seconds, warmup, tokens_per_step, max_seqs, peak)
                length = min(1024, cfg.max_seq_len // 2)
                run["prefill"] = prefill(model, cfg, device, max(1, tokens_per_step // length), length, reps, peak)
                run["online"] = online(model, cfg, device, engine, prompt_len, reps)
            except Exception as e:  # one failed engine does not lose the others' figures
                run["error"] = f"{type(e).__name__}: {e}"
            doc["runs"].append(run)
            del model
            if device == "cuda":
                import torch

                torch.cuda.empty_cache()
    return doc


def main(out: Path = Path("bench/results"), models: str = "llama-1b,llama-8b", engines: str = "ours",
         device: str | None = None, seconds: float = 20.0, warmup: float = 5.0, reps: int = 30,
         tokens_per_step: int = 8192, max_seqs: int = 128) -> None:
    engine_list, model_list = engines.split(","), models.split(",")
    check_inputs(engine_list, model_list)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    doc = run_all(engine_list, model_list, device, seconds, warmup, reps, tokens_per_step, max_seqs)
    stem = "engine_" + output.slug(doc["environment"].get("gpu") or device)
    table = table_text(doc)
    output.write(out, stem, doc, table, (lambda p: plot(doc, p)))
    print(table)
    print(json.dumps({"wrote": str(Path(out) / f"{stem}.json")}))


if __name__ == "__main__":
    typer.run(main)
