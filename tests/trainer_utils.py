"""Small shared helpers for trainer tests: tiny configs that compile fast on 2 CPU cores."""
import importlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def load_config(name: str, arg: str | None = None):
    return importlib.import_module(f"configs.{name}").get_config(arg)


def shrink(c, steps: int = 6, batch_size: int = 8):
    """Make any config tiny: 2-layer d=32 model, few steps, few examples, one mesh device."""
    if not c.init_from:
        c.model.d_model = 32
        c.model.n_layers = 2
        c.model.n_heads = 2
        c.model.n_kv_heads = 1
        c.model.mlp_dim = 64
    c.train.steps = steps
    c.train.batch_size = batch_size
    c.train.warmup_steps = 2
    c.train.log_every = 1
    c.train.eval_every = 3
    c.train.save_every = 3
    c.train.eval_batches = 2
    c.data.synthetic.num_examples = 64
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return c


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def metric_rows(stage_dir, split="train"):
    """The rows of a stage's metrics.jsonl of one split ("train" or "eval")."""
    return [r for r in read_jsonl(os.path.join(stage_dir, "metrics.jsonl"))
            if r.get("split", "train") == split]


def checkpoint_state(stage_dir):
    """The latest checkpointed train state of a stage, as NumPy arrays."""
    import jax
    import numpy as np

    from jaxrlhf.checkpoint import Checkpointer
    ckpt = Checkpointer(os.path.join(stage_dir, "checkpoints"))
    state, _ = ckpt.restore_raw()
    ckpt.close()
    return jax.tree.map(np.asarray, state)


def shrink_ppo(c, iterations: int = 3):
    """A tiny PPO config: 8 prompts per iteration, 2 minibatches, 8 new tokens."""
    c.ppo.iterations = iterations
    c.ppo.rollout_batch = 8
    c.ppo.minibatch_size = 4 * c.ppo.samples_per_prompt
    c.ppo.ppo_epochs = 2
    c.ppo.max_new_tokens = 8
    c.ppo.ptx_batch_size = 4
    c.ppo.eval_prompts = 8
    c.ppo.sample_every = 2
    c.train.log_every = 1
    c.train.save_every = 2
    c.train.eval_every = 0
    c.data.synthetic.num_examples = 64
    c.ptx_data.synthetic.num_examples = 64
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return c


def shrink_pipeline(c, steps: int = 4, iterations: int = 2):
    """A tiny pipeline config: SFT and RM stages of `steps` steps (eval at the end only), PPO of
    `iterations` iterations, one mesh device. test_configs.py and test_ppo.py's pipeline test
    use the same values, so the session's compilation cache compiles each stage once."""
    for name in ("sft", "rm"):
        if name in c.pipeline:   # a pipeline without an RM stage (Python rewards)
            shrink(c.pipeline[name], steps=steps)
            c.pipeline[name].train.eval_every = 0
    shrink_ppo(c.pipeline.ppo, iterations=iterations)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return c


def tiny_stage_dirs(root):
    """A random tiny SFT export and RM export (byte tokenizer), as PPO needs them."""
    from jaxrlhf.data import load_tokenizer
    from jaxrlhf.models import init_model, preset
    from jaxrlhf.trainers.common import export_stage_model
    cfg = preset("tiny", d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=64)
    tok = load_tokenizer("byte")
    out = {}
    for name, head, seed in (("sft", "lm", 0), ("rm", "score", 1)):
        d = os.path.join(root, name)
        export_stage_model(init_model(cfg, head=head, seed=seed), os.path.join(d, "hf"),
                           tokenizer=tok, tokenizer_spec_="byte", stage=name)
        out[name] = d
    return out


def poison_batches(monkeypatch, poisoned_position):
    """Makes the SFT loss NaN on every training batch whose position within its epoch
    satisfies `poisoned_position(position)`: such batches get byte 255 (never in the data) and
    the patched `sft.nll_sums` turns a batch holding it into a NaN loss."""
    import jax.numpy as jnp

    from jaxrlhf.trainers import common, sft

    orig = sft.nll_sums

    def poisoned(params, graphdef, batch):
        nll, n = orig(params, graphdef, batch)
        return jnp.where(jnp.any(batch["tokens"] == 255), jnp.nan, nll), n

    monkeypatch.setattr(sft, "nll_sums", poisoned)
    orig_iter = common.data_iterators

    def patched(config, train_ds, eval_ds, *, batch_size):
        it, ev = orig_iter(config, train_ds, eval_ds, batch_size=batch_size)
        at = it.batch_at

        def batch_at(epoch, position):
            b = at(epoch, position)
            if poisoned_position(position):
                b["tokens"] = b["tokens"].copy()
                b["tokens"][0, 1] = 255
            return b

        it.batch_at = batch_at
        return it, ev

    monkeypatch.setattr(common, "data_iterators", patched)


def flaky_reward(prompts, responses, metadata):
    """A reward function for the error-policy tests: the response length, but it raises on a
    response containing "a" or whose first character's code is 1 mod 4, and returns NaN for
    one containing "b" or whose first code is 2 mod 4 (about half of random byte strings)."""
    out = []
    for r in responses:
        first = ord(r[0]) % 4 if r else 0
        if "a" in r or first == 1:
            raise RuntimeError("cannot score a response with 'a'")
        out.append(float("nan") if "b" in r or first == 2 else float(len(r)))
    return out


def distinct_chars_reward(prompts, responses, metadata):
    """Number of distinct characters of the response: varies between random samples, so group
    advantages are not all zero even for an untrained policy."""
    return [float(len(set(r))) for r in responses]


def run_preempted(cfg, stage_dir, monkeypatch, position: int = 2):
    """Runs a stage that gets SIGTERM when its training iterator reaches `position` in epoch 0
    (it must raise `Preempted` after saving), then runs it again to the end (the resume).
    Returns the latest checkpoint step at the interruption."""
    import signal

    import pytest

    from jaxrlhf.checkpoint import Checkpointer
    from jaxrlhf.data import batching
    from jaxrlhf.trainers import common, runner
    orig = batching.BatchIterator.__next__

    def in_loop():   # the stage loop has its SIGTERM handler installed (not during build)
        return isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None),
                          common.SigtermFlag)

    def interrupting(self):
        if self.shuffle and self.position == position and self.epoch == 0 and in_loop():
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(self)

    with monkeypatch.context() as m:
        m.setattr(batching.BatchIterator, "__next__", interrupting)
        with pytest.raises(common.Preempted):
            runner.run(cfg, stage_dir)
    saved = Checkpointer(os.path.join(stage_dir, "checkpoints")).latest_step()
    runner.run(cfg, stage_dir)
    return saved
