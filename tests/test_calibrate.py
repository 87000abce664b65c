"""``vesper calibrate`` / ``vesper_sdk.calibrate``: refit the MetaHead confidence on held-out
data, save atomically, change nothing else."""

from __future__ import annotations

import json

import pytest
import torch
from _fixtures_serve import make_tiny_model

import vesper_sdk as vs
from vesper_sdk import cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("calibrate") / "tiny")


def test_vesper_calibrate_refits_the_confidence_and_answer_rows_only(model_dir, tmp_path, capsys):
    out = tmp_path / "recalibrated"
    assert cli.main(["calibrate", str(model_dir), "--examples", "400", "--answers", "400",
                     "--out-dir", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "MetaHead confidence refit on" in text and "cross-validation" in text
    before = vs.VesperLM.from_pretrained(model_dir).state_dict()
    after = vs.VesperLM.from_pretrained(out).state_dict()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    # The confidence row and bias of the output layer (a calibration other than the
    # identity would be folded into them and reset), and the answer row.
    # (A random model answers every question wrong: its answer row stays as it was.)
    answer_row = {"metahead.answer.bias", "metahead.answer.weight"}
    assert {"metahead.out.bias", "metahead.out.weight"} <= set(changed) <= {
        "metahead.calibration", "metahead.out.bias", "metahead.out.weight"} | answer_row
    assert torch.equal(before["metahead.out.weight"][1:], after["metahead.out.weight"][1:])
    assert after["metahead.calibration"].tolist() == [1.0, 0.0]
    assert "MetaHead answer row fitted on 400 greedy answers" in text
    assert (out / "tokenizer.json").is_file()
    lm = vs.load(out, device="cpu")
    toks = lm.generate_tokens(["What is 2+3?"], max_new_tokens=4, temperature=0.0)[0]
    assert all(0.0 <= t.confidence <= 1.0 for t in toks)
    # The decode loop's answer logits are the fitted row's, as a whole-sequence forward
    # gives them.
    prompt = lm.tokenizer.encode("What is 2+3?", add_bos=True)
    ids = [t.id for t in toks]
    with torch.no_grad():
        full = lm.model(torch.tensor([prompt + ids]))
    expected = full.answer[0, len(prompt) - 1:len(prompt) + len(ids) - 1]
    torch.testing.assert_close(torch.tensor([t.answer_logit for t in toks]), expected,
                               rtol=1e-4, atol=1e-4)


def test_too_few_graded_answers_leave_the_answer_row_as_it_was(model_dir):
    from vesper_sdk.training.calibration import CalibrationWarning, refit_answer, skills_questions

    model = vs.VesperLM.from_pretrained(model_dir)
    before = model.metahead.answer.weight.clone()
    qs, groups = skills_questions(20, 0)
    with pytest.warns(CalibrationWarning,
                      match=r"20 answers to \d+ questions \(a fit needs at least 100"):
        assert refit_answer(model, vs.VesperTokenizer.from_file(model_dir), qs, groups) is None
    assert torch.equal(model.metahead.answer.weight, before)


def test_calibrate_on_a_jsonl_file_groups_by_document(model_dir, tmp_path):
    data = tmp_path / "heldout.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                           {"role": "assistant", "content": f"{2 * i} is the answer"}]}
             for i in range(300)]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    fit = vs.calibrate(model_dir, str(data), out_dir=tmp_path / "m", examples=300,
                       device="cpu")
    assert fit["calibration_groups"] > 100 and fit["calibration_tokens"] >= 100
    assert fit["calibration_cv_log_loss"] <= fit["calibration_cv_log_loss_platt"]


def test_too_little_held_out_data_is_a_clear_error_and_writes_nothing(model_dir, tmp_path,
                                                                      capsys):
    data = tmp_path / "tiny.txt"
    data.write_text("just a few words\n")
    out = tmp_path / "never"
    assert cli.main(["calibrate", str(model_dir), "--data", str(data), "--out-dir", str(out),
                     "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "fewer than 100 scored tokens" in err and "more held-out data" in err
    assert not out.exists()


def test_an_existing_platt_scaling_is_folded_in_before_the_refit(model_dir):
    from vesper_sdk.training.calibration import refit_confidence, skills_batches

    tok = vs.VesperTokenizer.from_file(model_dir)
    scaled = vs.VesperLM.from_pretrained(model_dir)
    with torch.no_grad():
        scaled.metahead.calibration.copy_(torch.tensor([0.5, 0.3]))
    folded = vs.VesperLM.from_pretrained(model_dir)
    with torch.no_grad():  # the same confidence, written into the row instead
        folded.metahead.out.weight[0] *= 0.5
        folded.metahead.out.bias[0] = folded.metahead.out.bias[0] * 0.5 + 0.3
    ids = torch.randint(0, tok.vocab_size, (2, 12))
    torch.testing.assert_close(scaled(ids).confidence, folded(ids).confidence)
    fits = [refit_confidence(m, skills_batches(tok, 300, 0, 64, 8), tok.eos_id)
            for m in (scaled, folded)]
    assert fits[0] == pytest.approx(fits[1])
    torch.testing.assert_close(scaled(ids).confidence, folded(ids).confidence)
    assert scaled.metahead.calibration.tolist() == [1.0, 0.0]


def test_exports_and_quantized_folders_are_refused_with_the_way_round(model_dir, tmp_path):
    import shutil

    onnx_like = tmp_path / "onnx"
    shutil.copytree(model_dir, onnx_like)
    (onnx_like / "model.onnx").write_bytes(b"")
    before = sorted((p.name, p.read_bytes()) for p in onnx_like.iterdir())
    with pytest.raises(ValueError, match="calibrate the full-precision model folder"):
        vs.calibrate(onnx_like, examples=10)
    assert sorted((p.name, p.read_bytes()) for p in onnx_like.iterdir()) == before


def test_the_answer_row_is_fitted_from_scratch_not_on_top_of_itself(model_dir):
    """A row fitted before would win a comparison on the answers it was fitted on: the
    fit starts from the unfitted row instead (here, nothing to tell apart: the random
    model answers every question wrong, so the unfitted row is what it keeps)."""
    from vesper_sdk.training.calibration import refit_answer, skills_questions

    model = vs.VesperLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.metahead.answer.weight.normal_()
        model.metahead.answer.bias.fill_(3.0)
    qs, groups = skills_questions(150, 0)
    modules = [type(m) for m in model.modules()]
    fit = refit_answer(model, vs.VesperTokenizer.from_file(model_dir), qs, groups)
    # The decode loop's CPU module swaps are gone again: the model is as it was given.
    assert [type(m) for m in model.modules()] == modules
    assert fit is not None and fit["answer_fit_accuracy"] == 0.0
    assert fit["answer_fit_l2"] == float("inf")
    unfitted = torch.zeros_like(model.metahead.answer.weight)
    unfitted[0, -1] = 1.0
    assert torch.equal(model.metahead.answer.weight, unfitted)
    assert model.metahead.answer.bias.item() == 0.0


def test_a_refit_that_keeps_the_row_removes_an_earlier_answer_mlp(model_dir):
    """The answer logit is refitted from scratch: an MLP from an earlier calibration goes
    (config included) when this one keeps the row (here nothing to rank: every answer of
    the random model is wrong)."""
    from vesper_sdk.training.calibration import refit_answer, skills_questions

    model = vs.VesperLM.from_pretrained(model_dir)
    model.set_answer_mlp(8)
    with torch.no_grad():
        for p in model.metahead.answer_mlp.parameters():
            p.normal_()
    qs, groups = skills_questions(120, 0)
    fit = refit_answer(model, vs.VesperTokenizer.from_file(model_dir), qs, groups)
    assert fit is not None and fit["answer_fit_mlp"] == 0.0
    assert model.metahead.answer_mlp is None and model.config.metahead_answer_hidden == 0


def test_a_negative_answer_mlp_size_is_refused_before_any_work(model_dir, tmp_path):
    with pytest.raises(ValueError, match="answer_mlp must be 0"):
        vs.calibrate(model_dir, out_dir=tmp_path / "out", answer_mlp=-4)
    assert not (tmp_path / "out").exists()
