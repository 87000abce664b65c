"""``runtime="genai"``: greedy batches of an in-place export decode in onnxruntime-genai's
C++ loop and come out as the Tokens vesper's own loop gives; every other batch runs
vesper's loop over the same export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnxruntime_genai as og
import pytest

import vesper_sdk as vs
from vesper_sdk.cli import main as cli_main
from vesper_sdk.eval.regulator import MetacognitiveRegulator
from vesper_sdk.export.genai_loop import STEP_OUTPUTS, GenaiEngine
from vesper_sdk.export.onnx_export import export_onnx
from vesper_sdk.export.runner import OnnxBackend
from vesper_sdk.inference.llm import load_onnx
from vesper_sdk.model import ModelFolderError

# The bundled model: trained, so its answers end (EOS) at different steps in one batch.
BUNDLED = Path(vs.__file__).resolve().parent / "assets" / "default_model"
# Chat prompts of one length (11 tokens), answered "42", "Paris", "8" and "12".
QUESTIONS = ["What is 7*6?", "What is the capital of France?", "How many legs has a spider?",
             "What is 3*4?"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("genai_runtime")
    return {"plain": export_onnx(BUNDLED, root / "plain", verbose=False),
            "in_place": export_onnx(BUNDLED, root / "in_place", verbose=False,
                                    in_place_kv=True),
            "model": BUNDLED}


@pytest.fixture(scope="module")
def runtimes(exports) -> dict[str, vs.LLM]:
    return {r: load_onnx(exports["in_place"], runtime=r) for r in ("vesper", "genai")}


@pytest.fixture
def generators(monkeypatch) -> list[int]:
    """How many onnxruntime-genai generators were made (one per batch it decodes)."""
    made: list[int] = []
    real = og.Generator

    def counting(*args):
        made.append(1)
        return real(*args)

    monkeypatch.setattr(og, "Generator", counting)
    return made


def _same(a: list[vs.Token], b: list[vs.Token]) -> None:
    assert [t.id for t in a] == [t.id for t in b] and a
    assert [t.text for t in a] == [t.text for t in b]
    assert [t.finish_reason for t in a] == [t.finish_reason for t in b]
    assert [t.regulated for t in a] == [t.regulated for t in b]
    for x, y in zip(a, b, strict=True):
        assert abs(x.logprob - y.logprob) <= 1e-4
        assert abs(x.confidence - y.confidence) <= 1e-5
        assert abs(x.stop_prob - y.stop_prob) <= 1e-5
        assert abs(x.answer_logit - y.answer_logit) <= 1e-4


def test_greedy_batches_decode_in_the_cpp_loop_with_vespers_tokens(runtimes, generators):
    tok = runtimes["vesper"].tokenizer
    prompts = [tok.chat_prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == 1  # one length: one batch
    finishes = set()
    for params in ({}, {"stop": ["2"]}, {"max_new_tokens": 1}):
        fields = {"max_new_tokens": 24, "temperature": 0.0, **params}
        ours = runtimes["vesper"].generate_tokens(prompts, **fields)
        before = len(generators)
        cpp = runtimes["genai"].generate_tokens(prompts, **fields)
        assert len(generators) == before + 1  # the whole batch in one C++ loop
        for a, b in zip(ours, cpp, strict=True):
            _same(a, b)
            finishes.add((len(b), b[-1].finish_reason))
    # Rows ended at EOS, at a stop string and at their budget, at different steps.
    assert {f for _, f in finishes} == {"eos", "stop", "length"}
    assert len({n for n, f in finishes if f == "eos"}) > 1
    # A text prompt that runs to its budget, streamed.
    ours = list(runtimes["vesper"].stream("Once upon a time", max_new_tokens=20,
                                          temperature=0.0))
    before = len(generators)
    _same(ours, list(runtimes["genai"].stream("Once upon a time", max_new_tokens=20,
                                              temperature=0.0)))
    assert len(generators) == before + 1


@pytest.mark.parametrize("case", ["sampled", "ragged", "ignore_eos", "top_logprobs",
                                  "regulator", "penalty"])
def test_batches_the_cpp_loop_does_not_take_run_vespers_loop(runtimes, generators, case):
    tok = runtimes["vesper"].tokenizer
    prompts = [tok.chat_prompt_ids([{"role": "user", "content": q}]) for q in QUESTIONS[:2]]
    fields: dict[str, Any] = {"max_new_tokens": 12, "temperature": 0.0}
    if case == "sampled":
        fields.update(temperature=0.9, seed=7)
    elif case == "ragged":
        prompts[1] = prompts[1][:3]
    elif case == "ignore_eos":  # onnxruntime-genai would end a row at EOS
        fields.update(ignore_eos=True)
    elif case == "top_logprobs":
        fields.update(top_logprobs=3)
    elif case == "regulator":
        fields.update(regulator=MetacognitiveRegulator(threshold=0.99))
    else:
        fields.update(repetition_penalty=1.3)
    ours = runtimes["vesper"].generate_tokens(prompts, **fields)
    cpp = runtimes["genai"].generate_tokens(prompts, **fields)
    assert not generators
    for a, b in zip(ours, cpp, strict=True):
        _same(a, b)


def test_genai_runtime_refuses_what_it_cannot_run(exports, runtimes):
    with pytest.raises(ModelFolderError, match="--in-place-kv"):
        load_onnx(exports["plain"], runtime="genai")
    with pytest.raises(ValueError, match="runs an ONNX export"):
        vs.load(exports["model"], runtime="genai")
    with pytest.raises(ValueError, match="runtime must be one of vesper, genai"):
        vs.load(exports["in_place"], runtime="fast")

    class OlderGraph:  # an export from before the top_logprob output
        def __init__(self, session):
            self.session = session

        def get_outputs(self):
            return [o for o in self.session.get_outputs() if o.name != STEP_OUTPUTS[0]]

    backend = OnnxBackend(exports["in_place"])
    backend.session = OlderGraph(backend.session)
    with pytest.raises(ModelFolderError, match="no top_logprob output.*re-run the export"):
        GenaiEngine(backend, runtimes["vesper"].tokenizer)


def test_generate_cli_runtime_genai_prints_the_tokens_of_the_default_runtime(exports,
                                                                             capsys):
    lines = {}
    for runtime in ("vesper", "genai"):
        assert cli_main(["generate", str(exports["in_place"]), "--chat", "--prompt",
                         "What is 7*6?", "--temperature", "0", "--json",
                         "--runtime", runtime]) == 0
        lines[runtime] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "".join(t["text"] for t in lines["genai"]) == "42"
    assert [t["id"] for t in lines["genai"]] == [t["id"] for t in lines["vesper"]]
    assert [t["confidence"] for t in lines["genai"]] == [t["confidence"]
                                                         for t in lines["vesper"]]
