"""Low-rank adapters: the adapted projection against float64 NumPy, zero start, merge, split,
sharding; every stage trains only the adapters (and a score head) on a frozen base, resumes
exactly, exports merged and in PEFT's format, and continues from a PEFT adapter."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer_utils import (checkpoint_state, load_config, metric_rows, run_preempted, shrink,
                          shrink_ppo)

from jaxrlhf.models import init_model, load_hf, lora, preset
from jaxrlhf.models.transformer import _adapted
from jaxrlhf.options import LoRAOptions, parse
from jaxrlhf.trainers import common, runner

TINY = dict(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=64)


def _perturbed(model, seed=1, scale=0.05):
    """`model` with every adapter weight moved (B is zero at the start)."""
    tr, base = lora.split(common.params_of(model))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(tr))))
    tr = jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape), tr)
    return nnx.merge(nnx.graphdef(model), lora.join(base, tr))


def _tokens():
    toks = np.arange(2 * 9).reshape(2, 9) % 250 + 3
    mask = np.ones_like(toks)
    mask[1, :3] = 0                       # a left-padded row
    return jnp.asarray(toks), jnp.asarray(mask)


@pytest.mark.parametrize("family,targets", [("llama", "all"), ("gpt2", ("fc", "proj", "q"))])
def test_adapters_start_at_the_base_and_merge_exactly(family, targets):
    kw = dict(TINY)
    if family == "gpt2":
        kw.update(family="gpt2", norm="layer", mlp="gelu", positions="learned", qkv_bias=True,
                  out_bias=True, mlp_bias=True, max_positions=64)
    base = init_model(preset("tiny", **kw), seed=3)
    adapted = lora.add_adapters(base, 4, 8.0, targets, seed=5)
    toks, mask = _tokens()
    want = np.asarray(base(toks, mask))
    np.testing.assert_array_equal(np.asarray(adapted(toks, mask)), want)   # B = 0
    moved = _perturbed(adapted)
    got = np.asarray(moved(toks, mask))
    assert np.abs(got - want).max() > 1e-2
    # merged weights W + (alpha / r) A B give the adapted model's logits
    merged = lora.merged(moved)
    assert merged.cfg.lora_rank == 0
    np.testing.assert_allclose(np.asarray(merged(toks, mask)), got, rtol=1e-4, atol=1e-5)
    # adapters off = the frozen base under the graph without adapters
    _, frozen = lora.split(common.params_of(moved))
    off = nnx.merge(lora.graphdef_of(lora.without_adapters(moved.cfg), "lm"), frozen)
    np.testing.assert_array_equal(np.asarray(off(toks, mask)), want)


def test_adapted_projection_matches_numpy_float64():
    model = _perturbed(lora.add_adapters(init_model(preset("tiny", **TINY)), 4, 6.0, "all"))
    layer = model.unstacked_layers()[1]
    x = np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32)
    for module, name, wname, xin in ((layer.attn, "q", "wq", x), (layer.mlp, "down", "w_down",
                                      np.random.default_rng(1).normal(size=(2, 5, 64)))):
        xin = np.asarray(xin, np.float32)
        w = np.asarray(getattr(module, wname)[...], np.float64)
        a = np.asarray(getattr(module, "lora_a_" + name)[...], np.float64)
        b = np.asarray(getattr(module, "lora_b_" + name)[...], np.float64)
        x64 = xin.astype(np.float64)
        want = (x64 @ w.reshape(w.shape[0], -1)
                + 6.0 / 4 * (x64 @ a.reshape(a.shape[0], -1)) @ b.reshape(4, -1))
        got = np.asarray(_adapted(module, jnp.asarray(xin), getattr(module, wname)[...], name))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the stacked deltas are (alpha / r) A B per layer
    a = np.asarray(model.layers.attn.lora_a_o[...], np.float64)     # [L, H, Dh, r]
    b = np.asarray(model.layers.attn.lora_b_o[...], np.float64)     # [L, r, D]
    want = 1.5 * np.einsum("lhdr,lre->lhde", a, b)
    np.testing.assert_allclose(np.asarray(lora.deltas(model)["o"]), want, rtol=1e-5,
                               atol=1e-7)


def test_split_keeps_adapters_and_score_head_trainable():
    model = lora.add_adapters(init_model(preset("tiny", **TINY), head="score"), 2, 4.0,
                              ("q", "v"))
    full = common.params_of(model)
    tr, base = lora.split(full)
    assert set(tr) == {"layers", "score_w", "score_b"}
    assert set(tr["layers"]["attn"]) == {"lora_a_q", "lora_b_q", "lora_a_v", "lora_b_v"}
    assert "mlp" not in tr["layers"] and "wq" in base["layers"]["attn"]
    assert "score_w" not in base
    joined = lora.join(base, tr)
    jax.tree.map(np.testing.assert_array_equal, joined, full)
    assert lora.adapter_count(tr) == 2 * (32 * 2 + 2 * 2 * 16 + 32 * 2 + 2 * 1 * 16)  # L = 2


def test_adapters_are_sharded_by_their_logical_axes():
    from jaxrlhf import sharding as shd
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    base = shd.init_sharded(preset("tiny", **TINY), "lm", seed=0, mesh=mesh)
    model = lora.add_adapters(base, 4, 8.0, "all", mesh=mesh)
    spec = lambda x: tuple(x.sharding.spec)
    assert spec(model.layers.attn.lora_a_q[...])[:2] == (None, "fsdp")      # [L, embed, r]
    assert "fsdp" in spec(model.layers.attn.lora_b_o[...])                  # [L, r, embed]
    assert model.layers.attn.wq[...] is base.layers.attn.wq[...]            # the base: no copy


def _sft_config(stage_dirs, steps=6, **lo):
    c = shrink(load_config("sft"), steps=steps)
    c.init_from = stage_dirs["sft"]
    c.train.lr = 1e-2
    c.lora.rank = 4
    for k, v in lo.items():
        c.lora[k] = v
    return c




def _leaf_names(tree):
    return {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_sft_trains_only_adapters_resumes_exactly_and_exports(tmp_path, stage_dirs,
                                                               monkeypatch):
    cfg = _sft_config(stage_dirs)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    summary, model = runner.run(cfg, full)
    assert run_preempted(cfg, part, monkeypatch) == 3
    a, b = checkpoint_state(full), checkpoint_state(part)
    jax.tree.map(np.testing.assert_array_equal, a, b)          # bitwise resume
    assert metric_rows(full) == metric_rows(part)
    # the checkpoint holds the adapters and their optimizer moments only
    assert all(n.startswith("lora_") for n in _leaf_names(a["params"]))
    n_adapt = lora.adapter_count(a["params"])
    assert summary["trainable_params"] == n_adapt < summary["num_params"] / 4
    mu = [x for p, x in jax.tree_util.tree_flatten_with_path(a["opt_state"])[0] if x.ndim]
    assert sum(x.size for x in mu) == 2 * n_adapt
    assert metric_rows(full)[-1]["loss"] < metric_rows(full)[0]["loss"]

    # the merged HF export and the PEFT adapter on the base give the trained model's logits
    toks, mask = _tokens()
    trained = np.asarray(model(toks, mask))
    exported = load_hf(os.path.join(full, "hf"))
    assert exported.cfg.lora_rank == 0
    np.testing.assert_allclose(np.asarray(exported(toks, mask)), trained, rtol=1e-4,
                               atol=1e-5)
    adapter = os.path.join(full, "adapter")
    with open(os.path.join(adapter, lora.PEFT_CONFIG)) as f:
        pc = json.load(f)
    assert pc["r"] == 4 and pc["task_type"] == "CAUSAL_LM"
    assert pc["base_model_name_or_path"] == os.path.join(stage_dirs["sft"], "hf")
    assert set(pc["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                         "up_proj", "down_proj"}
    from safetensors.numpy import load_file
    names = load_file(os.path.join(adapter, lora.PEFT_WEIGHTS))
    assert names["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (
        4, 32)
    assert names["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (64, 4)
    reloaded = lora.load_peft(load_hf(os.path.join(stage_dirs["sft"], "hf")), adapter)
    np.testing.assert_allclose(np.asarray(reloaded(toks, mask)), trained, rtol=1e-5,
                               atol=1e-6)

    # continuing from the adapter starts where the first run ended
    cont = _sft_config(stage_dirs, steps=2, adapter=adapter, rank=0)
    runner.run(cont, str(tmp_path / "cont"))
    np.testing.assert_allclose(metric_rows(str(tmp_path / "cont"), "eval")[0]["loss"],
                               metric_rows(full, "eval")[-1]["loss"], rtol=1e-5)


def test_bfloat16_base_and_eight_device_mesh(tmp_path, stage_dirs):
    one = _sft_config(stage_dirs, steps=2)
    runner.run(one, str(tmp_path / "one"))
    eight = _sft_config(stage_dirs, steps=2)
    eight.mesh.data, eight.mesh.fsdp = 2, 4
    runner.run(eight, str(tmp_path / "eight"))
    for x, y in zip(metric_rows(str(tmp_path / "one")), metric_rows(str(tmp_path / "eight"))):
        np.testing.assert_allclose(x["loss"], y["loss"], rtol=2e-5)
        np.testing.assert_allclose(x["grad_norm"], y["grad_norm"], rtol=2e-4)
    half = _sft_config(stage_dirs, steps=2, base_dtype="bfloat16")
    built = common.trainable(half, load_hf(os.path.join(stage_dirs["sft"], "hf")),
                             common.mesh_from_config(half))
    assert {x.dtype for x in jax.tree.leaves(built.base)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(built.params)} == {jnp.dtype(jnp.float32)}
    runner.run(half, str(tmp_path / "half"))
    r16, r32 = metric_rows(str(tmp_path / "half")), metric_rows(str(tmp_path / "one"))
    np.testing.assert_allclose(r16[0]["loss"], r32[0]["loss"], rtol=2e-2)
    exported = load_hf(os.path.join(str(tmp_path / "half"), "hf"))
    assert {x.dtype for x in jax.tree.leaves(common.params_of(exported))} == {
        jnp.dtype(jnp.float32)}


def test_reward_model_trains_adapters_and_score_head(tmp_path, stage_dirs):
    c = shrink(load_config("rm", f"init_from={stage_dirs['sft']}"), steps=4)
    c.train.lr = 1e-2
    c.lora.rank = 4
    c.lora.targets = "q,v"
    d = str(tmp_path / "rm")
    summary, model = runner.run(c, d)
    st = checkpoint_state(d)
    assert _leaf_names(st["params"]) == {"lora_a_q", "lora_b_q", "lora_a_v", "lora_b_v",
                                         "score_w", "score_b"}
    assert summary["trainable_params"] < summary["num_params"] / 10
    from jaxrlhf.models import sequence_rewards
    toks, mask = _tokens()
    want = np.asarray(sequence_rewards(common.params_of(model), nnx.graphdef(model), toks,
                                       mask))
    exported = load_hf(os.path.join(d, "hf"), head="score")
    got = np.asarray(sequence_rewards(common.params_of(exported), nnx.graphdef(exported),
                                      toks, mask))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    with open(os.path.join(d, "adapter", lora.PEFT_CONFIG)) as f:
        pc = json.load(f)
    assert pc["task_type"] == "SEQ_CLS" and pc["modules_to_save"] == ["score"]


def test_dpo_reference_is_the_base_with_adapters_off(tmp_path, stage_dirs):
    runs = {}
    for mode in ("cached", "step"):
        c = shrink(load_config("dpo", f"sft={stage_dirs['sft']}"), steps=3)
        c.train.lr = 1e-2
        c.lora.rank = 4
        c.dpo.ref_logps = mode
        runs[mode] = str(tmp_path / mode)
        runner.run(c, runs[mode])
    start = metric_rows(runs["cached"], "eval")[0]
    assert start["chosen_logratio"] == 0.0 and start["rejected_logratio"] == 0.0
    for x, y in zip(metric_rows(runs["cached"]), metric_rows(runs["step"])):
        for k in ("loss", "accuracy", "chosen_logratio", "grad_norm"):
            np.testing.assert_allclose(x[k], y[k], rtol=2e-4, atol=1e-5)
    assert metric_rows(runs["cached"])[-1]["chosen_logratio"] != 0.0


def test_ppo_trains_adapters_with_the_base_as_reference(tmp_path, stage_dirs, monkeypatch):
    cfg = shrink_ppo(load_config("ppo", f"sft={stage_dirs['sft']},rm={stage_dirs['rm']}"),
                     iterations=4)
    cfg.ppo.ptx_coef = 0.1
    cfg.lora.rank = 4
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    runner.run(cfg, full)
    assert run_preempted(cfg, part, monkeypatch) == 3
    a, b = checkpoint_state(full), checkpoint_state(part)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert _leaf_names(a["params"]["actor"]) <= {f"lora_{x}_{t}" for x in "ab"
                                                 for t in ("q", "k", "v", "o", "gate", "up",
                                                           "down")}
    # the critic: adapters on the reward model's trunk plus its score head
    assert {"score_w", "score_b"} <= _leaf_names(a["params"]["critic"])
    assert "wq" not in _leaf_names(a["params"]["critic"])
    rows = metric_rows(full)
    assert rows[0]["kl"] == 0.0                     # actor (B = 0) == reference (adapters off)
    assert all(r["first_ratio_mean"] == 1.0 for r in rows)
    assert rows[-1]["kl"] != 0.0
    assert os.path.exists(os.path.join(full, "adapter", lora.PEFT_WEIGHTS))


@pytest.mark.parametrize("field,value", [("rank", -1), ("alpha", 0.0), ("targets", "q,x"),
                                         ("targets", "all,q"), ("base_dtype", "float16")])
def test_option_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"lora.{field}"):
        parse(LoRAOptions, {field: value}, "lora")


def test_peft_adapter_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.read_peft_config(str(tmp_path))
    with open(tmp_path / lora.PEFT_CONFIG, "w") as f:
        json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True,
                   "target_modules": ["q_proj"]}, f)
    with pytest.raises(ValueError, match="use_dora"):
        lora.read_peft_config(str(tmp_path))
    with pytest.raises(ValueError, match="PEFT adapter export supports"):
        gpt = init_model(preset("tiny", **TINY, family="gpt2", norm="layer", mlp="gelu"))
        lora.save_peft(lora.add_adapters(gpt, 2, 2.0, "all"), str(tmp_path / "g"))


def test_peft_loads_our_adapter_with_the_same_logits(tmp_path, stage_dirs):
    """Opt-in: runs only where `peft` and `torch` are installed (not in CI)."""
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    import transformers
    base_dir = os.path.join(stage_dirs["sft"], "hf")
    toks, mask = _tokens()
    for head in ("lm", "score"):
        model = _perturbed(lora.add_adapters(load_hf(base_dir, head=head), 4, 8.0, "all"))
        out = str(tmp_path / head)
        lora.save_peft(model, out, base_model=base_dir)
        cls = (transformers.AutoModelForCausalLM if head == "lm"
               else transformers.AutoModelForSequenceClassification)
        kw = {} if head == "lm" else {"num_labels": 1}
        hf = peft.PeftModel.from_pretrained(cls.from_pretrained(base_dir, **kw), out).eval()
        with torch.no_grad():
            if head == "lm":
                got = hf(input_ids=torch.tensor(np.asarray(toks[:1]))).logits.numpy()
                want = np.asarray(model(toks[:1]))
            else:
                got = hf(input_ids=torch.tensor(np.asarray(toks[:1]))).logits.numpy()[:, 0]
                want = np.asarray(model(toks[:1]))[:, -1] - float(model.score_b[...])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_grpo_with_a_kl_loss_trains_adapters(tmp_path, stage_dirs):
    """The critic-free family (no critic): the actor's adapters, with the GRPO KL term in the
    loss against the base (adapters off)."""
    c = shrink_ppo(load_config("grpo", f"sft={stage_dirs['sft']}"), iterations=2)
    c.ppo.rollout_batch = 4
    c.ppo.samples_per_prompt = 4
    c.ppo.minibatch_size = 8
    c.ppo.reward_fns = "trainer_utils:distinct_chars_reward"
    c.ppo.kl_loss_coef = 0.1
    c.lora.rank = 4
    d = str(tmp_path / "grpo")
    runner.run(c, d)
    rows = metric_rows(d)
    assert rows[0]["kl"] == 0.0 and np.isfinite(rows[0]["kl_loss"])
    assert all(r["first_ratio_mean"] == 1.0 for r in rows)
    st = checkpoint_state(d)
    assert set(st["params"]) == {"actor"}
    assert all(n.startswith("lora_") for n in _leaf_names(st["params"]["actor"]))
    assert rows[-1]["kl"] != 0.0


def test_lora_config_variant():
    from jaxrlhf.config import LORA_LR_FACTOR
    for name, arg in (("sft", ""), ("ppo", ""), ("hh_pipeline", "model=/nonexistent")):
        plain = load_config(name, arg or None)
        adapted = load_config(name, (arg + "," if arg else "") + "lora=8")
        stages = ([(plain.pipeline[k], adapted.pipeline[k]) for k in ("sft", "rm", "ppo")]
                  if "pipeline" in plain else [(plain, adapted)])
        for p, a in stages:
            assert p.lora.rank == 0 and a.lora.rank == 8 and a.lora.alpha == 32.0
            assert a.train.lr == pytest.approx(p.train.lr * LORA_LR_FACTOR)
            if "ppo" in a:
                assert a.ppo.actor_lr == pytest.approx(p.ppo.actor_lr * LORA_LR_FACTOR)


def test_dpo_from_an_adapter_uses_the_starting_policy_as_reference(tmp_path, stage_dirs):
    """lora.adapter (a trained starting policy): the reference is base + those adapters, so
    the policy starts exactly at the reference (log-ratios 0), not at the bare base."""
    base_dir = os.path.join(stage_dirs["sft"], "hf")
    start = _perturbed(lora.add_adapters(load_hf(base_dir), 4, 8.0, "all"), scale=0.2)
    lora.save_peft(start, str(tmp_path / "adapter"), base_model=base_dir)
    c = shrink(load_config("dpo", f"sft={stage_dirs['sft']}"), steps=1)
    c.lora.adapter = str(tmp_path / "adapter")
    d = str(tmp_path / "dpo")
    runner.run(c, d)
    first = metric_rows(d, "eval")[0]
    assert first["chosen_logratio"] == 0.0 and first["rejected_logratio"] == 0.0
    plain = shrink(load_config("dpo", f"sft={stage_dirs['sft']}"), steps=1)
    plain.lora.rank = 4
    runner.run(plain, str(tmp_path / "plain"))
    assert abs(metric_rows(str(tmp_path / "plain"), "eval")[0]["chosen_logps"]
               - first["chosen_logps"]) > 1e-3   # the starting adapters moved the policy
