"""transformers' own Llama and Qwen3 classes on our scheduler and paged cache (``--engine transformers``), against
their own forward (float32, CPU, random weights of the tiny shape)."""

import json
import logging
import random
import signal
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import typer  # noqa: E402
from engine_checks import check_against_reference, run_engine  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from valve.engine import choice, offline, server  # noqa: E402
from valve.engine.config import get_config  # noqa: E402
from valve.engine.engine import Engine  # noqa: E402
from valve.engine.hf import ATTN_NAME, HFModel, build_hf_model  # noqa: E402
from valve.runtime.control import GATE_OPEN, ControlBlock, control_path  # noqa: E402
from valve.runtime.gate import offline as gate_offline  # noqa: E402
from valve.runtime.gate.offline import Gate, HostGateBackend, attach  # noqa: E402

TINY = get_config("tiny")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a busy machine their spinning costs 50x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["llama", "qwen"])
def model(request):
    return build_hf_model(TINY, request.param, device="cpu", seed=3)


def prompts_of(seed, lengths):
    rng = random.Random(seed)
    return [[rng.randrange(TINY.vocab) for _ in range(n)] for n in lengths]


def test_transformers_classes_of_our_sizes_seeded(model):
    hf, cfg = model.hf, model.cfg
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen": "Qwen3ForCausalLM"}[model.arch]
    assert not hf.training and hf.config._attn_implementation == ATTN_NAME
    c = hf.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size, c.head_dim) == (cfg.hidden, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_hidden,
                                          cfg.vocab, cfg.head_dim)
    assert c.rope_parameters["rope_theta"] == cfg.rope_theta and c.rms_norm_eps == cfg.norm_eps
    qk_norms = 2 * cfg.head_dim * cfg.n_layers if model.arch == "qwen" else 0  # Qwen3's per-head q/k RMSNorm
    assert sum(p.numel() for p in hf.parameters()) == cfg.params() + qk_norms  # untied head, no biases
    state = torch.random.get_rng_state()
    same, other = (build_hf_model(cfg, model.arch, device="cpu", seed=s) for s in (3, 4))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left alone
    w = hf.model.layers[0].mlp.up_proj.weight
    assert torch.equal(same.hf.model.layers[0].mlp.up_proj.weight, w)
    assert not torch.equal(other.hf.model.layers[0].mlp.up_proj.weight, w)
    with pytest.raises(RuntimeError, match="only inside HFModel.forward_paged"):
        hf(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)


def test_paged_decode_matches_transformers_forward(model):
    engine = Engine.create(model, num_blocks=64, block_size=4, max_batch_tokens=512, keep_logits=True)
    check_against_reference(model, engine, prompts_of(0, (5, 17, 33, 1, 40)), max_tokens=9)


def test_chunked_prefill_and_preemption_match_transformers_forward(model):
    # a small token budget forces chunked prefill; few blocks force preemption and recompute
    engine = Engine.create(model, num_blocks=14, block_size=8, max_batch_tokens=16, keep_logits=True)
    check_against_reference(model, engine, prompts_of(1, (30, 23, 41)), max_tokens=12)
    assert engine.scheduler.preemptions > 0
    assert engine.cache.free_blocks() == 14


def test_decode_graph_path_matches_plain_steps(model):
    """The padded-decode layout the CUDA graphs replay (static buffers, eager here) runs the transformers model."""
    prompts, max_tokens = prompts_of(2, (5, 17, 30)), [12, 20, 7]
    plain, fast = (Engine.create(model, num_blocks=32, block_size=8, max_batch_tokens=64, max_seqs=4,
                                 keep_logits=True) for _ in range(2))
    g = fast.enable_graphs(max_batch=4, max_context=64, capture=False)
    calls = []
    orig = g.run
    g.run = lambda plan: calls.append(len(plan)) or orig(plan)
    want_out, want_logits = run_engine(plain, prompts, max_tokens)
    got_out, got_logits = run_engine(fast, prompts, max_tokens)
    assert got_out == want_out and 3 in calls
    for rid, rows in want_logits.items():
        for a, b in zip(got_logits[rid], rows, strict=True):
            assert float((a - b).abs().max()) < 1e-4, rid


def open_gate():
    cb = ControlBlock.anonymous()
    assert cb.fields.gate == GATE_OPEN
    return Gate(cb, backend=HostGateBackend(), lease_ms=600_000, watchdog=False)


def test_attach_gates_every_self_attn_and_mlp_and_changes_nothing_when_open(model):
    prompts, max_tokens = prompts_of(3, (6, 19, 11)), [5, 8, 3]
    want_out, want_logits = run_engine(Engine.create(model, num_blocks=32, block_size=8, keep_logits=True),
                                       prompts, max_tokens)
    g = open_gate()
    h = attach(model, gate=g)  # the default pattern: what ``offline --gate`` puts on the model
    try:
        n = model.cfg.n_layers
        assert h.names == [f"hf.model.layers.{i}.{s}" for i in range(n) for s in ("self_attn", "mlp")]
        engine = Engine.create(model, num_blocks=32, block_size=8, keep_logits=True)
        got_out, got_logits = run_engine(engine, prompts, max_tokens)
    finally:
        h.remove()
    assert g.boundaries == 2 * n * engine.steps  # one gate per sub-layer per forward
    assert got_out == want_out
    for rid, rows in want_logits.items():
        assert all(torch.equal(a, b) for a, b in zip(got_logits[rid], rows, strict=True)), rid


def cli(main, args):
    app = typer.Typer(add_completion=False)
    app.command()(main)
    old = signal.getsignal(signal.SIGTERM)  # the offline runner sets its own
    try:
        return CliRunner().invoke(app, args)
    finally:
        signal.signal(signal.SIGTERM, old)


def test_offline_runner_end_to_end_gated(tmp_path, monkeypatch, caplog):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    prompts = prompts_of(4, (4, 12, 7, 20))
    inp.write_text("".join(f'{{"id": "r{i}", "prompt": {p}, "max_tokens": 5}}\n' for i, p in enumerate(prompts)))
    # --gate: the arbiter's control block of this GPU, gate open
    monkeypatch.setenv("VALVE_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("VALVE_GPU_UUID", "GPU-test")
    ControlBlock.create(control_path("GPU-test")).close()
    monkeypatch.setattr(gate_offline, "_default", None)  # a process-wide gate: this test's own
    caplog.set_level(logging.INFO, logger="valve.engine.offline")
    res = cli(offline.main, ["--input", str(inp), "--output", str(out), "--device", "cpu", "--engine", "transformers",
                             "--arch", "qwen", "--gate", "--num-blocks", "64", "--block-size", "8",
                             "--max-batch-tokens", "64", "--max-seqs", "4"])
    assert res.exit_code == 0, res.output
    assert f"Valve gate before {2 * TINY.n_layers} sub-layers" in caplog.text
    g = gate_offline._default
    g.close()  # its watchdog: the op registry keeps the Gate alive
    assert g.boundaries and g.boundaries % (2 * TINY.n_layers) == 0 and g.forced_opens == 0
    got = {r["id"]: r["tokens"] for r in map(json.loads, out.read_text().splitlines())}
    # the same model and engine in process: the runner's completions are its greedy tokens
    eng = Engine.create(build_hf_model(TINY, "qwen", device="cpu", seed=0), num_blocks=64, block_size=8,
                        max_batch_tokens=64, max_seqs=4, keep_logits=True)
    want, _ = run_engine(eng, prompts, [5] * len(prompts))
    assert got == {f"r{i}": toks for i, toks in want.items()}


def test_server_worker_on_transformers():
    worker = server.build_worker("tiny", "cpu", num_blocks=64, block_size=8, max_batch_tokens=64, max_seqs=4,
                                 engine="transformers", arch="qwen")
    m = worker.engine.model
    assert isinstance(m, HFModel) and m.arch == "qwen"
    assert worker.engine.steps > 0 and worker.engine.cache.free_blocks() == 64  # the warm-up ran and finished


@pytest.mark.parametrize("args, transformers_is, message", [
    (["--engine", "vllm"], "there", "unknown engine 'vllm': use --engine ours or --engine transformers"),
    (["--engine", "transformers", "--arch", "gpt2"], "there", "unknown arch 'gpt2': use --arch llama or --arch qwen"),
    (["--arch", "qwen"], "there", "--arch qwen needs --engine transformers (our own model is Llama only)"),
    (["--engine", "transformers"], "missing", "transformers is not installed: pip install transformers"),
    (["--engine", "transformers"], "4.57.1", "transformers 4.57.1 is too old: pip install 'transformers>=5'"),
])
@pytest.mark.parametrize("command", [offline, server], ids=["offline", "server"])
def test_bad_choices_end_with_one_line_before_a_model_is_built(command, args, transformers_is, message,
                                                               monkeypatch):
    if transformers_is == "missing":
        monkeypatch.setitem(sys.modules, "transformers", None)  # ``import transformers`` raises ImportError
    elif transformers_is != "there":
        # the module object transformers left in sys.modules: it replaces itself once its models are loaded
        monkeypatch.setattr(sys.modules["transformers"], "__version__", transformers_is)

    def built(*a, **kw):
        raise AssertionError("a model was built")

    monkeypatch.setattr(choice, "build_engine_model", built)
    res = cli(command.main, [*args, "--device", "cpu"])
    assert res.exit_code == 2
    assert res.stderr.splitlines() == [f"{command.__name__}: {message}"]
