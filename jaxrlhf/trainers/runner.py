"""The stage runner: `run(config, workdir)` dispatches on `config.stage`.

  sft       -> jaxrlhf.trainers.sft.run(config, workdir)
  rm        -> jaxrlhf.trainers.reward.run(config, workdir)
  ppo       -> jaxrlhf.trainers.ppo.run(config, workdir)
  pipeline  -> sft -> rm -> ppo in workdir/{sft,rm,ppo}
  rm_ensemble -> jaxrlhf.trainers.rm_ensemble.run(config, workdir)  (M RMs + strength)
  dpo       -> jaxrlhf.trainers.dpo.run(config, workdir)

Every stage module has `build(config, stage_dir) -> common.Stage` and `run`, which hands
`build` to `common.run_stage` (the one loop). Every stage resumes from the latest checkpoint in
its directory, so re-running the same command after an interruption continues where it
stopped.
"""
from __future__ import annotations

import importlib

from jaxrlhf import paths

STAGE_MODULES = {"sft": "jaxrlhf.trainers.sft", "rm": "jaxrlhf.trainers.reward",
                 "ppo": "jaxrlhf.trainers.ppo", "pipeline": "jaxrlhf.trainers.pipeline",
                 "rm_ensemble": "jaxrlhf.trainers.rm_ensemble",
                 "dpo": "jaxrlhf.trainers.dpo"}


def run(config, workdir: str):
    stage = config.stage
    if stage not in STAGE_MODULES:
        raise ValueError(f"Unknown stage {stage!r}; expected one of {sorted(STAGE_MODULES)}.")
    module = importlib.import_module(STAGE_MODULES[stage])
    workdir = paths.absolute(workdir)
    paths.makedirs(workdir)
    from jaxrlhf.config import resolve_data_paths
    resolve_data_paths(config)
    return module.run(config, workdir)
