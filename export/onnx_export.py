"""Export a VesperLM model folder to ONNX, optionally INT8/INT4, verified with ONNX Runtime.

>>> import vesper_sdk as vs
>>> vs.export_onnx("runs/a/model", "runs/a-onnx")                  # fp32
>>> vs.export_onnx("runs/a/model", "runs/a-int4", quantize="int4")  # MatMulNBits, 4-bit blocks

One graph serves prefill and decode: inputs ``input_ids`` [B,S], ``attention_mask``
[B,P+S], ``position_ids`` [B,S] and ``past_key_values.{i}.key/value`` [B,H,P,D] with P >= 0
(P = 0 at prefill); outputs ``logits`` [B,S,V], ``confidence`` and ``stop`` [B,S] (the
MetaHead) and ``present.{i}.key/value`` [B,H,P+S,D]. Batch and sequence axes are dynamic;
FlyLoRA's top-k rank selection (TopK, then a Gather of the chosen ranks) is inside the graph.

The graph comes from ``torch.onnx.export(dynamo=True)``: the TorchScript exporter has no
``aten::rms_norm`` below opset 23, while the dynamo exporter handles RMSNorm, SDPA with a
boolean mask and a zero-length past at every opset we allow.

Quantization happens on the exported graph with ONNX Runtime's own tools:
``int8`` = ``quantize_dynamic`` (int8 weights, per-row scales, activations quantized at run
time) on the block MatMuls, the LM head and the embedding; ``int4`` = ``MatMulNBits``
(4-bit weight blocks of ``block_size`` along K, fp32 scales) on the same MatMuls and
``GatherBlockQuantized`` for the embedding. The tied LM head is a runtime ``Transpose`` of
the embedding in the fp32 graph (stored once); quantized graphs store it as its own
initializer so the quantizers see a constant MatMul weight, and int4 then lets the lookup
read the head's 4-bit table (stored once again, ``export.fusions``). FlyLoRA's A/B, the MetaHead
and the MoE router stay fp32 (see vesper_sdk.quantization for why).

Opset: 23 by default, for its native RMSNormalization, RotaryEmbedding and Attention
(with the KV cache as inputs and outputs) operators, which ``export.lowering`` maps the
model's attention onto; where the installed onnxscript or ONNX Runtime lacks them, the
export keeps the plain ones (``onnx.fused_attention`` in config.json says which). It
needs ONNX Runtime >= 1.22; ``--opset 18`` (fp32/int8) or 21 (int4, whose embedding is
an INT4 tensor) serve older runtimes. ``in_place_kv`` exports ONNX Runtime's
GroupQueryAttention instead (``export.in_place``).

The folder also loads in Hugging Face Optimum (``ORTModelForCausalLM``) after
``vesper_sdk.export.register_optimum()``: same input/output names, same greedy tokens.

Every export is checked before it is declared done: ONNX Runtime against PyTorch on
random prompts (batch 2, padded) over a prefill and several decode steps. fp32:
max |logits difference| <= 1e-4. Quantized graphs: stated looser bounds on the relative
logits error and on how far the ONNX top-1 is from PyTorch's top-1 logit
(``QUANT_BOUNDS``). The folder is assembled aside and renamed into place only when the
check passes, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_write_folder
from ..config import VesperConfig
from ..folder import ModelFolder
from ..hf.card import onnx_section, update_model_card
from ..hf.files import write_folder_files
from ..inference.types import HEAD_OUTPUTS, TOP_LOGPROB
from ..model import CONFIG_NAME, WEIGHTS_NAME, FlyLoRALinear, ModelFolderError, VesperLM
from ..tokenizer import TOKENIZER_NAME
from .fusions import fuse_residual_norms, share_tied_int4_table
from .genai import GENAI_CONFIG_NAME, write_genai_config
from .lowering import (
    KeyMaskCache,
    fused_attention,
    in_place_supported,
    lowered,
    paired_ffn_weights,
    translation_table,
)
from .parity import FP32_TOLERANCE, QUANT_BOUNDS, ExportError, check_parity, judge
from .runner import ONNX_NAME, make_session

DEFAULT_OPSET = 23
# int4 stores the embedding as an INT4 tensor (GatherBlockQuantized), a type of opset 21.
INT4_MIN_OPSET = 21
# Tested with parity: the dynamo exporter emits 18 natively, newer ones come through the
# ONNX version converter; 17 and below fail there (no down-adapter for Split-18).
SUPPORTED_OPSETS = range(18, 25)
QUANTIZE_CHOICES = ("int8", "int4")
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; keep a margin


# ----------------------------------------------------------------------------- wrapper
class _ExportWrapper(nn.Module):
    """Flat tensors in and out, HF-style names, so the ONNX signature is plain."""

    def __init__(self, model: VesperLM, use_cache: bool, in_place: bool = False) -> None:
        super().__init__()
        self.model, self.use_cache, self.in_place = model, use_cache, in_place
        self.num_layers = model.config.num_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pkv = (tuple((past[2 * i], past[2 * i + 1]) for i in range(self.num_layers))
               if self.use_cache else None)
        if self.in_place:
            pkv = KeyMaskCache(pkv, attention_mask)
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=pkv, use_cache=self.use_cache)
        flat = [t for kv in out.past_key_values for t in kv] if self.use_cache else []
        heads = [out.logits, out.confidence, out.stop, out.answer]
        if out.logsumexp is not None:  # a model with logit features has both for free
            heads += [out.logsumexp, out.top_logprob]
        return (*heads, *flat)


def io_names(num_layers: int, use_cache: bool, logsumexp: bool = True,
             ) -> tuple[list[str], list[str]]:
    """(input names, output names) of the exported graph; ``logsumexp``: whether the model
    has that output and ``top_logprob`` (a model with logit features)."""
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ([*HEAD_OUTPUTS, TOP_LOGPROB] if logsumexp
               else [n for n in HEAD_OUTPUTS if n != "logsumexp"])
    if use_cache:
        for i in range(num_layers):
            inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
            outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


@contextlib.contextmanager
def _quiet_exporter():
    # torch.onnx prints progress lines and warns about torchvision ops we never use.
    # The root logger too: onnxruntime.quantization warns through it ("consider running
    # pre-processing", meant for CNN calibration, not for weight-only quantization).
    names = ["", "torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript",
             "onnxruntime.quantization.matmul_nbits_quantizer"]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)


def _torch_to_onnx(model: VesperLM, opset: int, use_cache: bool, in_place: bool = False) -> Any:
    """The dynamo-exported ModelProto of ``model`` (dynamic batch / sequence / past)."""
    import onnx
    from torch.export import Dim

    cfg = model.config
    wrapper = _ExportWrapper(model, use_cache, in_place).eval()
    # Example sizes above 1 so torch.export does not specialise them; past 3, seq 5.
    b, s, p = 2, min(5, cfg.max_seq_len - 3), 3
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    mask = torch.ones(b, p + s if use_cache else s, dtype=torch.long)
    pos = torch.arange(p, p + s).expand(b, s).contiguous() if use_cache else \
        torch.arange(s).expand(b, s).contiguous()
    past = ([torch.zeros(b, cfg.num_heads, p, cfg.head_dim) for _ in range(2 * cfg.num_layers)]
            if use_cache else [])
    dyn = Dim.DYNAMIC
    shapes: dict[str, Any] = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn},
                              "position_ids": {0: dyn, 1: dyn}}
    if use_cache:
        shapes["past"] = tuple({0: dyn, 2: dyn} for _ in past)
    in_names, out_names = io_names(cfg.num_layers, use_cache, cfg.metahead_logit_features)
    with _quiet_exporter(), torch.no_grad(), lowered(model, opset):
        try:
            program = torch.onnx.export(
                wrapper, (ids, mask, pos, *past), input_names=in_names,
                output_names=out_names, dynamic_shapes=shapes, opset_version=opset,
                dynamo=True, external_data=False, verbose=False, optimize=True,
                custom_translation_table=translation_table(opset, cfg.vocab_size))
        except Exception as exc:  # torch.export raises many types; all mean the same here
            root = exc
            while root.__cause__ is not None:  # the exporter wraps the useful message
                root = root.__cause__
            moe = (" (MoE models are not exportable yet: their expert dispatch depends on "
                   "the data; serve this model with PyTorch, vesper_sdk.load)"
                   if cfg.num_experts else "")
            first = str(root).strip().splitlines()[0] if str(root).strip() else ""
            raise ExportError(f"torch.onnx.export failed{moe}: {type(root).__name__}: "
                              f"{first[:500]}") from exc
    proto = program.model_proto
    if proto.opset_import and not any(o.domain == "" and o.version == opset
                                      for o in proto.opset_import):
        proto = onnx.version_converter.convert_version(proto, opset)
    return proto


# ----------------------------------------------------------------------------- graph tidy
def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()
                        + str(array.shape).encode()).hexdigest()


def _weight_table(model: VesperLM) -> dict[str, tuple[str, str]]:
    """digest of W.T (how a linear weight appears as a MatMul initializer) -> (name, role).

    Roles: ``quant`` (block linears, FlyLoRA base weights, alone or as the lowered
    export's gate/up pairs), ``keep`` (FlyLoRA A/B, the MetaHead, the MoE router).
    Matching by value is robust to the exporter's renaming.
    """
    table: dict[str, tuple[str, str]] = {}
    for name, mod in model.named_modules():
        pair = paired_ffn_weights(mod)
        if pair is not None:  # the lowered export's gate+up pair (export.lowering)
            table[_digest(pair["weight"].T.numpy())] = (f"{name}.gate_up.weight", "quant")
            table[_digest(pair["lora_A"].T.numpy())] = (f"{name}.gate_up.lora_A", "keep")
            table[_digest(pair["lora_B"].numpy())] = (f"{name}.gate_up.lora_B", "keep")
        if isinstance(mod, FlyLoRALinear):
            table[_digest(mod.weight.detach().T.numpy())] = (f"{name}.weight", "quant")
            table[_digest(mod.lora_A.detach().T.numpy())] = (f"{name}.lora_A", "keep")
            table[_digest(mod.lora_B.detach().T.numpy())] = (f"{name}.lora_B", "keep")
        elif type(mod) is nn.Linear and not isinstance(
                model.get_submodule(name.rpartition(".")[0]) if "." in name else model,
                FlyLoRALinear):
            in_blocks = name.startswith("blocks.") and not name.endswith(".router")
            role = "quant" if in_blocks or name == "lm_head" else "keep"
            table[_digest(mod.weight.detach().T.numpy())] = (f"{name}.weight", role)
    return table


def tidy_graph(proto: Any, model: VesperLM, use_cache: bool, separate_lm_head: bool,
               ) -> dict[str, list[str]]:
    """Name dims and weights, optionally give the tied LM head its own initializer.

    Returns {"matmul": MatMul node names to quantize, "gather": the embedding Gather}.
    """
    from onnx import numpy_helper

    graph = proto.graph
    cfg = model.config
    # The exporter stores each node's Python stack trace and FX text: a third of the file
    # on small models, and paths of the machine that exported it.
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.metadata_props[:]
    # Readable symbolic dims (the exporter's are s10, s53...).
    dims = {"input_ids": ["batch_size", "sequence_length"],
            "position_ids": ["batch_size", "sequence_length"],
            "attention_mask": ["batch_size", "total_sequence_length"],
            "logits": ["batch_size", "sequence_length", None],
            "confidence": ["batch_size", "sequence_length"],
            "stop": ["batch_size", "sequence_length"],
            "answer": ["batch_size", "sequence_length"]}
    for vi in list(graph.input) + list(graph.output):
        names = dims.get(vi.name)
        if vi.name.startswith("past_key_values."):
            names = ["batch_size", None, "past_sequence_length", None]
        elif vi.name.startswith("present."):
            names = ["batch_size", None, "total_sequence_length", None]
        if names:
            for d, n in zip(vi.type.tensor_type.shape.dim, names, strict=False):
                if n is not None:
                    d.dim_param = n

    inits = {i.name: i for i in graph.initializer}
    table = _weight_table(model)
    renames: dict[str, str] = {}
    roles: dict[str, str] = {}
    taken = set(inits)
    for node in graph.node:
        # A weight is a MatMul's second input, or the table of a Gather (the lowered FFN
        # pair picks its k rows of B that way).
        slot = {"MatMul": 1, "Gather": 0}.get(node.op_type)
        if slot is not None and node.input[slot] in inits:
            key = _digest(numpy_helper.to_array(inits[node.input[slot]]))
            if key in table:
                name, role = table[key]
                if node.op_type == "MatMul":
                    roles[node.name] = role
                # Equal tensors (e.g. FlyLoRA B still all zero) share a digest: the first
                # gets the readable name, the rest keep the exporter's (names are unique).
                if node.input[slot] not in renames and f"{name}.T" not in taken:
                    renames[node.input[slot]] = f"{name}.T"
                    taken.add(f"{name}.T")
    embed = next((n for n in graph.node if n.op_type == "Gather"
                  and n.input[0] in inits and inits[n.input[0]].dims == [cfg.vocab_size,
                                                                          cfg.hidden_size]),
                 None)
    if embed is not None and "embed.weight" not in taken:
        renames.setdefault(embed.input[0], "embed.weight")
    # The tied LM head: MatMul(h, Transpose(embed)). Quantizers only touch constant
    # weights, so quantized graphs get the transposed table as an initializer of its own.
    if embed is not None and cfg.tie_embeddings:
        for tnode in [n for n in graph.node if n.op_type == "Transpose"
                      and n.input[0] == embed.input[0]]:
            users = [n for n in graph.node if tnode.output[0] in n.input]
            if len(users) == 1 and users[0].op_type == "MatMul":
                roles[users[0].name] = "quant"
                if separate_lm_head:
                    table_t = numpy_helper.to_array(inits[embed.input[0]]).T.copy()
                    graph.initializer.append(numpy_helper.from_array(table_t, "lm_head.weight.T"))
                    users[0].input[1] = "lm_head.weight.T"
                    graph.node.remove(tnode)
    for init in graph.initializer:
        if init.name in renames:
            init.name = renames[init.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    return {"matmul": [n for n, r in roles.items() if r == "quant"],
            "gather": [embed.name] if embed is not None else []}


# ----------------------------------------------------------------------------- quantizers
def _quantize_int8(src: Path, dst: Path, nodes: dict[str, list[str]], large: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # QInt8 weights with one scale per output column (per_channel) rather than one per
    # matrix, where the largest entry sets everyone's step. On a trained 7M 'tiny' model:
    # relative logits error 0.0047 vs 0.0050 per-tensor, at the same size; the embedding
    # (Gather) is int8 too: -1.5 MB for +0.0001 error.
    with _quiet_exporter():
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Gather"],
                         nodes_to_quantize=nodes["matmul"] + nodes["gather"],
                         per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                         use_external_data_format=large,
                         extra_options={"MatMulConstBOnly": True})


def _quantize_int4(src: Path, dst: Path, nodes: dict[str, list[str]], block_size: int,
                   large: bool, tied: bool) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    wanted = set(nodes["matmul"] + nodes["gather"])
    # nodes_to_include only *adds* to the op types, so the fp32 MatMuls (FlyLoRA A/B,
    # MetaHead) are kept out by excluding them.
    exclude = [n.name for n in model.graph.node
               if n.op_type in ("MatMul", "Gather") and n.name not in wanted]
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=block_size, is_symmetric=True,
        # accuracy_level 4 = int8 activations in the MatMulNBits kernel: the fast CPU path.
        accuracy_level=4, nodes_to_exclude=exclude,
        op_types_to_quantize=("MatMul", "Gather"),
        quant_axes=(("MatMul", 0), ("Gather", 1)))
    with _quiet_exporter():
        quantizer.process()
    if tied:  # one 4-bit table for the lookup and the LM head (export.fusions)
        share_tied_int4_table(quantizer.model.model)
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=large)


# ----------------------------------------------------------------------------- export
def _validate_request(model_dir: Path, out_dir: Path, opset: int, quantize: str | None,
                      block_size: int) -> None:
    # Everything that can be checked before touching the disk, so bad input writes nothing.
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ExportError(
            f"unknown ONNX quantization {quantize!r}: choose int8 or int4 (or none); "
            "bitsandbytes nf4/fp4 is `vesper quantize`")
    if not isinstance(opset, int) or opset not in SUPPORTED_OPSETS:
        raise ExportError(
            f"opset {opset} is not supported: choose {SUPPORTED_OPSETS.start}..."
            f"{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET}); older opsets lack ops "
            "the graph needs")
    if quantize == "int4" and opset < INT4_MIN_OPSET:
        raise ExportError(
            f"--quantize int4 needs opset >= {INT4_MIN_OPSET} (its 4-bit embedding is an INT4 "
            f"tensor): pass --opset {INT4_MIN_OPSET} or leave --opset out")
    if quantize == "int4" and (block_size < 16 or block_size & (block_size - 1)):
        raise ExportError(f"block_size {block_size} must be a power of two >= 16 "
                          "(e.g. 32, 64, 128)")
    folder = ModelFolder(model_dir)  # not a folder, or not a model: named, with the fix
    if folder.kind == "onnx":
        raise ModelFolderError(
            f"{model_dir} holds {ONNX_NAME}: it is an ONNX export already; export the model "
            "folder it came from (the one with model.safetensors)")
    if folder.kind == "bnb":
        raise ExportError(
            f"{model_dir} is a bitsandbytes {folder.quantization.get('method')} model: export "
            "the full-precision folder it came from, with --quantize int8|int4 for ONNX "
            "quantization")
    if out_dir.resolve() == model_dir.resolve():
        raise ExportError(f"out_dir {out_dir} is the model folder: export to a new folder")
    if out_dir.exists() and (not out_dir.is_dir() or (
            any(out_dir.iterdir()) and not (out_dir / ONNX_NAME).is_file())):
        raise ExportError(
            f"out_dir {out_dir} exists and is not an ONNX export: choose a new folder or "
            "remove it first (it would be replaced as a whole)")


def default_opset(quantize: str | None, runtime_version: str) -> int:
    """DEFAULT_OPSET where the ONNX Runtime doing the self-check runs it (>= 1.22), else
    the newest opset older runtimes take (21 for int4's INT4 embedding, else 18)."""
    major, minor = (int(x) for x in runtime_version.split(".")[:2])
    if (major, minor) >= (1, 22):
        return DEFAULT_OPSET
    return INT4_MIN_OPSET if quantize == "int4" else 18


def _special_ids(model_dir: Path, config: VesperConfig) -> tuple[int, int, int]:
    """(bos, eos, pad) ids: the folder's tokenizer's, else the config's."""
    if (model_dir / TOKENIZER_NAME).is_file():
        tok = ModelFolder(model_dir).tokenizer()
        return tok.bos_id, tok.eos_id, tok.pad_id
    return config.bos_token_id, config.eos_token_id, config.pad_token_id


def export_onnx(model_dir: str | Path, out_dir: str | Path, opset: int | None = None,
                quantize: str | None = None, block_size: int = 32, use_cache: bool = True,
                verbose: bool = True, in_place_kv: bool = False) -> Path:
    """Export ``model_dir`` to ``out_dir`` (model.onnx + config.json + tokenizer.json).

    ``quantize``: None (fp32), ``"int8"`` (dynamic int8 MatMuls) or ``"int4"`` (4-bit
    MatMulNBits, ``block_size`` weights per scale). ``opset`` defaults to 23 (with an
    ONNX Runtime older than 1.22: 21 for int4, else 18).
    ``use_cache=False`` exports a graph
    without past/present (it re-reads the whole sequence each step). ``in_place_kv``: attention
    as ONNX Runtime's GroupQueryAttention, which writes each step's keys into the runner's
    cache buffers in place (rows ragged on the right; head_dim a multiple of 16; ONNX
    Runtime only, not Optimum). The export is
    verified with ONNX Runtime against PyTorch before it is renamed into place (figures
    printed when ``verbose``, stored under ``onnx.verification`` in config.json);
    a failed check raises ExportError and leaves no folder. Returns ``out_dir``.
    """
    import onnx
    import onnxruntime

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if opset is None:
        opset = default_opset(quantize, onnxruntime.__version__)
    _validate_request(model_dir, out_dir, opset, quantize, block_size)
    model = VesperLM.from_pretrained(model_dir).eval().float()
    why = "it needs the KV cache (drop --no-cache)" if not use_cache else (
        in_place_supported(model.config.head_dim))
    if in_place_kv and why:
        raise ExportError(f"--in-place-kv cannot be exported: {why}")
    # Rounding may pick different FlyLoRA ranks in ONNX and torch when two scores tie
    # exactly; it does not happen with real weights, and the check would catch it.
    info: dict[str, Any] = {
        "opset": opset, "quantize": quantize, "use_cache": use_cache,
        "block_size": block_size if quantize == "int4" else None,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "fused_attention": fused_attention(opset),  # export.lowering: RotaryEmbedding + Attention
        "kv_layout": "in_place" if in_place_kv else "concat",
        "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
    }
    in_names, out_names = io_names(model.config.num_layers, use_cache,
                                   model.config.metahead_logit_features)
    info.update(inputs=in_names, outputs=out_names)
    start = time.perf_counter()
    proto = _torch_to_onnx(model, opset, use_cache, in_place_kv)
    proto, info["fused_residual_norms"] = fuse_residual_norms(proto)  # export.fusions
    nodes = tidy_graph(proto, model, use_cache, separate_lm_head=quantize is not None)
    large = sum(p.numel() * 4 for p in model.parameters()) > EXTERNAL_DATA_BYTES
    files: dict[str, bytes | Path] = {}
    if (model_dir / TOKENIZER_NAME).is_file():
        files[TOKENIZER_NAME] = model_dir / TOKENIZER_NAME
    result: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        target = tmp / ONNX_NAME
        plain = target if quantize is None else tmp / "fp32.onnx"
        onnx.save_model(proto, str(plain), save_as_external_data=large,
                        location=f"{plain.name}.data" if large else None)
        # A quantized graph is ~4-8x smaller: past 2 GB of fp32 it may still need external
        # data, so the same flag is passed on (ONNX Runtime writes <name>.data beside it).
        if quantize == "int8":
            _quantize_int8(plain, target, nodes, large)
        elif quantize == "int4":
            _quantize_int4(plain, target, nodes, block_size, large,
                           model.config.tie_embeddings)
        if plain != target:
            plain.unlink()
            Path(f"{plain}.data").unlink(missing_ok=True)
        session = make_session(target, providers=["CPUExecutionProvider"])
        stats = check_parity(session, model, use_cache=use_cache, in_place=in_place_kv)
        problem = judge(stats, quantize)
        if problem:
            raise ExportError(
                f"ONNX Runtime check failed for the {quantize or 'fp32'} export: {problem}; "
                f"nothing was written to {out_dir}. Try the fp32 export, a smaller "
                "--block-size for int4, or report the figures")
        info["verification"] = {k: round(v, 8) for k, v in stats.items()}
        info["bounds"] = ({"max_abs": FP32_TOLERANCE} if quantize is None
                          else QUANT_BOUNDS[quantize])
        config = json.loads(model.config.to_json())
        config["onnx"] = info
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        write_folder_files(tmp, model.config, "onnx", {"ONNX opset": opset,
                                                       "Weights": quantize or "fp32"})
        if in_place_kv:  # onnxruntime-genai can run this layout's loop (export.genai)
            write_genai_config(tmp, model.config, *_special_ids(model_dir, model.config))
        result.update(stats)

    atomic_write_folder(out_dir, files, writer=write, keep_existing=False)
    update_model_card(model_dir, "ONNX export", onnx_section(out_dir, info, result))
    if verbose:
        size = sum(p.stat().st_size for p in out_dir.iterdir()
                   if p.name not in (CONFIG_NAME, TOKENIZER_NAME)) / 1e6
        fp = (model_dir / WEIGHTS_NAME).stat().st_size / 1e6
        what = "fp32" if quantize is None else quantize
        if quantize is None:
            verdict = f"max |logits diff| {result['max_abs']:.2e} <= {FP32_TOLERANCE:g}"
        else:
            b = QUANT_BOUNDS[quantize]
            verdict = (f"relative logits error {result['rel_err']:.4f} <= {b['rel_err']}, "
                       f"top-1 agreement {result['top1_agree']:.1%} (worst top-1 gap "
                       f"{result['top1_gap']:.2f} std <= {b['top1_gap']})")
        print(f"exported {model_dir} -> {out_dir / ONNX_NAME} ({what}, opset {opset}, "
              f"{size:.2f} MB = {size / fp:.2f}x the safetensors) in "
              f"{time.perf_counter() - start:.1f}s; ONNX Runtime vs PyTorch over prefill + "
              f"6 decode steps, batch 2, {'right' if in_place_kv else 'left'} padding: {verdict}")
        if in_place_kv:
            print(f"onnxruntime-genai runs it too: og.Model({str(out_dir)!r}) reads its "
                  f"{GENAI_CONFIG_NAME} (prompts start with BOS; docs/quantize-export.md)")
    return out_dir


__all__ = ["DEFAULT_OPSET", "ExportError", "QUANT_BOUNDS", "SUPPORTED_OPSETS", "check_parity",
           "export_onnx", "io_names"]
