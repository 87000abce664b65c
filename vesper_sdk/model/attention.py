"""Attention with RoPE, and the registry of attention variants it chooses from.

A variant is a function ``(attn, x, rope, mask, cache, layer) -> y`` that computes one
layer's attention output (before ``o_proj``) for ``x`` [B,S,D]. Registered here:

- ``sdpa``: ``F.scaled_dot_product_attention`` (FlashAttention on a GPU); the default.
- ``one_query``: one new query over a whole static cache as two small products (the CUDA
  graph step: SDPA with a mask picks a kernel made for long queries).

The ONNX export registers ``onnx`` (opset 23's ``RotaryEmbedding`` and ``Attention``
operators, ``vesper_sdk.export.lowering``). Which one runs: the cache's need first (a
static cache over its whole capacity needs ``one_query``), else ``Attention.impl``
(``VesperLM.set_attention``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VesperConfig
from .cache import Cache, StaticCache


class RotaryEmbedding(nn.Module):
    """RoPE with a cached cos/sin table indexed by absolute position.

    ``cos`` / ``sin`` [T, D/2] are the angles' table (what ONNX's RotaryEmbedding takes);
    the rotation reads them widened to D by :meth:`widen`.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        t = torch.arange(max_seq_len).float()
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        cos_wide, sin_wide = self.widen(self.cos, self.sin)
        self.register_buffer("cos_wide", cos_wide, persistent=False)
        self.register_buffer("sin_wide", sin_wide, persistent=False)

    @staticmethod
    def widen(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., D/2] tables -> (cos cos, -sin sin) [..., D], as :meth:`rotate` takes them."""
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)

    def table(self, position_ids: torch.Tensor, dtype: torch.dtype,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [B,1,S,D] for position_ids [B,S]."""
        return (self.cos_wide[position_ids].unsqueeze(1).to(dtype),
                self.sin_wide[position_ids].unsqueeze(1).to(dtype))

    @staticmethod
    def rotate(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate pairs (first half, second half) of x [..., B, H, S, D] by the table.

        (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) as x * (cos, cos) + (x2, x1) *
        (-sin, sin): three operations where the halves took eight (each one a fixed
        cost in a decode step, a node in an exported graph).
        """
        cos, sin = table
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # x [B,H,S,D], position_ids [B,S].
        return self.rotate(x, self.table(position_ids, x.dtype))


class RopeTable:
    """The rotation of one forward's positions, shared by its layers.

    ``table`` (the widened cos/sin of these positions) is looked up on first use, once per
    forward; a variant that rotates inside a fused operator reads the whole ``cos`` /
    ``sin`` tables and ``position_ids`` instead, and the lookup never happens.
    """

    def __init__(self, rope: RotaryEmbedding, position_ids: torch.Tensor,
                 dtype: torch.dtype) -> None:
        self.rope, self.position_ids, self.dtype = rope, position_ids, dtype
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def table(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Not functools.cached_property: its lock is a graph break under torch.compile.
        if self._table is None:
            self._table = self.rope.table(self.position_ids, self.dtype)
        return self._table

    @property
    def cos(self) -> torch.Tensor:
        return self.rope.cos.to(self.dtype)

    @property
    def sin(self) -> torch.Tensor:
        return self.rope.sin.to(self.dtype)


Variant = Callable[["Attention", torch.Tensor, RopeTable, "torch.Tensor | None", "Cache | None",
                    int], torch.Tensor]
ATTENTION: dict[str, Variant] = {}


def register_attention(name: str) -> Callable[[Variant], Variant]:
    """Add a variant to the registry under ``name`` (decorator)."""
    def add(fn: Variant) -> Variant:
        ATTENTION[name] = fn
        return fn
    return add


def _qkv(attn: Attention, x: torch.Tensor, rope: RopeTable, cache: Cache | None, layer: int,
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = attn.project_qkv(x, rope.table)
    if cache is not None:
        k, v = cache.update(layer, k, v)
    return q, k, v


@register_attention("sdpa")
def sdpa_attention(attn: Attention, x: torch.Tensor, rope: RopeTable,
                   mask: torch.Tensor | None, cache: Cache | None, layer: int) -> torch.Tensor:
    q, k, v = _qkv(attn, x, rope, cache, layer)
    # No mask: causal over a square block (training, a prefill without padding), or every
    # key for queries after all of them (a static cache step without padding). Decided by
    # the cache's kind, not by comparing shapes (symbolic under torch.compile).
    causal = mask is None and not isinstance(cache, StaticCache)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                       dropout_p=attn.dropout if attn.training else 0.0)
    return y.transpose(1, 2).reshape(x.shape)


@register_attention("one_query")
def one_query_attention(attn: Attention, x: torch.Tensor, rope: RopeTable,
                        mask: torch.Tensor | None, cache: Cache | None, layer: int,
                        ) -> torch.Tensor:
    """One new query per row over every key (scores in fp32): the cache is read once."""
    q, k, v = _qkv(attn, x, rope, cache, layer)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    y = torch.matmul(scores.softmax(-1).to(v.dtype), v)
    return y.transpose(1, 2).reshape(x.shape)


class Attention(nn.Module):
    """Multi-head self-attention: one qkv product, RoPE, a variant from ``ATTENTION``."""

    def __init__(self, cfg: VesperConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.dropout = cfg.dropout
        self.impl = "sdpa"

    def forward(self, x: torch.Tensor, rope: RopeTable, mask: torch.Tensor | None,
                cache: Cache | None, layer: int) -> torch.Tensor:
        """x [B,S,D] -> [B,S,D]; writes this layer's k/v into ``cache`` when given."""
        variant = ATTENTION[(cache.attention if cache is not None else None) or self.impl]
        return self.o_proj(variant(self, x, rope, mask, cache, layer))

    def project_qkv(self, x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor],
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (rotated by ``table``) and v, each [B,H,S,Dh]."""
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = RotaryEmbedding.rotate(qkv[:2], table).unbind(0)  # q and k in one rotation
        return q, k, qkv[2]
