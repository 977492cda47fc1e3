"""Typed options: each stage's config carries only its blocks, every default comes from the
options dataclass, and a wrong field, type or value is one error naming the field."""
import dataclasses

import pytest

from trainer_utils import load_config

from jaxrlhf.config import base_config
from jaxrlhf.options import (PPOOptions, RMOptions, SFTOptions, TrainOptions, config_block,
                             parse)

BLOCKS = {"sft": {"sft"}, "rm": {"rm"}, "rm_ensemble": {"rm"}, "ppo": {"ppo", "ptx_data"}}
STAGE_BLOCKS = {"sft", "rm", "ppo", "ptx_data"}


@pytest.mark.parametrize("stage", sorted(BLOCKS))
def test_a_config_carries_only_its_stage_blocks(stage):
    c = base_config(stage)
    assert STAGE_BLOCKS & set(c.keys()) == BLOCKS[stage]
    assert ("init_from" in c) == (stage != "ppo")   # PPO starts from ppo.actor_init


@pytest.mark.parametrize("cls,block,stage", [(TrainOptions, "train", "sft"),
                                             (SFTOptions, "sft", "sft"),
                                             (RMOptions, "rm", "rm"),
                                             (PPOOptions, "ppo", "ppo")])
def test_defaults_live_in_the_options_class(cls, block, stage):
    got = base_config(stage)[block].to_dict()
    got.pop("center_data", None)
    assert got == dataclasses.asdict(cls())
    assert parse(cls, base_config(stage)[block], block) == cls()


def test_each_error_names_the_field():
    cases = [
        (TrainOptions, {"stepz": 2}, r"train\.stepz is not an option"),
        (TrainOptions, {"lr": "fast"}, r"train\.lr must be float, got 'fast'"),
        (TrainOptions, {"steps": True}, r"train\.steps must be int"),
        (TrainOptions, {"on_nonfinite": "maybe"}, r"train\.on_nonfinite must be one of"),
        (TrainOptions, {"batch_size": 6, "grad_accum": 4}, r"train\.grad_accum \(4\) must divide"),
        (TrainOptions, {"max_skipped_fraction": 1.5}, r"train\.max_skipped_fraction must be in"),
        (RMOptions, {"tie_mode": "both"}, r"rm\.tie_mode must be one of"),
        (RMOptions, {"soft_labels": True}, r"rm\.strength_file is needed"),
        (RMOptions, {"meta_rm": True}, r"rm\.meta_rm needs rm\.meta_data"),
        (PPOOptions, {"minibatch_size": 5}, r"ppo\.minibatch_size \(5\) must divide"),
        (PPOOptions, {"kl_estimator": "k9"}, r"ppo\.kl_estimator must be one of .*'k1'"),
        (PPOOptions, {"advantage_estimator": "vtrace"}, r"ppo\.advantage_estimator must be"),
        (PPOOptions, {"critic": "twin"}, r"ppo\.critic must be one of"),
        (PPOOptions, {"top_p": 0.0}, r"ppo\.top_p must be in \(0, 1\]"),
        (PPOOptions, {"dual_clip": 0.5}, r"ppo\.dual_clip must be 0 \(off\) or > 1"),
    ]
    for cls, block, message in cases:
        name = {TrainOptions: "train", RMOptions: "rm", PPOOptions: "ppo"}[cls]
        with pytest.raises(ValueError, match=message):
            parse(cls, block, name)
    # Ints are accepted for float fields; a partial block takes the other defaults.
    assert parse(PPOOptions, {"kl_horizon": 100}, "ppo").kl_horizon == 100.0
    assert parse(TrainOptions, {"lr": 1}, "train") == TrainOptions(lr=1.0)


def test_stage_configs_parse():
    for name, arg in (("sft", None), ("rm", None), ("rm_ensemble", "m=2"),
                      ("ppo", "sft=/s,rm=/r"), ("ppo", "data=hh,sft=/s,rm=/r")):
        c = load_config(name, arg)
        parse(TrainOptions, c.train, "train")
        for block, cls in (("sft", SFTOptions), ("rm", RMOptions), ("ppo", PPOOptions)):
            if block in c:
                parse(cls, c[block], block)
    block = config_block(PPOOptions)
    block.kl_horizon = 50   # the CLI gives ints for float fields: the block converts them
    assert parse(PPOOptions, block, "ppo").kl_horizon == 50.0
