"""The README runs top to bottom as written: every command of its bash blocks and its Python
API block, in order, in a scratch folder holding the repo's examples/, against a tiny model.

What differs from a user's run, and why:
- each training command gets TINY_TRAIN appended (argparse keeps the last value, so
  ``--max-steps 500`` becomes 3 steps of a 64-wide model, the narrowest bitsandbytes' 4-bit
  layers take), the Python block's ``max_steps=500`` becomes the same keywords, and the slow
  measuring commands get smaller sizes (REPORT, EVAL);
- servers (``vesper serve``, ``vesper demo``, ``vs.serve``) get a free port, are stopped once
  they answer over HTTP, and count as passed only if they did;
- the Quickstart's ``make test`` is what runs this file, and ``make demo`` starts the same app
  as ``vesper demo`` here, so ``make`` lines are left to the Quickstart.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

TINY_TRAIN = ["--hidden-size", "64", "--num-layers", "1", "--num-heads", "2",
              "--ffn-hidden-size", "128", "--max-steps", "3", "--batch-size", "4",
              "--seq-len", "64", "--builtin-examples", "300", "--calibration-examples", "200",
              "--calibration-answers", "200", "--vocab-size", "400", "--eval-every", "0",
              "--eval-batches", "1", "--checkpoint-every", "0", "--no-progress"]
# A fine-tune keeps the model it starts from: only the run's length and batches shrink.
TINY_FINETUNE = ["--max-steps", "3", "--batch-size", "4", "--seq-len", "64", "--eval-every", "0",
                 "--eval-batches", "1", "--calibration-examples", "200",
                 "--calibration-answers", "200", "--no-progress"]
TINY_API = ('max_steps=3, hidden_size=64, num_layers=1, num_heads=2, ffn_hidden_size=128, '
            'batch_size=4, seq_len=64, builtin_examples=300, calibration_examples=200, '
            'calibration_answers=200, vocab_size=400, eval_every=0, eval_batches=1, '
            'checkpoint_every=0, progress=False')
REPORT = ["--max-tokens", "512", "--new-tokens", "8"]
EVAL = ["--max-examples", "200", "--skills-questions", "10"]
SERVERS = {"serve": "/health", "demo": "/"}


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def readme_commands() -> list[list[str]]:
    commands = []
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] != "make":
                commands.append(words)
    return commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adjusted(words: list[str], port: int) -> list[str]:
    """The README's command with the tiny-model sizes (module docstring) and a free port."""
    words = list(words)
    if words[0] in ("vesper", "vesper-export", "torchrun"):
        words[0] = str(BIN / words[0])
    job = words[1] if words[0].endswith("vesper") and len(words) > 1 else ""
    if job == "train" or "vesper_sdk.training" in words:
        words += TINY_FINETUNE if "--init-from" in words else TINY_TRAIN
    elif job == "quantize" and "--report" in words:
        words += REPORT
    elif job == "eval":
        words += EVAL
    elif job in SERVERS:
        if "--port" in words:
            words[words.index("--port") + 1] = str(port)
        else:
            words += ["--port", str(port)]
    return words


def wait_for_http(proc: subprocess.Popen, url: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return -1
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status
        except OSError:
            time.sleep(0.5)
    return 0


def run_server(cmd: list[str], url: str, cwd: Path, env: dict, timeout: float) -> str:
    log = cwd / f"server-{len(list(cwd.glob('server-*.log')))}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            status = wait_for_http(proc, url, timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    assert status == 200, (f"{shlex.join(cmd)} did not answer {url} (status {status}):\n"
                           + log.read_text()[-3000:])
    return log.read_text()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "examples", work / "examples")
    return work


@pytest.fixture(scope="module")
def env() -> dict:
    # Threads capped like the rest of the suite: two processes of torchrun share 2 cores.
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "VESPER_CACHE_DIR": str(Path(os.environ.get("TMPDIR", "/tmp")) / "vesper-readme")}


@pytest.mark.slow
def test_readme_bash_blocks_run_in_order(workspace, env):
    commands = readme_commands()
    assert any(c[:2] == ["vesper", "train"] for c in commands), "no training command found"
    for words in commands:
        port = free_port()
        cmd = adjusted(words, port)
        job = words[1] if words[0] == "vesper" and len(words) > 1 else ""
        if job in SERVERS:
            run_server(cmd, f"http://127.0.0.1:{port}{SERVERS[job]}", workspace, env, 240)
            continue
        if words[0] not in ("vesper", "vesper-export", "torchrun", "python", "bash"):
            pytest.fail(f"the README runs {words[0]!r}, which this test does not know how to run")
        proc = subprocess.run(cmd, cwd=workspace, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, (f"README command failed: {shlex.join(words)}\n"
                                      f"(run as {shlex.join(cmd)})\n{proc.stdout[-2000:]}\n"
                                      f"{proc.stderr[-4000:]}")
    assert (workspace / "runs" / "a" / "model" / "config.json").is_file()
    assert (workspace / "runs" / "a" / "model-quantize-report.json").is_file()
    assert (workspace / "runs" / "a-onnx-int4").is_dir()


@pytest.mark.slow
def test_readme_python_block_runs_as_written(workspace, env):
    blocks = [b for b in readme_blocks("python") if "vs.train(" in b]
    assert len(blocks) == 1, "expected one Python block that trains"
    source = blocks[0]
    assert "max_steps=500" in source and "port=8000" in source
    port = free_port()
    script = workspace / "readme_api.py"
    script.write_text(source.replace("max_steps=500", TINY_API)
                      .replace("port=8000", f"port={port}"))
    run_server([sys.executable, str(script)], f"http://127.0.0.1:{port}/health", workspace,
               env, 400)
    assert (workspace / "runs" / "api-onnx").is_dir()
    assert (workspace / "runs" / "api-nf4" / "config.json").is_file()
