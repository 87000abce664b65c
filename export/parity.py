"""Whether an exported graph computes what the model does: ONNX Runtime against PyTorch.

:func:`check_parity` runs both on the same padded batch (prefill, then greedy decode
steps) and returns the differences; :func:`judge` says whether they are within the
bounds for the export's precision. ``export_onnx`` runs both before it renames a
folder into place.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..model import VesperLM


class ExportError(ValueError):
    """An export request cannot be carried out, or the exported graph failed its check."""


FP32_TOLERANCE = 1e-4
# Bounds for quantized graphs, against fp32 PyTorch on the same tokens:
#  rel_err  = max over steps of ||logits_onnx - logits_torch|| / ||logits_torch||
#  top1_gap = max over positions of (torch max logit - torch logit of ONNX's top-1),
#             in units of the torch logits' std: 0 when the top-1 agrees, small when ONNX
#             picked a near-tie. Robust on random-weight models whose logits are flat.
# int4's rel_err: a random-weight 'small' model (decode_peers') measures 0.35 with block 32,
# its activations rounded to int8 inside MatMulNBits; a broken graph measures 1 or more.
# int8's: the bundled model measures 0.05 to 0.15 over this check's seeds (activations
# quantized per tensor at run time), so a bound of 0.10 passed or failed by the seed.
QUANT_BOUNDS = {"int8": {"rel_err": 0.20, "top1_gap": 1.0},
                "int4": {"rel_err": 0.40, "top1_gap": 2.0}}
def _run(session: Any, names_in: list[str], ids: torch.Tensor, mask: torch.Tensor,
         pos: torch.Tensor, past: list[np.ndarray]) -> list[np.ndarray]:
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
            "position_ids": pos.numpy()}
    feed.update(zip(names_in[3:], past, strict=True))
    return session.run(None, feed)


@torch.no_grad()
def check_parity(session: Any, model: VesperLM, use_cache: bool = True, steps: int = 6,
                 seed: int = 0, in_place: bool = False) -> dict[str, float]:
    """Compare ONNX Runtime with PyTorch on random prompts: prefill, then ``steps`` decodes.

    Batch 2 with padding (prompts of 9 and 5 tokens; on the left, or for an ``in_place``
    graph on the right, each row's new token at its own length); the decode tokens are
    PyTorch's greedy choices, fed to both, so errors do not compound. Returns
    ``max_abs`` (logits, every position), ``max_abs_meta`` (confidence, stop and the
    answer logit), ``rel_err``
    and ``top1_gap`` (see QUANT_BOUNDS) and ``top1_agree`` over real positions. A graph's
    ``logsumexp`` output must be that of its own logits (the decoding loop takes a token's
    log-probability from it), and its ``top_logprob`` their top-1 log-probability.
    """
    cfg = model.config
    # The graph's outputs before the cache's: logits, confidence, stop, answer[, logsumexp,
    # top_logprob].
    n_heads = sum(not o.name.startswith("present.") for o in session.get_outputs())
    gen = torch.Generator().manual_seed(seed)
    lens = [min(9, cfg.max_seq_len - steps), min(5, cfg.max_seq_len - steps)]
    s = max(lens)
    ids = torch.randint(0, cfg.vocab_size, (2, s), generator=gen)
    mask = torch.ones(2, s, dtype=torch.long)
    pads = slice(lens[1], None) if in_place else slice(None, s - lens[1])
    mask[1, pads] = 0
    ids[1, pads] = cfg.pad_token_id
    pos = model.position_ids_from_mask(mask, s)
    n_real = mask.sum(-1)
    names_in = [i.name for i in session.get_inputs()]
    empty = [np.zeros((2, cfg.num_heads, 0, cfg.head_dim), np.float32)
             for _ in names_in[3:]]
    stats = {"max_abs": 0.0, "max_abs_meta": 0.0, "rel_err": 0.0, "top1_gap": 0.0}
    agree, total = 0, 0
    ref = model(ids, attention_mask=mask, position_ids=pos, use_cache=True)
    got = _run(session, names_in, ids, mask, pos, empty)
    all_ids, all_pos = ids, pos
    real = mask.bool()
    for step in range(steps + 1):
        r_logits = ref.logits.float()
        g_logits = torch.from_numpy(got[0])
        new = r_logits.shape[1]  # a --no-cache graph returns the whole sequence
        g_logits = g_logits[:, -new:]
        got_conf = [torch.from_numpy(g)[:, -new:] for g in got[1:4]]
        if n_heads > 4:
            lse = torch.from_numpy(got[4])[:, -new:]
            own = torch.logsumexp(g_logits.double(), -1).float()
            if not (lse - own).abs().max() <= 1e-3 * max(1.0, own.abs().max().item()):
                raise ExportError("the ONNX graph's logsumexp output is not its logits' "
                                  f"(off by {(lse - own).abs().max().item():.3g})")
        if n_heads > 5:
            top = torch.from_numpy(got[5])[:, -new:]
            own = g_logits.double().max(-1).values.float() - lse
            if not (top - own).abs().max() <= 1e-3 * max(1.0, own.abs().max().item()):
                raise ExportError("the ONNX graph's top_logprob output is not its logits' "
                                  f"top-1 log-probability (off by "
                                  f"{(top - own).abs().max().item():.3g})")
        if not torch.isfinite(g_logits).all() or not all(torch.isfinite(c).all()
                                                          for c in got_conf):
            raise ExportError("the ONNX graph produced NaN/inf outputs")
        # Every position, padding too; only real ones where padding is on the right (the
        # in-place graph's padded queries attend causally, PyTorch's only to themselves).
        at = real if in_place else torch.ones_like(real)
        stats["max_abs"] = max(stats["max_abs"], (g_logits - r_logits)[at].abs().max().item())
        stats["max_abs_meta"] = max(
            stats["max_abs_meta"], *((g - r)[at].abs().max().item() for g, r in zip(
                got_conf, (ref.confidence, ref.stop, ref.answer), strict=True)))
        r, g = r_logits[real], g_logits[real]  # real (non-padding) positions only
        stats["rel_err"] = max(stats["rel_err"], ((g - r).norm() / r.norm()).item())
        pick = g.argmax(-1)
        gap = (r.max(-1).values - r.gather(-1, pick[:, None])[:, 0]) / r.std(-1)
        stats["top1_gap"] = max(stats["top1_gap"], gap.max().item())
        agree += int((pick == r.argmax(-1)).sum())
        total += pick.numel()
        if step == steps:
            break
        last = (n_real - 1) if step == 0 and in_place else torch.full((2,), -1)
        nxt = r_logits[torch.arange(2), last].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        pos, n_real = n_real[:, None], n_real + 1
        real = torch.ones(2, 1, dtype=torch.bool)
        pkv = ref.past_key_values
        ref = model(nxt, attention_mask=mask, position_ids=pos, past_key_values=pkv,
                    use_cache=True)
        if use_cache:
            ragged = (torch.arange(mask.shape[1]) < n_real[:, None]).long()
            got = _run(session, names_in, nxt, ragged if in_place else mask, pos,
                       got[n_heads:])
        else:
            all_ids = torch.cat([all_ids, nxt], 1)
            all_pos = torch.cat([all_pos, pos], 1)
            got = _run(session, names_in, all_ids, mask, all_pos, [])
    stats["top1_agree"] = agree / max(total, 1)
    return stats


def judge(stats: dict[str, float], quantize: str | None) -> str | None:
    """None when the figures are within bounds, else what failed."""
    if quantize is None:
        if not stats["max_abs"] <= FP32_TOLERANCE:
            return (f"max |logits difference| {stats['max_abs']:.3g} > {FP32_TOLERANCE:g}")
        return None
    bounds = QUANT_BOUNDS[quantize]
    bad = [f"{k} {stats[k]:.3g} > {v:g}" for k, v in bounds.items() if not stats[k] <= v]
    return "; ".join(bad) or None
