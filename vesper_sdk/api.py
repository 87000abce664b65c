"""The public API: one call per job, and where each one lives.

>>> import vesper_sdk as vs
>>> result = vs.train(data="chat.jsonl", out_dir="runs/a", preset="tiny", max_steps=500)
>>> lm = vs.load(result.model_dir)                       # generate / stream / chat
>>> vs.calibrate(result.model_dir, data="heldout.jsonl")
>>> vs.quantize(result.model_dir, method="nf4", out_dir="runs/a-nf4")
>>> vs.export_onnx(result.model_dir, "runs/a-onnx", quantize="int4")
>>> vs.serve(result.model_dir, port=8000)

Each name resolves on first use to the function (or class) of its job's package, so
``import vesper_sdk`` stays fast and works without the optional extras (bitsandbytes,
onnx, fastapi, gradio). The packages are named for their concern (``training``,
``quantization``, ``serving``), never like a function here: importing a submodule binds
its name on the parent package, which would shadow the function.
"""

from __future__ import annotations

from .lazy import lazy_names

# name -> (module, attribute or None for the module itself).
PUBLIC: dict[str, tuple[str, str | None]] = {
    "train": ("vesper_sdk.training.loop", "train"),
    "load": ("vesper_sdk.inference.llm", "load"),
    "calibrate": ("vesper_sdk.training.calibration", "calibrate"),
    "quantize": ("vesper_sdk.quantization.api", "quantize"),
    "export_onnx": ("vesper_sdk.export.onnx_export", "export_onnx"),
    "serve": ("vesper_sdk.serving.command", "serve"),
    "LLM": ("vesper_sdk.inference.llm", "LLM"),
    "SamplingParams": ("vesper_sdk.inference.sampling", "SamplingParams"),
    "ModelFolder": ("vesper_sdk.folder", "ModelFolder"),
    "TrainOptions": ("vesper_sdk.training.options", "TrainOptions"),
    "VelvetOptimizer": ("vesper_sdk.training.optim", "VelvetOptimizer"),
    "export": ("vesper_sdk.export", None),
    "kernels": ("vesper_sdk.kernels", None),
}


# vesper_sdk.<name> for a name in PUBLIC (vesper_sdk/__init__.py's __getattr__).
resolve = lazy_names("vesper_sdk", PUBLIC)
