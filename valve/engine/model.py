"""A Llama-architecture decoder in plain PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Two forward paths over the same weights:
- ``forward_reference(tokens)``: the whole sequence at once, no cache (the correctness reference);
- ``forward_paged(batch, cache)``: new tokens of many sequences, keys/values written to and read from a paged
  cache (``valve.engine.kvcache.PagedKVCache``). Sequences with one new token (decode) share one batched
  attention call; longer chunks (prefill) run one call each.

Sub-layers are the modules ``layers.<i>.attn`` and ``layers.<i>.mlp``, so ``valve.runtime.gate.offline.attach`` can
put a gate before each of them with forward pre-hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from valve.engine.config import ModelConfig

SUBLAYER_PATTERN = r"layers\.\d+\.(attn|mlp)$"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


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
    """Everything ``forward_paged`` needs for one engine step (built by ``Engine``, tensors on the device)."""

    tokens: torch.Tensor  # [N] new tokens of all sequences, concatenated
    positions: torch.Tensor  # [N]
    slot_block: torch.Tensor  # [N] cache block each new token's K/V goes to
    slot_offset: torch.Tensor  # [N] offset inside that block
    logits_index: torch.Tensor  # [S] rows of the N tokens whose logits are wanted
    dec_index: torch.Tensor | None = None  # [B] rows of decode tokens (one new token per sequence)
    dec_tables: torch.Tensor | None = None  # [B, max_blocks] block tables, padded
    dec_lens: torch.Tensor | None = None  # [B] context length including the new token
    prefills: tuple = ()  # (row start, n new, context length incl. new, block table [n_blocks]) per sequence


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, device=None, dtype=None) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, cfg.n_heads * hd, bias=False, device=device, dtype=dtype)
        self.k_proj = nn.Linear(cfg.hidden, cfg.n_kv_heads * hd, bias=False, device=device, dtype=dtype)
        self.v_proj = nn.Linear(cfg.hidden, cfg.n_kv_heads * hd, bias=False, device=device, dtype=dtype)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.hidden, bias=False, device=device, dtype=dtype)

    def qkv(self, x, cos, sin):
        c = self.cfg
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, c.n_heads, c.head_dim)
        k = self.k_proj(x).view(*lead, c.n_kv_heads, c.head_dim)
        v = self.v_proj(x).view(*lead, c.n_kv_heads, c.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch=None, kv=None) -> torch.Tensor:
        if batch is None:
            return self._forward_full(x, cos, sin)
        return self._forward_paged(x, cos, sin, batch, kv)

    def _forward_full(self, x, cos, sin):
        """x: [B, T, hidden]; plain causal attention."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))

    def _forward_paged(self, x, cos, sin, batch: PagedBatch, kv: torch.Tensor):
        """x: [N, hidden]; kv: the cache blocks [n_blocks, n_layers, 2, block_size, n_kv_heads, head_dim]."""
        c, layer = self.cfg, self.layer
        n = x.shape[0]
        q, k, v = self.qkv(x, cos, sin)
        kv[batch.slot_block, layer, 0, batch.slot_offset] = k
        kv[batch.slot_block, layer, 1, batch.slot_offset] = v
        out = torch.empty(n, c.n_heads, c.head_dim, device=x.device, dtype=x.dtype)
        group = c.n_heads // c.n_kv_heads
        if batch.dec_index is not None:
            b = batch.dec_index.shape[0]
            kc = kv[batch.dec_tables, layer, 0].flatten(1, 2).transpose(1, 2)  # [B, kvh, T, hd]
            vc = kv[batch.dec_tables, layer, 1].flatten(1, 2).transpose(1, 2)
            t = kc.shape[2]
            mask = (torch.arange(t, device=x.device)[None, :] < batch.dec_lens[:, None])[:, None, None, :]
            # one query position per sequence: fold the query heads of a KV group into the query-length axis
            qd = q[batch.dec_index].view(b, c.n_kv_heads, group, c.head_dim)
            od = F.scaled_dot_product_attention(qd, kc, vc, attn_mask=mask)
            out[batch.dec_index] = od.reshape(b, c.n_heads, c.head_dim)
        for start, m, ctx, table in batch.prefills:
            qs = q[start:start + m].transpose(0, 1).unsqueeze(0)  # [1, H, m, hd]
            if ctx == m:  # no earlier context: the new keys are the whole context
                ks = k[start:start + m].transpose(0, 1).unsqueeze(0)
                vs = v[start:start + m].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            else:  # a later chunk (chunked prefill or recompute): read the cached context
                # KV heads repeated per query group rather than enable_gqa: with a mask, GQA falls back to the
                # math kernel on CUDA (an [H, m, ctx] score matrix: a long, unpreemptible offline kernel)
                ks = kv[table, layer, 0].flatten(0, 1)[:ctx].transpose(0, 1).unsqueeze(0)
                vs = kv[table, layer, 1].flatten(0, 1)[:ctx].transpose(0, 1).unsqueeze(0)
                ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
                qpos = torch.arange(ctx - m, ctx, device=x.device)
                mask = torch.arange(ctx, device=x.device)[None, :] <= qpos[:, None]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
            out[start:start + m] = o[0].transpose(0, 1)
        return self.o_proj(out.view(n, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.mlp_hidden, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(cfg.hidden, cfg.mlp_hidden, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.hidden, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
