"""One forward for every path: the static cache, the attention variants, the folder kinds and
the one sampling default all go through the model's and the SDK's single definitions."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch

import vesper_sdk as vs
from vesper_sdk.folder import ModelFolder, ModelFolderError
from vesper_sdk.inference import DEFAULT_TEMPERATURE, SamplingParams, TorchBackend
from vesper_sdk.inference.command import GenerateOptions
from vesper_sdk.model import ATTENTION, DynamicCache, StaticCache
from vesper_sdk.serving.protocol import ChatRequest, CompletionRequest


@pytest.fixture(scope="module")
def model() -> vs.VesperLM:
    torch.manual_seed(0)
    cfg = vs.VesperConfig.from_preset("tiny", vocab_size=101, hidden_size=64, num_layers=2,
                                      num_heads=4, ffn_hidden_size=128, max_seq_len=32)
    m = vs.VesperLM(cfg).eval()
    with torch.no_grad():
        for layer in m.flylora_layers():
            layer.lora_B.normal_(0, 0.05)
    return m


def _prefill(model: vs.VesperLM, ids: torch.Tensor, mask: torch.Tensor):
    return model(ids, attention_mask=mask, use_cache=True)


@pytest.mark.parametrize("length", ["filled", "capacity"])
def test_static_cache_step_equals_the_growing_cache_step(model, length):
    ids = torch.randint(3, 101, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding in one row
    with torch.no_grad():
        pre = _prefill(model, ids, mask)
        nxt = pre.logits[:, -1:].argmax(-1)
        pos = mask.sum(-1, keepdim=True)
        grown = model(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                      past_key_values=copy.deepcopy(pre.past_key_values), use_cache=True)
        cfg = model.config
        shape = (2, cfg.num_heads, cfg.max_seq_len, cfg.head_dim)
        keys = [torch.zeros(shape) for _ in range(cfg.num_layers)]
        values = [torch.zeros(shape) for _ in range(cfg.num_layers)]
        for (k, v), kb, vb in zip(pre.past_key_values, keys, values, strict=True):
            kb[:, :, :7], vb[:, :, :7] = k, v
        key_mask = torch.zeros(2, cfg.max_seq_len, dtype=torch.bool)
        key_mask[:, :7] = mask.bool()
        cache = StaticCache(keys, values, key_mask, torch.tensor([7]),
                            length=8 if length == "filled" else None)
        assert cache.attention == (None if length == "filled" else "one_query")
        static = model(nxt, position_ids=pos, past_key_values=cache, use_cache=True)
    torch.testing.assert_close(static.logits, grown.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(static.confidence, grown.confidence, rtol=1e-4, atol=1e-5)
    assert static.past_key_values is cache and bool(key_mask[:, 7].all())


def test_attention_variants_agree_and_unknown_ones_are_refused(model):
    assert {"sdpa", "one_query"} <= set(ATTENTION)
    ids = torch.randint(3, 101, (2, 6), generator=torch.Generator().manual_seed(2))
    m = copy.deepcopy(model)
    with torch.no_grad():
        pre = m(ids, use_cache=True)
        want = m(ids[:, :1], past_key_values=copy.deepcopy(pre.past_key_values))
        m.set_attention("one_query")
        got = m(ids[:, :1], past_key_values=copy.deepcopy(pre.past_key_values))
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention variant 'flash9'"):
        m.set_attention("flash9")


def test_a_tuple_of_layers_is_read_as_a_cache_and_left_untouched(model):
    ids = torch.randint(3, 101, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pre = model(ids, use_cache=True)
        legacy = tuple(pre.past_key_values)
        out = model(ids[:, :1], past_key_values=legacy, use_cache=True)
    assert isinstance(out.past_key_values, DynamicCache)
    assert legacy[0][0].shape[2] == 5 and out.past_key_values.length == 6


def test_the_model_carries_no_decode_speed_ups_and_backends_swap_them_in_and_out(model):
    m = copy.deepcopy(model)
    names = ("matvec", "matvec_b", "pair", "head_matvec")
    assert not any(hasattr(mod, n) for mod in m.modules() for n in names)
    keys = list(m.state_dict())
    # CPU: the threaded products come in as module swaps (a count forced: "auto" leaves
    # weights this small to F.linear).
    backend = TorchBackend(m, matvec_parts=4)
    assert any(type(mod).__name__ == "MatVecLinear" for mod in backend.model.modules())
    assert list(backend.model.state_dict()) == keys


def test_every_entry_point_samples_at_the_one_default_temperature():
    assert SamplingParams().temperature == DEFAULT_TEMPERATURE
    assert GenerateOptions(model_dir="x").temperature == DEFAULT_TEMPERATURE
    completion = CompletionRequest(model="m", prompt="hi")
    chat = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert completion.temperature == chat.temperature == DEFAULT_TEMPERATURE


def test_model_folder_names_its_kind_and_refuses_what_is_not_a_model(model, tmp_path):
    folder = tmp_path / "runs" / "a" / "model"
    model.save_pretrained(folder)
    assert ModelFolder(folder).kind == "torch"
    assert ModelFolder(folder).config.vocab_size == 101
    with pytest.raises(ModelFolderError, match="Did you mean .*runs/a/model"):
        ModelFolder(tmp_path / "runs" / "a")
    with pytest.raises(ModelFolderError, match="is not a folder"):
        ModelFolder(tmp_path / "nowhere")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match=r"config\.json is damaged"):
        ModelFolder(folder).config  # noqa: B018
    (folder / "manifest.json").unlink()  # as a folder from before manifests
    with pytest.raises(ModelFolderError, match=r"config\.json is not valid JSON"):
        ModelFolder(folder).config  # noqa: B018
    onnx = tmp_path / "export"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"")
    assert ModelFolder(Path(onnx)).kind == "onnx"


@pytest.mark.parametrize("padded", [False, True])
def test_the_static_decode_step_traces_as_one_graph(model, padded):
    """torch.compile(fullgraph=True) raises on any graph break in the one forward (a lock,
    a shape compared as a Python bool, ...), which would silently slow the compiled step."""
    from vesper_sdk.inference.decode_swaps import apply_cpu_decode
    from vesper_sdk.inference.torch_backend import _static_step

    m = copy.deepcopy(model)
    apply_cpu_decode(m, parts=4)
    cfg = m.config
    shape = (1, cfg.num_heads, cfg.max_seq_len, cfg.head_dim)

    def buffers():
        torch.manual_seed(5)
        keys = [torch.randn(shape) for _ in range(cfg.num_layers)]
        values = [torch.randn(shape) for _ in range(cfg.num_layers)]
        key_mask = torch.zeros(1, cfg.max_seq_len, dtype=torch.bool)
        key_mask[:, :6] = True
        return key_mask, keys, values

    ids, pos, write = torch.tensor([[7]]), torch.tensor([[6]]), torch.tensor([6])
    # dynamic: the lengths are symbolic, as in the backend after its first recompile.
    step = torch.compile(functools.partial(_static_step, m), fullgraph=True, dynamic=True,
                         backend="aot_eager")
    with torch.no_grad():
        want = _static_step(m, ids, pos, write, *buffers(), length=7, padded=padded)
        got = step(ids, pos, write, *buffers(), length=7, padded=padded)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
