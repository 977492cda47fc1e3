"""Reward-model export: transformers' AutoModelForSequenceClassification reads the score at the
same token as jaxrlhf, for single rows and padded batches, when the tokenizer has pad == eos
(chat models), and the post-hoc bias is recorded for HF users."""
import json
import os

import numpy as np
import pytest
from chat_fixtures import smollm2_like
from flax import nnx

from jaxrlhf.data import build_dataset, load_tokenizer
from jaxrlhf.models import init_model, load_hf, preset
from jaxrlhf.models.hf_io import score_pad_id
from jaxrlhf.models.reward import sequence_rewards
from jaxrlhf.trainers.common import META_FILE, export_stage_model

HH_ROWS = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
           {"chosen": "\n\nHuman: What is the capital of France?\n\nAssistant: Paris.",
            "rejected": "\n\nHuman: What is the capital of France?\n\nAssistant: Rome, I think, "
                        "or maybe Paris. It is hard to say."}]


def test_score_pad_id():
    assert score_pad_id(5, [2], [0]) == 5           # a dedicated pad token stays
    assert score_pad_id(2, [2], [None, 2, 0]) == 0  # pad == eos: the first non-stop candidate
    with pytest.raises(ValueError, match="stop id"):
        score_pad_id(2, [2, 3], [2, 3])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm_export")
    tok_dir = smollm2_like(root / "tok")
    tok = load_tokenizer(tok_dir)
    assert tok.pad_id == tok.eos_id                 # the case HF got wrong
    cfg = preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2,
                 n_kv_heads=1, mlp_dim=64, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id,
                 bos_token_id=tok.bos_id)
    model = init_model(cfg, head="score", seed=3)
    model.score_b[...] = 0.75                       # a post-hoc centring bias
    out = str(root / "hf")
    export_stage_model(model, out, tokenizer=tok, tokenizer_spec_=tok_dir, stage="rm")
    path = root / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HH_ROWS))
    ds = build_dataset(dict(path=str(path), format="hh", buckets=(128,)), tok)
    seqs = [s for row in ds.rows for s in row["tokens"]]     # rows ending with <|im_end|>
    assert all(s[-1] == tok.eos_id for s in seqs)
    return dict(model=model, out=out, tok=tok, seqs=seqs)


def _padded(seqs, pad, side):
    t = max(len(s) for s in seqs)
    ids = np.full((len(seqs), t), pad, np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


def _jax_rewards(model, ids, mask):
    graphdef, state = nnx.split(model)
    return np.asarray(sequence_rewards(nnx.to_pure_dict(state), graphdef, ids, mask))


def test_export_pad_makes_hf_read_the_jaxrlhf_position(exported):
    out, tok, seqs = exported["out"], exported["tok"], exported["seqs"]
    with open(os.path.join(out, "config.json")) as f:
        pad = json.load(f)["pad_token_id"]
    with open(os.path.join(out, META_FILE)) as f:
        meta = json.load(f)
    from transformers import AutoTokenizer
    saved = AutoTokenizer.from_pretrained(out)
    assert pad != tok.eos_id and pad == saved.pad_token_id == meta["hf_pad_token_id"]
    assert meta["hf_score_offset"] == pytest.approx(0.75)
    # The saved tokenizer still encodes like the training tokenizer, and the run's tokenizer
    # fingerprint (pad is not part of it) matches the export's.
    assert load_tokenizer(out).fingerprint() == tok.fingerprint() == meta["tokenizer_fingerprint"]
    for side in ("right", "left"):
        ids, mask = _padded(seqs, saved.pad_token_id, side)
        hf_pos = (np.arange(ids.shape[1]) * (ids != pad)).argmax(-1)      # HF's rule
        ours = ids.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=-1)       # last real token
        np.testing.assert_array_equal(hf_pos, ours)
        # With the tokenizer's own pad (== eos) HF would read one token early.
        old = (np.arange(ids.shape[1]) * (ids != tok.eos_id)).argmax(-1)
        assert np.all(old[(mask.sum(1) == mask.shape[1])] == ours[mask.sum(1) == mask.shape[1]]
                      - 1)


def test_exported_reward_model_reloads_with_the_same_scores(exported):
    model, out, seqs = exported["model"], exported["out"], exported["seqs"]
    ids, mask = _padded(seqs, 0, "right")
    back = load_hf(out, head="score")
    np.testing.assert_allclose(_jax_rewards(back, ids, mask), _jax_rewards(model, ids, mask),
                               rtol=1e-5, atol=1e-5)


def test_transformers_scores_equal_jaxrlhf(exported):
    torch = pytest.importorskip("torch")   # the HF side needs torch (not a test dependency)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model, out, seqs, tok = (exported[k] for k in ("model", "out", "seqs", "tok"))
    hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    saved = AutoTokenizer.from_pretrained(out)
    with open(os.path.join(out, META_FILE)) as f:
        offset = json.load(f)["hf_score_offset"]
    texts = [tok.hf.decode(s) for s in seqs]
    for side in ("right", "left"):
        saved.padding_side = side
        enc = saved(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        np.testing.assert_array_equal(
            np.sort(enc["attention_mask"].sum(-1).numpy()), np.sort([len(s) for s in seqs]))
        with torch.no_grad():
            hf_scores = hf(**enc).logits[:, 0].numpy() + offset
        ours = _jax_rewards(model, enc["input_ids"].numpy().astype(np.int32),
                            enc["attention_mask"].numpy().astype(np.int32))
        np.testing.assert_allclose(hf_scores, ours, rtol=1e-4, atol=1e-4)
    with torch.no_grad():   # single rows, no padding
        for s in seqs:
            one = hf(torch.tensor([list(s)])).logits[0, 0].item() + offset
            assert one == pytest.approx(float(_jax_rewards(model, np.asarray([s]),
                                                           np.ones((1, len(s)), np.int32))[0]),
                                        abs=1e-4)
