"""VesperLM: the one model definition, readable top to bottom.

Pre-norm decoder blocks (RMSNorm), attention through ``F.scaled_dot_product_attention``
with RoPE from a cached table and a KV cache, a GLU feed-forward whose gate and up
projections are FlyLoRA layers and whose activation is ERA, an optional top-k MoE, tied
embeddings, and the MetaHead that predicts, per token, how likely the model's own top-1
prediction is to be right.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .atomic import atomic_write_folder
from .config import ConfigError, VesperConfig

if TYPE_CHECKING:
    from .matvec import PairProduct, SplitMatVec

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]


class ModelFolderError(RuntimeError):
    """A model folder is missing a file, or a file is damaged or does not match config.json."""


@dataclass
class VesperOutput:
    """What ``VesperLM.forward`` returns.

    logits [B,S,V]; confidence and stop [B,S] (probabilities); error_logits [B,S,3]
    (right / near miss / miss); aux_loss (MoE load balancing, 0 without MoE);
    past_key_values (per layer (k, v), [B,H,T,D]) when ``use_cache``; hidden_states [B,S,D]
    (final normed hidden state, what the LM head and MetaHead read).
    """

    logits: torch.Tensor
    confidence: torch.Tensor
    stop: torch.Tensor
    error_logits: torch.Tensor
    aux_loss: torch.Tensor
    past_key_values: KVCache | None
    hidden_states: torch.Tensor
    meta_logits: torch.Tensor


# ----------------------------------------------------------------------------- pieces
def project(x: torch.Tensor, weight: torch.Tensor, matvec: SplitMatVec | None,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or the threaded decode product when one is attached and applies.

    See :mod:`vesper_sdk.matvec`: the CPU decode path attaches one per weight matrix.
    """
    if matvec is not None and matvec.applies(x):
        return matvec(x) if bias is None else matvec(x) + bias
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` that can take a threaded matrix-vector product for CPU decoding."""

    matvec: SplitMatVec | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(x, self.weight, self.matvec, self.bias)


class ERA(nn.Module):
    """ERA activation from the seed: GELU(x) + gamma * softplus(x)."""

    def __init__(self, gamma: float = 0.1) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(F.gelu(x), F.softplus(x), alpha=self.gamma)


def _balance_step(load: torch.Tensor) -> torch.Tensor:
    """sign(mean load - load) per rank ([..., r]); zero where nothing was routed. No branch
    on the values, so on a GPU it never waits for them."""
    active = load.sum(-1, keepdim=True) > 0
    return torch.sign(load.mean(-1, keepdim=True) - load) * active


def _count_top_k() -> bool:
    """Whether to pick top-k ranks by :func:`top_k_by_counting` rather than ``topk``.

    Compiled, the counting is pointwise work that the compiler fuses into its
    neighbours, where topk (+ scatter) are separate sort kernels (on an H200, 18 % of a
    decode step's GPU time). Eagerly, and in an ONNX graph (one TopK node against a
    dozen), topk is the fewer operations.
    """
    return torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export()


def top_k_by_counting(score: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask [..., r] of the k highest scores, as ``topk`` chooses them: a rank is in
    when fewer than k ranks beat it (higher score, or equal at a lower index)."""
    r = torch.arange(score.shape[-1], device=score.device)
    lower = r.unsqueeze(0) < r.unsqueeze(1)  # [i, j]: j < i
    beats = score.unsqueeze(-2) > score.unsqueeze(-1)  # [..., i, j]: j beats i
    ties = (score.unsqueeze(-2) == score.unsqueeze(-1)) & lower
    return ((beats | ties).sum(-1) < k).to(score.dtype)


class FlyLoRALinear(nn.Module):
    """A linear layer plus FlyLoRA's implicit rank-wise mixture of experts.

    FlyLoRA (Zou et al., NeurIPS 2025, arXiv 2510.08396): the low-rank branch's
    down-projection ``A`` (r x in) is a frozen sparse random matrix, the up-projection
    ``B`` (out x r) is trainable and starts at zero, and only the top-k of the r rank
    components (ranked by |Ax| plus a load-balancing bias) are active for each token.
    The bias is nudged without gradients towards equal use of the ranks
    (``update_balance_bias``); ``A``, the bias and the use counts are buffers saved
    with the weights.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, topk: int,
                 alpha: float = 1.0, a_nnz: int = 8, bias_update_rate: float = 1e-3) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.topk, self.bias_update_rate = rank, topk, bias_update_rate
        self.scaling = alpha
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        # Zeros until VesperLM.reset_parameters draws it: a layer built on its own must not
        # compute with leftover memory (and zeros take nothing from the random stream, so
        # seeded models stay what they were).
        nn.init.zeros_(self.weight)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.register_buffer("lora_A", self._sparse_random_A(rank, in_features, a_nnz))
        self.register_buffer("balance_bias", torch.zeros(rank))
        # Non-persistent: per-step statistic for the bias update, not model state.
        self.register_buffer("rank_load", torch.zeros(rank), persistent=False)

    @staticmethod
    def _sparse_random_A(rank: int, in_features: int, nnz: int) -> torch.Tensor:
        # Sparse random projection: each row has nnz entries of +-1/sqrt(nnz).
        nnz = min(nnz, in_features)
        a = torch.zeros(rank, in_features)
        cols = torch.rand(rank, in_features).argsort(dim=1)[:, :nnz]
        signs = torch.randint(0, 2, (rank, nnz)).float() * 2 - 1
        a.scatter_(1, cols, signs / math.sqrt(nnz))
        return a

    def rank_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A x, 0/1 mask of the top-k active ranks) for input x [..., in]."""
        ax = F.linear(x, self.lora_A.to(x.dtype))
        return ax, self._top_ranks(ax)

    def _top_ranks(self, ax: torch.Tensor) -> torch.Tensor:
        score = ax.detach().abs().float() + self.balance_bias
        if _count_top_k():
            return top_k_by_counting(score, self.topk)
        idx = score.topk(self.topk, dim=-1).indices
        return torch.zeros_like(score).scatter_(-1, idx, 1.0)

    # Decode products (vesper_sdk.matvec): one over [weight; lora_A], which gives the base
    # output and A x in one pass over memory, and one over lora_B.
    matvec: SplitMatVec | None = None
    matvec_b: SplitMatVec | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matvec is not None and self.matvec.applies(x):
            out, ax = self.matvec(x).split((self.out_features, self.rank), dim=-1)
            mask = self._top_ranks(ax)
        else:
            out = F.linear(x, self.weight)
            ax, mask = self.rank_mask(x)
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.rank_load += mask.reshape(-1, self.rank).sum(0)
        lora = project(ax * mask.to(ax.dtype), self.lora_B, self.matvec_b)
        # alpha = 1 (the default) would be one more op per layer and token, and graph node.
        return out + (lora if self.scaling == 1.0 else lora * self.scaling)

    @torch.no_grad()
    def update_balance_bias(self) -> None:
        """Auxiliary-loss-free balancing: raise the bias of under-used ranks, lower the rest."""
        self.balance_bias += self.bias_update_rate * _balance_step(self.rank_load)
        self.rank_load.zero_()

    def freeze_base(self) -> None:
        """Adapter fine-tuning: only lora_B keeps requires_grad."""
        self.weight.requires_grad_(False)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"topk={self.topk}")


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
        """(cos, sin) [B,1,S,D] for position_ids [B,S]: looked up once per forward."""
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


class Attention(nn.Module):
    def __init__(self, cfg: VesperConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.o_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, past: tuple[torch.Tensor, torch.Tensor] | None,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [B,S,D]; ``rope`` the (cos, sin) table of these positions (RotaryEmbedding.table)."""
        q, k, v = self.project_qkv(x, rope)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)
            v = torch.cat((past[1], v), dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(x.shape)
        return self.o_proj(y), (k, v)

    def project_qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (rotated) and v, each [B,H,S,Dh]."""
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = RotaryEmbedding.rotate(qkv[:2], rope).unbind(0)  # q and k in one rotation
        return q, k, qkv[2]


class GLUFeedForward(nn.Module):
    """down(ERA(gate(x)) * up(x)), gate and up as FlyLoRA layers.

    Decoding on the CPU, in ONNX graphs and on a GPU (``TorchBackend(pair_ffn=...)``),
    the gate and up FlyLoRA layers run as one stacked pair (:func:`paired_ffn_weights`,
    :meth:`paired`): one product for both base outputs and both A x, one top-k over
    [2, r], one product with the k chosen rows of each B, where there were two of each
    and a mask over all r rows.
    """

    # The pair's decode product (vesper_sdk.matvec.attach), for a few rows on the CPU.
    pair: PairProduct | None = None

    def __init__(self, cfg: VesperConfig) -> None:
        super().__init__()
        d, f = cfg.hidden_size, cfg.ffn_hidden_size
        if cfg.flylora_rank:
            def make(i: int, o: int) -> nn.Module:
                return FlyLoRALinear(i, o, cfg.flylora_rank, cfg.flylora_topk,
                                     cfg.flylora_alpha, cfg.flylora_a_nnz,
                                     cfg.flylora_bias_update_rate)
        else:
            def make(i: int, o: int) -> nn.Module:
                return Linear(i, o, bias=False)
        self.gate, self.up = make(d, f), make(d, f)
        self.down = Linear(f, d, bias=False)
        self.act = ERA(cfg.era_gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pair is not None and self.pair.applies(x):
            base, ax = self.pair(x)
            return self.paired(base, ax, *self.pair.tables)
        return self.down(self.act(self.gate(x)) * self.up(x))

    def paired(self, base: torch.Tensor, ax: torch.Tensor, balance_bias: torch.Tensor,
               lora_B: torch.Tensor, row_offset: torch.Tensor) -> torch.Tensor:
        """The output from the stacked pair's products (see :func:`paired_ffn_weights`).

        base [..., 2F] (gate's then up's base output), ax [..., 2r] (both A x),
        balance_bias [2, r], lora_B [2r, F] (both B transposed, stacked), row_offset
        [[0], [r]] (where up's rows start in it). The same math as the two layers, with
        the chosen rows of B gathered rather than the others masked to zero (compiled,
        masked after all: ranks by :func:`top_k_by_counting`, one batched product).
        """
        g = self.gate
        ax = ax.unflatten(-1, (2, g.rank))
        score = ax.abs() + balance_bias
        if _count_top_k():  # compiled: a mask and the whole of each B, no sort kernels
            mask = top_k_by_counting(score, g.topk)
            lora = torch.matmul((ax * mask).unsqueeze(-2), lora_B.view(2, g.rank, -1))
        else:
            idx = score.topk(g.topk, dim=-1).indices  # [..., 2, k]
            rows = F.embedding(idx + row_offset, lora_B)  # [..., 2, k, F]
            lora = torch.matmul(ax.gather(-1, idx).unsqueeze(-2), rows)
        lora = lora.flatten(-3)  # [..., 2, 1, F] -> [..., 2F]
        h = base + (lora if g.scaling == 1.0 else lora * g.scaling)
        gate, up = h.split(g.out_features, dim=-1)
        return self.down(self.act(gate) * up)


def paired_ffn_weights(ffn: nn.Module) -> dict[str, torch.Tensor] | None:
    """A GLU feed-forward's gate and up FlyLoRA layers stacked as one pair: base weight
    [2F, in], A [2r, in], balance bias [2, r], B transposed with the two stacked as rows
    [2r, F] (fresh tensors); None when the module is not such a feed-forward (plain
    layers, MoE, bitsandbytes). :meth:`GLUFeedForward.paired` computes with them."""
    if not isinstance(ffn, GLUFeedForward):
        return None
    g, u = ffn.gate, ffn.up
    if not (isinstance(g, FlyLoRALinear) and isinstance(u, FlyLoRALinear)
            # a bitsandbytes layer keeps its base weight in a quantized module instead
            and isinstance(getattr(g, "weight", None), torch.Tensor)
            and isinstance(getattr(u, "weight", None), torch.Tensor)
            and (g.rank, g.topk, g.scaling) == (u.rank, u.topk, u.scaling)):
        return None
    with torch.no_grad():
        return {"weight": torch.cat([g.weight, u.weight]),
                "lora_A": torch.cat([g.lora_A, u.lora_A]),
                "balance_bias": torch.stack([g.balance_bias, u.balance_bias]),
                "lora_B": torch.cat([g.lora_B.t(), u.lora_B.t()]).contiguous()}


class MoEFeedForward(nn.Module):
    """Top-k routed GLU experts with the Switch Transformer load-balancing loss."""

    def __init__(self, cfg: VesperConfig) -> None:
        super().__init__()
        self.top_k, self.num_experts = cfg.moe_top_k, cfg.num_experts
        self.router = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(GLUFeedForward(cfg) for _ in range(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).float().softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        # Switch loss: num_experts * sum_e(fraction routed to e * mean router prob of e).
        frac = F.one_hot(chosen, self.num_experts).float().sum(1).mean(0) / self.top_k
        aux = self.num_experts * (frac * probs.mean(0)).sum()
        return out.view(shape), aux


class Block(nn.Module):
    def __init__(self, cfg: VesperConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.ffn = MoEFeedForward(cfg) if cfg.num_experts else GLUFeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, past):
        a, present = self.attn(self.attn_norm(x), rope, mask, past)
        x = x + self.drop(a)
        h = self.ffn(self.ffn_norm(x))
        if isinstance(h, tuple):
            h, aux = h
        else:
            aux = x.new_zeros((), dtype=torch.float32)
        return x + self.drop(h), present, aux


N_LOGIT_FEATURES = 3


def logit_features(logits: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """What the LM's own distribution says about its top-1, [..., V] -> [..., 3], no grad.

    The top-1 log-probability, the top-1 minus top-2 logit margin and the entropy: the
    max-softmax baseline is the first of them, so the MetaHead starts from it and learns
    what the hidden state adds. Eagerly, rows go ``chunk_rows`` at a time, so a training
    batch never holds more than that many fp32 rows of softmax temporaries.
    """
    with torch.no_grad():
        flat = logits.reshape(-1, logits.shape[-1])
        tracing = torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
        if tracing or flat.shape[0] <= chunk_rows:
            out = _logit_features(flat)
        else:
            out = torch.cat([_logit_features(flat[i:i + chunk_rows])
                             for i in range(0, flat.shape[0], chunk_rows)])
        return out.view(*logits.shape[:-1], 3)


def _logit_features(logits: torch.Tensor) -> torch.Tensor:
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    if torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export():
        # topk's values by two max-reductions the compiler fuses with the others over the
        # vocabulary (topk is a separate radix-select); a repeated maximum is its own
        # runner-up, as with topk.
        first = z.amax(-1)
        is_first = z == first.unsqueeze(-1)
        runner_up = torch.where(is_first, float("-inf"), z).amax(-1)
        second = torch.where(is_first.sum(-1) > 1, first, runner_up)
    else:
        top2 = z.topk(2, dim=-1).values
        first, second = top2[..., 0], top2[..., 1]
    entropy = lse - (z.softmax(-1) * z).sum(-1)
    return torch.stack((first - lse, first - second, entropy), -1)


class MetaHead(nn.Module):
    """Per-token self-assessment from the final hidden state and the LM's own logits.

    Five logits: confidence (is my top-1 right?), stop (does the response end here?),
    and a 3-way error class (right / label in my top-5 / miss). ``calibration`` holds
    (scale, bias) applied to the confidence logit (Platt scaling); (1, 0) leaves it as
    is. After training, the confidence row of ``out`` is refitted on held-out tokens
    (:func:`vesper_sdk.metacog.fit_confidence`, which folds the scaling into the row).
    """

    def __init__(self, cfg: VesperConfig) -> None:
        super().__init__()
        self.use_logits = cfg.metahead_logit_features
        extra = N_LOGIT_FEATURES if self.use_logits else 0
        self.fc = Linear(cfg.hidden_size + extra, cfg.metahead_hidden_size)
        self.out = Linear(cfg.metahead_hidden_size, 5)
        self.register_buffer("calibration", torch.tensor([1.0, 0.0]))

    def forward(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.out(self.activations(h, logits))

    def activations(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """What the output layer reads (the hidden layer), e.g. to refit the confidence
        row on held-out tokens (:func:`vesper_sdk.metacog.fit_confidence`)."""
        if self.use_logits:
            h = torch.cat((h, logit_features(logits).to(h.dtype)), dim=-1)
        return F.gelu(self.fc(h))

    def confidence(self, meta: torch.Tensor) -> torch.Tensor:
        """Calibrated probability that the top-1 is right, from the raw meta logits."""
        scale, bias = self.calibration.to(meta.dtype).unbind()
        return torch.sigmoid(meta[..., 0] * scale + bias)


# ----------------------------------------------------------------------------- model
class VesperLM(nn.Module):
    """The VesperLM decoder-only language model with its MetaHead."""

    head_matvec: SplitMatVec | None = None  # see vesper_sdk.matvec

    def __init__(self, config: VesperConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        if not config.tie_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.metahead = MetaHead(config)
        self.gradient_checkpointing = config.gradient_checkpointing
        self.reset_parameters()

    # --- init ----------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual outputs scaled by 1/sqrt(2 * layers)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("lora_B"):
                p.zero_()  # LoRA convention: the branch starts as a no-op
            elif p.dim() >= 2:
                scale = (2 * self.config.num_layers) ** -0.5 if name.endswith(
                    ("o_proj.weight", "down.weight")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()

    # --- helpers -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flylora_layers(self) -> list[FlyLoRALinear]:
        return [m for m in self.modules() if isinstance(m, FlyLoRALinear)]

    @torch.no_grad()
    def update_flylora_balance(self) -> None:
        """Apply the gradient-free load-balancing update to every FlyLoRA layer (per step).

        Layers of one rank and rate (all of them, in a model built from one config) go
        together: a handful of operations per step instead of several per layer.
        """
        groups: dict[tuple, list[FlyLoRALinear]] = {}
        for m in self.flylora_layers():
            key = (m.rank, m.bias_update_rate, m.rank_load.device, m.rank_load.dtype)
            groups.setdefault(key, []).append(m)
        for (_, rate, _, _), layers in groups.items():
            loads = [m.rank_load for m in layers]
            steps = _balance_step(torch.stack(loads)).unbind(0)
            torch._foreach_add_([m.balance_bias for m in layers], steps, alpha=rate)
            torch._foreach_zero_(loads)

    def freeze_base(self) -> None:
        """Freeze everything but the FlyLoRA up-projections and the MetaHead."""
        for name, p in self.named_parameters():
            p.requires_grad_(name.endswith("lora_B") or name.startswith("metahead."))

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    @staticmethod
    def position_ids_from_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Positions that skip left padding: cumsum of the mask minus one, last seq_len."""
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.clamp(min=0)[:, -seq_len:]

    # --- forward -------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                position_ids: torch.Tensor | None = None) -> VesperOutput:
        """Run the model.

        input_ids [B,S]; attention_mask [B, past+S] (1 = real token, 0 = padding; left
        padding for batched generation); past_key_values from a previous call with
        ``use_cache=True``; position_ids [B,S] default from the mask (or past length).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        total = past_len + s
        if total > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {total} tokens exceeds max_seq_len={self.config.max_seq_len}: "
                "shorten the prompt or max_new_tokens")
        if attention_mask is not None and attention_mask.shape != (b, total):
            raise ValueError(
                f"attention_mask must be [batch, past+seq] = {(b, total)}, got "
                f"{tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = self.position_ids_from_mask(attention_mask, s)
            else:
                position_ids = torch.arange(past_len, total, device=input_ids.device).expand(b, s)

        mask = None
        if attention_mask is not None or past_len:
            # Boolean [B,1,S,T]: key j visible to query i if j is real and not in the future.
            # Built by broadcasting [S,T] against [B,1,1,T]: no unsqueeze or expand beyond
            # what the shapes need (each one is a node in an exported graph).
            q_pos = torch.arange(past_len, total, device=input_ids.device)[:, None]
            k_pos = torch.arange(total, device=input_ids.device)
            allowed = k_pos <= q_pos
            if attention_mask is not None:
                # A padded query sees only itself, so no softmax row is empty (NaN).
                mask = (allowed & attention_mask.bool()[:, None, None, :]) | (k_pos == q_pos)
            else:
                mask = allowed.expand(b, 1, s, total)

        x = self.embed(input_ids)
        rope = self.rope.table(position_ids, x.dtype)
        presents: list[tuple[torch.Tensor, torch.Tensor]] = []
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.blocks):
            past = past_key_values[i] if past_key_values else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, present, aux = checkpoint(block, x, rope, mask, past,
                                             use_reentrant=False)
            else:
                x, present, aux = block(x, rope, mask, past)
            aux_loss = aux_loss + aux
            if use_cache:
                presents.append(present)
        h = self.norm(x)
        logits, meta = self.heads(h)
        if self.config.num_experts:
            aux_loss = aux_loss * self.config.moe_aux_loss_coef
        return VesperOutput(
            logits=logits,
            confidence=self.metahead.confidence(meta),
            stop=torch.sigmoid(meta[..., 1]),
            error_logits=meta[..., 2:5],
            aux_loss=aux_loss,
            past_key_values=tuple(presents) if use_cache else None,
            hidden_states=h,
            meta_logits=meta,
        )

    def heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [..., V], raw meta logits [..., 5] in fp32) from the final hidden state."""
        if self.config.tie_embeddings:
            logits = project(h, self.embed.weight, self.head_matvec)
        else:
            logits = self.lm_head(h)
        meta_in = h if self.config.metahead_grad_to_trunk else h.detach()
        return logits, self.metahead(meta_in, logits).float()

    # --- the model folder ----------------------------------------------------------
    def save_pretrained(self, directory: str | Path, extra_files: dict[str, Path] | None = None,
                        ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``directory``, atomically.

        The folder is assembled beside its final place and renamed into it, so a crash
        never leaves a half-written model; files already in the folder that we do not
        write (a tokenizer.json, say) are kept. ``extra_files`` maps names to files to
        copy in as part of the same atomic write.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        files: dict[str, bytes | Path] = {CONFIG_NAME: self.config.to_json().encode()}

        def write(tmp: Path) -> None:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})

        return atomic_write_folder(directory, files, writer=write, extra_files=extra_files)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        ) -> VesperLM:
        """Load a model folder written by ``save_pretrained`` (or ``vesper train``)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelFolderError(
                f"{directory} is not a folder: pass the model folder that holds "
                f"{CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            config = VesperConfig.from_file(directory / CONFIG_NAME)
        except FileNotFoundError as exc:
            raise ModelFolderError(str(exc)) from None
        except (ConfigError, TypeError) as exc:
            raise ModelFolderError(f"{directory / CONFIG_NAME}: {exc}") from None
        quant = json.loads((directory / CONFIG_NAME).read_text()).get("quantization")
        if quant:
            raise ModelFolderError(
                f"{directory} holds a {quant.get('method')}-quantized model: load it with "
                "vesper_sdk.load(dir), which rebuilds the quantized layers")
        model = cls(config)
        state = load_weights(directory / WEIGHTS_NAME, map_location)
        load_state_checked(model, state, directory / WEIGHTS_NAME)
        return model.to(map_location)


# ----------------------------------------------------------------------------- files
def load_weights(path: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning any damage into an error that names the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelFolderError(
            f"{path} is missing: the model folder has config.json but no weights; "
            "re-save the model (model.save_pretrained) or point at the right folder")
    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ModelFolderError(
            f"{path} is damaged or truncated ({exc}); restore it from a checkpoint or "
            "re-save the model") from None


# The MetaHead's Platt calibration, identity for models trained before it existed.
LEGACY_DEFAULTS = {"metahead.calibration": torch.tensor([1.0, 0.0])}


def load_state_checked(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """load_state_dict with an error that lists what is missing, extra or mis-shaped."""
    own = model.state_dict()
    for key, value in LEGACY_DEFAULTS.items():
        # Buffers added after a folder was written take their do-nothing value.
        if key in own and key not in state:
            state[key] = value.clone()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
        if extra:
            parts.append(f"{len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {'; '.join(shapes[:3])}")
        raise ModelFolderError(
            f"{path} does not match {path.parent / CONFIG_NAME}: " + "; ".join(parts)
            + ". The weights were saved from a different config; use the config.json "
            "that came with them")
    model.load_state_dict(state, strict=True)
