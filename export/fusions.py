"""Rewrites of the exported graph for ONNX Runtime: the fused residual normalisation
(:func:`fuse_residual_norms`) and, in int4 graphs, one 4-bit table for a tied embedding
and LM head (:func:`share_tied_int4_table`).

Every block adds its attention and feed-forward outputs to the residual stream and
normalises the sum for what comes next: an ``Add`` and an ``RMSNormalization`` node,
twice per layer. ONNX Runtime has one operator for the pair,
``SkipSimplifiedLayerNormalization`` (com.microsoft; it also returns the sum for the
next residual), and fuses the pair into it itself, but only from its own
``SimplifiedLayerNormalization``, not from opset 23's ``RMSNormalization``, which the
exporter writes. So the export renames the one to the other (the same operation:
x / sqrt(mean(x^2) + eps) * weight over the last axis) and applies onnxscript's
rewrite rule for the pair. At decode time each node costs a fixed time whatever its
size, and these are a tenth of the graph's nodes.

The rewritten graph needs ONNX Runtime (as the in-place KV layout and the quantized
operators do); ``export_onnx`` checks it against PyTorch like any other.
"""

from __future__ import annotations

from typing import Any


def fuse_residual_norms(proto: Any) -> tuple[Any, int]:
    """``proto`` (an ONNX ModelProto) with each residual Add + RMSNormalization as one
    SkipSimplifiedLayerNormalization; returns (the model, how many pairs were fused).

    A graph without opset 23's RMSNormalization (opsets below 23), or an onnxscript
    without the rule, comes back as it was.
    """
    try:
        import onnx_ir as ir
        from onnxscript.rewriter import pattern
        from onnxscript.rewriter.ort_fusions.skip_normalization import (
            fuse_skip_rms_normalization,
        )
    except ImportError:  # an onnxscript without ONNX Runtime's fusions: export unfused
        return proto, 0

    class RmsAsSimplified(pattern.RewriteRuleClassBase):
        """RMSNormalization -> ONNX Runtime's SimplifiedLayerNormalization (same math)."""

        def pattern(self, op, x, weight):
            return op.RMSNormalization(x, weight, _allow_other_attributes=True,
                                       _outputs=["normed"])

        def rewrite(self, op, x, weight, normed, **_):
            attrs = normed.producer().attributes
            return op.SimplifiedLayerNormalization(
                x, weight, axis=attrs.get_int("axis", -1),
                epsilon=attrs.get_float("epsilon", 1e-5),
                stash_type=attrs.get_int("stash_type", 1))

    model = ir.from_proto(proto)
    if not pattern.RewriteRuleSet([RmsAsSimplified.rule()]).apply_to_model(model):
        return proto, 0
    fused = fuse_skip_rms_normalization(model)
    return ir.to_proto(model), fused


def share_tied_int4_table(proto: Any) -> bool:
    """In an int4 graph of a model with tied embeddings, let the embedding lookup read the
    LM head's 4-bit weights instead of a second copy of the same table; True if it did.

    MatMulNBits stores the head as [vocab, hidden / block, block / 2] bytes, two 4-bit
    values a byte along the hidden axis, with one scale per block: the layout
    GatherBlockQuantized reads as a [vocab, hidden / 2] byte table (``bits=4``), so one
    Reshape of the head's weights feeds the lookup (onnxruntime-genai's model builder
    does the same). The file loses the embedding's own table and scales.
    """
    from onnx import TensorProto, helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    head = next((n for n in graph.node if n.op_type == "MatMulNBits"
                 and n.input[1] == "lm_head.weight.T_Q4"), None)
    lookup = next((n for n in graph.node if n.op_type == "GatherBlockQuantized"
                   and n.input[0] == "embed.weight_Q4"), None)
    if head is None or lookup is None or "lm_head.weight.T_Q4" not in inits:
        return False
    attrs = {a.name: a.i for a in head.attribute}
    table, scales = inits["lm_head.weight.T_Q4"], inits.get(head.input[2])
    if (attrs.get("bits", 4) != 4 or len(table.dims) != 3 or len(head.input) > 3
            or scales is None or list(scales.dims) != list(table.dims[:2])):
        return False  # zero points, or another layout: keep the lookup's own table
    vocab, blocks, half = table.dims
    shape = helper.make_tensor("embed.shared_shape", TensorProto.INT64, [2],
                               [vocab, blocks * half])
    graph.initializer.append(shape)
    reshape = helper.make_node("Reshape", ["lm_head.weight.T_Q4", "embed.shared_shape"],
                               ["embed.shared_Q4"], name="embed_shared_table")
    old = {a.name: a.i for a in lookup.attribute}
    shared = helper.make_node(
        "GatherBlockQuantized", ["embed.shared_Q4", lookup.input[1], head.input[2]],
        list(lookup.output), name=lookup.name, domain="com.microsoft", bits=4,
        block_size=attrs["block_size"], gather_axis=old.get("gather_axis", 0),
        quantize_axis=old.get("quantize_axis", 1))
    at = list(graph.node).index(lookup)
    graph.node.remove(lookup)
    graph.node.insert(at, shared)
    graph.node.insert(at, reshape)
    for name in ("embed.weight_Q4", "embed.weight_scales"):
        if name in inits and not any(name in n.input for n in graph.node):
            graph.initializer.remove(inits[name])
    return True
