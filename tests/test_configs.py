"""Every config in configs/ (and each documented variant) builds and runs one step."""
import glob
import os

import pytest

from trainer_utils import REPO, load_config, shrink, shrink_pipeline, shrink_ppo

from jaxrlhf.models import init_model, preset, save_hf
from jaxrlhf.trainers import runner

HH = os.path.join(REPO, "..", "shared", "data", "hh-rlhf-harmless")
CONFIG_NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs",
                                                                               "*.py")))
# Extra variants per config, run in addition to the default one.
VARIANTS = {"sft": ["data=hh", "init_from={hf}"], "rm": ["data=hh", "init_from={hf}"]}
# Configs whose default needs earlier stages get them from tiny random exports (the
# session-wide `stage_dirs` fixture of conftest.py).
DEFAULT_ARG = {"ppo": "sft={sft},rm={rm}", "rm_ensemble": "m=2"}
CASES = [(n, DEFAULT_ARG.get(n, "")) for n in CONFIG_NAMES] + [
    (n, v) for n in CONFIG_NAMES for v in VARIANTS.get(n, [])]


def _one_step(name, cfg):
    """Shrinks any config to one cheap step. The pipeline gets the short stages of test_ppo.py's
    pipeline test instead (a few steps each): the same programs, compiled once per session."""
    if name == "tiny_pipeline":
        return shrink_pipeline(cfg)
    if name == "ppo":
        return shrink_ppo(cfg, iterations=1)
    cfg = shrink(cfg, steps=1)
    cfg.train.eval_batches = 1
    return cfg


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny local HF checkpoint with the byte vocabulary (stands in for a user's model)."""
    d = str(tmp_path_factory.mktemp("hf_model"))
    save_hf(init_model(preset("tiny", d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                              mlp_dim=32), seed=0), d)
    return d


def test_every_config_has_a_case():
    assert {"sft", "rm", "ppo", "tiny_pipeline"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}:{v.split('=')[0] or 'default'}"
                                                     for n, v in CASES])
def test_config_runs_one_step(tmp_path, name, variant, hf_dir, stage_dirs):
    if "hh" in variant and not os.path.isdir(HH):
        pytest.skip("../shared/data/hh-rlhf-harmless is absent on this machine")
    arg = variant.format(hf=hf_dir, sft=stage_dirs["sft"], rm=stage_dirs["rm"]) or None
    cfg = _one_step(name, load_config(name, arg))
    if "data=hh" in variant:
        for block in ("data", "eval_data"):
            cfg[block].max_len = 128   # one small bucket keeps the compile cheap
            cfg[block].buckets = (128,)
    summary, _ = runner.run(cfg, str(tmp_path / "w"))
    assert summary is not None
