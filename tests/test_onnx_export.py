"""ONNX export: parity with PyTorch (prefill + decode, left padding), past length 0,
int8/int4 graphs, the ONNX Runtime runner behind the LLM API, errors, the CLI."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

import vesper_sdk as vs
from vesper_sdk.export import OnnxModel
from vesper_sdk.export.onnx_export import (
    DEFAULT_OPSET,
    ExportError,
    check_parity,
    default_opset,
    export_onnx,
)
from vesper_sdk.export.runner import OnnxBackend, make_session
from vesper_sdk.inference import TorchBackend
from vesper_sdk.inference.llm import LLM
from vesper_sdk.model import ModelFolderError


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="module")
def exports(model_dir, tmp_path_factory) -> dict[str, Any]:
    """fp32 and int4 through the Python API, int8 through `vesper-export --onnx` (CLI)."""
    from vesper_sdk.cli import export_main

    root = tmp_path_factory.mktemp("onnx")
    out = {q or "fp32": export_onnx(model_dir, root / (q or "fp32"), quantize=q, verbose=False)
           for q in (None, "int4")}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = export_main(["--onnx", str(model_dir), "-o", str(root / "int8"),
                            "--quantize", "int8"])
    out.update(int8=root / "int8", cli_code=code, cli_out=printed.getvalue())
    return out


def _weights_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.name not in ("config.json", "tokenizer.json"))


def test_fp32_export_matches_pytorch_over_prefill_and_decode(model_dir, exports):
    out = exports["fp32"]
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "manifest.json", "model.onnx", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    info = json.loads((out / "config.json").read_text())["onnx"]
    assert info["verification"]["max_abs"] <= 1e-4  # recorded by the export's own check
    model = vs.VesperLM.from_pretrained(model_dir).eval()
    session = make_session(out / "model.onnx", providers=["CPUExecutionProvider"])
    # Other prompts than the export's check (seed), batch 2 with left padding, 6 decodes.
    for seed in (3, 4):
        stats = check_parity(session, model, steps=6, seed=seed)
        assert stats["max_abs"] <= 1e-4
        assert stats["max_abs_meta"] <= 1e-5
        assert stats["top1_agree"] == 1.0


def test_graph_signature_dynamic_axes_and_flylora_topk(exports, model_dir):
    graph = onnx.load(str(exports["fp32"] / "model.onnx")).graph
    names = [i.name for i in graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    outs = [o.name for o in graph.output]
    assert outs == ["logits", "confidence", "stop", "answer", "logsumexp", "top_logprob"] + [
        f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    by_name = {vi.name: vi for vi in [*graph.input, *graph.output]}
    assert dims(by_name["input_ids"]) == ["batch_size", "sequence_length"]
    assert dims(by_name["past_key_values.0.key"]) == ["batch_size", 2, "past_sequence_length",
                                                      32]
    assert dims(by_name["logits"])[:2] == ["batch_size", "sequence_length"]
    ops = {n.op_type for n in graph.node}
    assert {"TopK", "GatherElements"} <= ops  # FlyLoRA's top-k is in the graph
    # No stack traces or local paths baked into the file.
    assert all(len(n.metadata_props) == 0 for n in graph.node)


def test_past_length_zero_and_batch_size_change(exports, model_dir):
    model = vs.VesperLM.from_pretrained(model_dir).eval()
    cfg = model.config
    session = make_session(exports["fp32"] / "model.onnx", providers=["CPUExecutionProvider"])
    for b, s in ((1, 1), (3, 11)):
        ids = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(b))
        feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((b, s), np.int64),
                "position_ids": np.tile(np.arange(s, dtype=np.int64), (b, 1))}
        for i in range(cfg.num_layers):
            for kv in ("key", "value"):
                feed[f"past_key_values.{i}.{kv}"] = np.zeros(
                    (b, cfg.num_heads, 0, cfg.head_dim), np.float32)
        got = session.run(None, feed)
        with torch.no_grad():
            ref = model(ids, use_cache=True)
        assert got[0].shape == (b, s, cfg.vocab_size)
        assert got[6].shape == (b, cfg.num_heads, s, cfg.head_dim)  # present = past(0) + s
        assert np.abs(got[0] - ref.logits.numpy()).max() <= 1e-4
        assert np.abs(got[3] - ref.answer.numpy()).max() <= 1e-4  # the answer logit
        # The logits' log-sum-exp, the model's and the graph's own logits'.
        assert np.abs(got[4] - ref.logsumexp.numpy()).max() <= 1e-4
        lse = torch.logsumexp(torch.from_numpy(got[0]).double(), -1).numpy()
        assert np.abs(got[4] - lse).max() <= 1e-4
        # The top-1 token's log-probability (a greedy token's), from the same statistics.
        top = torch.from_numpy(got[0]).double().log_softmax(-1).max(-1).values.numpy()
        assert np.abs(got[5] - top).max() <= 1e-4
        assert np.abs(got[5] - ref.top_logprob.numpy()).max() <= 1e-4
        assert np.abs(got[6] - ref.past_key_values[0][0].numpy()).max() <= 1e-5


def test_quantized_exports_are_smaller_and_close(exports, model_dir):
    fp = _weights_size(exports["fp32"])
    int8, int4 = _weights_size(exports["int8"]), _weights_size(exports["int4"])
    assert int4 < int8 < 0.75 * fp
    ops8 = {n.op_type for n in onnx.load(str(exports["int8"] / "model.onnx")).graph.node}
    g4 = onnx.load(str(exports["int4"] / "model.onnx")).graph
    ops4 = {n.op_type for n in g4.node}
    assert "MatMulInteger" in ops8 or "DynamicQuantizeMatMul" in ops8
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops4
    # FlyLoRA's A (of each gate/up pair) and the MetaHead stay fp32 MatMuls, and B an fp32
    # table whose k chosen rows are gathered.
    fp_matmul_weights = {n.input[1] for n in g4.node if n.op_type == "MatMul"}
    assert {"blocks.0.ffn.gate_up.lora_A.T", "metahead.fc.weight.T"} <= fp_matmul_weights
    gathered = {n.input[0] for n in g4.node if n.op_type == "Gather"}
    assert "blocks.0.ffn.gate_up.lora_B.T" in gathered
    inits = {i.name: i for i in g4.initializer}
    assert inits["blocks.0.ffn.gate_up.lora_B.T"].data_type == onnx.TensorProto.FLOAT
    # Tied embeddings: the lookup reads the LM head's 4-bit table; no second copy.
    lookup = next(n for n in g4.node if n.op_type == "GatherBlockQuantized")
    table = next(n for n in g4.node if n.output[0] == lookup.input[0])
    assert table.op_type == "Reshape" and table.input[0] == "lm_head.weight.T_Q4"
    assert not any(name.startswith("embed.weight") for name in inits)
    model = vs.VesperLM.from_pretrained(model_dir).eval()
    for q, max_rel in (("int8", 0.1), ("int4", 0.35)):
        session = make_session(exports[q] / "model.onnx", providers=["CPUExecutionProvider"])
        stats = check_parity(session, model, seed=7)
        assert 1e-4 < stats["rel_err"] < max_rel, q  # really quantized, and still close
        info = json.loads((exports[q] / "config.json").read_text())["onnx"]
        assert info["quantize"] == q and info["verification"]["rel_err"] < max_rel


def test_onnx_model_greedy_tokens_equal_pytorch_for_64_tokens(model_dir, exports):
    torch_lm = vs.load(model_dir, device="cpu")
    onnx_lm = OnnxModel(exports["fp32"])
    assert isinstance(onnx_lm.backend, OnnxBackend)
    for prompt in ("the cat sat", "seven dogs"):
        a = torch_lm.generate_tokens([prompt], max_new_tokens=64, temperature=0.0,
                                     ignore_eos=True)[0]
        b = onnx_lm.generate_tokens([prompt], max_new_tokens=64, temperature=0.0,
                                    ignore_eos=True)[0]
        assert len(a) == 64 and [t.id for t in a] == [t.id for t in b]
        assert max(abs(x.confidence - y.confidence) for x, y in zip(a, b, strict=True)) < 1e-4
    # A batch with left padding (prompts of different lengths) gives the same tokens too.
    prompts = ["the cat sat on a mat while", "two"]
    assert (onnx_lm.generate(prompts, max_new_tokens=20, temperature=0.0)
            == torch_lm.generate(prompts, max_new_tokens=20, temperature=0.0))
    streamed = list(onnx_lm.stream("red car", max_new_tokens=8, temperature=0.0))
    assert "".join(t.text for t in streamed) == torch_lm.generate(
        "red car", max_new_tokens=8, temperature=0.0)
    assert isinstance(onnx_lm.chat([{"role": "user", "content": "blue"}], max_new_tokens=5,
                                   temperature=0.0), str)


def test_thread_settings_change_speed_not_tokens_and_leave_torch_threads_alone(exports):
    """Every spin mode and host-thread cap decodes the same tokens; torch's thread count is
    capped only inside the decode steps (the caller's code between tokens keeps its own)."""
    before = torch.get_num_threads()
    tokens, inside = {}, []
    for spin, host in (("never", 0), ("always", 0), ("run", None), ("run", 1)):
        backend = OnnxBackend(exports["fp32"], spin=spin, host_threads=host)
        lm = LLM(backend, vs.VesperTokenizer.from_file(exports["fp32"]), exports["fp32"])
        row = []
        for tok in lm.stream("the cat sat", max_new_tokens=12, temperature=0.0,
                             ignore_eos=True):
            inside.append(torch.get_num_threads())
            row.append(tok.id)
        tokens[(spin, host)] = row
    assert len({tuple(r) for r in tokens.values()}) == 1 and len(row) == 12
    assert set(inside) == {before} and torch.get_num_threads() == before
    assert OnnxBackend(exports["fp32"]).host_threads == 1  # the CPU default
    assert OnnxBackend(exports["fp32"], host_threads=0).host_threads is None


def test_host_scope_caps_torch_threads_and_puts_them_back():
    from vesper_sdk.inference.types import host_scope

    class Backend:
        host_threads = 1

    torch.set_num_threads(2)
    try:
        with host_scope(Backend()):
            assert torch.get_num_threads() == 1 and torch.is_inference_mode_enabled()
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), host_scope(Backend()):
            raise RuntimeError("a failing step")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(2)


def test_unknown_spin_mode_is_refused(exports):
    with pytest.raises(ValueError, match="spin must be one of run, never, always"):
        make_session(exports["fp32"] / "model.onnx", spin="sometimes")


def test_int4_runner_generates(exports):
    lm = OnnxModel(exports["int4"])
    toks = list(lm.stream("the cat", max_new_tokens=10, temperature=0.0))
    assert 1 <= len(toks) <= 10 and all(0 <= t.confidence <= 1 for t in toks)


def test_no_cache_export_runs_the_same_greedy_loop(model_dir, tmp_path):
    out = export_onnx(model_dir, tmp_path / "nc", use_cache=False, verbose=False)
    names = [i.name for i in onnx.load(str(out / "model.onnx")).graph.input]
    assert names == ["input_ids", "attention_mask", "position_ids"]
    backend = OnnxBackend(out)
    assert not backend.use_cache
    ref = TorchBackend(vs.VesperLM.from_pretrained(model_dir))
    ids = torch.tensor([[5, 9, 11, 4]])
    mask, pos = torch.ones_like(ids), torch.arange(4)[None]
    a, b = ref.forward(ids, mask, pos, None), backend.forward(ids, mask, pos, None)
    for _ in range(5):
        nxt = a.logits[:, -1:].argmax(-1)
        assert torch.equal(nxt, b.logits[:, -1:].argmax(-1))
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        pos = pos[:, -1:] + 1
        a = ref.forward(nxt, mask, pos, a.past_key_values)
        b = backend.forward(nxt, mask, pos, b.past_key_values)
        assert b.logits.shape == (1, 1, ref.vocab_size)
        assert (a.logits - b.logits).abs().max() <= 1e-4


@pytest.mark.parametrize("kwargs,match", [
    ({"opset": 11}, "opset 11 is not supported"),
    ({"quantize": "int2"}, "unknown ONNX quantization"),
    ({"quantize": "int4", "block_size": 24}, "power of two"),
    ({"quantize": "int4", "opset": 18}, "opset >= 21"),
])
def test_bad_arguments_are_refused_before_anything_is_written(model_dir, tmp_path, kwargs,
                                                              match):
    with pytest.raises(ExportError, match=match):
        export_onnx(model_dir, tmp_path / "out", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_not_a_model_folder_is_refused(tmp_path, exports):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="config.json is missing"):
        export_onnx(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ModelFolderError, match="ONNX export already"):
        export_onnx(exports["fp32"], tmp_path / "out")
    with pytest.raises(ModelFolderError, match="not an ONNX export"):
        OnnxModel(tmp_path / "empty")
    from vesper_sdk.quantization import quantize

    with pytest.raises(ModelFolderError, match="is an ONNX export"):
        quantize(exports["fp32"], "int8", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_failed_verification_leaves_no_folder(model_dir, exports, tmp_path, monkeypatch):
    import vesper_sdk.export.onnx_export as ox

    # Reuse the exported graph (this test is about the check and the clean-up, not about
    # torch.export), and pretend ONNX Runtime disagrees with PyTorch.
    graph = onnx.load(str(exports["fp32"] / "model.onnx"))
    monkeypatch.setattr(ox, "_torch_to_onnx", lambda *a, **k: graph)
    real = ox.check_parity
    monkeypatch.setattr(ox, "check_parity",
                        lambda *a, **k: {**real(*a, **k), "max_abs": 0.5})
    with pytest.raises(ExportError, match="check failed"):
        export_onnx(model_dir, tmp_path / "out", verbose=False)
    assert list(tmp_path.iterdir()) == []


def test_bnb_quantized_folder_is_refused(model_dir, tmp_path):
    from vesper_sdk.quantization import quantize

    q = quantize(model_dir, "nf4", tmp_path / "q", verbose=False)
    with pytest.raises(ExportError, match="full-precision folder"):
        export_onnx(q, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vesper_export_cli(model_dir, exports, tmp_path, capsys):
    from vesper_sdk.cli import export_main

    assert exports["cli_code"] == 0
    assert "relative logits error" in exports["cli_out"] and "int8" in exports["cli_out"]
    assert json.loads((exports["int8"] / "config.json").read_text())["onnx"]["quantize"] == "int8"
    assert export_main(["--onnx", str(model_dir), "-o", str(tmp_path / "x"),
                        "--opset", "9"]) == 2
    assert "opset 9 is not supported" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):  # its help: its own name, and the flag it is spelt with
        export_main(["--help"])
    shown = capsys.readouterr().out
    assert shown.startswith("usage: vesper-export") and "--onnx" in shown


def test_lazy_top_level_names():
    import vesper_sdk.export as ex

    assert vs.export_onnx is export_onnx
    assert ex.OnnxModel is OnnxModel


def test_export_config_is_readable_by_transformers_for_optimum(exports):
    # Optimum's ORTModelForCausalLM reads config.json through AutoConfig; after
    # register_optimum() the export folder's config resolves with HF attribute names.
    from transformers import AutoConfig

    from vesper_sdk.export import register_optimum

    cls = register_optimum()
    assert register_optimum() is cls  # idempotent
    cfg = AutoConfig.from_pretrained(str(exports["int4"]))
    assert isinstance(cfg, cls) and cfg.model_type == "vesper"
    assert (cfg.num_attention_heads, cfg.num_hidden_layers, cfg.hidden_size) == (2, 2, 64)
    assert cfg.hidden_size // cfg.num_attention_heads == 32  # the KV head_dim Optimum uses


def test_reorder_cache_keeps_the_chosen_rows(exports):
    # The decoding loop drops finished rows through reorder_cache: the kept row must
    # continue exactly as if it had been decoded alone.
    backend = OnnxBackend(exports["fp32"])
    ids = torch.tensor([[7, 8, 9, 10], [11, 12, 13, 14]])
    mask, pos = torch.ones_like(ids), torch.arange(4).expand(2, 4)
    both = backend.forward(ids, mask, pos, None)
    kept = backend.reorder_cache(both.past_key_values, torch.tensor([1]))
    nxt = torch.tensor([[5]])
    a = backend.forward(nxt, torch.ones(1, 5, dtype=torch.long), torch.tensor([[4]]), kept)
    alone = backend.forward(ids[1:], mask[1:], pos[1:], None)
    b = backend.forward(nxt, torch.ones(1, 5, dtype=torch.long), torch.tensor([[4]]),
                        alone.past_key_values)
    assert (a.logits - b.logits).abs().max() <= 1e-5


def test_default_opset_follows_the_runtime_that_checks_the_export(exports):
    import onnxruntime

    assert default_opset(None, "1.32.0") == default_opset("int4", "1.22.1") == DEFAULT_OPSET
    assert default_opset(None, "1.21.0") == 18 and default_opset("int4", "1.20.1") == 21
    info = json.loads((exports["int4"] / "config.json").read_text())["onnx"]
    assert info["opset"] == default_opset("int4", onnxruntime.__version__)


@pytest.mark.parametrize("in_place_kv", [False, True])
def test_the_answer_row_and_mlp_travel_through_the_export(make_tiny_model_dir, tmp_path,
                                                         in_place_kv):
    """A fitted answer row and answer MLP give the same answer logits in ONNX Runtime as
    in PyTorch, at every decode step, plain or in-place KV; the answer check travels in
    the export's config, so the answers' confidences agree too."""
    folder = make_tiny_model_dir()
    model = vs.VesperLM.from_pretrained(folder)
    model.set_answer_mlp(8)
    with torch.no_grad():
        torch.manual_seed(1)
        model.metahead.answer.weight.normal_(0, 1.0)
        model.metahead.answer.bias.fill_(-0.5)
        for p in model.metahead.answer_mlp.parameters():
            p.normal_(0, 0.3)
    model.config.metahead_answer_check = [1.2, -0.5, 0.9, 0.1]
    model.save_pretrained(tmp_path / "m", extra_files={"tokenizer.json": folder / "tokenizer.json"})
    export_onnx(tmp_path / "m", tmp_path / "onnx", verbose=False, in_place_kv=in_place_kv)
    torch_lm, onnx_lm = vs.load(tmp_path / "m", device="cpu"), OnnxModel(tmp_path / "onnx")
    a = torch_lm.generate_tokens(["the cat sat"], max_new_tokens=12, temperature=0.0,
                                 ignore_eos=True)[0]
    b = onnx_lm.generate_tokens(["the cat sat"], max_new_tokens=12, temperature=0.0,
                                ignore_eos=True)[0]
    assert [t.id for t in a] == [t.id for t in b]
    ours = torch.tensor([t.answer_logit for t in a])
    assert ours.std() > 0.02  # the fitted row, not a constant
    torch.testing.assert_close(torch.tensor([t.answer_logit for t in b]), ours,
                               rtol=1e-4, atol=1e-4)
    assert onnx_lm.config.metahead_answer_check == [1.2, -0.5, 0.9, 0.1]
    torch.testing.assert_close(torch.tensor([t.answer_confidence for t in b]),
                               torch.tensor([t.answer_confidence for t in a]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_exports_keep_the_answer_mlp_in_fp32(make_tiny_model_dir, tmp_path, quantize):
    """The answer MLP, like the rest of the MetaHead, is left out of quantization: its
    weights are in the quantized graph as they are in the model."""
    import onnx
    from onnx import numpy_helper

    folder = make_tiny_model_dir()
    model = vs.VesperLM.from_pretrained(folder)
    model.set_answer_mlp(8)
    with torch.no_grad():
        torch.manual_seed(2)
        for p in model.metahead.answer_mlp.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "m", extra_files={"tokenizer.json": folder / "tokenizer.json"})
    export_onnx(tmp_path / "m", tmp_path / "onnx", quantize=quantize, verbose=False)
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer]
    for layer in (model.metahead.answer_mlp[0], model.metahead.answer_mlp[2]):
        w = layer.weight.detach().numpy()
        assert any(a.dtype == np.float32 and a.shape in (w.shape, w.T.shape)
                   and np.array_equal(a.reshape(-1), (w if a.shape == w.shape else w.T)
                                      .reshape(-1)) for a in weights)


def test_an_export_without_the_answer_output_reads_the_confidence_logit():
    from vesper_sdk.inference.types import StepOutput

    conf = np.array([[0.2, 0.9]], np.float32)
    step = StepOutput.from_heads([np.zeros((1, 2, 5), np.float32), conf,
                                  np.zeros((1, 2), np.float32)], None)
    torch.testing.assert_close(step.answer, torch.logit(torch.from_numpy(conf)))


def test_the_bundled_models_int8_export_passes_its_check_whatever_the_seed(tmp_path):
    """The bound sits above the spread of the statistic on a real model, so whether an
    export passes does not hang on the check's random prompts (or a CPU's rounding)."""
    from vesper_sdk.export.parity import judge

    bundled = Path(vs.__file__).resolve().parent / "assets" / "default_model"
    out = export_onnx(bundled, tmp_path / "int8", quantize="int8", verbose=False)
    model = vs.VesperLM.from_pretrained(bundled).eval()
    session = make_session(out / "model.onnx", providers=["CPUExecutionProvider"])
    for seed in range(20):
        stats = check_parity(session, model, seed=seed)
        assert judge(stats, "int8") is None, (seed, stats)
