"""Stage `pipeline`: SFT -> RM -> PPO in DIR/sft, DIR/rm, DIR/ppo, each starting from the
previous stage's export (without `pipeline.rm`: SFT -> RL, the RL stage in
DIR/<pipeline.rl_dir> scored by Python reward functions); with `pipeline.iterations = n > 1`,
iterated RLHF:

  round 1:  DIR/sft -> DIR/rm -> DIR/ppo
  round r:  sample K responses per prompt from the current policy (DIR/ppo[_r-1]),
            label them (built-in task: the noisy gold labeller; otherwise the user's file
            `pipeline.comparisons[r-2]`), write DIR/round_r/comparisons.jsonl,
            retrain the RM from the previous one on them (DIR/rm_r), and continue PPO from
            the current policy with the new RM (DIR/ppo_r; the reference stays the SFT model).

With `pipeline.dpo` (configs/dpo.py) the policy stage is DPO: SFT -> DPO in DIR/sft, DIR/dpo;
with `pipeline.iterations = n > 1`, online (iterated) DPO:

  round r:  sample K responses per prompt from the current policy (pipeline.comparisons_per_round
            prompts: fresh built-in task prompts, or the DPO data's prompts), rank them (the
            built-in task's noisy gold labeller; a reward model `pipeline.label_rm`; or the
            user's file `pipeline.comparisons[r-2]`), write DIR/round_r/comparisons.jsonl and
            continue DPO from the current policy on them for pipeline.dpo_round_steps steps
            (DIR/dpo_r; the reference stays the SFT model)

A stage whose directory has a summary.json is finished and skipped; an unfinished one resumes
from its latest checkpoint. Re-running the same command therefore continues wherever it was
stopped (killed in any stage).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxrlhf import paths
from jaxrlhf.trainers import dpo, ppo, reward, sft


def _done(stage_dir: str):
    p = os.path.join(stage_dir, "summary.json")
    if paths.exists(p) and paths.isdir(os.path.join(stage_dir, "hf")):
        with paths.open(p) as f:
            return json.load(f)
    return None


def _stage_config(config, name: str):
    c = config.pipeline[name].copy_and_resolve_references()
    c.seed = config.seed
    c.mesh = config.mesh
    c.distributed = config.distributed
    return c


def _run_stage(module, cfg, stage_dir: str, log):
    summary = _done(stage_dir)
    if summary is not None:
        log(f"[pipeline] {os.path.basename(stage_dir)}: already finished, skipping")
        return summary
    log(f"[pipeline] {os.path.basename(stage_dir)}: running stage {cfg.stage}")
    summary, _ = module.run(cfg, stage_dir)
    return summary


def _sampling_prompts(data_block, r: int, n: int, tokenizer):
    """The prompts round r samples from: n fresh built-in task prompts (split "round<r>"), or
    n prompts of the data file's rows (a seeded choice per round); (dataset, prompt texts)."""
    from jaxrlhf.data import build_dataset
    from jaxrlhf.data.metarm import prompt_dataset
    if data_block.path == "synthetic":
        cfg = data_block.copy_and_resolve_references()
        cfg.format = "prompt"
        cfg.split = f"round{r}"
        cfg.synthetic.num_examples = n
        ds = build_dataset(cfg, tokenizer)
        return ds, [ds.examples[i]["prompt"] for i in range(len(ds.examples))]
    like = build_dataset(data_block, tokenizer)
    prompts = list(dict.fromkeys(ex["prompt"] for ex in like.examples if "prompt" in ex))
    rng = np.random.default_rng((r, len(prompts)))
    prompts = [prompts[i] for i in sorted(rng.permutation(len(prompts))[:n])]
    return prompt_dataset(prompts, like, tokenizer), prompts


def _rm_ranks(rm_dir: str, rows, like, tokenizer):
    """Ranks (0 = best, equal scores tie) of each row's responses by a reward model's score;
    the rows are tokenised with the options of the dataset `like` (the sampled prompts')."""
    from flax import nnx

    from jaxrlhf.data.metarm import meta_dataset
    from jaxrlhf.models import load_hf
    from jaxrlhf.models.reward import sequence_rewards
    from jaxrlhf.trainers.common import resolve_init_dir
    model = load_hf(resolve_init_dir(rm_dir), head="score")
    score = jax.jit(lambda p, t, m: sequence_rewards(p, nnx.graphdef(model), t, m))
    params = nnx.to_pure_dict(nnx.state(model))
    if not rows:
        return []
    ds = meta_dataset(rows, like, tokenizer)
    out = {}
    for b in ds.iterator(32, shuffle=False, drop_remainder=False, num_epochs=1):
        r = np.asarray(score(params, b["tokens"], b["attention_mask"]))
        for row, i in enumerate(b["index"]):
            v = b["valid"][row] > 0
            rr = r[row][v]
            out[int(i)] = [int(np.sum(rr > x)) for x in rr]
    return [dict(rows[i], ranks=out[i]) for i in range(len(rows)) if i in out]


def _new_comparisons(config, round_dir: str, policy_dir: str, r: int, *, data_block=None,
                     max_new_tokens=None, temperature=None):
    """Samples K responses per prompt from the policy and ranks them: the built-in task's
    noisy gold labeller, else the reward model `pipeline.label_rm`, else the user's file
    `pipeline.comparisons[r - 2]`. Writes round_dir/comparisons.jsonl; returns its path."""
    from jaxrlhf import rollout as ro
    from jaxrlhf.data import SyntheticTask, load_tokenizer
    from jaxrlhf.models import load_hf
    from jaxrlhf.trainers.common import read_meta
    pcfg = config.pipeline
    out = os.path.join(round_dir, "comparisons.jsonl")
    if paths.exists(out):
        return out
    if data_block is None:   # iterated RLHF: the PPO stage's prompts and sampling
        data_block = config.pipeline.ppo.data
        max_new_tokens = int(config.pipeline.ppo.ppo.max_new_tokens)
        temperature = float(config.pipeline.ppo.ppo.temperature)
    synthetic = data_block.path == "synthetic"
    label_rm = pcfg.get("label_rm", "")
    if not synthetic and not label_rm:
        files = list(pcfg.comparisons)
        if len(files) < r - 1:
            raise ValueError(f"Round {r} on user data needs a labeller: set pipeline.label_rm "
                             "(a reward-model dir) or pipeline.comparisons (one ranking file "
                             f"per round after the first); got {files}.")
        return files[r - 2]
    paths.makedirs(round_dir)
    tok = load_tokenizer(read_meta(os.path.join(policy_dir, "hf")).get("tokenizer", "byte"))
    ds, prompts = _sampling_prompts(data_block, r, int(pcfg.comparisons_per_round), tok)
    base_key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), r)
    samples = ro.sample_texts(
        load_hf(os.path.join(policy_dir, "hf"), head="lm"), ds,
        ro.Sampling(int(max_new_tokens), float(temperature)),
        k=int(pcfg.comparisons_k), batch_size=64, tokenizer=tok, skip_ids=(tok.eos_id,),
        key_fn=lambda i, j: jax.random.fold_in(jax.random.fold_in(base_key, i), j))
    rng = np.random.default_rng((int(config.seed), r))
    task = SyntheticTask.from_config(data_block.synthetic) if synthetic else None
    rows = []
    for index, responses in sorted(samples.items()):
        cands = dict(responses)   # text -> ended (dedup)
        if len(cands) < 2:
            continue   # nothing to compare
        texts = list(cands)
        row = {"prompt": prompts[index], "responses": texts}
        if not label_rm:
            row["ranks"] = [int(x) for x in task.label_ranking(
                prompts[index], texts, rng=rng, ended=[cands[t] for t in texts])]
        rows.append(row)
    if label_rm:
        rows = _rm_ranks(label_rm, rows, ds, tok)
    paths.write_bytes(out, "".join(json.dumps(row) + "\n" for row in rows).encode())
    return out


def _run_dpo(config, workdir: str, log):
    """SFT -> DPO, then rounds of online DPO (module docstring)."""
    pcfg = config.pipeline
    summaries = {}
    sft_dir = os.path.join(workdir, "sft")
    summaries["sft"] = _run_stage(sft, _stage_config(config, "sft"), sft_dir, log)
    c = _stage_config(config, "dpo")
    c.init_from = c.init_from or sft_dir
    policy_dir = os.path.join(workdir, pcfg.get("rl_dir", "dpo"))
    summaries[os.path.basename(policy_dir)] = _run_stage(dpo, c, policy_dir, log)
    base = config.pipeline.dpo
    for r in range(2, int(pcfg.iterations) + 1):
        new = os.path.join(workdir, f"dpo_{r}")
        c = _stage_config(config, "dpo")
        c.init_from = policy_dir
        c.dpo.ref_init = base.init_from or sft_dir
        c.train.steps = int(pcfg.dpo_round_steps)
        c.seed = int(config.seed) + r
        if _done(new) is None:
            comparisons = _new_comparisons(
                config, os.path.join(workdir, f"round_{r}"), policy_dir, r,
                data_block=base.data, max_new_tokens=int(pcfg.sample_max_new_tokens),
                temperature=float(pcfg.sample_temperature))
            c.data.path, c.data.format = comparisons, "ranking"
            c.data.max_k = max(int(base.data.max_k), int(pcfg.comparisons_k))
            if base.data.path == "synthetic":   # held out: the task's test rankings, as round 1
                c.eval_data = base.data.copy_and_resolve_references()
                c.eval_data.split = "test"
                c.eval_data.synthetic.num_examples = max(64, base.data.synthetic.num_examples
                                                         // 16)
                c.eval_data.on_bad_row = None
            else:
                c.eval_data = base.eval_data.copy_and_resolve_references()
        summaries[f"dpo_{r}"] = _run_stage(dpo, c, new, log)
        policy_dir = new
    return summaries


def run(config, workdir: str):
    log = print if jax.process_index() == 0 else (lambda *a: None)
    if "dpo" in config.pipeline:
        summaries = _run_dpo(config, workdir, log)
        _write(workdir, summaries, log)
        return summaries, None
    summaries = {}
    rl_name = config.pipeline.get("rl_dir", "ppo")
    sft_dir, rm_dir, ppo_dir = (os.path.join(workdir, n) for n in ("sft", "rm", rl_name))
    with_rm = "rm" in config.pipeline
    if not with_rm and int(config.pipeline.iterations) > 1:
        raise ValueError("pipeline.iterations > 1 (iterated RLHF) needs a reward-model stage "
                         "(pipeline.rm)")

    c = _stage_config(config, "sft")
    summaries["sft"] = _run_stage(sft, c, sft_dir, log)

    if with_rm:
        c = _stage_config(config, "rm")
        if not c.init_from:
            c.init_from = sft_dir
        summaries["rm"] = _run_stage(reward, c, rm_dir, log)

    c = _stage_config(config, "ppo")
    c.ppo.actor_init = c.ppo.actor_init or sft_dir
    if with_rm:
        c.ppo.reward_init = c.ppo.reward_init or rm_dir
    summaries[rl_name] = _run_stage(ppo, c, ppo_dir, log)

    policy_dir, cur_rm = ppo_dir, rm_dir
    for r in range(2, int(config.pipeline.iterations) + 1):
        round_dir = os.path.join(workdir, f"round_{r}")
        new_rm, new_ppo = os.path.join(workdir, f"rm_{r}"), os.path.join(workdir, f"ppo_{r}")
        if _done(new_rm) is None:
            comparisons = _new_comparisons(config, round_dir, policy_dir, r)
        else:
            comparisons = None
        c = _stage_config(config, "rm")
        c.init_from = cur_rm
        if comparisons is not None:
            c.data.path = comparisons
            c.data.format = "ranking"
            c.eval_data.path = ""
        c.train.steps = int(config.pipeline.rm_round_steps)
        c.rm.center_data = config.pipeline.rm.rm.center_data
        summaries[f"rm_{r}"] = _run_stage(reward, c, new_rm, log)
        c = _stage_config(config, "ppo")
        c.ppo.actor_init = policy_dir
        c.ppo.ref_init = sft_dir
        c.ppo.reward_init = new_rm
        c.ppo.critic_init = c.ppo.critic_init or new_rm
        c.seed = int(config.seed) + r
        summaries[f"ppo_{r}"] = _run_stage(ppo, c, new_ppo, log)
        policy_dir, cur_rm = new_ppo, new_rm

    _write(workdir, summaries, log)
    return summaries, None


def _write(workdir, summaries, log):
    if jax.process_index() == 0:
        with paths.open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summaries, f, indent=2, sort_keys=True, default=str)
        log(f"[pipeline] done: {os.path.join(workdir, 'summary.json')}")
