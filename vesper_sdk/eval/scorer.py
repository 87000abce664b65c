"""The one teacher-forced scorer: per-token statistics of a model on encoded examples.

:func:`score_labels` is the scoring itself (log-probability of each label, whether the
top-1 prediction is the label, the top-1 probability), from logits; ``vesper eval``, the
trainer's validation, ``LLM.score`` and the quantization report all use it.
:func:`encode_examples` turns documents and chats into token ids plus a mask of the tokens
to score; :func:`score_tokens` runs them through a model (windows of at most ``seq_len``
tokens, left-padded batches) and returns, for every scored token, the negative
log-likelihood, top-1 correctness, the MetaHead's ``confidence`` and the maximum softmax
probability (:class:`TokenStats`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from .. import skills
from ..tokenizer import VesperTokenizer
from ..training.data import DataError, DataSource

if TYPE_CHECKING:  # the generation API imports this module: no runtime import back
    from ..inference import LLM

Example = tuple[list[int], list[int]]  # token ids, 0/1 mask of the tokens to score


class LabelScores(NamedTuple):
    """Per position: log-probability of the label, top-1 == label, top-1 probability."""

    logprob: torch.Tensor
    correct: torch.Tensor
    top1_prob: torch.Tensor


def score_labels(logits: torch.Tensor, labels: torch.Tensor) -> LabelScores:
    """Teacher-forced scores of ``labels`` [...] under ``logits`` [..., V] (in fp32)."""
    logp = logits.float().log_softmax(-1)
    top_lp, top = logp.max(-1)
    return LabelScores(logp.gather(-1, labels[..., None])[..., 0], top == labels, top_lp.exp())


def held_out_records(data: str, max_examples: int | None = None, seed: int = 0,
                     ) -> Iterator[str | list[dict]]:
    """The records to score: ``builtin:skills``' held-out chats (never trained on; the
    answer included) or the texts and chats of a .txt / .jsonl file or folder (read by
    ``DataSource``, the reader training uses), at most ``max_examples`` of them."""
    if data == "builtin:skills":
        for _task, messages, answer in skills.held_out_tasks(max_examples or 2000, seed):
            yield [*messages, {"role": "assistant", "content": answer}]
        return
    if data.startswith("builtin:"):
        raise DataError(f"unknown built-in data {data!r}: use builtin:skills or a file")
    if not Path(data).exists():
        raise DataError(f"{data}: no such file or folder; pass a .txt or .jsonl file of "
                        "held-out texts (or builtin:skills)")
    for i, record in enumerate(DataSource(data).records()):
        if max_examples is not None and i >= max_examples:
            return
        yield record


def encode_examples(tok: VesperTokenizer, records: Sequence[str | list[dict]],
                    ) -> list[Example]:
    """Token ids and score masks: text = BOS + text + EOS (all scored); chats = template,
    assistant turns scored (``encode_chat``'s loss mask, the tokens training learns)."""
    out: list[Example] = []
    for rec in records:
        if isinstance(rec, str):
            ids = tok.encode(rec, add_bos=True, add_eos=True)
            mask = [0] + [1] * (len(ids) - 1)
        else:
            enc = tok.encode_chat(rec)
            ids, mask = enc.ids, enc.loss_mask
        if len(ids) >= 2 and any(mask[1:]):
            out.append((ids, mask))
    return out


def windows(examples: Sequence[Example], seq_len: int,
             ) -> list[tuple[list[int], list[int], int]]:
    """(ids, score mask, index of the example) per window of at most ``seq_len`` tokens."""
    # Windows overlap by one token so that each token is predicted exactly once.
    out = []
    for doc, (ids, mask) in enumerate(examples):
        start = 0
        while True:
            w_ids, w_mask = ids[start:start + seq_len], mask[start:start + seq_len]
            if len(w_ids) >= 2:
                out.append((w_ids, [0] + w_mask[1:], doc))
            if start + seq_len >= len(ids):
                break
            start += seq_len - 1
    return out


def padded(rows: Sequence[Sequence[int]], fill: int, dtype: torch.dtype,
           left: bool = False) -> torch.Tensor:
    """Rows of different lengths as one [len(rows), longest] tensor, ``fill`` on the left
    (``left``) or on the right."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            span = slice(width - len(r), None) if left else slice(0, len(r))
            out[i, span] = torch.tensor(list(r), dtype=dtype)
    return out


@dataclass
class TokenStats:
    """Per scored token: NLL, top-1 correctness, MetaHead confidence, max softmax prob, and
    the example it belongs to (``doc``: tokens of one example are not independent)."""

    nll: np.ndarray
    correct: np.ndarray
    confidence: np.ndarray
    msp: np.ndarray
    doc: np.ndarray

    @property
    def n(self) -> int:
        """Number of scored tokens."""
        return int(self.nll.size)


def score_tokens(lm: LLM, examples: Sequence[Example], seq_len: int = 512,
                 batch_size: int = 8, max_tokens: int | None = None) -> TokenStats:
    """Teacher-forced statistics of every scored token, through ``lm.backend.forward``."""
    seq_len = max(2, min(seq_len, lm.max_seq_len))
    rows = sorted(windows(examples, seq_len), key=lambda w: len(w[0]))
    nll, correct, conf, msp, doc = [], [], [], [], []
    total = 0
    pad = lm.tokenizer.pad_id
    for i in range(0, len(rows), batch_size):
        if max_tokens is not None and total >= max_tokens:
            break
        batch = rows[i:i + batch_size]
        # Left padding, as in generation.
        ids = padded([w[0] for w in batch], pad, torch.long, left=True)
        attn = padded([[1] * len(w[0]) for w in batch], 0, torch.long, left=True)
        score = padded([w[1] for w in batch], 0, torch.bool, left=True)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = lm.backend.forward(ids.to(lm.device), attn.to(lm.device), pos.to(lm.device),
                                     None)
            target = ids[:, 1:]
            sel = score[:, 1:]
            # Scored where the logits are; only the [B,S] results come to the host.
            scores = score_labels(out.logits[:, :-1], target.to(out.logits.device))
            nll.append((-scores.logprob.cpu()[sel]).numpy())
            correct.append(scores.correct.cpu()[sel].numpy())
            conf.append(out.confidence[:, :-1].float().cpu()[sel].numpy())
            msp.append(scores.top1_prob.cpu()[sel].numpy())
            docs = torch.tensor([w[2] for w in batch])[:, None].expand_as(sel)
            doc.append(docs[sel].numpy())
        total += int(sel.sum())

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)

    stats = TokenStats(cat(nll), cat(correct), cat(conf), cat(msp), cat(doc).astype(np.int64))
    if max_tokens is not None and stats.n > max_tokens:
        stats = TokenStats(*(a[:max_tokens] for a in (stats.nll, stats.correct,
                                                      stats.confidence, stats.msp, stats.doc)))
    return stats
