"""Every config in configs/ (and each documented variant) builds and runs one step."""
import glob
import json
import os

import pytest

from trainer_utils import REPO, load_config, shrink, shrink_pipeline, shrink_ppo

from jaxrlhf.models import init_model, preset, save_hf
from jaxrlhf.trainers import runner

HH = os.path.join(REPO, "..", "shared", "data", "hh-rlhf-harmless")
CONFIG_NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs",
                                                                               "*.py")))
# Extra variants per config, run in addition to the default one.
VARIANTS = {"sft": ["data=hh", "init_from={hf}"], "rm": ["data=hh", "init_from={hf}"],
            "ppo": ["data=hh,sft={sft},rm={rm}"], "grpo": ["task=arithmetic,model={chat_hf}"],
            "dpo": ["data=hh,model={chat_hf}", "sft={sft},ranking=plackett_luce,ref=step",
                    "sft={sft},loss=simpo"]}
# Configs whose default needs earlier stages get them from tiny random exports (the
# session-wide `stage_dirs` fixture of conftest.py).
DEFAULT_ARG = {"ppo": "sft={sft},rm={rm}", "rm_ensemble": "m=2", "dpo": "sft={sft}",
               "hh_pipeline": "model={chat_hf}"}
CASES = [(n, DEFAULT_ARG.get(n, "")) for n in CONFIG_NAMES] + [
    (n, v) for n in CONFIG_NAMES for v in VARIANTS.get(n, [])]


def _one_step(name, cfg):
    """Shrinks any config to one cheap step. The pipeline gets the short stages of test_ppo.py's
    pipeline test instead (a few steps each): the same programs, compiled once per session."""
    if name == "tiny_pipeline":
        return shrink_pipeline(cfg)
    if name == "hh_pipeline":  # one step / iteration per stage, small buckets
        cfg = shrink_pipeline(cfg, steps=1, iterations=1)
        for stage in ("sft", "rm"):
            for block in ("data", "eval_data"):
                cfg.pipeline[stage][block].max_len = 128
                cfg.pipeline[stage][block].buckets = (128,)
        for block in ("data", "eval_data"):
            cfg.pipeline.ppo[block].buckets = (64,)
            cfg.pipeline.ppo[block].max_prompt_len = 64
        return cfg
    if name == "grpo" and cfg.stage == "pipeline":   # SFT -> GRPO
        return shrink_pipeline(cfg, iterations=1)
    if name in ("ppo", "grpo"):
        return shrink_ppo(cfg, iterations=1)
    cfg = shrink(cfg, steps=1)
    cfg.train.eval_batches = 1
    return cfg


@pytest.fixture(scope="module")
def chat_hf_dir(tmp_path_factory):
    """A tiny random Llama with a SmolLM2-like tokenizer and chat template (pad == eos)."""
    from chat_fixtures import smollm2_like

    from jaxrlhf.data import load_tokenizer
    d = str(tmp_path_factory.mktemp("chat_model"))
    tok = load_tokenizer(smollm2_like(d))
    save_hf(init_model(preset("tiny", vocab_size=tok.vocab_size, d_model=32, n_layers=1,
                              n_heads=2, n_kv_heads=1, mlp_dim=32, pad_token_id=tok.pad_id,
                              eos_token_id=tok.eos_id, bos_token_id=tok.bos_id), seed=0), d)
    return d


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
def test_config_runs_one_step(tmp_path, name, variant, hf_dir, chat_hf_dir, stage_dirs):
    if ("hh" in variant or "hh" in name) and not os.path.isdir(HH):
        pytest.skip("../shared/data/hh-rlhf-harmless is absent on this machine")
    arg = variant.format(hf=hf_dir, sft=stage_dirs["sft"], rm=stage_dirs["rm"],
                         chat_hf=chat_hf_dir) or None
    cfg = _one_step(name, load_config(name, arg))
    if "data=hh" in variant and name == "ppo":
        for block in ("data", "eval_data"):
            cfg[block].buckets = (64,)
            cfg[block].max_prompt_len = 64
    elif "data=hh" in variant:
        for block in ("data", "eval_data"):
            cfg[block].max_len = 128   # one small bucket keeps the compile cheap
            cfg[block].buckets = (128,)
    summary, _ = runner.run(cfg, str(tmp_path / "w"))
    assert summary is not None
    if name == "hh_pipeline":   # the chat model's whole recipe ran and exported every stage
        for stage in ("sft", "rm", "ppo"):
            assert os.path.isfile(os.path.join(tmp_path, "w", stage, "hf", "config.json"))
        from jaxrlhf.data import load_tokenizer
        eos = load_tokenizer(chat_hf_dir).eos_id
        with open(os.path.join(tmp_path, "w", "rm", "hf", "config.json")) as f:
            assert json.load(f)["pad_token_id"] != eos    # HF reads the score at the EOS


def test_relative_data_paths_resolve_under_the_data_root(tmp_path, monkeypatch):
    """A checkout anywhere: relative data paths are looked up under config.data_root, which
    defaults to $JAXRLHF_DATA_ROOT (else <checkout>/../shared/data)."""
    from jaxrlhf.config import default_data_root, resolve_data_paths
    (tmp_path / "hh-rlhf-harmless").mkdir()
    (tmp_path / "hh-rlhf-harmless" / "train.jsonl.gz").write_bytes(b"")
    monkeypatch.setenv("JAXRLHF_DATA_ROOT", str(tmp_path))
    assert default_data_root() == str(tmp_path)
    cfg = load_config("hh_pipeline", "model=/some/model")
    assert cfg.data_root == str(tmp_path)
    resolve_data_paths(cfg)
    want = str(tmp_path / "hh-rlhf-harmless" / "train.jsonl.gz")
    assert cfg.pipeline.sft.data.path == cfg.pipeline.rm.data.path == want
    assert cfg.pipeline.ppo.data.path == want
    assert cfg.pipeline.sft.eval_data.path == "hh-rlhf-harmless/test.jsonl.gz"  # absent: kept
    assert cfg.pipeline.ppo.ptx_data.path == "synthetic"   # (ptx_data: PPO configs only)
    monkeypatch.delenv("JAXRLHF_DATA_ROOT")
    assert default_data_root() == os.path.normpath(os.path.join(REPO, "..", "shared", "data"))
    with pytest.raises(ValueError, match="model=<local HF model directory>"):
        load_config("hh_pipeline")
