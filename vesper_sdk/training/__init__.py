"""Training: ``vesper_sdk.train(...)``, ``vesper train``, ``torchrun -m vesper_sdk.training``.

>>> from vesper_sdk.training import train
>>> result = train("builtin:skills", "runs/a", preset="tiny", max_steps=500)

One module a job:

- ``options.py``: :class:`TrainOptions` (validated), :class:`TrainResult`, ``TrainingError``;
- ``loop.py``: :func:`train` / :func:`run`, the loop (when to log, evaluate, checkpoint);
- ``trainer.py``: :class:`Trainer`, one run's state, set-up and optimizer step;
- ``build.py``: tokenizer, model and optimizer from the options;
- ``distributed.py``, ``precision.py``: torchrun / DDP, devices, autocast;
- ``losses.py``, ``evaluation.py``, ``schedule.py``, ``records.py``: LM loss, validation,
  lr schedule, metrics.jsonl and the loss curve;
- ``data.py``: reading, tokenizing, caching and batching the data;
- ``checkpoint.py``: checkpoints (safetensors + JSON, atomic);
- ``calibration.py``: refit the MetaHead confidence (``vesper calibrate``);
- ``autoscale.py``: ``preset="auto"``;
- ``optim.py``, ``velvet_update.py``: the Velvet optimizer and its update paths;
- ``cli.py``: ``vesper train`` and ``python -m vesper_sdk.training``.

Names resolve on first use, so ``vesper_sdk.training.data`` (which evaluation and
quantization read) loads without the trainer.
"""

from __future__ import annotations

from ..lazy import lazy_names

# name -> (module, attribute), resolved on first attribute access.
_LAZY: dict[str, tuple[str, str | None]] = {
    name: (f"{__name__}.{module}", name) for name, module in (
        ("train", "loop"), ("run", "loop"), ("Trainer", "trainer"),
        ("TrainOptions", "options"), ("TrainResult", "options"), ("TrainingError", "options"),
        ("calibrate", "calibration"), ("CalibrateOptions", "calibration"),
        ("VelvetOptimizer", "optim"), ("DataError", "data"), ("DataSource", "data"))}

__all__ = [*_LAZY]

__getattr__ = lazy_names(__name__, _LAZY)
