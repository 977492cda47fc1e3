"""The byte tokenizer, an HF tokenizer built locally (no downloads), chat templates, and the SFT
loss mask when pad == eos."""
import numpy as np
import pytest

from jaxrlhf.data import (ByteTokenizer, HFTokenizer, Tokenizer, build_dataset,
                          fallback_chat_template, load_tokenizer, tokenize_examples)

WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "Human", "Assistant", ":"]


def make_hf_tokenizer(path, *, with_pad=False, chat_template=None):
    """A tiny WordLevel tokenizer saved as a local HF directory (no network)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "<eos>"] + (["<pad>"] if with_pad else [])
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"pad_token": "<pad>"} if with_pad else {}
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="<eos>",
                                 **kwargs)
    if chat_template:
        hf.chat_template = chat_template
    hf.save_pretrained(str(path))
    return str(path)


def test_byte_tokenizer():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 256, 257, 258)
    text = "héllo ✓"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == text
    assert tok.decode(ids[:2]) == "h\ufffd"  # half a character decodes without raising
    assert tok.fingerprint() == ByteTokenizer().fingerprint()


def test_fallback_chat_template_is_prefix_consistent():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}]
    full = fallback_chat_template(msgs)
    assert full == "System: S\n\nHuman: U\n\nAssistant: A"
    assert fallback_chat_template(msgs[:-1], add_generation_prompt=True) + "A" == full


def test_hf_tokenizer_from_local_dir_pad_falls_back_to_eos(tmp_path):
    tok = load_tokenizer(make_hf_tokenizer(tmp_path / "tok"))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    assert tok.eos_id == 1 and tok.pad_id == tok.eos_id and tok.bos_id is None
    assert tok.vocab_size == 2 + len(WORDS)
    ids = tok.encode("the cat sat")
    assert ids == [2 + WORDS.index(w) for w in ("the", "cat", "sat")]  # no specials added
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == "the cat sat"
    assert tok.fingerprint() != ByteTokenizer().fingerprint()
    assert tok.fingerprint() == load_tokenizer(str(tmp_path / "tok")).fingerprint()
    padded = load_tokenizer(make_hf_tokenizer(tmp_path / "tok2", with_pad=True))
    assert padded.pad_id == 2 and padded.fingerprint() != tok.fingerprint()
    msgs = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == fallback_chat_template(
        msgs, add_generation_prompt=True)


def test_hf_chat_template_is_used_when_present(tmp_path):
    template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}assistant : {% endif %}")
    tok = load_tokenizer(make_hf_tokenizer(tmp_path / "tok", chat_template=template))
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    assert tok.apply_chat_template(msgs[:1], add_generation_prompt=True) == (
        "user : hello assistant : ")
    rows = tokenize_examples([{"messages": msgs}], tok, format="sft")
    (row,) = rows
    prompt_ids = tok.encode("user : hello assistant : ")
    assert row["tokens"].tolist() == prompt_ids + tok.encode("world") + [tok.eos_id]


def test_load_tokenizer_refuses_non_local_specs(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer("gpt2")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing"))


def test_sft_loss_mask_includes_eos_when_pad_equals_eos(tmp_path):
    tok = load_tokenizer(make_hf_tokenizer(tmp_path / "tok"))
    assert tok.pad_id == tok.eos_id
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "the cat", "response": "sat on the mat"}\n'
                    '{"prompt": "hello", "response": "world"}\n')
    data = build_dataset(path=str(path), format="sft", buckets=(8, 16), tokenizer=tok)
    batch = next(data.iterator(2, shuffle=False))
    assert batch["tokens"].shape == (2, 8)
    row0 = tok.encode("the cat") + tok.encode("sat on the mat") + [tok.eos_id]
    np.testing.assert_array_equal(batch["tokens"][0], row0 + [tok.pad_id] * (8 - len(row0)))
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(batch["attention_mask"][0], [1] * 7 + [0])
    # The EOS target is in the mask although it equals pad; padding (also == eos) is not.
    np.testing.assert_array_equal(batch["loss_mask"][1], [0, 1, 1, 0, 0, 0, 0, 0])
    assert batch["tokens"][1, 2] == tok.eos_id == batch["tokens"][1, 3]
