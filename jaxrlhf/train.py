"""Entry point: python -m jaxrlhf.train --config configs/<name>.py[:variant] --workdir DIR
[--config.a.b=value ...] [--verbose]. Defines flags and hands config + workdir to the stage
runner.

A user error (a bad config value or override, a missing or malformed file, a data row that
breaks its format, a run that went non-finite) prints one line naming the field or file and
exits with status 2; --verbose (or JAXRLHF_VERBOSE=1) prints the full traceback instead.
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<name>.py[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, exports.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print full tracebacks for user errors.")

# What a user can cause and fix: reported as one line (the message names the file or field).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, FloatingPointError)


def _verbose(argv=()) -> bool:
    return os.environ.get("JAXRLHF_VERBOSE") == "1" or any(
        a in ("--verbose", "-verbose", "--verbose=true") for a in argv)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    print("(run with --verbose for the full traceback)", file=sys.stderr)
    sys.exit(2)


def _unknown_field(error: Exception, argv) -> str:
    """One line for an override of a field the config does not have."""
    detail = str(error).strip().strip("'\"").replace("\\n", " ").replace("\n", " ")
    name = re.split(r"['\"\s]", detail)[0] if detail else ""
    arg = next((a for a in argv if a.startswith("--config.") and name and name in a), "")
    where = f" in {arg.split('=')[0]}" if arg else ""
    return (f"unknown config field {name!r}{where}: {detail}. jaxrlhf/config.py documents "
            "the fields.")


def parse_flags(argv):
    """absl flag parsing with one-line errors for unknown or mistyped config overrides."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if _verbose(argv):
            raise
        fail(f"{e}")
    except (AttributeError, KeyError) as e:
        if _verbose(argv):
            raise
        fail(_unknown_field(e, argv))
    except USER_ERRORS as e:
        if _verbose(argv):
            raise
        fail(f"{type(e).__name__}: {e}")


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
    except USER_ERRORS as e:
        if _VERBOSE.value or _verbose():
            raise
        fail(f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
