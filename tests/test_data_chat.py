"""Chat templates: HH transcripts and messages rows rendered with the tokenizer's own template
(token ids equal `apply_chat_template`), stop ids, turn-boundary truncation, bad rows."""
import json

import numpy as np
import pytest
from chat_fixtures import llama3_like, reference_ids, smollm2_like

from jaxrlhf.data import build_dataset, load_tokenizer, tokenize_examples
from jaxrlhf.data.chat import drop_oldest_turn, hh_messages
from jaxrlhf.data.formats import LoadReport, _Bad

HH_PROMPT = ("\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water.\n\n"
             "Human: And then?\n\nAssistant:")
HH_TURNS = [{"role": "user", "content": "How do I bake bread?"},
            {"role": "assistant", "content": "Mix flour and water."},
            {"role": "user", "content": "And then?"}]


@pytest.fixture(scope="module", params=["smollm2", "llama3"])
def tok(request, tmp_path_factory):
    make = {"smollm2": smollm2_like, "llama3": llama3_like}[request.param]
    return load_tokenizer(make(tmp_path_factory.mktemp(request.param)))


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _cut_after_stop(ids, stops):
    end = next(i for i, t in enumerate(ids) if t in stops and i > 0)
    return ids[:end + 1]


def test_hh_messages_parses_turns():
    assert hh_messages(HH_PROMPT) == HH_TURNS
    for bad in ("Hi\n\nHuman: x\n\nAssistant:",           # text before the first turn
                "\n\nHuman: \n\nAssistant:",               # empty turn
                "\n\nHuman: x\n\nAssistant: y"):           # does not end with the marker
        with pytest.raises(_Bad) as e:
            hh_messages(bad)
        assert e.value.reason == "bad_transcript"


def test_drop_oldest_turn_keeps_system_and_starts_with_user():
    hist = [{"role": "system", "content": "S"}] + HH_TURNS
    assert drop_oldest_turn(hist) == [{"role": "system", "content": "S"}, HH_TURNS[2]]
    assert drop_oldest_turn([HH_TURNS[2]]) is None


def test_stop_ids_from_generation_config(tmp_path):
    smol = load_tokenizer(smollm2_like(tmp_path / "s"))
    assert smol.stop_ids == (smol.eos_id,) and smol.pad_id == smol.eos_id
    llama = load_tokenizer(llama3_like(tmp_path / "l"))
    eot = llama.hf.convert_tokens_to_ids("<|eot_id|>")
    assert llama.stop_ids == tuple(sorted({llama.eos_id, eot})) and eot != llama.eos_id
    assert llama.has_chat_template and smol.has_chat_template


def test_hh_sft_rows_equal_apply_chat_template(tok, tmp_path):
    path = _write(tmp_path / "hh.jsonl", [{"chosen": HH_PROMPT + " Let it rise.",
                                           "rejected": HH_PROMPT + " Eat it raw."}])
    ds = build_dataset(dict(path=path, format="hh_sft", buckets=(256,)), tok)
    (row,) = ds.rows
    full = reference_ids(tok.hf, HH_TURNS + [{"role": "assistant", "content": "Let it rise."}])
    prompt = reference_ids(tok.hf, HH_TURNS, add_generation_prompt=True)
    want = _cut_after_stop(full[len(prompt):], set(tok.stop_ids))
    assert list(row["tokens"]) == prompt + want
    assert list(row["tokens"]) == full[:len(prompt) + len(want)]     # a prefix of HF's ids
    assert row["tokens"][-1] in tok.stop_ids
    assert list(row["loss_mask"]) == [0] * len(prompt) + [1] * len(want)
    text = tok.hf.decode(row["tokens"])
    assert "Human:" not in text and "Let it rise." in text


def test_messages_with_system_prompt_and_rankings_and_prompts(tok, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    sft = _write(tmp_path / "sft.jsonl", [{"messages": msgs + [{"role": "assistant",
                                                                "content": "Hello!"}]}])
    (row,) = build_dataset(dict(path=sft, format="sft", buckets=(128,)), tok).rows
    full = reference_ids(tok.hf, msgs + [{"role": "assistant", "content": "Hello!"}])
    assert list(row["tokens"]) == full[:len(row["tokens"])]
    prompt = reference_ids(tok.hf, msgs, add_generation_prompt=True)
    assert list(row["tokens"][:len(prompt)]) == prompt and row["tokens"][-1] in tok.stop_ids

    ppo = _write(tmp_path / "p.jsonl", [{"messages": msgs}])
    (prow,) = build_dataset(dict(path=ppo, format="prompt", buckets=(64, 128)), tok).rows
    assert list(prow["prompt_tokens"]) == prompt

    hh = _write(tmp_path / "hh.jsonl", [{"chosen": HH_PROMPT + " Rise.",
                                         "rejected": HH_PROMPT + " Burn it."}])
    (rrow,) = build_dataset(dict(path=hh, format="hh", buckets=(256,)), tok).rows
    hprompt = reference_ids(tok.hf, HH_TURNS, add_generation_prompt=True)
    assert rrow["prompt_len"] == len(hprompt)
    for seq, resp in zip(rrow["tokens"], ("Rise.", "Burn it.")):
        full = reference_ids(tok.hf, HH_TURNS + [{"role": "assistant", "content": resp}])
        assert list(seq) == full[:len(seq)] and seq[-1] in tok.stop_ids
    (pp,) = build_dataset(dict(path=hh, format="hh_prompt", buckets=(256,)), tok).rows
    assert list(pp["prompt_tokens"]) == hprompt


def test_raw_mode_keeps_the_text(tok, tmp_path):
    path = _write(tmp_path / "hh.jsonl", [{"chosen": HH_PROMPT + " Rise.",
                                           "rejected": HH_PROMPT + " No."}])
    (row,) = build_dataset(dict(path=path, format="hh_sft", buckets=(256,),
                                chat_template="raw"), tok).rows
    assert list(row["tokens"]) == tok.encode(HH_PROMPT) + tok.encode(" Rise.") + [tok.eos_id]


def test_long_history_drops_oldest_turns_and_too_long_turn_is_counted(tmp_path):
    tok = load_tokenizer(smollm2_like(tmp_path / "s"))
    long_turns = "".join(f"\n\nHuman: question number {i} about bread\n\nAssistant: answer {i}"
                         for i in range(12))
    rows = [{"chosen": long_turns + "\n\nHuman: last?\n\nAssistant: yes",
             "rejected": long_turns + "\n\nHuman: last?\n\nAssistant: no"},
            {"chosen": "\n\nHuman: " + "bread " * 200 + "\n\nAssistant: ok",
             "rejected": "\n\nHuman: " + "bread " * 200 + "\n\nAssistant: no"}]
    path = _write(tmp_path / "hh.jsonl", rows)
    ds = build_dataset(dict(path=path, format="hh", buckets=(96,), on_bad_row="skip"), tok)
    assert ds.report.truncation_counts["prompt_turns_dropped"] == 1
    assert ds.report.counts_by_reason["too_long"] == 1 and len(ds.rows) == 1
    (row,) = ds.rows
    text = tok.hf.decode(row["tokens"][0][:row["prompt_len"]])
    assert "last?" in text and "question number 0 " not in text and len(row["tokens"][0]) <= 96
    assert "You are a helpful AI assistant" in text           # the system header is kept whole
    # PPO prompts: the same turn dropping against max_prompt_len.
    ps = build_dataset(dict(path=path, format="hh_prompt", buckets=(64,), max_prompt_len=64,
                            on_bad_row="skip"),
                       tok)
    assert ps.report.counts_by_reason["too_long"] == 1
    assert ps.report.truncation_counts["prompt_turns_dropped"] == 1
    assert len(ps.rows[0]["prompt_tokens"]) <= 64


def test_template_errors_are_named_rejects(tmp_path):
    from transformers import AutoTokenizer
    d = smollm2_like(tmp_path / "s")
    hf = AutoTokenizer.from_pretrained(d)
    hf.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                        "{{ raise_exception('no system role') }}{% endif %}"
                        "{{ m['content'] + '<|im_end|>' }}{% endfor %}")
    hf.save_pretrained(d)
    tok = load_tokenizer(d)
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]},
            {"messages": [{"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]}]
    path = _write(tmp_path / "m.jsonl", rows)
    ds = build_dataset(dict(path=path, format="sft", buckets=(64,), on_bad_row="skip"), tok)
    assert ds.report.counts_by_reason == {"chat_template_error": 1} and len(ds.rows) == 1
    with pytest.raises(ValueError, match=r"m.jsonl:1: chat_template_error"):
        build_dataset(dict(path=path, format="sft", buckets=(64,)), tok)


def test_byte_tokenizer_is_unchanged():
    rows = tokenize_examples([{"prompt": HH_PROMPT, "response": " Rise."}], "byte",
                             dict(format="hh_sft", buckets=(128,)), report=LoadReport("x"))
    assert bytes(np.asarray(rows[0]["tokens"][:-1], np.uint8)).decode() == HH_PROMPT + " Rise."
