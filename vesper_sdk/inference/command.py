"""``vesper generate``: its options and its command."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from ..eval.regulator import MetacognitiveRegulator
from .llm import RUNTIMES, load
from .sampling import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, SamplingParams
from .types import Token


@dataclass
class GenerateOptions:
    """Generate text from a model folder, showing each token's confidence.

    Examples:
      vesper generate runs/a/model --prompt "2+3=" --temperature 0
      vesper generate runs/a/model --chat --prompt "What is 7*6?" --regulator --retries 2
      echo "Once upon a time" | vesper generate runs/a/model --max-new-tokens 64 --json
      vesper generate runs/a-int4 --prompt "2+3=" --temperature 0 --runtime genai
    """

    model_dir: str = field(metadata={"help": "model folder (config.json, model.safetensors, "
                                             "tokenizer.json)", "positional": True})
    prompt: str | None = field(default=None, metadata={
        "help": "the prompt (default: read standard input)"})
    chat: bool = field(default=False, metadata={
        "help": "treat the prompt as a user message and answer it with the chat template"})
    system: str | None = field(default=None, metadata={"help": "system message (with --chat)"})
    max_new_tokens: int = field(default=DEFAULT_MAX_NEW_TOKENS, metadata={
        "help": "most tokens to generate"})
    temperature: float = field(default=DEFAULT_TEMPERATURE, metadata={
        "help": "sampling temperature; 0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0 = off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1 = off)"})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "> 1 discourages repeating tokens"})
    stop: list[str] = field(default_factory=list, metadata={
        "help": "stop strings (the text ends before the first one)"})
    seed: int | None = field(default=None, metadata={"help": "seed for reproducible sampling"})
    regulator: bool = field(default=False, metadata={
        "help": "turn on the metacognitive regulator (conservative decoding under the "
                "threshold, satisficing stop)"})
    threshold: float = field(default=0.85, metadata={"help": "the regulator's threshold"})
    retries: int = field(default=0, metadata={
        "help": "regenerate a low-confidence answer up to N times (implies --regulator)"})
    abstain_below: float | None = field(default=None, metadata={
        "help": "answer \"I'm not sure.\" instead of an answer whose answer confidence (the "
                "MetaHead's) is under this (implies --regulator; the answer then arrives "
                "once complete)"})
    confidence: bool = field(default=False, metadata={
        "help": "after the text, print a table: each token, its logprob and confidence"})
    json: bool = field(default=False, metadata={
        "help": "print one JSON object per token instead of plain text"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the decode step: faster tokens (CPU ~1.2x, CUDA ~1.4x) "
                "after a wait of tens of seconds for the compiler"})
    runtime: str = field(default="vesper", metadata={
        "choices": list(RUNTIMES),
        "help": "an ONNX export's decoding loop: vesper's own, or onnxruntime-genai's C++ "
                "loop for greedy answers (an --in-place-kv export; the genai extra)"})


def cli(opts: GenerateOptions) -> int:
    """``vesper generate``: stream the answer to stdout."""
    prompt = opts.prompt
    if prompt is None:
        if sys.stdin.isatty():  # else a bare `vesper generate DIR` looks like a hang
            print("reading the prompt from standard input (end it with Ctrl-D), or pass "
                  "--prompt TEXT", file=sys.stderr, flush=True)
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise ValueError("no prompt: standard input was empty. Pass --prompt TEXT or "
                             "pipe text in (--prompt '' starts from nothing on purpose)")
    lm = load(opts.model_dir, device=opts.device, compile=opts.compile, runtime=opts.runtime)
    if getattr(lm.backend, "compile", False):
        # Said up front: otherwise the first token's wait looks like a hang.
        print("note: --compile: the first tokens wait for torch.compile (tens of seconds the "
              "first time; its cache makes later runs quicker)", file=sys.stderr, flush=True)
    regulator = None
    if opts.regulator or opts.retries or opts.abstain_below is not None:
        regulator = MetacognitiveRegulator(threshold=opts.threshold, retries=opts.retries,
                                           abstain_below=opts.abstain_below)
    params = SamplingParams.from_options(opts, stop=opts.stop or None, regulator=regulator)
    if opts.chat:
        messages = ([{"role": "system", "content": opts.system}] if opts.system else [])
        messages.append({"role": "user", "content": prompt})
        tokens = lm.chat_stream(messages, params)
    else:
        tokens = lm.stream(prompt, params)
    seen: list[Token] = []
    for tok in tokens:
        seen.append(tok)
        if opts.json:
            print(json.dumps({"text": tok.text, "id": tok.id, "logprob": round(tok.logprob, 5),
                              "confidence": round(tok.confidence, 5),
                              "stop_prob": round(tok.stop_prob, 5),
                              "regulated": tok.regulated, "finish_reason": tok.finish_reason},
                             ensure_ascii=False), flush=True)
        else:
            sys.stdout.write(tok.text)
            sys.stdout.flush()
    if not opts.json:
        sys.stdout.write("\n")
    if opts.confidence and not opts.json:
        print(f"{'token':<16} {'id':>6} {'logprob':>8} {'conf':>6} {'stop':>6}  regulated")
        for tok in seen:
            shown = (lm.tokenizer.id_to_token(tok.id) or "?") if tok.special else repr(
                lm.tokenizer.token_bytes(tok.id).decode("utf-8", "replace"))
            print(f"{shown[:16]:<16} {tok.id:>6} {tok.logprob:>8.3f} {tok.confidence:>6.3f} "
                  f"{tok.stop_prob:>6.3f}  {tok.regulated or ''}")
        if seen:
            mean = sum(t.confidence for t in seen) / len(seen)
            answer = seen[-1].answer_confidence  # pooled by the engine, as it went
            print(f"{len(seen)} tokens, mean token confidence {mean:.3f}, answer confidence "
                  f"{answer:.3f}"
                  + (f", finish: {seen[-1].finish_reason}" if seen[-1].finish_reason else ""))
    return 0
