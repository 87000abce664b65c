"""The VesperLM chat demo: every token the model writes, coloured by its own confidence.

Run it with ``python demo/app.py [MODEL_DIR]`` or ``vesper demo [MODEL_DIR]``; without a
folder it opens the model bundled in ``vesper_sdk/assets/default_model/``.

Each assistant token is shaded from red (the MetaHead thinks its top-1 guess is likely
wrong) to green (likely right); tokens the metacognitive regulator decoded conservatively
are underlined (wavy, purple), and a purple square marks where it ended an answer. Under
each answer: speed, mean and lowest confidence, and what the regulator did (including
which attempt was kept when it retried). The backend selector runs the
same model as PyTorch fp32, bitsandbytes INT8 / INT4 (NF4) or ONNX Runtime; those
variants are produced from the model folder on first use and cached.

The demo runs offline: Gradio analytics are off (set before gradio is imported), the
theme uses system fonts only, and nothing is shared or fetched.
"""

from __future__ import annotations

import os

# Must precede `import gradio`: Gradio reads it at import time for its usage analytics
# and version check, both of which would call out to the network.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import html  # noqa: E402
import inspect  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402

import vesper_sdk  # noqa: E402
from vesper_sdk.demo.render import (  # noqa: E402
    CSS,
    LEGEND,
    TokenView,
    Turn,
    _alternatives,
    answer_stats,
    render_chat,
)
from vesper_sdk.folder import ModelFolder, ModelFolderError  # noqa: E402
from vesper_sdk.inference import DEFAULT_TEMPERATURE, SamplingParams  # noqa: E402

DEFAULT_MODEL_DIR = Path(vesper_sdk.__file__).resolve().parent / "assets" / "default_model"
CACHE_ENV = "VESPER_CACHE_DIR"

# label -> (variant kind, extra that provides it)
BACKENDS: dict[str, tuple[str, str | None]] = {
    "PyTorch fp32": ("fp32", None),
    "INT8 (bitsandbytes)": ("int8", "quantize"),
    "INT4 (bitsandbytes NF4)": ("nf4", "quantize"),
    "ONNX Runtime": ("onnx", "export"),
}
DEFAULT_BACKEND = "PyTorch fp32"

SYSTEM_FONTS = ["system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue",
                "Arial", "Noto Sans", "Liberation Sans", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono",
              "monospace"]


# ----------------------------------------------------------------------------- options
@dataclass
class DemoOptions:
    """The Gradio chat demo: each token coloured by the model's own confidence.

    Controls for the backend (PyTorch fp32 / INT8 / INT4 / ONNX), temperature, max tokens
    and the metacognitive regulator. Runs offline; binds to 127.0.0.1 unless told otherwise.
    """

    model_dir: str | None = field(default=None, metadata={
        "help": "model folder to chat with (default: the model bundled with vesper-sdk)",
        "positional": True})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=7860, metadata={"help": "TCP port"})
    device: str = field(default="auto", metadata={
        "help": "auto (CUDA when present), cpu or cuda"})
    cache_dir: str | None = field(default=None, metadata={
        "help": f"where INT8/INT4/ONNX variants are written on first use (default: "
                f"${CACHE_ENV} or ./.vesper_cache)"})


# ----------------------------------------------------------------------------- rendering
def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or ".vesper_cache")


class ModelVariants:
    """The chat model in each backend, produced from its folder on first use and cached.

    INT8 / INT4 come from ``vesper_sdk.quantize`` and ONNX from ``vesper_sdk.export_onnx``;
    each lands in ``cache_dir/<model>-<digest of the weights>/<kind>`` so a retrained model
    never reuses a stale variant, and a second launch reuses the first one's work.
    """

    def __init__(self, base: Any, model_dir: Path | None, cache_dir: Path,
                 device: str = "auto") -> None:
        self.base, self.model_dir = base, model_dir
        self.cache_dir, self.device = cache_dir, device
        self._loaded: dict[str, Any] = {"fp32": base}
        self._lock = threading.Lock()

    def folder_for(self, kind: str) -> Path:
        assert self.model_dir is not None
        weights = self.model_dir / "model.safetensors"
        if not weights.is_file():
            weights = self.model_dir / "config.json"
        st = weights.stat()
        key = f"{weights.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
        digest = hashlib.sha256(key).hexdigest()[:12]
        return self.cache_dir / f"{self.model_dir.name}-{digest}" / kind

    def get(self, label: str) -> Any:
        """The LLM for a backend label; raises RuntimeError with a user-facing message."""
        if label not in BACKENDS:
            raise RuntimeError(f"unknown backend {label!r}: choose one of {', '.join(BACKENDS)}")
        kind, extra = BACKENDS[label]
        with self._lock:  # one producer at a time; a second click waits for the first
            if kind in self._loaded:
                return self._loaded[kind]
            if self.model_dir is None:
                raise RuntimeError(f"{label} is produced from a model folder, but this demo "
                                   "was given an in-memory model: start it with a folder")
            try:
                llm = self._produce(kind)
            except ImportError as exc:
                raise RuntimeError(
                    f"{label} is unavailable here ({exc}): it needs the '{extra}' extra, "
                    f"pip install 'vesper-sdk[{extra}]'") from None
            except Exception as exc:
                raise RuntimeError(f"could not prepare {label}: {exc}") from None
            self._loaded[kind] = llm
            return llm

    def _produce(self, kind: str) -> Any:
        out = self.folder_for(kind)
        if kind == "onnx":
            from vesper_sdk.export import OnnxModel

            if not (out / "model.onnx").is_file():
                vesper_sdk.export_onnx(self.model_dir, out, verbose=False)
            return OnnxModel(out)
        from vesper_sdk.quantization import quantize

        if not (out / "config.json").is_file():
            quantize(self.model_dir, method=kind, out_dir=out, verbose=False)
        return vesper_sdk.load(out, device=self.device)


# ----------------------------------------------------------------------------- generation
def _regulator(enabled: bool, threshold: float, retries: int) -> Any:
    """The MetacognitiveRegulator for the controls' settings (None when switched off)."""
    if not enabled:
        return None
    from vesper_sdk.eval.regulator import MetacognitiveRegulator

    return MetacognitiveRegulator(threshold=float(threshold), retries=int(retries))


def fit_context(tokenizer: Any, messages: list[dict], max_new_tokens: int, context: int
                ) -> list[dict]:
    """Drop the oldest turns until prompt + answer fit the context window.

    A leading system message and the last message (the one being answered) always stay.
    """
    msgs = list(messages)
    keep_system = 1 if msgs and msgs[0]["role"] == "system" else 0
    while len(tokenizer.chat_prompt_ids(msgs)) + max_new_tokens > context:
        if len(msgs) <= keep_system + 1:
            raise RuntimeError(
                f"the message is too long for this model's {context}-token context with "
                f"{max_new_tokens} new tokens: shorten it or lower 'max tokens'")
        del msgs[keep_system]
    return msgs


def history_of(turns: Sequence[Turn]) -> list[dict]:
    """The conversation as chat messages, leaving out exchanges that ended in an error."""
    messages: list[dict] = []
    for turn in turns:
        if turn.role == "assistant" and turn.error:
            if messages and messages[-1]["role"] == "user":
                messages.pop()  # its question was never answered
            continue
        messages.append({"role": turn.role, "content": turn.text})
    return messages


def _context_of(llm: Any) -> int:
    from vesper_sdk.serving import context_window

    return context_window(llm)


class ChatSession:
    """The demo's logic, free of widgets so tests can drive it directly."""

    def __init__(self, variants: ModelVariants) -> None:
        self.variants = variants

    def respond(self, message: str, turns: list[Turn], backend: str, temperature: float,
                max_tokens: int, threshold: float, retries: int, regulate: bool = True,
                ) -> Iterator[tuple[list[Turn], str]]:
        """Yield (turns, status) as the answer streams in; status is a Markdown note."""
        message = (message or "").strip()
        if not message:
            yield turns, ""
            return
        turns = [*turns, Turn("user", message), Turn("assistant")]
        answer = turns[-1]
        kind = BACKENDS.get(backend, ("?", None))[0]
        if kind not in self.variants._loaded:
            answer.pending = f"preparing {backend} (first use)…"
            yield turns, f"Preparing **{backend}** from the model folder (first use)…"
        try:
            llm = self.variants.get(backend)
            history = fit_context(llm.tokenizer, history_of(turns[:-1]), int(max_tokens),
                                  _context_of(llm))
            regulator = _regulator(regulate, threshold, retries)
            if regulator is not None and regulator.max_retries:
                # Attempts cannot be taken back once shown, so a retried answer comes whole.
                answer.pending = "writing (the regulator may retry before answering)…"
                yield turns, ""
            start = time.perf_counter()
            last = 0.0
            params = SamplingParams(max_new_tokens=int(max_tokens),
                                    temperature=float(temperature), regulator=regulator,
                                    top_logprobs=5)
            stream = llm.chat_stream(history, params)
            for tok in stream:
                answer.tokens.append(TokenView(tok.text, float(tok.confidence),
                                               float(tok.logprob), tok.regulated or None,
                                               bool(getattr(tok, "special", False)),
                                               _alternatives(llm.tokenizer, tok),
                                               float(getattr(tok, "answer_logit", 0.0)),
                                               float(getattr(tok, "answer_confidence", 0.5))))
                answer.text += tok.text
                now = time.perf_counter()
                if now - last > 0.05:  # repaint at most ~20 times a second
                    last = now
                    yield turns, ""
            answer.stats = answer_stats(answer.tokens, time.perf_counter() - start, backend)
            yield turns, ""
        except (RuntimeError, ValueError) as exc:
            answer.error = str(exc)
            yield turns, f"⚠️ {exc}"


# ----------------------------------------------------------------------------- the UI
def _resolve_model(llm_or_dir: Any, device: str) -> tuple[Any, Path | None]:
    if llm_or_dir is None:
        llm_or_dir = DEFAULT_MODEL_DIR
    if isinstance(llm_or_dir, (str, Path)):
        path = Path(llm_or_dir)
        try:
            ModelFolder(path)
        except ModelFolderError:
            if path.resolve() == DEFAULT_MODEL_DIR:
                raise FileNotFoundError(
                    f"the bundled default model is missing ({path} has no config.json): "
                    "this checkout does not include it yet. Pass a model folder instead: "
                    "`python demo/app.py MODEL_DIR` or `vesper demo MODEL_DIR` (train one "
                    "with `vesper train`)") from None
            raise FileNotFoundError(
                f"{path} is not a model folder (no config.json or model.onnx): pass the "
                "folder written by `vesper train`, `vesper quantize` or `vesper export`"
            ) from None
        from vesper_sdk.serving import load_backend

        # dtype fp32: the selector's "PyTorch fp32" must mean what it says, even on a GPU.
        return load_backend(path, device=device, dtype="fp32"), path
    return llm_or_dir, getattr(llm_or_dir, "model_dir", None)


def build_demo(llm_or_dir: Any = None, cache_dir: str | Path | None = None,
               device: str = "auto") -> gr.Blocks:
    """The demo as a ``gr.Blocks`` for a loaded LLM or a model folder (default: bundled).

    Launch it with :func:`launch` (which applies the theme and offline settings), or
    ``.launch()`` it yourself; the colours and layout live in the page itself.
    """
    llm, model_dir = _resolve_model(llm_or_dir, device)
    variants = ModelVariants(llm, Path(model_dir) if model_dir else None,
                             Path(cache_dir) if cache_dir else default_cache_dir(), device)
    session = ChatSession(variants)
    name = Path(model_dir).name if model_dir else "in-memory model"
    context = _context_of(llm)
    max_tokens_cap = max(1, min(512, context - 8))

    with gr.Blocks(title="VesperLM chat", analytics_enabled=False) as demo:
        # The stylesheet travels inside the page, so build_demo(...).launch() looks right
        # too, and it works on Gradio versions with and without launch(css=...).
        gr.HTML(f"<style>{CSS}</style>", elem_id="vesper-style")
        gr.Markdown(f"## VesperLM chat · `{html.escape(name)}` · {context}-token context\n"
                    "Every assistant token is coloured by the model's own confidence that "
                    "it is right (its MetaHead).")
        gr.HTML(LEGEND)
        turns_state = gr.State([])
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chat = gr.HTML(render_chat([]), elem_id="vesper-chat")
                with gr.Row():
                    box = gr.Textbox(placeholder="Type a message and press Enter",
                                     show_label=False, scale=5, lines=1, max_lines=6,
                                     elem_id="vesper-input", autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1,
                                     elem_id="vesper-send")
                clear = gr.Button("Clear conversation", size="sm", elem_id="vesper-clear")
            with gr.Column(scale=1, min_width=260):
                backend = gr.Radio(list(BACKENDS), value=DEFAULT_BACKEND, label="Backend",
                                   info="INT8/INT4/ONNX are built from the model folder "
                                        "on first use, then cached", elem_id="vesper-backend")
                temperature = gr.Slider(0.0, 1.5, value=DEFAULT_TEMPERATURE, step=0.05,
                                        label="Temperature",
                                        info="0 = greedy", elem_id="vesper-temperature")
                max_tokens = gr.Slider(1, max_tokens_cap, value=min(128, max_tokens_cap),
                                       step=1, label="Max tokens", elem_id="vesper-max-tokens")
                threshold = gr.Slider(0.0, 1.0, value=0.85, step=0.01,
                                      label="Confidence threshold",
                                      info="the regulator steps in below it",
                                      elem_id="vesper-threshold")
                regulate = gr.Checkbox(True, label="Metacognitive regulator",
                                       info="decode conservatively under the threshold; "
                                            "end the answer once it is good enough",
                                       elem_id="vesper-regulate")
                retries = gr.Slider(0, 3, value=0, step=1, label="Regulator retries",
                                    info="rewrite an answer whose answer confidence is under "
                                         "the threshold (the most confident one is kept)",
                                    elem_id="vesper-retries")
                status = gr.Markdown("", elem_id="vesper-status")

        def on_send(message: str, turns: list[Turn], backend_: str, temperature_: float,
                    max_tokens_: float, threshold_: float, retries_: float, regulate_: bool,
                    ) -> Iterator[tuple[str, list[Turn], str, str]]:
            for new_turns, note in session.respond(message, turns, backend_, temperature_,
                                                   int(max_tokens_), threshold_,
                                                   int(retries_), bool(regulate_)):
                yield render_chat(new_turns), new_turns, "", note

        inputs = [box, turns_state, backend, temperature, max_tokens, threshold, retries,
                  regulate]
        outputs = [chat, turns_state, box, status]
        box.submit(on_send, inputs, outputs)
        send.click(on_send, inputs, outputs)
        clear.click(lambda: (render_chat([]), [], ""), None, [chat, turns_state, status])
    demo.vesper_session = session  # type: ignore[attr-defined]  # for tests and tools
    return demo


def theme() -> gr.themes.Base:
    """A theme that uses only the system's fonts: nothing is fetched from font CDNs."""
    return gr.themes.Base(primary_hue="blue", neutral_hue="slate", font=SYSTEM_FONTS,
                          font_mono=MONO_FONTS)


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860,
           block: bool = True) -> str:
    """Start the demo offline (no share link, no SSR node server); returns its URL."""
    kwargs: dict[str, Any] = dict(server_name=host, server_port=port, share=False,
                                  quiet=True, show_error=True)
    params = inspect.signature(demo.launch).parameters
    if "theme" in params:  # Gradio >= 6 takes the theme here
        kwargs["theme"] = theme()
    for name, value in (("ssr_mode", False), ("mcp_server", False),
                        ("enable_monitoring", False)):
        if name in params:
            kwargs[name] = value
    kwargs["prevent_thread_lock"] = True  # start, print the real address, then block
    demo.launch(**kwargs)
    url = (getattr(demo, "local_url", None) or f"http://{host}:{port}/").rstrip("/")
    if block:
        print(f"VesperLM demo running at {url} (Ctrl+C to stop)", flush=True)
        try:
            demo.block_thread()
        finally:
            demo.close()
    return url


def cli(opts: DemoOptions) -> int:
    """``vesper demo``: build the demo for the given folder and serve it until interrupted."""
    demo = build_demo(opts.model_dir, cache_dir=opts.cache_dir, device=opts.device)
    from vesper_sdk.serving import is_loopback

    if not is_loopback(opts.host):
        print(f"warning: the demo has no login and is reachable by anyone who can reach "
              f"{opts.host}:{opts.port}", file=sys.stderr)
    launch(demo, opts.host, opts.port, block=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python demo/app.py``: the same options as ``vesper demo``."""
    from vesper_sdk.cli import add_dataclass_arguments, options_from_args

    parser = argparse.ArgumentParser(prog="python demo/app.py",
                                     description=DemoOptions.__doc__)
    add_dataclass_arguments(parser, DemoOptions)
    opts = options_from_args(DemoOptions, parser.parse_args(argv))
    try:
        return cli(opts)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
