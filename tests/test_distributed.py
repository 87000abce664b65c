"""DDP through torchrun: two gloo processes give the same losses as one with the same batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vesper_sdk as vs

REPO = Path(__file__).resolve().parents[1]
COMMON = dict(hidden_size=64, num_layers=2, num_heads=2, ffn_hidden_size=128, vocab_size=384,
              builtin_examples=1000, seq_len=32, max_steps=6, lr=3e-3, log_every=1,
              eval_every=3, eval_batches=4, checkpoint_every=3, progress=False,
              calibration_examples=300, calibration_answers=300)


def _cli_args(opts: dict) -> list[str]:
    args = []
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def _losses(out_dir: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def test_two_gloo_processes_match_one_and_resume(tmp_path):
    cache = tmp_path / "cache"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS=1 for its workers
    try:
        single = vs.train("builtin:skills", tmp_path / "one", batch_size=4,
                          cache_dir=str(cache), **COMMON)
    finally:
        torch.set_num_threads(before)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    # Same global batch (2 processes x 2 sequences), same data, same seed; the DDP run
    # stops at step 3 (checkpoint with both ranks' RNG states) and resumes to step 6.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "vesper_sdk.training", "builtin:skills", "--out-dir", str(tmp_path / "two"),
           "--batch-size", "2", "--cache-dir", str(cache), "--device", "cpu",
           *_cli_args(COMMON)]
    for extra in (["--stop-at-step", "3"], ["--resume"]):
        proc = subprocess.run(cmd + extra, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "2 process(es)" in proc.stdout  # rank 0 logged once, for the whole group
    assert "resume: continuing from" in proc.stdout
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(0, 7))
    for step in range(1, 7):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-4, abs=1e-5), step
    for step in (0, 3, 6):
        assert two[step]["val_loss"] == pytest.approx(one[step]["val_loss"], rel=1e-4)
    # Rank 0 alone wrote the model and the checkpoints, which load like any other.
    assert vs.load(tmp_path / "two" / "model", device="cpu").config.hidden_size == 64
    ckpts = sorted(p.name for p in (tmp_path / "two" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000003", "step-00000006"]
    assert single.steps == 6
