"""bench/engine.py on CPU: the FLOPs arithmetic, the bad-input errors, and one small run end to end."""

import pytest

torch = pytest.importorskip("torch")
typer = pytest.importorskip("typer")

from bench import engine as bench  # noqa: E402
from valve.engine.config import get_config  # noqa: E402


def test_step_flops_counts_dense_attention_and_head():
    cfg = get_config("tiny")
    per_token = 2 * cfg.n_layers * (cfg.hidden * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
                                    + 3 * cfg.hidden * cfg.mlp_hidden)
    assert bench.flops_per_token(cfg) == per_token
    # a 3-token prefill (contexts 1, 2, 3) and one decode at position 10 (context 11), two rows sampled
    attn = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (1 + 2 + 3 + 11)
    assert bench.step_flops(cfg, [(0, 3), (10, 1)], 2) == 4 * per_token + attn + 2 * 2 * cfg.hidden * cfg.vocab


@pytest.mark.parametrize("engines, models, match", [
    (["vllm"], ["tiny"], "unknown engine 'vllm'"),
    (["ours"], ["llama-70b"], "unknown model 'llama-70b'"),
])
def test_bad_input_is_one_line(engines, models, match):
    with pytest.raises(typer.BadParameter, match=match):
        bench.check_inputs(engines, models)


def test_small_run_on_cpu(tmp_path):
    doc = bench.run_all(["ours"], ["tiny"], "cpu", seconds=0.5, warmup=0.2, reps=2, tokens_per_step=256, max_seqs=4,
                        prompt_len=32, progress=lambda _m: None)
    (run,) = doc["runs"]
    assert "error" not in run, run.get("error")
    assert run["check"]["max_rel_err"] < 1e-4 and run["check"]["last_token_agrees"]
    off = run["offline"]
    assert off["steps"] > 0 and off["generated_tokens_per_s"] > 0 and 0 <= off["host_share"] <= 1
    assert off["gpu_util"] is None  # no NVML on CPU: not a made-up number
    assert run["prefill"]["length"] == 512 and run["prefill"]["wall_ms"] > 0
    on = run["online"]
    assert on["prompt_tokens"] == 32 and on["ttft_ms_p50"] > 0 and [d["batch"] for d in on["decode"]] == [1, 8, 32]
    table = bench.table_text(doc)
    assert "| ours | tiny |" in table
