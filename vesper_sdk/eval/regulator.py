"""The metacognitive regulator: decoding-time control from the MetaHead.

It reads the MetaHead's per-token ``confidence`` (probability that the model's own top-1
prediction is right) and ``stop`` (probability that the answer ends here), in three phases:

1. *Planning* (:meth:`MetacognitiveRegulator.plan`): before the first token, fix the
   budget, i.e. the list of attempts (the user's sampling for the first; a warmer,
   re-seeded one for each retry, since a greedy retry would repeat the first answer).
2. *Online regulation* (:meth:`~MetacognitiveRegulator.regulate_step`): at a position
   whose confidence is under ``threshold`` the next token is decoded conservatively
   (``conservative_temperature``, greedy by default) and flagged ``"conservative"``.
3. *Satisficing termination*: the answer ends (EOS, flagged ``"stopped"``) as soon as it
   is good enough rather than when the LM happens to sample EOS: the stop head says the
   answer is complete (``stop >= stop_threshold``) *and* the answer so far was written
   with high confidence (the MetaHead's answer confidence of the tokens so far ``>=
   satisfice_confidence``, the aspiration level; by default ``threshold``). An unsure
   answer is never cut short.

With ``retries=N`` an answer whose answer confidence (the MetaHead's answer logit pooled
over its tokens, ``vesper_sdk.model.answer_confidence``) is under ``threshold`` is written
again, up to N more times (at most ``max_iterations``), stopping at the first attempt
that reaches the threshold (satisficing again) and keeping the attempt with the highest
answer confidence. Its tokens are flagged ``"retry k"`` (k = the attempt kept, 1 = first
retry) or ``"kept first of n"`` when the original answer won.

With ``abstain_below`` set, an answer whose answer confidence (after its retries) is still
under it is not given: the text ``abstention`` ("I'm not sure.") comes instead, its tokens
flagged ``"abstained"`` (the withheld answer's confidence on each). The answer is then
held back until it is complete, as with retries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Flags written into ``Token.regulated``; see the module docstring.
CONSERVATIVE = "conservative"
STOPPED = "stopped"
ABSTAINED = "abstained"
ABSTENTION = "I'm not sure."


@dataclass(frozen=True)
class Attempt:
    """How one attempt of an answer is sampled (from :meth:`MetacognitiveRegulator.plan`)."""

    index: int  # 0 = the first answer, k = the k-th retry
    temperature: float
    seed: int | None


@dataclass(frozen=True)
class StepDecision:
    """What the regulator does at one position: decode conservatively, or end the answer."""

    conservative: bool = False
    stop: bool = False

    @property
    def flag(self) -> str | None:
        """The ``Token.regulated`` flag of this decision (None when it changes nothing)."""
        if self.stop:
            return STOPPED
        return CONSERVATIVE if self.conservative else None


@dataclass
class MetacognitiveRegulator:
    """Acts on the MetaHead while decoding: conservative tokens, satisficing stop, retries.

    Pass it as ``llm.generate(..., regulator=MetacognitiveRegulator())`` (or
    ``regulator=True`` for these defaults). Every action shows in the token stream as
    ``Token.regulated``: ``"conservative"``, ``"stopped"``, ``"retry k"`` or
    ``"kept first of n"`` (joined by ``", "`` when several apply to one token).

    Args:
        threshold: confidence under which a position is decoded conservatively, and the
            answer confidence a retry tries to reach.
        max_iterations: cap on the retries whatever ``retries`` asks.
        retries: regenerate an answer whose answer confidence is under ``threshold`` up to
            this many times (0 = off); the most confident attempt is kept. With retries
            on, a streamed answer arrives once its attempts are done.
        conservative_temperature: temperature at a low-confidence position (0 = greedy).
        stop_threshold: stop-head probability at which an answer may end (satisficing).
        satisfice_confidence: answer confidence the answer needs before it may be ended
            early; ``None`` = ``threshold``.
        min_tokens: never end an answer early before this many tokens.
        retry_temperature: the lowest temperature a retry samples at, so that retries of a
            greedy answer differ from it.
        satisfice: turn satisficing termination on or off.
        abstain_below: answer ``abstention`` instead of an answer whose answer confidence is
            under this (None = never abstain).
        abstention: the text given instead of an unsure answer.
    """

    threshold: float = 0.85
    max_iterations: int = 3
    retries: int = 0
    conservative_temperature: float = 0.0
    stop_threshold: float = 0.5
    satisfice_confidence: float | None = None
    min_tokens: int = 1
    retry_temperature: float = 0.7
    satisfice: bool = True
    abstain_below: float | None = None
    abstention: str = ABSTENTION
    name: str = field(default="metacognitive", repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.stop_threshold <= 1.0:
            raise ValueError(f"stop_threshold must be in [0, 1], got {self.stop_threshold}")
        if self.retries < 0 or self.max_iterations < 0:
            raise ValueError("retries and max_iterations must be >= 0, got "
                             f"{self.retries} and {self.max_iterations}")
        if self.conservative_temperature < 0 or self.retry_temperature < 0:
            raise ValueError("temperatures must be >= 0")
        if self.abstain_below is not None and not 0.0 <= self.abstain_below <= 1.0:
            raise ValueError(f"abstain_below must be in [0, 1], got {self.abstain_below}")

    @property
    def holds_answers(self) -> bool:
        """Whether answers are held until complete (retries or abstention decide them)."""
        return self.max_retries > 0 or self.abstain_below is not None

    def abstains(self, mean_confidence: float) -> bool:
        """Whether an answer this confident is withheld (``abstain_below``)."""
        return self.abstain_below is not None and mean_confidence < self.abstain_below

    # --- planning ---------------------------------------------------------------------
    @property
    def max_retries(self) -> int:
        """Retries actually allowed: ``retries`` capped by ``max_iterations``."""
        return min(self.retries, self.max_iterations)

    @property
    def aspiration(self) -> float:
        """Mean confidence at which an answer is good enough (satisficing)."""
        return self.threshold if self.satisfice_confidence is None else self.satisfice_confidence

    def plan(self, temperature: float, seed: int | None) -> list[Attempt]:
        """The attempts an answer may take: the user's sampling, then the retries.

        Retries sample at ``max(temperature, retry_temperature)`` with seeds ``seed + k``
        (or fresh ones without a seed): reproducible, and different from the first answer.
        """
        attempts = [Attempt(0, temperature, seed)]
        for k in range(1, self.max_retries + 1):
            attempts.append(Attempt(k, max(temperature, self.retry_temperature),
                                    None if seed is None else seed + k))
        return attempts

    # --- online regulation ------------------------------------------------------------
    def regulate_step(self, confidence: float, stop_prob: float, n_generated: int,
                      answer_confidence: float | None) -> StepDecision:
        """Decide at one position, before its token is chosen.

        Args:
            confidence: MetaHead confidence at this position (about the token to come).
            stop_prob: stop-head probability at this position (the answer ends here).
            n_generated: tokens already in the answer.
            answer_confidence: the MetaHead's answer confidence of those tokens (None when
                there are none).
        """
        if (self.satisfice and n_generated >= max(self.min_tokens, 1)
                and stop_prob >= self.stop_threshold
                and answer_confidence is not None and answer_confidence >= self.aspiration):
            return StepDecision(stop=True)
        return StepDecision(conservative=confidence < self.threshold)

    # --- retries ----------------------------------------------------------------------
    def accepts(self, mean_confidence: float) -> bool:
        """Whether an answer is confident enough to need no (further) retry."""
        return mean_confidence >= self.threshold

    @staticmethod
    def retry_flag(kept: int, attempts: int) -> str | None:
        """The flag for the tokens of the kept attempt (None when no retry was made)."""
        if attempts <= 1:
            return None
        return f"retry {kept}" if kept > 0 else f"kept first of {attempts}"


def as_regulator(regulator: Any) -> MetacognitiveRegulator | None:
    """``None``/``False`` -> off, ``True`` -> defaults, a regulator -> itself."""
    if regulator is None or regulator is False:
        return None
    if regulator is True:
        return MetacognitiveRegulator()
    if isinstance(regulator, MetacognitiveRegulator):
        return regulator
    raise TypeError(f"regulator must be None, True or a MetacognitiveRegulator, "
                    f"got {type(regulator).__name__}")


def join_flags(*flags: str | None) -> str | None:
    """Join regulator flags into one ``Token.regulated`` string (None when there is none)."""
    parts = [f for f in flags if f]
    return ", ".join(parts) if parts else None
