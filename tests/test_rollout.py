"""jaxrlhf.rollout: K samples per prompt (prompt-major rows), response log-probs under the
sampling distribution, reward sources (model, Python function), sampled texts per data row."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrlhf import rollout as ro
from jaxrlhf.data import build_dataset, load_tokenizer
from jaxrlhf.generation import generate
from jaxrlhf.models import init_model, preset, sequence_rewards

TINY = preset("tiny", d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=64)
TOK = load_tokenizer("byte")
SAMPLING = ro.Sampling(max_new_tokens=6, temperature=1.0, top_k=20)


@pytest.fixture(scope="module")
def policy():
    return init_model(TINY, head="lm", seed=0)


def _prompts(n=3):
    ds = build_dataset(dict(path="synthetic", format="prompt", buckets=(16,),
                            synthetic=dict(num_examples=n)), TOK)
    return ds, next(ds.iterator(n, shuffle=False))


def test_k_samples_per_prompt_are_prompt_major_and_logprobs_match(policy):
    _, b = _prompts()
    k, key = 4, jax.random.key(3)
    r = ro.sample(policy, b["prompt_tokens"], b["prompt_mask"], key, SAMPLING,
                  eos_id=TOK.stop_ids, pad_id=TOK.pad_id, k=k)
    p = b["prompt_tokens"].shape[1]
    assert r["tokens"].shape == (3 * k, p + SAMPLING.max_new_tokens)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(r["tokens"][i * k:(i + 1) * k, :p]),
                                      np.repeat(b["prompt_tokens"][i:i + 1], k, axis=0))
    assert len({tuple(np.asarray(t)) for t in r["response_tokens"][:k]}) > 1   # K samples
    # The same draw as generate on the repeated prompts; log-probs from a full forward equal
    # the sampler's.
    g = generate(policy, jnp.repeat(b["prompt_tokens"], k, 0), jnp.repeat(b["prompt_mask"], k, 0),
                 key, max_new_tokens=SAMPLING.max_new_tokens, eos_id=TOK.stop_ids,
                 pad_id=TOK.pad_id, **SAMPLING.logprob_kw())
    np.testing.assert_array_equal(np.asarray(g.tokens), np.asarray(r["tokens"]))
    graphdef, params = nnx.split(policy)
    lp = np.asarray(ro.response_logprobs(graphdef, params, r, SAMPLING))
    valid = np.asarray(r["response_mask"]) > 0
    np.testing.assert_allclose(lp[valid], np.asarray(g.logprobs)[valid], atol=2e-5, rtol=1e-5)


def test_reward_sources(policy):
    _, b = _prompts()
    r = ro.sample(policy, b["prompt_tokens"], b["prompt_mask"], jax.random.key(0), SAMPLING,
                  eos_id=TOK.stop_ids, pad_id=TOK.pad_id)
    rm = init_model(TINY, head="score", seed=1)
    graphdef, params = nnx.split(rm)
    params = nnx.to_pure_dict(params)
    np.testing.assert_array_equal(
        np.asarray(ro.ModelReward(graphdef)(params, r["tokens"], r["mask"])),
        np.asarray(sequence_rewards(params, graphdef, r["tokens"], r["mask"])))

    texts = ro.decode_responses(TOK, r["response_tokens"], r["response_mask"])
    stripped = ro.decode_responses(TOK, r["response_tokens"], r["response_mask"],
                                   skip_ids=(TOK.eos_id,))
    assert all(s == t.replace(TOK.decode([TOK.eos_id]), "") for s, t in zip(stripped, texts))


def test_sample_texts_covers_every_row_once(policy):
    ds, _ = _prompts(n=5)   # batches of 2: the last one is partial
    out = ro.sample_texts(policy, ds, SAMPLING, k=3, batch_size=2, tokenizer=TOK,
                          key_fn=lambda i, j: jax.random.fold_in(jax.random.key(i), j))
    assert sorted(out) == list(range(5))
    assert all(len(v) == 3 and all(isinstance(t, str) and isinstance(e, bool) for t, e in v)
               for v in out.values())
