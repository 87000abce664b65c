"""bitsandbytes quantization: quantize -> save -> load round trip, accuracy, errors, CLI."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import vesper_sdk as vs
from vesper_sdk.benchmarks.quantized import (
    _token_chunks,
    backend_perplexity,
    eval_token_docs,
    quantization_report,
)
from vesper_sdk.model import FlyLoRALinear, ModelFolderError
from vesper_sdk.quantization import QuantizedFlyLoRALinear, QuantizeError, load_quantized, quantize
from vesper_sdk.tokenizer import VesperTokenizer

WORDS = ("the cat sat on a mat while seven dogs ran past one red car and two blue birds "
         "sang over green hills near old towns").split()

@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


def _probe(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("method,max_rel", [("int8", 0.05), ("nf4", 0.2), ("fp4", 0.25)])
def test_quantize_save_load_round_trip_is_close_to_fp32(model_dir, tmp_path, method, max_rel):
    out = quantize(model_dir, method, tmp_path / f"q-{method}", verbose=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "manifest.json", "model.safetensors", "modeling_vesper.py",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    block = json.loads((out / "config.json").read_text())["quantization"]
    assert block["method"] == method and block["library"] == "bitsandbytes"
    assert block["version"]
    # Embedding (= tied LM head), MetaHead and the FlyLoRA branches are not quantized:
    # fp16 on disk, fp32 again once loaded.
    assert {"embed", "metahead.fc", "metahead.out"} <= set(block["skipped"])
    assert "blocks.0.ffn.gate.lora_A/lora_B" in block["skipped"]
    assert "blocks.1.attn.qkv" in block["quantized"] and "blocks.0.ffn.up" in block["quantized"]

    # The file really holds quantized weights (no pickle: safetensors only) and is smaller.
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        qkv = f.get_tensor("blocks.0.attn.qkv.weight")
        gate = f.get_tensor("blocks.0.ffn.gate.base.weight")
        assert f.get_tensor("embed.weight").dtype == torch.float16
        assert f.get_tensor("blocks.0.ffn.gate.lora_A").dtype == torch.float16
    expected = torch.int8 if method == "int8" else torch.uint8
    assert qkv.dtype == expected and gate.dtype == expected
    assert ("blocks.0.attn.qkv.SCB" in keys) == (method == "int8")
    assert (f"blocks.0.attn.qkv.weight.quant_state.bitsandbytes__{method}" in keys) == (
        method != "int8")
    fp_size = (model_dir / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < 0.7 * fp_size

    fp = vs.VesperLM.from_pretrained(model_dir).eval()
    q = load_quantized(out, device="cpu")
    assert q.embed.weight.dtype == torch.float32
    assert q.blocks[0].ffn.gate.lora_A.dtype == torch.float32
    import bitsandbytes as bnb

    layer_type = bnb.nn.Linear8bitLt if method == "int8" else bnb.nn.Linear4bit
    assert isinstance(q.blocks[1].attn.o_proj, layer_type)
    assert isinstance(q.blocks[0].ffn.down, layer_type)
    gate_q = q.blocks[0].ffn.gate
    assert isinstance(gate_q, QuantizedFlyLoRALinear) and isinstance(gate_q.base, layer_type)
    gate_fp = fp.blocks[0].ffn.gate
    assert isinstance(gate_fp, FlyLoRALinear)
    for name in ("lora_A", "lora_B", "balance_bias"):  # kept as they were, to fp16 rounding
        assert torch.equal(getattr(gate_q, name), getattr(gate_fp, name).half().float())

    ids = _probe(fp.config.vocab_size)
    with torch.no_grad():
        ref, got = fp(ids), q(ids)
    rel = ((got.logits - ref.logits).norm() / ref.logits.norm()).item()
    assert 0 < rel < max_rel  # quantized (not a copy of fp32) and close to it
    assert (got.confidence - ref.confidence).abs().max() < 0.05
    # Loading twice gives the same model: the file, not in-memory state, decides.
    with torch.no_grad():
        assert torch.equal(load_quantized(out, device="cpu")(ids).logits, got.logits)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_quantized_folder_generates_through_load(model_dir, tmp_path, method):
    out = quantize(model_dir, method, tmp_path / "q", verbose=False)
    lm = vs.load(out, device="cpu")
    assert isinstance(lm.model.blocks[0].ffn.gate, QuantizedFlyLoRALinear)
    text = lm.generate("the cat", max_new_tokens=12, temperature=0.0)
    assert isinstance(text, str)
    toks = list(lm.stream("the cat", max_new_tokens=12, temperature=0.0))
    assert "".join(t.text for t in toks) == text  # stream and generate agree
    assert all(0.0 <= t.confidence <= 1.0 for t in toks)
    # Greedy decode with the KV cache equals re-reading the whole sequence each step.
    ids = lm.tokenizer.encode("the cat")
    with torch.no_grad():
        for tok in toks:
            if tok.special:
                break
            logits = lm.model(torch.tensor([ids])).logits[0, -1]
            assert int(logits.argmax()) == tok.id
            ids.append(tok.id)
    reply = lm.chat([{"role": "user", "content": "the dog"}], max_new_tokens=6,
                    temperature=0.0)
    assert isinstance(reply, str)


def test_the_answer_mlp_stays_full_precision_through_bitsandbytes(model_dir, tmp_path):
    """Calibration may give the MetaHead an answer MLP: quantization leaves it out, as
    the rest of the MetaHead, and the loaded folder builds it again."""
    model = vs.VesperLM.from_pretrained(model_dir)
    model.set_answer_mlp(8)
    with torch.no_grad():
        for p in model.metahead.answer_mlp.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "m", extra_files={
        "tokenizer.json": model_dir / "tokenizer.json"})
    out = quantize(tmp_path / "m", "int8", tmp_path / "q", verbose=False)
    block = json.loads((out / "config.json").read_text())["quantization"]
    assert not any("answer_mlp" in name for name in block["quantized"])
    lm = vs.load(out, device="cpu")
    mlp = lm.model.metahead.answer_mlp
    for got, want in zip(mlp.parameters(), model.metahead.answer_mlp.parameters(),
                         strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.half().float())  # fp16 on disk, as the rest


def test_quantized_perplexity_is_close_to_fp32(model_dir, tmp_path):
    from vesper_sdk.inference import TorchBackend

    tok = VesperTokenizer.from_file(model_dir)
    rng = random.Random(1)
    chunks = []
    for _ in range(4):
        ids = tok.encode(" ".join(rng.choice(WORDS) for _ in range(40)), add_bos=True)
        chunks.append((ids, [0] + [1] * (len(ids) - 1)))
    fp = backend_perplexity(TorchBackend(vs.VesperLM.from_pretrained(model_dir)), chunks)
    q8 = backend_perplexity(TorchBackend(load_quantized(
        quantize(model_dir, "int8", tmp_path / "q8", verbose=False), "cpu")), chunks)
    assert fp > 1 and abs(q8 / fp - 1) < 0.01


def test_report_perplexity_scores_only_the_assistant_tokens_of_chats(model_dir, tmp_path):
    from vesper_sdk.inference import TorchBackend

    tok = VesperTokenizer.from_file(model_dir)
    chats = [[{"role": "user", "content": "the dog sees a red tree"},
              {"role": "assistant", "content": "the cat"}]]
    docs = eval_token_docs(tok, _write_chats(tmp_path / "chats.jsonl", chats))
    ((ids, mask),) = docs
    assert ids == tok.encode_chat(chats[0]).ids
    assert mask == tok.encode_chat(chats[0]).loss_mask  # the reply and its EOS only
    backend = TorchBackend(vs.VesperLM.from_pretrained(model_dir))
    # Perplexity over the reply equals the mean NLL of exactly those tokens.
    out = backend.forward(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                          torch.arange(len(ids))[None], None)
    logp = out.logits[0, :-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    scored = torch.tensor(mask[1:], dtype=torch.bool)
    want = math.exp(-float(logp[scored].mean()))
    got = backend_perplexity(backend, _token_chunks(docs, 64, 10_000))
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx(math.exp(-float(logp.mean())), rel=1e-3)


def _write_chats(path, chats):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return str(path)


def test_unknown_method_names_the_choices_and_writes_nothing(model_dir, tmp_path):
    with pytest.raises(QuantizeError, match="int8, nf4, fp4"):
        quantize(model_dir, "int3", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_that_is_not_a_model_is_refused(tmp_path):
    bogus = tmp_path / "notes"
    bogus.mkdir()
    (bogus / "readme.txt").write_text("hello")
    with pytest.raises(ModelFolderError, match="config.json is missing"):
        quantize(bogus, "int8", tmp_path / "out")
    with pytest.raises(ModelFolderError, match="not a folder"):
        quantize(tmp_path / "nowhere", "int8", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no temp folder left


def test_out_dir_with_other_files_is_not_replaced(model_dir, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(QuantizeError, match="not a model folder"):
        quantize(model_dir, "nf4", precious)
    assert (precious / "thesis.tex").read_text() == "years of work"
    with pytest.raises(QuantizeError, match="source folder"):
        quantize(model_dir, "nf4", model_dir)


def test_quantizing_twice_and_loading_fp32_as_quantized_are_refused(model_dir, tmp_path):
    out = quantize(model_dir, "nf4", tmp_path / "q", verbose=False)
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize(out, "int8", tmp_path / "qq")
    with pytest.raises(ModelFolderError, match="no quantization block"):
        load_quantized(model_dir, "cpu")


def test_damaged_quantized_weights_name_the_file(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    out = quantize(model_dir, "int8", tmp_path / "q", verbose=False)
    state = load_file(str(out / "model.safetensors"))
    del state["blocks.1.ffn.down.SCB"]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ModelFolderError, match=r"model\.safetensors is damaged"):
        load_quantized(out, "cpu")
    (out / "manifest.json").unlink()  # without one, the missing tensor is named
    with pytest.raises(ModelFolderError, match=r"model\.safetensors.*blocks\.1\.ffn\.down"):
        load_quantized(out, "cpu")


def test_cli_quantize_writes_the_folder(model_dir, tmp_path, capsys):
    from vesper_sdk.cli import main

    assert main(["quantize", str(model_dir), "--method", "fp4", "-o", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())[
        "quantization"]["method"] == "fp4"
    assert "fp4" in capsys.readouterr().out
    # A folder that is not a model: exit 2 with the problem and the fix, nothing written.
    assert main(["quantize", str(tmp_path / "missing"), "-o", str(tmp_path / "d")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit):  # argparse rejects a method outside the choices
        main(["quantize", str(model_dir), "--method", "int2"])


def test_report_measures_every_variant_in_one_run(model_dir, tmp_path):
    data = tmp_path / "held.txt"
    rng = random.Random(2)
    data.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(30))
                                for _ in range(20)))
    lines: list[str] = []
    report = quantization_report(
        model_dir, data=str(data), json_out=tmp_path / "r.json", max_tokens=600,
        new_tokens=8, rounds=1, variants=["fp32", "bnb-int8", "bnb-nf4", "onnx-fp32"],
        print_fn=lines.append)
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["fp32", "bnb-int8", "bnb-nf4", "onnx-fp32"]
    # ONNX fp32 is the same function as PyTorch fp32: equal perplexity to float rounding.
    assert rows["onnx-fp32"]["perplexity"] == pytest.approx(rows["fp32"]["perplexity"],
                                                            rel=1e-4)
    assert rows["bnb-nf4"]["size_ratio"] < rows["bnb-int8"]["size_ratio"] < 0.7
    for r in rows.values():
        assert r["perplexity"] > 1 and r["decode_tok_s"] > 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [r["variant"] for r in saved["rows"]] == list(rows)
    assert len(saved["load_average"]) == 6  # machine load recorded beside the speed figures
    table = "\n".join(lines)
    assert "onnx-fp32" in table and "perplexity" in table
