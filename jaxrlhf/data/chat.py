"""Chat-shaped data through the tokenizer's own chat template.

When `data.chat_template` is "auto" (the default) and the tokenizer brings a chat template
(`Tokenizer.has_chat_template`), every chat-shaped example is rendered with it:

  * `messages` rows (SFT conversations, PPO prompts),
  * HH-RLHF transcripts (formats hh, hh_sft, hh_prompt): "\\n\\nHuman: ..." / "\\n\\nAssistant: ..."
    turns are parsed into user / assistant messages (`hh_messages`).

Token ids are those of `tokenizer.apply_chat_template(messages)`: the prompt is the rendering
of the history with the generation prompt, the response is what the full conversation adds
after it, up to and including its first stop id (`Tokenizer.stop_ids`: EOS or the template's
end-of-turn token). Whatever the template writes after that token (e.g. a newline) is not
part of the response, because generation stops at it too; a response whose rendering has no
stop id gets EOS appended. Plain {prompt, response} rows stay raw text, and `data.chat_template
= "raw"` keeps every row raw (the HH text as it is, EOS appended), as for tokenizers without
a template. With a template, `data.add_bos` is not applied: the template decides about BOS.

A conversation the template cannot represent is a bad row (never a silent drop): reasons
"bad_transcript" (an HH text that does not parse into turns), "chat_template_error" (the
template raised, e.g. roles that must alternate) and "template_not_prefix" (the rendered
history is not a prefix of the rendered conversation, so prompt and response cannot be split).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from jaxrlhf.data.formats import _Bad

CHAT_MODES = ("auto", "raw")

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def hh_messages(prompt: str) -> list[dict[str, str]]:
    """The turns of an HH-RLHF prompt ("\\n\\nHuman: a\\n\\nAssistant: b ... \\n\\nAssistant:")
    as [{role, content}] messages; the final, empty Assistant turn (the generation prompt) is
    dropped. Raises `_Bad("bad_transcript")` for text before the first turn, an empty turn, or a
    prompt that does not end with a user turn followed by the Assistant marker."""
    pieces = _HH_TURN.split(prompt)
    head, rest = pieces[0], pieces[1:]
    if head.strip():
        raise _Bad("bad_transcript", f"text before the first Human turn: {head[:40]!r}")
    turns = [(_HH_ROLE[rest[i]], rest[i + 1].strip()) for i in range(0, len(rest), 2)]
    if len(turns) < 2 or turns[-1] != ("assistant", "") or turns[-2][0] != "user":
        raise _Bad("bad_transcript", "the prompt must end with a Human turn and an empty "
                                     "Assistant turn")
    turns = turns[:-1]
    for i, (role, content) in enumerate(turns):
        if not content:
            raise _Bad("bad_transcript", f"turn {i} ({role}) is empty")
    return [{"role": r, "content": c} for r, c in turns]


def uses_template(tokenizer: Any, mode: str) -> bool:
    """True when chat-shaped rows are rendered with the tokenizer's template."""
    if mode not in CHAT_MODES:
        raise ValueError(f"data.chat_template must be one of {CHAT_MODES}, got {mode!r}")
    return mode == "auto" and bool(getattr(tokenizer, "has_chat_template", False))


def chat_prompt_messages(example: Mapping[str, Any], fmt: str) -> list[dict[str, str]] | None:
    """The prompt history of a chat-shaped example (None for a plain-text row)."""
    if "messages" in example:
        msgs = list(example["messages"])
        return msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
    if fmt.startswith("hh"):
        return hh_messages(example["prompt"])
    return None


def _render_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]], gen_prompt: bool):
    try:
        text = tokenizer.apply_chat_template(list(messages),
                                             add_generation_prompt=gen_prompt)
    except Exception as e:  # noqa: BLE001  (jinja raises TemplateError, ValueError, ...)
        raise _Bad("chat_template_error", f"{type(e).__name__}: {e}") from None
    return tokenizer.encode(text)


def encode_chat(tokenizer: Any, history: Sequence[Mapping[str, str]],
                responses: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [response ids]) of `history` answered by each of `responses`.

    Prompt ids = apply_chat_template(history, add_generation_prompt=True); each response's ids
    = what apply_chat_template(history + [assistant response]) adds after the prompt, cut after
    its first stop id (EOS appended when it has none). With no responses, only the prompt.
    """
    prompt = _render_ids(tokenizer, history, True)
    stops = set(tokenizer.stop_ids)
    out = []
    for text in responses:
        full = _render_ids(tokenizer, [*history, {"role": "assistant", "content": text}],
                           False)
        if full[:len(prompt)] != prompt:
            raise _Bad("template_not_prefix", "the chat template renders the history "
                       "differently once the response is added, so prompt and response "
                       "cannot be split")
        resp = full[len(prompt):]
        end = next((i for i, t in enumerate(resp) if t in stops), None)
        resp = resp[:end + 1] if end is not None else resp + [tokenizer.eos_id]
        out.append(resp)
    return prompt, out


def encode_fitting(tokenizer: Any, history: Sequence[Mapping[str, str]],
                   responses: Sequence[str], limit: int, drop_turns: bool):
    """`encode_chat`, dropping the oldest turns (`drop_oldest_turn`) while the prompt plus the
    longest response exceeds `limit` tokens and `drop_turns` allows it. Returns (prompt ids,
    [response ids], whether turns were dropped); the result may still exceed `limit` when
    the last user turn alone does not fit."""
    dropped = False
    while True:
        prompt, out = encode_chat(tokenizer, history, responses)
        if len(prompt) + max((len(r) for r in out), default=0) <= limit or not drop_turns:
            return prompt, out, dropped
        shorter = drop_oldest_turn(history)
        if shorter is None:
            return prompt, out, dropped
        history, dropped = shorter, True


def drop_oldest_turn(history: Sequence[Mapping[str, str]]) -> list[dict[str, str]] | None:
    """`history` without its oldest exchange (system messages stay), so that it still starts
    with a user turn; None when only the last user turn (and system messages) remain."""
    system = [dict(m) for m in history if m["role"] == "system"]
    turns = [dict(m) for m in history if m["role"] != "system"]
    users = [i for i, m in enumerate(turns) if m["role"] == "user" and i > 0]
    if not users:
        return None
    return system + turns[users[0]:]
