"""The KV cache: an object the model writes at positions, one per generation.

``VesperLM.forward(..., past_key_values=cache)`` calls ``cache.update(layer, k, v)`` in
each attention layer and attends over what it returns. Two kinds:

- :class:`DynamicCache` grows by concatenation (training-free prefill, the ONNX export,
  any batch shape); indexable like the tuple of per-layer ``(key, value)`` it holds.
- :class:`StaticCache` writes into preallocated buffers at a position, so every shape of
  a decode step is fixed (``torch.compile``, CUDA graphs) and nothing is copied per token;
  it carries its own key mask and picks the attention variant that suits it.
- :class:`SlotCache`, a static cache whose rows are independent requests, each at its own
  position (the server's continuous batching: ``vesper_sdk.inference.continuous``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

KVPair = tuple[torch.Tensor, torch.Tensor]


class DynamicCache:
    """Per layer ``(key, value)`` [B,H,T,D], grown by each forward that writes it."""

    # Attention variant this cache needs (None: the model's own choice).
    attention: str | None = None

    def __init__(self, layers: Sequence[KVPair] = ()) -> None:
        self.layers: list[KVPair] = [(k, v) for k, v in layers]

    @property
    def length(self) -> int:
        """Positions already cached (0 before the prefill)."""
        return self.layers[0][0].shape[2] if self.layers else 0

    def past(self, layer: int) -> KVPair | None:
        """What layer ``layer`` cached before this forward, or None."""
        return self.layers[layer] if layer < len(self.layers) else None

    def set(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Replace layer ``layer``'s entry (a variant that concatenates by itself)."""
        if layer < len(self.layers):
            self.layers[layer] = (key, value)
        else:
            self.layers.append((key, value))

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> KVPair:
        """Append this forward's k/v [B,H,S,D]; return everything to attend over."""
        past = self.past(layer)
        if past is not None:
            key = torch.cat((past[0], key), dim=2)
            value = torch.cat((past[1], value), dim=2)
        self.set(layer, key, value)
        return key, value

    def index_select(self, index: torch.Tensor) -> DynamicCache:
        """A cache of the batch rows in ``index`` only (rows that finished leave)."""
        return DynamicCache([(k.index_select(0, index), v.index_select(0, index))
                             for k, v in self.layers])

    def __getitem__(self, layer: int) -> KVPair:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[KVPair]:
        return iter(self.layers)


class StaticCache:
    """Preallocated K/V buffers [B,H,C,D] per layer and a key mask [B,C], written in place.

    One decode step writes each row's new token at slot ``write_index`` ([1] long
    tensor, the same for every row: rows are left-padded) and switches that slot of
    ``key_mask`` on. ``length``: attend over the first ``length`` slots (an eager or
    compiled step), or None for the whole capacity (a CUDA graph, whose shapes cannot
    change; it attends by the ``one_query`` variant). ``padded``: whether any row has
    padding in its cache; without it a step over ``length`` slots needs no mask.
    """

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                 key_mask: torch.Tensor, write_index: torch.Tensor, length: int | None = None,
                 padded: bool = True) -> None:
        self.keys, self.values = keys, values
        self.key_mask, self.write_index = key_mask, write_index
        self.length, self.padded = length, padded
        self.attention = "one_query" if length is None else None

    def step_mask(self) -> torch.Tensor | None:
        """Switch on this step's slot; the boolean mask [B,1,1,T] to attend with, if any.

        Every row sees the new token, padding rows of a batch bucket too (no empty softmax).
        """
        self.key_mask.index_fill_(1, self.write_index, True)
        if self.length is not None and not self.padded:
            return None
        return self.key_mask[:, None, None, :self.length]

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> KVPair:
        self.keys[layer].index_copy_(2, self.write_index, key)
        self.values[layer].index_copy_(2, self.write_index, value)
        if self.length is None:
            return self.keys[layer], self.values[layer]
        return (self.keys[layer].narrow(2, 0, self.length),
                self.values[layer].narrow(2, 0, self.length))


class SlotCache(StaticCache):
    """A :class:`StaticCache` whose rows sit at positions of their own (continuous batching).

    Each row is one request's slot, holding its tokens from position 0 (no padding);
    ``write_index`` [B] is each row's next position, written by this step, and
    ``key_mask`` [B,C] marks each row's filled slots. ``length`` is the longest row's
    filled length after the step (the columns attended over).
    """

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                 key_mask: torch.Tensor, write_index: torch.Tensor, length: int) -> None:
        super().__init__(keys, values, key_mask, write_index, length, padded=True)
        self.rows = torch.arange(write_index.shape[0], device=write_index.device)

    def step_mask(self) -> torch.Tensor | None:
        self.key_mask[self.rows, self.write_index] = True
        return self.key_mask[:, None, None, :self.length]

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> KVPair:
        # key/value [B,H,1,D]: row i's goes to its own position write_index[i].
        self.keys[layer][self.rows, :, self.write_index] = key[:, :, 0]
        self.values[layer][self.rows, :, self.write_index] = value[:, :, 0]
        assert self.length is not None
        return (self.keys[layer].narrow(2, 0, self.length),
                self.values[layer].narrow(2, 0, self.length))


Cache = DynamicCache | StaticCache


def as_cache(past_key_values: Cache | Sequence[KVPair] | None, use_cache: bool,
             ) -> Cache | None:
    """The cache object a forward writes: the one given, one made from a tuple of per-layer
    ``(key, value)``, a new empty one when ``use_cache`` asks for it, or None."""
    if isinstance(past_key_values, DynamicCache | StaticCache):
        return past_key_values
    if past_key_values is not None:
        return DynamicCache(past_key_values)
    return DynamicCache() if use_cache else None
