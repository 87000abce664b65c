"""Training: losses and targets, the loop end to end, resume, fine-tuning, failure paths."""

from __future__ import annotations

import json
import math
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vesper_sdk as vs
import vesper_sdk.model.vesper as vesper_mod
from vesper_sdk import cli
from vesper_sdk.eval.metrics import expected_calibration_error
from vesper_sdk.model import VesperOutput
from vesper_sdk.model.metahead import metahead_loss, metahead_targets
from vesper_sdk.training import TrainOptions, run
from vesper_sdk.training import checkpoint as ckpt
from vesper_sdk.training.autoscale import LADDER, estimate_training_memory, plan
from vesper_sdk.training.evaluation import CalibrationMeter
from vesper_sdk.training.options import TrainingError
from vesper_sdk.training.schedule import LRSchedule

# A very small model and data set: every run here takes seconds on two CPU cores.
SMALL = dict(hidden_size=64, num_layers=2, num_heads=2, ffn_hidden_size=128, vocab_size=384,
             builtin_examples=1500, progress=False, eval_batches=4,
             # The defaults (10,000 chats, 4,000 greedy answers) take minutes per run.
             calibration_examples=300, calibration_answers=300)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Models this small gain nothing from intra-op threads, and on a busy 2-core machine
    # OpenMP's spinning threads make each step up to 50x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """SMALL plus one token cache shared by the module's runs (tokenized once)."""
    return {**SMALL, "cache_dir": str(tmp_path_factory.mktemp("cache"))}


def _rows(result) -> list[dict]:
    return [json.loads(line) for line in result.metrics_path.read_text().splitlines()]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, small):
    out = tmp_path_factory.mktemp("base")
    return vs.train("builtin:skills", out, preset="tiny", **small, seq_len=64, batch_size=16,
                    max_steps=80, lr=3e-3, eval_every=40, checkpoint_every=40,
                    keep_checkpoints=1, log_every=10)


# ----------------------------------------------------------------------------- pieces
def _out(logits: torch.Tensor, meta: torch.Tensor) -> VesperOutput:
    z = torch.zeros(logits.shape[:2])
    return VesperOutput(logits, z, z, meta[..., 2:5], z, torch.zeros(()), None, z, meta)


def test_metahead_targets_from_the_lms_own_predictions():
    logits = torch.tensor([[[5.0, 4, 3, 2, 1, 0, -1], [0, 1, 2, 3, 4, 5, 6],
                            [0, 1, 2, 3, 4, 5, 6]]])
    labels = torch.tensor([[0, 2, 0]])  # right; in top-5 (ranks 6,5,4,3,2); miss
    t = metahead_targets(logits, labels, eos_id=2)
    assert t.correct.tolist() == [[True, False, False]]
    assert t.error_class.tolist() == [[0, 1, 2]]
    assert t.stop.tolist() == [[False, True, False]]


def test_metahead_loss_counts_masked_positions_only():
    torch.manual_seed(0)
    logits, meta = torch.randn(2, 5, 11), torch.randn(2, 5, 5)
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    base = metahead_loss(_out(logits, meta), labels, mask, eos_id=3)
    meta2 = meta.clone()
    meta2[~mask] += 100.0  # garbage where the mask is off
    assert torch.allclose(base, metahead_loss(_out(logits, meta2), labels, mask, eos_id=3))
    meta3 = meta.clone()
    meta3[0, 0] += 5.0
    assert not torch.allclose(base, metahead_loss(_out(logits, meta3), labels, mask, eos_id=3))
    # Default normaliser: the mean over masked positions of the three terms.
    t = metahead_targets(logits, labels, 3)
    m = meta[mask]
    ref = (torch.nn.functional.binary_cross_entropy_with_logits(
        m[:, 0], t.correct[mask].float(), reduction="sum")
        + torch.nn.functional.binary_cross_entropy_with_logits(
            m[:, 1], t.stop[mask].float(), reduction="sum")
        + torch.nn.functional.cross_entropy(m[:, 2:], t.error_class[mask], reduction="sum")
        ) / mask.sum()
    assert torch.allclose(base, ref)


def test_training_calibration_meter_equals_the_eval_ece_batch_by_batch():
    # Training streams its ECE through CalibrationMeter; vesper eval uses metacog's. They
    # must be the one measure: same bins (edges included), same formula.
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(4, 500, generator=gen)
    conf[0, :16] = torch.arange(16) / 15  # every bin edge, 0 and 1
    correct = torch.rand(4, 500, generator=gen) < conf
    mask = torch.rand(4, 500, generator=gen) < 0.8
    meter = CalibrationMeter()
    for i in range(4):  # four batches
        meter.update(conf[i], correct[i], mask[i])
    assert meter.ece() == pytest.approx(
        expected_calibration_error(conf[mask], correct[mask]), abs=1e-12)
    conf = torch.full((10,), 0.85)
    meter = CalibrationMeter()
    meter.update(conf, torch.tensor([1] * 8 + [0] * 2).bool(), torch.ones(10, dtype=torch.bool))
    assert meter.ece() == pytest.approx(0.05)  # 80 % right at 85 % confidence
    assert np.isnan(CalibrationMeter().ece())


def test_lr_schedules():
    cos = LRSchedule("cosine", 1.0, warmup=10, total=110, min_ratio=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(60) == pytest.approx(0.55)
    assert cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    lin = LRSchedule("linear", 2.0, warmup=0, total=100, min_ratio=0.0)
    assert lin(50) == pytest.approx(1.0) and lin(100) == pytest.approx(0.0)
    assert LRSchedule("constant", 3.0, 5, 100)(99) == 3.0


def test_unknown_option_is_a_type_error_naming_the_valid_ones(tmp_path):
    with pytest.raises(TypeError) as exc:
        vs.train("builtin:skills", tmp_path, max_stepz=3)
    assert "max_stepz" in str(exc.value) and "max_steps" in str(exc.value)
    with pytest.raises(ValueError, match="optimizer"):
        vs.train("builtin:skills", tmp_path, optimizer="sgd")
    with pytest.raises(ValueError, match="init_from"):
        vs.train("builtin:skills", tmp_path, finetune="flylora")


def test_cli_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--max-steps", "--preset", "--finetune", "--init-from", "--resume",
                "--optimizer", "--grad-accum", "--precision", "--tensorboard",
                "--profile-memory", "builtin:skills", "auto"):
        assert opt in text, opt


# ----------------------------------------------------------------------------- the loop
def test_training_on_skills_lowers_val_loss_and_writes_a_loadable_model(base_run):
    r = base_run
    rows = _rows(r)
    val = [row for row in rows if "val_loss" in row]
    assert val[0]["step"] == 0 and val[-1]["step"] == 80
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 2.0, val
    assert 0.0 <= val[-1]["val_ece"] <= 1.0 and val[-1]["val_acc"] > val[0]["val_acc"]
    train_rows = [row for row in rows if "loss" in row]
    assert {"step", "loss", "lr", "tok_s", "peak_rss_mb", "grad_norm"} <= set(train_rows[0])
    assert r.steps == 80 and r.skipped_steps == 0 and r.tokens_per_second > 0
    assert sorted(p.name for p in r.model_dir.iterdir()) == [
        "README.md", "config.json", "manifest.json", "model.safetensors", "modeling_vesper.py",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert r.loss_curve.is_file() and r.loss_curve.read_bytes()[:4] == b"\x89PNG"
    lm = vs.load(r.model_dir, device="cpu")
    assert lm.tokenizer.vocab_size <= lm.config.vocab_size
    scores = lm.score("What is 2+3?")
    assert scores and all(math.isfinite(s.logprob) for s in scores)
    # keep_checkpoints=1 plus the best one; best.json names the lowest val loss.
    steps = [s for s, _ in ckpt.list_checkpoints(r.out_dir / "checkpoints")]
    assert steps == [80] and r.best_checkpoint.name == "step-00000080"
    # A checkpoint is itself a loadable model folder.
    assert vs.load(r.checkpoint, device="cpu").config.hidden_size == 64
    # The saved model's confidence row was refitted on held-out tokens after the last
    # checkpoint, the fit folded into the row (calibration back to identity).
    m = r.metrics
    assert m["calibration_tokens"] > 100 and m["calibration_groups"] > 10
    assert math.isfinite(m["calibration_cv_log_loss"])
    assert m["calibration_cv_log_loss"] <= m["calibration_cv_log_loss_platt"] + 1e-12
    head = lm.model.metahead
    assert head.calibration.tolist() == [1.0, 0.0]
    trained = vs.load(r.checkpoint, device="cpu").model.metahead
    assert not torch.equal(head.out.weight[0], trained.out.weight[0])
    assert torch.equal(head.out.weight[1:], trained.out.weight[1:])  # stop, error: untouched


@pytest.mark.parametrize("optimizer", ["velvet", "adamw"])
def test_resume_continues_exactly(tmp_path, optimizer, small):
    opts = dict(**small, seq_len=32, batch_size=4, max_steps=40, lr=2e-3, log_every=1,
                eval_every=10, checkpoint_every=10, optimizer=optimizer)
    straight = vs.train("builtin:skills", tmp_path / "a", **opts)
    first = vs.train("builtin:skills", tmp_path / "b", stop_at_step=20, **opts)
    assert first.steps == 20 and ckpt.latest_checkpoint(tmp_path / "b" / "checkpoints")
    second = vs.train("builtin:skills", tmp_path / "b", resume=True, **opts)
    assert second.steps == 40
    a = [h["loss"] for h in straight.history]
    b = [h["loss"] for h in first.history + second.history]
    assert len(a) == len(b) == 40
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6
    # The metrics file of the resumed run reads like one run: each step once.
    steps = [row["step"] for row in _rows(second) if "loss" in row]
    assert steps == list(range(1, 41))
    wa = load_file(str(straight.model_dir / "model.safetensors"))
    wb = load_file(str(second.model_dir / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_gradient_accumulation_matches_a_big_batch(tmp_path, small):
    opts = dict(**small, seq_len=32, max_steps=4, lr=2e-3, eval_every=0, log_every=1,
                checkpoint_every=0, val_fraction=0.0)
    big = vs.train("builtin:skills", tmp_path / "a", batch_size=4, **opts)
    # Gradient checkpointing recomputes activations: the same numbers, less memory.
    acc = vs.train("builtin:skills", tmp_path / "b", batch_size=2, grad_accum=2,
                   gradient_checkpointing=True, **opts)
    assert len(big.history) == len(acc.history) == 4
    for x, y in zip(big.history, acc.history, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    # The folder now holds a run: starting another there without resume is refused.
    with pytest.raises(ValueError, match="resume=True"):
        vs.train("builtin:skills", tmp_path / "a", batch_size=4, **{**opts, "checkpoint_every": 2})


def test_flylora_finetune_trains_only_lora_b_and_metahead(base_run, tmp_path, capsys):
    r = vs.train("builtin:skills", tmp_path / "ft", init_from=str(base_run.model_dir),
                 finetune="flylora", max_steps=5, lr=1e-2, seq_len=64, batch_size=8,
                 builtin_examples=500, progress=False, eval_every=0, checkpoint_every=0,
                 calibration_examples=300, calibration_answers=300)
    before = load_file(str(base_run.model_dir / "model.safetensors"))
    after = load_file(str(r.model_dir / "model.safetensors"))
    # Fitted again at the end of every run, not trained: the calibration buffer, the
    # answer row and the answer MLP (which each run's calibration keeps or drops).
    mlp = "metahead.answer_mlp."
    assert {k for k in before if not k.startswith(mlp)} == {
        k for k in after if not k.startswith(mlp)}
    refit = ("metahead.calibration", "metahead.answer.weight", "metahead.answer.bias",
             *(k for k in before if k.startswith(mlp)))
    trainable = [k for k in before if k not in refit and (
        k.endswith("lora_B") or k.startswith("metahead."))]
    expected = sum(before[k].numel() for k in trainable)
    assert r.trainable_params == expected < r.total_params
    assert f"trainable parameters: {expected:,} of {r.total_params:,}" in capsys.readouterr().out
    frozen = [k for k in before if k not in trainable and k not in refit
              and not k.endswith("balance_bias")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("lora_B"))
    assert vs.load(r.model_dir, device="cpu").tokenizer.to_json() == \
        vs.load(base_run.model_dir, device="cpu").tokenizer.to_json()


def test_nonfinite_losses_are_skipped(tmp_path, monkeypatch, small):
    real = vesper_mod.head_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        # Training calls 3 and 4 (evaluation is off) are NaN.
        if calls["n"] in (3, 4):
            loss.lm_loss_sum = loss.lm_loss_sum * float("nan")
        return loss

    monkeypatch.setattr(vesper_mod, "head_loss", flaky)
    r = vs.train("builtin:skills", tmp_path, **small, seq_len=32, batch_size=4, max_steps=8,
                 eval_every=0, val_fraction=0.0, log_every=1, checkpoint_every=0)
    assert r.steps == 8 and r.skipped_steps == 2 and len(r.history) == 6
    assert [row["skipped"] for row in _rows(r)][-1] == 2


def test_many_nonfinite_losses_stop_with_a_diagnosis(tmp_path, monkeypatch, small):
    real = vesper_mod.head_loss

    def infinite(*args, **kwargs):
        loss = real(*args, **kwargs)
        loss.lm_loss_sum = loss.lm_loss_sum * float("inf")
        return loss

    monkeypatch.setattr(vesper_mod, "head_loss", infinite)
    with pytest.raises(TrainingError) as exc:
        vs.train("builtin:skills", tmp_path, **small, seq_len=32, batch_size=4, max_steps=50,
                 eval_every=0, max_nonfinite=4, checkpoint_every=0)
    msg = str(exc.value)
    assert "4 non-finite losses in a row" in msg and "learning rate" in msg
    assert "bad data" in msg


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_or_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path, monkeypatch, small,
                                                                  sig):
    real = vesper_mod.head_loss
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            signal.raise_signal(sig)  # as if Ctrl-C (or a job scheduler's kill) in step 7
        return real(*args, **kwargs)

    monkeypatch.setattr(vesper_mod, "head_loss", interrupting)
    opts = dict(**small, seq_len=32, batch_size=4, max_steps=12, eval_every=0,
                checkpoint_every=0)
    r = vs.train("builtin:skills", tmp_path, **opts)
    assert r.interrupted and r.model_dir is None and r.steps == 7
    assert r.metrics_step is None and not r.metrics  # no evaluation ran before step 7
    assert r.checkpoint == ckpt.step_dir(tmp_path / "checkpoints", 7)
    assert signal.getsignal(sig) is not None  # handlers restored
    monkeypatch.setattr(vesper_mod, "head_loss", real)
    done = vs.train("builtin:skills", tmp_path, resume=True, **opts)
    assert not done.interrupted and done.steps == 12 and done.model_dir.is_dir()
    assert done.metrics_step == 12 and "val_loss" in done.metrics


def test_resume_under_another_schedule_says_it_will_not_match(tmp_path, small):
    opts = dict(**small, seq_len=32, batch_size=4, eval_every=0, checkpoint_every=0)
    vs.train("builtin:skills", tmp_path, max_steps=8, stop_at_step=4, **opts)

    def resume(**more) -> list[str]:
        logs: list[str] = []
        run(TrainOptions(data="builtin:skills", out_dir=str(tmp_path), preset="tiny",
                         resume=True, **opts, **more), log=logs.append)
        return logs

    same = resume(max_steps=8, stop_at_step=6)  # a pause keeps the schedule
    assert any("continuing from" in m for m in same)
    assert not any("schedule changed" in m for m in same)
    longer = resume(max_steps=16)
    assert any("schedule changed" in m and "total 8 -> 16" in m for m in longer)
    # Optimizer settings are not in the optimizer's state: a change is said, not hidden.
    guided = resume(max_steps=16, perplexity_guided=True)
    assert any("perplexity_guided changed (False -> True)" in m for m in guided)


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_pruning_keeps_last_k_and_best(tmp_path):
    for step in (10, 20, 30, 40, 50):
        d = ckpt.step_dir(tmp_path, step)
        d.mkdir()
        (d / ckpt.STATE_JSON).write_text("{}")
    ckpt.record_best(tmp_path, 20, 1.5)
    ckpt.prune_checkpoints(tmp_path, keep_last=2, keep_steps={20})
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [20, 40, 50]
    assert ckpt.best_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 20)
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.step_dir(tmp_path, 50)


def test_optimizer_state_round_trips_without_pickle():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    tensors: dict[str, torch.Tensor] = {}
    flat = ckpt.flatten_state(opt.state_dict(), tensors)
    json.dumps(flat)  # the structure is plain JSON
    back = ckpt.unflatten_state(json.loads(json.dumps(flat)), tensors)
    ref = opt.state_dict()
    assert back["param_groups"] == ref["param_groups"]  # tuples (betas) survive
    assert set(back["state"]) == {0, 1}  # integer keys survive
    for k in ref["state"]:
        for name, value in ref["state"][k].items():
            assert torch.equal(back["state"][k][name], value)


# ----------------------------------------------------------------------------- autoscale
def test_autoscale_picks_bigger_models_for_more_tokens():
    kw = dict(vocab_size=4096, seq_len=256, batch_size=8, budget=64 * 2**30)
    picks = [plan(tokens, **kw) for tokens in (10**5, 10**7, 2 * 10**8, 3 * 10**9, 10**12)]
    params = [p.config.num_parameters() for p in picks]
    assert params == sorted(params) and len(set(params)) >= 4
    assert picks[0].name == "pico"  # below tiny for very little data
    assert picks[2].config.num_parameters() <= 2 * 10**8 / 20
    assert any("Chinchilla" in line for line in picks[1].reasons)
    # Memory bounds the pick: the same data on a small budget gets a smaller model.
    small = plan(10**12, vocab_size=4096, seq_len=256, batch_size=8, budget=2 * 2**30)
    assert small.config.num_parameters() < picks[-1].config.num_parameters()
    assert estimate_training_memory(small.config, 8, 256) <= 2 * 2**30


def test_preset_auto_end_to_end(tmp_path, capsys):
    r = vs.train("builtin:skills", tmp_path, preset="auto", vocab_size=384,
                 builtin_examples=500, seq_len=32, batch_size=4, max_steps=2,
                 eval_every=0, checkpoint_every=0, progress=False, profile_memory=True,
                 tensorboard=True, calibration_examples=300, calibration_answers=300)
    config = json.loads((r.model_dir / "config.json").read_text())
    assert config["preset"] in LADDER
    out = capsys.readouterr().out
    assert "autoscale:" in out and "tokens per parameter" in out
    assert "profile_memory: CUDA memory snapshots need a GPU" in out
    # TensorBoard is optional: either it logged, or the run said why not and went on.
    assert (tmp_path / "tensorboard").is_dir() or "tensorboard: not installed" in out


def test_progress_row_gives_mfu_against_the_measured_matmul_rate_when_there_is_one():
    from types import SimpleNamespace

    from vesper_sdk.training.loop import _interval_row

    cfg = vs.VesperConfig.from_preset("tiny", vocab_size=512)
    tr = SimpleNamespace(device=torch.device("cpu"), position=4, skipped=0,
                         sampler=SimpleNamespace(batches_per_epoch=8),
                         raw_model=SimpleNamespace(config=cfg),
                         opts=SimpleNamespace(seq_len=128), dist=SimpleNamespace(world=2),
                         matmul_peak=None)
    interval = [{"finite": 1.0, "loss": 2.0, "meta_loss": 0.5, "tokens": 1000, "lr": 1e-3,
                 "grad_norm": 1.0}] * 2
    row = _interval_row(tr, interval, seconds=0.5)
    assert row["tok_s"] == 4000 and "mfu" not in row  # no GPU: no rate to divide by
    tr.matmul_peak = 100.0  # TFLOP/s, per GPU
    row = _interval_row(tr, interval, seconds=0.5)
    want = cfg.estimate_flops_per_token(128) * 4000 / 2 / 100e12
    assert row["mfu"] == pytest.approx(want)
