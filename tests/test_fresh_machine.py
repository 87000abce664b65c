"""A fresh clone works: nothing in the repo shadows an installed package, installs are pinned,
and what the SDK writes is readable by the team and lands outside the tracked tree."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vesper_sdk as vs
from vesper_sdk.bench import default_out_dir
from vesper_sdk.benchmarks.quantized import default_report_path

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("kernels", "export", "demo", "benchmarks")


def run_from_root(code: str) -> subprocess.CompletedProcess:
    # `python -c` puts the working directory first on sys.path, as `python -m pytest` does.
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_transformers_imports_from_the_repo_root():
    proc = run_from_root("import transformers.activations\n"
                         "from transformers import GPT2LMHeadModel\n"
                         "print(GPT2LMHeadModel.__name__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "GPT2LMHeadModel"


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_folder_never_hides_an_installed_package_of_its_name(name):
    assert not (ROOT / name / "__init__.py").exists(), (
        f"{name}/__init__.py would make the folder a regular package that shadows an installed "
        f"`{name}` whenever the repo root is on sys.path")
    installed = importlib.util.find_spec(name) if name == "kernels" else None
    proc = run_from_root(f"import {name}, sys\n"
                         f"print(getattr({name}, '__file__', None) or list({name}.__path__))")
    if installed is not None and installed.origin:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == installed.origin
    else:  # nothing installed under that name: at most an empty namespace of our folder
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_sdk_subpackages_and_their_public_names_resolve():
    from vesper_sdk.export import ExportError, OnnxModel, export_onnx
    from vesper_sdk.kernels import velvet

    assert callable(OnnxModel) and callable(export_onnx) and issubclass(ExportError, Exception)
    assert vs.export.OnnxModel is OnnxModel
    assert hasattr(velvet, "velvet_reference") or hasattr(velvet, "__file__")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vs.export.nope  # noqa: B018


def test_lock_pins_every_requirement_exactly_and_leaves_torch_to_setup():
    lines = [ln.strip() for ln in (ROOT / "requirements.lock").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines, "requirements.lock is empty"
    assert all("==" in ln and not ln.startswith(("torch==", "vesper")) for ln in lines), lines
    names = {ln.split("==")[0].lower().replace("_", "-") for ln in lines}
    for needed in ("transformers", "onnxruntime", "fastapi", "gradio", "tokenizers",
                   "safetensors", "pytest", "ruff"):
        assert needed in names, f"{needed} is not pinned in requirements.lock"


def test_saved_model_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        cfg = vs.VesperConfig.from_preset("tiny", hidden_size=32, num_layers=1, num_heads=2,
                                          ffn_hidden_size=64, vocab_size=64)
        torch.manual_seed(0)
        folder = tmp_path / "m"
        vs.VesperLM(cfg).save_pretrained(folder)
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    for f in folder.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


def test_smoke_benchmarks_and_reports_write_outside_the_tracked_tree(tmp_path):
    scratch = Path(default_out_dir(quick=True)).resolve()
    assert ROOT not in scratch.parents, scratch
    assert default_out_dir(quick=False) == "benchmarks/results"
    model_dir = tmp_path / "runs" / "a" / "model"
    assert default_report_path(model_dir) == (
        tmp_path / "runs" / "a" / "model-quantize-report.json").resolve()
