"""What the demo's page shows: tokens coloured by confidence, the stats under an answer,
the legend and the page's CSS. Plain functions of the conversation (no Gradio), so they
are tested without a browser; ``app.py`` builds the page around them."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def confidence_colour(confidence: float) -> str:
    """Background colour for a token: red (0) through yellow (0.5) to green (1).

    Light tints (HSL lightness 80 %) so dark text stays readable on every shade.
    """
    c = min(1.0, max(0.0, float(confidence)))
    return f"hsl({round(120 * c)}, 80%, 80%)"


@dataclass
class TokenView:
    """What the page shows of one generated token."""

    text: str
    confidence: float
    logprob: float
    regulated: str | None = None  # the regulator's flag ("conservative", "retry 1", ...)
    special: bool = False  # the end-of-sequence token: no text, shown only if regulated
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # top-5 (text, p)
    answer_logit: float = 0.0  # the MetaHead's answer logit at this token
    answer_confidence: float = 0.5  # the answer's confidence up to this token (the engine's)


@dataclass
class Turn:
    """One message of the conversation; assistant turns keep their tokens and stats."""

    role: str
    text: str = ""
    tokens: list[TokenView] = field(default_factory=list)
    stats: dict[str, Any] | None = None
    error: str | None = None
    pending: str | None = None  # shown while the answer is on its way


# Flags the regulator puts on single tokens; the others ("retry k", "kept first of n")
# describe the whole answer and are reported once, in the stats line.
TOKEN_ACTIONS = ("conservative", "stopped", "abstained")


def _flags(tok: TokenView) -> list[str]:
    return [f for f in (tok.regulated or "").split(", ") if f]


def token_actions(tok: TokenView) -> list[str]:
    """The regulator's actions on this very token (what the page underlines)."""
    return [f for f in _flags(tok) if f in TOKEN_ACTIONS]


def answer_stats(tokens: Sequence[TokenView], seconds: float, backend: str) -> dict[str, Any]:
    """tokens/s, the answer's confidence, mean and lowest token confidence (with the
    token), regulator actions.

    Speed counts every generated token (the end token too: it cost a step); the answer
    confidence is the MetaHead's over every generated token (``answer_confidence``, the
    end token included, as ``vesper eval`` scores it); token confidence statistics cover
    the visible tokens, the ones the reader sees coloured.
    ``regulated`` counts the tokens the regulator acted on, ``regulator_kinds`` those
    actions by kind, and ``retry`` is the answer-level outcome of retries, if any.
    """
    visible = [t for t in tokens if not t.special]
    lowest = min(visible, key=lambda t: t.confidence) if visible else None
    kinds: dict[str, int] = {}
    retry = None
    for t in tokens:
        for flag in _flags(t):
            if flag in TOKEN_ACTIONS:
                kinds[flag] = kinds.get(flag, 0) + 1
            else:
                retry = flag
    return {
        "tokens": len(visible),
        "tokens_per_s": len(tokens) / seconds if seconds > 0 else 0.0,
        "answer_confidence": tokens[-1].answer_confidence if tokens else 0.5,
        "mean_confidence": (sum(t.confidence for t in visible) / len(visible)
                            if visible else 0.0),
        "min_confidence": lowest.confidence if lowest else 0.0,
        "min_token": lowest.text if lowest else "",
        "regulated": sum(1 for t in tokens if token_actions(t)),
        "regulator_kinds": kinds,
        "retry": retry,
        "backend": backend,
    }


def _token_span(tok: TokenView) -> str:
    title = f"confidence {tok.confidence:.2f} · logprob {tok.logprob:.2f}"
    if tok.alternatives:  # as llama.cpp's web UI: the most likely tokens at this position
        title += "\ntop 5: " + ", ".join(f"{text!r} {p:.2f}" for text, p in tok.alternatives)
    cls = "vesper-tok"
    text = html.escape(tok.text)
    if token_actions(tok):
        cls += " vesper-regulated"
    if tok.regulated:
        title += f" · regulator: {tok.regulated}"
    if tok.special:  # the regulator ended the answer here: show where, as a stop sign
        cls += " vesper-end"
        text = ""  # drawn by CSS: a small square, whatever fonts the system has
    return (f'<span class="{cls}" style="background-color:{confidence_colour(tok.confidence)}"'
            f' data-confidence="{tok.confidence:.3f}" title="{html.escape(title)}">'
            f"{text}</span>")


def _alternatives(tokenizer: Any, tok: Any) -> list[tuple[str, float]]:
    """A token's top-5 alternatives as (text, probability)."""
    return [(tokenizer.decode([int(i)], skip_special_tokens=False), math.exp(lp))
            for i, lp in (getattr(tok, "top_logprobs", None) or [])[:5]]


def _badge(stats: dict[str, Any]) -> str:
    """The answer's confidence at a glance (the MetaHead's answer confidence), coloured
    as its tokens are; an abstention says so (with the withheld answer's confidence)."""
    if stats["regulator_kinds"].get("abstained"):
        label = (f"abstained: not sure enough to answer "
                 f"(confidence {stats['answer_confidence']:.2f})")
    else:
        label = f"answer confidence {stats['answer_confidence']:.2f}"
    return (f'<span class="vesper-badge" style="background-color:'
            f'{confidence_colour(stats["answer_confidence"])}">{html.escape(label)}</span>')


def _stats_line(stats: dict[str, Any]) -> str:
    low = stats["min_token"].strip() or stats["min_token"]
    parts = [
        _badge(stats),
        f"<b>{stats['tokens_per_s']:.1f}</b> tokens/s",
        f"{stats['tokens']} tokens",
        f"mean confidence <b>{stats['mean_confidence']:.2f}</b>",
        f"lowest <b>{stats['min_confidence']:.2f}</b>"
        + (f" (“{html.escape(low)}”)" if low else ""),
        f"regulator: <b>{stats['regulated']}</b> action{'s' if stats['regulated'] != 1 else ''}"
        + (" (" + ", ".join(f"{n} {html.escape(k)}" for k, n in
                            sorted(stats["regulator_kinds"].items())) + ")"
           if stats["regulator_kinds"] else "")
        + (f", {html.escape(_retry_words(stats['retry']))}" if stats.get("retry") else ""),
        html.escape(stats["backend"]),
    ]
    return '<div class="vesper-stats">' + " · ".join(parts) + "</div>"


def _retry_words(flag: str) -> str:
    """'retry 2' -> 'kept retry 2'; 'kept first of 3' stays as it is."""
    return flag if flag.startswith("kept") else f"kept {flag}"


def render_chat(turns: Sequence[Turn]) -> str:
    """The conversation as HTML: user bubbles, coloured assistant tokens, stats lines."""
    if not turns:
        return ('<div class="vesper-chat"><div class="vesper-empty">Ask something: each '
                "token of the answer is coloured by how sure the model is of it.</div></div>")
    out = ['<div class="vesper-chat">']
    for turn in turns:
        if turn.role == "user":
            out.append('<div class="vesper-row vesper-user"><div class="vesper-bubble">'
                       f"{html.escape(turn.text)}</div></div>")
            continue
        body = "".join(_token_span(t) for t in turn.tokens
                       if t.text or (t.special and token_actions(t)))
        if turn.error:
            body += f'<div class="vesper-error">{html.escape(turn.error)}</div>'
        elif not body and turn.stats is None:
            body = f'<span class="vesper-thinking">{html.escape(turn.pending or "…")}</span>'
        out.append('<div class="vesper-row vesper-assistant"><div class="vesper-bubble">'
                   f'<div class="vesper-answer">{body}</div>'
                   + (_stats_line(turn.stats) if turn.stats else "") + "</div></div>")
    out.append("</div>")
    return "".join(out)


LEGEND = (
    '<div class="vesper-legend">'
    '<span class="vesper-legend-label">confidence</span>'
    '<span class="vesper-legend-end">0</span>'
    '<span class="vesper-scale"></span>'
    '<span class="vesper-legend-end">1</span>'
    '<span class="vesper-legend-item"><span class="vesper-tok vesper-regulated" '
    f'style="background-color:{confidence_colour(0.4)}">token</span> decoded conservatively '
    "by the regulator</span>"
    '<span class="vesper-legend-item"><span class="vesper-tok vesper-end"></span> regulator '
    "ended the answer</span>"
    '<span class="vesper-legend-item vesper-muted">hover a token for its numbers</span>'
    "</div>")

CSS = """
.vesper-chat { display: flex; flex-direction: column; gap: 10px; padding: 12px;
  min-height: 380px; max-height: 62vh; overflow-y: auto; background: #f7f7f9;
  border: 1px solid #e3e3e8; border-radius: 12px; }
.vesper-empty { color: #6b7280; margin: auto; text-align: center; font-size: 15px; }
.vesper-row { display: flex; }
.vesper-user { justify-content: flex-end; }
.vesper-bubble { max-width: 85%; padding: 10px 14px; border-radius: 14px; line-height: 1.9;
  font-size: 15px; white-space: pre-wrap; word-break: break-word; color: #111827; }
.vesper-user .vesper-bubble { background: #2563eb; color: #ffffff; }
.vesper-assistant .vesper-bubble { background: #ffffff; border: 1px solid #e5e7eb; }
.vesper-tok { border-radius: 4px; padding: 1px 1px; color: #111827;
  box-decoration-break: clone; -webkit-box-decoration-break: clone; }
.vesper-badge { border-radius: 0.6em; padding: 0 0.5em; font-weight: 600; }
.vesper-regulated { text-decoration: underline wavy #7c3aed; text-decoration-thickness: 1.5px;
  text-underline-offset: 4px; }
.vesper-end { display: inline-block; width: 0.62em; height: 0.62em; margin: 0 3px;
  padding: 0; border-radius: 2px; background: #7c3aed !important; vertical-align: 0; }
.vesper-stats { margin-top: 6px; padding-top: 6px; border-top: 1px dashed #e5e7eb;
  font-size: 12.5px; line-height: 1.5; color: #4b5563; white-space: normal; }
.vesper-error { color: #b91c1c; white-space: normal; }
.vesper-thinking { color: #9ca3af; }
.vesper-legend { display: flex; flex-wrap: wrap; align-items: center; gap: 8px;
  font-size: 13px; color: #374151; margin: 2px 0 6px; }
.vesper-scale { display: inline-block; width: 180px; height: 12px; border-radius: 6px;
  background: linear-gradient(to right, hsl(0,80%,80%), hsl(60,80%,80%), hsl(120,80%,80%));
  border: 1px solid #d1d5db; }
.vesper-legend-item { margin-left: 14px; }
.vesper-muted { color: #6b7280; }
"""


# ----------------------------------------------------------------------------- backends
