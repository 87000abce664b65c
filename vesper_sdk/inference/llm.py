"""The ``LLM`` facade: a model and its tokenizer, ready to generate, and ``vesper_sdk.load``.

>>> lm = vesper_sdk.load("runs/a/model")
>>> lm.generate("2+3=", max_new_tokens=8, temperature=0.0)
>>> for tok in lm.stream("Hello", max_new_tokens=32):
...     print(tok.text, tok.confidence, tok.regulated)
>>> lm.chat([{"role": "user", "content": "What is 7*6?"}], regulator=True)

Every call builds :class:`SamplingParams` and goes through one :class:`Engine`; concurrent
requests (the HTTP server) go through :meth:`LLM.stream_batch`, each with its own
parameters, seed, stop strings and cancel flag.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..device import resolve_device
from ..eval.scorer import score_labels
from ..folder import ModelFolder, ModelFolderError
from ..model import VesperLM
from ..quantization import load_quantized
from ..tokenizer import VesperTokenizer
from .engine import Engine
from .sampling import SamplingParams
from .torch_backend import TorchBackend
from .types import DecodeBackend, GenerationRequest, Token, TokenScore


class LLM:
    """A model and its tokenizer, ready to generate: ``vesper_sdk.load(dir)`` returns one.

    ``LLM(model_or_backend, tokenizer)`` wraps a ``VesperLM`` (through
    :class:`TorchBackend`) or any :class:`DecodeBackend` (ONNX Runtime, ...): the same
    decoding loop, sampling and regulator run over all of them. ``pipeline``: see
    :class:`Engine`.

    The generation methods take :class:`SamplingParams`' fields as keyword arguments
    (``max_new_tokens``, ``temperature`` (0.0 = greedy), ``top_k``, ``top_p``,
    ``repetition_penalty``, ``stop``, ``seed``, ``regulator``, ...) or a whole
    ``params=SamplingParams(...)``.
    """

    def __init__(self, model: VesperLM | DecodeBackend, tokenizer: VesperTokenizer,
                 model_dir: str | Path | None = None, pipeline: bool | None = None,
                 engine: Engine | None = None) -> None:
        backend = TorchBackend(model) if isinstance(model, VesperLM) else model
        if tokenizer.vocab_size > backend.vocab_size:
            raise ModelFolderError(
                f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                f"{backend.vocab_size}: they do not belong together")
        self.backend = backend
        self.model: VesperLM | None = getattr(backend, "model", None)
        self.tokenizer = tokenizer
        self.model_dir = Path(model_dir) if model_dir is not None else None
        # Another loop over the same backend (export.genai_loop) may be given instead.
        self.engine = engine if engine is not None else Engine(backend, tokenizer, pipeline)

    @property
    def pipeline(self) -> bool:
        return self.engine.pipeline

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def config(self) -> Any:
        return getattr(self.backend, "config", None) or getattr(self.model, "config", None)

    @property
    def max_seq_len(self) -> int:
        return self.backend.max_seq_len

    # --- scoring ---------------------------------------------------------------------
    def score(self, text: str) -> list[TokenScore]:
        """Each token of ``text`` with its log-probability and the MetaHead's confidence.

        The confidence shown for a token is what the model said at the position that
        predicted it: how sure it was that its own top-1 guess there was right.
        """
        ids = [self.tokenizer.bos_id, *self.tokenizer.encode(text)]
        x = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            out = self.backend.forward(x, torch.ones_like(x), torch.arange(len(ids))[None]
                                       .to(self.device), None)
            target = x[0, 1:].to(out.logits.device)
            lp = score_labels(out.logits[0, :-1], target).logprob.tolist()
            conf = out.confidence[0, :-1].float().tolist()
        return [TokenScore(self.tokenizer.decode([t], skip_special_tokens=False), t, lp[i],
                           conf[i]) for i, t in enumerate(target.tolist())]

    # --- the public generation API ---------------------------------------------------
    def request(self, prompt: str | Sequence[int] | None = None,
                messages: Sequence[dict] | None = None, params: SamplingParams | None = None,
                **fields: Any) -> GenerationRequest:
        """A :class:`GenerationRequest` from a prompt (text or ids) or chat messages."""
        if (prompt is None) == (messages is None):
            raise ValueError("pass exactly one of prompt= and messages=")
        ids = self.tokenizer.chat_prompt_ids(messages) if messages is not None else prompt
        return GenerationRequest(prompt=ids, params=_params(params, fields))

    def generate(self, prompt: str | Sequence[str], params: SamplingParams | None = None,
                 **fields: Any) -> str | list[str]:
        """Continue ``prompt`` (a string, or a list of strings decoded as one batch).

        Returns the generated text (a list for a list of prompts). With a ``seed``, row i
        of a batch uses ``seed + i``.
        """
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        tokens = self.generate_tokens(prompts, params, **fields)
        texts = ["".join(t.text for t in row) for row in tokens]
        return texts[0] if single else texts

    def generate_tokens(self, prompts: Sequence[str | Sequence[int]],
                        params: SamplingParams | None = None, **fields: Any,
                        ) -> list[list[Token]]:
        """Like :meth:`generate` for a batch, returning every row's :class:`Token` list."""
        base = _params(params, fields)
        requests = [GenerationRequest(prompt=p, params=base if base.seed is None else
                                      base.replace(seed=base.seed + i))
                    for i, p in enumerate(prompts)]
        out: list[list[Token]] = [[] for _ in requests]
        for i, tok in self.stream_batch(requests):
            out[i].append(tok)
        return out

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               **fields: Any) -> Iterator[Token]:
        """Yield :class:`Token` objects as they are generated (see :meth:`generate`).

        Text never breaks a UTF-8 character: a token that ends mid-character releases
        ``""`` and the next one carries the whole character. With regulator retries on,
        the answer arrives once its attempts are done (an attempt cannot be taken back).
        """
        req = GenerationRequest(prompt=prompt, params=_params(params, fields))
        for _, tok in self.stream_batch([req]):
            yield tok

    def chat(self, messages: Sequence[dict], params: SamplingParams | None = None,
             **fields: Any) -> str:
        """The assistant's reply to ``messages`` (role/content dicts), via the chat template."""
        return "".join(t.text for t in self.chat_stream(messages, params, **fields))

    def chat_stream(self, messages: Sequence[dict], params: SamplingParams | None = None,
                    **fields: Any) -> Iterator[Token]:
        """Stream the assistant's reply to ``messages`` (see :meth:`stream`)."""
        return self.stream(self.tokenizer.chat_prompt_ids(messages), params, **fields)

    def stream_batch(self, requests: Sequence[GenerationRequest],
                     ) -> Iterator[tuple[int, Token]]:
        """Decode several requests as one batch; yield ``(request index, Token)``
        (the contract is :meth:`Engine.stream_batch`'s)."""
        return self.engine.stream_batch(requests)

    def __repr__(self) -> str:
        what = self.config if self.config is not None else self.backend
        return f"LLM({self.model_dir or 'in memory'}, {what!r})"


def _params(params: SamplingParams | None, fields: dict[str, Any]) -> SamplingParams:
    if params is None:
        return SamplingParams(**fields)
    return params.replace(**fields) if fields else params


#: The decoding loops an ONNX export can run in (``load(..., runtime=...)``).
RUNTIMES = ("vesper", "genai")


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


def load(model_dir: str | Path, device: str | torch.device | None = "auto",
         dtype: torch.dtype | None = None, compile: bool = False,
         runtime: str = "vesper") -> LLM:
    """Load a model folder (fp32, bitsandbytes-quantized or ONNX export) ready to use.

    ``device='auto'`` picks CUDA when present. ``compile=True`` compiles the decode step
    with ``torch.compile`` (CUDA or CPU; see :class:`TorchBackend`): worth it for a
    long-running process, not for one answer. ``runtime``: an ONNX export's decoding
    loop, vesper's own (``"vesper"``) or onnxruntime-genai's C++ loop for greedy batches
    (``"genai"``, an in-place KV export; see :func:`load_onnx`).
    """
    folder = ModelFolder(model_dir)
    _check_runtime(runtime)
    if folder.kind == "onnx":
        return load_onnx(folder.path, runtime=runtime)
    if runtime != "vesper":
        raise ValueError(f"runtime={runtime!r} runs an ONNX export; {folder.path} is a "
                         f"{folder.kind} model folder (export it with `vesper export "
                         "MODEL_DIR -o OUT --in-place-kv`)")
    dev = resolve_device(device)
    if folder.kind == "bnb":  # quantized layers fix their own dtype
        model = load_quantized(folder.path, device=dev)
    else:
        model = VesperLM.from_pretrained(folder.path, map_location=dev)
        if dtype is not None:
            model = model.to(dtype)
    return LLM(TorchBackend(model, compile=compile), folder.tokenizer(), folder.path)


def load_onnx(model_dir: str | Path, providers: list[str] | None = None,
              threads: int | None = None, runtime: str = "vesper") -> LLM:
    """An exported ONNX folder as an ``LLM`` (``vesper_sdk.export.OnnxModel``): the same
    generate / stream / chat / score and regulator over ONNX Runtime.

    ``runtime="genai"`` (an in-place KV export, the ``genai`` extra): greedy batches of
    plain requests decode in onnxruntime-genai's C++ loop, the same tokens with their
    log-probability and MetaHead outputs, and everything else in vesper's own loop over
    the same export (:mod:`vesper_sdk.export.genai_loop`). It loads the graph twice.
    """
    # ONNX Runtime is the export extra's: imported only for an exported folder.
    from ..export.runner import OnnxBackend

    _check_runtime(runtime)
    backend = OnnxBackend(model_dir, providers=providers, threads=threads)
    tokenizer = VesperTokenizer.from_file(model_dir)
    engine = None
    if runtime == "genai":
        from ..export.genai_loop import GenaiEngine

        engine = GenaiEngine(backend, tokenizer)
    return LLM(backend, tokenizer, model_dir, engine=engine)
