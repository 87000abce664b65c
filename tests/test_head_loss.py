"""The chunked training head (vesper_sdk.model.head_loss) against the plain full-logits
path: the same loss, statistics, MetaHead targets and gradients."""

from __future__ import annotations

import pytest
import torch

import vesper_sdk as vs
from vesper_sdk.model.head_loss import chunk_rows_for, head_loss
from vesper_sdk.model.metahead import metahead_loss


def _model(tie: bool, vocab: int = 300) -> vs.VesperLM:
    torch.manual_seed(0)
    cfg = vs.VesperConfig.from_preset("tiny", vocab_size=vocab, num_layers=2,
                                      tie_embeddings=tie)
    model = vs.VesperLM(cfg)
    with torch.no_grad():  # a trained-looking FlyLoRA branch, so every part has a gradient
        for layer in model.flylora_layers():
            layer.lora_B.normal_(0, 0.02)
    return model.train()


def _step(model: vs.VesperLM, x, y, m):
    model.zero_grad(set_to_none=True)
    out = model(x, labels=y, loss_mask=m)
    meta = metahead_loss(out, y, m, model.config.eos_token_id, normalizer=1.0,
                         targets=out.loss.targets)
    (out.loss.lm_loss_sum + 0.5 * meta).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("rows", [1, 7, 0], ids=["one-row", "seven-rows", "default"])
def test_chunked_head_gives_the_full_logits_loss_targets_and_gradients(tie, rows):
    model = _model(tie)
    torch.manual_seed(1)
    x = torch.randint(3, 300, (3, 20))
    y = torch.randint(3, 300, (3, 20))
    y[0, 5] = model.config.eos_token_id  # a stop target
    m = torch.rand(3, 20) > 0.25
    plain, g_plain = _step(model, x, y, m)
    model.set_chunked_loss(True, rows)
    chunked, g_chunked = _step(model, x, y, m)
    assert plain.logits is not None and chunked.logits is None  # never materialised
    torch.testing.assert_close(chunked.loss.lm_loss_sum, plain.loss.lm_loss_sum)
    torch.testing.assert_close(chunked.meta_logits, plain.meta_logits)
    torch.testing.assert_close(chunked.logsumexp, plain.logsumexp)
    for name in ("correct", "stop", "error_class"):
        assert torch.equal(getattr(chunked.loss.targets, name),
                           getattr(plain.loss.targets, name)), name
    assert plain.loss.targets.stop.any() and not plain.loss.targets.correct.all()
    assert g_plain.keys() == g_chunked.keys() and "embed.weight" in g_plain
    for name, g in g_plain.items():  # fp32 sums in another order: to its rounding
        torch.testing.assert_close(g_chunked[name], g, rtol=1e-4,
                                   atol=1e-5 * float(g.abs().max()), msg=name)


def test_chunked_head_under_bf16_autocast_stays_within_bf16_of_the_plain_path():
    model = _model(True)
    x, y = torch.randint(3, 300, (2, 16)), torch.randint(3, 300, (2, 16))
    m = torch.ones(2, 16, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, g_plain = _step(model, x, y, m)
        model.set_chunked_loss(True, 5)
        chunked, g_chunked = _step(model, x, y, m)
    torch.testing.assert_close(chunked.loss.lm_loss_sum, plain.loss.lm_loss_sum,
                               rtol=1e-2, atol=0)
    for name, g in g_plain.items():
        rel = (g_chunked[name].float() - g.float()).norm() / g.float().norm().clamp(min=1e-12)
        assert rel < 0.05, (name, float(rel))


def test_head_loss_without_grad_computes_no_gradient_and_the_same_loss():
    torch.manual_seed(0)
    h, w = torch.randn(9, 8), torch.randn(40, 8)
    y, m = torch.randint(0, 40, (9,)), torch.ones(9, dtype=torch.bool)
    with torch.no_grad():
        a = head_loss(h, w, y, m, eos_id=2, chunk_rows=4)
    b = head_loss(h.requires_grad_(), w, y, m, eos_id=2, chunk_rows=4)
    assert not a.lm_loss_sum.requires_grad and b.lm_loss_sum.requires_grad
    torch.testing.assert_close(a.lm_loss_sum, b.lm_loss_sum)
    torch.testing.assert_close(a.statistics, b.statistics)


def test_head_loss_names_mismatched_shapes():
    h, w = torch.randn(2, 5, 8), torch.randn(40, 8)
    with pytest.raises(ValueError, match="leading dimensions"):
        head_loss(h, w, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool),
                  eos_id=2)


def test_default_chunk_keeps_a_chunks_fp32_logits_under_the_budget_in_whole_tiles():
    rows = chunk_rows_for(32000)
    assert rows % 64 == 0 and rows * 32000 * 4 <= 128 * 2**20 < (rows + 64) * 32000 * 4
    assert chunk_rows_for(2**20) == 32 and chunk_rows_for(10**9) == 1


def test_forward_names_labels_of_the_wrong_shape():
    model = _model(True)
    x = torch.randint(3, 300, (2, 8))
    with pytest.raises(ValueError, match=r"must be \[batch, seq\] = \(2, 8\)"):
        model(x, labels=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="loss_mask"):
        model(x, labels=torch.zeros(2, 8, dtype=torch.long),
              loss_mask=torch.ones(2, 7, dtype=torch.bool))
