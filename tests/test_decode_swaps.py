"""The decode swaps: the threaded CPU product gives F.linear's numbers, is used only where it
applies, and swapping in and out leaves the model's parameters and outputs as they were."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vesper_sdk as vs
from vesper_sdk.inference import decode_swaps
from vesper_sdk.inference.decode_swaps import (
    CANDIDATE_PARTS,
    MIN_MEASURED,
    DenseProduct,
    MatVecLinear,
    PairedFeedForward,
    SplitMatVec,
    apply_cpu_decode,
    apply_pair_ffn,
    decode_products,
    measured_parts,
    pick_parts,
    remove_decode_swaps,
)
from vesper_sdk.model import GLUFeedForward


@pytest.mark.parametrize("out_features,in_features,parts,rows", [
    (64, 32, 4, 1), (96, 40, 8, 3), (7, 5, 7, 16), (12, 9, 1, 2), (2880, 192, 8, 8)])
def test_split_matvec_equals_f_linear(out_features, in_features, parts, rows):
    torch.manual_seed(0)
    w = torch.randn(out_features, in_features)
    x = torch.randn(rows, 1, in_features)
    mv = SplitMatVec(w, parts)
    with torch.no_grad():
        assert mv.applies(x)
        torch.testing.assert_close(mv(x), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_split_matvec_compiles_without_a_graph_break_to_the_same_numbers():
    torch.manual_seed(0)
    w = torch.randn(96, 40)
    mv = SplitMatVec(w, 8)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(mv(x) if mv.applies(x) else F.linear(x, w)) * 2

    compiled = torch.compile(f, fullgraph=True)  # fullgraph: a graph break would raise
    with torch.no_grad():
        for rows in (1, 3):
            x = torch.randn(rows, 1, 40)
            torch.testing.assert_close(compiled(x), torch.relu(F.linear(x, w)) * 2,
                                       rtol=1e-5, atol=1e-5)


def test_cpu_decode_leaves_bf16_weights_to_f_linear(tiny_model):
    assert apply_cpu_decode(tiny_model.to(torch.bfloat16), parts=4) == 0
    assert decode_products(tiny_model) == []


def test_split_matvec_rejects_parts_that_do_not_divide_the_output():
    with pytest.raises(ValueError, match="divide"):
        SplitMatVec(torch.randn(10, 4), 4)


def test_split_matvec_leaves_prefill_and_autograd_to_f_linear():
    mv = SplitMatVec(torch.randn(16, 8), 4, max_rows=4)
    with torch.no_grad():
        assert mv.applies(torch.randn(1, 4, 8))
        assert not mv.applies(torch.randn(1, 5, 8))  # more rows than max_rows: prefill
        assert not mv.applies(torch.randn(1, 8, dtype=torch.float64))
    assert not mv.applies(torch.randn(1, 8))  # autograd on: training never sees the copy


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    cfg = vs.VesperConfig.from_preset("tiny", vocab_size=96, hidden_size=64, num_layers=2,
                                      num_heads=4, ffn_hidden_size=128, max_seq_len=64)
    return vs.VesperLM(cfg).eval()


def _as_if_trained(model: vs.VesperLM) -> vs.VesperLM:
    """Non-zero FlyLoRA B and balance bias (a fresh model has zeros: no LoRA branch)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.flylora_layers():
            layer.lora_B.normal_(0, 0.5)
            layer.balance_bias.normal_(0, 0.1)
    return model


def _assert_same_decode(model, ref) -> None:
    """A prefill and one cached step of ``model`` give ``ref``'s outputs."""
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        prefill = model(ids, use_cache=True)
        step = model(ids[:, :1], past_key_values=prefill.past_key_values, use_cache=True)
        ref_prefill = ref(ids, use_cache=True)
        ref_step = ref(ids[:, :1], past_key_values=ref_prefill.past_key_values,
                       use_cache=True)
    for got, want in ((prefill, ref_prefill), (step, ref_step)):
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.confidence, want.confidence, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.answer, want.answer, rtol=1e-4, atol=1e-5)


def test_cpu_decode_covers_every_dense_weight_and_keeps_the_decode_outputs(tiny_model):
    _as_if_trained(tiny_model)
    ref = copy.deepcopy(tiny_model)
    keys = {k: v.data_ptr() for k, v in tiny_model.state_dict().items()}
    n = apply_cpu_decode(tiny_model, parts=4)
    assert len(decode_products(tiny_model)) == n
    # 2 layers x (qkv, o_proj, down, the gate/up FlyLoRA pair) + MetaHead fc, out and
    # answer row + tied LM head.
    assert n == 2 * (3 + 1) + 3 + 1
    assert all(isinstance(b.ffn, PairedFeedForward) for b in tiny_model.blocks)
    # The swapped modules hold the very same tensors under the same names.
    assert {k: v.data_ptr() for k, v in tiny_model.state_dict().items()} == keys
    _assert_same_decode(tiny_model, ref)
    assert tiny_model.blocks[0].attn.qkv.product.parts == 4
    assert tiny_model.metahead.out.product.parts == 1  # no divisor of 5 in 2..4


def test_removing_the_swaps_restores_the_models_own_modules(tiny_model):
    before = [type(m) for m in tiny_model.modules()]
    apply_cpu_decode(tiny_model, parts=4)
    remove_decode_swaps(tiny_model)
    assert [type(m) for m in tiny_model.modules()] == before
    assert apply_cpu_decode(tiny_model, parts=0) == 0
    assert decode_products(tiny_model) == []


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("product", ["blocks", "dense"])
def test_ffn_pair_equals_the_two_flylora_layers(alpha, product):
    """The pair (CPU column blocks, or the one F.linear a GPU runs) gives the two FlyLoRA
    layers' output, eagerly (topk) and compiled (ranks chosen by counting, B masked)."""
    torch.manual_seed(0)
    cfg = vs.VesperConfig.from_preset("tiny", vocab_size=96, hidden_size=64, num_layers=1,
                                      num_heads=4, ffn_hidden_size=128, flylora_alpha=alpha)
    block = _as_if_trained(vs.VesperLM(cfg).eval()).blocks[0]
    x = torch.randn(3, 1, 64)
    with torch.no_grad():
        want = block.ffn(x)
        if product == "blocks":
            apply_cpu_decode(block, parts=4)
        else:
            assert apply_pair_ffn(block) == 1
            assert isinstance(block.ffn.pair.product, DenseProduct)
            assert type(block.ffn.down) is torch.nn.Linear
        ffn = block.ffn
        assert isinstance(ffn, PairedFeedForward) and isinstance(ffn, GLUFeedForward)
        assert ffn.pair.applies(x)
        torch.testing.assert_close(ffn(x), want, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(ffn.forward, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-5)


def test_a_weight_updated_in_place_falls_back_to_its_current_values(tiny_model):
    _as_if_trained(tiny_model)
    apply_cpu_decode(tiny_model, parts=4)
    layer = tiny_model.blocks[0].attn.qkv
    ffn = tiny_model.blocks[0].ffn
    assert isinstance(layer, MatVecLinear)
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        assert layer.product.applies(x) and ffn.pair.applies(x)
        layer.weight.add_(1.0)  # what an optimizer step does
        ffn.up.lora_B.mul_(2.0)
        assert not layer.product.applies(x) and not ffn.pair.applies(x)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
        gate, up = ffn.gate, ffn.up
        want = ffn.down(ffn.act(gate(x)) * (F.linear(x, up.weight) + F.linear(
            up.rank_mask(x)[0] * up.rank_mask(x)[1], up.lora_B)))
        torch.testing.assert_close(ffn(x), want)


def test_picking_parts_takes_the_fastest_unless_the_default_is_within_the_margin():
    assert pick_parts({0: 1.0, 2: 0.5, 8: 0.6}) == 2  # 17 % faster than the default
    assert pick_parts({0: 1.0, 2: 0.57, 8: 0.6}) == 8  # 5 %: the default stays
    assert pick_parts({0: 0.95, 8: 1.0}) == 8
    assert pick_parts({0: 0.3, 2: 0.5}) == 0  # no default among them: the fastest


def test_measured_parts_times_each_shape_once_and_leaves_small_weights_to_f_linear(
        monkeypatch):
    monkeypatch.setattr(decode_swaps, "_MEASURED", {})
    clock = decode_swaps.time.perf_counter
    calls = []
    monkeypatch.setattr(decode_swaps.time, "perf_counter",
                        lambda: calls.append(1) or clock())
    assert measured_parts(5, 128) == 0 and not calls  # below MIN_MEASURED: not timed
    out, inn = 384, MIN_MEASURED // 256
    parts = measured_parts(out, inn)
    assert parts in CANDIDATE_PARTS and (parts == 0 or out % parts == 0)
    timed = len(calls)
    assert timed > 0
    assert measured_parts(out, inn) == parts and len(calls) == timed  # remembered


def test_auto_parts_apply_each_shapes_measured_choice_and_keep_the_outputs(tiny_model,
                                                                          monkeypatch):
    _as_if_trained(tiny_model)
    ref = copy.deepcopy(tiny_model)
    qkv = tiny_model.blocks[0].attn.qkv.weight.shape
    # As if measured: F.linear fastest for the attention's qkv, 2 blocks for the rest (as
    # measured_parts, only a count that divides the outputs).
    monkeypatch.setattr(decode_swaps, "measured_parts",
                        lambda out, inn: 0 if (out, inn) == tuple(qkv) or out % 2 else 2)
    apply_cpu_decode(tiny_model, parts="auto")
    assert all(type(b.attn.qkv) is torch.nn.Linear for b in tiny_model.blocks)
    assert all(b.attn.o_proj.product.parts == 2 for b in tiny_model.blocks)
    assert all(isinstance(b.ffn, PairedFeedForward) for b in tiny_model.blocks)
    _assert_same_decode(tiny_model, ref)
