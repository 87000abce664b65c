"""Greedy decoding of an in-place KV export in onnxruntime-genai's C++ loop, behind the
same :class:`~vesper_sdk.inference.engine.Engine` (``load(..., runtime="genai")``).

vesper's own loop runs each step from Python: the host chooses the token and builds its
record between ONNX Runtime's runs. onnxruntime-genai runs the steps and the choice in
C++ over the same ``model.onnx`` (its ``genai_config.json``); what this engine reads after
each step is the chosen tokens and four numbers per row that the graph outputs by name:
the token's log-probability (``top_logprob``: a greedy token is the top-1), the MetaHead's
confidence, stop probability and answer logit. The logits never leave ONNX Runtime.

Batches it decodes: greedy rows whose prompts have one length (onnxruntime-genai does not
give left-padded rows the tokens each gives alone), with no regulator, penalty, logit
bias, ``min_tokens``, ``top_logprobs``, ``prompt_logprobs`` or ``ignore_eos``
(onnxruntime-genai ends a row at EOS, or with a minimum length never picks it, where
vesper's loop goes on past it). Any other batch, and every scoring call, runs vesper's
own loop over the same export, with the same Tokens. A row ends where vesper's loop ends
it (EOS or another special token, a stop string, its budget); the C++ loop stops when
every row has.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..inference.engine import Engine, _BatchState, _Choice, _Row
from ..inference.types import TOP_LOGPROB, PromptLogprobs, Token
from ..model import ModelFolderError
from ..tokenizer import VesperTokenizer
from .genai import GENAI_CONFIG_NAME

# What a step hands back besides the tokens, in the order _BatchState.emit takes them.
STEP_OUTPUTS = (TOP_LOGPROB, "confidence", "stop", "answer")


def takes(rows: list[_Row]) -> bool:
    """Whether onnxruntime-genai's greedy loop gives ``rows`` the Tokens vesper's own loop
    would (see the module docstring)."""
    if not rows:
        return False
    length = len(rows[0].prompt_ids)
    for r in rows:
        p = r.params
        if (len(r.prompt_ids) != length or r.temperature != 0.0 or r.regulator is not None
                or p.repetition_penalty != 1.0 or p.penalises_output or p.logit_bias
                or p.min_tokens or p.top_logprobs or p.prompt_logprobs is not None
                or p.ignore_eos):
            return False
    return True


class GenaiEngine(Engine):
    """An :class:`Engine` whose greedy batches run in onnxruntime-genai's C++ loop.

    ``backend``: an :class:`~.runner.OnnxBackend` over an in-place export (it runs the
    batches the C++ loop does not take); ``threads``: onnxruntime-genai's intra-op
    threads (default: the backend's).
    """

    def __init__(self, backend: Any, tokenizer: VesperTokenizer,
                 threads: int | None = None) -> None:
        super().__init__(backend, tokenizer, pipeline=False)
        folder = backend.model_dir
        if not backend.in_place or not (folder / GENAI_CONFIG_NAME).is_file():
            raise ModelFolderError(
                f"{folder} is not an in-place KV export with a {GENAI_CONFIG_NAME}: "
                "onnxruntime-genai runs only those. Export with `vesper export MODEL_DIR -o "
                "OUT --in-place-kv`, or load it with runtime='vesper'")
        outputs = {o.name for o in backend.session.get_outputs()}
        missing = [n for n in STEP_OUTPUTS if n not in outputs]
        if missing:
            raise ModelFolderError(
                f"{folder}'s graph has no {', '.join(missing)} output (an export from an "
                "earlier vesper-sdk): re-run the export, or load it with runtime='vesper'")
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise ImportError("runtime='genai' needs onnxruntime-genai: "
                              "pip install 'vesper-sdk[genai]'") from None
        config = og.Config(str(folder))
        # Overlaid, not written: the folder's manifest covers genai_config.json.
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads or backend.threads}}}}))
        self._og = og
        self.genai_model = og.Model(config)

    def _decode(self, rows: list[_Row]) -> Iterator[tuple[_Row, Token | PromptLogprobs]]:
        if not takes(rows):
            yield from super()._decode(rows)
            return
        p_len, live = self.live_rows(rows)  # no prompt_logprobs here: live rows have budget
        if not live:
            return
        og = self._og
        params = og.GeneratorParams(self.genai_model)
        params.set_search_options(max_length=p_len + max(r.budget for r in live),
                                  do_sample=False, batch_size=len(live))
        gen = og.Generator(self.genai_model, params)
        gen.append_tokens(np.array([r.prompt_ids for r in live], dtype=np.int32))
        state = _BatchState(self, live, self.device)
        decisions = [None] * len(live)
        while not gen.is_done():
            gen.generate_next_token()
            host = [gen.get_next_tokens().tolist(),
                    *(gen.get_output(name)[:, -1].tolist() for name in STEP_OUTPUTS)]
            yield from state.emit(_Choice(decisions, host, None, None))
            if not state.any_live():
                return


__all__ = ["STEP_OUTPUTS", "GenaiEngine", "takes"]
