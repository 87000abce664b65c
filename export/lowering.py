"""How VesperLM's attention lowers to ONNX's fused operators (opset 23 and later, where the
installed onnxscript writes them and ONNX Runtime runs them).

Traced as it is, one attention layer becomes ~24 small ONNX nodes (reshape, transpose,
the rotation's halves, the cache concatenations, SDPA); ONNX Runtime pays a fixed cost
per node (~0.35 us on this repo's CPU), which at decode time is much of the work. Opset
23 has the two operators this layer is made of: ``RotaryEmbedding`` (non-interleaved
halves, as ``RotaryEmbedding.rotate``; it looks the positions up in the whole cos/sin
table itself) and ``Attention`` with the past cache as inputs and the present cache as
outputs. So for the export each block's attention runs through two torch custom ops
whose ONNX translation is exactly those operators; their torch implementations are the
model's own math, and every export is still checked against the plain PyTorch model.

At every opset, the feed-forward's gate and up FlyLoRA layers run as one stacked pair
(``LoweredFeedForward``) that gathers its k chosen rows of B: half the small nodes of
the two.

Also at every opset: the MetaHead's logit features (top-1 log-probability, margin,
entropy) as one custom op whose ONNX translation makes one pass of Exp over the vocabulary
where the traced graph made two (``LoweredMetaHead``); ``softplus`` (ERA's second half)
and ``logsumexp`` as plain vectorised operators, where ONNX Runtime's own Softplus
and ReduceLogSumExp kernels take several times as long (~7 vs ~2.4 us on 768 values,
~10 vs ~2 us over a 2,880-token vocabulary).

Measured on the bundled demo model, int4, this repo's 2-core CPU, node counts of the
graph: 302 traced; 248 with the fused attention (greedy decode 3,348 -> 4,312 tokens/s);
214 with the feed-forward pair (+4 to +8 %); 202 gathering B's rows; 192 with the
MetaHead's features; 185 with the positions looked up inside RotaryEmbedding (179 with
the model's mask built by broadcasting). From 214 to 179, a bare decode loop went from
4,986 to 5,400 tokens/s (plain ONNX Runtime loop, best of 6 interleaved runs).

The model is never changed: ``lowered(model, opset)`` swaps modules for the export's
duration and puts them back.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..model import (
    Attention,
    GLUFeedForward,
    MetaHead,
    RotaryEmbedding,
    VesperLM,
    logit_features,
    paired_ffn_weights,
)

LOWERED_MIN_OPSET = 23


@functools.cache
def _runtime_runs_fused_ops() -> bool:
    """Whether onnxscript writes, and the installed ONNX Runtime runs, opset 23's
    RotaryEmbedding and Attention (with a past cache): one tiny graph, once."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper
        from onnxscript import opset23

        if not (hasattr(opset23, "RotaryEmbedding") and hasattr(opset23, "Attention")):
            return False
        f = TensorProto.FLOAT
        nodes = [helper.make_node("RotaryEmbedding", ["x", "c", "s", "i"], ["r"],
                                  num_heads=1),
                 helper.make_node("Attention", ["r", "r", "x", "", "p", "p"],
                                  ["y", "pk", "pv"], q_num_heads=1, kv_num_heads=1)]
        graph = helper.make_graph(
            nodes, "probe", [*(helper.make_tensor_value_info(n, f, None) for n in "xcsp"),
                             helper.make_tensor_value_info("i", TensorProto.INT64, None)],
            [helper.make_tensor_value_info(n, f, None) for n in ("y", "pk", "pv")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        one = np.ones((1, 1, 2), np.float32)
        session.run(None, {"x": one, "c": one[0, :, :1], "s": one[0, :, :1] * 0,
                           "i": np.zeros((1, 1), np.int64),
                           "p": np.ones((1, 1, 1, 2), np.float32)})
        return True
    except Exception:  # an older onnxscript or ONNX Runtime: export without them
        return False


def fused_attention(opset: int) -> bool:
    """Whether an export at ``opset`` maps attention onto the fused operators here."""
    return opset >= LOWERED_MIN_OPSET and _runtime_runs_fused_ops()


# ----------------------------------------------------------------------------- torch ops
@torch.library.custom_op("vesper::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
           num_heads: int) -> torch.Tensor:
    """RoPE on x [B,S,H*D] at position_ids [B,S], from the whole cos/sin table [T,D/2]."""
    b, s, hd = x.shape
    x4 = x.view(b, s, num_heads, hd // num_heads)
    wide = RotaryEmbedding.widen(cos[position_ids], sin[position_ids])
    table = (wide[0].unsqueeze(2), wide[1].unsqueeze(2))
    return RotaryEmbedding.rotate(x4, table).reshape(b, s, hd)


@rotary.register_fake
def _(x, cos, sin, position_ids, num_heads):
    return torch.empty_like(x)


@torch.library.custom_op("vesper::cached_attention", mutates_args=())
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     past_k: torch.Tensor, past_v: torch.Tensor, num_heads: int,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SDPA of q/k/v [B,S,H*D] over the past cache [B,H,P,D] + k/v; boolean mask [B,1,S,P+S].

    Returns (y [B,S,H*D], present key, present value [B,H,P+S,D]).
    """
    b, s, hd = q.shape

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, s, num_heads, hd // num_heads).transpose(1, 2)

    key = torch.cat((past_k, heads(k)), dim=2)
    value = torch.cat((past_v, heads(v)), dim=2)
    y = F.scaled_dot_product_attention(heads(q), key, value, attn_mask=mask)
    return y.transpose(1, 2).reshape(b, s, hd), key, value


@cached_attention.register_fake
def _(q, k, v, mask, past_k, past_v, num_heads):
    b, s, hd = q.shape
    total = past_k.shape[2] + s
    shape = (b, num_heads, total, hd // num_heads)
    return torch.empty_like(q), q.new_empty(shape), q.new_empty(shape)


@torch.library.custom_op("vesper::logit_features", mutates_args=())
def logit_features_op(logits: torch.Tensor) -> torch.Tensor:
    """The MetaHead's features of logits [..., V] -> [..., 3] (``model.logit_features``)."""
    return logit_features(logits)


@logit_features_op.register_fake
def _(logits):
    return logits.new_empty((*logits.shape[:-1], 3))


# ----------------------------------------------------------------------------- ONNX side
def translation_table(opset: int) -> dict:
    """torch op -> onnxscript function, for ``torch.onnx.export(custom_translation_table=)``.

    softplus, logsumexp and the MetaHead's logit features at every supported opset (18+);
    the fused rotary and attention operators from opset 23, where they exist.
    """
    from onnxscript import FLOAT, INT64
    from onnxscript import opset18 as op18

    def softplus_onnx(x: FLOAT, beta: float = 1.0, threshold: float = 20.0) -> FLOAT:
        # relu(z) - log(sigmoid(|z|)) is softplus(z) with no overflow and no branch (its
        # sigmoid stays in [0.5, 1]); past the threshold it differs from torch's z by
        # under 1e-8. Vectorised Relu/Sigmoid/Log: ~2.4 us on 768 values vs 7 for Softplus.
        z = op18.Mul(x, op18.CastLike(beta, x))
        soft = op18.Sub(op18.Relu(z), op18.Log(op18.Sigmoid(op18.Abs(z))))
        return op18.Div(soft, op18.CastLike(beta, x))

    def logsumexp_onnx(x: FLOAT, dim: INT64, keepdim: bool = False) -> FLOAT:
        # The max-shifted sum of Exp: ~2 us over a 2,880-token vocabulary where
        # ReduceLogSumExp (not vectorised in ONNX Runtime's CPU kernel) takes ~10.
        top = op18.ReduceMax(x, dim, keepdims=1)
        total = op18.ReduceSum(op18.Exp(op18.Sub(x, top)), dim, keepdims=1)
        lse = op18.Add(op18.Log(total), top)
        return lse if keepdim else op18.Squeeze(lse, dim)

    def logit_features_onnx(z: FLOAT) -> FLOAT:
        # One pass of Exp over the vocabulary, shifted by the top-1 from the TopK that the
        # margin needs anyway: log(sum e) is lse - top1, and the entropy
        # lse - sum(p z) is log(sum e) - sum(e (z - top1)) / sum e. 13 nodes where the
        # traced softmax, logsumexp and stack took 23.
        last = op18.Constant(value_ints=[-1])
        top2, _ = op18.TopK(z, op18.Constant(value_ints=[2]), axis=-1)
        first, second = op18.Split(top2, axis=-1, num_outputs=2)
        shifted = op18.Sub(z, first)
        e = op18.Exp(shifted)
        total = op18.ReduceSum(e, last, keepdims=1)
        log_total = op18.Log(total)
        mean_shift = op18.Div(op18.ReduceSum(op18.Mul(e, shifted), last, keepdims=1), total)
        return op18.Concat(op18.Neg(log_total), op18.Sub(first, second),
                           op18.Sub(log_total, mean_shift), axis=-1)

    table = {torch.ops.aten.softplus.default: softplus_onnx,
             torch.ops.aten.logsumexp.default: logsumexp_onnx,
             torch.ops.vesper.logit_features.default: logit_features_onnx}
    if not fused_attention(opset):
        return table
    from onnxscript import opset23 as op

    def rotary_onnx(x: FLOAT, cos: FLOAT, sin: FLOAT, position_ids: INT64, num_heads: int,
                    ) -> FLOAT:
        # The operator looks the positions up in the table itself: no gathers before it.
        return op.RotaryEmbedding(x, cos, sin, position_ids, num_heads=num_heads)

    def cached_attention_onnx(q: FLOAT, k: FLOAT, v: FLOAT, mask, past_k: FLOAT,
                              past_v: FLOAT, num_heads: int):
        y, present_k, present_v, _ = op.Attention(
            q, k, v, mask, past_k, past_v, q_num_heads=num_heads, kv_num_heads=num_heads)
        return y, present_k, present_v

    table[torch.ops.vesper.rotary.default] = rotary_onnx
    table[torch.ops.vesper.cached_attention.default] = cached_attention_onnx
    return table


# ----------------------------------------------------------------------------- modules
class LoweredRope(nn.Module):
    """``RotaryEmbedding`` whose ``table`` hands the whole cos/sin table and the positions
    to :class:`LoweredAttention`, for ONNX's RotaryEmbedding to look them up."""

    def __init__(self, inner: RotaryEmbedding) -> None:
        super().__init__()
        # The same tensors under the same names (model.rope.cos / .sin in the graph).
        self.register_buffer("cos", inner.cos, persistent=False)
        self.register_buffer("sin", inner.sin, persistent=False)

    def table(self, position_ids: torch.Tensor, dtype: torch.dtype,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.cos.to(dtype), self.sin.to(dtype), position_ids


class LoweredAttention(nn.Module):
    """``Attention`` as the two custom ops above; same parameters, same results. Reads
    ``rope`` as :class:`LoweredRope` gives it."""

    def __init__(self, inner: Attention) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None, past: tuple[torch.Tensor, torch.Tensor] | None,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        a = self.inner
        b, s, d = x.shape
        q, k, v = a.qkv(x).split(d, dim=-1)
        cos, sin, position_ids = rope
        q = torch.ops.vesper.rotary(q, cos, sin, position_ids, a.num_heads)
        k = torch.ops.vesper.rotary(k, cos, sin, position_ids, a.num_heads)
        if past is None:
            past = (x.new_zeros(b, a.num_heads, 0, a.head_dim),) * 2
        if mask is None:
            pos = torch.arange(s, device=x.device)
            mask = (pos[None, :] <= pos[:, None])[None, None].expand(b, 1, s, s)
        y, key, value = torch.ops.vesper.cached_attention(q, k, v, mask, past[0], past[1],
                                                          a.num_heads)
        return a.o_proj(y), (key, value)


class LoweredFeedForward(nn.Module):
    """``GLUFeedForward`` whose gate and up FlyLoRA layers run as one stacked pair: one
    base product, one A product, one top-k over [2, r] and one batched product with the
    k chosen rows of B, where there were two of each.

    The chosen rows are gathered rather than the others masked to zero: one Gather
    instead of the zeros/ScatterElements/Mul chain, and a product over k rows, not r.
    The math is the model's own :meth:`GLUFeedForward.paired` (CPU decoding runs it
    too); the export's check compares the graph with PyTorch.
    Measured on the demo model's int4 graph (this repo's 2-core CPU): the pair took it
    from 248 to 214 nodes and decode +6 %; gathering, to 202 nodes.
    """

    def __init__(self, inner: GLUFeedForward, pair: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.inner = inner
        for name, t in pair.items():  # paired_ffn_weights(inner): fresh cat / stack tensors
            self.register_buffer(name, t)
        # Row offsets of the gate's and the up layer's B in the stacked [2r, F] table.
        self.register_buffer("row_offset", torch.tensor([[0], [inner.gate.rank]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.paired(F.linear(x, self.weight), F.linear(x, self.lora_A),
                                 self.balance_bias, self.lora_B, self.row_offset)


class LoweredMetaHead(nn.Module):
    """``MetaHead`` whose logit features are one custom op (ONNX: :func:`translation_table`'s
    ``logit_features_onnx``); same parameters, same results."""

    confidence = MetaHead.confidence  # over this module's calibration: inner's tensor

    def __init__(self, inner: MetaHead) -> None:
        super().__init__()
        # inner's own layers and buffer under their own names (model.metahead.fc.* ...).
        self.fc, self.out = inner.fc, inner.out
        self.register_buffer("calibration", inner.calibration)

    def forward(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        feats = torch.ops.vesper.logit_features(logits.float()).to(h.dtype)
        return self.out(F.gelu(self.fc(torch.cat((h, feats), dim=-1))))


@contextlib.contextmanager
def lowered(model: VesperLM, opset: int) -> Iterator[VesperLM]:
    """``model`` with its FlyLoRA gate/up pairs and its MetaHead's logit features lowered,
    and its attention where :func:`fused_attention` holds; restored afterwards."""
    fused = fused_attention(opset)
    originals = [(block.attn, block.ffn) for block in model.blocks]
    metahead, rope = model.metahead, model.rope
    try:
        if metahead.use_logits:
            model.metahead = LoweredMetaHead(metahead)
        if fused:
            model.rope = LoweredRope(rope)
        for block in model.blocks:
            if fused:
                block.attn = LoweredAttention(block.attn)
            pair = paired_ffn_weights(block.ffn)
            if pair is not None:
                block.ffn = LoweredFeedForward(block.ffn, pair)
        yield model
    finally:
        model.metahead, model.rope = metahead, rope
        for block, (attn, ffn) in zip(model.blocks, originals, strict=True):
            block.attn, block.ffn = attn, ffn
