"""Fault injection: every file of a checkpoint and of a model folder truncated, zeroed and
bit-flipped; processes killed (SIGKILL) in the middle of checkpoint, model and export
writes. Each case either recovers exactly (the same final weights as an uninterrupted run,
max abs difference 0.0) or is refused with an error that names the damaged file, with no
traceback. Hostile data files are in test_faults_data.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vesper_sdk as vs
from vesper_sdk.atomic import MANIFEST_NAME, clean_orphans
from vesper_sdk.integrity import ModelFolderError, forget_verified
from vesper_sdk.training import TrainOptions
from vesper_sdk.training import checkpoint as ckpt
from vesper_sdk.training import run as run_training

RUN = dict(hidden_size=64, num_layers=2, num_heads=2, ffn_hidden_size=128, vocab_size=384,
           builtin_examples=300, progress=False, eval_batches=2, calibrate=False, seq_len=32,
           batch_size=4, eval_every=0, checkpoint_every=2, keep_checkpoints=10, max_steps=6,
           lr=2e-3)
CHECKPOINT_FILES = ["config.json", "model.safetensors", "tokenizer.json", "optimizer.json",
                    "optimizer.safetensors", "trainer_state.json", "trainer_state.safetensors",
                    MANIFEST_NAME]
MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json", MANIFEST_NAME]
DAMAGE = ["truncate", "zero", "flip"]


def damage(path: Path, how: str) -> None:
    """Truncate to half, zero 64 bytes in the middle, or flip one bit in the middle."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    if how == "truncate":
        data = data[:mid]
    elif how == "zero":
        data[mid:mid + 64] = bytes(len(data[mid:mid + 64]))
    else:
        data[mid] ^= 0x10
    path.write_bytes(bytes(data))
    forget_verified()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-exact comparisons between runs
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted run (its final weights are the reference) and one paused at step 4
    (checkpoints at steps 2 and 4), which each case copies, damages and resumes."""
    root = tmp_path_factory.mktemp("faults")
    opts = {**RUN, "cache_dir": str(root / "cache")}
    vs.train("builtin:skills", root / "straight", **opts)
    vs.train("builtin:skills", root / "paused", stop_at_step=4, **opts)
    return {"straight": root / "straight", "paused": root / "paused", "cache": root / "cache"}


def train(out: Path, cache: Path, logs: list[str] | None = None, **extra):
    """vs.train's run, with its log lines collected in ``logs``."""
    opts = TrainOptions(data="builtin:skills", out_dir=str(out), preset="tiny",
                        **{**RUN, "cache_dir": str(cache), **extra})
    return run_training(opts, log=logs.append if logs is not None else None)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff == 0.0, f"max abs difference {diff}"


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_resume_skips_a_damaged_checkpoint_and_ends_exactly(runs, tmp_path, name, how):
    run = tmp_path / "run"
    shutil.copytree(runs["paused"], run)
    damage(run / "checkpoints" / "step-00000004" / name, how)
    logs: list[str] = []
    result = train(run, runs["cache"], logs, resume=True)
    skipped = [line for line in logs if "skipping the checkpoint of step 4" in line]
    assert skipped, logs
    assert name in skipped[0] or MANIFEST_NAME in skipped[0], skipped[0]
    assert any("continuing from" in line and "step-00000002" in line for line in logs)
    assert result.steps == 6
    assert_same_weights(final_weights(run), final_weights(runs["straight"]))


def test_a_run_whose_every_checkpoint_is_damaged_is_refused_by_name(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["paused"], run)
    for step in ("step-00000002", "step-00000004"):
        damage(run / "checkpoints" / step / "optimizer.safetensors", "flip")
    with pytest.raises(ckpt.CheckpointError, match="every checkpoint .* is damaged"):
        train(run, runs["cache"], resume=True)


def test_resume_on_a_finished_run_changes_nothing(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["straight"], run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()
              and "cache" not in p.parts}
    logs: list[str] = []
    result = train(run, runs["cache"], logs, resume=True)
    assert any("already finished at step 6" in line for line in logs), logs
    assert result.final_loss is not None and result.steps == 6
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()
             and "cache" not in p.parts}
    assert after == before


# ----------------------------------------------------------------------------- model folders
@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("name", MODEL_FILES)
def test_a_damaged_model_file_is_refused_by_name(runs, tmp_path, name, how):
    model = tmp_path / "model"
    shutil.copytree(runs["straight"] / "model", model)
    damage(model / name, how)
    with pytest.raises((ModelFolderError, ValueError), match=name.replace(".", r"\.")):
        vs.load(model, device="cpu")
    for cmd in (["generate", str(model), "--prompt", "hi", "--max-new-tokens", "2"],
                ["verify", str(model)]):
        out = subprocess.run([sys.executable, "-m", "vesper_sdk.cli", *cmd],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, (cmd, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and name in out.stdout + out.stderr


@pytest.fixture(scope="module")
def onnx_dir(runs, tmp_path_factory) -> Path:
    from vesper_sdk.export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "export"
    export_onnx(runs["straight"] / "model", out)
    return out


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_onnx_graph_is_refused_by_name(onnx_dir, tmp_path, how):
    out = tmp_path / "export"
    shutil.copytree(onnx_dir, out)
    damage(out / "model.onnx", how)
    with pytest.raises(ModelFolderError, match=r"model\.onnx"):
        vs.load(out)
    # Without a manifest (an export from before them) a graph that does not parse is
    # still named; a zeroed or flipped one may parse, which is what the manifest is for.
    (out / MANIFEST_NAME).unlink()
    if how == "truncate":
        with pytest.raises(ModelFolderError, match=r"model\.onnx cannot be loaded"):
            vs.load(out)


# ----------------------------------------------------------------------------- kill -9
KILLER = textwrap.dedent("""
    import os, signal, sys
    point, needle, what = sys.argv[1], sys.argv[2], sys.argv[3]

    def killer(real):
        def hooked(*args, **kwargs):
            if needle in " ".join(map(str, args)):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return hooked

    import vesper_sdk.atomic as atomic
    import vesper_sdk.training.checkpoint as ckpt
    if point == "rename":
        os.rename = killer(os.rename)
    elif point == "manifest":
        atomic.write_manifest = killer(atomic.write_manifest)
    elif point == "tensors":
        ckpt.save_file = killer(ckpt.save_file)
    exec(what)
""")


def run_killed(point: str, needle: str, code: str) -> int:
    proc = subprocess.run([sys.executable, "-c", KILLER, point, needle, code],
                          capture_output=True, text=True, timeout=300)
    return proc.returncode


@pytest.mark.parametrize("point, needle", [
    ("tensors", "step-00000004"),  # mid-assembly: the weights written, not the rest
    ("manifest", "step-00000004"),  # everything written but the manifest
    ("rename", "step-00000004"),  # assembled, not yet renamed into place
])
def test_kill_during_a_checkpoint_write_then_resume_ends_exactly(runs, tmp_path, point, needle):
    run = tmp_path / "run"
    opts = {**RUN, "cache_dir": str(runs["cache"])}
    code = (f"import torch, vesper_sdk as vs; torch.set_num_threads(1); "
            f"vs.train('builtin:skills', {str(run)!r}, **{opts!r})")
    assert run_killed(point, needle, code) == -9
    assert any(".tmp-" in p.name for p in (run / "checkpoints").iterdir())
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2]
    logs: list[str] = []
    train(run, runs["cache"], logs, resume=True)
    assert any("cleaned up" in line for line in logs)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert_same_weights(final_weights(run), final_weights(runs["straight"]))


@pytest.mark.parametrize("point, needle", [
    ("manifest", ".model.tmp-"),  # the new version assembled but for its manifest
    ("rename", ".model.old-"),  # the old version moved aside, the new not yet in place
])
def test_kill_while_a_model_folder_is_replaced_keeps_one_whole_version(
        runs, tmp_path, point, needle):
    model = tmp_path / "model"
    shutil.copytree(runs["straight"] / "model", model)
    old = load_file(str(model / "model.safetensors"))
    code = (f"import torch, vesper_sdk as vs; m = vs.VesperLM.from_pretrained({str(model)!r}); "
            f"torch.nn.init.zeros_(m.norm.weight); m.save_pretrained({str(model)!r})")
    assert run_killed(point, needle, code) == -9
    restored = clean_orphans(tmp_path)
    assert restored and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert_same_weights(load_file(str(model / "model.safetensors")), old)
    vs.load(model, device="cpu")  # intact against its manifest


def test_kill_during_an_export_leaves_no_partial_export(runs, tmp_path):
    out = tmp_path / "export"
    code = (f"from vesper_sdk.export import export_onnx; "
            f"export_onnx({str(runs['straight'] / 'model')!r}, {str(out)!r})")
    assert run_killed("manifest", ".export.tmp-", code) == -9
    assert not out.exists() and any(p.name.startswith(".export.tmp-")
                                     for p in tmp_path.iterdir())
    cli = subprocess.run([sys.executable, "-m", "vesper_sdk.cli", "export",
                          str(runs["straight"] / "model"), "-o", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    vs.load(out)


def test_the_manifest_lists_every_file_with_its_hash(runs):
    model = runs["straight"] / "model"
    entries = json.loads((model / MANIFEST_NAME).read_text())["files"]
    assert sorted(entries) == sorted(p.name for p in model.iterdir() if p.name != MANIFEST_NAME)
    assert all(len(e["sha256"]) == 64 and e["size"] == os.path.getsize(model / n)
               for n, e in entries.items())
