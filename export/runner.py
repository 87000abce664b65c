"""Run an exported VesperLM with ONNX Runtime behind the same LLM API as PyTorch.

>>> from vesper_sdk.export import OnnxModel
>>> lm = OnnxModel("runs/a-onnx")          # generate / stream / chat, same regulator
>>> lm.generate("2+3=", max_new_tokens=8, temperature=0.0)

``OnnxBackend`` is a ``DecodeBackend`` (``vesper_sdk.inference``): one ``forward`` per step,
the KV cache kept as ONNX Runtime values that go straight back into the next step
through IO binding, so decoding copies nothing but the logits out of the session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, VesperConfig
from ..inference.types import HEAD_OUTPUTS, StepOutput
from ..integrity import require_intact, verify_file
from ..model import ModelFolderError
from .in_place import in_place_step, int64_array

ONNX_NAME = "model.onnx"
CONFIG_NAME = "config.json"


def physical_cores() -> int:
    """Physical CPU cores this process may use (hyper-threads do not help GEMM-bound work)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - not Linux
        allowed = set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    try:
        cpu, phys = None, "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                phys = value
            elif key == "core id" and cpu in allowed:
                cores.add((phys, value))
    except (OSError, ValueError):
        cores = set()
    return max(1, min(len(cores) or len(allowed), len(allowed)))


def default_providers() -> list[str]:
    """CUDA when ONNX Runtime has it, else CPU.

    TensorRT is used only when asked for (``providers=[...]`` or VESPER_ORT_TENSORRT=1):
    it builds an engine per input-shape profile, which with a cache that grows by one
    token per step costs far more than it saves unless profiles are tuned to the app.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = []
    if os.environ.get("VESPER_ORT_TENSORRT") == "1" and (
            "TensorrtExecutionProvider" in available):
        chosen.append("TensorrtExecutionProvider")
    if "CUDAExecutionProvider" in available:
        chosen.append("CUDAExecutionProvider")
    chosen.append("CPUExecutionProvider")
    return chosen


#: When ONNX Runtime's intra-op threads may spin waiting for work (see make_session).
SPIN_MODES = ("run", "never", "always")


def make_session(path: str | Path, providers: list[str] | None = None,
                 threads: int | None = None, spin: str = "run") -> Any:
    """An InferenceSession with all graph optimisations and ``threads`` intra-op threads
    (default one per physical core) that, with ``spin="run"``, spin inside a run and
    sleep between runs (``"never"``: always sleep; ``"always"``: ONNX Runtime's default).

    By default ONNX Runtime's threads also spin for a while after each run; in a decode
    loop the sampling code runs right then and queues behind them. Not spinning at all
    costs a thread wake-up per parallel node instead. Figures for the three settings:
    ``benchmarks/results/onnx_threads.md``.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or physical_cores()
    # Spin inside a run (a worker picks up the next node at once: decode is ~100 small
    # parallel nodes per token), never between runs, where the host's sampling and the
    # rest of the process need the cores.
    if spin not in SPIN_MODES:
        raise ValueError(f"spin must be one of {', '.join(SPIN_MODES)}, got {spin!r}")
    opts.add_session_config_entry("session.intra_op.allow_spinning",
                                  "0" if spin == "never" else "1")
    if spin == "run":
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    path = Path(path)
    # The graph and its external weights, against the folder's manifest: a zeroed range
    # of weights would otherwise load and silently change the answers.
    require_intact(path.parent)
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=providers or default_providers())
    except Exception as exc:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        raise ModelFolderError(f"{path} cannot be loaded by ONNX Runtime: the file is damaged "
                               f"or not an ONNX model ({type(exc).__name__}: "
                               f"{str(exc)[:300]}); re-run the export") from None


# Below this many parameters each operation is too small to split across threads: one
# intra-op thread decodes faster (the 3 M demo model), two threads win at 50 M ('small').
SINGLE_THREAD_PARAMS = 10_000_000


def read_export_config(model_dir: str | Path) -> tuple[VesperConfig, dict[str, Any]]:
    """(VesperConfig, the ``onnx`` block) of an exported folder, with errors naming the fix."""
    model_dir = Path(model_dir)
    path = model_dir / CONFIG_NAME
    if not (model_dir / ONNX_NAME).is_file():
        hint = (" (it holds model.safetensors: export it first with "
                "`vesper export MODEL_DIR -o OUT_DIR`)"
                if (model_dir / "model.safetensors").is_file() else "")
        raise ModelFolderError(f"{model_dir} is not an ONNX export: {ONNX_NAME} is missing"
                               f"{hint}")
    try:
        verify_file(path)
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFolderError(f"{path} is missing: re-run the export") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path} is not valid JSON ({exc}): re-run the export") from None
    known = {f for f in VesperConfig.__dataclass_fields__}
    try:
        config = VesperConfig.from_dict({k: v for k, v in data.items() if k in known})
    except (ConfigError, TypeError) as exc:
        raise ModelFolderError(f"{path}: {exc}") from None
    return config, dict(data.get("onnx") or {})


class OnnxBackend:
    """DecodeBackend over an exported ``model.onnx`` (fp32, int8 or int4).

    ``threads``: ONNX Runtime's intra-op threads; by default one for models under
    ``SINGLE_THREAD_PARAMS`` parameters, else one per physical core. ``spin``: see
    :func:`make_session`. ``host_threads``: torch's threads for the sampling between
    steps (default: one on the CPU, torch's own setting with CUDA; 0: torch's own).
    """

    def __init__(self, model_dir: str | Path, providers: list[str] | None = None,
                 threads: int | None = None, spin: str = "run",
                 host_threads: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.config, self.onnx_info = read_export_config(self.model_dir)
        self.vocab_size = self.config.vocab_size
        self.max_seq_len = self.config.max_seq_len
        if threads is None and self.config.num_parameters() < SINGLE_THREAD_PARAMS:
            threads = 1
        self.threads = threads or physical_cores()
        self.session = make_session(self.model_dir / ONNX_NAME, providers, self.threads, spin)
        names = [i.name for i in self.session.get_inputs()]
        self._past_names = [n for n in names if n.startswith("past_key_values.")]
        self._present_names = [o.name for o in self.session.get_outputs()
                               if o.name.startswith("present.")]
        self.use_cache = bool(self._past_names)
        self.providers = self.session.get_providers()
        # Where the cache lives between steps: on the GPU with CUDA/TensorRT (IO binding,
        # so decode never round-trips it through host memory; logits always come back to
        # the host), else numpy arrays in host memory.
        self._cache_device = ("cuda" if self.providers[0] in (
            "CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu")
        self._empty: dict[int, list[Any]] = {}
        self.reserved = 0  # see reserve(); read (and reset) by an in-place prefill
        # The sampler's torch work between steps runs on one thread on the CPU: it is small
        # next to a step, and torch's own worker threads would contend with ONNX Runtime's
        # for the same cores (see DecodeBackend).
        if host_threads is None:
            host_threads = 1 if self._cache_device == "cpu" else 0
        self.host_threads = host_threads or None
        outputs = {o.name for o in self.session.get_outputs()}
        # "answer" is missing from exports made before the MetaHead's answer row.
        self._head_names = [n for n in HEAD_OUTPUTS if n in outputs]
        self._output_names = [*self._head_names, *self._present_names]
        # An in-place KV export (export.in_place): the cache stays in buffers that ONNX
        # Runtime writes at each row's length; the CPU only (its fp32 operator).
        self.in_place = self.onnx_info.get("kv_layout") == "in_place"
        self.has_position_ids = "position_ids" in names
        if self.in_place and self._cache_device != "cpu":
            raise ModelFolderError(f"{self.model_dir} is an in-place KV export, which runs on "
                                   "the CPU provider only: export without --in-place-kv")

    @property
    def device(self) -> torch.device:
        # Inputs and outputs of forward() are host tensors whatever ONNX Runtime runs on.
        return torch.device("cpu")

    def reserve(self, positions: int) -> None:
        """Positions per row the next prefill's rows will reach (prompt + new tokens): an
        in-place export sizes its cache buffers for them at that prefill, so decoding never
        grows (copies) them. Other layouts ignore it."""
        self.reserved = max(0, int(positions))

    def _empty_past(self, batch: int) -> list[Any]:
        """Zero-length past (prefill): the one graph serves prefill and decode."""
        if batch not in self._empty:
            shape = (batch, self.config.num_heads, 0, self.config.head_dim)
            empty = np.zeros(shape, np.float32)
            if self._cache_device == "cpu":
                self._empty[batch] = [empty for _ in self._past_names]
            else:
                import onnxruntime as ort

                self._empty[batch] = [ort.OrtValue.ortvalue_from_numpy(
                    empty, self._cache_device, 0) for _ in self._past_names]
        return self._empty[batch]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past_key_values: Any) -> StepOutput:
        """One step: input_ids/position_ids [B,S], attention_mask [B,past+S]."""
        if not self.use_cache:
            return self._forward_no_cache(input_ids, attention_mask, position_ids,
                                          past_key_values)
        if self.in_place:
            return in_place_step(self, input_ids, attention_mask, past_key_values)
        past = past_key_values if past_key_values is not None else self._empty_past(
            input_ids.shape[0])
        if self._cache_device == "cpu":
            # On the CPU a plain run() with numpy arrays costs less per step than IO
            # binding (measured on the int4 demo model, one thread).
            feed = dict(zip(self._past_names, past, strict=True))
            feed.update(input_ids=int64_array(input_ids),
                        attention_mask=int64_array(attention_mask),
                        position_ids=int64_array(position_ids))
            outs = self.session.run(self._output_names, feed)
            heads = len(self._head_names)
            return StepOutput.from_heads(outs[:heads], outs[heads:])
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", int64_array(input_ids))
        binding.bind_cpu_input("attention_mask", int64_array(attention_mask))
        binding.bind_cpu_input("position_ids", int64_array(position_ids))
        for name, value in zip(self._past_names, past, strict=True):
            binding.bind_ortvalue_input(name, value)
        for name in self._head_names:
            binding.bind_output(name, "cpu")
        for name in self._present_names:
            binding.bind_output(name, self._cache_device)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        heads = len(self._head_names)
        return StepOutput.from_heads([o.numpy() for o in outs[:heads]], list(outs[heads:]))

    def reorder_cache(self, past: Any, index: torch.Tensor) -> Any:
        """Keep only the batch rows in ``index`` (rows that finished stop costing compute)."""
        if not self.use_cache:
            return tuple(t.index_select(0, index.cpu()) for t in past)
        rows = index.cpu().numpy()
        if self.in_place:
            return past.rows(rows)
        if self._cache_device == "cpu":
            return [np.ascontiguousarray(v[rows]) for v in past]
        import onnxruntime as ort

        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[rows]),
                                                 self._cache_device, 0) for v in past]

    def _forward_no_cache(self, input_ids, attention_mask, position_ids, past) -> StepOutput:
        # A graph exported with --no-cache re-reads the whole sequence each step; the
        # "cache" is the token and position history, returned for the next call.
        new = input_ids.shape[1]
        if past is not None:
            input_ids = torch.cat([past[0], input_ids.cpu()], dim=1)
            position_ids = torch.cat([past[1], position_ids.cpu()], dim=1)
        feed = {"input_ids": int64_array(input_ids), "attention_mask": int64_array(attention_mask),
                "position_ids": int64_array(position_ids)}
        heads = self.session.run(self._head_names, feed)
        return StepOutput.from_heads([h[:, -new:] for h in heads],
                                     (input_ids.cpu(), position_ids.cpu()))

    def __repr__(self) -> str:
        return (f"OnnxBackend({self.model_dir}, {self.onnx_info.get('quantize') or 'fp32'}, "
                f"{self.providers[0]})")


def register_optimum() -> type:
    """Teach transformers' ``AutoConfig`` the ``vesper`` model type; returns the class.

    After this, Hugging Face Optimum loads an export folder as it is::

        from vesper_sdk.export import register_optimum
        register_optimum()
        from optimum.onnxruntime import ORTModelForCausalLM
        model = ORTModelForCausalLM.from_pretrained("runs/a-onnx")   # model.generate(...)

    The graph already has the names Optimum looks for (``input_ids``, ``attention_mask``,
    ``position_ids``, ``past_key_values.{i}.key/value``, ``logits``, ``present.*``);
    what it lacks is a config class, which maps HF's attribute names onto ours. The
    MetaHead outputs (``confidence``, ``stop``) are computed but ignored by Optimum.
    """
    # One config class for the model type: the one vesper_sdk.hf registers for the Auto
    # classes (it maps HF's attribute names onto ours), so Optimum and AutoModelForCausalLM
    # agree on what "vesper" is.
    from ..hf import register_config
    from ..hf.config import VesperHFConfig

    register_config()
    return VesperHFConfig


