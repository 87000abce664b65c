"""``vesper eval``: perplexity, MetaHead calibration vs the max-softmax baseline, files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import vesper_sdk as vs
from vesper_sdk import cli, skills
from vesper_sdk.eval.metrics import auroc, expected_calibration_error
from vesper_sdk.eval.report import evaluate
from vesper_sdk.eval.scorer import encode_examples, score_tokens
from vesper_sdk.inference import LLM


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread (and a busy machine makes it cost)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model folder whose tokenizer knows the skills corpus."""
    texts = [m["content"] for ex in skills.generate(300, seed=1) for m in ex["messages"]]
    tok = vs.VesperTokenizer.train(texts, vocab_size=400, min_frequency=1)
    torch.manual_seed(0)
    cfg = vs.VesperConfig.from_preset(
        "tiny", hidden_size=64, num_layers=2, num_heads=2, ffn_hidden_size=128,
        vocab_size=tok.vocab_size, max_seq_len=128, metahead_hidden_size=32,
        pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = vs.VesperLM(cfg)
    with torch.no_grad():
        model.metahead.out.weight.normal_(0.0, 1.0)
    d = tmp_path_factory.mktemp("evalmodel") / "m"
    model.save_pretrained(d)
    tok.save(d)
    return d


def test_vesper_eval_builtin_skills_prints_and_writes(model_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["eval", str(model_dir), "--data", "builtin:skills", "--out-dir", str(out),
                     "--max-examples", "40", "--skills-questions", "6",
                     "--shifted-questions", "5", "--max-answer-tokens", "4", "--device", "cpu",
                     "--calibration-chats", "50", "--json", str(tmp_path / "full.json")]) == 0
    text = capsys.readouterr().out
    for needle in ("perplexity", "ECE (15 bins)", "AUROC", "MetaHead confidence",
                   "max softmax prob (baseline)", "max softmax, recalibrated",
                   "answers (greedy, exact match)", "answer confidence signal", "PRR"):
        assert needle in text
    png = (out / "reliability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    report = json.loads((out / "calibration.json").read_text())
    assert report["tokens"] > 100 and report["documents"] == 40
    assert report["perplexity"] > 1.0
    assert f"{report['perplexity']:.3f}" in text
    for key in ("metahead", "max_softmax"):
        s = report[key]
        assert s["n"] == report["tokens"]  # both signals on the same tokens
        assert 0.0 <= s["ece"] <= 1.0 and len(s["reliability"]["counts"]) == 15
        assert f"{s['ece']:.3f}" in text
        lo, hi = s["ci95"]["auroc"]
        assert lo <= hi and f"[{lo:.3f}, {hi:.3f}]" in text
    diff = report["metahead_minus_baseline"]
    # Held-out draws can repeat a chat: its copies are one group of the bootstrap.
    distinct = report["distinct_documents"]
    assert 1 <= distinct <= 40 and diff["documents"] == distinct and diff["resamples"] == 200
    assert diff["ece"] == pytest.approx(report["metahead"]["ece"] - report["max_softmax"]["ece"])
    assert f"bootstrap resamples of the {distinct} distinct documents" in text
    assert report["skills"]["n"] == 6 and 0.0 <= report["skills"]["accuracy"] <= 1.0
    # The answer-level comparison, in the shape the --json report promises.
    full = json.loads((tmp_path / "full.json").read_text())
    ans = full["answers"]
    assert ans["n"] == 6 and set(ans["methods"]) >= {"metahead_answer", "metahead_mean",
                                                      "sequence_probability",
                                                      "mean_token_probability",
                                                      "min_token_probability"}
    for m in ans["methods"].values():
        assert {"auroc", "auroc_ci95", "prr", "ece", "selective_accuracy_80"} <= set(m)
    d = ans["metahead_minus_best_baseline"]
    assert d["baseline"] in ans["methods"] and not d["baseline"].startswith("metahead")
    assert 1 <= ans["questions"] <= 6 and set(ans["distinct"]["auroc"]) == set(ans["methods"])
    # The same comparison on questions off the training distribution (the held shifts).
    shifted = full["answers_shifted"]
    assert shifted["n"] == 5 and set(shifted["methods"]) == set(ans["methods"])
    assert "shifted questions (slots the training data never had)" in text
    assert "max_softmax_calibrated" in full and full["max_softmax_calibrated"]["n"] == \
        report["tokens"]
    # Platt-scaled on the split the MetaHead's confidence is refitted on, not on these tokens.
    fitted_on = full["max_softmax_calibrated"]["fitted_on"]
    assert fitted_on == "builtin:skills calibration split, 50 chats"
    # The token-level target's comparison, with its paired interval.
    cal = full["metahead_minus_calibrated_baseline"]
    assert cal["ece"] == pytest.approx(full["metahead"]["ece"]
                                       - full["max_softmax_calibrated"]["ece"])
    lo, hi = cal["ci95"]["ece"]
    assert lo <= hi and f"MetaHead - recalibrated baseline: ECE {cal['ece']:+.4f}" in text


def test_scores_match_a_direct_computation(model_dir, tmp_path):
    """Perplexity, ECE and AUROC equal a hand-rolled pass over the same tokens."""
    lm = vs.load(model_dir, device="cpu")
    texts = ["What is 3+4?", "How many letters are in the word banana?", "7"]
    data = tmp_path / "held.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    report = evaluate(lm, str(data), out_dir=tmp_path / "o", bins=15)
    nll, correct, conf, msp = [], [], [], []
    ref = vs.VesperLM.from_pretrained(model_dir)
    with torch.no_grad():
        for t in texts:
            ids = lm.tokenizer.encode(t, add_bos=True, add_eos=True)
            out = ref(torch.tensor([ids]))
            logp = out.logits[0, :-1].log_softmax(-1)
            tgt = torch.tensor(ids[1:])
            nll += (-logp.gather(-1, tgt[:, None])[:, 0]).tolist()
            correct += (logp.argmax(-1) == tgt).float().tolist()
            conf += out.confidence[0, :-1].tolist()
            msp += logp.exp().max(-1).values.tolist()
    assert report["tokens"] == len(nll)
    assert report["perplexity"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)
    assert report["metahead"]["ece"] == pytest.approx(
        expected_calibration_error(conf, correct), abs=1e-5)
    assert report["max_softmax"]["ece"] == pytest.approx(
        expected_calibration_error(msp, correct), abs=1e-5)
    if 0 < sum(correct) < len(correct):
        assert report["metahead"]["auroc"] == pytest.approx(auroc(conf, correct), abs=1e-6)
    assert "skills" not in report
    assert (tmp_path / "o" / "reliability.png").is_file()


def test_windows_score_every_token_once(model_dir):
    lm = vs.load(model_dir, device="cpu")
    long_text = " ".join(f"{i}+{i}={2 * i}" for i in range(30))
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    examples = encode_examples(lm.tokenizer, [long_text, chat])
    want = sum(sum(mask[1:]) for _, mask in examples)
    for seq_len in (8, 33, 128):
        stats = score_tokens(lm, examples, seq_len=seq_len, batch_size=3)
        assert stats.n == want
    # Chats are scored on the assistant turn (its content and EOS) only.
    chat_ids, chat_mask = examples[1]
    assert sum(chat_mask) == len(lm.tokenizer.encode("4")) + 1


def test_txt_data_and_in_memory_llm(model_dir, tmp_path):
    lm = LLM(vs.VesperLM.from_pretrained(model_dir), vs.VesperTokenizer.from_file(model_dir))
    data = tmp_path / "held.txt"
    data.write_text("What is 3+4?\n\nHow many days are in a week?\n")
    report = evaluate(lm, str(data), out_dir=tmp_path / "t")
    assert report["documents"] == 2 and report["tokens"] > 5
    with pytest.raises(ValueError, match="out_dir"):
        evaluate(lm, str(data))


def test_the_one_scorer_is_cross_entropy_and_top1_of_the_logits():
    import torch.nn.functional as F

    from vesper_sdk.eval.scorer import score_labels

    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 11) * 3, torch.randint(0, 11, (2, 5))
    labels[0, 0] = int(logits[0, 0].argmax())  # at least one right top-1
    s = score_labels(logits, labels)
    torch.testing.assert_close(-s.logprob, F.cross_entropy(
        logits.reshape(-1, 11), labels.reshape(-1), reduction="none").view(2, 5))
    assert torch.equal(s.correct, logits.argmax(-1) == labels) and bool(s.correct[0, 0])
    torch.testing.assert_close(s.top1_prob, logits.softmax(-1).amax(-1))


def test_prr_is_one_for_an_oracle_zero_for_chance_and_negative_when_inverted() -> None:
    from vesper_sdk.eval.answers import prr, risk_coverage, selective_accuracy

    correct = np.array([1, 1, 0, 1, 0, 0, 1, 0], dtype=float)
    assert prr(correct, correct) == pytest.approx(1.0)
    assert prr(-correct, correct) < 0
    rng = np.random.default_rng(0)
    chance = [prr(rng.random(correct.size), correct) for _ in range(2000)]
    assert abs(np.mean(chance)) < 0.05
    assert selective_accuracy(correct, correct, 0.5) == 1.0
    cov, risk = risk_coverage(correct, correct)
    assert cov[-1] == 1.0 and risk[-1] == pytest.approx(0.5) and risk[0] == 0.0


def test_answer_signals_come_from_one_forward_over_the_answer() -> None:
    from vesper_sdk.eval.answers import signals_of

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    answer = torch.tensor([0, 2])
    s = signals_of(logits, torch.tensor([0.9, 0.5]), torch.tensor([1.0, -3.0]), answer)
    lp = logits.log_softmax(-1)
    assert s["metahead_mean"] == pytest.approx(0.7) and s["metahead_min"] == pytest.approx(0.5)
    assert s["metahead_answer"] == pytest.approx(1 / (1 + np.exp(1.0)))  # sigmoid(mean)
    assert s["sequence_probability"] == pytest.approx(float((lp[0, 0] + lp[1, 2]).exp()))
    assert s["min_token_probability"] == pytest.approx(float(lp[1, 2].exp()))
    assert s["neg_max_entropy"] <= s["neg_mean_entropy"] <= 0


def test_recalibrated_max_softmax_is_fitted_out_of_fold() -> None:
    from vesper_sdk.eval.report import recalibrated_msp

    rng = np.random.default_rng(1)
    msp = rng.uniform(0.5, 1.0, 4000)
    correct = (rng.random(4000) < msp ** 3).astype(float)  # over-confident softmax
    groups = np.repeat(np.arange(400), 10)
    fixed = recalibrated_msp(msp, correct, groups)
    assert expected_calibration_error(fixed, correct) < expected_calibration_error(msp, correct)
    assert auroc(fixed, correct) == pytest.approx(auroc(msp, correct), abs=0.01)  # monotone


def test_the_answer_row_fit_finds_what_predicts_right_answers_across_questions() -> None:
    from vesper_sdk.eval.metrics import auroc, fit_answer_row

    rng = np.random.default_rng(0)

    def answers(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, 12))
        return x, (x[:, 3] - 0.5 * x[:, 7] + 0.5 * rng.normal(size=n) > 0).astype(float)

    x, y = answers(600)
    groups = np.repeat(np.arange(200), 3)  # each question asked three times
    useless = np.eye(12)[11]  # the row before: reads a feature that knows nothing
    fit = fit_answer_row(x, y, groups, useless, 0.0)
    assert np.isfinite(fit.l2) and fit.groups == 200 and fit.answers == 600
    assert fit.cv_auroc[fit.l2] > 0.8 > 0.6 > fit.cv_auroc[float("inf")]
    fresh_x, fresh_y = answers(400)
    assert auroc(fresh_x @ fit.weight + fit.bias, fresh_y) > 0.85
    # The row given ranks best (it reads the very feature that decides): kept, with its
    # ranking, but Platt-scaled into an answer's probability.
    knows = np.eye(12)[3] * 10.0  # far too sure of itself
    y_sharp = (x[:, 3] + 0.3 * rng.normal(size=600) > 0).astype(float)
    scaled = fit_answer_row(x, y_sharp, groups, knows, 0.0)
    assert scaled.l2 == float("inf")
    assert np.count_nonzero(scaled.weight) == 1 and 0 < scaled.weight[3] < 10.0
    # Nothing to tell apart (every answer wrong): the row stays as it was.
    kept = fit_answer_row(x, np.zeros(600), groups, useless, 0.25)
    assert kept.l2 == float("inf") and kept.bias == 0.25
    assert np.array_equal(kept.weight, useless)
