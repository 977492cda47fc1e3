"""The DPO stage: cached and in-step reference agree, exact resume, the reference cache file,
Plackett–Luce with gradient accumulation, MOSS per-pair labels, response masks, HF export."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer_utils import (checkpoint_state, load_config, metric_rows, read_jsonl, run_preempted,
                          shrink)

from jaxrlhf import objectives as obj
from jaxrlhf.data import build_dataset, load_tokenizer
from jaxrlhf.options import DPOOptions, parse
from jaxrlhf.trainers import common, dpo, runner


def _config(stage_dirs, arg="", steps=4, **opts):
    c = shrink(load_config("dpo", f"sft={stage_dirs['sft']}" + (f",{arg}" if arg else "")),
               steps=steps)
    c.train.lr = 1e-2            # large enough that 4 steps move the random tiny policy
    for k, v in opts.items():
        c.dpo[k] = v
    return c




def test_cached_and_in_step_reference_give_the_same_run(tmp_path, stage_dirs):
    cached, step = str(tmp_path / "cached"), str(tmp_path / "step")
    runner.run(_config(stage_dirs), cached)
    runner.run(_config(stage_dirs, ref_logps="step"), step)
    assert os.path.exists(os.path.join(cached, "ref_logps_train.npz"))
    assert os.path.exists(os.path.join(cached, "ref_logps_eval.npz"))
    assert not any(f.startswith("ref_logps") for f in os.listdir(step))
    a, b = metric_rows(cached), metric_rows(step)
    assert len(a) == 4
    for x, y in zip(a, b):
        for k in ("loss", "accuracy", "reward_margin", "chosen_logratio", "grad_norm"):
            np.testing.assert_allclose(x[k], y[k], rtol=2e-4, atol=1e-5)
    # the policy starts at the reference: s = 0 (up to float noise between the cache's
    # program and the eval's), loss log 2
    start = metric_rows(cached, "eval")[0]
    assert start["step"] == 0
    np.testing.assert_allclose(start["loss"], math.log(2), rtol=1e-6)
    assert abs(start["chosen_logratio"]) < 1e-4 and abs(start["rejected_logratio"]) < 1e-4
    assert a[-1]["loss"] < math.log(2) and a[-1]["chosen_logratio"] != 0
    pa, pb = checkpoint_state(cached)["params"], checkpoint_state(step)["params"]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), pa, pb)
    with open(os.path.join(cached, "summary.json")) as f:
        summary = json.load(f)
    assert summary["stage"] == "dpo" and summary["loss"] == "sigmoid"
    assert 0.0 <= summary["eval_accuracy"] <= 1.0


def test_resume_is_exact(tmp_path, stage_dirs, monkeypatch):
    cfg = _config(stage_dirs, steps=6)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    runner.run(cfg, full)
    assert run_preempted(cfg, part, monkeypatch) == 3
    jax.tree.map(np.testing.assert_array_equal, checkpoint_state(full), checkpoint_state(part))
    ra, rb = metric_rows(full), metric_rows(part)
    assert ra == rb and len(ra) == 6
    # the export is the final policy, and scores exactly as the trained params do
    from jaxrlhf.models import load_hf
    model = load_hf(os.path.join(full, "hf"), head="lm")
    from flax import nnx
    tok = load_tokenizer("byte")
    ds = build_dataset(cfg.data, tok)
    b = next(ds.iterator(4, shuffle=False))
    args = (jnp.asarray(b["tokens"]), jnp.asarray(b["attention_mask"]),
            jnp.asarray(b["prompt_len"]))
    got = dpo.response_logps(common.params_of(model), nnx.graphdef(model), *args)[0]
    want = dpo.response_logps(checkpoint_state(full)["params"], nnx.graphdef(model), *args)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_reference_cache_is_reused_extended_and_rebuilt_for_other_data(tmp_path, stage_dirs):
    cfg = _config(stage_dirs)
    tok = load_tokenizer("byte")
    ds = build_dataset(cfg.data, tok)
    mesh = common.mesh_from_config(cfg)
    calls = []

    def ref_fn(tokens, mask, prompt_len):
        calls.append(1)
        return (jnp.sum(tokens, -1).astype(jnp.float32), None)

    def batches(n):
        it = ds.iterator(8, shuffle=True, seed=3)
        return [next(it) for _ in range(n)]

    path, quiet = str(tmp_path / "ref.npz"), (lambda *a: None)
    first = dpo.RefCache.build(path, "fp-a", ref_fn, batches(12), mesh, quiet)
    assert len(calls) == 8 and len(first.logps) == 64     # 64 rows: epoch 2 is all cached
    again = dpo.RefCache.build(path, "fp-a", ref_fn, batches(12), mesh, quiet)
    assert len(calls) == 8                                # read back, nothing computed
    assert first.logps.keys() == again.logps.keys()
    dpo.RefCache.build(path, "fp-b", ref_fn, batches(3), mesh, quiet)
    assert len(calls) == 11                               # other data: recomputed
    b = batches(1)[0]
    got = first.add(dict(b))["ref_logps"]
    want = np.where(b["valid"] > 0, b["tokens"].sum(-1), 0)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="no reference log-prob for data row"):
        dpo.RefCache({}, path).add(dict(b))


def test_plackett_luce_with_gradient_accumulation(tmp_path, stage_dirs):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    runner.run(_config(stage_dirs, steps=2, ranking="plackett_luce"), one)
    c = _config(stage_dirs, steps=2, ranking="plackett_luce")
    c.train.grad_accum = 2
    runner.run(c, two)
    for x, y in zip(metric_rows(one), metric_rows(two)):
        for k in ("loss", "accuracy", "grad_norm", "chosen_logps"):
            np.testing.assert_allclose(x[k], y[k], rtol=2e-4, atol=1e-6)
    assert metric_rows(one)[0]["loss"] > 1.0          # K = 4: log 4! / ... > log 2 at the start


def test_strength_labels_flip_a_pair(stage_dirs):
    """A flipped pair (MOSS per-pair labels) is trained exactly as the pair with its ranks
    swapped; soft labels and margins are the RM's."""
    from jaxrlhf.models import load_hf
    from flax import nnx
    model = load_hf(os.path.join(stage_dirs["sft"], "hf"), head="lm")
    gd, params = nnx.graphdef(model), common.params_of(model)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 200, (3, 2, 12)).astype(np.int32)
    batch = {"tokens": tokens, "attention_mask": np.ones_like(tokens),
             "prompt_len": np.full((3, 2), 5, np.int32), "ranks": np.tile([0, 1], (3, 1)),
             "valid": np.ones((3, 2), np.int32),
             "ref_logps": rng.normal(size=(3, 2)).astype(np.float32) - 30}
    kw = dpo.loss_kw_of(parse(DPOOptions, {"beta": 0.5}, "dpo"))
    mu = np.zeros((3, 2, 2))
    mu[:, 0, 1] = [1.0, -2.0, 0.5]
    flip = np.zeros((3, 2, 2), bool)
    flip[:, 0, 1] = True
    eps, m = obj.pair_labels(mu, flip)
    flipped, _ = dpo.dpo_loss(params, gd, dict(batch, pair_smoothing=eps, pair_margin=m), **kw)
    swapped, _ = dpo.dpo_loss(params, gd, dict(batch, ranks=np.tile([1, 0], (3, 1))), **kw)
    np.testing.assert_allclose(float(flipped), float(swapped), rtol=1e-6)
    plain, _ = dpo.dpo_loss(params, gd, batch, **kw)
    assert abs(float(plain) - float(swapped)) > 1e-3


def test_response_mask_covers_the_response_and_its_eos(stage_dirs):
    from jaxrlhf.models import load_hf
    from flax import nnx
    model = load_hf(os.path.join(stage_dirs["sft"], "hf"), head="lm")
    cfg = _config(stage_dirs)
    ds = build_dataset(cfg.data, load_tokenizer("byte"))
    b = next(ds.iterator(4, shuffle=False))
    _, n = dpo.response_logps(common.params_of(model), nnx.graphdef(model),
                              jnp.asarray(b["tokens"]), jnp.asarray(b["attention_mask"]),
                              jnp.asarray(b["prompt_len"]))
    want = b["attention_mask"].sum(-1) - b["prompt_len"]
    np.testing.assert_array_equal(np.asarray(n)[b["valid"] > 0], want[b["valid"] > 0])
    ex = ds.examples[int(b["index"][0])]
    assert int(np.asarray(n)[0, 0]) == len(ex["responses"][0].encode()) + 1   # bytes + EOS


@pytest.mark.parametrize("opts, field", [
    ({"ranking": "plackett_luce", "loss": "ipo"}, "dpo.ranking"),
    ({"ranking": "plackett_luce", "label_smoothing": 0.1}, "dpo.label_smoothing"),
    ({"loss": "robust", "label_smoothing": 0.5}, "dpo.label_smoothing"),
    ({"flip_fraction": 0.1}, "dpo.strength_file"),
    ({"beta": 0.0}, "dpo.beta"),
    ({"ref_logps": "disk"}, "dpo.ref_logps"),
])
def test_option_errors_name_the_field(opts, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse(DPOOptions, opts, "dpo")


def test_pipeline_sft_then_dpo_then_an_online_round(tmp_path):
    """SFT -> DPO -> one online round: K samples of the DPO policy per fresh prompt, ranked by
    the built-in labeller, DPO continued from the policy with the SFT model as reference."""
    c = load_config("dpo", "rounds=2")
    shrink(c.pipeline.sft, steps=4)
    shrink(c.pipeline.dpo, steps=4)
    for name in ("sft", "dpo"):
        c.pipeline[name].train.eval_every = 0
    c.pipeline.comparisons_per_round = 8
    c.pipeline.dpo_round_steps = 2
    c.pipeline.sample_max_new_tokens = 8
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    d = str(tmp_path / "run")
    summaries, _ = runner.run(c, d)
    assert set(summaries) == {"sft", "dpo", "dpo_2"}
    rows = read_jsonl(os.path.join(d, "round_2", "comparisons.jsonl"))
    assert 0 < len(rows) <= 8
    for row in rows:
        assert len(row["responses"]) == len(row["ranks"]) >= 2
    with open(os.path.join(d, "dpo_2", "summary.json")) as f:
        s2 = json.load(f)
    assert s2["reference"] == os.path.join(d, "sft", "hf") and s2["steps"] == 2
    # re-running finds every stage finished
    again, _ = runner.run(c, d)
    assert again["dpo_2"]["wall_time_s"] == summaries["dpo_2"]["wall_time_s"]


def test_reward_model_labeller_ranks_by_score(stage_dirs):
    from jaxrlhf.trainers import pipeline
    c = load_config("dpo", f"sft={stage_dirs['sft']}")
    rows = [{"prompt": "sort: dcba", "responses": ["abcd", "dcba", "a", "abdc"]},
            {"prompt": "sort: ba", "responses": ["ab", "ba"]}]
    tok = load_tokenizer("byte")
    ranked = pipeline._rm_ranks(stage_dirs["rm"], rows, build_dataset(c.data, tok), tok)
    from flax import nnx
    from jaxrlhf.models import load_hf
    from jaxrlhf.models.reward import sequence_rewards
    rm = load_hf(os.path.join(stage_dirs["rm"], "hf"), head="score")
    for row, out in zip(rows, ranked):
        tok = load_tokenizer("byte")
        seqs = [tok.encode(row["prompt"]) + tok.encode(r) + [tok.eos_id]
                for r in row["responses"]]
        t = max(map(len, seqs))
        tokens = np.array([s + [tok.pad_id] * (t - len(s)) for s in seqs], np.int32)
        mask = np.array([[1] * len(s) + [0] * (t - len(s)) for s in seqs], np.int32)
        r = np.asarray(sequence_rewards(common.params_of(rm), nnx.graphdef(rm), tokens, mask))
        assert out["ranks"] == [int(np.sum(r > x)) for x in r]


def test_eight_device_mesh_gives_the_same_losses(tmp_path, stage_dirs):
    one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
    runner.run(_config(stage_dirs, steps=2), one)
    c = _config(stage_dirs, steps=2)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 4, 1
    runner.run(c, eight)
    # (accuracy at step 1 is not compared: policy == reference, so s = 0 up to the float noise
    # of two different programs and a tie's side is that noise)
    for x, y in zip(metric_rows(one), metric_rows(eight)):
        for k in ("loss", "grad_norm", "chosen_logratio", "reward_margin"):
            np.testing.assert_allclose(x[k], y[k], rtol=2e-4, atol=1e-5)
    for x, y in zip(metric_rows(one, "eval"), metric_rows(eight, "eval")):
        for k in ("loss", "accuracy", "chosen_logratio", "rejected_logratio"):
            np.testing.assert_allclose(x[k], y[k], rtol=2e-4, atol=1e-5)
    assert len(metric_rows(eight)) == 2 and len(metric_rows(eight, "eval")) == 2
