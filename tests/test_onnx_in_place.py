"""The in-place KV export (``--in-place-kv``): ONNX Runtime's GroupQueryAttention writes the
cache buffers in place, rows ragged on the right; the runner hides that layout, so the
decoding loop gets the tokens of the plain export and of PyTorch."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
import pytest
import torch

import vesper_sdk as vs
from vesper_sdk.export.in_place import MIN_CAPACITY, InPlaceCache
from vesper_sdk.export.onnx_export import ExportError, export_onnx
from vesper_sdk.export.runner import OnnxBackend
from vesper_sdk.inference.llm import load_onnx


@pytest.fixture(scope="module")
def exports(tiny_model_dir, tmp_path_factory) -> dict[str, Any]:
    from vesper_sdk.cli import export_main

    root = tmp_path_factory.mktemp("in_place")
    plain = export_onnx(tiny_model_dir, root / "plain", verbose=False)
    assert export_main(["--onnx", str(tiny_model_dir), "-o", str(root / "in_place"),
                        "--in-place-kv"]) == 0
    return {"plain": plain, "in_place": root / "in_place", "model": tiny_model_dir}


def test_graph_uses_group_query_attention_and_config_says_in_place(exports):
    info = json.loads((exports["in_place"] / "config.json").read_text())["onnx"]
    assert info["kv_layout"] == "in_place" and info["verification"]["max_abs"] <= 1e-4
    ops = [n.op_type for n in onnx.load(str(exports["in_place"] / "model.onnx")).graph.node]
    assert "GroupQueryAttention" in ops and "RotaryEmbedding" not in ops
    assert "Attention" not in ops
    plain = json.loads((exports["plain"] / "config.json").read_text())["onnx"]
    assert plain["kv_layout"] == "concat"


def test_left_padded_batch_decodes_the_tokens_of_the_plain_export_and_pytorch(exports):
    prompts = ["the cat sat on a mat while seven", "two", "red car and two blue"]
    n = MIN_CAPACITY + 40  # past the first buffer: the cache grows once on the way
    rows = {name: load_onnx(exports[name]).generate_tokens(
        prompts, max_new_tokens=n, temperature=0.0, ignore_eos=True)
        for name in ("plain", "in_place")}
    torch_rows = vs.load(exports["model"], device="cpu").generate_tokens(
        prompts, max_new_tokens=n, temperature=0.0, ignore_eos=True)
    for a, b, c in zip(rows["plain"], rows["in_place"], torch_rows, strict=True):
        assert len(b) == n and [t.id for t in a] == [t.id for t in b] == [t.id for t in c]
        assert max(abs(x.confidence - y.confidence) for x, y in zip(a, b, strict=True)) < 1e-4


def test_cache_buffers_are_written_in_place_and_grow_keeping_their_contents(exports):
    backend = OnnxBackend(exports["in_place"])
    ids = torch.tensor([[0, 0, 5, 9, 11], [7, 8, 9, 10, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = backend.forward(ids, mask, torch.zeros_like(ids), None)
    cache = out.past_key_values
    assert isinstance(cache, InPlaceCache) and cache.lengths.tolist() == [3, 5]
    buffer = cache.arrays[0]
    # The prefill wrote the prompt's width (row 0 right-aligned: its padding at 3 and 4),
    # nothing past it.
    assert np.abs(buffer[:, :, :5]).all(axis=-1).all() and not np.abs(buffer[:, :, 5:]).any()
    padding_key = buffer[0, :, 3].copy()
    for step in range(cache.capacity - 4):  # one step past the first buffer
        nxt = torch.full((2, 1), 20 + step % 50)  # any tokens: the cache's moves are tested
        out = backend.forward(nxt, mask, torch.zeros_like(nxt), out.past_key_values)
        if step == 0:
            assert out.past_key_values.arrays[0] is buffer  # no new cache: the same memory
            # Row 0's 4th key went to its own length, over the padding; row 1's to 5.
            assert not np.allclose(buffer[0, :, 3], padding_key)
            assert np.abs(buffer[1, :, 5]).all(axis=-1).all()
            before = buffer[0, :, :4].copy(), buffer[1, :, :6].copy()
    grown = out.past_key_values
    assert grown.capacity > cache.capacity and grown.lengths.tolist() == [
        cache.capacity - 1, cache.capacity + 1]
    np.testing.assert_array_equal(grown.arrays[0][0, :, :4], before[0])  # copied on growth
    np.testing.assert_array_equal(grown.arrays[0][1, :, :6], before[1])


def test_rows_that_leave_the_batch_keep_decoding_the_same(exports):
    plain, in_place = OnnxBackend(exports["plain"]), OnnxBackend(exports["in_place"])
    ids = torch.tensor([[0, 5, 9, 11], [7, 8, 9, 10], [3, 4, 5, 6]])
    mask = (ids != 0).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = [b.forward(ids, mask, pos, None) for b in (plain, in_place)]
    keep = torch.tensor([0, 2])
    mask, pos = mask[keep], pos[keep, -1:]
    pasts = [b.reorder_cache(o.past_key_values, keep)
             for b, o in zip((plain, in_place), outs, strict=True)]
    nxt = outs[0].logits[keep, -1].argmax(-1, keepdim=True)
    for _ in range(5):
        mask, pos = torch.cat([mask, torch.ones_like(nxt)], 1), pos + 1
        outs = [b.forward(nxt, mask, pos, p) for b, p in zip((plain, in_place), pasts,
                                                                strict=True)]
        pasts = [o.past_key_values for o in outs]
        assert (outs[0].logits - outs[1].logits).abs().max() < 1e-4
        nxt = outs[0].logits[:, -1].argmax(-1, keepdim=True)


def test_decode_steps_bind_once_and_keep_earlier_outputs_intact(exports):
    # A decode step writes into arrays bound once per cache: what it returns must be the
    # caller's own (the next step must not change it), and must be the prefill's answer.
    backend = OnnxBackend(exports["in_place"])
    ids = torch.tensor([[5, 9, 11], [7, 8, 9]])
    ones = torch.ones_like(ids)
    out = backend.forward(ids, ones, ones, None)
    first = backend.forward(torch.tensor([[20], [21]]), ones, ones, out.past_key_values)
    kept = first.logits.clone(), first.confidence.clone()
    binding = first.past_key_values.decode.binding
    second = backend.forward(torch.tensor([[22], [23]]), ones, ones, first.past_key_values)
    assert second.past_key_values.decode.binding is binding
    assert torch.equal(first.logits, kept[0]) and torch.equal(first.confidence, kept[1])
    assert not torch.equal(second.logits, first.logits)
    whole = torch.cat([ids, torch.tensor([[20, 22], [21, 23]])], 1)
    ref = backend.forward(whole, torch.ones_like(whole), torch.ones_like(whole), None)
    assert (second.logits[:, -1] - ref.logits[:, -1]).abs().max() < 1e-4
    assert (second.confidence[:, -1] - ref.confidence[:, -1]).abs().max() < 1e-4
    # ONNX Runtime's operator takes several new tokens on a cache one row at a time.
    with pytest.raises(ValueError, match="one row at a time"):
        backend.forward(torch.tensor([[24, 25], [26, 27]]), ones, ones, second.past_key_values)
    # One row: two tokens at once after decode steps, then one; the once-bound key mask
    # must follow the row's length.
    one = torch.ones(1, 1, dtype=torch.long)
    past = backend.forward(ids[:1], ones[:1], ones[:1], None).past_key_values
    past = backend.forward(torch.tensor([[20]]), one, one, past).past_key_values
    third = backend.forward(torch.tensor([[24, 25]]), one, one, past)
    fourth = backend.forward(torch.tensor([[28]]), one, one, third.past_key_values)
    whole = torch.tensor([[5, 9, 11, 20, 24, 25, 28]])
    ref = backend.forward(whole, torch.ones_like(whole), torch.ones_like(whole), None)
    assert (third.logits[:, -1] - ref.logits[:, -2]).abs().max() < 1e-4
    assert (fourth.logits[:, -1] - ref.logits[:, -1]).abs().max() < 1e-4


@pytest.mark.parametrize("num_heads,kwargs,match", [
    (8, {}, "head_dim 8 is not a multiple of 16"),
    (2, {"use_cache": False}, "needs the KV cache"),
])
def test_in_place_export_is_refused_where_it_cannot_work(tiny_tokenizer, tmp_path, num_heads,
                                                         kwargs, match):
    cfg = vs.VesperConfig.from_preset("tiny", hidden_size=64, num_layers=1, num_heads=num_heads,
                                      ffn_hidden_size=128, vocab_size=tiny_tokenizer.vocab_size)
    vs.VesperLM(cfg).save_pretrained(tmp_path / "m")
    tiny_tokenizer.save(tmp_path / "m")
    with pytest.raises(ExportError, match=match):
        export_onnx(tmp_path / "m", tmp_path / "out", in_place_kv=True, verbose=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_export_help_explains_in_place_kv(capsys):
    from vesper_sdk.cli import export_main

    with pytest.raises(SystemExit):
        export_main(["--onnx", "--help"])
    assert "--in-place-kv" in capsys.readouterr().out


def test_shift_moves_rows_and_back():
    from vesper_sdk.export.in_place import _shift

    t = torch.tensor([[0, 0, 1, 2], [3, 4, 5, 6]])
    shift = torch.tensor([2, 0])
    right = _shift(t, -shift)
    assert right[0, :2].tolist() == [1, 2] and right[1].tolist() == [3, 4, 5, 6]
    assert _shift(right, shift)[0, 2:].tolist() == [1, 2]


def test_onnxruntime_genai_runs_the_export_with_our_tokens_and_confidence(exports):
    """genai_config.json describes the export to onnxruntime-genai: its C++ loop gives the
    greedy tokens of our runner, and the MetaHead's confidence is read by output name."""
    import onnxruntime_genai as og

    from vesper_sdk.export.genai import GENAI_CONFIG_NAME
    from vesper_sdk.tokenizer import VesperTokenizer

    folder = exports["in_place"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert GENAI_CONFIG_NAME in manifest["files"]  # checked with the rest of the folder
    assert not (exports["plain"] / GENAI_CONFIG_NAME).exists()  # a plain export has none
    model = og.Model(str(folder))
    prompt = "the cat sat on a mat while seven"
    tok = VesperTokenizer.from_file(folder)
    # onnxruntime-genai's tokenizer reads tokenizer.json but adds no BOS: vesper prompts
    # start with one.
    assert list(og.Tokenizer(model).encode(prompt)) == tok.encode(prompt)
    ids = tok.encode(prompt, add_bos=True)
    n = 12
    ours = load_onnx(folder).generate_tokens([prompt], max_new_tokens=n, temperature=0.0,
                                             ignore_eos=True)[0]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n)  # greedy: the config's default
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([ids], dtype=np.int32))
    theirs, confidence = [], []
    while not gen.is_done():  # until EOS or max_length
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
        confidence.append(float(gen.get_output("confidence")[0, -1]))
    assert theirs and theirs == [t.id for t in ours[:len(theirs)]]
    assert np.allclose(confidence, [t.confidence for t in ours[:len(theirs)]], atol=1e-4)


def test_the_decoding_loop_sizes_the_cache_once_so_it_never_grows(exports, monkeypatch):
    made = []
    original = InPlaceCache.__init__

    def spy(self, arrays, lengths):
        made.append(arrays[0].shape[2])
        original(self, arrays, lengths)

    monkeypatch.setattr(InPlaceCache, "__init__", spy)
    lm = load_onnx(exports["in_place"])
    n = MIN_CAPACITY + 40  # past the buffer a prefill makes without the loop's reserve()
    rows = lm.generate_tokens(["red car and two blue"], max_new_tokens=n, temperature=0.0,
                              ignore_eos=True)
    assert len(rows[0]) == n
    prompt = len(lm.tokenizer.encode("red car and two blue", add_bos=True))
    assert made == [prompt + n]  # one cache, as long as the prompt and the tokens
    assert lm.backend.reserved == 0  # used by that prefill only


@pytest.mark.parametrize("path", ["plain", "in_place", "torch"])
def test_token_logprobs_from_the_models_logsumexp_equal_those_of_a_log_softmax(exports, path):
    # The model computes the logits' log-sum-exp for its features; the decoding loop takes
    # each token's log-probability from it instead of a log-softmax over the vocabulary.
    # The same tokens and log-probabilities either way: greedy, sampled, with a logit bias
    # (the log-probability stays the model's, not the biased one).
    import dataclasses

    lm = (vs.load(exports["model"], device="cpu") if path == "torch"
          else load_onnx(exports[path]))
    forward, had = lm.backend.forward, []

    def without_logsumexp(*args):
        out = forward(*args)
        had.append(out.logsumexp is not None)
        return dataclasses.replace(out, logsumexp=None)

    prompts = ["the cat sat on a mat while seven", "two", "red car and two blue"]
    for fields in ({"temperature": 0.0}, {"temperature": 0.9, "seed": 3},
                   {"temperature": 0.0, "logit_bias": {7: 3.0, 11: -2.0}}):
        with_lse = lm.generate_tokens(prompts, max_new_tokens=10, ignore_eos=True, **fields)
        lm.backend.forward = without_logsumexp
        try:
            plain = lm.generate_tokens(prompts, max_new_tokens=10, ignore_eos=True, **fields)
        finally:
            lm.backend.forward = forward
        for a, b in zip(with_lse, plain, strict=True):
            assert [t.id for t in a] == [t.id for t in b]
            np.testing.assert_allclose([t.logprob for t in a], [t.logprob for t in b],
                                       rtol=0, atol=2e-5)
    assert had and all(had)  # every step had it: the fast path is what ran above
