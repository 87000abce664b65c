"""Threaded matrix-vector products for decoding on the CPU.

Decoding one token multiplies every weight matrix by one vector per sequence, so a decode
step reads every weight once and its speed is the memory bandwidth the product reaches.
MKL runs a one-row product on one thread whatever ``torch.get_num_threads()`` says, and
reads the usual [out, in] layout at about half the speed of [in, out]. Cut the output
columns into ``parts`` blocks stored ``[parts, in, out / parts]`` and one ``torch.bmm``
spreads the blocks over the threads. On this repo's 2-core CPU, 'small' model, batch 1
(``python benchmarks/generate.py --matvec-sweep``): F.linear 68 tokens/s; one block
(the [in, out] layout) 98 tokens/s at 27 GB/s; 2-8 blocks 129-132 tokens/s at 34-37 GB/s.

:func:`attach` gives every dense projection of a :class:`~vesper_sdk.model.VesperLM`
(attention, feed-forward, FlyLoRA layers, MetaHead, LM head) a :class:`SplitMatVec`; the
gate and up FlyLoRA layers of a feed-forward share one :class:`PairProduct` (one product
and one top-k for the two, their LoRA branches from the k chosen rows of B). The
layers use it only for small inputs (at most ``max_rows`` rows) on the CPU with autograd
off, so prefill and training keep ``F.linear``. The blocks are a copy of the weights
taken when attached, so the model's memory for its weights doubles; once a weight is
updated in place (its version counter moves) its layer goes back to ``F.linear`` until
:func:`attach` runs again (``attach(model, parts=0)`` detaches; ``TorchBackend`` runs it
again at the next generation).

:func:`attach_pairs` gives the feed-forwards the same pair over one ``F.linear``
(:class:`DenseProduct`) instead, on any device: for a GPU decode step, fewer kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_PARTS = 8
DEFAULT_MAX_ROWS = 16


def _split_product(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x [..., in] times column blocks [parts, in, out / parts] -> [..., out]."""
    parts, in_features, width = blocks.shape
    rows = x.reshape(1, -1, in_features).expand(parts, -1, -1)
    y = torch.bmm(rows, blocks)  # [parts, rows, out / parts]
    if rows.shape[1] == 1:  # batch-1 decode: [parts, 1, w] already is the output's order
        return y.view(*x.shape[:-1], parts * width)
    # Contiguous whatever layout bmm picked: the compiler is promised exactly that.
    return y.transpose(0, 1).reshape(*x.shape[:-1], parts * width).contiguous()


def _split_product_meta(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], blocks.shape[0] * blocks.shape[2]))


# The product as one operator that torch.compile keeps whole: traced through, inductor
# turns the batched product into a loop of its own that runs on one thread ('small'
# model, compiled CPU decode step: 61 tokens/s that way, ~160 with this operator).
_LIB = torch.library.Library("vesper", "FRAGMENT")
_LIB.define("split_matvec(Tensor x, Tensor blocks) -> Tensor")
_LIB.impl("split_matvec", _split_product, "CPU")
_LIB.impl("split_matvec", _split_product_meta, "Meta")


class _Product:
    """``x @ weight.T`` from a copy of ``weight``, for decode-sized inputs only."""

    def __init__(self, weight: torch.Tensor, max_rows: int,
                 sources: Sequence[torch.Tensor]) -> None:
        self.out_features, self.in_features = weight.shape
        self.max_rows = max_rows
        self.dtype, self.device = weight.dtype, weight.device
        # The copy is only good while the weights it came from are unchanged: any in-place
        # update (an optimizer step, load_state_dict) bumps a tensor's version counter.
        self.sources = tuple(sources) or (weight,)
        self.version = self._version_sum()
        self.max_numel = max_rows * self.in_features

    def applies(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is a decode-sized input this product serves (else use F.linear).

        Under torch.compile the weight's version is not checked (the compiler cannot read
        it): whoever compiles checks :meth:`is_stale` before each call instead.
        """
        # Checked per product and token: the cheapest tests first (~1 us in all).
        return (x.dtype == self.dtype and x.numel() <= self.max_numel
                and not torch.is_grad_enabled() and x.device == self.device
                and (torch.compiler.is_compiling() or not self.is_stale()))

    def is_stale(self) -> bool:
        """Whether the weights changed in place since the blocks were copied from them."""
        return self._version_sum() != self.version

    def _version_sum(self) -> int:
        # Version counters only grow, so their sum moves as soon as any one does.
        return sum(t._version for t in self.sources)


class SplitMatVec(_Product):
    """``x @ weight.T`` for a few rows of x, as one batched product over column blocks."""

    def __init__(self, weight: torch.Tensor, parts: int, max_rows: int = DEFAULT_MAX_ROWS,
                 sources: Sequence[torch.Tensor] = ()) -> None:
        out_features, in_features = weight.shape
        if parts < 1 or out_features % parts:
            raise ValueError(f"parts={parts} must be >= 1 and divide the {out_features} "
                             "output features")
        super().__init__(weight, max_rows, sources)
        self.parts = parts
        with torch.no_grad():
            self.blocks = (weight.detach().t().reshape(in_features, parts, -1)
                           .permute(1, 0, 2).contiguous())  # [parts, in, out / parts]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.vesper.split_matvec(x, self.blocks)
        return _split_product(x, self.blocks)


class DenseProduct(_Product):
    """``F.linear`` over a stacked copy of several weights: one kernel where there were
    several (what a GPU decode step, bound by its kernel count, gains from a pair)."""

    def __init__(self, weight: torch.Tensor, max_rows: int = DEFAULT_MAX_ROWS,
                 sources: Sequence[torch.Tensor] = ()) -> None:
        super().__init__(weight, max_rows, sources)
        self.weight = weight.detach().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class PairProduct:
    """A GLU feed-forward's FlyLoRA gate and up layers as one decode product.

    ``pair(x)`` gives (both base outputs [..., 2F], both A x [..., 2r]) in one pass over
    [gate; up; A_gate; A_up]; :meth:`GLUFeedForward.paired` takes them with ``tables``
    (the stacked balance bias, B rows and row offsets). Stale, like its product, once any
    of the two layers' tensors changes in place.
    """

    def __init__(self, ffn: nn.Module, pair: dict[str, torch.Tensor], parts: int,
                 max_rows: int = DEFAULT_MAX_ROWS) -> None:
        """``pair``: ``paired_ffn_weights(ffn)``, the stacked tensors of ``ffn``'s layers;
        ``parts=0``: a :class:`DenseProduct` (one ``F.linear``, any device) instead of
        the CPU's column blocks."""
        g, u = ffn.gate, ffn.up
        sources = [t for layer in (g, u) for t in (
            layer.weight, layer.lora_A, layer.lora_B, layer.balance_bias)]
        weight = torch.cat([pair["weight"], pair["lora_A"]])
        self.product: _Product = DenseProduct(weight, max_rows, sources) if parts == 0 else \
            SplitMatVec(weight, _parts_for(weight.shape[0], parts), max_rows, sources)
        self.split = (pair["weight"].shape[0], pair["lora_A"].shape[0])
        offset = torch.tensor([[0], [g.rank]], device=weight.device)
        self.tables = (pair["balance_bias"], pair["lora_B"], offset)

    def applies(self, x: torch.Tensor) -> bool:
        return self.product.applies(x)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        base, ax = self.product(x).split(self.split, dim=-1)
        return base, ax


def products(model: nn.Module) -> list[_Product]:
    """Every product :func:`attach` gave ``model`` (e.g. to check them with ``is_stale``)."""
    pairs = [getattr(module, "pair", None) for module in model.modules()]
    return [p for module in model.modules() for p in (
        getattr(module, "matvec", None), getattr(module, "matvec_b", None),
        getattr(module, "head_matvec", None)) if p is not None] + [
        p.product for p in pairs if isinstance(p, PairProduct)]


def _parts_for(out_features: int, parts: int) -> int:
    # The largest block count <= parts that divides the output (1 still helps: it is the
    # fast [in, out] layout on one thread).
    return max(p for p in range(1, parts + 1) if out_features % p == 0)


def attach(model: nn.Module, parts: int = DEFAULT_PARTS,
           max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Give each dense projection of a VesperLM a :class:`SplitMatVec`; returns how many.

    Only fp32 CPU weights of plain layers get one (bitsandbytes layers keep their own
    kernels; bf16 goes faster through F.linear's oneDNN kernels: 'small', batch 1, 117
    tokens/s that way against 104 with the blocks). ``parts=0`` removes them all.
    """
    from .model import FlyLoRALinear, GLUFeedForward, Linear, VesperLM, paired_ffn_weights

    def usable(weight: torch.Tensor | None) -> bool:
        return (parts > 0 and isinstance(weight, torch.Tensor) and weight.device.type == "cpu"
                and weight.dim() == 2 and weight.dtype == torch.float32)

    def make(weight: torch.Tensor | None, sources: Sequence[torch.Tensor] = (),
             ) -> SplitMatVec | None:
        if not usable(weight):
            return None
        return SplitMatVec(weight, _parts_for(weight.shape[0], parts), max_rows, sources)

    count = 0
    paired: set[int] = set()  # FlyLoRA layers served by their feed-forward's pair
    for module in model.modules():
        if isinstance(module, GLUFeedForward):
            pair = paired_ffn_weights(module)
            module.pair = None
            if pair is not None and usable(pair["weight"]):
                module.pair = PairProduct(module, pair, parts, max_rows)
                paired.update((id(module.gate), id(module.up)))
                count += 1
        if isinstance(module, FlyLoRALinear):
            # A quantized FlyLoRA layer keeps its base in a bitsandbytes module instead.
            weight = getattr(module, "weight", None)
            module.matvec = module.matvec_b = None
            if (isinstance(weight, torch.Tensor) and weight.dtype == module.lora_A.dtype
                    and id(module) not in paired):
                module.matvec = make(torch.cat([weight.detach(), module.lora_A]), [weight])
                module.matvec_b = make(module.lora_B)
            count += (module.matvec is not None) + (module.matvec_b is not None)
        elif isinstance(module, Linear):
            module.matvec = make(module.weight)
            count += module.matvec is not None
        if isinstance(module, VesperLM) and module.config.tie_embeddings:
            module.head_matvec = make(module.embed.weight)
            count += module.head_matvec is not None
    return count


def attach_pairs(model: nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Give each GLU feed-forward of FlyLoRA layers a :class:`PairProduct` of one
    ``F.linear`` (a :class:`DenseProduct`, any device and dtype); returns how many.

    For a GPU decode step, whose time goes by its kernel count: the gate and up layers'
    four products (two base, two A) become one, and their two top-k and B products one
    each. The stacked copy adds the gate and up weights' memory again.
    ``attach(model, parts=0)`` removes them.
    """
    from .model import GLUFeedForward, paired_ffn_weights

    count = 0
    for module in model.modules():
        if isinstance(module, GLUFeedForward):
            pair = paired_ffn_weights(module)
            module.pair = None if pair is None else PairProduct(module, pair, 0, max_rows)
            count += module.pair is not None
    return count
