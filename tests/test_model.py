"""VesperLM: shapes, KV cache, causality, padding, FlyLoRA, MoE, init, checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vesper_sdk as vs
from vesper_sdk.model import ANSWER, FlyLoRALinear, answer_confidence, logit_features
from vesper_sdk.model.flylora import flylora_branch, top_rank_mask


def small_config(**kw) -> vs.VesperConfig:
    base = dict(hidden_size=64, num_layers=3, num_heads=4, ffn_hidden_size=128,
                vocab_size=97, max_seq_len=128, flylora_rank=8, flylora_topk=3)
    base.update(kw)
    return vs.VesperConfig.from_preset("tiny", **base)


def randomize_lora(model: vs.VesperLM) -> None:
    # B starts at zero; give it values so the FlyLoRA branch actually matters in tests.
    with torch.no_grad():
        for m in model.flylora_layers():
            m.lora_B.normal_(0, 0.05)


@pytest.fixture
def model() -> vs.VesperLM:
    torch.manual_seed(0)
    m = vs.VesperLM(small_config()).eval()
    randomize_lora(m)
    return m


def test_forward_returns_every_output_with_documented_shapes(model):
    ids = torch.randint(0, 97, (2, 11))
    out = model(ids)
    assert out.logits.shape == (2, 11, 97)
    assert out.confidence.shape == out.stop.shape == (2, 11)
    assert out.error_logits.shape == (2, 11, 3)
    assert out.aux_loss.shape == ()
    assert out.past_key_values is None
    assert ((out.confidence > 0) & (out.confidence < 1)).all()
    assert ((out.stop > 0) & (out.stop < 1)).all()


def test_cached_decoding_matches_full_forward_over_many_steps(model):
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 40))
    full = model(ids)
    out = model(ids[:, :8], use_cache=True)
    steps = [out]
    past = out.past_key_values
    for t in range(8, 40):
        out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        steps.append(out)
    logits = torch.cat([s.logits for s in steps], dim=1)
    conf = torch.cat([s.confidence for s in steps], dim=1)
    assert (logits - full.logits).abs().max().item() <= 1e-5
    assert (conf - full.confidence).abs().max().item() <= 1e-5


def test_left_padded_batch_with_cache_matches_each_sequence_alone(model):
    torch.manual_seed(2)
    a = torch.randint(3, 97, (1, 12))
    b = torch.randint(3, 97, (1, 7))
    pad = 0
    batch = torch.cat([a, torch.cat([torch.full((1, 5), pad), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    out = model(batch[:, :-4], attention_mask=mask[:, :-4], use_cache=True)
    past, steps = out.past_key_values, [out.logits]
    for t in range(batch.shape[1] - 4, batch.shape[1]):
        out = model(batch[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=past,
                    use_cache=True)
        past = out.past_key_values
        steps.append(out.logits)
    logits = torch.cat(steps, dim=1)
    alone_a = model(a).logits
    alone_b = model(b).logits
    assert (logits[0] - alone_a[0]).abs().max().item() <= 1e-5
    assert (logits[1, 5:] - alone_b[0]).abs().max().item() <= 1e-5
    assert torch.isfinite(logits).all()  # padded rows never produce NaN


def test_changing_a_future_token_never_changes_an_earlier_output(model):
    torch.manual_seed(3)
    ids = torch.randint(0, 97, (1, 24))
    base = model(ids)
    for pos in (5, 13, 23):
        changed = ids.clone()
        changed[0, pos] = (changed[0, pos] + 1) % 97
        out = model(changed)
        assert torch.equal(out.logits[0, :pos], base.logits[0, :pos])
        assert torch.equal(out.confidence[0, :pos], base.confidence[0, :pos])
        assert not torch.equal(out.logits[0, pos], base.logits[0, pos])


def test_sequence_longer_than_context_is_rejected_with_the_limit_named(model):
    with pytest.raises(ValueError, match="max_seq_len=128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        model(torch.zeros(5, dtype=torch.long))


def test_flylora_rank_choice_under_torch_compile_equals_topk_including_ties():
    # Compiled, the top-k ranks come from counting (it fuses); they must be topk's.
    torch.manual_seed(5)
    layer = FlyLoRALinear(32, 48, rank=12, topk=5)
    with torch.no_grad():
        layer.balance_bias.copy_(torch.randn(12) * 0.01)
    ax = torch.randn(4, 9, 12)

    def top_ranks(ax: torch.Tensor) -> torch.Tensor:
        return top_rank_mask(ax.abs() + layer.balance_bias, layer.topk)

    compiled = torch.compile(top_ranks, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(ax), top_ranks(ax))
    # All-equal scores (zero input, zero bias): still exactly k, the lowest indices.
    with torch.no_grad():
        layer.balance_bias.zero_()
    tied = compiled(torch.zeros(2, 12))  # counted (compiled) vs topk (eager): the same
    assert torch.equal(tied.sum(-1), torch.full((2,), 5.0))
    assert torch.equal(tied[0, :5], torch.ones(5))


def test_logit_features_under_torch_compile_equal_the_topk_ones_including_ties():
    from vesper_sdk.model.metahead import _logit_features

    torch.manual_seed(8)
    z = torch.randn(3, 5, 50)
    z[0, 0, 7] = z[0, 0, 9] = z[0, 0].max() + 1  # a repeated maximum: margin 0
    z[1, 2, :] = 0.25  # all equal
    compiled = torch.compile(_logit_features, backend="aot_eager", fullgraph=True)
    got, want = compiled(z), _logit_features(z)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got[0, 0, 1] == 0 and got[1, 2, 1] == 0


def test_flylora_activates_exactly_k_of_r_ranks_per_token():
    torch.manual_seed(4)
    layer = FlyLoRALinear(32, 48, rank=12, topk=5)
    x = torch.randn(3, 7, 32)
    _, mask = layer.rank_mask(x)
    assert mask.shape == (3, 7, 12)
    assert torch.equal(mask.sum(-1), torch.full((3, 7), 5.0))
    # Only the active ranks reach the output: zeroing an inactive rank's column of B
    # changes nothing, zeroing an active one does.
    with torch.no_grad():
        layer.lora_B.normal_()
    x1 = x[0, 0]
    active = mask[0, 0].nonzero().flatten()
    inactive = (mask[0, 0] == 0).nonzero().flatten()
    y = layer(x1)
    with torch.no_grad():
        layer.lora_B[:, inactive[0]] = 0
    assert torch.allclose(layer(x1), y)
    with torch.no_grad():
        layer.lora_B[:, active[0]] = 0
    assert not torch.allclose(layer(x1), y)


def test_flylora_A_is_frozen_sparse_and_only_B_trains():
    torch.manual_seed(5)
    layer = FlyLoRALinear(40, 24, rank=8, topk=2, a_nnz=4)
    assert (layer.lora_A != 0).sum(1).tolist() == [4] * 8  # sparse rows
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"weight", "lora_B"}  # A is a buffer, not a parameter
    with torch.no_grad():  # a base output for B's gradient to follow (VesperLM draws it)
        layer.weight.normal_(0, 0.1)
    a0, b0 = layer.lora_A.clone(), layer.lora_B.clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(16, 40)).pow(2).mean().backward()
        opt.step()
    assert torch.equal(layer.lora_A, a0)
    assert not torch.equal(layer.lora_B, b0)


def test_flylora_balance_bias_moves_towards_underused_ranks():
    torch.manual_seed(6)
    layer = FlyLoRALinear(16, 16, rank=6, topk=2, bias_update_rate=0.1).train()
    with torch.no_grad():
        layer.lora_A.zero_()
        layer.lora_A[0, 0] = 10.0  # rank 0 dominates |Ax|
    x = torch.randn(64, 16)
    x[:, 0] = x[:, 0].abs() + 1
    layer(x).sum().backward()
    load = layer.rank_load.clone()
    assert load[0] == 64  # rank 0 chosen for every token
    layer.update_balance_bias()
    assert layer.balance_bias[0] < 0 < layer.balance_bias[1:].max()
    assert layer.rank_load.sum() == 0  # the statistic is reset after each update
    assert "balance_bias" in layer.state_dict()


def test_model_wide_balance_update_equals_each_layer_updating_itself(model):
    import copy

    torch.manual_seed(7)
    layers = model.flylora_layers()
    assert len(layers) >= 2
    with torch.no_grad():
        for i, m in enumerate(layers):
            m.balance_bias.normal_(0, 0.01)
            # Layer 1 saw no tokens this step: its bias must not move.
            m.rank_load.copy_(torch.zeros(m.rank) if i == 1 else torch.randint(0, 9, (m.rank,)))
    before = [m.balance_bias.clone() for m in layers]
    other = copy.deepcopy(model)
    model.update_flylora_balance()
    for m in other.flylora_layers():
        m.update_balance_bias()
    for a, b in zip(layers, other.flylora_layers(), strict=True):
        assert torch.equal(a.balance_bias, b.balance_bias)
        assert a.rank_load.sum() == 0 == b.rank_load.sum()
    assert torch.equal(layers[1].balance_bias, before[1])
    assert not torch.equal(layers[0].balance_bias, before[0])


def test_freeze_base_leaves_only_lora_B_and_metahead_trainable(model):
    model.freeze_base()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(n.endswith("lora_B") or n.startswith("metahead.") for n in trainable)
    assert model.num_parameters(trainable_only=True) < model.num_parameters() / 5


def test_moe_routes_top_k_and_returns_a_balancing_loss():
    torch.manual_seed(7)
    m = vs.VesperLM(small_config(num_experts=4, moe_top_k=2)).train()
    out = m(torch.randint(0, 97, (2, 16)))
    assert out.aux_loss.item() > 0
    (out.logits.mean() + out.aux_loss).backward()
    router_grad = m.blocks[0].ffn.router.weight.grad
    assert router_grad is not None and router_grad.abs().sum() > 0
    assert m.num_parameters() == m.config.num_parameters()


def test_metahead_does_not_push_gradients_into_the_trunk_by_default():
    torch.manual_seed(8)
    m = vs.VesperLM(small_config())
    m(torch.randint(0, 97, (1, 9))).confidence.sum().backward()
    assert m.metahead.fc.weight.grad is not None
    assert m.embed.weight.grad is None or m.embed.weight.grad.abs().sum() == 0
    m2 = vs.VesperLM(small_config(metahead_grad_to_trunk=True))
    m2(torch.randint(0, 97, (1, 9))).confidence.sum().backward()
    assert m2.embed.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(9)
    ids = torch.randint(0, 97, (2, 16))
    m = vs.VesperLM(small_config()).train()
    randomize_lora(m)
    m(ids).logits.logsumexp(-1).mean().backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    m.set_gradient_checkpointing(True)
    m(ids).logits.logsumexp(-1).mean().backward()
    for n, p in m.named_parameters():
        if n in g:
            assert torch.allclose(p.grad, g[n], atol=1e-6), n


def test_init_is_sound_loss_starts_near_log_vocab():
    torch.manual_seed(10)
    m = vs.VesperLM(small_config(vocab_size=500)).eval()
    ids = torch.randint(0, 500, (4, 32))
    logits = m(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 500),
                                             ids[:, 1:].reshape(-1))
    assert abs(loss.item() - torch.log(torch.tensor(500.0)).item()) < 0.5
    assert all(m.flylora_layers()[i].lora_B.abs().sum() == 0 for i in range(2))


def test_tied_embeddings_share_one_tensor_untied_have_a_head():
    m = vs.VesperLM(small_config())
    assert "lm_head.weight" not in m.state_dict()
    m2 = vs.VesperLM(small_config(tie_embeddings=False))
    assert "lm_head.weight" in m2.state_dict()
    assert m2.num_parameters() == m2.config.num_parameters()


def test_metahead_logit_features_are_the_distributions_own_statistics():
    from vesper_sdk.model import logit_features

    torch.manual_seed(0)
    logits = torch.randn(2, 300, 40) * 3
    feats = logit_features(logits, chunk_rows=64)  # chunked: the same as in one pass
    torch.testing.assert_close(feats, logit_features(logits, chunk_rows=10_000))
    logp = logits.log_softmax(-1)
    top2 = logits.topk(2, -1).values
    torch.testing.assert_close(feats[..., 0], logp.max(-1).values)  # max-softmax, in logs
    torch.testing.assert_close(feats[..., 1], top2[..., 0] - top2[..., 1])
    torch.testing.assert_close(feats[..., 2], -(logp.exp() * logp).sum(-1), rtol=1e-4,
                               atol=1e-5)


def test_metahead_calibration_scales_the_confidence_logit_only():
    cfg = vs.VesperConfig.from_preset("tiny", vocab_size=64, hidden_size=32, num_layers=1,
                                      num_heads=2, ffn_hidden_size=64, max_seq_len=32)
    model = vs.VesperLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        before = model(ids)
        model.metahead.calibration.copy_(torch.tensor([0.5, -1.0]))
        after = model(ids)
    token_rows = slice(0, ANSWER)
    torch.testing.assert_close(after.meta_logits[..., token_rows],
                               before.meta_logits[..., token_rows])
    calibrated = 0.5 * before.meta_logits[..., 0] - 1.0
    torch.testing.assert_close(after.confidence, torch.sigmoid(calibrated))
    torch.testing.assert_close(after.stop, before.stop)
    # The unfitted answer row passes the calibrated confidence logit through.
    torch.testing.assert_close(after.answer, calibrated)


def test_answer_row_reads_every_block_output_and_pools_by_the_mean():
    torch.manual_seed(0)
    cfg = vs.VesperConfig.from_preset("tiny", vocab_size=64, hidden_size=32, num_layers=2,
                                      num_heads=2, ffn_hidden_size=64, max_seq_len=32)
    model = vs.VesperLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out[0]))
             for b in model.blocks]
    head = model.metahead
    with torch.no_grad():
        head.answer.weight.normal_()
        head.answer.bias.fill_(0.3)
        out = model(ids)
    for h in hooks:
        h.remove()
    reads = torch.cat([*outputs, logit_features(out.logits),
                       out.meta_logits[..., :1]], -1)
    expected = reads @ head.answer.weight[0] + 0.3
    torch.testing.assert_close(out.answer, expected, rtol=1e-4, atol=1e-4)
    # Trained by nothing: no gradient, so DDP never waits for one.
    assert not any(p.requires_grad for p in head.answer.parameters())
    model.freeze_base()
    assert not any(p.requires_grad for p in head.answer.parameters())
    assert answer_confidence(torch.tensor([0.0, 2.0])) == pytest.approx(
        1 / (1 + math.exp(-1.0)))
    assert answer_confidence([]) == 0.5
    with torch.device("meta"):  # built where the rest of the model is
        assert vs.VesperLM(cfg).metahead.answer.weight.is_meta


def test_an_answer_mlp_adds_to_the_row_and_saves_with_its_config(tmp_path):
    """Calibration can give the answer logit an MLP over what the row reads: zeroed it
    changes nothing, fitted it adds its output to the row's, no training step reaches
    it, and the folder it is saved to builds it again (an older folder builds none)."""
    torch.manual_seed(0)
    cfg = vs.VesperConfig.from_preset("tiny", vocab_size=64, hidden_size=32, num_layers=2,
                                      num_heads=2, ffn_hidden_size=64, max_seq_len=32)
    model = vs.VesperLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 8))
    head = model.metahead
    reads: list[torch.Tensor] = []
    head.answer.register_forward_hook(lambda _m, inputs, _o: reads.append(inputs[0]))
    with torch.no_grad():
        head.answer.weight.normal_()
        row_only = model(ids).answer
        model.set_answer_mlp(16)
        assert model.config.metahead_answer_hidden == 16
        torch.testing.assert_close(model(ids).answer, row_only)  # zeroed: nothing added
        for p in head.answer_mlp.parameters():
            p.normal_()
        out = model(ids)
    torch.testing.assert_close(out.answer, row_only + head.answer_mlp(reads[-1])[..., 0])
    assert not any(p.requires_grad for p in head.answer_mlp.parameters())
    model.freeze_base()
    assert not any(p.requires_grad for p in head.answer_mlp.parameters())
    assert model.num_parameters() == model.config.num_parameters()
    model.save_pretrained(tmp_path / "m")
    loaded = vs.VesperLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.metahead_answer_hidden == 16
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).answer, out.answer)
        model.set_answer_mlp(0)
        assert model.metahead.answer_mlp is None
        torch.testing.assert_close(model(ids).answer, row_only)
    # A config.json written before the field: no MLP.
    import json
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    del data["metahead_answer_hidden"]
    assert vs.VesperConfig.from_dict(data).metahead_answer_hidden == 0


def test_a_training_step_skips_the_answer_row_and_keeps_loss_and_gradients():
    """No loss reads the answer row, so a training step (train mode, grad on) leaves it
    out; everything the losses read is what the full forward gives."""
    torch.manual_seed(0)
    cfg = vs.VesperConfig.from_preset("tiny", vocab_size=64, hidden_size=32, num_layers=2,
                                      num_heads=2, ffn_hidden_size=64, max_seq_len=32)
    model = vs.VesperLM(cfg).train()
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        model.metahead.answer.weight.normal_()  # a fitted row: not the pass-through

    def step():
        model.zero_grad()
        out = model(ids)
        loss = (F.cross_entropy(out.logits.flatten(0, 1), ids.flatten())
                + out.meta_logits[..., :ANSWER].square().mean() + out.confidence.mean())
        loss.backward()
        return out, loss, {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}

    out, loss, grads = step()
    assert out.answer is None and out.meta_logits.shape[-1] == ANSWER
    # The same step with the row computed (eval mode: the same maths here, no dropout;
    # the FlyLoRA balance update waits for the optimizer step).
    model.eval()
    full, full_loss, full_grads = step()
    assert full.answer is not None and full.meta_logits.shape[-1] == ANSWER + 1
    torch.testing.assert_close(full_loss, loss)
    assert full_grads.keys() == grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(full_grads[name], g, msg=name)
    with torch.no_grad():  # train mode without grad (validation) computes it
        assert model.train()(ids).answer is not None


def test_folders_from_before_the_logit_features_still_load(tmp_path):
    cfg = vs.VesperConfig.from_preset("tiny", vocab_size=64, hidden_size=32, num_layers=1,
                                      num_heads=2, ffn_hidden_size=64, max_seq_len=32,
                                      metahead_logit_features=False)
    model = vs.VesperLM(cfg)
    model.save_pretrained(tmp_path)
    # What an older vesper-sdk wrote: no logit-features field, no calibration buffer.
    import json

    from safetensors.torch import load_file, save_file
    data = json.loads((tmp_path / "config.json").read_text())
    del data["metahead_logit_features"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    state = load_file(str(tmp_path / "model.safetensors"))
    for key in ("metahead.calibration", "metahead.answer.weight", "metahead.answer.bias"):
        del state[key]  # nor the answer row
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "manifest.json").unlink()  # nor a manifest
    loaded = vs.VesperLM.from_pretrained(tmp_path)
    assert loaded.config.metahead_logit_features is False
    assert loaded.metahead.calibration.tolist() == [1.0, 0.0]
    with torch.no_grad():
        out = loaded(torch.randint(0, 64, (1, 5)))
    torch.testing.assert_close(out.answer, out.meta_logits[..., 0])  # passed through


def test_the_flylora_branch_gathered_equals_masked() -> None:
    """One definition, three routes: the gathered rows (decode) and the masked product
    (training, prefill) give the same branch, for one layer and for a stacked pair."""
    torch.manual_seed(3)
    n, r, k, f = 2, 12, 4, 40
    ax = torch.randn(5, n, r)
    bias = torch.randn(n, r) * 0.01
    rows = torch.randn(n * r, f)
    offset = torch.tensor([[0], [r]])
    gathered, none = flylora_branch(ax, bias, rows, k, 0.5, offset)
    masked, mask = flylora_branch(ax, bias, rows, k, 0.5)
    assert none is None and torch.equal(mask.sum(-1), torch.full((5, n), float(k)))
    assert torch.allclose(gathered, masked, atol=1e-5)
    single, _ = flylora_branch(ax[:, :1], bias[:1], rows[:r], k, 0.5)
    assert torch.allclose(single, masked[:, :1], atol=1e-5)
