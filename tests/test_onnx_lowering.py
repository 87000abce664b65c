"""The export's lowering (vesper_sdk.export.lowering): the fused-op attention variant computes
what the model's attention computes, the model is put back after the export, and the ONNX
translations of softplus / logsumexp match torch where their naive forms overflow."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

import vesper_sdk as vs
from vesper_sdk.export.lowering import (
    LoweredFeedForward,
    lowered,
    translation_table,
)
from vesper_sdk.export.onnx_export import export_onnx
from vesper_sdk.export.runner import make_session
from vesper_sdk.model import Attention, MetaHead, RotaryEmbedding, logit_features
from vesper_sdk.model.metahead import _logit_features, top_two, top_two_block


@pytest.fixture(scope="module")
def model() -> vs.VesperLM:
    torch.manual_seed(3)
    cfg = vs.VesperConfig.from_preset("tiny", hidden_size=64, num_layers=2, num_heads=4,
                                      ffn_hidden_size=128, vocab_size=97, max_seq_len=64)
    model = vs.VesperLM(cfg).eval()
    _as_if_trained(model)
    return model


def _as_if_trained(model: vs.VesperLM) -> None:
    """FlyLoRA B starts at zero and the balance bias at zero: give both values, so the
    lowered FFN's chosen ranks and gathered rows of B matter; and a fitted Platt scaling,
    so the lowered MetaHead's confidence must apply it too."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, t in model.named_buffers():
            if name.endswith("balance_bias"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.05)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        model.metahead.calibration.copy_(torch.tensor([1.3, -0.2]))


def _steps(model: vs.VesperLM, with_mask: bool) -> list[torch.Tensor]:
    """Logits and caches of a left-padded prefill and two decode steps."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=gen)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    out = model(ids, attention_mask=mask if with_mask else None, use_cache=True)
    got = [out.logits, *[t for kv in out.past_key_values for t in kv]]
    for _ in range(2):
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = model(nxt, attention_mask=mask if with_mask else None,
                    past_key_values=out.past_key_values, use_cache=True)
        got += [out.logits, out.confidence, *out.past_key_values[-1]]
    return got


@pytest.mark.parametrize("with_mask", [True, False], ids=["left-padded", "causal-only"])
def test_lowered_attention_computes_what_the_model_attention_computes(model, with_mask):
    with torch.no_grad():
        ref = _steps(model, with_mask)
        with lowered(model, opset=23):
            assert all(b.attn.impl == "onnx" for b in model.blocks)  # the registry's variant
            assert all(isinstance(b.ffn, LoweredFeedForward) for b in model.blocks)
            got = _steps(model, with_mask)
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert g.shape == r.shape
        assert (g - r).abs().max() <= 1e-5


def test_model_is_put_back_after_lowering_even_when_the_export_fails(model):
    originals = [(b.attn, b.ffn) for b in model.blocks]
    with pytest.raises(RuntimeError, match="export failed"), lowered(model, opset=23):
        raise RuntimeError("export failed")
    assert [(b.attn, b.ffn) for b in model.blocks] == originals
    assert all(type(b.attn) is Attention and b.attn.impl == "sdpa" for b in model.blocks)
    assert type(model.metahead) is MetaHead and type(model.rope) is RotaryEmbedding
    with lowered(model, opset=21):  # no fused attention below opset 23; the FFN pairs
        assert all(b.attn.impl == "sdpa" for b in model.blocks)
        assert all(isinstance(b.ffn, LoweredFeedForward) for b in model.blocks)
    assert [(b.attn, b.ffn) for b in model.blocks] == originals


def test_without_the_fused_operators_the_export_keeps_the_plain_ones(model, monkeypatch,
                                                                     tmp_path, tiny_model_dir):
    # An ONNX Runtime (or onnxscript) without opset 23's Attention/RotaryEmbedding: the
    # model is not lowered, the table has no fused ops, and the export still checks out.
    from vesper_sdk.export import lowering

    monkeypatch.setattr(lowering, "_runtime_runs_fused_ops", lambda: False)
    assert not lowering.fused_attention(23)
    with lowered(model, opset=23):
        assert all(b.attn.impl == "sdpa" for b in model.blocks)
        assert all(isinstance(b.ffn, LoweredFeedForward) for b in model.blocks)
    assert torch.ops.vesper.rotary.default not in translation_table(23)
    model_dir = tiny_model_dir
    out = export_onnx(model_dir, tmp_path / "plain", verbose=False)
    graph = onnx.load(str(out / "model.onnx")).graph
    assert not {n.op_type for n in graph.node} & {"RotaryEmbedding"}
    info = json.loads((out / "config.json").read_text())["onnx"]
    assert info["opset"] == 23 and info["fused_attention"] is False


class _Pointwise(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.softplus(x), F.softplus(x, beta=2.0), torch.logsumexp(x, dim=-1)


@pytest.mark.parametrize("opset", [18, 23])
def test_softplus_and_logsumexp_translations_match_torch_at_extremes(opset, tmp_path):
    # exp(100) overflows fp32: the translations must not form it.
    x = torch.tensor([[-100.0, -20.5, -3.0, -1e-4, 0.0, 1e-4, 3.0, 19.9, 20.5, 100.0],
                      [88.0, 90.0, -90.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    program = torch.onnx.export(_Pointwise().eval(), (x,), dynamo=True, opset_version=opset,
                                custom_translation_table=translation_table(opset),
                                verbose=False)
    path = tmp_path / "pointwise.onnx"
    program.save(str(path))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"Softplus", "ReduceLogSumExp"}
    got = make_session(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    for g, r in zip(got, _Pointwise()(x), strict=True):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, r.numpy(), rtol=1e-6, atol=1e-6)


def test_opset_23_graph_uses_the_fused_operators_and_older_opsets_do_not(tmp_path,
                                                                          tiny_model_dir):
    model_dir = tiny_model_dir
    counts = {}
    for opset in (23, 18):
        out = export_onnx(model_dir, tmp_path / f"o{opset}", opset=opset, verbose=False)
        graph = onnx.load(str(out / "model.onnx")).graph
        counts[opset] = collections.Counter(n.op_type for n in graph.node)
        attention = [n for n in graph.node if n.op_type == "Attention"]
        info = json.loads((out / "config.json").read_text())["onnx"]
        assert info["fused_attention"] is (opset == 23)
        if opset == 23:
            # Two rotations and one attention per layer, the cache inside the attention
            # (past key/value in, present out): no Concat left on a past input.
            assert counts[23]["RotaryEmbedding"] == 2 * 2 and len(attention) == 2
            assert all(n.input[4].startswith("past_key_values.") for n in attention)
            assert all(n.output[1].startswith("present.") for n in attention)
            assert not any(n.op_type == "Concat" and n.input[0].startswith("past_key_values.")
                           for n in graph.node)
        else:
            assert counts[18]["RotaryEmbedding"] == 0 and not attention
        # FlyLoRA's top-k in the graph, one TopK per gate/up pair (+1: the MetaHead's top-2),
        # the chosen ranks gathered (GatherElements), not the others scattered to zero.
        assert counts[opset]["TopK"] == 2 + 1 and counts[opset]["GatherElements"] == 2
        assert counts[opset]["ScatterElements"] == 0
        # Each residual Add and the norm after it are one ONNX Runtime operator (export.fusions)
        # where the graph has opset 23's RMSNormalization; only the first norm has no Add.
        fused = 2 * 2 if opset == 23 else 0
        assert info["fused_residual_norms"] == counts[opset]["SkipSimplifiedLayerNormalization"]
        assert counts[opset]["SkipSimplifiedLayerNormalization"] == fused
        assert counts[opset]["RMSNormalization"] == 0
        assert counts[opset]["SimplifiedLayerNormalization"] == (opset == 23)
    assert sum(counts[23].values()) < 0.7 * sum(counts[18].values())


class _Features(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.vesper.logit_features(x)


def test_logit_features_translation_matches_the_model_with_ties_and_large_logits(tmp_path):
    # Rows: a tie for the top (margin 0), logits far past exp's fp32 range, one peaked row,
    # a flat one (entropy log V), ordinary ones; batch and sequence axes as in the model.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, generator=gen) * 4
    x[0, 0, [3, 7]] = 30.0
    x[0, 1] += 500.0
    x[0, 2, 11] = 200.0
    x[1, 0] = 1.5
    program = torch.onnx.export(_Features().eval(), (x,), dynamo=True, opset_version=18,
                                custom_translation_table=translation_table(18),
                                verbose=False)
    path = tmp_path / "features.onnx"
    program.save(str(path))
    assert {n.op_type for n in onnx.load(str(path)).graph.node} >= {"TopK", "Exp"}
    got = make_session(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert got.shape == (2, 3, 4) and np.isfinite(got).all()
    assert got[0, 0, 1] == 0.0  # the tie: top-1 minus top-2
    np.testing.assert_allclose(got[1, 0, 2], np.log(50), rtol=1e-6)
    # Against the same features in float64 (at +500, fp32's own logsumexp is off by 2e-5:
    # the translation, which shifts by the top-1 first, is closer than the model).
    z = x.double()
    lse = torch.logsumexp(z, -1)
    top2 = z.topk(2, dim=-1).values
    entropy = lse - (z.softmax(-1) * z).sum(-1)
    exact = torch.stack((top2[..., 0] - lse, top2[..., 0] - top2[..., 1], entropy, lse), -1)
    # The 4th column, the log-sum-exp, reaches 500: relative to it.
    np.testing.assert_allclose(got, exact.numpy(), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(logit_features(x).numpy(), exact[..., :3].numpy(), atol=1e-4)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_lowered_ffn_pair_computes_the_two_flylora_layers(alpha):
    torch.manual_seed(5)
    cfg = vs.VesperConfig.from_preset("tiny", hidden_size=64, num_layers=1, num_heads=4,
                                      ffn_hidden_size=128, vocab_size=97, max_seq_len=64,
                                      flylora_alpha=alpha)
    model = vs.VesperLM(cfg).eval()
    _as_if_trained(model)
    ffn = model.blocks[0].ffn
    assert ffn.gate.scaling == alpha
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        ref = ffn(x)
        with lowered(model, opset=18):
            got = model.blocks[0].ffn(x)
            assert isinstance(model.blocks[0].ffn, LoweredFeedForward)
    assert ref.abs().max() > 0 and (got - ref).abs().max() <= 1e-5


def _int4_head_and_lookup(scales_shape: list[int]) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    q4 = numpy_helper.from_array(np.zeros((8, 2, 16), np.uint8), "lm_head.weight.T_Q4")
    scales = numpy_helper.from_array(np.ones(scales_shape, np.float32), "lm_head.weight.T_scales")
    emb = numpy_helper.from_array(np.zeros((8, 64), np.uint8), "embed.weight_Q4")
    emb_s = numpy_helper.from_array(np.ones((8, 2), np.float32), "embed.weight_scales")
    nodes = [helper.make_node("GatherBlockQuantized", ["embed.weight_Q4", "ids",
                                                       "embed.weight_scales"], ["e"],
                              domain="com.microsoft", block_size=32, gather_axis=0,
                              quantize_axis=1, name="lookup"),
             helper.make_node("MatMulNBits", ["e", "lm_head.weight.T_Q4",
                                              "lm_head.weight.T_scales"], ["logits"],
                              domain="com.microsoft", K=64, N=8, bits=4, block_size=32)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [q4, scales, emb, emb_s])
    return helper.make_model(graph)


def test_tied_int4_lookup_reads_the_head_table_only_when_the_layouts_match():
    from vesper_sdk.export.fusions import share_tied_int4_table

    model = _int4_head_and_lookup([8, 2])
    assert share_tied_int4_table(model)
    lookup = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    assert lookup.input[2] == "lm_head.weight.T_scales"
    assert {i.name for i in model.graph.initializer} == {
        "lm_head.weight.T_Q4", "lm_head.weight.T_scales", "embed.shared_shape"}
    assert [n.op_type for n in model.graph.node][:2] == ["Reshape", "GatherBlockQuantized"]
    flat = _int4_head_and_lookup([16])  # scales not one row per token: keep both tables
    assert not share_tied_int4_table(flat)
    assert "embed.weight_Q4" in {i.name for i in flat.graph.initializer}


@pytest.mark.parametrize("vocab", [128, 96, 50])
def test_logit_features_top_two_from_blocks_matches_topk_with_ties_in_and_across_blocks(
        vocab, tmp_path):
    # 128 splits into blocks of 64, 96 of 32, 50 into none (one TopK). Rows: the top tied
    # within a block, tied across blocks, the runner-up in the top's block, in another.
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, vocab, generator=gen)
    x[0, 0, [3, 7]] = 30.0
    x[0, 1, [3, vocab - 2]] = 30.0
    x[0, 2, 5], x[0, 2, 6] = 40.0, 39.0
    x[1, 0, 5], x[1, 0, vocab - 1] = 40.0, 39.0
    first, second = top_two(x)
    want = x.topk(2, dim=-1).values
    assert torch.equal(first, want[..., 0]) and torch.equal(second, want[..., 1])
    program = torch.onnx.export(_Features().eval(), (x,), dynamo=True, opset_version=18,
                                custom_translation_table=translation_table(18, vocab),
                                verbose=False)
    path = tmp_path / "features.onnx"
    program.save(str(path))
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["TopK"] == (2 if top_two_block(vocab) else 1)
    got = make_session(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    want = _logit_features(x.reshape(-1, vocab)).view(2, 3, 4).numpy()
    np.testing.assert_array_equal(got[..., 1], want[..., 1])  # the margins, exactly
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert got[0, 0, 1] == got[0, 1, 1] == 0.0 and got[0, 2, 1] == got[1, 0, 1] == 1.0


def test_export_of_a_vocabulary_in_blocks_takes_its_top_two_from_blocks_and_matches_torch(
        make_tiny_model_dir, tmp_path):
    # A vocabulary of 384 (blocks of 64; the tokenizer's ids are a part of it): the
    # MetaHead's top two take two TopK, besides one per FlyLoRA pair; export_onnx's own
    # check against PyTorch must pass, the greedy tokens agree.
    model_dir = make_tiny_model_dir(vocab_size=384)
    out = export_onnx(model_dir, tmp_path / "blocks", verbose=False)
    ops = collections.Counter(n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node)
    assert ops["TopK"] == 2 + 2 and ops["GatherND"] == 1
    info = json.loads((out / "config.json").read_text())["onnx"]["verification"]
    assert info["max_abs"] <= 1e-4 and info["top1_agree"] == 1.0
