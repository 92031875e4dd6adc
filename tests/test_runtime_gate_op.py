"""The valve::gate_ op: attach() gates survive torch.compile(fullgraph=True) (CPU torch, host backend)."""

import threading
import time

import pytest

from valve.runtime.control import GATE_CLOSED, GATE_OPEN, ControlBlock
from valve.runtime.gate.offline import Gate, HostGateBackend, attach

torch = pytest.importorskip("torch")
nn = torch.nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Linear(16, 16)
        self.mlp = nn.Linear(16, 16)

    def forward(self, x):
        x = x + self.self_attn(x)
        return x + self.mlp(input=x)  # keyword input: the hook must find it


class Model(nn.Module):
    def __init__(self, n=2):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _gate():
    cb = ControlBlock.anonymous()
    cb.fields.heartbeat_ns = time.monotonic_ns()
    return cb, Gate(cb, backend=HostGateBackend(), lease_ms=600_000)


def _blocks_while_closed(cb, g, fn, x):
    """Run fn(x) in a thread with the gate closed: it must reach a boundary and not finish until reopened."""
    reached, done, out = threading.Event(), threading.Event(), []
    g.on_boundary(reached.set)
    cb.fields.gate = GATE_CLOSED
    t = threading.Thread(target=lambda: (out.append(fn(x)), done.set()), daemon=True)
    t.start()
    assert reached.wait(60), "the forward never reached a gate"
    assert not done.wait(0.3), "the forward finished with the gate closed"
    before = g.boundaries
    cb.fields.gate = GATE_OPEN
    t.join(60)
    assert done.is_set() and g.boundaries > before
    return out[0]


def test_compiled_fullgraph_model_calls_the_gate_per_module_and_blocks_when_closed():
    torch.manual_seed(0)
    m = Model(2).eval()
    cb, g = _gate()
    h = attach(m, gate=g)
    assert h.names == ["layers.0.self_attn", "layers.0.mlp", "layers.1.self_attn", "layers.1.mlp"]
    x = torch.randn(3, 16)
    with torch.no_grad():
        eager = m(x)
        assert g.boundaries == 4
        explained = torch._dynamo.explain(m)(x)
        assert explained.graph_count == 1 and explained.graph_break_count == 0
        compiled = torch.compile(m, fullgraph=True)
        got = compiled(x)
        torch.testing.assert_close(got, eager)
        n = g.boundaries
        compiled(x)
        assert g.boundaries == n + 4  # the op runs per gated module per compiled forward
        assert cb.fields.offline_progress == g.boundaries
        got = _blocks_while_closed(cb, g, compiled, x)
    torch.testing.assert_close(got, eager)


def test_compiled_tiny_llama_from_transformers_is_gated():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    cb, g = _gate()
    h = attach(model, gate=g)
    assert h.names == [f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn", "mlp")]
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        n = g.boundaries
        got = compiled(input_ids=ids, use_cache=False).logits
        assert g.boundaries == n + 4
        torch.testing.assert_close(got, eager)
        blocked = _blocks_while_closed(cb, g, lambda i: compiled(input_ids=i, use_cache=False).logits, ids)
    torch.testing.assert_close(blocked, eager)
