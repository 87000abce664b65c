"""How VesperLM lowers to ONNX's fused operators for the export.

Traced as it is, one attention layer becomes a few dozen small ONNX nodes (reshape,
transpose, the rotation's halves, the cache concatenations, SDPA), and ONNX Runtime pays
a fixed cost per node. Opset 23 has the two operators an attention layer is made of:
``RotaryEmbedding`` (non-interleaved halves, as ``RotaryEmbedding.rotate``; it looks the
positions up in the whole cos/sin table itself) and ``Attention`` with the past cache as
inputs and the present cache as outputs. So, where the installed onnxscript writes them
and ONNX Runtime runs them, the export runs the model's ``onnx`` attention variant
(registered here): two torch custom ops whose ONNX translation is exactly those
operators and whose torch implementation is the model's own math.

At every opset: the feed-forward's gate and up FlyLoRA layers run as one stacked pair
(``LoweredFeedForward``) that gathers its k chosen rows of B; the MetaHead's logit
features and the logits' log-sum-exp are one operator (``vesper::logit_features``, the
model's own function) whose translation makes one pass of Exp over the vocabulary;
``softplus`` (ERA's second half) and ``logsumexp`` become plain vectorised operators,
which ONNX Runtime runs faster than its own Softplus and ReduceLogSumExp kernels. Every
export is still checked against the plain PyTorch model.

The model is never changed for good: ``lowered(model, opset)`` picks the variant and
swaps the feed-forwards for the export's duration, then puts them back.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model import (
    Attention,
    DynamicCache,
    GLUFeedForward,
    RopeTable,
    RotaryEmbedding,
    VesperLM,
    paired_ffn_weights,
    register_attention,
)
from ..model.cache import Cache, KVPair

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


@torch.library.custom_op("vesper::in_place_attention", mutates_args=())
def in_place_attention(qkv: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                       key_mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX Runtime's GroupQueryAttention (com.microsoft) in torch, for packed qkv [B,S,3HD].

    Rows are ragged on the right: row b holds ``key_mask[b].sum()`` tokens at positions
    0.., this call's S tokens the last of them (all S at 0.. on the first call, when S is
    the mask's width). The past buffers [B,H,P,D] hold the earlier ones at their
    positions; P may exceed what is used (the runner's buffer, written in place when
    the present output is bound to it). Returns (y [B,S,HD], present key, value
    [B,H,max(P, width),D]); RoPE at each token's position, from the cos/sin table.
    """
    b, s, _ = qkv.shape
    d = qkv.shape[-1] // (3 * num_heads)
    total, p = key_mask.shape[1], past_k.shape[2]
    lens = key_mask.sum(-1)
    start = torch.zeros_like(lens) if s == total else lens - s
    pos = start[:, None] + torch.arange(s, device=qkv.device)  # [B,S]
    q, k, v = qkv.view(b, s, 3, num_heads, d).unbind(2)
    wide = RotaryEmbedding.widen(cos[pos], sin[pos])
    table = (wide[0].unsqueeze(2), wide[1].unsqueeze(2))
    q, k = RotaryEmbedding.rotate(q, table), RotaryEmbedding.rotate(k, table)
    length = max(total, p)
    index = pos[:, None, :, None].expand(b, num_heads, s, d)
    present = []
    for past, new in ((past_k, k), (past_v, v)):
        buf = past.new_zeros(b, num_heads, length, d)
        buf[:, :, :p] = past
        present.append(buf.scatter(2, index, new.transpose(1, 2)))
    visible = torch.arange(length, device=qkv.device) <= pos[:, None, :, None]  # [B,1,S,L]
    y = F.scaled_dot_product_attention(q.transpose(1, 2), present[0], present[1],
                                       attn_mask=visible)
    return y.transpose(1, 2).reshape(b, s, num_heads * d), present[0], present[1]


@in_place_attention.register_fake
def _(qkv, past_k, past_v, key_mask, cos, sin, num_heads):
    b, s, hd3 = qkv.shape
    # In the traced example the past is exactly the earlier tokens, so max(P, width) is
    # the width; at run time ONNX Runtime sizes the outputs itself.
    shape = (b, num_heads, key_mask.shape[1], hd3 // (3 * num_heads))
    return qkv.new_empty(b, s, hd3 // 3), qkv.new_empty(shape), qkv.new_empty(shape)


class KeyMaskCache(DynamicCache):
    """The export's cache for :func:`in_place_attention`: the past layers plus the 2-D key
    mask, which that operator reads each row's length from."""

    attention = "onnx_in_place"

    def __init__(self, layers: Sequence[KVPair], key_mask: torch.Tensor) -> None:
        super().__init__(layers)
        self.key_mask = key_mask


def in_place_supported(head_dim: int) -> str | None:
    """Why the in-place KV layout cannot be exported for this head size, or None."""
    if head_dim % 16:
        return (f"head_dim {head_dim} is not a multiple of 16, which ONNX Runtime's "
                "GroupQueryAttention needs")
    return None


# ----------------------------------------------------------------------------- ONNX side
@functools.cache
def _register_gqa_schema() -> None:
    """Tell onnx (and so onnxscript, which writes the translations) the signature of ONNX
    Runtime's com.microsoft GroupQueryAttention, as far as the export uses it."""
    import onnx.defs
    from onnx.defs import OpSchema

    if onnx.defs.has("GroupQueryAttention", "com.microsoft"):
        return
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    inputs = [param("query", "T"), param("key", "T", param_option=optional),
              param("value", "T", param_option=optional),
              param("past_key", "T", param_option=optional),
              param("past_value", "T", param_option=optional),
              param("seqlens_k", "M"), param("total_sequence_length", "M"),
              param("cos_cache", "T", param_option=optional),
              param("sin_cache", "T", param_option=optional)]
    outputs = [param("output", "T"), param("present_key", "T"), param("present_value", "T")]
    attributes = [OpSchema.Attribute(name, OpSchema.AttrType.INT, "")
                  for name in ("num_heads", "kv_num_heads", "do_rotary")]
    onnx.defs.register_schema(OpSchema(
        "GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=attributes))


def translation_table(opset: int, vocab_size: int = 0) -> dict:
    """torch op -> onnxscript function, for ``torch.onnx.export(custom_translation_table=)``.

    softplus, logsumexp, the MetaHead's logit features and the in-place attention (ONNX
    Runtime's GroupQueryAttention) at every supported opset (18+); the fused rotary and
    attention operators from opset 23, where they exist. ``vocab_size``: the logits'
    last axis, for the features' top two (:func:`~vesper_sdk.model.metahead.top_two`'s
    blocks; 0: one TopK).
    """
    from onnx import TensorProto
    from onnxscript import FLOAT, INT64, values
    from onnxscript import opset18 as op18

    from ..model.metahead import top_two_block

    _register_gqa_schema()
    msft = values.Opset("com.microsoft", 1)
    block = top_two_block(vocab_size)

    def softplus_onnx(x: FLOAT, beta: float = 1.0, threshold: float = 20.0) -> FLOAT:
        # relu(z) - log(sigmoid(|z|)) is softplus(z) with no overflow and no branch (its
        # sigmoid stays in [0.5, 1]); past the threshold it differs from torch's z by
        # under 1e-8. Relu/Sigmoid/Log are vectorised in ONNX Runtime, Softplus is not.
        z = op18.Mul(x, op18.CastLike(beta, x))
        soft = op18.Sub(op18.Relu(z), op18.Log(op18.Sigmoid(op18.Abs(z))))
        return op18.Div(soft, op18.CastLike(beta, x))

    def logsumexp_onnx(x: FLOAT, dim: INT64, keepdim: bool = False) -> FLOAT:
        # The max-shifted sum of Exp: ONNX Runtime's CPU kernel of ReduceLogSumExp is not
        # vectorised.
        top = op18.ReduceMax(x, dim, keepdims=1)
        total = op18.ReduceSum(op18.Exp(op18.Sub(x, top)), dim, keepdims=1)
        lse = op18.Add(op18.Log(total), top)
        return lse if keepdim else op18.Squeeze(lse, dim)

    def logit_features_onnx(z: FLOAT) -> FLOAT:
        # One pass of Exp over the vocabulary, shifted by the top-1 that the margin needs
        # anyway: log(sum e) is lse - top1, and the entropy lse - sum(p z) is
        # log(sum e) - sum(e (z - top1)) / sum e; the log-sum-exp itself (the 4th column)
        # is one Add more. The top two from block maxima where the vocabulary splits
        # (ONNX Runtime's TopK over a whole vocabulary is several times a ReduceMax).
        last = op18.Constant(value_ints=[-1])
        two = op18.Constant(value_ints=[2])
        if block:  # model.metahead.top_two: logits [B, S, V] as [B, S, V / block, block]
            blocks = op18.Reshape(z, op18.Constant(value_ints=[0, 0, -1, block]))
            top_blocks, where = op18.TopK(op18.ReduceMax(blocks, last, keepdims=0), two,
                                          axis=-1)
            first, block_second = op18.Split(top_blocks, axis=-1, num_outputs=2)
            largest, _ = op18.Split(where, axis=-1, num_outputs=2)
            inner, _ = op18.TopK(op18.GatherND(blocks, largest, batch_dims=2), two, axis=-1)
            _, inner_second = op18.Split(inner, axis=-1, num_outputs=2)
            second = op18.Max(block_second, inner_second)
        else:
            top2, _ = op18.TopK(z, two, axis=-1)
            first, second = op18.Split(top2, axis=-1, num_outputs=2)
        shifted = op18.Sub(z, first)
        e = op18.Exp(shifted)
        total = op18.ReduceSum(e, last, keepdims=1)
        log_total = op18.Log(total)
        mean_shift = op18.Div(op18.ReduceSum(op18.Mul(e, shifted), last, keepdims=1), total)
        return op18.Concat(op18.Neg(log_total), op18.Sub(first, second),
                           op18.Sub(log_total, mean_shift), op18.Add(log_total, first),
                           axis=-1)

    def in_place_attention_onnx(qkv: FLOAT, past_k: FLOAT, past_v: FLOAT, key_mask: INT64,
                                cos: FLOAT, sin: FLOAT, num_heads: int):
        # Each row's length - 1 and the mask's width, as int32: what the operator reads
        # its positions, its causal limit and where to write the new keys from.
        one = op18.Constant(value_ints=[1])
        seqlens = op18.Cast(op18.Sub(op18.ReduceSum(key_mask, one, keepdims=0),
                                     op18.CastLike(1, key_mask)), to=TensorProto.INT32)
        width = op18.Cast(op18.Gather(op18.Shape(key_mask), op18.Constant(value_int=1),
                                      axis=0), to=TensorProto.INT32)
        return msft.GroupQueryAttention(qkv, None, None, past_k, past_v, seqlens, width,
                                        cos, sin, num_heads=num_heads,
                                        kv_num_heads=num_heads, do_rotary=1)

    table = {torch.ops.aten.softplus.default: softplus_onnx,
             torch.ops.aten.logsumexp.default: logsumexp_onnx,
             torch.ops.vesper.logit_features.default: logit_features_onnx,
             torch.ops.vesper.in_place_attention.default: in_place_attention_onnx}
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


# ----------------------------------------------------------------------------- the variant
@register_attention("onnx")
def onnx_attention(attn: Attention, x: torch.Tensor, rope: RopeTable,
                   mask: torch.Tensor | None, cache: Cache | None, layer: int) -> torch.Tensor:
    """The attention variant the export runs: the rotation and the cached attention as the
    two custom ops above (opset 23's RotaryEmbedding and Attention in the graph; the
    model's own math in PyTorch), the past cache in and the present cache out of the one
    operator."""
    b, s, d = x.shape
    q, k, v = attn.qkv(x).split(d, dim=-1)
    q = torch.ops.vesper.rotary(q, rope.cos, rope.sin, rope.position_ids, attn.num_heads)
    k = torch.ops.vesper.rotary(k, rope.cos, rope.sin, rope.position_ids, attn.num_heads)
    past = cache.past(layer) if isinstance(cache, DynamicCache) else None
    if past is None:
        past = (x.new_zeros(b, attn.num_heads, 0, attn.head_dim),) * 2
    if mask is None:
        pos = torch.arange(s, device=x.device)
        mask = (pos[None, :] <= pos[:, None])[None, None].expand(b, 1, s, s)
    y, key, value = torch.ops.vesper.cached_attention(q, k, v, mask, past[0], past[1],
                                                      attn.num_heads)
    if isinstance(cache, DynamicCache):
        cache.set(layer, key, value)
    return y


@register_attention("onnx_in_place")
def onnx_in_place_attention(attn: Attention, x: torch.Tensor, rope: RopeTable,
                            mask: torch.Tensor | None, cache: Cache | None,
                            layer: int) -> torch.Tensor:
    """The attention variant of an in-place KV export (:class:`KeyMaskCache`): the packed
    qkv product into one :func:`in_place_attention`, which rotates, writes the cache and
    attends (ONNX Runtime's GroupQueryAttention in the graph)."""
    if not isinstance(cache, KeyMaskCache):
        raise TypeError("the onnx_in_place attention variant needs a KeyMaskCache")
    b = x.shape[0]
    past = cache.past(layer)
    if past is None:
        past = (x.new_zeros(b, attn.num_heads, 0, attn.head_dim),) * 2
    y, key, value = torch.ops.vesper.in_place_attention(
        attn.qkv(x), past[0], past[1], cache.key_mask, rope.cos, rope.sin, attn.num_heads)
    cache.set(layer, key, value)
    return y


class LoweredFeedForward(nn.Module):
    """``GLUFeedForward`` whose gate and up FlyLoRA layers run as one stacked pair: one
    base product, one A product, one top-k over [2, r] and one batched product with the
    k chosen rows of B, where there were two of each.

    The chosen rows are gathered rather than the others masked to zero: one Gather
    instead of the zeros/ScatterElements/Mul chain, and a product over k rows, not r.
    The math is the model's own :meth:`GLUFeedForward.paired` (CPU decoding runs it
    too); the export's check compares the graph with PyTorch.
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


@contextlib.contextmanager
def lowered(model: VesperLM, opset: int) -> Iterator[VesperLM]:
    """``model`` with its FlyLoRA gate/up pairs lowered, and its attention running the
    ``onnx`` variant where :func:`fused_attention` holds; restored afterwards. (The
    MetaHead's logit features need nothing: ``logit_features`` is one operator in an
    export.)"""
    fused = fused_attention(opset)
    originals = [block.ffn for block in model.blocks]
    impls = [block.attn.impl for block in model.blocks]
    try:
        for block in model.blocks:
            if fused:
                block.attn.impl = "onnx"
            pair = paired_ffn_weights(block.ffn)
            if pair is not None:
                block.ffn = LoweredFeedForward(block.ffn, pair)
        yield model
    finally:
        for block, ffn, impl in zip(model.blocks, originals, impls, strict=True):
            block.ffn, block.attn.impl = ffn, impl
