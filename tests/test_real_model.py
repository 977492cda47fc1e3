"""Opt-in checks on a real pretrained chat model (SmolLM2-135M-Instruct).

    python tools/get_smollm2.py /tmp/smollm2
    JAXRLHF_SMOLLM2=/tmp/smollm2 python -m pytest -m real_model tests/test_real_model.py

Without JAXRLHF_SMOLLM2 every test here is skipped (CI never downloads weights); the HF
comparisons also need torch (`pip install torch`).
"""
import json
import os

import numpy as np
import pytest

SMOLLM2 = os.environ.get("JAXRLHF_SMOLLM2", "")
HH_TEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                       "shared", "data", "hh-rlhf-harmless", "test.jsonl.gz")

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(not os.path.isdir(SMOLLM2),
                                 reason="set JAXRLHF_SMOLLM2 to a tools/get_smollm2.py directory")]


@pytest.fixture(scope="module")
def tok():
    from jaxrlhf.data import load_tokenizer
    return load_tokenizer(SMOLLM2)


@pytest.fixture(scope="module")
def hh_rows(tok):
    from jaxrlhf.data import build_dataset
    if not os.path.exists(HH_TEST):
        pytest.skip("../shared HH-RLHF data absent")
    return build_dataset(dict(path=HH_TEST, format="hh", on_bad_row="skip", buckets=(512,)),
                         tok)


def test_hh_rows_equal_apply_chat_template(tok, hh_rows):
    from jaxrlhf.data.chat import hh_messages
    checked = 0
    for row in hh_rows.rows[:40]:
        ex = hh_rows.examples[row["index"]]
        refs = [list(tok.hf.apply_chat_template(
            hh_messages(ex["prompt"]) + [{"role": "assistant", "content": r.strip()}],
            tokenize=True)["input_ids"]) for r in ex["responses"]]
        if max(len(r) for r in refs) > 513:     # rows that needed truncation
            continue
        for seq, ref in zip(row["tokens"], refs):
            assert list(seq) == ref[:len(seq)] and ref[len(seq):] == [198]   # "\n"
        checked += 1
    assert checked >= 30


def test_reward_export_scores_equal_in_transformers(tmp_path, tok, hh_rows):
    torch = pytest.importorskip("torch")
    import jax
    from flax import nnx
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from jaxrlhf.models import load_hf
    from jaxrlhf.models.reward import sequence_rewards
    from jaxrlhf.trainers.common import export_stage_model
    with pytest.warns(UserWarning, match="score head is freshly initialised"):
        model = load_hf(SMOLLM2, head="score")
    model.score_b[...] = -0.4
    out = str(tmp_path / "rm")
    export_stage_model(model, out, tokenizer=tok, tokenizer_spec_=SMOLLM2, stage="rm")
    with open(os.path.join(out, "jaxrlhf.json")) as f:
        offset = json.load(f)["hf_score_offset"]
    seqs = [s for row in hh_rows.rows[:3] for s in row["tokens"]]
    texts = [tok.hf.decode(s) for s in seqs]
    hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    saved = AutoTokenizer.from_pretrained(out)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    for side in ("right", "left"):
        saved.padding_side = side
        enc = saved(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            theirs = hf(**enc).logits[:, 0].numpy() + offset
        ours = np.asarray(jax.jit(sequence_rewards, static_argnums=1)(
            params, graphdef, enc["input_ids"].numpy().astype(np.int32),
            enc["attention_mask"].numpy().astype(np.int32)))
        np.testing.assert_allclose(theirs, ours, atol=2e-3, rtol=1e-3)


def test_greedy_generation_stops_at_end_of_turn(tok):
    import jax

    from jaxrlhf.generation import generate
    from jaxrlhf.models import load_hf
    model = load_hf(SMOLLM2)
    ids = tok.hf.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                     add_generation_prompt=True, tokenize=True)["input_ids"]
    toks = np.asarray([ids], np.int32)
    res = generate(model, toks, np.ones_like(toks), jax.random.key(0), max_new_tokens=48,
                   eos_id=tok.stop_ids, pad_id=tok.pad_id, greedy=True)
    n = int(res.lengths[0])
    assert bool(res.finished[0]) and int(res.response_tokens[0, n - 1]) in tok.stop_ids
    assert "4" in tok.decode(np.asarray(res.response_tokens[0, :n]))


def test_dpo_response_logprobs_equal_transformers(tok, hh_rows):
    """The DPO stage's per-response log-probs (its implicit reward before β and the reference)
    on HH pairs rendered with the chat template equal transformers' on the same tokens."""
    torch = pytest.importorskip("torch")
    import jax.numpy as jnp
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from jaxrlhf.models import load_hf
    from jaxrlhf.trainers.common import params_of
    from jaxrlhf.trainers.dpo import response_logps
    model = load_hf(SMOLLM2, head="lm")
    hf = AutoModelForCausalLM.from_pretrained(SMOLLM2, torch_dtype=torch.float32).eval()
    b = next(hh_rows.iterator(2, shuffle=False))
    t = int(b["attention_mask"].sum(-1).max())
    tokens, mask = b["tokens"][..., :t], b["attention_mask"][..., :t]
    got, n = response_logps(params_of(model), nnx.graphdef(model), jnp.asarray(tokens),
                            jnp.asarray(mask), jnp.asarray(b["prompt_len"]))
    with torch.no_grad():
        ids = torch.tensor(tokens.reshape(-1, t), dtype=torch.long)
        logits = hf(input_ids=ids, attention_mask=torch.tensor(mask.reshape(-1, t))).logits
        lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    pos = np.arange(1, t)[None]
    resp = (pos >= b["prompt_len"].reshape(-1, 1)) & (mask.reshape(-1, t)[:, 1:] > 0)
    want = (lp.numpy() * resp).sum(-1).reshape(tokens.shape[:2])
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-3)
    np.testing.assert_array_equal(np.asarray(n), resp.sum(-1).reshape(tokens.shape[:2]))
