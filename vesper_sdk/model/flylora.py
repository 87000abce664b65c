"""FlyLoRA (Zou et al., NeurIPS 2025, arXiv 2510.08396): a linear layer plus an implicit
rank-wise mixture of experts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _balance_step(load: torch.Tensor) -> torch.Tensor:
    """sign(mean load - load) per rank ([..., r]); zero where nothing was routed. No branch
    on the values, so on a GPU it never waits for them."""
    active = load.sum(-1, keepdim=True) > 0
    return torch.sign(load.mean(-1, keepdim=True) - load) * active


def _count_top_k() -> bool:
    """Whether to pick top-k ranks by :func:`top_k_by_counting` rather than ``topk``.

    Compiled, the counting is pointwise work that the compiler fuses into its
    neighbours, where topk (+ scatter) are separate sort kernels (a large share of a GPU
    decode step). Eagerly, and in an ONNX graph (one TopK node against a
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


def top_rank_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask [..., r] of the k highest ``score``s: by counting when compiled (see
    :func:`_count_top_k`), else by ``topk``."""
    if _count_top_k():
        return top_k_by_counting(score, k)
    idx = score.topk(k, dim=-1).indices
    return torch.zeros_like(score).scatter_(-1, idx, 1.0)


def flylora_branch(ax: torch.Tensor, balance_bias: torch.Tensor, lora_B_rows: torch.Tensor,
                   topk: int, scaling: float, row_offset: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FlyLoRA's low-rank branch of n layers at once, from their ``A x``: the one
    definition every path runs (a single layer, and a feed-forward's gate and up paired).

    ``ax`` [..., n, r]; ``balance_bias`` [n, r]; ``lora_B_rows`` [n * r, F]: each layer's
    B transposed, stacked (rank j of layer i is row i * r + j); ``row_offset`` [n, 1]:
    where each layer's rows start. Returns (the branch output [..., n, F], scaled; the 0/1
    mask [..., n, r] of the active ranks, or None when the chosen rows were gathered).

    The same maths three ways, by where it runs: given ``row_offset`` and not compiled
    (a decode step's few rows), the k chosen rows of each B are gathered (k / r of B read);
    otherwise the top-k mask multiplies A x and all of B (training, prefill; compiled, the
    mask is counted, which the compiler fuses, with no sort kernels).
    """
    n, r = ax.shape[-2], ax.shape[-1]
    score = ax.detach().abs().float() + balance_bias
    if row_offset is not None and not _count_top_k():
        idx = score.topk(topk, dim=-1).indices  # [..., n, k]
        rows = F.embedding(idx + row_offset, lora_B_rows)  # [..., n, k, F]
        out = torch.matmul(ax.gather(-1, idx).unsqueeze(-2), rows).squeeze(-2)
        mask = None
    else:
        mask = top_rank_mask(score, topk)
        masked = ax * mask.to(ax.dtype)
        if n == 1:  # one layer: one dense product (a batched one would be many tiny ones)
            out = F.linear(masked.squeeze(-2), lora_B_rows.t()).unsqueeze(-2)
        else:
            out = torch.matmul(masked.unsqueeze(-2), lora_B_rows.view(n, r, -1)).squeeze(-2)
    return (out if scaling == 1.0 else out * scaling), mask


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
        return ax, top_rank_mask(ax.detach().abs().float() + self.balance_bias, self.topk)

    def base_product(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output: the one part a quantized variant replaces."""
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_product(x)
        ax = F.linear(x, self.lora_A.to(x.dtype)).unsqueeze(-2)  # [..., 1, r]: one layer
        lora, mask = flylora_branch(ax, self.balance_bias, self.lora_B.t(), self.topk,
                                    self.scaling)
        if self.training and torch.is_grad_enabled() and mask is not None:
            with torch.no_grad():
                self.rank_load += mask.reshape(-1, self.rank).sum(0)
        return out + lora.squeeze(-2)

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
