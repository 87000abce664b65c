"""Byte-level BPE tokenizer (HF ``tokenizers``), special tokens and the chat template.

Trained on the user's own texts (nothing is downloaded) or read from a local
``tokenizer.json``. Digits are split one per token, which small models need in order
to learn arithmetic. Byte-level, so any Unicode text round-trips exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .atomic import atomic_write_file
from .integrity import verify_file

TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"  # what transformers' AutoTokenizer reads
SPECIAL_TOKENS_MAP_NAME = "special_tokens_map.json"
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS.values()]
# encode_chat as Jinja, for transformers' apply_chat_template: the same ids on any content
# that does not spell a special token (docs/huggingface.md says what happens when it does).
CHAT_TEMPLATE = (
    "{{- '" + BOS + "' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('role must be system, user or assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '" + EOS + "' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ROLE_TOKENS["assistant"] + "' -}}{%- endif -%}")
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


class TokenizerError(ValueError):
    """A tokenizer file or a chat message is unusable; the message says how to fix it."""


@dataclass
class ChatEncoding:
    """Token ids of a chat and the loss mask (1 on assistant tokens, incl. their EOS)."""

    ids: list[int]
    loss_mask: list[int]


class VesperTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` with VesperLM's special tokens and chat template.

    Chat layout: ``<|bos|>`` then, per message, ``<|role|>`` + content + ``<|eos|>``.
    A generation prompt ends with ``<|assistant|>``; the model ends its answer with
    ``<|eos|>``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        # Text that spells a special token ("<|assistant|>") stays text: only the chat
        # template may insert control tokens, so user content cannot forge a turn.
        tokenizer.encode_special_tokens = True
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise TokenizerError(
                f"tokenizer lacks the special token(s) {', '.join(missing)}: VesperLM needs "
                f"{', '.join(SPECIAL_TOKENS)}; train one with VesperTokenizer.train(...)")
        self.pad_id = tokenizer.token_to_id(PAD)
        self.bos_id = tokenizer.token_to_id(BOS)
        self.eos_id = tokenizer.token_to_id(EOS)
        self.role_ids = {role: tokenizer.token_to_id(t) for role, t in ROLE_TOKENS.items()}

    # --- construction --------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2,
              ) -> VesperTokenizer:
        """Train a byte-level BPE with ``vocab_size`` entries (special tokens included)."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise TokenizerError(
                f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                f"{256 + len(SPECIAL_TOKENS)} entries (256 bytes + special tokens)")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        _add_bos_processor(tok)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> VesperTokenizer:
        """Read a ``tokenizer.json`` (a file, or a model folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_NAME
        if not path.is_file():
            raise TokenizerError(
                f"{path} is missing: pass a tokenizer.json or a model folder that has one "
                "(vesper train writes it beside the weights)")
        verify_file(path)
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path} is not a valid tokenizer.json ({exc})") from None
        return cls(tok)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json atomically (a folder gets ``folder/tokenizer.json``), and
        beside a ``tokenizer.json`` the files transformers' AutoTokenizer reads
        (:meth:`hf_files`)."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / TOKENIZER_NAME
        out = atomic_write_file(path, with_bos_processor(self.to_json()).encode())
        if path.name == TOKENIZER_NAME:
            for name, data in self.hf_files(_max_len_beside(path.parent)).items():
                atomic_write_file(path.parent / name, data)
        return out

    def hf_files(self, model_max_length: int | None = None) -> dict[str, bytes]:
        """See :func:`hf_tokenizer_files`."""
        return hf_tokenizer_files(model_max_length)

    def to_json(self) -> str:
        return self._tok.to_str(pretty=False)

    # --- encoding ------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> Tokenizer:
        return self._tok

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_spelled_specials(self, text: str) -> list[int]:
        """Like :meth:`encode`, but a special token's name in ``text`` ("<|eos|>") becomes
        that token (as Hugging Face tokenizers do): for clients that look a special
        token's id up by tokenizing its name. Prompts never go through this."""
        ids: list[int] = []
        for piece in _SPECIAL_SPLIT.split(text):
            tid = self._tok.token_to_id(piece) if piece in SPECIAL_TOKENS else None
            ids += [tid] if tid is not None else self.encode(piece) if piece else []
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(idx)

    def token_bytes(self, idx: int) -> bytes:
        """The raw bytes a token stands for (byte-level BPE), for UTF-8-safe streaming."""
        token = self._tok.id_to_token(idx)
        if token is None or token in SPECIAL_TOKENS:
            return b""
        return bytes(_BYTE_DECODER[c] for c in token)

    @property
    def special_ids(self) -> set[int]:
        return {self.pad_id, self.bos_id, self.eos_id, *self.role_ids.values()}

    # --- chat ----------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                    ) -> ChatEncoding:
        """Apply the chat template; the loss mask covers assistant content and its EOS."""
        ids, mask = [self.bos_id], [0]
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise TokenizerError(
                    f"message {i} must be a dict with 'role' and 'content', got {msg!r}")
            role, content = msg["role"], msg["content"]
            if role not in self.role_ids:
                raise TokenizerError(
                    f"message {i} has role {role!r}: use one of {', '.join(self.role_ids)}")
            if not isinstance(content, str):
                raise TokenizerError(f"message {i} content must be a string, got "
                                     f"{type(content).__name__}")
            body = self.encode(content) + [self.eos_id]
            ids.append(self.role_ids[role])
            mask.append(0)
            ids.extend(body)
            mask.extend([1 if role == "assistant" else 0] * len(body))
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return ChatEncoding(ids, mask)

    def chat_prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Ids of a conversation ready for the assistant's next turn."""
        return self.encode_chat(messages, add_generation_prompt=True).ids

    def __repr__(self) -> str:
        return f"VesperTokenizer(vocab_size={self.vocab_size})"


def hf_tokenizer_files(model_max_length: int | None = None) -> dict[str, bytes]:
    """tokenizer_config.json and special_tokens_map.json for transformers' AutoTokenizer: a
    PreTrainedTokenizerFast over tokenizer.json with BOS/EOS/PAD, the role tokens, BOS added
    to plain text (as the SDK's prompts have it) and :data:`CHAT_TEMPLATE`."""
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
               "additional_special_tokens": list(ROLE_TOKENS.values())}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
              "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "padding_side": "left",
              "chat_template": CHAT_TEMPLATE}
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    return {TOKENIZER_CONFIG_NAME: json.dumps(config, indent=2).encode(),
            SPECIAL_TOKENS_MAP_NAME: json.dumps(special, indent=2).encode()}


def _add_bos_processor(tok: Tokenizer) -> None:
    # What add_special_tokens=True adds (transformers' default when it tokenizes a plain
    # prompt): BOS, as the SDK's prompts start. The SDK itself never asks for it.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])


def with_bos_processor(tokenizer_json: str) -> str:
    """``tokenizer_json`` with the BOS post-processor when it has none (see
    :func:`_add_bos_processor`); encoding in the SDK is unchanged."""
    try:
        if json.loads(tokenizer_json).get("post_processor") is not None:
            return tokenizer_json
        tok = Tokenizer.from_str(tokenizer_json)
        if tok.token_to_id(BOS) is None:
            return tokenizer_json
    except Exception:  # not a tokenizer we can read (tokenizers raises bare Exception)
        return tokenizer_json  # left as it is: loading it says what is wrong
    _add_bos_processor(tok)
    return tok.to_str(pretty=False)


def _max_len_beside(folder: Path) -> int | None:
    """max_seq_len from a model folder's config.json, if there is one to read."""
    try:
        value = json.loads((folder / "config.json").read_text()).get("max_seq_len")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte <-> printable-character table, which ByteLevel tokens are written in.
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}

