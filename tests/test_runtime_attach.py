"""attach(): gates before sub-layers of any nn.Module via forward pre-hooks (CPU torch, host backend)."""

import pytest

from valve.runtime.control import ControlBlock
from valve.runtime.gate.offline import Gate, HostGateBackend, attach

torch = pytest.importorskip("torch")
nn = torch.nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Linear(8, 8)
        self.self_attn.attn = nn.Identity()  # nested match: must not be gated twice
        self.mlp = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.mlp(self.norm(self.self_attn(x)))


class Model(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_attach_gates_every_sublayer_and_remove_undoes_it():
    cb = ControlBlock.anonymous()
    g = Gate(cb, backend=HostGateBackend())
    m = Model(3)
    h = attach(m, gate=g)
    assert h.names == [f"layers.{i}.{s}" for i in range(3) for s in ("self_attn", "mlp")]
    order = []
    g.on_boundary(lambda: order.append(g.boundaries))
    m(torch.zeros(2, 8))
    assert g.boundaries == 6 and order == list(range(6))
    assert cb.fields.offline_progress == 6
    h.remove()
    m(torch.zeros(2, 8))
    assert g.boundaries == 6


def test_attach_with_a_custom_pattern_and_no_match():
    g = Gate(ControlBlock.anonymous(), backend=HostGateBackend())
    h = attach(Model(2), pattern=r"layers\.\d+\.mlp$", gate=g)
    assert h.names == ["layers.0.mlp", "layers.1.mlp"]
    with pytest.raises(ValueError, match="no sub-module name"):
        attach(nn.Linear(2, 2), gate=g)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = nn.Linear(8, 8), Mlp()

    def forward(self, x):
        return self.mlp(self.self_attn(x))


def test_the_published_granularity_picks_blocks_or_linear_layers():
    from valve.runtime.control import GRANULARITY_CODES

    cb = ControlBlock.anonymous()
    g = Gate(cb, backend=HostGateBackend())
    m = nn.Sequential(Layer(), Layer())
    assert attach(m, gate=g).names == ["0.self_attn", "0.mlp", "1.self_attn", "1.mlp"]  # unset: blocks
    cb.fields.gate_granularity = GRANULARITY_CODES["linear"]  # the arbiter's RuntimeSpec says linear
    h = attach(m, gate=g)
    assert h.names == ["0.self_attn", "0.mlp.up", "0.mlp.down", "1.self_attn", "1.mlp.up", "1.mlp.down"]
    h.remove()
    before = g.boundaries
    m(torch.zeros(1, 8))
    assert g.boundaries - before == 4  # the block handle's 4 gates are still on; the linear ones are gone
    assert attach(m, gate=g, granularity="block").names[1] == "0.mlp"  # an argument wins over the published one
    assert attach(m, pattern=r"\.up$", gate=g).names == ["0.mlp.up", "1.mlp.up"]  # so does a pattern
    with pytest.raises(ValueError, match="granularity 'sublayer'"):
        attach(m, gate=g, granularity="sublayer")
    with pytest.raises(ValueError, match="has no torch.nn.Linear"):
        attach(nn.ReLU(), gate=g, granularity="linear")
