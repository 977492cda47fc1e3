"""Tokenizers: one small protocol, a built-in byte-level tokenizer and an HF wrapper.

Every tokenizer used by jaxrlhf has this interface (`Tokenizer` below):

  encode(text) -> list[int]        no special tokens added (the batcher appends EOS itself)
  decode(ids) -> str               pad / bos / eos ids are skipped
  vocab_size, pad_id, eos_id, bos_id (bos_id may be None for HF tokenizers)
  stop_ids                         ids that end a generated response: eos_id plus a chat
                                   template's end-of-turn tokens (generation_config.json's
                                   eos_token_id, which may be a list)
  has_chat_template                the tokenizer brings its own chat template
  apply_chat_template(messages, add_generation_prompt=False) -> str
  fingerprint() -> str             stable hash of the vocabulary and the bos / eos / stop ids;
                                   trainers compare it across policy / reference / reward model.
                                   The pad id is not part of it: padding never reaches a result
                                   (masks come from the batcher), and a reward-model export may
                                   carry a different pad token (see `jaxrlhf.models.hf_io`).

`load_tokenizer("byte")` gives `ByteTokenizer`; any other spec is a local directory loaded with
`transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False,
local_files_only=True)` (never downloads, never runs foreign code).

Pad == EOS is allowed (HF tokenizers without a pad token get `pad_id = eos_id`). That is safe only
because loss masks and attention masks always come from the batcher, never from `token != pad`.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

Message = Mapping[str, str]

# Roles accepted in chat messages, and the text the fallback template writes for each.
_FALLBACK_ROLE_PREFIX = {
    "system": "System: ",
    "user": "\n\nHuman: ",
    "assistant": "\n\nAssistant: ",
}
CHAT_ROLES = tuple(_FALLBACK_ROLE_PREFIX)


def fallback_chat_template(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The chat template used when a tokenizer has none (always, for `ByteTokenizer`).

    HH-RLHF style: system -> "System: {c}", user -> "\\n\\nHuman: {c}",
    assistant -> "\\n\\nAssistant: {c}", concatenated; the generation prompt is "\\n\\nAssistant: ".
    It is prefix-consistent: template(m[:-1], add_generation_prompt=True) + m[-1]["content"]
    == template(m) when m[-1] is an assistant turn, so SFT prompt/response split cleanly.
    """
    parts = [_FALLBACK_ROLE_PREFIX[m["role"]] + m["content"] for m in messages]
    if add_generation_prompt:
        parts.append(_FALLBACK_ROLE_PREFIX["assistant"])
    return "".join(parts)


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, generation and trainers rely on."""

    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int | None
    stop_ids: tuple[int, ...]
    has_chat_template: bool

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: Sequence[Message],
                            add_generation_prompt: bool = False) -> str: ...

    def fingerprint(self) -> str: ...


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, pad = 256, bos = 257, eos = 258.

    vocab_size = 259 (the model presets use vocab 259). Needs no files. `decode` drops the special
    ids and replaces invalid UTF-8 (a model can emit half a multi-byte character) with U+FFFD.
    """

    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258
    stop_ids = (258,)
    has_chat_template = False

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[Message],
                            add_generation_prompt: bool = False) -> str:
        return fallback_chat_template(messages, add_generation_prompt)

    def fingerprint(self) -> str:
        return _hash({"kind": "byte-v2", "vocab_size": self.vocab_size, "bos": self.bos_id,
                      "eos": self.eos_id})

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259, pad=256, bos=257, eos=258)"


class HFTokenizer:
    """A `transformers` tokenizer behind the jaxrlhf protocol.

    `pad_id` falls back to `eos_id` when the tokenizer has no pad token. A tokenizer without an
    EOS token is refused (responses must end with EOS). `vocab_size` is `len(tokenizer)`, which
    counts added tokens. `stop_ids` = eos_id plus `extra_stop_ids` (for a directory: the
    eos_token_id of its generation_config.json, an int or a list).
    """

    def __init__(self, hf_tokenizer: Any, extra_stop_ids: Sequence[int] = ()):
        self.hf = hf_tokenizer
        if hf_tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no EOS token; jaxrlhf needs one to end responses")
        self.eos_id = int(hf_tokenizer.eos_token_id)
        pad = hf_tokenizer.pad_token_id
        self.pad_id = self.eos_id if pad is None else int(pad)
        bos = hf_tokenizer.bos_token_id
        self.bos_id = None if bos is None else int(bos)
        self.vocab_size = len(hf_tokenizer)
        self.stop_ids = tuple(sorted({self.eos_id, *(int(i) for i in extra_stop_ids)}))
        self.has_chat_template = bool(getattr(hf_tokenizer, "chat_template", None))
        self._special = {i for i in (self.pad_id, self.bos_id, *self.stop_ids) if i is not None}

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids if int(i) not in self._special],
                              skip_special_tokens=False)

    def apply_chat_template(self, messages: Sequence[Message],
                            add_generation_prompt: bool = False) -> str:
        if getattr(self.hf, "chat_template", None):
            return self.hf.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
        return fallback_chat_template(messages, add_generation_prompt)

    def fingerprint(self) -> str:
        return _hash({"kind": "hf-v2", "vocab": sorted(self.hf.get_vocab().items()),
                      "bos": self.bos_id, "eos": self.eos_id, "stop": list(self.stop_ids)})

    def __repr__(self) -> str:
        return (f"HFTokenizer({type(self.hf).__name__}, vocab_size={self.vocab_size}, "
                f"pad={self.pad_id}, bos={self.bos_id}, eos={self.eos_id}, "
                f"stop={list(self.stop_ids)}, chat_template={self.has_chat_template})")


def generation_stop_ids(path: str) -> list[int]:
    """eos_token_id of `path`/generation_config.json (an int or a list; [] when absent)."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return []
    with open(file) as f:
        value = json.load(f).get("eos_token_id")
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def load_tokenizer(spec: str | Tokenizer) -> Tokenizer:
    """`"byte"` -> `ByteTokenizer()`; a local directory -> `HFTokenizer`; a tokenizer -> itself."""
    if not isinstance(spec, str):
        return spec
    if spec == "byte":
        return ByteTokenizer()
    from jaxrlhf.paths import local_copy
    spec = local_copy(spec)
    if not os.path.isdir(spec):
        raise FileNotFoundError(
            f"tokenizer spec {spec!r} is neither 'byte' nor a local directory (jaxrlhf loads HF "
            "tokenizers from local files only)")
    from transformers import AutoTokenizer  # lazy: heavy import, only for HF tokenizers

    return HFTokenizer(AutoTokenizer.from_pretrained(spec, trust_remote_code=False,
                                                     local_files_only=True),
                       extra_stop_ids=generation_stop_ids(spec))
