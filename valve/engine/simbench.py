"""The timing variants on the simulated GPU (``valve.runtime.sim`` through ``valve.demo.simulate``), with kernel
durations estimated from a model shape on an H100 (roofline: ~800 TFLOP/s bf16 and ~3.0 TB/s, the rates measured
on this workplace's H100, at 50% and 70% efficiency). Used by ``valve bench colocation`` where no GPU is present.
MPS is not modelled by the simulator."""

from __future__ import annotations

from valve.engine.config import ModelConfig

FLOPS = 800e12 * 0.5
BANDWIDTH = 3.0e12 * 0.7
NS = 1e9


def workload_for(cfg: ModelConfig, rate: float, prompt_mean: float, output_mean: float, offline_batch: int,
                 offline_context: int):
    """A ``valve.demo.Workload`` whose kernels have the durations a ``cfg``-shaped model would have."""
    from valve.demo import Workload

    params = cfg.params()
    sublayers = 2 * cfg.n_layers
    weight_bytes = 2 * params
    prefill_ns_per_token = 2 * params / FLOPS * NS
    decode_step_ns = weight_bytes / BANDWIDTH * NS
    kv_read = offline_batch * offline_context * cfg.kv_bytes_per_token()
    offline_step_ns = max((weight_bytes + kv_read) / BANDWIDTH, offline_batch * 2 * params / FLOPS) * NS
    return Workload(
        rate_per_s=rate,
        prompt_tokens=int(prompt_mean),
        output_tokens=int(output_mean),
        prefill_kernels=sublayers,
        prefill_ns_per_token=max(1, int(prefill_ns_per_token)),
        decode_kernels=sublayers,
        decode_kernel_ns=max(1, int(decode_step_ns / sublayers)),
        offline_kernel_ns=max(1, int(offline_step_ns / sublayers)),
        offline_tokens_per_sublayer=offline_batch / sublayers,
    )


def busy_fraction_alone(w) -> float:
    """Expected online busy fraction alone: rate x service time (prefill + decode steps with CPU gaps)."""
    service_ns = w.prefill_ns_per_token * w.prompt_tokens + w.output_tokens * (
        w.decode_kernels * w.decode_kernel_ns + w.decode_cpu_gap_ns)
    return w.rate_per_s * service_ns / NS


def rate_for_busy(cfg: ModelConfig, busy: float, prompt_mean: float, output_mean: float, offline_batch: int,
                  offline_context: int) -> float:
    w = workload_for(cfg, 1.0, prompt_mean, output_mean, offline_batch, offline_context)
    return busy / busy_fraction_alone(w)


def run_simulated(cfg: ModelConfig, busy: float, seconds: float, prompt_mean: float, output_mean: float,
                  offline_batch: int, offline_context: int, seed: int = 0, progress=None) -> dict:
    """All simulated variants -> {"workload": ..., "variants": {name: {...}}} in the harness' result format."""
    from dataclasses import asdict

    from valve.demo import VARIANTS, simulate

    rate = rate_for_busy(cfg, busy, prompt_mean, output_mean, offline_batch, offline_context)
    w = workload_for(cfg, rate, prompt_mean, output_mean, offline_batch, offline_context)
    out = {}
    for i, v in enumerate(VARIANTS):
        def tick(frac: float, i=i) -> None:
            if progress:
                progress((i + frac) / len(VARIANTS))

        r = simulate(v, w, seconds, seed, progress=tick)
        out[v] = {
            "ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms,
            "offline_tokens_per_s": r.offline_tokens_per_s if v != "online-alone" else None,
            "gpu_util": None, "busy_fraction": busy_fraction_alone(w) if v != "offline-alone" else None,
            "preemptions": r.preemptions, "gate_closed_fraction": r.gate_closed_fraction,
        }
    return {"workload": asdict(w), "rate_per_s": rate, "variants": out,
            "skipped": {"mps": "MPS is not modelled by the simulated GPU"}}
