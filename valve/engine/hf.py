"""Real model code from ``transformers`` (Llama, Qwen3) driven by our scheduler and paged KV cache.

``build_hf_model(cfg, arch)`` builds ``LlamaForCausalLM`` or ``Qwen3ForCausalLM`` from a config of the same sizes
as our ``ModelConfig``, with seeded random weights (nothing is downloaded). The transformers classes run
unchanged: their attention modules call an attention function by name, and we register one ("valve_paged") with
transformers' ``AttentionInterface``. It gets the step's ``PagedBatch`` and cache as keyword arguments that the
model's forward passes down to it, and calls ``valve.engine.model.paged_attention`` with the module's
``layer_idx``.

Qwen means Qwen3: it is the dense Qwen in transformers with plain full attention in every layer (Qwen3.5 and
Qwen3-Next mix in linear-attention layers whose recurrent state a paged KV cache does not hold), and unlike
Qwen2 (Llama plus q/k/v biases) it changes what reaches the attention function (per-head RMSNorm of q and k
before RoPE, an explicit head_dim).

``transformers`` is imported only when a model is built; ``valve.engine.choice`` picks this module or ours.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.attention import sdpa_kernel

from valve.engine.choice import ARCHS
from valve.engine.config import ModelConfig
from valve.engine.model import NO_CUDNN, PagedBatch, default_device_dtype, paged_attention

ATTN_NAME = "valve_paged"


def valve_paged_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask, scaling: float | None = None, dropout: float = 0.0,
                          sliding_window: int | None = None, valve_batch: PagedBatch | None = None,
                          valve_kv: torch.Tensor | None = None, **kwargs):
    """transformers' attention-function signature: query [1, H, N, hd], key/value [1, kvh, N, hd] (the step's
    tokens packed as one row, RoPE applied) -> ([1, N, H, hd], no weights)."""
    if valve_batch is None or valve_kv is None:
        raise RuntimeError(f"the {ATTN_NAME!r} attention runs only inside HFModel.forward_paged")
    if sliding_window is not None:
        raise NotImplementedError("sliding-window attention layers are not supported by the paged cache")
    hd = query.shape[-1]
    if scaling is not None and not math.isclose(scaling, hd ** -0.5):
        raise NotImplementedError(f"attention scaling {scaling} (paged_attention uses 1/sqrt(head_dim))")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, heads, hd]
    return paged_attention(q, k, v, valve_batch, valve_kv, module.layer_idx).unsqueeze(0), None


def _hf_config(cfg: ModelConfig, arch: str):
    import transformers

    common = dict(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.mlp_hidden,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                  head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                  tie_word_embeddings=False, attention_bias=False, use_cache=False)
    if arch == "llama":
        return transformers.LlamaConfig(**common, mlp_bias=False)
    if arch == "qwen":
        return transformers.Qwen3Config(**common, use_sliding_window=False)
    raise ValueError(f"unknown arch {arch!r}: use --arch {' or --arch '.join(ARCHS)}")


class HFModel(nn.Module):
    """A transformers causal LM with the interface ``Engine`` uses (``cfg``, ``device``, ``dtype``,
    ``forward_paged``, ``forward_reference``). Its sub-layers are ``hf.model.layers.<i>.self_attn`` and
    ``.mlp``: ``valve.runtime.gate.offline.attach`` finds them with its default pattern."""

    def __init__(self, hf: nn.Module, cfg: ModelConfig, arch: str) -> None:
        super().__init__()
        self.hf, self.cfg, self.arch = hf, cfg, arch

    @property
    def device(self) -> torch.device:
        return self.hf.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.model.embed_tokens.weight.dtype

    @torch.inference_mode()
    def forward_paged(self, batch: PagedBatch, kv: torch.Tensor) -> torch.Tensor:
        """Same contract as ``LlamaModel.forward_paged``: logits [S, vocab] (float32) of ``batch.logits_index``."""
        with sdpa_kernel(NO_CUDNN):  # the padded-decode path's SDPA: as in our model, no per-shape cuDNN graphs
            out = self.hf.model(input_ids=batch.tokens[None], position_ids=batch.positions[None], use_cache=False,
                                valve_batch=batch, valve_kv=kv)
        # the LM head only on the rows that sample: a prefill chunk's other rows would waste a vocab-wide GEMM
        return self.hf.lm_head(out.last_hidden_state[0, batch.logits_index]).float()

    @torch.inference_mode()
    def forward_reference(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab] (float32): transformers' own forward with its SDPA attention.
        Switches the shared config for the call: not to run concurrently with ``forward_paged`` (tests only)."""
        self.hf.set_attn_implementation("sdpa")
        try:
            return self.hf(input_ids=tokens, use_cache=False).logits.float()
        finally:
            self.hf.set_attn_implementation(ATTN_NAME)


def build_hf_model(cfg: ModelConfig, arch: str = "llama", device: str | None = None,
                   dtype: torch.dtype | None = None, seed: int = 0) -> HFModel:
    """A transformers model of ``cfg``'s sizes with seeded random weights, on ``device`` (bf16 on CUDA, float32
    on CPU, as ``build_model``), in eval mode, its attention routed through the paged cache."""
    import transformers

    transformers.AttentionInterface.register(ATTN_NAME, valve_paged_attention)
    dev, dt = default_device_dtype(device)
    dt = dtype or dt
    config = _hf_config(cfg, arch)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        with torch.device(dev):
            hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dt, attn_implementation=ATTN_NAME)
        # unit-variance activations through the layers (transformers' 0.02 init makes near-flat logits, where
        # greedy ties would hide differences); norm gains, Qwen3's q/k norms included, stay 1
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if not name.endswith("norm.weight"):
                    p.normal_(0.0, 1.0 if "embed_tokens" in name else p.shape[-1] ** -0.5)
    return HFModel(hf, cfg, arch).eval()
