"""Entry point: python -m jaxrlhf.train --config configs/<name>.py[:variant] --workdir DIR
[--config.a.b=value ...]. Defines flags and hands config + workdir to the stage runner."""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<name>.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, exports.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from jaxrlhf.trainers import common, runner
    try:
        runner.run(_CONFIG.value, _WORKDIR.value)
    except common.Preempted as e:
        print(f"{e}. Re-run the same command to resume.", file=sys.stderr)
        sys.exit(143)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
