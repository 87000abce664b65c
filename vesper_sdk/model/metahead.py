"""The MetaHead: per-token confidence, stop and error class from the final hidden state
and three statistics of the LM's own next-token distribution; and the answer row, which
reads every block's output for the answer-level confidence."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VesperConfig

N_LOGIT_FEATURES = 3
# The first feature is the top-1 log-probability: a greedy token's own log-probability.
TOP1_LOGPROB = 0
# :func:`logit_statistics` holds the features, then the log-sum-exp of the logits (what a
# token's log-probability needs, computed on the way to the features).
LOGSUMEXP = N_LOGIT_FEATURES
N_LOGIT_STATISTICS = N_LOGIT_FEATURES + 1
# The MetaHead's six raw outputs, named once: meta[..., CONFIDENCE] is the confidence logit
# (is my top-1 right?), meta[..., STOP] the stop logit, meta[..., ERROR] the 3-way error
# class logits (right / near miss: the label in my top 5 / miss), meta[..., ANSWER] the
# answer logit (pooled over an answer's tokens by :func:`answer_confidence`).
CONFIDENCE, STOP, ERROR, ANSWER = 0, 1, slice(2, 5), 5
N_TOKEN_META = 5  # the rows of ``MetaHead.out``
N_META = 6
# Block sizes :func:`top_two` may cut a vocabulary into, the largest that divides it first.
TOP_TWO_BLOCKS = (64, 32, 16)


def logit_features(logits: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """What the LM's own distribution says about its top-1, [..., V] -> [..., 3], no grad.

    The top-1 log-probability, the top-1 minus top-2 logit margin and the entropy: the
    max-softmax baseline is the first of them, so the MetaHead starts from it and learns
    what the hidden state adds. Eagerly, rows go ``chunk_rows`` at a time, so a training
    batch never holds more than that many fp32 rows of softmax temporaries.
    """
    return logit_statistics(logits, chunk_rows)[..., :N_LOGIT_FEATURES]


def logit_statistics(logits: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """:func:`logit_features` and, at ``[..., LOGSUMEXP]``, the logits' log-sum-exp (fp32,
    no grad): [..., V] -> [..., 4]."""
    if torch.onnx.is_in_onnx_export():
        # One operator the export translates (vesper_sdk.export.lowering), this function's
        # own math in PyTorch; on [B, S, V] logits, as the translation takes them.
        if logits.dim() == 3:
            return torch.ops.vesper.logit_features(logits)
        flat = logits.reshape(1, -1, logits.shape[-1])
        return torch.ops.vesper.logit_features(flat).view(*logits.shape[:-1],
                                                          N_LOGIT_STATISTICS)
    with torch.no_grad():
        flat = logits.reshape(-1, logits.shape[-1])
        tracing = torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
        if tracing or flat.shape[0] <= chunk_rows:
            out = _logit_features(flat)
        else:
            out = torch.cat([_logit_features(flat[i:i + chunk_rows])
                             for i in range(0, flat.shape[0], chunk_rows)])
        return out.view(*logits.shape[:-1], N_LOGIT_STATISTICS)


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
        first, second = top_two(z)
    entropy = lse - (z.softmax(-1) * z).sum(-1)
    return logit_features_from_top2(first, second, entropy, lse)


def top_two_block(vocab_size: int) -> int:
    """The block size :func:`top_two` cuts a vocabulary of this size into; 0 where none of
    :data:`TOP_TWO_BLOCKS` divides it into two blocks or more (one top-k then)."""
    return next((b for b in TOP_TWO_BLOCKS if vocab_size % b == 0 and vocab_size >= 2 * b), 0)


def top_two(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest and the second-largest value along the last axis, as ``z.topk(2)``
    gives them (a repeated maximum is its own runner-up).

    On a CPU, from block maxima (:func:`top_two_block`): the runner-up is the
    second-largest block's maximum or the second value in the largest one's block. One
    max-reduction and two small top-k where one top-k over the whole vocabulary takes
    several times as long (the ONNX export translates the same steps). Elsewhere one
    top-k (a GPU's was not measured against the blocks).
    """
    block = top_two_block(z.shape[-1]) if z.device.type == "cpu" else 0
    if not block:
        top = z.topk(2, dim=-1).values
        return top[..., 0], top[..., 1]
    blocks = z.unflatten(-1, (-1, block))
    top = blocks.amax(-1).topk(2, dim=-1)
    where = top.indices[..., :1, None].expand(*blocks.shape[:-2], 1, block)
    inner = blocks.gather(-2, where).squeeze(-2).topk(2, dim=-1).values
    return top.values[..., 0], torch.maximum(top.values[..., 1], inner[..., 1])


def logit_features_from_top2(first: torch.Tensor, second: torch.Tensor, entropy: torch.Tensor,
                             lse: torch.Tensor) -> torch.Tensor:
    """The statistics [..., 4] from the top two logits, the entropy and the log-sum-exp
    (shared with the chunked training head, :mod:`.head_loss`)."""
    return torch.stack((first - lse, first - second, entropy, lse), -1)


@torch.library.custom_op("vesper::logit_features", mutates_args=())
def logit_features_op(logits: torch.Tensor) -> torch.Tensor:
    """:func:`logit_statistics` as one operator [..., V] -> [..., 4] (what the export
    sees)."""
    flat = logits.reshape(-1, logits.shape[-1])
    return _logit_features(flat).view(*logits.shape[:-1], N_LOGIT_STATISTICS)


@logit_features_op.register_fake
def _(logits: torch.Tensor) -> torch.Tensor:
    return logits.new_empty((*logits.shape[:-1], N_LOGIT_STATISTICS), dtype=torch.float32)


class MetaHead(nn.Module):
    """Per-token self-assessment from the final hidden state and the LM's own logits.

    Six logits: confidence (is my top-1 right?), stop (does the response end here?), a
    3-way error class (right / label in my top-5 / miss), and the answer logit. The
    first five come from a hidden layer over the final hidden state and the logit
    features. ``calibration`` holds (scale, bias) applied to the confidence logit (Platt
    scaling); (1, 0) leaves it as is. After training, the confidence row of ``out`` is
    refitted on held-out tokens (:func:`vesper_sdk.eval.metrics.fit_confidence`, which
    folds the scaling into the row).

    The answer row (``answer``) is linear in every block's output (the residual stream
    after it), the logit features and the calibrated confidence logit: intermediate
    layers know whether an answer is right better than the final one says. An answer's
    confidence is the sigmoid of its tokens' mean answer logit (:func:`answer_confidence`),
    so the row is fitted on whole answers, graded (:mod:`vesper_sdk.training.calibration`);
    until then it passes the confidence logit through. Where calibration finds that a
    small MLP over the same inputs ranks answers better, the answer logit is the row plus
    ``answer_mlp`` (``metahead_answer_hidden`` units; absent at 0), pooled the same way.
    Where calibration also fits an answer check (``config.metahead_answer_check``), the
    pooling reads the tokens' confidence beside the answer logit
    (:func:`answer_confidence_from_sum`); the forward is the same.
    """

    def __init__(self, cfg: VesperConfig) -> None:
        super().__init__()
        self.use_logits = cfg.metahead_logit_features
        extra = N_LOGIT_FEATURES if self.use_logits else 0
        self.fc = nn.Linear(cfg.hidden_size + extra, cfg.metahead_hidden_size)
        self.out = nn.Linear(cfg.metahead_hidden_size, N_TOKEN_META)
        # Its random init is undone by reset_answer, and drawn from a forked generator:
        # the same seed gives the same model as before the row existed.
        with torch.random.fork_rng(devices=[]):
            self.answer = nn.Linear(cfg.num_layers * cfg.hidden_size + extra + 1, 1)
        # Fitted on graded answers after training, never by the training loss (DDP needs
        # every trainable parameter to get a gradient).
        self.answer.requires_grad_(False)
        self.register_module("answer_mlp", None)
        self.set_answer_mlp(cfg.metahead_answer_hidden)
        self.register_buffer("calibration", torch.tensor([1.0, 0.0]))
        self.reset_answer()

    def set_answer_mlp(self, hidden: int) -> None:
        """Give the answer logit an MLP term of ``hidden`` units (0 removes it), zeroed:
        until fitted it adds nothing. Use ``VesperLM.set_answer_mlp``, which keeps the
        config in step."""
        if hidden <= 0:
            self.answer_mlp = None
            return
        like = self.answer.weight
        with torch.random.fork_rng(devices=[]):  # zeroed below: the draw is not used
            mlp = nn.Sequential(nn.Linear(self.answer.in_features, hidden), nn.GELU(),
                                nn.Linear(hidden, 1)).to(device=like.device, dtype=like.dtype)
        mlp.requires_grad_(False)  # fitted by calibration, like the row
        for p in mlp.parameters():
            p.detach().zero_()
        self.answer_mlp = mlp

    @torch.no_grad()
    def reset_answer(self) -> None:
        """The unfitted answer row: the calibrated confidence logit, nothing else (the
        answer MLP, where there is one, zeroed)."""
        self.answer.weight.zero_()
        self.answer.weight[0, -1] = 1.0
        self.answer.bias.zero_()
        for p in self.answer_mlp.parameters() if self.answer_mlp is not None else ():
            p.zero_()

    def forward(self, h: torch.Tensor, logits: torch.Tensor,
                block_outputs: list[torch.Tensor] | None,
                statistics: torch.Tensor | None = None) -> torch.Tensor:
        """Raw meta logits [..., 6] from the final hidden state, the logits and the
        blocks' outputs (no gradient reaches the blocks through the answer row); [..., 5],
        the token rows alone, when ``block_outputs`` is None. ``statistics``: the logits'
        :func:`logit_statistics` when the caller has them already."""
        features = None
        if self.use_logits:
            if statistics is None:
                statistics = logit_statistics(logits)
            features = statistics[..., :N_LOGIT_FEATURES].to(h.dtype)
        token = self.out(self._hidden(h, features))
        if block_outputs is None:
            return token
        scale, bias = self.calibration.to(token.dtype).unbind()
        confidence_logit = token[..., CONFIDENCE:CONFIDENCE + 1] * scale + bias
        reads = [x.detach().to(h.dtype) for x in block_outputs]
        if features is not None:
            reads.append(features)
        x = torch.cat([*reads, confidence_logit.to(h.dtype)], dim=-1)
        return torch.cat((token, self.answer_logit(x).to(token.dtype)), dim=-1)

    def answer_logit(self, reads: torch.Tensor) -> torch.Tensor:
        """The answer logit [..., 1] from what the answer row reads [..., R]: the row, plus
        the answer MLP where there is one."""
        answer = self.answer(reads)
        return answer if self.answer_mlp is None else answer + self.answer_mlp(reads)

    def activations(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """What the output layer reads (the hidden layer), e.g. to refit the confidence
        row on held-out tokens (:func:`vesper_sdk.eval.metrics.fit_confidence`)."""
        return self._hidden(h, logit_features(logits).to(h.dtype) if self.use_logits else None)

    def _hidden(self, h: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        if features is not None:
            h = torch.cat((h, features), dim=-1)
        return F.gelu(self.fc(h))

    def confidence(self, meta: torch.Tensor) -> torch.Tensor:
        """Calibrated probability that the top-1 is right, from the raw meta logits."""
        scale, bias = self.calibration.to(meta.dtype).unbind()
        return torch.sigmoid(meta[..., CONFIDENCE] * scale + bias)


# A token's confidence read back as a logit is clamped here: fp32's sigmoid saturates
# near 1 - 6e-8, and every path (the engine's running sums, evaluation, calibration's fit)
# must read the same value from the same token.
_CONFIDENCE_CLAMP = 1e-7


def confidence_logit(confidence: float) -> float:
    """A token's confidence (a probability) as the logit the answer check pools."""
    p = min(max(float(confidence), _CONFIDENCE_CLAMP), 1.0 - _CONFIDENCE_CLAMP)
    return math.log(p / (1.0 - p))


def confidence_logits(confidence: torch.Tensor) -> torch.Tensor:
    """:func:`confidence_logit` of each of a tensor's confidences (float64)."""
    p = confidence.double().clamp(_CONFIDENCE_CLAMP, 1.0 - _CONFIDENCE_CLAMP)
    return torch.log(p / (1.0 - p))


def answer_confidence(answer_logits: torch.Tensor | Sequence[float],
                      confidences: torch.Tensor | Sequence[float] | None = None,
                      check: Sequence[float] = ()) -> float:
    """An answer's confidence (probability that it is right) from its tokens' answer
    logits (``meta[..., ANSWER]`` at the positions that chose them): the sigmoid of
    their mean. The mean keeps the row linear in pooled features, which is how it is
    fitted; an empty answer has confidence 0.5.

    With a ``check`` (``config.metahead_answer_check``, fitted by ``vesper calibrate``:
    four numbers), the tokens' ``confidences`` (the MetaHead's token confidence) are
    pooled too, and the answer is trusted only as far as both agree: see
    :func:`answer_confidence_from_sum`.
    """
    values = (answer_logits.tolist() if isinstance(answer_logits, torch.Tensor)
              else list(answer_logits))
    total = 0.0
    if check:
        if confidences is None:
            raise ValueError("this model's answer confidence checks the tokens' confidences: "
                             "pass them (Token.confidence) beside the answer logits")
        conf = confidences.tolist() if isinstance(confidences, torch.Tensor) else confidences
        if len(conf) != len(values):
            raise ValueError(f"{len(values)} answer logits but {len(conf)} confidences")
        total = sum(confidence_logit(c) for c in conf)
    return answer_confidence_from_sum(float(sum(values)), len(values), total, check)


def answer_confidence_from_sum(total: float, n: int, confidence_total: float = 0.0,
                               check: Sequence[float] = ()) -> float:
    """:func:`answer_confidence` from the sum of ``n`` answer logits (a running sum) and,
    with a ``check``, the sum of the same tokens' :func:`confidence_logit`.

    The check ``(a, b, scale, shift)`` makes the answer's confidence
    ``sigmoid(scale * softmin(A, a * C + b) + shift)``, where ``A`` is the mean answer
    logit, ``C`` the tokens' mean confidence logit and ``softmin(x, y) = -log(e^-x +
    e^-y)``: the odds of the answer being wrong are the sum of what each signal says they
    are. The answer head reads the blocks' outputs and ranks familiar questions best; on
    questions unlike those it was fitted on it can be sure of a wrong answer while the
    token confidence is not, and the sum keeps the doubt of either.
    """
    if n == 0:
        return 0.5
    z = total / n
    if check:
        a, b, scale, shift = check
        c = a * confidence_total / n + b
        z = scale * (min(z, c) - math.log1p(math.exp(-abs(z - c)))) + shift
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


# ----------------------------------------------------------------------------- targets, loss
class MetaTargets:
    """Per-position MetaHead targets made from the LM's own logits."""

    __slots__ = ("correct", "error_class", "stop")

    def __init__(self, correct: torch.Tensor, stop: torch.Tensor,
                 error_class: torch.Tensor) -> None:
        self.correct = correct  # bool [B,S]: top-1 == label
        self.stop = stop  # bool [B,S]: label is <|eos|>
        self.error_class = error_class  # long [B,S]: 0 right, 1 label in top-5, 2 miss


@torch.no_grad()
def metahead_targets(logits: torch.Tensor, labels: torch.Tensor, eos_id: int) -> MetaTargets:
    """Confidence / stop / error-class targets from the logits and the labels.

    correct = (argmax == label); stop = (label == eos); error class 0 if top-1 is right,
    1 if the label is in the top-5, else 2.
    """
    k = min(5, logits.shape[-1])
    return metahead_targets_from_top(logits.detach().topk(k, dim=-1).indices, labels, eos_id)


def metahead_targets_from_top(top: torch.Tensor, labels: torch.Tensor,
                              eos_id: int) -> MetaTargets:
    """:func:`metahead_targets` from the indices of the top-5 logits [..., 5], highest
    first (shared with the chunked training head, :mod:`.head_loss`)."""
    correct = top[..., 0] == labels
    in_top = (top == labels.unsqueeze(-1)).any(-1)
    error_class = torch.where(correct, 0, torch.where(in_top, 1, 2))
    return MetaTargets(correct, labels == eos_id, error_class)


def metahead_loss(out, labels: torch.Tensor, mask: torch.Tensor, eos_id: int,
                  normalizer: float | torch.Tensor | None = None,
                  targets: MetaTargets | None = None) -> torch.Tensor:
    """MetaHead loss on the masked positions: BCE(confidence) + BCE(stop) + CE(error class).

    ``out`` is the model's ``VesperOutput`` (not annotated: importing it here would make
    an import cycle with ``vesper.py``); it reads ``out.logits`` and ``out.meta_logits``
    ([B,S,5]: conf, stop, err0..2). Returns the sum over masked positions divided by
    ``normalizer`` (default: their count, i.e. a mean).
    """
    t = targets if targets is not None else metahead_targets(out.logits, labels, eos_id)
    meta = out.meta_logits.float()
    m = mask.to(meta.dtype)
    conf = F.binary_cross_entropy_with_logits(meta[..., CONFIDENCE], t.correct.to(meta.dtype),
                                              reduction="none")
    stop = F.binary_cross_entropy_with_logits(meta[..., STOP], t.stop.to(meta.dtype),
                                              reduction="none")
    err = F.cross_entropy(meta[..., ERROR].reshape(-1, 3), t.error_class.reshape(-1),
                          reduction="none").view_as(m)
    total = ((conf + stop + err) * m).sum()
    if normalizer is None:
        normalizer = m.sum().clamp(min=1.0)
    return total / normalizer
