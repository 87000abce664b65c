"""How each token is chosen: one ``SamplingParams`` from every entry point (the Python API,
``vesper generate``, the HTTP server, the demo) to one batched sampler.

Adding a sampling parameter: a field here (with its check in ``validate``), its use in
:func:`sample` or the decoding loop, and its name in the HTTP protocol and the CLI options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..eval.regulator import MetacognitiveRegulator

DEFAULT_MAX_NEW_TOKENS = 128
# The one default temperature: the API, the CLI, the demo and a server request that sets none.
DEFAULT_TEMPERATURE = 0.8


@dataclass
class SamplingParams:
    """How to decode one request.

    ``temperature=0.0`` is greedy; ``top_k=0`` and ``top_p=1.0`` are off; a
    ``repetition_penalty`` > 1 discourages tokens already in the prompt or answer
    (CTRL-style). EOS or any ``stop`` string ends the answer (the stop string is not
    returned). ``seed`` makes sampling reproducible. ``regulator``: a
    :class:`~vesper_sdk.eval.regulator.MetacognitiveRegulator`, ``True`` for its defaults,
    or None. ``top_logprobs``: also report the k most likely tokens at each step.
    ``ignore_eos``: decode ``max_new_tokens`` whatever the model says (benchmarks).
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: Sequence[str] | str | None = None
    seed: int | None = None
    regulator: MetacognitiveRegulator | bool | None = None
    top_logprobs: int = 0
    ignore_eos: bool = False
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    prompt_logprobs: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the parameter that cannot work."""
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}")
        for tid in self.logit_bias or {}:
            if not isinstance(tid, int) or tid < 0:
                raise ValueError(f"logit_bias keys must be token ids >= 0, got {tid!r}")

    @property
    def penalises_output(self) -> bool:
        """Whether presence or frequency penalties apply (they count the answer's tokens)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def stops(self) -> list[str]:
        """The stop strings as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes`` applied (e.g. a per-row seed)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, options: Any, **overrides: Any) -> SamplingParams:
        """The fields of ``options`` (a CLI options object, say) that are sampling fields."""
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: getattr(options, k) for k in names if hasattr(options, k)}
        return cls(**{**given, **overrides})


def sample(scores: torch.Tensor, temperatures: Sequence[float], top_k: Sequence[int],
           top_p: Sequence[float], generators: Sequence[torch.Generator],
           min_p: Sequence[float] | None = None) -> list[int]:
    """One token id per row of ``scores`` [B,V], drawn with each row's own settings.

    Temperature, top-k, top-p and min-p are applied to all rows at once, where the logits are
    (no copy of [B,V] to the host); each row then draws with its own generator (on the
    logits' device), so a row's tokens depend only on its own seed.
    """
    x = scores.float() / torch.tensor(temperatures, device=scores.device)[:, None]
    ks = torch.tensor(top_k, device=scores.device)
    limited = (ks > 0) & (ks < x.shape[-1])
    if bool(limited.any()):
        kmax = int(ks[limited].max())
        top = x.topk(kmax, dim=-1).values
        kth = top.gather(-1, (ks.clamp(1, kmax) - 1)[:, None])
        x = torch.where(limited[:, None] & (x < kth), float("-inf"), x)
    ps = torch.tensor(top_p, device=scores.device)
    if bool((ps < 1.0).any()):
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # Drop a token when the tokens before it already hold top_p of the mass.
        drop = (probs.cumsum(-1) - probs > ps[:, None]) & (ps < 1.0)[:, None]
        drop[:, 0] = False
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    probs = x.softmax(-1)
    if min_p is not None and any(m > 0 for m in min_p):
        floor = torch.tensor(min_p, device=scores.device)[:, None] * probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)  # the most likely token always stays
    return [int(torch.multinomial(probs[i], 1, generator=g).item())
            for i, g in enumerate(generators)]
