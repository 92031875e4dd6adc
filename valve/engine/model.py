"""A Llama-architecture decoder in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Two forward paths over the same weights:
- ``forward_reference(tokens)``: the whole sequence at once, no cache (the correctness reference);
- ``forward_paged(batch, cache)``: new tokens of many sequences, keys/values written to and read from a paged
  cache (``valve.engine.kvcache.PagedKVCache``). One variable-length attention call covers every sequence of
  a step (prefill chunks and decodes alike); the CUDA-graph decode path reads padded block tables instead.

Sub-layers are the modules ``layers.<i>.attn`` and ``layers.<i>.mlp``, so ``valve.runtime.gate.offline.attach`` can
put a gate before each of them with forward pre-hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from valve.engine.config import ModelConfig

NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
SUBLAYER_PATTERN = r"layers\.\d+\.(attn|mlp)$"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel on CUDA


def rope_tables(cfg: ModelConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [max_seq_len, head_dim] (float32), half-split ("rotate_half") convention."""
    half = cfg.head_dim // 2
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(half, device=device, dtype=torch.float32) / half))
    ang = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., n, heads, head_dim]; cos/sin: [..., n, head_dim]."""
    half = x.shape[-1] // 2
    xf = x.float()
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    out = xf * cos.unsqueeze(-2) + rot * sin.unsqueeze(-2)
    return out.to(x.dtype)


@dataclass
class PagedBatch:
    """Everything ``forward_paged`` needs for one engine step (built by ``Engine``, tensors on the device).

    Two attention layouts. Packed (every eager step): each sequence's whole context (cached tokens and the new
    ones) is gathered from the cache by ``ctx_block``/``ctx_offset`` and one variable-length attention call
    covers all sequences, prefill chunks and decodes alike. Padded decode (the CUDA-graph path, static shapes):
    one new token per sequence, context read through block tables padded to one width."""

    tokens: torch.Tensor  # [N] new tokens of all sequences, concatenated
    positions: torch.Tensor  # [N]
    slot_block: torch.Tensor  # [N] cache block each new token's K/V goes to
    slot_offset: torch.Tensor  # [N] offset inside that block
    logits_index: torch.Tensor  # [S] rows of the N tokens whose logits are wanted
    # packed layout
    ctx_block: torch.Tensor | None = None  # [T] every context token of every sequence, sequence by sequence
    ctx_offset: torch.Tensor | None = None  # [T]
    cu_q: torch.Tensor | None = None  # [S+1] int32 row offsets of each sequence's new tokens
    cu_k: torch.Tensor | None = None  # [S+1] int32 offsets of each sequence's context in ctx_block
    max_q: int = 0
    max_k: int = 0
    # padded-decode layout
    dec_index: torch.Tensor | None = None  # [B] rows of decode tokens (one new token per sequence)
    dec_tables: torch.Tensor | None = None  # [B, max_blocks] block tables, padded
    dec_lens: torch.Tensor | None = None  # [B] context length including the new token
    dec_all: bool = False  # every row is a decode row, in order (no gather and scatter of the rows)
    dec_mask: torch.Tensor | None = None  # [B, 1, 1, T] the padded context's valid keys (once per step)


def _varlen_flash():
    """torch's flash-attention varlen entry point, or None (CPU, or a torch without it)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_reference(q, k, v, cu_q: list[int], cu_k: list[int]) -> torch.Tensor:
    """Causal attention of packed sequences, query rows aligned to the end of their context (what flash's
    varlen computes with window (-1, 0)); one SDPA call per sequence. q: [Nq, H, hd], k/v: [Nk, kvh, hd]."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        a, b, c, d = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        m, ctx = b - a, d - c
        qs = q[a:b].transpose(0, 1).unsqueeze(0)
        ks = k[c:d].transpose(0, 1).unsqueeze(0).repeat_interleave(group, dim=1)
        vs = v[c:d].transpose(0, 1).unsqueeze(0).repeat_interleave(group, dim=1)
        mask = torch.arange(ctx, device=q.device)[None, :] <= torch.arange(ctx - m, ctx, device=q.device)[:, None]
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)[0].transpose(0, 1)
    return out


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PagedBatch, kv: torch.Tensor,
                    layer: int) -> torch.Tensor:
    """Attention of a step's new tokens over the paged cache; the new keys/values are written to it first.

    q: [N, H, hd]; k, v: [N, kvh, hd] (RoPE applied); kv: the cache blocks
    [n_blocks, n_layers, 2, block_size, kvh, hd]. Returns [N, H, hd]. Shared by the reference engine's attention
    and the transformers models' attention function (``valve.engine.hf``)."""
    kv[batch.slot_block, layer, 0, batch.slot_offset] = k
    kv[batch.slot_block, layer, 1, batch.slot_offset] = v
    if batch.ctx_block is not None:
        kc = kv[batch.ctx_block, layer, 0, batch.ctx_offset]  # [T, kvh, hd]
        vc = kv[batch.ctx_block, layer, 1, batch.ctx_offset]
        flash = _varlen_flash() if q.is_cuda else None
        if flash is not None:
            # one launch for every sequence of the step: per-sequence calls cost more host time than GPU time
            return flash(q, kc, vc, batch.cu_q, batch.cu_k, batch.max_q, batch.max_k, window_size=(-1, 0))
        return varlen_reference(q, kc, vc, batch.cu_q.tolist(), batch.cu_k.tolist())
    n, h, hd = q.shape
    kvh = k.shape[1]
    b = batch.dec_index.shape[0]
    kc = kv[batch.dec_tables, layer, 0].flatten(1, 2).transpose(1, 2)  # [B, kvh, T, hd]
    vc = kv[batch.dec_tables, layer, 1].flatten(1, 2).transpose(1, 2)
    if batch.dec_mask is None:  # a graph replays hundreds of tiny kernels: build the mask once, not per layer
        t = kc.shape[2]
        batch.dec_mask = (torch.arange(t, device=q.device)[None, :] < batch.dec_lens[:, None])[:, None, None, :]
    # one query position per sequence: fold the query heads of a KV group into the query-length axis
    qd = (q if batch.dec_all else q[batch.dec_index]).reshape(b, kvh, h // kvh, hd)
    od = F.scaled_dot_product_attention(qd, kc, vc, attn_mask=batch.dec_mask).reshape(b, h, hd)
    if batch.dec_all:
        return od
    out = torch.empty_like(q)
    out[batch.dec_index] = od
    return out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, device=None, dtype=None) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd = cfg.head_dim
        # q, k and v in one GEMM, and RoPE over q and k in one pass: fewer launches per layer
        self.qkv_proj = nn.Linear(cfg.hidden, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd, bias=False, device=device,
                                  dtype=dtype)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.hidden, bias=False, device=device, dtype=dtype)

    def qkv(self, x, cos, sin):
        c = self.cfg
        qkv = self.qkv_proj(x).view(*x.shape[:-1], c.n_heads + 2 * c.n_kv_heads, c.head_dim)
        qk = apply_rope(qkv[..., :c.n_heads + c.n_kv_heads, :], cos, sin)
        return qk[..., :c.n_heads, :], qk[..., c.n_heads:, :], qkv[..., c.n_heads + c.n_kv_heads:, :]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch=None, kv=None) -> torch.Tensor:
        if batch is None:
            return self._forward_full(x, cos, sin)
        q, k, v = self.qkv(x, cos, sin)
        out = paged_attention(q, k, v, batch, kv, self.layer)
        return self.o_proj(out.reshape(x.shape[0], -1))

    def _forward_full(self, x, cos, sin):
        """x: [B, T, hidden]; plain causal attention."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.mlp_hidden = cfg.mlp_hidden
        self.gate_up_proj = nn.Linear(cfg.hidden, 2 * cfg.mlp_hidden, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.hidden, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.mlp_hidden, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, device=None, dtype=None) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps, device, dtype)
        self.attn = Attention(cfg, layer, device, dtype)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps, device, dtype)
        self.mlp = MLP(cfg, device, dtype)

    def forward(self, x, cos, sin, batch=None, kv=None):
        h = x + self.attn(self.attn_norm(x), cos, sin, batch, kv)
        return h + self.mlp(self.mlp_norm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, device, dtype) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps, device, dtype)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False, device=device, dtype=dtype)
        cos, sin = rope_tables(cfg, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @torch.inference_mode()
    def forward_reference(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab] (float32), no cache."""
        t = tokens.shape[1]
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x)).float()

    @torch.inference_mode()
    def forward_paged(self, batch: PagedBatch, kv: torch.Tensor) -> torch.Tensor:
        """New tokens of many sequences through the paged cache -> logits [S, vocab] (float32) of the
        rows in ``batch.logits_index``."""
        cos, sin = self.rope_cos[batch.positions], self.rope_sin[batch.positions]
        x = self.embed(batch.tokens)
        # not cuDNN: it builds a graph for every new shape, milliseconds of host time per call with varying lengths
        with sdpa_kernel(NO_CUDNN):
            for layer in self.layers:
                x = layer(x, cos, sin, batch, kv)
        x = x[batch.logits_index]
        return self.lm_head(self.norm(x)).float()


def default_device_dtype(device: str | None = None) -> tuple[torch.device, torch.dtype]:
    """bf16 on CUDA, float32 on CPU."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def build_model(cfg: ModelConfig, device: str | None = None, dtype: torch.dtype | None = None,
                seed: int = 0) -> LlamaModel:
    """A model with seeded random weights (no download: timing is what matters)."""
    dev, dt = default_device_dtype(device)
    dt = dtype or dt
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.cuda.manual_seed(seed)
    try:
        model = LlamaModel(cfg, device=dev, dtype=dt)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    continue
                if name == "embed.weight":
                    p.normal_(0.0, 1.0)
                else:
                    p.normal_(0.0, p.shape[-1] ** -0.5)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()
