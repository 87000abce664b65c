"""Evaluation: the teacher-forced scorer, calibration metrics and the metacognitive regulator.

``evaluate`` / ``EvalOptions`` (:mod:`.report`) resolve on first use: the report imports
the generation API, which itself imports :mod:`.regulator` from this package, so loading
it here eagerly would make that an import cycle.
"""

from __future__ import annotations

from ..lazy import lazy_names
from .metrics import (
    ConfidenceFit,
    ReliabilityBins,
    auroc,
    bin_index,
    brier_score,
    calibration_summary,
    ece_from_bin_sums,
    expected_calibration_error,
    fit_confidence,
    fit_platt,
    mean,
    paired_bootstrap,
    rankdata,
    reliability_bins,
)
from .regulator import Attempt, MetacognitiveRegulator, StepDecision, as_regulator, join_flags

# name -> (module, attribute), resolved on first attribute access.
_LAZY: dict[str, tuple[str, str | None]] = {
    name: (f"{__name__}.{module}", name) for name, module in (
        ("evaluate", "report"), ("EvalOptions", "report"), ("format_report", "report"),
        ("skills_accuracy", "report"), ("encode_examples", "scorer"),
        ("score_tokens", "scorer"), ("TokenStats", "scorer"))}

__all__ = ["Attempt", "ConfidenceFit", "MetacognitiveRegulator", "ReliabilityBins",
           "StepDecision", "as_regulator", "auroc", "bin_index", "brier_score",
           "calibration_summary", "ece_from_bin_sums", "expected_calibration_error",
           "fit_confidence", "fit_platt", "join_flags", "mean", "paired_bootstrap", "rankdata",
           "reliability_bins", *_LAZY]


__getattr__ = lazy_names(__name__, _LAZY)
