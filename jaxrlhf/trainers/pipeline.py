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

A stage whose directory has a summary.json is finished and skipped; an unfinished one resumes
from its latest checkpoint. Re-running the same command therefore continues wherever it was
stopped (killed in any stage).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxrlhf.trainers import ppo, reward, sft


def _done(stage_dir: str):
    p = os.path.join(stage_dir, "summary.json")
    if os.path.exists(p) and os.path.isdir(os.path.join(stage_dir, "hf")):
        with open(p) as f:
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


def _new_comparisons(config, round_dir: str, policy_dir: str, r: int):
    """Samples K responses per prompt from the policy and labels them (gold labeller)."""
    from jaxrlhf import rollout as ro
    from jaxrlhf.data import SyntheticTask, build_dataset, load_tokenizer
    from jaxrlhf.models import load_hf
    pcfg = config.pipeline
    out = os.path.join(round_dir, "comparisons.jsonl")
    if os.path.exists(out):
        return out
    ppo_cfg = config.pipeline.ppo
    if ppo_cfg.data.path != "synthetic":
        files = list(pcfg.comparisons)
        if len(files) < r - 1:
            raise ValueError(f"Iterated RLHF round {r} on user data needs a comparisons file: "
                             f"set pipeline.comparisons (one ranking/preference file per "
                             f"round after the first); got {files}.")
        return files[r - 2]
    os.makedirs(round_dir, exist_ok=True)
    task = SyntheticTask.from_config(ppo_cfg.data.synthetic)
    tok = load_tokenizer("byte")
    prompts_cfg = ppo_cfg.data.copy_and_resolve_references()
    prompts_cfg.split = f"round{r}"
    prompts_cfg.synthetic.num_examples = int(pcfg.comparisons_per_round)
    ds = build_dataset(prompts_cfg, tok)
    base_key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), r)
    samples = ro.sample_texts(
        load_hf(policy_dir, head="lm"), ds,
        ro.Sampling(int(ppo_cfg.ppo.max_new_tokens), float(ppo_cfg.ppo.temperature)),
        k=int(pcfg.comparisons_k), batch_size=64, tokenizer=tok,
        key_fn=lambda i, j: jax.random.fold_in(jax.random.fold_in(base_key, i), j))
    rng = np.random.default_rng((int(config.seed), r))
    rows = []
    for index, responses in samples.items():
        prompt = ds.examples[index]["prompt"]
        cands = dict(responses)   # text -> ended (dedup)
        if len(cands) < 2:
            continue   # nothing to compare
        texts = list(cands)
        ranks = task.label_ranking(prompt, texts, rng=rng, ended=[cands[t] for t in texts])
        rows.append({"prompt": prompt, "responses": texts, "ranks": [int(x) for x in ranks]})
    with open(out + ".tmp", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(out + ".tmp", out)
    return out


def run(config, workdir: str):
    log = print if jax.process_index() == 0 else (lambda *a: None)
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

    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summaries, f, indent=2, sort_keys=True, default=str)
        log(f"[pipeline] done: {os.path.join(workdir, 'summary.json')}")
    return summaries, None
