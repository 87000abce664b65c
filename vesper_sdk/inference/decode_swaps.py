"""Decode speed-ups as module swaps, applied to a model from outside by the decode backend.

Decoding one token multiplies every weight matrix by one vector per sequence, so a decode
step reads every weight once and its speed is the memory bandwidth the product reaches.
On the CPU, MKL runs a one-row product on one thread whatever ``torch.get_num_threads()``
says, and reads the usual [out, in] layout slower than [in, out]. Cut the output columns
into ``parts`` blocks stored ``[parts, in, out / parts]`` and one ``torch.bmm`` spreads the
blocks over the threads (:class:`SplitMatVec`).

:func:`apply_cpu_decode` swaps every dense projection of a :class:`~vesper_sdk.model.VesperLM`
(attention, feed-forward down, MetaHead, LM head) for a :class:`MatVecLinear` over the same
parameters, and each GLU feed-forward of FlyLoRA layers for a :class:`PairedFeedForward`:
one product and one top-k for its gate and up layers, their LoRA branches from the k
chosen rows of B (``GLUFeedForward.paired``). :func:`apply_pair_ffn` makes the same pair
over one ``F.linear`` (:class:`DenseProduct`) on any device: for a GPU decode step, fewer
kernels. :func:`remove_decode_swaps` puts the model's own modules back.

How many blocks pays depends on the CPU (its cores, its caches, how fast MKL's own
one-row product is on it), so it is measured rather than fixed: :func:`measured_parts`
times the candidates once per weight shape and thread count in a process, on a stand-in
weight of that shape, and :func:`apply_cpu_decode` with ``parts="auto"`` uses it.

The products serve only small inputs (at most ``max_rows`` rows) with autograd off, so
prefill and training keep ``F.linear``. They are a copy of the weights taken when
applied (the weights' memory again); once a weight is updated in place (its version
counter moves) its module goes back to ``F.linear`` until the swaps are applied again
(``TorchBackend`` does so at the next generation). State dict keys never change: a swapped
module holds the very parameters of the one it replaces.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..model import GLUFeedForward, TiedHead, paired_ffn_weights

DEFAULT_PARTS = 8
DEFAULT_MAX_ROWS = 16
# What measured_parts times: 0 is F.linear over the weight as it is (no swap), n > 0 is
# SplitMatVec with n column blocks (where n divides the output features).
CANDIDATE_PARTS = (0, 2, 4, 8)
# Weights this small are not measured: the call's own cost is all there is, and F.linear's
# is the lowest (a MetaHead row, say).
MIN_MEASURED = 1 << 16
# Another candidate replaces the default only when it is at least this much faster: the
# timings of one process on a shared machine move by a few per cent.
MARGIN = 0.10
Parts = int | Literal["auto"]
_MEASURED: dict[tuple[int, int, int], int] = {}  # (out, in, threads) -> chosen parts


def pick_parts(times: Mapping[int, float], default: int = DEFAULT_PARTS,
               margin: float = MARGIN) -> int:
    """The candidate to use from each one's time (``{parts: seconds}``): the fastest, unless
    ``default`` is among them and within ``margin`` of it."""
    best = min(times, key=lambda k: times[k])
    if default in times and times[best] > (1.0 - margin) * times[default]:
        return default
    return best


def measured_parts(out_features: int, in_features: int, rounds: int = 3,
                   budget_s: float = 0.001) -> int:
    """How many column blocks a decode product of a [out, in] fp32 weight should use on
    this machine, with ``torch.get_num_threads()`` threads (0: plain ``F.linear``).

    Times every candidate of :data:`CANDIDATE_PARTS` on one row, on a weight of that shape,
    in ``rounds`` interleaved rounds of about ``budget_s`` each, and picks by the medians
    (:func:`pick_parts`); remembered for the process, so each shape is measured once
    (a 'small' model's shapes: about a quarter of a second). Weights of fewer than
    :data:`MIN_MEASURED` elements get 0.
    """
    if out_features * in_features < MIN_MEASURED:
        return 0
    key = (out_features, in_features, torch.get_num_threads())
    if key in _MEASURED:
        return _MEASURED[key]
    with torch.no_grad():
        # Any values do (no denormals): only the time is read.
        weight = torch.full((out_features, in_features), 0.01)
        x = torch.ones(1, in_features)
        products: dict[int, Callable[[], torch.Tensor]] = {0: lambda: F.linear(x, weight)}
        for parts in CANDIDATE_PARTS[1:]:
            if out_features % parts == 0:
                products[parts] = functools.partial(SplitMatVec(weight, parts), x)
        # About budget_s at 16 GB/s, the order of a decode product's speed.
        calls = min(100, max(1, int(budget_s * 16e9 / (4 * out_features * in_features))))
        times: dict[int, list[float]] = {p: [] for p in products}
        for _ in range(rounds):
            for parts, product in products.items():
                start = time.perf_counter()
                for _ in range(calls):
                    product()
                times[parts].append((time.perf_counter() - start) / calls)
    chosen = pick_parts({p: statistics.median(t) for p, t in times.items()})
    _MEASURED[key] = chosen
    return chosen


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
# turns the batched product into a loop of its own that runs on one thread.
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


# ----------------------------------------------------------------------------- the swaps
class MatVecLinear(nn.Linear):
    """``nn.Linear`` whose decode-sized inputs go through a product (same parameters)."""

    product: _Product

    @classmethod
    def swap(cls, linear: nn.Linear, product: _Product) -> MatVecLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameters
        new.product, new.original = product, (linear,)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.product.applies(x):
            y = self.product(x)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)


class MatVecHead(TiedHead):
    """The tied LM head with a decode product over the embedding's weight."""

    product: _Product

    @classmethod
    def swap(cls, head: TiedHead, product: _Product) -> MatVecHead:
        new = cls(head._embed[0])
        new.product, new.original = product, (head,)
        return new

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.product(h) if self.product.applies(h) else F.linear(h, self.weight)


class PairedFeedForward(GLUFeedForward):
    """``GLUFeedForward`` whose FlyLoRA gate and up decode as one :class:`PairProduct`
    (same submodules, so the same parameters and state dict keys)."""

    pair: PairProduct

    @classmethod
    def swap(cls, ffn: GLUFeedForward, pair: PairProduct) -> PairedFeedForward:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.gate, new.up, new.down, new.act = ffn.gate, ffn.up, ffn.down, ffn.act
        new.pair, new.original = pair, (ffn,)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pair.applies(x):
            base, ax = self.pair(x)
            return self.paired(base, ax, *self.pair.tables)
        return super().forward(x)


SWAPS = (MatVecLinear, MatVecHead, PairedFeedForward)


def _parts_for(out_features: int, parts: int) -> int:
    # The largest block count <= parts that divides the output (1 still helps: it is the
    # fast [in, out] layout on one thread).
    return max(p for p in range(1, parts + 1) if out_features % p == 0)


def _usable(weight: object, parts: Parts) -> bool:
    # Only fp32 CPU weights of plain layers: bitsandbytes layers keep their own kernels, and
    # bf16 goes faster through F.linear's oneDNN kernels.
    return (parts != 0 and isinstance(weight, torch.Tensor) and weight.device.type == "cpu"
            and weight.dim() == 2 and weight.dtype == torch.float32)


def _swap_children(module: nn.Module, replace: Callable[[nn.Module], nn.Module | None]) -> int:
    count = 0
    for name, child in list(module.named_children()):
        new = replace(child)
        if new is not None:
            setattr(module, name, new)
            count += 1
        count += _swap_children(new if new is not None else child, replace)
    return count


def apply_cpu_decode(model: nn.Module, parts: Parts = DEFAULT_PARTS,
                     max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Swap in the CPU's threaded decode products; returns how many modules were swapped.

    ``parts``: column blocks for every weight (at most: the largest count that divides
    each one's outputs), ``"auto"`` for each weight shape's :func:`measured_parts`, 0 to
    swap nothing. Call :func:`remove_decode_swaps` first to apply again.
    """
    def blocks(out_features: int, in_features: int) -> int:
        if parts == "auto":
            return measured_parts(out_features, in_features)
        return _parts_for(out_features, parts)

    def replace(child: nn.Module) -> nn.Module | None:
        if isinstance(child, SWAPS):
            return None
        if isinstance(child, GLUFeedForward):
            pair = paired_ffn_weights(child)
            if pair is not None and _usable(pair["weight"], parts):
                # Measured as the stacked product it is: [gate; up; A_gate; A_up].
                n = blocks(pair["weight"].shape[0] + pair["lora_A"].shape[0],
                           pair["weight"].shape[1])
                return PairedFeedForward.swap(child, PairProduct(child, pair, n, max_rows))
            return None
        if type(child) in (nn.Linear, TiedHead) and _usable(child.weight, parts):
            w = child.weight
            n = blocks(*w.shape)
            if n == 0:  # F.linear is the fastest here: the module stays as it is
                return None
            swap = MatVecLinear.swap if type(child) is nn.Linear else MatVecHead.swap
            return swap(child, SplitMatVec(w, n, max_rows))
        return None

    return _swap_children(model, replace)


def apply_pair_ffn(model: nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Swap each GLU feed-forward of FlyLoRA layers for a pair over one ``F.linear`` (any
    device and dtype); returns how many. Costs a stacked copy of the gate and up weights."""
    def replace(child: nn.Module) -> nn.Module | None:
        if type(child) is GLUFeedForward:
            pair = paired_ffn_weights(child)
            if pair is not None:
                return PairedFeedForward.swap(child, PairProduct(child, pair, 0, max_rows))
        return None

    return _swap_children(model, replace)


def remove_decode_swaps(model: nn.Module) -> None:
    """Put back the modules the swaps replaced (innermost first)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SWAPS):
                remove_decode_swaps(child)
                setattr(module, name, child.original[0])


def decode_products(model: nn.Module) -> list[_Product]:
    """Every product the swaps gave ``model`` (e.g. to check them with ``is_stale``)."""
    found: list[_Product] = []
    for m in model.modules():
        if isinstance(m, MatVecLinear | MatVecHead):
            found.append(m.product)
        elif isinstance(m, PairedFeedForward):
            found.append(m.pair.product)
    return found
