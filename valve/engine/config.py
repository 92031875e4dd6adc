"""Named Llama-architecture shapes. Plain Python: importing this needs no torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class ModelConfig:
    name: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden: int
    vocab: int
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    def params(self) -> int:
        """Parameter count (untied input embedding and output head)."""
        attn = self.hidden * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.hidden * self.mlp_hidden
        per_layer = attn + mlp + 2 * self.hidden
        return self.n_layers * per_layer + 2 * self.vocab * self.hidden + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes

    def to_dict(self) -> dict:
        return asdict(self)


CONFIGS: dict[str, ModelConfig] = {
    "tiny": ModelConfig("tiny", n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, mlp_hidden=128, vocab=256,
                        rope_theta=10_000.0, max_seq_len=1024),
    "small": ModelConfig("small", n_layers=4, hidden=256, n_heads=8, n_kv_heads=2, mlp_hidden=688, vocab=4096,
                         rope_theta=10_000.0, max_seq_len=4096),
    "llama-1b": ModelConfig("llama-1b", n_layers=16, hidden=2048, n_heads=32, n_kv_heads=8, mlp_hidden=8192,
                            vocab=128256),
    "llama-8b": ModelConfig("llama-8b", n_layers=32, hidden=4096, n_heads=32, n_kv_heads=8, mlp_hidden=14336,
                            vocab=128256),
}


def get_config(name: str, **overrides) -> ModelConfig:
    try:
        cfg = CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; expected one of {', '.join(CONFIGS)}") from None
    return replace(cfg, **overrides) if overrides else cfg
