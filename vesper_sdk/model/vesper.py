"""VesperLM: the one model definition, readable top to bottom.

Pre-norm decoder blocks (RMSNorm), attention through ``F.scaled_dot_product_attention``
with RoPE from a cached table and a KV cache, a GLU feed-forward whose gate and up
projections are FlyLoRA layers and whose activation is ERA, an optional top-k MoE, tied
embeddings, and the MetaHead that predicts, per token, how likely the model's own top-1
prediction is to be right.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..atomic import atomic_write_folder
from ..config import ConfigError, VesperConfig
from ..hf.files import write_folder_files
from .attention import ATTENTION, Attention, RopeTable, RotaryEmbedding
from .cache import Cache, KVPair, StaticCache, as_cache
from .files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ModelFolderError,
    load_state_checked,
    load_weights,
)
from .flylora import FlyLoRALinear, _balance_step, flylora_branch
from .head_loss import HeadLoss, head_loss, lm_loss_sum
from .metahead import (
    ANSWER,
    ERROR,
    LOGSUMEXP,
    STOP,
    TOP1_LOGPROB,
    MetaHead,
    logit_statistics,
    metahead_targets,
)


@dataclass
class VesperOutput:
    """What ``VesperLM.forward`` returns.

    logits [B,S,V]; confidence and stop [B,S] (probabilities); error_logits [B,S,3]
    (right / near miss / miss); answer [B,S] (the answer logit: an answer's confidence is
    ``metahead.answer_confidence`` of its tokens'; None in a training step, in train mode
    with grad enabled, which skips the answer row); aux_loss (MoE load balancing, 0
    without MoE); past_key_values (the cache written, indexable per layer as (k, v)
    [B,H,T,D]) when ``use_cache``; hidden_states [B,S,D] (final normed hidden state, what
    the LM head and MetaHead read); meta_logits [B,S,6] ([B,S,5] in a training step: the
    MetaHead's raw outputs, see
    its ``CONFIDENCE``, ``STOP``, ``ERROR`` and ``ANSWER`` slices); logsumexp [B,S] fp32
    (the logits' log-sum-exp, so a token's log-probability is its logit minus it; the
    MetaHead computes it for its logit features, None in a model without them);
    top_logprob [B,S] fp32 (the top-1 token's log-probability: a greedy token's, from the
    same features; None without them); loss
    (given ``labels``): the LM loss sum and the MetaHead's targets, and then logits are
    None when the chunked head is on (:meth:`VesperLM.set_chunked_loss`).
    """

    logits: torch.Tensor | None
    confidence: torch.Tensor
    stop: torch.Tensor
    error_logits: torch.Tensor
    answer: torch.Tensor | None
    aux_loss: torch.Tensor
    past_key_values: Cache | None
    hidden_states: torch.Tensor
    meta_logits: torch.Tensor
    logsumexp: torch.Tensor | None = None
    loss: HeadLoss | None = None
    top_logprob: torch.Tensor | None = None


class ERA(nn.Module):
    """ERA activation from the seed: GELU(x) + gamma * softplus(x)."""

    def __init__(self, gamma: float = 0.1) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(F.gelu(x), F.softplus(x), alpha=self.gamma)


class GLUFeedForward(nn.Module):
    """down(ERA(gate(x)) * up(x)), gate and up as FlyLoRA layers.

    Decoding (the CPU's and a GPU's decode swaps, ``vesper_sdk.inference.decode_swaps``)
    and ONNX graphs run the gate and up FlyLoRA layers as one stacked pair
    (:func:`paired_ffn_weights`, :meth:`paired`): one product for both base outputs and
    both A x, one top-k over [2, r], one product with the k chosen rows of each B, where
    there were two of each and a mask over all r rows.
    """

    def __init__(self, cfg: VesperConfig) -> None:
        super().__init__()
        d, f = cfg.hidden_size, cfg.ffn_hidden_size
        if cfg.flylora_rank:
            def make(i: int, o: int) -> nn.Module:
                return FlyLoRALinear(i, o, cfg.flylora_rank, cfg.flylora_topk,
                                     cfg.flylora_alpha, cfg.flylora_a_nnz,
                                     cfg.flylora_bias_update_rate)
        else:
            def make(i: int, o: int) -> nn.Module:
                return nn.Linear(i, o, bias=False)
        self.gate, self.up = make(d, f), make(d, f)
        self.down = nn.Linear(f, d, bias=False)
        self.act = ERA(cfg.era_gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))

    def paired(self, base: torch.Tensor, ax: torch.Tensor, balance_bias: torch.Tensor,
               lora_B: torch.Tensor, row_offset: torch.Tensor) -> torch.Tensor:
        """The output from the stacked pair's products (see :func:`paired_ffn_weights`).

        base [..., 2F] (gate's then up's base output), ax [..., 2r] (both A x),
        balance_bias [2, r], lora_B [2r, F] (both B transposed, stacked), row_offset
        [[0], [r]] (where up's rows start in it). The branch is :func:`flylora_branch`,
        as in each layer on its own.
        """
        g = self.gate
        lora, _ = flylora_branch(ax.unflatten(-1, (2, g.rank)), balance_bias, lora_B, g.topk,
                                 g.scaling, row_offset)
        gate, up = (base + lora.flatten(-2)).split(g.out_features, dim=-1)
        return self.down(self.act(gate) * up)


def paired_ffn_weights(ffn: nn.Module) -> dict[str, torch.Tensor] | None:
    """A GLU feed-forward's gate and up FlyLoRA layers stacked as one pair: base weight
    [2F, in], A [2r, in], balance bias [2, r], B transposed with the two stacked as rows
    [2r, F] (fresh tensors); None when the module is not such a feed-forward (plain
    layers, MoE, bitsandbytes). :meth:`GLUFeedForward.paired` computes with them."""
    if not isinstance(ffn, GLUFeedForward):
        return None
    g, u = ffn.gate, ffn.up
    if not (isinstance(g, FlyLoRALinear) and isinstance(u, FlyLoRALinear)
            # a bitsandbytes layer keeps its base weight in a quantized module instead
            and isinstance(getattr(g, "weight", None), torch.Tensor)
            and isinstance(getattr(u, "weight", None), torch.Tensor)
            and (g.rank, g.topk, g.scaling) == (u.rank, u.topk, u.scaling)):
        return None
    with torch.no_grad():
        return {"weight": torch.cat([g.weight, u.weight]),
                "lora_A": torch.cat([g.lora_A, u.lora_A]),
                "balance_bias": torch.stack([g.balance_bias, u.balance_bias]),
                "lora_B": torch.cat([g.lora_B.t(), u.lora_B.t()]).contiguous()}


class TiedHead(nn.Module):
    """The LM head of tied embeddings: logits from the embedding's own weight, with no
    parameter of its own (so the weight is stored once)."""

    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self._embed = (embed,)  # a tuple, so the embedding is not registered twice

    @property
    def weight(self) -> torch.Tensor:
        return self._embed[0].weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


class MoEFeedForward(nn.Module):
    """Top-k routed GLU experts with the Switch Transformer load-balancing loss."""

    def __init__(self, cfg: VesperConfig) -> None:
        super().__init__()
        self.top_k, self.num_experts = cfg.moe_top_k, cfg.num_experts
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(GLUFeedForward(cfg) for _ in range(cfg.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).float().softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        # Switch loss: num_experts * sum_e(fraction routed to e * mean router prob of e).
        frac = F.one_hot(chosen, self.num_experts).float().sum(1).mean(0) / self.top_k
        aux = self.num_experts * (frac * probs.mean(0)).sum()
        return out.view(shape), aux


class Block(nn.Module):
    def __init__(self, cfg: VesperConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.ffn = MoEFeedForward(cfg) if cfg.num_experts else GLUFeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: RopeTable, mask: torch.Tensor | None,
                cache: Cache | None, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the block's output, the MoE balancing loss or None for a dense block)."""
        a = self.attn(self.attn_norm(x), rope, mask, cache, layer)
        # Dropout only trains: at decode time each module call is a fixed cost per token.
        x = x + (self.drop(a) if self.training else a)
        h = self.ffn(self.ffn_norm(x))
        aux = None
        if isinstance(h, tuple):
            h, aux = h
        return x + (self.drop(h) if self.training else h), aux


# ----------------------------------------------------------------------------- model
class VesperLM(nn.Module):
    """The VesperLM decoder-only language model with its MetaHead."""

    def __init__(self, config: VesperConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = TiedHead(self.embed) if config.tie_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)
        self.metahead = MetaHead(config)
        self.gradient_checkpointing = config.gradient_checkpointing
        self.chunked_loss_rows: int | None = None  # see set_chunked_loss
        self.reset_parameters()

    # --- init ----------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual outputs scaled by 1/sqrt(2 * layers)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.startswith("metahead.answer"):
                continue  # the answer row and MLP are not random: reset_answer below
            if name.endswith("lora_B"):
                p.zero_()  # LoRA convention: the branch starts as a no-op
            elif p.dim() >= 2:
                scale = (2 * self.config.num_layers) ** -0.5 if name.endswith(
                    ("o_proj.weight", "down.weight")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
        self.metahead.reset_answer()

    # --- helpers -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flylora_layers(self) -> list[FlyLoRALinear]:
        return [m for m in self.modules() if isinstance(m, FlyLoRALinear)]

    @torch.no_grad()
    def update_flylora_balance(self) -> None:
        """Apply the gradient-free load-balancing update to every FlyLoRA layer (per step).

        Layers of one rank and rate (all of them, in a model built from one config) go
        together: a handful of operations per step instead of several per layer.
        """
        groups: dict[tuple, list[FlyLoRALinear]] = {}
        for m in self.flylora_layers():
            key = (m.rank, m.bias_update_rate, m.rank_load.device, m.rank_load.dtype)
            groups.setdefault(key, []).append(m)
        for (_, rate, _, _), layers in groups.items():
            loads = [m.rank_load for m in layers]
            steps = _balance_step(torch.stack(loads)).unbind(0)
            torch._foreach_add_([m.balance_bias for m in layers], steps, alpha=rate)
            torch._foreach_zero_(loads)

    def freeze_base(self) -> None:
        """Freeze everything but the FlyLoRA up-projections and the MetaHead."""
        for name, p in self.named_parameters():
            p.requires_grad_(name.endswith("lora_B") or (
                name.startswith("metahead.") and not name.startswith("metahead.answer")))

    def set_answer_mlp(self, hidden: int) -> None:
        """Give the MetaHead's answer logit an MLP of ``hidden`` units (0: none), zeroed
        until fitted (:mod:`vesper_sdk.training.calibration` fits it); the config says so,
        so the folder it is saved to builds the same model."""
        self.config.metahead_answer_hidden = hidden
        self.metahead.set_answer_mlp(hidden)

    def set_attention(self, impl: str) -> None:
        """Choose the attention variant every layer runs: a name in ``ATTENTION``
        (``sdpa``, ``one_query``, or one a backend registered, like the export's ``onnx``)."""
        if impl not in ATTENTION:
            raise ValueError(f"unknown attention variant {impl!r}: choose one of "
                             f"{', '.join(sorted(ATTENTION))}")
        for block in self.blocks:
            block.attn.impl = impl

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def set_chunked_loss(self, enabled: bool = True, chunk_rows: int = 0) -> None:
        """With ``labels``, compute the LM loss and the MetaHead's statistics and targets
        ``chunk_rows`` rows at a time (0: as many as keep a chunk's fp32 logits under
        :data:`~.head_loss.CHUNK_BYTES`), never the whole logits (:mod:`.head_loss`)."""
        self.chunked_loss_rows = chunk_rows if enabled else None

    @staticmethod
    def position_ids_from_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Positions that skip left padding: cumsum of the mask minus one, last seq_len."""
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.clamp(min=0)[:, -seq_len:]

    # --- forward -------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | Sequence[KVPair] | None = None,
                use_cache: bool = False, position_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                ) -> VesperOutput:
        """Run the model: training, prefill, cached decode and every backend come through here.

        input_ids [B,S]; attention_mask [B, past+S] (1 = real token, 0 = padding; left
        padding for batched generation); past_key_values: a cache object
        (:class:`DynamicCache`, :class:`StaticCache`), a tuple of per-layer (key, value),
        or None; ``use_cache`` returns the cache written by this call; position_ids [B,S]
        default from the mask (or the cache's length). A :class:`StaticCache` brings its
        own key mask and needs ``position_ids``. ``labels`` [B,S] (with ``loss_mask``,
        default all true): also return the LM loss sum over the masked positions and the
        MetaHead's targets (``loss``), as a training step needs.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        cache = as_cache(past_key_values, use_cache)
        if isinstance(cache, StaticCache):
            if position_ids is None:
                raise ValueError("a StaticCache step needs position_ids")
            mask = cache.step_mask()
        else:
            past_len = cache.length if cache is not None else 0
            position_ids, mask = self._positions_and_mask(b, s, past_len, attention_mask,
                                                          position_ids, input_ids.device)
        x = self.embed(input_ids)
        rope = RopeTable(self.rope, position_ids, x.dtype)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        training_step = self.training and torch.is_grad_enabled()
        # What the MetaHead's answer row reads. A training step skips the row: no loss
        # reads it, and it would concatenate every block's output.
        block_outputs = None if training_step else []
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and training_step:
                x, aux = checkpoint(block, x, rope, mask, cache, i, use_reentrant=False)
            else:
                x, aux = block(x, rope, mask, cache, i)
            if block_outputs is not None:
                block_outputs.append(x)
            if aux is not None:
                aux_loss = aux_loss + aux
        h = self.norm(x)
        logits, meta, stats, loss = self.heads(h, block_outputs, labels, loss_mask)
        if self.config.num_experts:
            aux_loss = aux_loss * self.config.moe_aux_loss_coef
        return VesperOutput(
            logits=logits,
            confidence=self.metahead.confidence(meta),
            stop=torch.sigmoid(meta[..., STOP]),
            error_logits=meta[..., ERROR],
            answer=meta[..., ANSWER] if block_outputs is not None else None,
            aux_loss=aux_loss,
            past_key_values=cache if use_cache else None,
            hidden_states=h,
            meta_logits=meta,
            logsumexp=None if stats is None else stats[..., LOGSUMEXP],
            loss=loss,
            top_logprob=None if stats is None else stats[..., TOP1_LOGPROB],
        )

    def _positions_and_mask(self, b: int, s: int, past_len: int,
                            attention_mask: torch.Tensor | None,
                            position_ids: torch.Tensor | None, device: torch.device,
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Checked positions [B,S] and the boolean attention mask [B,1,S,T] (None: causal)."""
        total = past_len + s
        if total > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {total} tokens exceeds max_seq_len={self.config.max_seq_len}: "
                "shorten the prompt or max_new_tokens")
        if attention_mask is not None and attention_mask.shape != (b, total):
            raise ValueError(
                f"attention_mask must be [batch, past+seq] = {(b, total)}, got "
                f"{tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = self.position_ids_from_mask(attention_mask, s)
            else:
                position_ids = torch.arange(past_len, total, device=device).expand(b, s)
        if attention_mask is None and not past_len:
            return position_ids, None
        # Key j visible to query i if j is real and not in the future. Built by broadcasting
        # [S,T] against [B,1,1,T]: no unsqueeze or expand beyond what the shapes need (each
        # one is a node in an exported graph).
        q_pos = torch.arange(past_len, total, device=device)[:, None]
        k_pos = torch.arange(total, device=device)
        allowed = k_pos <= q_pos
        if attention_mask is None:
            return position_ids, allowed.expand(b, 1, s, total)
        # A padded query sees only itself, so no softmax row is empty (NaN).
        return position_ids, (allowed & attention_mask.bool()[:, None, None, :]) | (k_pos == q_pos)

    def heads(self, h: torch.Tensor, block_outputs: list[torch.Tensor] | None,
              labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None,
                         HeadLoss | None]:
        """(logits [..., V], raw meta logits [..., 6] in fp32, [..., 5] without the answer
        row when ``block_outputs`` is None, the logit statistics [..., 4]
        (:func:`~.metahead.logit_statistics`) or None without logit features, the loss
        given ``labels``) from the final hidden state and the
        blocks' outputs. The chunked head (:meth:`set_chunked_loss`) returns no logits."""
        meta_in = h if self.config.metahead_grad_to_trunk else h.detach()
        use_stats = self.metahead.use_logits
        loss = None
        if labels is not None:
            if labels.shape != h.shape[:-1] or (loss_mask is not None
                                                and loss_mask.shape != labels.shape):
                raise ValueError(f"labels {tuple(labels.shape)} and loss_mask "
                                 f"{None if loss_mask is None else tuple(loss_mask.shape)} "
                                 f"must be [batch, seq] = {tuple(h.shape[:-1])}, one per "
                                 "input token")
            loss_mask = torch.ones_like(labels, dtype=torch.bool) if loss_mask is None \
                else loss_mask.bool()
        if labels is not None and self.chunked_loss_rows is not None:
            logits = None
            loss = head_loss(h, self.lm_head.weight, labels, loss_mask,
                             self.config.eos_token_id, self.chunked_loss_rows or None)
            stats = loss.statistics if use_stats else None
        else:
            logits = self.lm_head(h)
            stats = logit_statistics(logits) if use_stats else None
            if labels is not None:
                loss = HeadLoss(lm_loss_sum(logits, labels, loss_mask), stats,
                                metahead_targets(logits, labels, self.config.eos_token_id))
        meta = self.metahead(meta_in, logits, block_outputs, stats).float()
        return logits, meta, stats, loss

    # --- the model folder ----------------------------------------------------------
    def save_pretrained(self, directory: str | Path, extra_files: dict[str, Path] | None = None,
                        ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into ``directory``, atomically.

        The folder is assembled beside its final place and renamed into it, so a crash
        never leaves a half-written model; files already in the folder that we do not
        write (a tokenizer.json, say) are kept. ``extra_files`` maps names to files to
        copy in as part of the same atomic write.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        files: dict[str, bytes | Path] = {CONFIG_NAME: self.config.to_json().encode()}

        def write(tmp: Path) -> None:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            write_folder_files(tmp, self.config)  # transformers' files + the model card

        return atomic_write_folder(directory, files, writer=write, extra_files=extra_files)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        ) -> VesperLM:
        """Load a model folder written by ``save_pretrained`` (or ``vesper train``)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelFolderError(
                f"{directory} is not a folder: pass the model folder that holds "
                f"{CONFIG_NAME} and {WEIGHTS_NAME}")
        try:
            config = VesperConfig.from_file(directory / CONFIG_NAME)
        except FileNotFoundError as exc:
            raise ModelFolderError(str(exc)) from None
        except (ConfigError, TypeError) as exc:
            raise ModelFolderError(f"{directory / CONFIG_NAME}: {exc}") from None
        quant = json.loads((directory / CONFIG_NAME).read_text()).get("quantization")
        if quant:
            raise ModelFolderError(
                f"{directory} holds a {quant.get('method')}-quantized model: load it with "
                "vesper_sdk.load(dir), which rebuilds the quantized layers")
        model = cls(config)
        state = load_weights(directory / WEIGHTS_NAME, map_location)
        load_state_checked(model, state, directory / WEIGHTS_NAME)
        return model.to(map_location)
