"""The model folder: save -> load is exact, damage is reported by file, writes are atomic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import vesper_sdk as vs
from vesper_sdk.model import ModelFolderError


def make_model(**kw) -> vs.VesperLM:
    torch.manual_seed(0)
    cfg = vs.VesperConfig.from_preset("tiny", hidden_size=64, num_layers=2, num_heads=2,
                                      ffn_hidden_size=96, vocab_size=300, **kw)
    m = vs.VesperLM(cfg).eval()
    with torch.no_grad():
        for layer in m.flylora_layers():
            layer.lora_B.normal_(0, 0.05)
            layer.balance_bias.normal_(0, 0.1)
    return m


def test_save_then_load_gives_identical_outputs(tmp_path):
    m = make_model()
    m.save_pretrained(tmp_path / "m")
    again = vs.VesperLM.from_pretrained(tmp_path / "m").eval()
    ids = torch.randint(0, 300, (2, 20))
    a, b = m(ids), again(ids)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.confidence, b.confidence)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "README.md", "config.json", "manifest.json", "model.safetensors", "modeling_vesper.py"]


def test_frozen_flylora_buffers_are_saved_and_tied_weights_stored_once(tmp_path):
    m = make_model()
    m.save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "blocks.0.ffn.gate.lora_A" in keys
    assert "blocks.0.ffn.gate.balance_bias" in keys
    assert "embed.weight" in keys and "lm_head.weight" not in keys
    # The RoPE table is derived, not state: it must not bloat the file.
    assert not any("rope" in k for k in keys)


def test_no_pickle_in_the_model_folder(tmp_path):
    make_model().save_pretrained(tmp_path / "m")
    for p in (tmp_path / "m").iterdir():
        assert not p.read_bytes().startswith(b"\x80")  # pickle protocol marker
    json.loads((tmp_path / "m" / "config.json").read_text())


def test_missing_config_names_the_file(tmp_path):
    make_model().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(ModelFolderError, match=r"config\.json is missing"):
        vs.VesperLM.from_pretrained(tmp_path / "m")


def test_a_training_runs_folder_points_to_its_model_folder(tmp_path):
    # `vesper train --out-dir runs/a` writes the model to runs/a/model: passing runs/a
    # is the likely slip, and every loader names the folder meant.
    from vesper_sdk.export import export_onnx

    make_model().save_pretrained(tmp_path / "run" / "model")
    hint = f"Did you mean {tmp_path / 'run' / 'model'}"
    for load in (vs.VesperLM.from_pretrained, vs.load,
                 lambda d: vs.quantize(d, method="int8", out_dir=tmp_path / "q"),
                 lambda d: export_onnx(d, tmp_path / "o")):
        with pytest.raises((ModelFolderError, FileNotFoundError), match=hint):
            load(tmp_path / "run")
    with pytest.raises(ValueError, match=hint):
        vs.train("builtin:skills", tmp_path / "ft", init_from=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="is not a folder"):
        vs.train("builtin:skills", tmp_path / "ft", init_from=str(tmp_path / "nope"))


def test_missing_weights_names_the_file(tmp_path):
    make_model().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"model\.safetensors is missing"):
        vs.VesperLM.from_pretrained(tmp_path / "m")


def test_truncated_weights_are_reported_as_damaged(tmp_path):
    make_model().save_pretrained(tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelFolderError, match=r"model\.safetensors is damaged: .*truncated"):
        vs.VesperLM.from_pretrained(tmp_path / "m")
    # Without a manifest (a folder from before them) the parse itself names the file.
    (tmp_path / "m" / "manifest.json").unlink()
    with pytest.raises(ModelFolderError, match=r"model\.safetensors is damaged or truncated"):
        vs.VesperLM.from_pretrained(tmp_path / "m")


def test_weights_from_another_config_are_reported_as_mismatched(tmp_path):
    make_model().save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["ffn_hidden_size"] = 128
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "m" / "manifest.json").unlink()  # edited by hand, as before manifests
    with pytest.raises(ModelFolderError, match="shape mismatch"):
        vs.VesperLM.from_pretrained(tmp_path / "m")


def test_bad_config_json_is_reported_with_its_path(tmp_path):
    make_model().save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{ not json")
    with pytest.raises(ModelFolderError, match=r"config\.json is damaged"):
        vs.VesperLM.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "manifest.json").unlink()
    with pytest.raises(ModelFolderError, match=r"config\.json.*not valid JSON"):
        vs.VesperLM.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"hidden_size": 100,
                                                             "num_heads": 3}))
    with pytest.raises(ModelFolderError, match="divisible by num_heads"):
        vs.VesperLM.from_pretrained(tmp_path / "m")


def test_not_a_folder_is_reported(tmp_path):
    with pytest.raises(ModelFolderError, match="is not a folder"):
        vs.VesperLM.from_pretrained(tmp_path / "nothing-here")


def test_a_crash_mid_save_leaves_the_old_folder_intact(tmp_path, monkeypatch):
    m = make_model()
    target = tmp_path / "m"
    m.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    (target / "tokenizer.json").write_text("{}")

    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with torch.no_grad():
        m.embed.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        m.save_pretrained(target)
    after = {p.name: p.read_bytes() for p in target.iterdir() if p.name != "tokenizer.json"}
    assert after == before
    assert (target / "tokenizer.json").exists()  # files we don't write are kept
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folder left behind


def test_resave_keeps_other_files_in_the_folder(tmp_path):
    m = make_model()
    m.save_pretrained(tmp_path / "m")
    Path(tmp_path / "m" / "tokenizer.json").write_text("{}")
    m.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer.json").read_text() == "{}"
