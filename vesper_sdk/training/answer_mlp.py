"""The MetaHead's answer MLP, fitted on graded answers.

It reads what the answer row reads (every block's output, the logit features, the
calibrated confidence logit) at every token of an answer, through one hidden layer; its
per-token outputs are averaged over the answer, as the row's are, so an answer's
confidence stays the sigmoid of its tokens' mean answer logit and the MLP runs inside the
one forward (``MetaHead.answer_mlp``). :mod:`.calibration` fits it beside the row and
keeps whichever ranks held-out questions better.

The recipe is fixed (nothing in it is tuned on the answers it is scored on), so its
cross-validation is honest: AdamW, input dropout, whole answers a batch, the loss on each
answer's pooled logit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AnswerMLPRecipe:
    """How the answer MLP is trained (``benchmarks/metahead_probe.py`` measures it)."""

    hidden: int = 64
    epochs: int = 40
    lr: float = 3e-3
    weight_decay: float = 0.3
    input_dropout: float = 0.2
    batch_answers: int = 512
    seed: int = 0


DEFAULT_RECIPE = AnswerMLPRecipe()


def stack(answers: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Answers' per-token inputs ``[T_i, R]`` as one ``[sum T_i, R]`` tensor, and each
    row's answer index."""
    lengths = torch.tensor([len(a) for a in answers])
    return torch.cat(list(answers)), torch.repeat_interleave(torch.arange(len(answers)),
                                                             lengths)


def pool(values: torch.Tensor, answer_of: torch.Tensor, n: int) -> torch.Tensor:
    """The mean of per-token ``values`` over each of ``n`` answers."""
    total = values.new_zeros(n).index_add_(0, answer_of, values)
    return total / torch.bincount(answer_of, minlength=n).clamp(min=1)


def fit_answer_mlp(answers: Sequence[torch.Tensor], correct: np.ndarray | Sequence[float],
                   recipe: AnswerMLPRecipe = DEFAULT_RECIPE,
                   device: torch.device | str = "cpu") -> nn.Sequential:
    """Fit an answer MLP on answers' per-token inputs (each ``[T_i, R]``, T_i >= 1) and
    whether each answer is right, training on ``device`` (a GPU makes a wide model's fit
    quick; the same recipe, not the same bits as on the CPU). Returns ``Linear(R, hidden),
    GELU, Linear(hidden, 1)`` over the raw inputs (the standardisation folded into the
    first layer), fp32, on the CPU, with no gradient; the caller's random state is left as
    it was."""
    x, answer_of = stack([a.float().cpu() for a in answers])
    target = torch.as_tensor(np.asarray(correct), dtype=torch.float32).reshape(-1)
    if len(target) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(target)} right/wrong labels")
    n = len(target)
    mu, sd = x.mean(0), x.std(0) + 1e-4
    dev = torch.device(device)
    x, answer_of, target = ((x - mu) / sd).to(dev), answer_of.to(dev), target.to(dev)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(recipe.seed)
        order = torch.Generator().manual_seed(recipe.seed)
        first, last = nn.Linear(x.shape[1], recipe.hidden), nn.Linear(recipe.hidden, 1)
        net = nn.Sequential(nn.Dropout(recipe.input_dropout), first, nn.GELU(), last).to(dev)
        opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr,
                                weight_decay=recipe.weight_decay)
        net.train()
        for _ in range(recipe.epochs):
            for batch in torch.randperm(n, generator=order).to(dev).split(
                    recipe.batch_answers):
                rows = torch.isin(answer_of, batch)
                local = torch.full((n,), -1, dtype=torch.long, device=dev)
                local[batch] = torch.arange(len(batch), device=dev)
                pooled = pool(net(x[rows]).squeeze(-1), local[answer_of[rows]], len(batch))
                loss = F.binary_cross_entropy_with_logits(pooled, target[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
    net.cpu()
    with torch.no_grad():  # first((x - mu) / sd) as one layer over x
        weight = first.weight / sd
        first.weight.copy_(weight)
        first.bias.sub_(weight @ mu)
    mlp = nn.Sequential(first, nn.GELU(), last)
    mlp.requires_grad_(False)
    return mlp.eval()


def answer_logits(mlp: nn.Module, answers: Sequence[torch.Tensor]) -> np.ndarray:
    """Each answer's pooled logit under ``mlp`` (the mean of its tokens' outputs)."""
    x, answer_of = stack([a.float().cpu() for a in answers])
    with torch.no_grad():
        return pool(mlp(x).squeeze(-1), answer_of, len(answers)).numpy()


__all__ = ["DEFAULT_RECIPE", "AnswerMLPRecipe", "answer_logits", "fit_answer_mlp", "pool", "stack"]
