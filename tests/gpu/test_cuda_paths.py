"""CUDA-only correctness: the compiled Velvet kernel against its torch reference, the
optimizer on the GPU, bitsandbytes layers, and every CUDA decode path (CUDA graphs,
compiled step, FFN pair, pipelined loop) against the model's own forward.

Skipped without CUDA; ``benchmarks/gpu_suite.sh`` runs this folder on a lent GPU. Each
test runs one check of ``benchmarks/gpu_checks.py`` (which also times them) and asserts
that every one of its cases passed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from vesper_sdk.benchmarks.gpu_checks import CHECKS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_cuda_check_passes_every_case(name):
    if name == "bnb" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (the quantize extra)")
    rows = CHECKS[name]("cuda", True)
    assert rows, f"check {name} ran no case"
    failed = [r for r in rows if not r.get("ok")]
    assert not failed, f"{len(failed)} of {len(rows)} {name} cases failed: {failed[:3]}"
