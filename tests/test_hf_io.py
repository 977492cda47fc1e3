"""Hugging Face I/O: logits parity with transformers (torch-free: references are stored in
tests/fixtures/hf, built by tools/make_hf_fixtures.py), exact export layout, round trips,
sharded loading and error messages."""
import functools
import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxrlhf.models import config_from_hf, config_to_hf, gather_last, load_hf, save_hf
from jaxrlhf.models.hf_io import read_safetensors_raw
from jaxrlhf.sharding import make_mesh

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
NAMES = ("llama_gqa_sharded", "llama_tied", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "gpt2",
         "llama_seqcls")


def _head(name):
    return "score" if "seqcls" in name else "lm"


def _ref(name):
    return dict(np.load(os.path.join(FIXTURES, name, "reference.npz")))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens_BxT, mask_BxT):
    return nnx.merge(graphdef, state)(tokens_BxT, mask_BxT)


def forward(model, tokens_BxT, mask_BxT):
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, tokens_BxT, mask_BxT))


def load_quiet(path, head, **kw):
    """load_hf that must not warn (a clean checkpoint has nothing to report)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_hf(path, head=head, **kw)


@functools.lru_cache(maxsize=None)
def fixture_model(name):
    return load_quiet(os.path.join(FIXTURES, name), _head(name))


def params(model):
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


def read_all(path):
    """name -> array of every tensor of a (possibly sharded) checkpoint directory."""
    out = {}
    for file in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        with safe_open(os.path.join(path, file), framework="numpy") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def assert_close(actual, ref, scale):
    np.testing.assert_allclose(actual, ref, rtol=1e-4, atol=1e-4 * scale)


# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    ref, model = _ref(name), fixture_model(name)
    scale = np.abs(ref["logits"]).max()
    out = forward(model, ref["tokens"], ref["mask"])
    assert out.shape == ref["logits"].shape
    assert_close(out, ref["logits"], scale)
    padded = forward(model, ref["padded_tokens"], ref["padded_mask"])
    real = ref["padded_mask"].astype(bool)
    assert_close(padded[real], ref["padded_logits"][real], scale)
    if _head(name) == "score":  # HF's own pooling: the score at the last real token
        assert_close(gather_last(padded, ref["padded_mask"]), ref["padded_pooled_scores"], scale)
        assert_close(gather_last(out, ref["mask"]), ref["pooled_scores"], scale)


@pytest.mark.parametrize("name", NAMES)
def test_export_is_hf_layout_and_round_trips(name, tmp_path):
    src = os.path.join(FIXTURES, name)
    model = fixture_model(name)
    save_hf(model, str(tmp_path))

    # Same tensors (names, shapes, dtypes, values) as transformers' own save_pretrained.
    ours, theirs = read_all(str(tmp_path)), read_all(src)
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as fh:
        assert fh.metadata() == {"format": "pt"}

    # Same config.json fields (ours may add legacy rope keys, torch_dtype, the score bias).
    with open(os.path.join(src, "config.json")) as fh:
        hf_config = json.load(fh)
    with open(tmp_path / "config.json") as fh:
        our_config = json.load(fh)
    for k, v in hf_config.items():
        if k != "transformers_version":
            assert our_config.get(k, "<missing>") == v, k
    assert os.path.exists(tmp_path / "generation_config.json") == os.path.exists(
        os.path.join(src, "generation_config.json"))

    # save -> load is exact.
    again = load_quiet(str(tmp_path), _head(name))
    assert again.cfg == model.cfg
    p0, p1 = params(model), params(again)
    assert p0.keys() == p1.keys()
    for k in p0:
        assert p0[k].dtype == p1[k].dtype
        np.testing.assert_array_equal(p0[k], p1[k], err_msg=str(k))
    ref = _ref(name)
    np.testing.assert_array_equal(forward(again, ref["tokens"], ref["mask"]),
                                  forward(model, ref["tokens"], ref["mask"]))


def test_sharded_index_checkpoint(tmp_path):
    path = os.path.join(FIXTURES, "llama_gqa_sharded")
    with open(os.path.join(path, "model.safetensors.index.json")) as fh:
        files = set(json.load(fh)["weight_map"].values())
    assert len(files) >= 2 and not os.path.exists(os.path.join(path, "model.safetensors"))
    model = fixture_model("llama_gqa_sharded")
    assert (model.cfg.n_kv_heads, model.cfg.tie_embeddings) == (2, False)
    assert dict(model.cfg.rope_scaling)["rope_type"] == "llama3"
    # Exporting over a sharded checkpoint removes the shards that would shadow the new file.
    dst = shutil.copytree(path, tmp_path / "m")
    save_hf(model, str(dst))
    assert sorted(f for f in os.listdir(dst) if "safetensors" in f) == ["model.safetensors"]
    for k, v in params(load_quiet(str(dst), "lm")).items():
        np.testing.assert_array_equal(v, params(model)[k])


def test_load_onto_mesh_is_sharded_and_matches():
    name = "llama_gqa_sharded"
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = load_quiet(os.path.join(FIXTURES, name), "lm", mesh=mesh)
    wq = sharded.layers.attn.wq.get_value()  # [L, D, H, Dh]: embed->fsdp, heads->tensor
    assert wq.sharding.mesh == mesh
    assert wq.sharding.shard_shape(wq.shape) == (2, 16, 2, 8)
    embed = sharded.embed.get_value()  # [V, D]: vocab->tensor, embed->fsdp
    assert embed.sharding.shard_shape(embed.shape) == (64, 16)
    ref = _ref(name)
    out = forward(sharded, ref["tokens"], ref["mask"])
    np.testing.assert_allclose(out, forward(fixture_model(name), ref["tokens"], ref["mask"]),
                               rtol=1e-5, atol=1e-5 * np.abs(out).max())
    for k, v in params(sharded).items():
        np.testing.assert_array_equal(v, params(fixture_model(name))[k])


# ----------------------------------------------------------------------------------------
def _copy_fixture(name, dst, edit_tensors=None, edit_config=None):
    """Copies a single-file fixture, optionally editing its tensors / config dicts."""
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    if edit_tensors is not None:
        tensors = read_all(str(dst))
        edit_tensors(tensors)
        save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    if edit_config is not None:
        with open(os.path.join(dst, "config.json")) as fh:
            config = json.load(fh)
        edit_config(config)
        with open(os.path.join(dst, "config.json"), "w") as fh:
            json.dump(config, fh)
    return str(dst)


def test_unknown_architecture_is_refused(tmp_path):
    path = _copy_fixture("llama_tied", tmp_path / "m", edit_config=lambda c: c.update(
        model_type="mamba", architectures=["MambaForCausalLM"]))
    with pytest.raises(ValueError, match="mamba") as err:
        load_hf(path)
    for supported in ("llama", "qwen2", "gpt2", "GPT2LMHeadModel"):
        assert supported in str(err.value)


def test_missing_config_points_to_local_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="local checkpoint directories"):
        load_hf(str(tmp_path))


def test_missing_tensor_is_named(tmp_path):
    gone = "model.layers.1.mlp.up_proj.weight"
    path = _copy_fixture("llama_tied", tmp_path / "m", edit_tensors=lambda t: t.pop(gone))
    with pytest.raises(ValueError, match="lacks 1 tensor") as err:
        load_hf(path)
    assert gone in str(err.value) and "model.safetensors" in str(err.value)


def test_sequence_classification_checkpoint_as_lm_needs_tied_embeddings(tmp_path):
    with pytest.raises(ValueError, match="lm_head.weight") as err:
        load_hf(os.path.join(FIXTURES, "llama_seqcls"), head="lm")
    assert "head='score'" in str(err.value)
    # Tied: a score-head export reloads as an LM whose head is the embedding matrix.
    with pytest.warns(UserWarning, match="freshly initialised"):
        rm = load_hf(os.path.join(FIXTURES, "llama_tied"), head="score")
    save_hf(rm, str(tmp_path))
    with pytest.warns(UserWarning, match=r"dropped: \['score.weight'\]"):
        lm = load_hf(str(tmp_path), head="lm")
    ref = _ref("llama_tied")
    assert_close(forward(lm, ref["tokens"], ref["mask"]), ref["logits"],
                 np.abs(ref["logits"]).max())


def test_causal_lm_checkpoint_as_score_head():
    with pytest.warns(UserWarning) as record:
        rm = load_hf(os.path.join(FIXTURES, "llama_gqa_sharded"), head="score")
    messages = " ".join(str(w.message) for w in record)
    assert "freshly initialised" in messages and "lm_head.weight" in messages
    assert rm.score_w.get_value().shape == (rm.cfg.d_model,)
    assert float(rm.score_b.get_value()) == 0.0
    for k, v in params(rm).items():  # the trunk is the checkpoint's
        if k[0] not in ("score_w", "score_b"):
            np.testing.assert_array_equal(v, params(fixture_model("llama_gqa_sharded"))[k])


def test_unexpected_tensors_warn_but_known_buffers_do_not(tmp_path):
    def add(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
        t["model.extra.weight"] = np.ones(3, np.float32)
    path = _copy_fixture("llama_tied", tmp_path / "m", edit_tensors=add)
    with pytest.warns(UserWarning, match="dropped") as record:
        load_hf(path)
    assert len(record) == 1
    assert "model.extra.weight" in str(record[0].message)
    assert "inv_freq" not in str(record[0].message)


def test_unprefixed_gpt2_checkpoint_with_mask_buffers(tmp_path):
    def strip(t):  # the original `gpt2` files: no "transformer." prefix, attn.bias buffers
        for k in list(t):
            t[k[len("transformer."):]] = t.pop(k)
        t["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
        t["h.0.attn.masked_bias"] = np.asarray(-1e4, np.float32)
    path = _copy_fixture("gpt2", tmp_path / "m", edit_tensors=strip)
    model = load_quiet(path, "lm")
    reference = params(fixture_model("gpt2"))
    for k, v in params(model).items():
        np.testing.assert_array_equal(v, reference[k])


def test_score_bias_round_trip_and_warning(tmp_path):
    rm = load_quiet(os.path.join(FIXTURES, "llama_seqcls"), "score")
    save_hf(rm, str(tmp_path / "zero"))  # a zero bias exports silently
    rm = load_quiet(os.path.join(FIXTURES, "llama_seqcls"), "score")
    rm.score_b[...] = 0.75
    with pytest.warns(UserWarning, match="jaxrlhf_score_bias"):
        save_hf(rm, str(tmp_path / "biased"))
    with open(tmp_path / "biased" / "config.json") as fh:
        assert json.load(fh)["jaxrlhf_score_bias"] == 0.75
    again = load_quiet(str(tmp_path / "biased"), "score")
    assert float(again.score_b.get_value()) == 0.75
    ref = _ref("llama_seqcls")
    assert_close(forward(again, ref["tokens"], ref["mask"]), ref["logits"] + 0.75,
                 np.abs(ref["logits"]).max())


def test_bfloat16_params_round_trip(tmp_path):
    model = load_quiet(os.path.join(FIXTURES, "llama_tied"), "lm", param_dtype="bfloat16",
                       dtype="bfloat16")
    assert model.cfg.param_dtype == "bfloat16" and model.cfg.dtype == "bfloat16"
    save_hf(model, str(tmp_path))
    with open(tmp_path / "config.json") as fh:
        assert json.load(fh)["dtype"] == "bfloat16"
    file = str(tmp_path / "model.safetensors")
    with safe_open(file, framework="numpy") as fh:
        for k in fh.keys():
            assert fh.get_slice(k).get_dtype() == "BF16"
            # The raw-bytes fallback reads exactly what safetensors reads.
            np.testing.assert_array_equal(read_safetensors_raw(file, k), fh.get_tensor(k))
    again = load_quiet(str(tmp_path), "lm", param_dtype="bfloat16")
    for k, v in params(model).items():
        assert v.dtype == params(again)[k].dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(v, params(again)[k])


# ----------------------------------------------------------------------------------------
def test_config_mapping_legacy_rope_keys_and_refusals():
    with open(os.path.join(FIXTURES, "llama_gqa_sharded", "config.json")) as fh:
        v5 = json.load(fh)
    legacy = {k: v for k, v in v5.items() if k != "rope_parameters"}
    rope = dict(v5["rope_parameters"])
    legacy["rope_theta"] = rope.pop("rope_theta")
    legacy["rope_scaling"] = dict(rope, type=rope.pop("rope_type"))  # transformers 4 style
    assert config_from_hf(legacy) == config_from_hf(v5)
    exported = config_to_hf(config_from_hf(v5), "lm")
    assert exported["rope_scaling"]["rope_type"] == "llama3"
    assert config_from_hf(exported) == config_from_hf(v5)

    with open(os.path.join(FIXTURES, "qwen2", "config.json")) as fh:
        qwen = json.load(fh)
    # Qwen2 sliding layers: from max_window_layers when config.json lists no layer_types
    no_types = {k: v for k, v in qwen.items() if k != "layer_types"}
    cfg = config_from_hf(dict(no_types, use_sliding_window=True, sliding_window=16,
                              max_window_layers=1))
    assert cfg.sliding_window == 16 and cfg.layer_types == ("full", "sliding")
    assert config_from_hf(config_to_hf(cfg)) == cfg
    with open(os.path.join(FIXTURES, "mistral", "config.json")) as fh:
        mistral = json.load(fh)
    with pytest.raises(ValueError, match="layer_types"):
        config_from_hf(dict(mistral, layer_types=["sliding_attention", "full_attention"]))
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        config_from_hf(dict(v5, rope_parameters={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(ValueError, match="cannot be expressed"):
        config_to_hf(config_from_hf(qwen).replace(out_bias=True))


FAMILY_FIXTURES = ("qwen3", "mistral", "gemma2", "gemma3")


@pytest.mark.parametrize("name", FAMILY_FIXTURES)
def test_greedy_tokens_match_transformers_generate(name):
    """jaxrlhf's greedy decoding (prefill + KV cache) of the left-padded batch gives the tokens
    HF generate gave, 8 of them: past every sliding window of the fixtures."""
    from jaxrlhf.generation import generate
    ref = _ref(name)
    want = ref["greedy_tokens"]
    model = fixture_model(name)
    res = generate(model, ref["padded_tokens"], ref["padded_mask"], jax.random.key(0),
                   max_new_tokens=want.shape[1], eos_id=-1, pad_id=0, greedy=True)
    np.testing.assert_array_equal(np.asarray(res.response_tokens), want)


@pytest.mark.parametrize("name", FAMILY_FIXTURES)
def test_score_head_of_every_family_round_trips(name, tmp_path):
    """A reward model of each family: exported with its family's SequenceClassification class
    and read back with the same scores."""
    with pytest.warns(UserWarning, match="score head is freshly initialised"):
        rm = load_hf(os.path.join(FIXTURES, name), head="score")   # a CausalLM checkpoint
    save_hf(rm, str(tmp_path))
    with open(tmp_path / "config.json") as fh:
        arch = json.load(fh)["architectures"][0]
    assert arch.endswith("ForSequenceClassification"), arch
    ref = _ref(name)
    want = forward(rm, ref["padded_tokens"], ref["padded_mask"])
    again = load_quiet(str(tmp_path), "score")
    np.testing.assert_array_equal(forward(again, ref["padded_tokens"], ref["padded_mask"]), want)


@pytest.mark.parametrize("name", FAMILY_FIXTURES)
def test_transformers_scores_our_reward_model_export(name, tmp_path):
    """Opt-in (needs torch, not in CI): transformers' AutoModelForSequenceClassification loads
    the export of each family's reward model and scores it identically at every position."""
    torch = pytest.importorskip("torch")
    with pytest.warns(UserWarning, match="score head is freshly initialised"):
        rm = load_hf(os.path.join(FIXTURES, name), head="score")
    save_hf(rm, str(tmp_path))
    with open(tmp_path / "config.json") as fh:
        arch = json.load(fh)["architectures"][0]
    ref = _ref(name)
    import transformers
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert type(hf).__name__ == arch
    toks = torch.as_tensor(ref["tokens"], dtype=torch.long)
    with torch.no_grad():
        per_pos = hf.score(hf.base_model(input_ids=toks).last_hidden_state)[..., 0].numpy()
    assert_close(per_pos, forward(rm, ref["tokens"], ref["mask"]), np.abs(per_pos).max())


@pytest.mark.parametrize("name", FAMILY_FIXTURES)
def test_transformers_loads_our_lm_export(name, tmp_path):
    """Opt-in (needs torch, not in CI): AutoModelForCausalLM.from_pretrained on our export of
    each new family gives our logits on the left-padded batch."""
    torch = pytest.importorskip("torch")
    import transformers
    model = fixture_model(name)
    save_hf(model, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ref = _ref(name)
    mask = torch.as_tensor(ref["padded_mask"], dtype=torch.long)
    pos = torch.clamp(torch.cumsum(mask, -1) - 1, min=0)
    with torch.no_grad():
        got = hf(input_ids=torch.as_tensor(ref["padded_tokens"], dtype=torch.long),
                 attention_mask=mask, position_ids=pos).logits.numpy()
    want = forward(model, ref["padded_tokens"], ref["padded_mask"])
    real = ref["padded_mask"].astype(bool)
    assert_close(got[real], want[real], np.abs(want).max())
